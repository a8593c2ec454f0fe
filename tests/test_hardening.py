"""Issue 11 (hardening): no code run from a model file, nothing lost on a kill, no silent damage."""
import io
import os
import pickle
import re
import subprocess
import sys

import joblib
import numpy as np
import pytest

SR = 16000
SOURCES = ["drums", "bass", "other", "vocals"]

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))


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


def _run(args, **kw):
    return subprocess.run([sys.executable, *map(str, args)], env=ENV, capture_output=True, text=True,
                          timeout=300, **kw)


# ---- item 3: k-means model files -------------------------------------------------------------

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
    ours = _run(["-m", "pahubert_plugin.clustering.kmeans", tmp_path / "feat", "train", tmp_path / "k.km", 1, 0,
                 tmp_path / "ours"])
    assert ours.returncode == 0, ours.stderr
    theirs = _run([os.path.join(simple_kmeans_dir(), "dump_km_label.py"), tmp_path / "feat", "train",
                   tmp_path / "k.km", 1, 0, tmp_path / "theirs"])
    assert theirs.returncode == 0, theirs.stderr
    assert (tmp_path / "ours" / "train_0_1.km").read_text() == (tmp_path / "theirs" / "train_0_1.km").read_text()

    marker = tmp_path / "pwned"
    joblib.dump(_Evil(marker), tmp_path / "evil.km")
    bad = _run(["-m", "pahubert_plugin.clustering.kmeans", tmp_path / "feat", "train", tmp_path / "evil.km", 1, 0,
                tmp_path / "bad"])
    assert bad.returncode == 2 and f"{tmp_path / 'evil.km'}: refused to load" in bad.stdout + bad.stderr
    assert "Traceback" not in bad.stderr and not marker.exists() and not (tmp_path / "bad").exists()


def test_recipe_uses_the_safe_label_dumper():
    with open(os.path.join(REPO, "recipes", "pahubert", "run.sh")) as f:
        text = f.read()
    # one labelling function, run by stage 3 (MFCC clusters) and stage 5 (iteration-1 clusters)
    assert "dump_km_label.py" not in text and text.count('-m pahubert_plugin.clustering.kmeans "$feat"') == 1
    assert re.search(r'^  labels "\$feat_dir" ', text, re.M) and re.search(r'^  labels "\$feat2_dir" ', text, re.M)


def test_label_quality_refuses_malicious_kmeans(tmp_path, caplog):
    from pahubert_plugin.clustering import label_quality

    marker = tmp_path / "pwned"
    joblib.dump(_Evil(marker), tmp_path / "evil.km")
    assert label_quality.main([str(tmp_path / "evil.km"), str(tmp_path), "--is-wav"]) == 2
    assert f"{tmp_path / 'evil.km'}: refused to load" in caplog.text and not marker.exists()


# ---- item 4: one message for refused checkpoints --------------------------------------------

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


# ---- item 1: kill during a checkpoint save ---------------------------------------------------

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


# ---- item 5: out-of-range labels ------------------------------------------------------------

