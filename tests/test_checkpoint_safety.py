"""Model files from elsewhere, and damaged ones: fairseq checkpoints and k-means models that would run
code when loaded are refused with one clear message naming the file; checkpoint copies are atomic, and
a resume survives a truncated checkpoint_last.pt."""
import io
import os
import pickle
import re

import joblib
import numpy as np
import pytest

from helpers import REPO, run_module, run_python


class _Evil:
    """Unpickling this runs ``touch TARGET``."""

    def __init__(self, target):
        self.target = str(target)

    def __reduce__(self):
        return (os.system, (f"touch {self.target}",))


def _fit_kmeans(path, k=4, dim=5, seed=0):
    from sklearn.cluster import MiniBatchKMeans

    feats = np.random.default_rng(seed).standard_normal((200, dim)).astype(np.float32)
    km = MiniBatchKMeans(n_clusters=k, n_init=1, random_state=seed, batch_size=50).fit(feats)
    joblib.dump(km, path)  # exactly what fairseq's learn_kmeans.py does
    return km, feats


# ---- k-means model files ----------------------------------------------------------------------

@pytest.mark.parametrize("how", ["joblib", "pickle", "object_array"])
def test_malicious_kmeans_is_refused(tmp_path, how):
    from pahubert_plugin.clustering.kmeans import KmeansRefused, apply_kmeans, load_kmeans

    marker, path = tmp_path / "pwned", tmp_path / "evil.km"
    if how == "joblib":
        joblib.dump(_Evil(marker), path)
    elif how == "pickle":
        with open(path, "wb") as f:
            pickle.dump({"cluster_centers_": _Evil(marker)}, f)
    else:  # joblib reads numpy object arrays with plain pickle.load
        joblib.dump(np.array([_Evil(marker), 1], dtype=object), path)
    for load in (load_kmeans, apply_kmeans):
        with pytest.raises(KmeansRefused, match=rf"{path}: refused to load this k-means model"):
            load(path)
    assert not marker.exists()


def test_genuine_kmeans_loads_and_labels_identically(tmp_path):
    from pahubert_plugin.clustering.kmeans import apply_kmeans, load_kmeans
    from pahubert_plugin.clustering.simple_kmeans import import_script

    km, feats = _fit_kmeans(tmp_path / "k.km")
    loaded = load_kmeans(tmp_path / "k.km")
    assert type(loaded) is type(km) and np.array_equal(loaded.cluster_centers_, km.cluster_centers_)
    fairseq_apply = import_script("dump_km_label").ApplyKmeans(str(tmp_path / "k.km"))  # plain joblib.load
    assert np.array_equal(apply_kmeans(tmp_path / "k.km")(feats), fairseq_apply(feats))
    assert np.array_equal(apply_kmeans(tmp_path / "k.km")(feats), km.predict(feats))


def _write_feature_shard(feat_dir, feats, split="train", nshard=1, rank=0):
    os.makedirs(feat_dir, exist_ok=True)
    np.save(os.path.join(feat_dir, f"{split}_{rank}_{nshard}.npy"), feats)
    with open(os.path.join(feat_dir, f"{split}_{rank}_{nshard}.len"), "w") as f:
        f.write("120\n80\n")


def test_label_dumping_cli_is_safe_and_matches_fairseq(tmp_path):
    """The recipe's stage-3/5 command: fairseq's dump_label output, and a malicious model is refused."""
    from pahubert_plugin.clustering.simple_kmeans import simple_kmeans_dir

    km, feats = _fit_kmeans(tmp_path / "k.km")
    _write_feature_shard(tmp_path / "feat", feats)
    ours = run_module("pahubert_plugin.clustering.kmeans", tmp_path / "feat", "train", tmp_path / "k.km", 1, 0,
                      tmp_path / "ours")
    assert ours.returncode == 0, ours.stderr
    theirs = run_python([os.path.join(simple_kmeans_dir(), "dump_km_label.py"), tmp_path / "feat", "train",
                   tmp_path / "k.km", 1, 0, tmp_path / "theirs"])
    assert theirs.returncode == 0, theirs.stderr
    assert (tmp_path / "ours" / "train_0_1.km").read_text() == (tmp_path / "theirs" / "train_0_1.km").read_text()

    marker = tmp_path / "pwned"
    joblib.dump(_Evil(marker), tmp_path / "evil.km")
    bad = run_module("pahubert_plugin.clustering.kmeans", tmp_path / "feat", "train", tmp_path / "evil.km", 1, 0,
                     tmp_path / "bad")
    assert bad.returncode == 2 and f"{tmp_path / 'evil.km'}: refused to load" in bad.stdout + bad.stderr
    assert "Traceback" not in bad.stderr and not marker.exists() and not (tmp_path / "bad").exists()


