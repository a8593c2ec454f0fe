"""Toy corpus: stems sum to the mixture, no clipping, audible stems, determinism, musdb reads it."""
import filecmp
import json
import os

import numpy as np
import pytest
import soundfile as sf

from pahubert_plugin.corpora import toy as toy_corpus
from pahubert_plugin.corpora.toy import SOURCES, generate_corpus, synthesize_song
from pahubert_plugin.data.audio import read_audio
from helpers import SR, check_corpus_layout, corpus_songs, run_module

SECONDS = 4.0
PARAMS = dict(unlabelled=2, train=2, test=2, seconds=SECONDS, sample_rate=SR, seed=3)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    out = tmp_path_factory.mktemp("toy")
    toy_corpus.main([str(out), "--unlabelled", "2", "--train", "2", "--test", "2",
                     "--seconds", str(SECONDS), "--sample-rate", str(SR), "--seed", "3"])
    return out


def _all_files(root):
    return sorted(p.relative_to(root) for p in root.rglob("*.wav"))


def test_layout_and_format(corpus):
    check_corpus_layout(corpus, SR, SECONDS, "FLOAT", SOURCES)
    meta = json.loads((corpus / "corpus.json").read_text())
    assert meta["status"] == "complete" and meta["params"]["seed"] == 3
    assert set(meta["songs"]["train"]) == {"train_000", "train_001"}


def test_stems_sum_to_mixture_without_clipping(corpus):
    for song in corpus_songs(corpus):
        mix, _ = sf.read(str(song / "mixture.wav"), dtype="float64")
        stems = [sf.read(str(song / f"{s}.wav"), dtype="float64")[0] for s in SOURCES]
        assert np.abs(sum(stems) - mix).max() < 1e-6, song
        for audio in [mix] + stems:
            assert np.abs(audio).max() < 0.9, song
        assert np.abs(mix).max() > 0.4, song  # peak-normalised, not near silence
    for path in (corpus / "unlabelled").iterdir():
        audio, _ = sf.read(str(path))
        assert 0.4 < np.abs(audio).max() < 0.9, path


def test_every_stem_audible_and_stereo(corpus):
    for song in corpus_songs(corpus):
        mix_rms = np.sqrt(np.mean(sf.read(str(song / "mixture.wav"))[0] ** 2))
        for s in SOURCES:
            audio, _ = sf.read(str(song / f"{s}.wav"))
            rms = np.sqrt(np.mean(audio ** 2))
            # levels are within -12..0 dB of each other: no stem is buried in the mix
            assert rms > 0.1 * mix_rms, (song, s, rms, mix_rms)
            assert np.abs(audio[:, 0] - audio[:, 1]).max() > 1e-3, (song, s)  # not dual mono