def _bad_label(data, row=2, value="999"):
    path = os.path.join(data, "train.km")
    with open(path) as f:
        lines = f.read().splitlines()
    labels = lines[row - 1].split()
    labels[len(labels) // 2] = value
    lines[row - 1] = " ".join(labels)
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return path


def test_pretraining_dataset_rejects_labels_outside_the_dictionary(corpora, tmp_path):
    from omegaconf import OmegaConf

    from pahubert_plugin.tasks.pahubert_pretraining import PahubertPretrainingConfig, PahubertPretrainingTask

    data = corpora.write_corpus(tmp_path / "data", n_train=3, n_valid=1, seed=3, min_s=0.6, max_s=1.0)
    cfg = OmegaConf.structured(PahubertPretrainingConfig(data=str(data), label_dir=str(data), sample_rate=SR,
                                                         channels=2, max_sample_size=20000, min_sample_size=1000))
    task = PahubertPretrainingTask.setup_task(cfg)
    task.load_dataset("train")  # genuine labels load
    path = _bad_label(data)
    with pytest.raises(ValueError, match=rf"{path} row 2: label '999' is not in {data / 'dict.km.txt'}"):
        task.load_dataset("train")


def test_check_labels_finds_the_dictionary_beside_the_labels(corpora, tmp_path, capsys):

    from pahubert_plugin.clustering import check_labels

    data = corpora.write_corpus(tmp_path / "data", n_train=3, n_valid=1, seed=3, min_s=0.6, max_s=1.0)
    args = [str(data / "train.tsv"), str(data / "train.km"), "--sample-rate", str(SR)]
    assert check_labels.main(args) == 0
    assert f"labels in {data / 'dict.km.txt'}" in capsys.readouterr().out
    _bad_label(data)
    assert check_labels.main(args) == 1
    err = capsys.readouterr().err
    assert "row 2 " in err and "'999'" in err and str(data / "dict.km.txt") in err


# ---- item 11: one broken track does not abort the evaluation ---------------------------------

class _FakeSeparator:
    def __init__(self, sources):
        self.sources = list(sources)

    def separate(self, mixture, rate):
        import torch

        g = torch.Generator().manual_seed(0)
        return {s: mixture / len(self.sources) + 1e-3 * torch.randn(mixture.shape, generator=g)
                for s in self.sources}


@pytest.mark.slow  # museval on one track: about 45 s on the shared CI cores
def test_evaluate_skips_broken_tracks_and_scores_the_rest(tmp_path, monkeypatch, caplog, corpora):
    import json

    import soundfile as sf
    from omegaconf import OmegaConf

    from pahubert_plugin import evaluate, separate

    root = corpora.write_layout(tmp_path / "musdb", train=0, test=3, seconds=1.0)
    os.remove(root / "test" / "test_01" / "bass.wav")
    vocals, sr = sf.read(root / "test" / "test_02" / "vocals.wav")
    sf.write(root / "test" / "test_02" / "vocals.wav", vocals[: len(vocals) // 2], sr)
    ckpt = tmp_path / "model.pt"
    ckpt.write_bytes(b"stand-in: the model is replaced below")

    class Model:
        sources = SOURCES

    monkeypatch.setattr(separate, "load_separation_model",
                        lambda path, device="cpu": (Model(), OmegaConf.create({"task": {"sample_rate": sr}})))
    monkeypatch.setattr(evaluate, "_init_worker",
                        lambda *a: setattr(evaluate, "_SEPARATOR", _FakeSeparator(SOURCES)))
    out = tmp_path / "eval"
    assert evaluate.main([str(ckpt), "--musdb-root", str(root), "--is-wav", "--out", str(out)]) == 1
    summary = json.loads((out / "summary.json").read_text())
    assert summary["num_tracks"] == 1 and (out / "test" / "test_00.json").is_file()
    assert re.search(r"skipping track test_01: .*missing stem bass\.wav", caplog.text)
    assert re.search(r"skipping track test_02: .*stems differ in length", caplog.text)
    assert "2 track(s) skipped or failed" in caplog.text


# ---- item 10: honest exit codes of the manifest and the recipe -------------------------------

def _junk_folder(root, good=0):
    import soundfile as sf

    os.makedirs(root, exist_ok=True)
    with open(os.path.join(root, "corrupt.wav"), "wb") as f:
        f.write(np.random.default_rng(0).bytes(4000))
    sf.write(os.path.join(root, "short.wav"), np.zeros((1600, 1), np.float32) + 0.1, 16000)
    for i in range(good):
        t = np.arange(32000) / 16000
        sf.write(os.path.join(root, f"good{i}.wav"), (0.3 * np.sin(2 * np.pi * 220 * (i + 1) * t))[:, None], 16000)
    return root


def test_manifest_exit_status_counts_skips_and_refuses_kept_zero(tmp_path, caplog, capsys):
    from pahubert_plugin.data.manifest import main

    bad = _junk_folder(tmp_path / "bad")
    assert main([str(bad), str(tmp_path / "m0"), "--sample-rate", "16000", "--jobs", "1"]) == 2
    assert f"no usable audio in {bad}" in caplog.text and "kept 0" in capsys.readouterr().out
    mixed = _junk_folder(tmp_path / "mixed", good=2)
    assert main([str(mixed), str(tmp_path / "m1"), "--sample-rate", "16000", "--jobs", "1"]) == 1
    assert "2 file(s) skipped" in caplog.text and "kept 2" in capsys.readouterr().out
    assert main([str(tmp_path / "nowhere"), str(tmp_path / "m2"), "--sample-rate", "16000"]) == 2


def test_recipe_says_no_usable_audio(tmp_path):
    bad = _junk_folder(tmp_path / "bad")
    env = dict(ENV, PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"])
    proc = subprocess.run(["bash", os.path.join(REPO, "recipes", "pahubert", "run.sh"), "--audio-dir", str(bad),
                           "--exp-dir", str(tmp_path / "exp"), "--sample-rate", "16000", "--nj", "1",
                           "--stage", "0", "--stop-stage", "3"], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and f"no usable audio in {bad}" in proc.stderr, proc.stdout + proc.stderr
    assert "stage 1" not in proc.stdout
