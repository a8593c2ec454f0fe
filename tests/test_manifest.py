"""Stage 0: manifests from a tiny folder of real audio files made here."""
import os

import numpy as np
import pytest
import soundfile as sf

from pahubert_plugin.clustering.simple_kmeans import import_script
from pahubert_plugin.data.audio import audio_info
from pahubert_plugin.data.manifest import build_manifest, get_parser, main, split_train_valid, probe_file

SR = 16000


def _tone(seconds, sr, channels, f0=220.0):
    t = np.arange(int(seconds * sr)) / sr
    x = 0.3 * np.sin(2 * np.pi * f0 * t)
    return np.stack([x] * channels, axis=1).astype(np.float32)


@pytest.fixture
def corpus(tmp_path):
    root = tmp_path / "audio"
    (root / "sub").mkdir(parents=True)
    sf.write(root / "a.wav", _tone(2.0, 44100, 2), 44100)
    sf.write(root / "b.wav", _tone(1.5, 44100, 2, 330), 44100)
    sf.write(root / "sub" / "c.flac", _tone(1.3, 22050, 1), 22050)
    sf.write(root / "sub" / "d.mp3", _tone(2.2, 44100, 2), 44100)
    sf.write(root / "short.wav", _tone(0.3, 44100, 2), 44100)
    sf.write(root / "quiet.wav", np.zeros((44100, 2), np.float32), 44100)
    (root / "broken.wav").write_bytes(os.urandom(3000))
    sf.write(root / "cut.wav", _tone(2.0, 44100, 2), 44100)
    data = (root / "cut.wav").read_bytes()
    (root / "cut.wav").write_bytes(data[: len(data) // 2])
    (root / "notes.txt").write_text("not audio")
    return root


def _rows(path):
    with open(path) as f:
        return [line.rstrip("\n").split("\t") for line in f]


def test_manifest_rows_rates_and_skips(corpus, tmp_path):
    out = tmp_path / "data"
    summary = build_manifest(corpus, out, SR, valid_percent=0.3, min_seconds=1.0, jobs=1)
    train, valid = _rows(out / "train.tsv"), _rows(out / "valid.tsv")
    assert train[0] == [str(corpus.resolve())] and valid[0] == train[0]
    kept = {r[0]: int(r[1]) for r in train[1:] + valid[1:]}
    assert sorted(kept) == ["a.wav", "b.wav", "sub/c.flac", "sub/d.mp3"]
    assert len(valid) > 1 and len(train) > 1
    for rel, n in kept.items():  # num_samples is counted at the target rate
        assert n == audio_info(corpus / rel).samples_at(SR)
    assert kept["sub/c.flac"] == int(1.3 * SR)

    skipped = {r[0]: r[1] for r in _rows(out / "skipped.tsv")}
    assert skipped == {"short.wav": "too_short", "quiet.wav": "silent", "broken.wav": "unreadable",
                       "cut.wav": "truncated"}
    assert "kept 4" in summary and "skipped 4" in summary and "silent 1" in summary

    meta = _rows(out / "train.meta.tsv")
    assert meta[0][:3] == ["relpath", "num_samples", "source_rate"]
    assert [m[0] for m in meta[1:]] == [r[0] for r in train[1:]]
    rates = {m[0]: int(m[2]) for m in meta[1:] + _rows(out / "valid.meta.tsv")[1:]}
    assert rates.get("sub/c.flac", 22050) == 22050 and rates.get("a.wav", 44100) == 44100

    # fairseq's own reader of the manifest parses it
    feature_utils = import_script("feature_utils")
    iterate, num = feature_utils.get_path_iterator(str(out / "train.tsv"), 1, 0)
    assert num == len(train) - 1
    for path, nsample in iterate():
        assert os.path.isfile(path) and nsample == kept[os.path.relpath(path, corpus.resolve())]


def test_cli_parallel_matches_serial(corpus, tmp_path, capsys):
    build_manifest(corpus, tmp_path / "serial", SR, valid_percent=0.3, jobs=1)
    assert main([str(corpus), str(tmp_path / "par"), "--sample-rate", str(SR), "--valid-percent", "0.3",
                 "--jobs", "2"]) == 1  # the corpus has files to skip: counted, exit 1
    assert "kept 4" in capsys.readouterr().out
    for name in ("train.tsv", "valid.tsv", "skipped.tsv", "train.meta.tsv"):
        assert (tmp_path / "serial" / name).read_text() == (tmp_path / "par" / name).read_text()


def test_split_is_stable_and_seeded(corpus):
    probes = [probe_file(str(corpus), rel, SR, 1.0, -60.0) for rel in ("a.wav", "b.wav", "sub/c.flac", "sub/d.mp3")]
    assert all(p.reason is None for p in probes)
    first = split_train_valid(probes, 0.5, seed=3)
    assert first == split_train_valid(probes, 0.5, seed=3)
    assert split_train_valid(probes, 0.0, seed=3)[1] == []
    assert split_train_valid(probes, 0.5, seed=4) != first  # the seed matters
    # adding a file never moves an existing file between splits
    extra = probes + [probes[0]._replace(relpath="zzz/new.wav")]
    valid = {p.relpath for p in split_train_valid(extra, 0.5, seed=3)[1]} - {"zzz/new.wav"}
    assert valid == {p.relpath for p in first[1]}


def test_bad_arguments(corpus, tmp_path):
    with pytest.raises(ValueError, match="22050"):
        build_manifest(corpus, tmp_path / "x", 22050)
    with pytest.raises(ValueError, match="no files"):
        build_manifest(corpus, tmp_path / "x", SR, exts=["ogg"])
    with pytest.raises(ValueError, match="fraction"):
        build_manifest(corpus, tmp_path / "x", SR, valid_percent=5)
    assert get_parser().parse_args(["a", "b"]).sample_rate == 44100
