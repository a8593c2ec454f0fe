"""Stage 0: manifests from a tiny folder of real audio files made here."""
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import soundfile as sf

from helpers import ENV, REPO, SR, assert_one_line_error, run_python, tone, write_tone
from pahubert_plugin.clustering.simple_kmeans import import_script
from pahubert_plugin.data.audio import audio_info
from pahubert_plugin.data.manifest import build_manifest, get_parser, main, split_train_valid, probe_file


def _tone(seconds, sr, channels, f0=220.0):
    """A noise-free tone, the same on every channel."""
    return tone(seconds, sr, freq=f0, channels=channels, noise=0.0, detune=0.0)


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


# ---- each real, tsv-safe, readable file listed once ------------------------------------------

def _run_manifest(audio, out, *extra):
    from pahubert_plugin.data.manifest import main

    return main([str(audio), str(out), "--sample-rate", str(SR), "--jobs", "1", *extra])


def _data_rows(path):
    with open(path) as f:
        return [line.rstrip("\n").split("\t") for line in f][1:]


def test_manifest_walks_each_real_file_once_through_symlink_loops(tmp_path):
    audio = tmp_path / "audio"
    for i in range(6):
        write_tone(audio / ("sub" if i % 2 else "") / f"f{i}.wav", freq=200 + 30 * i)
    os.symlink("..", audio / "sub" / "loop")  # sub/loop/sub/loop/... would list every file 41 times
    os.symlink("f0.wav", audio / "alias.wav")  # a second name for one file
    assert _run_manifest(audio, tmp_path / "m", "--valid-percent", "0.5") == 1  # the alias is a counted skip
    train, valid = _data_rows(tmp_path / "m" / "train.tsv"), _data_rows(tmp_path / "m" / "valid.tsv")
    listed = [r[0] for r in train + valid]
    assert sorted(listed) == ["f0.wav", "f2.wav", "f4.wav", "sub/f1.wav", "sub/f3.wav", "sub/f5.wav"]
    real = [os.path.realpath(audio / p) for p in listed]
    assert len(set(real)) == len(real) and train and valid  # so no file is in both splits
    skipped = (tmp_path / "m" / "skipped.tsv").read_text().splitlines()
    assert skipped == ["alias.wav\tduplicate\tthe same file as f0.wav"]


def test_manifest_skips_tab_and_newline_names_with_a_reason(tmp_path, capsys):
    audio = tmp_path / "audio"
    write_tone(audio / "good.wav")
    write_tone(audio / "tab\there.wav")
    write_tone(audio / "new\nline" / "x.wav")
    assert _run_manifest(audio, tmp_path / "m", "--valid-percent", "0") == 1
    assert "bad_name 2" in capsys.readouterr().out
    rows = _data_rows(tmp_path / "m" / "train.tsv") + _data_rows(tmp_path / "m" / "valid.tsv")
    assert [r for r in rows] == [["good.wav", str(int(1.5 * SR))]]
    skipped = [line.split("\t") for line in (tmp_path / "m" / "skipped.tsv").read_text().splitlines()]
    assert sorted(r[0] for r in skipped) == ["new\\nline/x.wav", "tab\\there.wav"]
    assert all(len(r) == 3 and r[1] == "bad_name" for r in skipped)
    # fairseq's own readers parse what was written
    from fairseq.data.audio.hubert_dataset import load_audio

    assert load_audio(str(tmp_path / "m" / "train.tsv"), None, None)[3] == 1


def test_manifest_keeps_only_what_the_pretraining_dataset_reads(tmp_path):
    """One channel policy: 8-channel files are skipped by the manifest, everything kept loads."""
    from pahubert_plugin.data.hubert_dataset import PahubertDataset

    audio = tmp_path / "audio"
    for ch in (1, 2, 3, 8):
        write_tone(audio / f"ch{ch}.wav", channels=ch)
    assert _run_manifest(audio, tmp_path / "m", "--valid-percent", "0") == 1
    skipped = (tmp_path / "m" / "skipped.tsv").read_text().splitlines()
    assert [s.split("\t")[:2] for s in skipped] == [["ch3.wav", "channels"], ["ch8.wav", "channels"]]
    rows = _data_rows(tmp_path / "m" / "train.tsv")
    assert [r[0] for r in rows] == ["ch1.wav", "ch2.wav"]
    (tmp_path / "m" / "train.km").write_text("".join(" ".join(["0"] * 150) + "\n" for _ in rows))
    for channels in (1, 2):
        ds = PahubertDataset(str(tmp_path / "m" / "train.tsv"), SR, [str(tmp_path / "m" / "train.km")], 100.0,
                             [0], [1], channels=channels, max_sample_size=SR)
        for i in range(len(ds)):  # what __getitem__ reads for a crop
            assert ds.read(i, 0, SR).shape == (channels, SR)
    with pytest.raises(ValueError, match="task.audio_channels must be 1 .* or 2 .*got 8"):
        PahubertDataset(str(tmp_path / "m" / "train.tsv"), SR, [str(tmp_path / "m" / "train.km")], 100.0,
                        [0], [1], channels=8)


