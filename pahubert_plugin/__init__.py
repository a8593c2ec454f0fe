"""pahubert: Pac-HuBERT self-supervised music source separation as a fairseq user dir.

``import pahubert_plugin`` (or ``common.user_dir=/path/to/pahubert_plugin``) registers
every task, model and criterion of the package, allow-lists fairseq's checkpoint
classes for torch's ``weights_only`` loader, and makes fairseq's checkpoint copies atomic and
its resume robust to a truncated checkpoint_last.pt (:func:`checkpoint.install_fairseq_patches`).
"""
import logging as _logging

_root = _logging.getLogger()
_root_state = (_root.level, list(_root.handlers))

from . import checkpoint  # noqa: E402

checkpoint.register_safe_globals()
checkpoint.install_fairseq_patches()

from . import criterions, models, tasks  # noqa: E402,F401  (registration side effects)

# fairseq.models.wav2vec.wav2vec2_classification calls logging.basicConfig(level=DEBUG) when
# imported; undo that so our CLIs (and users' scripts) keep their own logging setup.
if (_root.level, _root.handlers) != _root_state:
    for _h in [h for h in _root.handlers if h not in _root_state[1]]:
        _root.removeHandler(_h)
    _root.setLevel(_root_state[0])

__version__ = "0.1.0"
