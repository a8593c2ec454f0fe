"""Model files from elsewhere, and damaged ones: fairseq checkpoints and k-means models that would run
code when loaded are refused with one clear message naming the file; checkpoint copies are atomic, and
a resume survives a truncated checkpoint_last.pt."""
import io
import os
import pickle
import re
import subprocess
import sys
import zipfile

import joblib
import numpy as np
import pytest
import soundfile as sf
import torch

from helpers import ENV, REPO, SR, run_module, run_python

PLUGIN = os.path.join(REPO, "pahubert_plugin")


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
    assert "dump_km_label.py" not in text and text.count('-m pahubert_plugin.clustering.kmeans "$feat"') == 1
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


# ---- plain-data checkpoints and junk at every entry point ---------------------------------------
# Checkpoints made only of plain data, and files that are no checkpoint at all, at every entry point.
# 
# A checkpoint of dicts and strings passes ``weights_only`` and the allow-list, but what its ``cfg`` names
# gets built: ``cfg.model._name: wav2vec2`` with a ``conv_feature_layers`` string makes fairseq ``eval()``
# that string. Each entry point that loads a checkpoint must refuse it before building anything, with one
# message naming the file and the field; junk (text, audio, random bytes, zip, TorchScript, a cut-off file)
# gets one message naming the file.


def _payload(marker):
    return f"__import__('os').system('touch {marker}')"


def crafted(path, marker, model="wav2vec2", task="audio_pretraining", field="conv_feature_layers"):
    """A checkpoint of plain dicts and strings whose model config makes fairseq eval() a payload."""
    cfg = {"model": {"_name": model, field: _payload(marker)},
           "task": {"_name": task, "data": str(os.path.dirname(path)), "sample_rate": SR}}
    torch.save({"args": None, "cfg": cfg, "model": {"encoder.layers.0.fc1.weight": torch.zeros(2, 2),
                                                    "mask_emb": torch.zeros(2)},
                "optimizer_history": [{"num_updates": 1}], "extra_state": {}}, path)
    return path


def _run(args, cwd=None, timeout=300):
    proc = subprocess.run([sys.executable, "-m", *map(str, args)], env=ENV, capture_output=True, text=True,
                          timeout=timeout, cwd=cwd)
    return proc.returncode, proc.stdout + proc.stderr


def _fit_kmeans_of_dim(path, dim=8):
    import joblib
    from sklearn.cluster import MiniBatchKMeans

    feats = np.random.default_rng(0).standard_normal((100, dim)).astype(np.float32)
    joblib.dump(MiniBatchKMeans(n_clusters=3, n_init=1, random_state=0, batch_size=50).fit(feats), path)