def test_recipe_uses_the_safe_label_dumper():
    with open(os.path.join(REPO, "recipes", "pahubert", "run.sh")) as f:
        text = f.read()
    # one labelling function, run by stage 3 (MFCC clusters) and stage 5 (iteration-1 clusters)
    assert "dump_km_label.py" not in text and text.count("-m pahubert_plugin.clustering.kmeans") == 1
    assert re.search(r'^  labels "\$feat_dir" ', text, re.M) and re.search(r'^  labels "\$feat2_dir" ', text, re.M)


def test_label_quality_refuses_malicious_kmeans(tmp_path, caplog):
    from pahubert_plugin.clustering import label_quality

    marker = tmp_path / "pwned"
    joblib.dump(_Evil(marker), tmp_path / "evil.km")
    assert label_quality.main([str(tmp_path / "evil.km"), str(tmp_path), "--is-wav"]) == 2
    assert f"{tmp_path / 'evil.km'}: refused to load" in caplog.text and not marker.exists()


# ---- one message for refused checkpoints ----------------------------------------------------

RAW_ADVICE = ("set to `False", "add_safe_globals")  # torch's advice to loosen the check


@pytest.fixture
def evil_pt(tmp_path):
    import torch

    marker, path = tmp_path / "pwned_pt", tmp_path / "evil.pt"
    torch.save({"model": {}, "cfg": None, "payload": _Evil(marker)}, path)
    yield path
    assert not marker.exists()


def _assert_one_message(text, path):
    assert f"{path}: refused to load: the checkpoint holds objects outside the allow-list" in text, text
    assert "posix.system" in text
    for advice in RAW_ADVICE:
        assert advice not in text, text
    assert set(re.findall(r"weights_only\W*(\w+)", text)) <= {"True"}, text  # never advises turning it off


def test_refused_checkpoint_message_in_fairseq_loaders(evil_pt):
    from fairseq import checkpoint_utils

    import pahubert_plugin  # noqa: F401
    from pahubert_plugin.checkpoint import CheckpointRefused, load_checkpoint

    for load in (load_checkpoint, checkpoint_utils.load_checkpoint_to_cpu,
                 lambda p: checkpoint_utils.load_model_ensemble_and_task([str(p)])):
        with pytest.raises(CheckpointRefused) as e:
            load(evil_pt)
        _assert_one_message(str(e.value), evil_pt)


def test_fairseq_loaders_pass_weights_only_explicitly(evil_pt, monkeypatch):
    """torch lets an environment switch lift the restriction only where a call passes no weights_only
    (torch/serialization.py: an explicit argument wins). Once the plugin is imported every
    torch.load fairseq makes on a checkpoint's way in passes weights_only=True explicitly -- load_checkpoint_to_cpu
    (model loading, resume), load_pretrained_component_from_model, and broadcast_object, by which ranks other
    than 0 unpickle the state rank 0 read -- and the crafted file is refused (the fixture checks it never ran)."""
    import torch
    from fairseq import checkpoint_utils
    from fairseq.distributed import utils as distributed_utils

    import pahubert_plugin  # noqa: F401
    from pahubert_plugin.checkpoint import CheckpointRefused

    passed, real_load = [], torch.load

    def recording_load(f, *args, **kwargs):
        passed.append(kwargs.get("weights_only"))
        return real_load(f, *args, **kwargs)

    monkeypatch.setattr(torch, "load", recording_load)
    for load in (checkpoint_utils.load_checkpoint_to_cpu,
                 lambda p: checkpoint_utils.load_model_ensemble_and_task([str(p)]),
                 lambda p: checkpoint_utils.load_pretrained_component_from_model(None, str(p))):
        with pytest.raises(CheckpointRefused):
            load(evil_pt)
    with pytest.raises(pickle.UnpicklingError):
        distributed_utils.torch.load(io.BytesIO(evil_pt.read_bytes()), map_location="cpu")
    assert len(passed) == 4 and all(v is True for v in passed), passed


def test_refused_checkpoint_separate_and_evaluate(evil_pt, tmp_path, caplog, capsys):
    import soundfile as sf

    from pahubert_plugin import evaluate, separate

    sf.write(tmp_path / "a.wav", np.zeros((1600, 2), np.float32), 16000)
    assert separate.main([str(evil_pt), str(tmp_path / "a.wav"), "-o", str(tmp_path / "sep")]) == 2
    assert evaluate.main([str(evil_pt), "--musdb-root", str(tmp_path), "--is-wav", "--out", str(tmp_path / "ev")]) == 2
    text = caplog.text + "".join(capsys.readouterr())
    assert text.count("refused to load") == 2
    _assert_one_message(text, evil_pt)