def _frame_db(x, sr, frame=0.05):
    hop = int(frame * sr)
    frames = x[: len(x) // hop * hop].reshape(-1, hop)
    return 10 * np.log10(np.mean(frames ** 2, axis=1) + 1e-12)


def _spectrum(x, sr):
    """Power-weighted centroid (Hz) and the power fraction above 1 kHz."""
    power = np.abs(np.fft.rfft(x)) ** 2
    freqs = np.fft.rfftfreq(len(x), 1 / sr)
    return float(np.sum(freqs * power) / np.sum(power)), float(power[freqs > 1000].sum() / power.sum())


@pytest.mark.parametrize("index", [0, 1, 2])
def test_stems_have_their_character(index):
    stems, info = synthesize_song(11, "train", index, 8.0, SR)
    mono = {k: v.mean(axis=0).astype(np.float64) for k, v in stems.items()}
    assert 80 <= info["tempo"] <= 140
    assert -12 <= min(info[s]["gain_db"] for s in SOURCES) <= max(info[s]["gain_db"] for s in SOURCES) <= 0
    # bass is low-passed: its energy sits well below everything else
    (bass_centroid, bass_high), (other_centroid, _) = _spectrum(mono["bass"], SR), _spectrum(mono["other"], SR)
    assert bass_centroid < 250 and bass_high < 0.01 and other_centroid > 2 * bass_centroid
    # vocals sing phrases with rests: loud and quiet stretches differ by > 20 dB
    vocal_db = _frame_db(mono["vocals"], SR)
    assert vocal_db.max() - np.percentile(vocal_db, 5) > 20, info["vocals"]
    # drums are percussive: frame energy is spiky (high crest across frames)
    drum_db = _frame_db(mono["drums"], SR, frame=0.01)
    assert drum_db.max() - np.median(drum_db) > 6


def test_determinism_and_reuse(tmp_path):
    small = dict(unlabelled=1, train=1, test=1, seconds=2.0, sample_rate=SR, progress=False)
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    generate_corpus(a, seed=5, **small)
    generate_corpus(b, seed=5, jobs=2, **small)  # worker processes give the same bytes
    generate_corpus(c, seed=6, **small)
    files = _all_files(a)
    assert len(files) == 11 and files == _all_files(b) == _all_files(c)
    for rel in files:
        assert filecmp.cmp(a / rel, b / rel, shallow=False), rel
        assert not filecmp.cmp(a / rel, c / rel, shallow=False), rel
    # unlabelled songs are other songs than the labelled ones
    unl = sf.read(str(a / "unlabelled" / "unlabelled_0000.wav"))[0]
    train = sf.read(str(a / "musdb" / "train" / "train_000" / "mixture.wav"))[0]
    assert np.abs(unl - train).max() > 0.1

    # same parameters: reused, nothing rewritten
    mtimes = {rel: os.stat(a / rel).st_mtime_ns for rel in files}
    generate_corpus(a, seed=5, **small)
    assert mtimes == {rel: os.stat(a / rel).st_mtime_ns for rel in files}
    # other parameters: refused unless overwrite, which leaves no stale songs behind
    with pytest.raises(ValueError, match="other parameters"):
        generate_corpus(a, seed=7, **small)
    generate_corpus(a, seed=7, overwrite=True, **dict(small, train=0))
    assert not (a / "musdb" / "train" / "train_000").exists()
    with pytest.raises(ValueError, match="--train must be >= 0"):
        generate_corpus(tmp_path / "d", train=-1)


def test_musdb_reads_it(corpus):
    musdb = pytest.importorskip("musdb")
    db = musdb.DB(root=str(corpus / "musdb"), is_wav=True)
    assert [t.name for t in db] == ["train_000", "train_001", "test_000", "test_001"]
    assert len(musdb.DB(root=str(corpus / "musdb"), is_wav=True, subsets="test")) == 2
    # musdb's train/valid split is a fixed list of real MUSDB names: ours all land in train
    assert len(musdb.DB(root=str(corpus / "musdb"), is_wav=True, subsets="train", split="train")) == 2
    assert len(musdb.DB(root=str(corpus / "musdb"), is_wav=True, subsets="train", split="valid")) == 0
    track = db[2]
    assert track.subset == "test" and set(track.sources) == set(SOURCES)
    assert track.rate == SR
    audio = track.audio  # (samples, channels), 16-bit through ffmpeg
    assert audio.shape == (int(SECONDS * SR), 2)
    ours, _ = sf.read(str(corpus / "musdb" / "test" / "test_000" / "mixture.wav"))
    assert np.abs(audio - ours).max() < 1e-3
    assert np.abs(track.targets["vocals"].audio - track.sources["vocals"].audio).max() == 0


def test_read_audio_reads_it(corpus):
    path = corpus / "musdb" / "train" / "train_000" / "vocals.wav"
    wav, sr = read_audio(path)
    assert sr == SR and tuple(wav.shape) == (2, int(SECONDS * SR))
    ref, _ = sf.read(str(path), dtype="float32")
    assert np.array_equal(wav.numpy(), ref.T)
    wav, sr = read_audio(corpus / "unlabelled" / "unlabelled_0001.wav", sample_rate=8000, channels=1)
    assert sr == 8000 and tuple(wav.shape) == (1, int(SECONDS * 8000))


def test_an_interrupted_song_leaves_no_partial_file(tmp_path, monkeypatch):
    """Songs are written atomically (pahubert_plugin.fileio): a write that fails half-way (disk full,
    a kill) leaves the finished files and nothing under the failed file's name, so a re-run that
    trusts existing files never keeps a truncated stem."""
    real, calls = sf.SoundFile.write, []

    def write(self, data):
        calls.append(1)
        if len(calls) == 3:  # the third file of the song: half of it, then the disk is full
            real(self, data[: len(data) // 2])
            raise OSError("No space left on device")
        return real(self, data)

    monkeypatch.setattr(sf.SoundFile, "write", write)
    out = tmp_path / "toy"
    with pytest.raises(OSError, match="No space left"):
        generate_corpus(out, unlabelled=0, train=1, test=0, seconds=1.0, sample_rate=SR, progress=False)
    assert len(list(out.rglob("*.wav"))) == 2  # mixture and the first stem, both whole
    assert not list(out.rglob("*.tmp-*"))
    assert json.loads((out / "corpus.json").read_text())["status"] == "partial"


@pytest.mark.parametrize("args, message", [
    (["--seconds", "inf"], "--seconds must be a finite number > 0, got inf"),
    (["--seconds", "nan"], "--seconds must be a finite number > 0, got nan"),
    (["--sample-rate", "12345"], "sample rate 12345 Hz is not a positive multiple of the 100 Hz"),
    ("OUT_IS_FILE", "exists and is not a folder"),
])
def test_toy_corpus_refuses_bad_arguments_up_front(tmp_path, args, message):
    out = tmp_path / "toy"
    if args == "OUT_IS_FILE":
        out.write_text("x")
        args = []
    proc = run_module("pahubert_plugin.corpora.toy", out, "--unlabelled", 1, "--train", 0, "--test", 0,
                      "--seconds", 1, *args, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and message in proc.stderr, proc.stderr
    assert len([line for line in proc.stderr.splitlines() if "error" in line]) == 1
    assert not (out / "corpus.json").exists() if out.is_dir() else True


def test_a_full_disk_is_one_line_naming_the_song_file(small_disk):
    """libsndfile says only "System error." when the disk fills: the corpus names the file and the cause."""
    proc = run_module("pahubert_plugin.corpora.toy", small_disk / "toy", "--unlabelled", "0", "--train", "2",
                      "--test", "0", "--seconds", "4", "--sample-rate", str(SR))
    text = proc.stdout + proc.stderr
    assert proc.returncode == 2 and "Traceback" not in text, text
    assert f"pahubert-toy-corpus: error: cannot write {small_disk}/toy/musdb/train/train_000/" in text, text
    assert "No space left on device" in text and f"free space in {small_disk}/toy" in text, text
    assert not list(small_disk.rglob("*.tmp-*"))