# ---- the manifest records its rate and every consumer checks it -----------------------------

@pytest.fixture
def manifest_16k(tmp_path):
    audio = tmp_path / "audio"
    for i in range(3):
        write_tone(audio / f"f{i}.wav", seconds=1.2, sr=44100, freq=200 + 50 * i)
    assert _run_manifest(audio, tmp_path / "m", "--valid-percent", "0") == 0
    return tmp_path / "m"


def test_manifest_records_its_rate(manifest_16k):
    from pahubert_plugin.data.manifest import manifest_rate

    assert manifest_rate(str(manifest_16k / "train.tsv")) == SR
    header = (manifest_16k / "train.meta.tsv").read_text().splitlines()[0].split("\t")
    assert header[:3] == ["relpath", "num_samples", "source_rate"] and header[-1] == "sample_rate"
    assert manifest_rate(str(manifest_16k / "valid.tsv")) is None  # no rows: nothing to mis-time
    (manifest_16k / "train.meta.tsv").unlink()
    assert manifest_rate(str(manifest_16k / "train.tsv")) is None  # e.g. fairseq's wav2vec_manifest.py


def test_dump_features_refuses_another_rate(manifest_16k, tmp_path, caplog):
    from pahubert_plugin.clustering import dump_features

    feat = tmp_path / "feat"
    assert dump_features.main([str(manifest_16k), "train", "1", "0", str(feat), "--sample-rate", "44100"]) == 2
    assert re.search(rf"{manifest_16k / 'train.tsv'} counts num_samples at 16000 Hz .* but --sample-rate is "
                     r"44100 Hz", caplog.text), caplog.text
    assert not feat.exists() or not any(p.suffix == ".npy" for p in feat.iterdir())
    assert dump_features.main([str(manifest_16k), "train", "1", "0", str(feat)]) == 0  # the recorded rate
    lens = (feat / "train_0_1.len").read_text().split()
    assert lens == [str(int(1.2 * SR) // 160)] * 3


def test_pretraining_dataset_and_check_labels_refuse_another_rate(manifest_16k, capsys):
    from pahubert_plugin.clustering import check_labels
    from pahubert_plugin.data.hubert_dataset import PahubertDataset

    tsv, km = manifest_16k / "train.tsv", manifest_16k / "train.km"
    km.write_text(("0 " * 120 + "\n") * 3)
    PahubertDataset(str(tsv), SR, [str(km)], 100.0, [0], [1], channels=1)  # its own rate loads
    with pytest.raises(ValueError, match=r"counts num_samples at 16000 Hz .* task.sample_rate is 44100 Hz"):
        PahubertDataset(str(tsv), 44100, [str(km)], 100.0, [0], [1], channels=1)
    assert check_labels.main([str(tsv), str(km), "--sample-rate", "44100", "--no-dict"]) == 2
    err = capsys.readouterr().err
    assert "16000 Hz" in err and "44100 Hz" in err and "FAIL" not in err


# ---- clear errors and honest exit codes, of the manifest and of the recipe ------------------

def test_manifest_of_an_empty_missing_folder_or_onto_a_file(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "file").write_text("x")
    write_tone(tmp_path / "audio" / "a.wav")
    m = ["-m", "pahubert_plugin.data.manifest"]
    assert_one_line_error(run_python([*m, tmp_path / "empty", tmp_path / "o", "--sample-rate", SR]), "no files with extensions")
    assert_one_line_error(run_python([*m, tmp_path / "missing", tmp_path / "o", "--sample-rate", SR]), "is not a directory")
    assert_one_line_error(run_python([*m, tmp_path / "audio", tmp_path / "file", "--sample-rate", SR, "--jobs", 1]),
                    f"output dir {tmp_path / 'file'} is a file")


def _junk_folder(root, good=0):
    import soundfile as sf

    os.makedirs(root, exist_ok=True)
    with open(os.path.join(root, "corrupt.wav"), "wb") as f:
        f.write(np.random.default_rng(0).bytes(4000))
    sf.write(os.path.join(root, "short.wav"), np.zeros((1600, 1), np.float32) + 0.1, 16000)
    for i in range(good):
        sf.write(os.path.join(root, f"good{i}.wav"), tone(2.0, 16000, freq=220 * (i + 1), noise=0.0, detune=0.0), 16000)
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