def test_refused_checkpoint_dump_features_and_label_quality(evil_pt, tmp_path, caplog, capsys):
    from pahubert_plugin.clustering import dump_features, label_quality

    assert dump_features.main([str(tmp_path), "train", "1", "0", str(tmp_path / "feat"), "--feature", "hubert",
                               "--ckpt", str(evil_pt), "--layer", "1"]) == 2
    _fit_kmeans(tmp_path / "k.km")
    assert label_quality.main([str(tmp_path / "k.km"), str(tmp_path), "--is-wav", "--feature", "hubert",
                               "--ckpt", str(evil_pt), "--layer", "1"]) == 2
    text = caplog.text + "".join(capsys.readouterr())
    assert text.count("refused to load") == 2
    _assert_one_message(text, evil_pt)


class _Trainer:
    checkpoint_suffix = ""


def test_refused_checkpoint_on_resume(evil_pt, tmp_path):
    import shutil

    from fairseq import checkpoint_utils
    from fairseq.dataclass.configs import CheckpointConfig
    from omegaconf import OmegaConf

    import pahubert_plugin  # noqa: F401
    from pahubert_plugin.checkpoint import CheckpointRefused

    save = tmp_path / "ckpt"
    save.mkdir()
    shutil.copy(evil_pt, save / "checkpoint_last.pt")
    cfg = OmegaConf.structured(CheckpointConfig(save_dir=str(save)))
    with pytest.raises(CheckpointRefused) as e:
        checkpoint_utils.load_checkpoint(cfg, _Trainer())
    _assert_one_message(str(e.value), save / "checkpoint_last.pt")


# ---- a kill during a checkpoint save, a resume after it -------------------------------------

def test_checkpoint_copy_is_atomic(tmp_path, monkeypatch):
    import shutil

    import pahubert_plugin  # noqa: F401  (installs the patch)
    from fairseq.file_io import PathManager

    src, dst = tmp_path / "checkpoint_1_2.pt", tmp_path / "checkpoint_last.pt"
    src.write_bytes(b"new" * 1000)
    dst.write_bytes(b"old")

    def killed(inp, out, *a):  # the process dies half way through the copy
        out.write(inp.read(10))
        raise KeyboardInterrupt

    monkeypatch.setattr(shutil, "copyfileobj", killed)
    with pytest.raises(KeyboardInterrupt):
        PathManager.copy(str(src), str(dst), overwrite=True)
    assert dst.read_bytes() == b"old" and sorted(os.listdir(tmp_path)) == [src.name, dst.name]
    monkeypatch.undo()
    assert PathManager.copy(str(src), str(dst), overwrite=True)
    assert dst.read_bytes() == src.read_bytes()


@pytest.mark.parametrize("damage", ["empty", "half"])
def test_resume_after_truncated_checkpoint_last(tmp_path, damage):
    """A real tiny fairseq run, checkpoint_last.pt cut (as by a kill in a plain copy), then a resume."""
    import re

    from helpers import run_fairseq, stock_hubert_overrides, train_stock_hubert

    save, log = train_stock_hubert(tmp_path, max_update=2)
    last = save / "checkpoint_last.pt"
    data = last.read_bytes()
    last.write_bytes(b"" if damage == "empty" else data[: len(data) // 2])
    log2 = run_fairseq(["fairseq_cli.hydra_train", *stock_hubert_overrides(tmp_path / "data", save, 3)],
                       cwd=tmp_path, env={"OMP_NUM_THREADS": "1"})
    assert re.search(rf"{re.escape(str(last))}: not a readable checkpoint .*resuming from .*checkpoint_best\.pt",
                     log2), log2[-3000:]
    # fairseq's hubert config keeps only best and last: best (2 updates) is the newest intact one
    assert re.search(r"Loaded checkpoint .*checkpoint_best\.pt \(epoch \d+ @ 2 updates\)", log2), log2[-3000:]
    assert re.findall(r'"num_updates": "(\d+)"', log2)[-1] == "3"
    from pahubert_plugin.checkpoint import checkpoint_updates

    assert checkpoint_updates(str(last)) == 3  # the next save replaced the damaged file


def test_resume_without_intact_checkpoint_names_file_and_fix(tmp_path):
    from fairseq import checkpoint_utils
    from fairseq.dataclass.configs import CheckpointConfig
    from omegaconf import OmegaConf

    import pahubert_plugin  # noqa: F401
    from pahubert_plugin.checkpoint import CheckpointCorrupt

    (tmp_path / "checkpoint_last.pt").write_bytes(b"")
    (tmp_path / "checkpoint_1_1.pt").write_bytes(b"PK\x03\x04 truncated")
    cfg = OmegaConf.structured(CheckpointConfig(save_dir=str(tmp_path)))
    with pytest.raises(CheckpointCorrupt, match=rf"{tmp_path / 'checkpoint_last.pt'}: not a readable checkpoint "
                                                r".*No intact checkpoint .* move .* away"):
        checkpoint_utils.load_checkpoint(cfg, _Trainer())
