"""Checkpoints made only of plain data, and files that are no checkpoint at all, at every entry point.

A checkpoint of dicts and strings passes ``weights_only`` and the allow-list, but what its ``cfg`` names
gets built: ``cfg.model._name: wav2vec2`` with a ``conv_feature_layers`` string makes fairseq ``eval()``
that string. Each entry point that loads a checkpoint must refuse it before building anything, with one
message naming the file and the field; junk (text, audio, random bytes, zip, TorchScript, a cut-off file)
gets one message naming the file.
"""
import io
import os
import subprocess
import sys
import zipfile

import numpy as np
import pytest
import soundfile as sf
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PLUGIN = os.path.join(REPO, "pahubert_plugin")
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
SR = 16000


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


def _fit_kmeans(path, dim=8):
    import joblib
    from sklearn.cluster import MiniBatchKMeans

    feats = np.random.default_rng(0).standard_normal((100, dim)).astype(np.float32)
    joblib.dump(MiniBatchKMeans(n_clusters=3, n_init=1, random_state=0, batch_size=50).fit(feats), path)


def _entry_points(tmp_path, ckpt):
    """(name, module and arguments) of every CLI that loads a checkpoint given on its command line."""
    wav = tmp_path / "a.wav"
    sf.write(wav, np.zeros((SR // 2, 2), np.float32), SR)
    (tmp_path / "test" / "song").mkdir(parents=True, exist_ok=True)
    _fit_kmeans(tmp_path / "k.km")
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
    from pahubert_plugin.separate import load_separation_model

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
