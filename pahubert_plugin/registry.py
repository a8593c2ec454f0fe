"""Register our fairseq components and the checkpoint allow-list: :func:`register`.

``import pahubert_plugin`` calls it (except in the console scripts that defer it, see the package's
``__init__``); modules that need fairseq's registries call it themselves before loading a checkpoint.
"""
import logging as _logging

_registered = False


def _model_names(kind: str) -> list:
    """Our registered models an entry point of ``kind`` builds (:func:`checkpoint.accepted_models`)."""
    from fairseq.models import MODEL_REGISTRY

    from .checkpoint import PRETRAINING
    from .models.hubert_encoder import HubertPretrainingModel

    ours = {name: cls for name, cls in MODEL_REGISTRY.items()
            if isinstance(cls, type) and cls.__module__.startswith("pahubert_plugin.")}
    pretraining = kind == PRETRAINING
    return sorted(n for n, cls in ours.items() if issubclass(cls, HubertPretrainingModel) == pretraining)


def register() -> None:
    """Register our fairseq components and checkpoint allow-list (idempotent)."""
    global _registered
    if _registered:
        return
    root = _logging.getLogger()
    root_state = (root.level, list(root.handlers))

    from . import checkpoint

    checkpoint.register_safe_globals()
    checkpoint.install_fairseq_patches()

    from . import training

    training.install_training_guard()  # wraps the patched resume: one run per folder, finished runs stay so

    from . import criterions, models, tasks  # noqa: F401  (registration side effects)

    checkpoint.set_model_kinds(_model_names)

    # fairseq.models.wav2vec.wav2vec2_classification calls logging.basicConfig(level=DEBUG) when
    # imported; undo that so our CLIs (and users' scripts) keep their own logging setup.
    if (root.level, root.handlers) != root_state:
        for h in [h for h in root.handlers if h not in root_state[1]]:
            root.removeHandler(h)
        root.setLevel(root_state[0])
    _registered = True
