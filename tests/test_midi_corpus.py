"""MIDI corpus: exact stem sums, no clipping, audible stems, stem character, determinism,
caching, musdb reads it, clear errors without FluidSynth or the soundfont."""
import filecmp
import json
import os
import shutil

import numpy as np
import pytest
import soundfile as sf
from scipy import signal

from pahubert_plugin.corpora import midi as midi_corpus
from pahubert_plugin.corpora.midi import DEFAULT_SOUNDFONT, SOURCES
from helpers import SR, check_corpus_layout, corpus_songs

pytestmark = pytest.mark.skipif(
    shutil.which("fluidsynth") is None or not os.path.isfile(DEFAULT_SOUNDFONT),
    reason="needs the Debian packages fluidsynth and timgm6mb-soundfont")

SECONDS = 6.0
ARGS = ["--unlabelled", "2", "--train", "2", "--test", "2", "--seconds", str(SECONDS),
        "--sample-rate", str(SR), "--seed", "5", "--no-progress"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    out = tmp_path_factory.mktemp("midi") / "corpus"
    meta = midi_corpus.run([str(out)] + ARGS + ["--jobs", "2"])
    assert meta["rendered"] == 6
    return out


def _read(path):
    return sf.read(str(path), dtype="int16")[0]


def test_layout_and_format(corpus):
    check_corpus_layout(corpus, SR, SECONDS, "PCM_16", SOURCES)
    for song in corpus_songs(corpus):
        for stem in SOURCES:
            assert (corpus / "midi" / song.parent.name / song.name / f"{stem}.mid").is_file()
    meta = json.loads((corpus / "corpus.json").read_text())
    assert meta["status"] == "complete" and meta["params"]["seed"] == 5
    assert set(meta["songs"]["unlabelled"]) == {"unlabelled_0000", "unlabelled_0001"}
    assert meta["songs"]["train"]["train_000"]["style"] in midi_corpus.STYLES
    assert not list(corpus.rglob("*.tmp-*"))  # no temporary files left


def test_stems_sum_exactly_without_clipping(corpus):
    for song in corpus_songs(corpus):
        mix = _read(song / "mixture.wav").astype(np.int64)
        stems = [_read(song / f"{s}.wav").astype(np.int64) for s in SOURCES]
        assert np.array_equal(sum(stems), mix), song
        for audio in [mix] + stems:
            assert np.abs(audio).max() < 32767, song
        assert np.abs(mix).max() > 0.4 * 32768, song  # normalised to -1..-6 dBFS, not near silence
    for path in (corpus / "unlabelled").iterdir():
        peak = np.abs(_read(path).astype(np.int64)).max()
        assert 0.4 * 32768 < peak < 32767, path


def _rms(x):
    return float(np.sqrt(np.mean(x.astype(np.float64) ** 2)))


def test_every_stem_audible(corpus):
    for song in corpus_songs(corpus):
        mix_rms = _rms(_read(song / "mixture.wav"))
        for s in SOURCES:
            audio = _read(song / f"{s}.wav")
            assert _rms(audio) > 0.1 * mix_rms, (song, s)  # levels within -9..0 dB of each other
        # vocals rest between phrases but sing in a good part of the song
        vocals = _read(song / "vocals.wav").astype(np.float64).mean(axis=1)
        frames = vocals[: len(vocals) // 800 * 800].reshape(-1, 800)
        loud = np.sqrt(np.mean(frames ** 2, axis=1)) > 0.05 * _rms(vocals)
        assert loud.mean() > 0.3, song


def _low_fraction(x, cut=300.0):
    f, p = signal.welch(x.astype(np.float64).mean(axis=1), SR, nperseg=4096)
    return p[f < cut].sum() / p.sum()


def _onset_rate(x):
    _, _, z = signal.stft(x.astype(np.float64).mean(axis=1), SR, nperseg=512, noverlap=512 - 160)
    s = np.log1p(100 * np.abs(z) / (np.abs(z).max() + 1e-9))
    flux = np.maximum(np.diff(s, axis=1), 0).sum(axis=0)
    peaks, _ = signal.find_peaks(flux / (flux.mean() + 1e-9), height=2.0, distance=5)
    return len(peaks) / SECONDS


def test_stem_character(corpus):
    lows = []
    for song in corpus_songs(corpus):
        bass = _read(song / "bass.wav")
        lows.append(_low_fraction(bass))
        assert lows[-1] > 0.5, (song, lows[-1])  # bass: most energy below 300 Hz
        drums, vocals = _onset_rate(_read(song / "drums.wav")), _onset_rate(_read(song / "vocals.wav"))
        assert drums > 2.5 and drums > vocals, (song, drums, vocals)  # drums: dense onsets
        assert _low_fraction(_read(song / "other.wav")) < 0.6, song  # other: not a bass part
    assert np.mean(lows) > 0.7, lows


def test_deterministic_whatever_jobs(corpus, tmp_path):
    again = tmp_path / "again"
    midi_corpus.run([str(again)] + ARGS + ["--jobs", "1"])
    files = sorted(p.relative_to(corpus) for p in corpus.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(again) for p in again.rglob("*") if p.is_file())
    for rel in files:
        assert filecmp.cmp(corpus / rel, again / rel, shallow=False), rel


def test_reuse_cache_and_resume(corpus, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(corpus, copy)
    mtimes = {p: p.stat().st_mtime_ns for p in copy.rglob("*.wav")}
    assert midi_corpus.run([str(copy)] + ARGS)["rendered"] == 0
    assert {p: p.stat().st_mtime_ns for p in copy.rglob("*.wav")} == mtimes
    # a song without its song.json (as after a kill mid-song) is redone, and only that one
    (copy / "midi" / "test" / "test_001" / "song.json").unlink()
    (copy / "musdb" / "test" / "test_001" / "vocals.wav").unlink()
    assert midi_corpus.run([str(copy)] + ARGS)["rendered"] == 1
    for rel in ("musdb/test/test_001/vocals.wav", "musdb/test/test_001/mixture.wav"):
        assert filecmp.cmp(corpus / rel, copy / rel, shallow=False)
    # another corpus in the same folder is refused without --overwrite
    other = ["--unlabelled", "1", "--train", "0", "--test", "0", "--seconds", "3", "--no-progress"]
    with pytest.raises(SystemExit, match="other parameters"):
        midi_corpus.run([str(copy)] + other)
    meta = midi_corpus.run([str(copy)] + other + ["--overwrite"])
    assert meta["rendered"] == 1 and not (copy / "musdb").exists()


def test_musdb_reads_it(corpus):
    musdb = pytest.importorskip("musdb")
    db = musdb.DB(root=str(corpus / "musdb"), is_wav=True)
    assert sorted(t.name for t in db.tracks) == ["test_000", "test_001", "train_000", "train_001"]
    track = db.tracks[0]
    assert track.audio.shape == (int(SECONDS * SR), 2) and track.rate == SR
    total = sum(track.targets[s].audio for s in SOURCES)
    assert np.abs(total - track.audio).max() < 1e-4


def test_unlabelled_hours_and_44k(tmp_path):
    assert midi_corpus.unlabelled_count(1.0, 20.0) == 180
    assert midi_corpus.unlabelled_count(0.001, 3.0) == 2  # 3.6 s of audio -> 2 songs of 3 s
    out = tmp_path / "hours"
    meta = midi_corpus.run([str(out), "--unlabelled-hours", "0.001", "--train", "0", "--test", "0",
                             "--seconds", "3", "--sample-rate", "44100", "--no-progress"])
    assert meta["params"]["unlabelled"] == 2 and meta["rendered"] == 2
    for path in sorted((out / "unlabelled").iterdir()):
        info = sf.info(str(path))
        assert (info.samplerate, info.frames, info.subtype) == (44100, 3 * 44100, "PCM_16")
    with pytest.raises(SystemExit):  # --unlabelled and --unlabelled-hours exclude each other
        midi_corpus.run([str(out), "--unlabelled", "2", "--unlabelled-hours", "1"])


def test_clear_errors(tmp_path, capsys):
    out = str(tmp_path / "c")
    with pytest.raises(SystemExit, match="apt-get install fluidsynth"):
        midi_corpus.run([out, "--fluidsynth", str(tmp_path / "no-such-fluidsynth")])
    missing = str(tmp_path / "missing.sf2")
    with pytest.raises(SystemExit, match="missing.sf2 not found.*timgm6mb-soundfont"):
        midi_corpus.run([out, "--soundfont", missing])
    with pytest.raises(SystemExit, match="FluidR3"):
        midi_corpus.run([out, "--soundfont", "/usr/share/sounds/sf2/FluidR3_GM.sf2"])
    with pytest.raises(SystemExit, match="multiple of 100") as e:
        midi_corpus.run([out, "--sample-rate", "22050"])
    assert e.value.code == 2  # an option mistake exits 2, as every script's
    for bad in ("0", "inf", "nan", "-1"):
        with pytest.raises(SystemExit, match="finite and > 0"):
            midi_corpus.run([out, "--seconds", bad])
    (tmp_path / "file").write_text("x")
    with pytest.raises(SystemExit, match="is a file"):
        midi_corpus.run([str(tmp_path / "file")])
    fake = tmp_path / "fluidsynth"  # a FluidSynth that fails: the message names the file and stderr
    fake.write_text("#!/bin/sh\necho 'boom: cannot render' >&2\nexit 3\n")
    fake.chmod(0o755)
    with pytest.raises(SystemExit, match=r"fluidsynth failed on .*\.mid \(exit 3\): boom"):
        midi_corpus.run([out, "--fluidsynth", str(fake), "--unlabelled", "1", "--train", "0",
                          "--test", "0", "--seconds", "2", "--no-progress"])
    assert not list((tmp_path / "c").rglob("*.wav"))
