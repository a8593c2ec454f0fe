"""Clustering stages 0-3 through the recipe, the readers' frame rule, label checks, label quality."""
import filecmp
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import soundfile as sf
import torch

from helpers import SR, assert_one_line_error, run_module, write_bad_label
from pahubert_plugin.clustering import check_labels, dump_features, label_quality
from pahubert_plugin.clustering.mfcc import MfccReader
from pahubert_plugin.clustering.primitive import CUES, PrimitiveReader, primitive_cues
from pahubert_plugin.clustering.readers import build_reader
from pahubert_plugin.frames import num_frames

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
K = 8


@pytest.fixture(scope="module")
def recipe(corpora, tmp_path_factory):
    """Stages 0-3 of recipes/pahubert/run.sh on the tiny corpus (mfcc, 8 clusters, 2 jobs)."""
    base = tmp_path_factory.mktemp("recipe")
    audio, exp = str(base / "audio"), str(base / "exp")
    corpora.make_corpus(audio)
    env = dict(os.environ, PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"])
    cmd = ["bash", os.path.join(REPO, "recipes", "pahubert", "run.sh"), "--audio-dir", audio, "--exp-dir", exp,
           "--sample-rate", str(SR), "--nj", "2", "--n-clusters", str(K), "--valid-percent", "0.2",
           "--km-args", "--n_init 3", "--stage", "0", "--stop-stage", "3"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return {"audio": audio, "exp": exp, "data": os.path.join(exp, "data"), "stdout": proc.stdout,
            "feat": os.path.join(exp, "feat", "mfcc"), "labels": os.path.join(exp, "labels", f"mfcc_k{K}"),
            "km": os.path.join(exp, "km", f"mfcc_k{K}.km")}


def _manifest(path):
    with open(path) as f:
        root = f.readline().rstrip("\n")
        return root, [(r.split("\t")[0], int(r.split("\t")[1])) for r in f.read().splitlines()]


# ---- readers --------------------------------------------------------------------------------------

@pytest.mark.parametrize("feature,dim", [("mfcc", 39), ("primitive", 47)])
@pytest.mark.parametrize("sr", [16000, 44100])
@pytest.mark.parametrize("seconds", [0.013, 1.0, 1.2345])
def test_reader_frames_follow_the_rule(feature, dim, sr, seconds):
    reader = build_reader(feature, sr)
    n = int(seconds * sr)
    feats = reader.extract(torch.randn(2, n) * 0.1)
    assert feats.shape == (num_frames(n, sr), dim) and feats.dtype == torch.float32
    assert torch.isfinite(feats).all()


def test_get_feats_reads_resamples_and_checks_ref_len(tmp_path, corpora):
    path = str(tmp_path / "x.flac")
    sf.write(path, corpora.music(1.5, 22050, 2, 200, np.random.default_rng(1)), 22050)
    reader = MfccReader(SR)
    n = int(1.5 * SR)
    assert reader.get_feats(path, n).shape == (num_frames(n, SR), 39)
    assert reader.get_feats(path).shape == (num_frames(n, SR), 39)
    with pytest.raises(ValueError, match="x.flac"):  # a stale manifest (file got shorter) names the file
        reader.get_feats(path, n + SR)


def test_primitive_cues_tell_tone_from_noise():
    t = torch.arange(2 * SR) / SR
    tone = 0.5 * torch.sin(2 * torch.pi * 220 * t)
    noise = 0.5 * torch.randn(2 * SR, generator=torch.Generator().manual_seed(0))
    ct, cn = primitive_cues(tone, SR).mean(0), primitive_cues(noise, SR).mean(0)
    idx = {name: i for i, name in enumerate(CUES)}
    assert ct[idx["harmonicity"]] > 0.9 > 0.3 > cn[idx["harmonicity"]]
    assert ct[idx["harmonic_ratio"]] > 0.9 and 0.3 < cn[idx["harmonic_ratio"]] < 0.7
    assert ct[idx["flatness"]] < cn[idx["flatness"]] - 5
    feats = PrimitiveReader(SR).extract(tone[None])
    assert feats.mean(0).abs().max() < 1e-3  # per-clip standardised


def test_hubert_feature_needs_its_reader(monkeypatch):
    with pytest.raises(ValueError, match="--ckpt"):
        build_reader("hubert", SR)
    # as if hubert_reader.py were absent (a None entry makes the import fail)
    monkeypatch.setitem(sys.modules, "pahubert_plugin.clustering.hubert_reader", None)
    with pytest.raises(ImportError, match="hubert_reader.py"):
        build_reader("hubert", SR, ckpt="missing.pt", layer=6)


def test_a_full_disk_during_a_feature_dump_is_one_line_naming_the_shard(tmp_path, small_disk):
    rng = np.random.default_rng(0)
    (tmp_path / "audio").mkdir()
    rows = []
    for i in range(2):  # 2 x 5 s of MFCC+D+DD at 100 Hz: about 160 KB of features for a 64 KiB disk
        sf.write(tmp_path / "audio" / f"a{i}.wav", 0.1 * rng.standard_normal(5 * SR), SR)
        rows.append(f"a{i}.wav\t{5 * SR}")
    (tmp_path / "train.tsv").write_text(f"{tmp_path / 'audio'}\n" + "\n".join(rows) + "\n")
    feat = small_disk / "feat"
    proc = run_module("pahubert_plugin.clustering.dump_features", tmp_path, "train", "1", "0", feat,
                      "--sample-rate", str(SR))
    assert_one_line_error(proc, f"cannot write features {feat}/train_0_1.npy: No space left on device",
                          f"free space in {feat}")
    assert os.listdir(feat) == []  # no shard, no temporary folder


# ---- the recipe ---------------------------------------------------------------------------------

@pytest.mark.slow
def test_recipe_stages_0_to_3(recipe):
    with open(os.path.join(recipe["data"], "skipped.tsv")) as f:
        skipped = dict(line.split("\t")[:2] for line in f)
    assert skipped == {"corrupt.wav": "unreadable", "short.wav": "too_short"}
    names = []
    for split in ("train", "valid"):
        _, rows = _manifest(os.path.join(recipe["data"], f"{split}.tsv"))
        names += [r[0] for r in rows]
        assert rows, split
        check_labels.check_labels(os.path.join(recipe["data"], f"{split}.tsv"),
                                  os.path.join(recipe["labels"], f"{split}.km"), SR,
                                  dictionary=os.path.join(recipe["labels"], "dict.km.txt"))
        with open(os.path.join(recipe["labels"], f"{split}.km")) as f:
            labels = [list(map(int, line.split())) for line in f]
        assert [len(lab) for lab in labels] == [num_frames(n, SR) for _, n in rows]  # manifest order, exact
        assert all(0 <= x < K for lab in labels for x in lab)
    assert sorted(names) == ["song0.wav", "song1.wav", "song2.wav", "sub/mono.flac", "sub/track.mp3"]
    with open(os.path.join(recipe["labels"], "dict.km.txt")) as f:
        assert f.read().splitlines() == [f"{i} 1" for i in range(K)]
    from pahubert_plugin.clustering.kmeans import load_kmeans

    km = load_kmeans(recipe["km"])  # the allow-listed loader, as every user path
    assert km.cluster_centers_.shape == (K, 39)
    for stage in ("stage0_manifest", "stage2_kmeans", "stage3_check.train"):
        assert os.path.isfile(os.path.join(recipe["exp"], "logs", stage + ".log"))


@pytest.mark.slow
def test_rank_rerun_rewrites_identical_shard(recipe, tmp_path):
    _, rows = _manifest(os.path.join(recipe["data"], "train.tsv"))
    nshard = min(2, len(rows))
    npy = os.path.join(recipe["feat"], f"train_0_{nshard}.npy")
    keep = str(tmp_path / "before.npy")
    shutil.copy(npy, keep)
    with open(npy, "ab") as f:  # damage the shard; the re-run must replace it whole
        f.write(b"garbage")
    args = [recipe["data"], "train", str(nshard), "0", recipe["feat"], "--feature", "mfcc", "--sample-rate", str(SR)]
    assert dump_features.main(args) == 0
    assert filecmp.cmp(npy, keep, shallow=False)
    assert not [n for n in os.listdir(recipe["feat"]) if n.startswith(".")]  # no temp folder left


@pytest.mark.slow
def test_primitive_shard(recipe, tmp_path):
    feat_dir = str(tmp_path / "primitive")
    assert dump_features.main([recipe["data"], "valid", "1", "0", feat_dir, "--feature", "primitive",
                               "--sample-rate", str(SR)]) == 0
    _, rows = _manifest(os.path.join(recipe["data"], "valid.tsv"))
    feats = np.load(os.path.join(feat_dir, "valid_0_1.npy"))
    with open(os.path.join(feat_dir, "valid_0_1.len")) as f:
        lengths = [int(x) for x in f]
    assert lengths == [num_frames(n, SR) for _, n in rows]
    assert feats.shape == (sum(lengths), 47) and np.isfinite(feats).all()


@pytest.mark.slow
def test_check_labels_names_the_misaligned_row(recipe, tmp_path, capsys):
    tsv = os.path.join(recipe["data"], "train.tsv")
    with open(os.path.join(recipe["labels"], "train.km")) as f:
        lines = f.read().splitlines()
    assert len(lines) >= 2
    lines[1] = " ".join(lines[1].split()[:-3])  # row 2 loses three labels
    bad = tmp_path / "train.km"
    bad.write_text("\n".join(lines) + "\n")
    assert check_labels.main([tsv, str(bad), "--sample-rate", str(SR)]) == 1
    err = capsys.readouterr().err
    _, rows = _manifest(tsv)
    expected = num_frames(rows[1][1], SR)
    assert f"row 2 ({rows[1][0]}): {expected - 3} labels, expected {expected}" in err
    bad.write_text("\n".join(lines[:-1]) + "\n")  # one line missing
    assert check_labels.main([tsv, str(bad), "--sample-rate", str(SR)]) == 1
    assert f"{len(lines) - 1} label lines but" in capsys.readouterr().err
    assert check_labels.main([tsv, os.path.join(recipe["labels"], "train.km"), "--sample-rate", str(SR)]) == 0


def _make_stems(root):
    """MUSDB18-HQ layout: bass is a pure tone, drums are noise bursts, gaps are silent."""
    rng = np.random.default_rng(2)
    sr, n = 44100, 44100 * 3
    for k in range(2):
        d = os.path.join(root, "test", f"track{k}")
        os.makedirs(d)
        t = np.arange(n) / sr
        seg = (np.arange(n) // (sr // 4)) % 3  # 0 tone, 1 silence, 2 noise
        stems = {"bass": 0.4 * np.sin(2 * np.pi * 110 * (k + 1) * t) * (seg == 0),
                 "drums": 0.5 * rng.standard_normal(n) * (seg == 2), "vocals": np.zeros(n), "other": np.zeros(n)}
        for name, x in list(stems.items()) + [("mixture", sum(stems.values()))]:
            sf.write(os.path.join(d, f"{name}.wav"), np.stack([x, x], 1).astype(np.float32), sr)


@pytest.mark.slow
def test_label_quality_beats_random(recipe, tmp_path, capsys):
    stems = str(tmp_path / "musdb")
    _make_stems(stems)
    out = str(tmp_path / "q.json")
    assert label_quality.main([recipe["km"], stems, "--is-wav", "--feature", "mfcc", "--sample-rate", str(SR),
                               "--out", out]) == 0
    import json

    with open(out) as f:
        result = json.load(f)
    km, rnd = result["kmeans"], result["random"]
    assert km["frames"] == 2 * 300 and set(km["per_source"]) == {"bass", "drums", "silence"}
    assert km["nmi"] > rnd["nmi"] + 0.3 and km["nmi"] > 0.4
    assert km["cluster_purity"] > rnd["cluster_purity"]
    assert "nmi" in capsys.readouterr().out


# ---- bad label files ------------------------------------------------------------------------

def test_check_labels_finds_the_dictionary_beside_the_labels(corpora, tmp_path, capsys):
    data = corpora.write_corpus(tmp_path / "data", n_train=3, n_valid=1, seed=3, min_s=0.6, max_s=1.0)
    args = [str(data / "train.tsv"), str(data / "train.km"), "--sample-rate", str(SR)]
    assert check_labels.main(args) == 0
    assert f"labels in {data / 'dict.km.txt'}" in capsys.readouterr().out
    write_bad_label(data)
    assert check_labels.main(args) == 1
    err = capsys.readouterr().err
    assert "row 2 " in err and "'999'" in err and str(data / "dict.km.txt") in err


def test_check_labels_refuses_negative_tolerance(tmp_path):
    (tmp_path / "t.tsv").write_text(f"{tmp_path}\na.wav\t16000\n")
    (tmp_path / "t.km").write_text("0 " * 100 + "\n")
    proc = run_module("pahubert_plugin.clustering.check_labels", tmp_path / "t.tsv", tmp_path / "t.km",
                      "--sample-rate", SR, "--tolerance", "-1", "--no-dict")
    assert_one_line_error(proc, "--tolerance is a number of frames >= 0, got -1")
    assert "FAIL" not in proc.stderr


def _fill(path):
    """Write ``path`` until the disk is full."""
    with open(path, "wb", buffering=0) as f:
        try:
            while True:
                f.write(b"\0" * 512)
        except OSError:
            pass


@pytest.mark.slow
def test_a_full_disk_while_writing_labels_or_the_kmeans_model_is_one_line(recipe, small_disk):
    from pahubert_plugin.clustering import kmeans

    _, rows = _manifest(os.path.join(recipe["data"], "train.tsv"))
    nshard = min(2, len(rows))
    _fill(small_disk / "filler")
    labels = small_disk / "labels"
    proc = run_module("pahubert_plugin.clustering.kmeans", recipe["feat"], "train", recipe["km"], str(nshard), "0",
                      labels)
    text = proc.stdout + proc.stderr
    assert proc.returncode == 2 and "Traceback" not in text, text
    assert f"cannot write {labels}/train_0_{nshard}.km: No space left on device (free space in {labels}" in text, text
    assert os.listdir(labels) == []
    proc = run_module("pahubert_plugin.clustering.kmeans", "learn", recipe["feat"], "train", str(nshard),
                      str(small_disk / "km.km"), "4", "--n_init", "1")
    text = proc.stdout + proc.stderr
    assert proc.returncode == 2 and "Traceback" not in text, text
    assert f"cannot write {small_disk}/km.km: No space left on device" in text, text
    assert sorted(os.listdir(small_disk)) == ["filler", "labels"]
