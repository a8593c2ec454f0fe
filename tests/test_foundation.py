"""Foundation: the plugin loads as a fairseq user dir and checkpoints load under weights_only."""
import json
import pickle
import re

import pytest
import torch

import pahubert_plugin
from pahubert_plugin import checkpoint
from helpers import run_fairseq, stock_hubert_overrides, train_stock_hubert, write_stock_hubert_data


def _updates(log):
    return [int(m) for m in re.findall(r'"num_updates": "(\d+)"', log)]


@pytest.mark.slow
def test_stock_hubert_trains_loads_and_resumes(tmp_path):
    save, log = train_stock_hubert(tmp_path, max_update=2)
    assert (save / "checkpoint_last.pt").is_file(), log[-2000:]
    assert max(_updates(log)) == 2

    # fairseq's own loader, under torch's default weights_only=True
    from fairseq import checkpoint_utils
    models, cfg, task = checkpoint_utils.load_model_ensemble_and_task([str(save / "checkpoint_last.pt")])
    assert type(models[0]).__name__ == "HubertModel"
    assert task.dictionaries[0].symbols[-1] == "7"
    state = checkpoint_utils.load_checkpoint_to_cpu(str(save / "checkpoint_last.pt"))
    assert state["optimizer_history"][-1]["num_updates"] == 2

    # a second run resumes from checkpoint_last.pt and keeps counting
    data = tmp_path / "data"
    log2 = run_fairseq(["fairseq_cli.hydra_train", *stock_hubert_overrides(data, save, 4)], cwd=tmp_path)
    assert re.search(r"Loaded checkpoint .*checkpoint_last.pt \(epoch \d+ @ 2 updates\)", log2), log2[-3000:]
    assert min(_updates(log2)) >= 3 and max(_updates(log2)) == 4


class _Evil:
    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        import os
        return (os.system, (f"touch {self.target}",))


def test_malicious_checkpoint_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"model": {}, "payload": _Evil(marker)}, path)
    with pytest.raises(ValueError, match="refused to load"):
        checkpoint.load_checkpoint(path)
    from fairseq import checkpoint_utils
    with pytest.raises(pickle.UnpicklingError):
        checkpoint_utils.load_checkpoint_to_cpu(str(path))
    assert not marker.exists()


def test_allow_list_is_registered_by_import():
    from fairseq.data.dictionary import Dictionary
    names = {getattr(c, "__name__", str(c)) for c in torch.serialization.get_safe_globals()}
    assert Dictionary.__name__ in names and "Namespace" in names
    assert "system" not in names and "eval" not in names


def test_plugin_registers_exactly_its_components_and_keeps_fairseqs():
    """Every registry key the plugin adds names the class of the file named after it, and fairseq's own
    hubert / wav2vec2 components are still fairseq's (the plugin replaced none of them)."""
    from fairseq.criterions import CRITERION_REGISTRY
    from fairseq.models import MODEL_REGISTRY
    from fairseq.tasks import TASK_REGISTRY
    ours = {reg_name: {name: cls.__module__ for name, cls in registry.items() if cls.__module__.startswith("pahubert_plugin")}
            for reg_name, registry in (("model", MODEL_REGISTRY), ("task", TASK_REGISTRY), ("criterion", CRITERION_REGISTRY))}
    assert ours == {
        "model": {name: f"pahubert_plugin.models.{name}" for name in
                  ("pahubert", "pahubert_resunet", "resunet", "demucs_v2", "demucs_hubert", "demucs_v2_hubert")},
        "task": {"pahubert_pretraining": "pahubert_plugin.tasks.pahubert_pretraining",
                 "music_separation": "pahubert_plugin.tasks.music_separation"},
        "criterion": {"pahubert": "pahubert_plugin.criterions.pahubert",
                      "separation": "pahubert_plugin.criterions.separation"},
    }
    for registry, name in ((MODEL_REGISTRY, "hubert"), (MODEL_REGISTRY, "wav2vec2"), (TASK_REGISTRY, "hubert_pretraining"),
                           (CRITERION_REGISTRY, "hubert")):
        assert registry[name].__module__.startswith("fairseq."), name