def _entry_points(tmp_path, ckpt):
    """(name, module and arguments) of every CLI that loads a checkpoint given on its command line."""
    wav = tmp_path / "a.wav"
    sf.write(wav, np.zeros((SR // 2, 2), np.float32), SR)
    (tmp_path / "test" / "song").mkdir(parents=True, exist_ok=True)
    _fit_kmeans_of_dim(tmp_path / "k.km")
    return {
        "separate": ["pahubert_plugin.separate", ckpt, wav, "-o", tmp_path / "sep"],
        "evaluate": ["pahubert_plugin.evaluate", ckpt, "--musdb-root", tmp_path, "--is-wav", "--out", tmp_path / "ev"],
        "dump-features": ["pahubert_plugin.clustering.dump_features", tmp_path, "train", "1", "0", tmp_path / "feat",
                          "--feature", "hubert", "--ckpt", ckpt, "--layer", "1"],
        "label-quality": ["pahubert_plugin.clustering.label_quality", tmp_path / "k.km", tmp_path, "--is-wav",
                          "--feature", "hubert", "--ckpt", ckpt, "--layer", "1"],
        "port-hubert": ["pahubert_plugin.port_hubert", ckpt, tmp_path / "ported.pt", "--target", "pahubert"],
        "pretrained_checkpoint": [
            "fairseq_cli.hydra_train", "--config-dir", os.path.join(REPO, "recipes", "musdb", "conf"),
            "--config-name", "demucs_v2_hubert_tiny", f"common.user_dir={PLUGIN}", f"task.data={tmp_path}",
            f"model.pretrained_checkpoint={ckpt}", f"checkpoint.save_dir={tmp_path / 'ft'}",
            f"hydra.run.dir={tmp_path / 'ft'}", "optimization.max_update=1"],
    }


ENTRY_POINTS = ["separate", "evaluate", "dump-features", "label-quality", "port-hubert", "pretrained_checkpoint"]


@pytest.mark.parametrize("entry", ENTRY_POINTS)
def test_plain_data_checkpoint_runs_no_code(tmp_path, entry):
    marker = tmp_path / "pwned"
    ckpt = crafted(tmp_path / "crafted.pt", marker)
    rc, out = _run(_entry_points(tmp_path, ckpt)[entry], cwd=tmp_path)
    assert not marker.exists(), f"{entry} ran the checkpoint's code:\n{out[-3000:]}"
    assert rc != 0, out[-3000:]
    assert str(ckpt) in out and ("cfg.model._name" in out or "cfg.model.conv_feature_layers" in out), out[-3000:]
    assert "Traceback" not in out or entry == "pretrained_checkpoint", out[-3000:]  # fairseq-hydra-train prints its own


def _separation_load(path):
    from pahubert_plugin.separation.api import load_separation_model

    return load_separation_model(str(path))


def _pretraining_load(path):
    from pahubert_plugin.clustering.hubert_reader import HubertFeatureReader

    return HubertFeatureReader(str(path), layer=1, sample_rate=SR)


@pytest.mark.parametrize("load", [_separation_load, _pretraining_load])
@pytest.mark.parametrize("model,task,field", [
    ("wav2vec2", None, "cfg.model._name"),  # a foreign model (stock fairseq evals its conv_feature_layers)
    ("hubert", None, "cfg.model._name"),
    (None, "audio_pretraining", "cfg.task._name"),  # our model, a foreign task
    (None, None, "cfg.model.conv_feature_layers"),  # our model, a field that fairseq would eval()
])
def test_components_and_eval_fields_are_checked_before_building(tmp_path, load, model, task, field):
    separation = load is _separation_load
    ours = "resunet" if separation else "pahubert"
    ours_task = "music_separation" if separation else "pahubert_pretraining"
    marker = tmp_path / "pwned"
    ckpt = crafted(tmp_path / "c.pt", marker, model or ours, task or ours_task)
    with pytest.raises(ValueError, match=rf"{ckpt}: refused to build from this checkpoint: {field}"):
        load(ckpt)
    assert not marker.exists()


def test_pretraining_checkpoint_is_not_a_separation_model(tmp_path):
    from pahubert_plugin.checkpoint import accepted_models

    ckpt = tmp_path / "c.pt"
    torch.save({"cfg": {"model": {"_name": "pahubert"}, "task": {"_name": "pahubert_pretraining"}}, "model": {},
                "optimizer_history": [{"num_updates": 1}]}, ckpt)
    with pytest.raises(ValueError, match=r"cfg.model._name is 'pahubert', not one of the models this loads as a "
                                         r"fine-tuned separation model"):
        _separation_load(ckpt)
    assert {"resunet", "demucs_v2", "pahubert_resunet", "demucs_v2_hubert"} <= set(accepted_models("separation"))
    assert {"pahubert", "demucs_hubert"} <= set(accepted_models("pretraining"))
    assert not set(accepted_models("separation")) & set(accepted_models("pretraining"))


def test_fairseq_default_layer_strings_still_parse():
    """Genuine configs keep loading: fairseq's own defaults are sums and products of list literals."""
    from pahubert_plugin.checkpoint import parse_literal

    assert parse_literal("[(512,10,5)] + [(512,3,2)] * 4 + [(512,2,2)] * 2") == \
        [(512, 10, 5)] + [(512, 3, 2)] * 4 + [(512, 2, 2)] * 2
    assert parse_literal("(0.9, 0.98)") == (0.9, 0.98) and parse_literal("False") is False
    for bad in ("__import__('os')", "[1] * 10**9", "[(1,)] * 1000000", "().__class__", "[x for x in ()]",
                "open('f')", "[1] * 2.5"):
        with pytest.raises(ValueError):
            parse_literal(bad)


def test_port_hubert_refuses_eval_fields_of_a_fairseq_checkpoint(tmp_path):
    from pahubert_plugin.port_hubert import load_speech_hubert

    marker = tmp_path / "pwned"
    for where, field in (("cfg", "conv_feature_layers"), ("args", "conv_feature_layers")):
        ckpt = tmp_path / f"{where}.pt"
        if where == "cfg":
            crafted(ckpt, marker, "hubert", "hubert_pretraining", field)
        else:
            import argparse

            torch.save({"args": argparse.Namespace(arch="hubert", conv_feature_layers=_payload(marker)),
                        "model": {"encoder.layers.0.fc1.weight": torch.zeros(2, 2), "mask_emb": torch.zeros(2)}}, ckpt)
        with pytest.raises(ValueError, match=rf"{ckpt}: refused to build from this checkpoint: {where}\.(model\.)?{field}"):
            load_speech_hubert(str(ckpt))
    assert not marker.exists()


# ---- files that are no checkpoint ------------------------------------------------------------

def _junk(tmp_path):
    """name -> (path, what the message says)."""
    out = {}

    def put(name, data):
        path = tmp_path / name
        path.write_bytes(data) if isinstance(data, bytes) else path.write_text(data)
        return path

    out["text"] = (put("text.pt", "model: resunet\nthis is not a checkpoint\n"), "a text file")
    buf = io.BytesIO()
    sf.write(buf, np.zeros((800, 2), np.float32), SR, format="WAV")
    out["wav"] = (put("wav.pt", buf.getvalue()), "a RIFF/WAVE audio file")
    out["random"] = (put("random.pt", np.random.default_rng(0).bytes(4096)), "unknown data")
    with zipfile.ZipFile(tmp_path / "zip.pt", "w") as z:
        z.writestr("notes.txt", "hello")
    out["zip"] = (tmp_path / "zip.pt", "a zip archive without the data.pkl")
    torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), tmp_path / "ts.pt")
    out["torchscript"] = (tmp_path / "ts.pt", "a TorchScript archive")
    buf = io.BytesIO()
    torch.save({"model": {"w": torch.zeros(64)}, "cfg": {}}, buf, _use_new_zipfile_serialization=False)
    out["truncated legacy"] = (put("legacy.pt", buf.getvalue()[:-40]), "truncated")
    out["cut legacy"] = (put("legacy2.pt", buf.getvalue()[:30]), "truncated")
    torch.save([1, 2, 3], tmp_path / "list.pt")
    out["list"] = (tmp_path / "list.pt", "a torch file holding a list")
    torch.save({"weights": torch.zeros(2)}, tmp_path / "dict.pt")
    out["dict"] = (tmp_path / "dict.pt", "no 'model' or 'cfg' entry")
    return out


JUNK = ["text", "wav", "random", "zip", "torchscript", "truncated legacy", "cut legacy", "list", "dict"]


@pytest.mark.parametrize("kind", JUNK)
def test_junk_as_a_separation_checkpoint_is_one_message(tmp_path, kind):
    path, why = _junk(tmp_path)[kind]
    with pytest.raises(ValueError) as e:
        _separation_load(path)
    message = str(e.value)
    assert message.startswith(f"{path} is not a pahubert/fairseq checkpoint: ") or \
        message.startswith(f"{path}: not a readable checkpoint"), message
    assert why in message, message


@pytest.mark.parametrize("kind", JUNK[:7])
def test_junk_as_pretrained_checkpoint_is_one_message(tmp_path, kind):
    from pahubert_plugin.models.pretrained import read_pretraining_checkpoint

    path, why = _junk(tmp_path)[kind]
    with pytest.raises(ValueError) as e:
        read_pretraining_checkpoint(str(path), ["pahubert"], "pahubert_resunet")
    assert str(path) in str(e.value) and why in str(e.value), str(e.value)


def test_junk_checkpoint_cli_separate(tmp_path):
    """pahubert-separate: exit status 2 and one line naming the file, for every kind of junk."""
    junk = _junk(tmp_path)
    wav = tmp_path / "a.wav"
    sf.write(wav, np.zeros((SR // 2, 2), np.float32), SR)
    code = ("import sys\nfrom pahubert_plugin import separate\n"
            "for p in sys.argv[2:]:\n    print('rc', separate.main([p, sys.argv[1], '-o', 'out']))\n")
    proc = subprocess.run([sys.executable, "-c", code, str(wav), *(str(junk[k][0]) for k in JUNK)], env=ENV,
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0 and "Traceback" not in out, out[-3000:]
    assert out.count("rc 2") == len(JUNK), out[-3000:]
    for kind in JUNK:
        path, why = junk[kind]
        assert str(path) in out, (kind, out[-3000:])
