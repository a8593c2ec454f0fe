"""pahubert-separate with demucs' options, on a toy linear 'separator' (no training needed)."""
import logging
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from omegaconf import OmegaConf

from pahubert_plugin import separate
from pahubert_plugin.separation import api
from pahubert_plugin.separation.api import Separator, split_two_stems
from pahubert_plugin.separation.writing import save_stems
from helpers import SOURCES, SR

GAINS = (0.1, 0.2, 0.3, 0.4)  # the estimates sum to the mixture


class Gains(torch.nn.Module):
    """A 'separator' whose sources are fixed fractions of the mixture (linear, time-invariant)."""

    sources, sample_rate, audio_channels = SOURCES, SR, 2

    def __init__(self, gains=GAINS):
        super().__init__()
        self.register_buffer("g", torch.tensor(gains))
        self.calls = 0

    def forward(self, x):  # (batch, channels, samples) -> (batch, sources, channels, samples)
        self.calls += 1
        return x[:, None] * self.g[None, :, None, None]


@pytest.fixture
def toy(monkeypatch):
    """Every checkpoint path loads the toy model (segment 1 s)."""
    model = Gains()
    monkeypatch.setattr(api, "load_separation_model",
                        lambda path, device="cpu": (model, OmegaConf.create({"task": {"valid_segment": 1.0}})))
    return model


def song(path, seconds=2.3, channels=2, sr=SR, amp=0.5, seed=0):
    rng = np.random.default_rng(seed)
    wav = (amp * rng.uniform(-1, 1, (int(seconds * sr), channels))).astype(np.float32)
    sf.write(path, wav, sr, subtype="FLOAT")
    return Path(path), wav


def run(tmp_path, *args, inputs=None):
    inputs = inputs or [song(tmp_path / "song.wav")[0]]
    return separate.main(["ckpt.pt", *map(str, inputs), "-o", str(tmp_path / "out"), *map(str, args)])


def test_two_stems_cli_and_api(toy, tmp_path):
    path, wav = song(tmp_path / "song.wav")
    assert run(tmp_path, "--two-stems", "vocals", "--float32", "--clip-mode", "none", inputs=[path]) == 0
    assert sorted(p.name for p in (tmp_path / "out" / "song").iterdir()) == ["no_vocals.wav", "vocals.wav"]
    voc, _ = sf.read(tmp_path / "out" / "song" / "vocals.wav", dtype="float32")
    rest, _ = sf.read(tmp_path / "out" / "song" / "no_vocals.wav", dtype="float32")
    np.testing.assert_allclose(voc, 0.4 * wav, atol=1e-6)
    np.testing.assert_allclose(rest, 0.6 * wav, atol=1e-6)
    stems, sr = Separator(toy, 1.0).separate_file(str(path), two_stems="bass")
    assert sr == SR and set(stems) == {"bass", "no_bass"} and stems["bass"].shape == (2, len(wav))
    with pytest.raises(ValueError, match="sources are drums, bass, other, vocals"):
        split_two_stems(Separator(toy, 1.0).separate(np.zeros((2, 100)), SR), "piano")
    assert run(tmp_path, "--two-stems", "piano") == 2


@pytest.mark.parametrize("args,name,fmt,subtype", [
    ((), "vocals.wav", "WAV", "PCM_16"),
    (("--int24",), "vocals.wav", "WAV", "PCM_24"),
    (("--float32",), "vocals.wav", "WAV", "FLOAT"),
    (("--float",), "vocals.wav", "WAV", "FLOAT"),
    (("--flac",), "vocals.flac", "FLAC", "PCM_16"),
    (("--flac", "--int24"), "vocals.flac", "FLAC", "PCM_24"),
    (("--mp3",), "vocals.mp3", "MP3", "MPEG_LAYER_III"),
])
def test_output_formats(toy, tmp_path, args, name, fmt, subtype):
    path, wav = song(tmp_path / "song.wav", amp=0.3)
    assert run(tmp_path, *args, inputs=[path]) == 0
    info = sf.info(str(tmp_path / "out" / "song" / name))
    assert (info.format, info.subtype, info.samplerate, info.channels) == (fmt, subtype, SR, 2)
    got, _ = sf.read(tmp_path / "out" / "song" / name, dtype="float32")
    if fmt == "MP3":  # lossy with codec delay: just the level and about the length
        assert abs(len(got) - len(wav)) < 0.1 * SR and 0.5 < np.std(got) / np.std(0.4 * wav) < 1.5
    else:
        np.testing.assert_allclose(got, 0.4 * wav, atol=1e-4)


def test_mp3_bitrate(toy, tmp_path):
    path, _ = song(tmp_path / "song.wav", seconds=4.0, sr=44100)  # 16 kHz mp3 tops out at 160 kbit/s
    sizes = {}
    for kbps in (320, 96):
        assert separate.main(["c.pt", str(path), "-o", str(tmp_path / str(kbps)), "--mp3", "--mp3-bitrate",
                              str(kbps)]) == 0
        sizes[kbps] = (tmp_path / str(kbps) / "song" / "vocals.mp3").stat().st_size * 8 / 4.0 / 1000
    assert 280 < sizes[320] < 360 and 80 < sizes[96] < 115, sizes


@pytest.mark.parametrize("args,match", [
    (("--flac", "--float32"), "FLAC stores integers only"),
    (("--mp3", "--int24"), "mp3 output has no bit depth"),
    (("--mp3", "--mp3-bitrate", "500"), "32-320 kbit/s"),
    (("--overlap", "1.0"), r"overlap must be in \[0, 0.99\]"),
    (("--overlap", "-0.1"), r"overlap must be in \[0, 0.99\]"),
    (("--overlap", "0.999"), r"overlap must be in \[0, 0.99\] .*got 0.999"),
    (("--shifts", "1000"), r"shifts must be <= 20 .*got 1000"),
    (("--batch-size", "0"), "batch size must be >= 1"),
    (("--shifts", "-1"), "shifts must be >= 0"),
    (("--tile", "-1"), r"tile must be >= 0 seconds"),
    (("--segment", "0"), "segment must be > 0"),
    (("-j", "0"), "jobs must be >= 1"),
    (("--filename", "{track}/{source}.{ext}"), "unknown or bad field"),
    (("--clip-mode", "wrap"), "invalid choice"),
    (("--mp3", "--flac"), "not allowed with argument"),
])
def test_bad_options_stop_before_any_work(tmp_path, capsys, args, match):
    with pytest.raises(SystemExit) as e:  # no checkpoint exists: nothing was loaded
        run(tmp_path, *args)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert __import__("re").search(match, err), err
    assert "Traceback" not in err


def test_api_checks_overlap_and_batch_size(toy):
    with pytest.raises(ValueError, match="overlap"):
        Separator(toy, 1.0, overlap=1.0)
    with pytest.raises(ValueError, match="batch size"):
        Separator(toy, 1.0, batch_size=0)


@pytest.mark.parametrize("mode", ["rescale", "clamp", "none"])
def test_clip_modes(toy, tmp_path, mode):
    loud = {"vocals": torch.tensor([[0.5, -3.0, 1.5, 0.2]])}
    (path,) = save_stems(loud, SR, str(tmp_path), "t", fmt="wav", as_float=True, clip_mode=mode)
    got, _ = sf.read(path, dtype="float32")
    want = {"rescale": loud["vocals"][0] / 3.03, "clamp": loud["vocals"][0].clamp(-0.99, 0.99),
            "none": loud["vocals"][0]}[mode]
    np.testing.assert_allclose(got, want.numpy(), atol=1e-6)
    quiet = {"vocals": torch.tensor([[0.5, -0.25]])}
    (path,) = save_stems(quiet, SR, str(tmp_path), "q", clip_mode=mode, as_float=True)
    np.testing.assert_allclose(sf.read(path, dtype="float32")[0], [0.5, -0.25])  # in range: untouched


def test_shifts_average_random_delays(toy, tmp_path):
    path, wav = song(tmp_path / "song.wav")
    plain = Separator(toy, 1.0).separate(wav.T, SR)
    toy.calls = 0
    shifted = Separator(toy, 1.0, shifts=3).separate(wav.T, SR)
    assert toy.calls >= 3 * 3  # three passes of >= 3 one-second chunks
    for s in SOURCES:  # a time-invariant model gives the same estimate after any delay
        torch.testing.assert_close(shifted[s], plain[s], atol=1e-5, rtol=1e-5)
    assert run(tmp_path, "--shifts", "2", "--float32", inputs=[path]) == 0


def test_filename_template(toy, tmp_path):
    path, _ = song(tmp_path / "song.wav")
    assert run(tmp_path, "--filename", "{stem}/{track}_{trackext}.{ext}", "--flac", inputs=[path]) == 0
    assert sorted(p.relative_to(tmp_path / "out").as_posix() for p in (tmp_path / "out").rglob("*.flac")) == \
        [f"{s}/song_wav.flac" for s in sorted(SOURCES)]
    assert run(tmp_path, "--filename", "{track}.{ext}", inputs=[path]) == 2  # all stems to one file


def test_device_default_and_unavailable_cuda(toy, tmp_path, caplog, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert separate._resolve_device(None) == "cpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert separate._resolve_device(None) == "cuda"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with caplog.at_level(logging.ERROR):
        assert run(tmp_path, "-d", "cuda") == 2
    assert "CUDA is not available" in caplog.text
    assert run(tmp_path, "-d", "cpu") == 0


def test_jobs_give_the_same_files(toy, tmp_path, capsys):
    inputs = [song(tmp_path / f"s{i}.wav", seconds=1.5 + 0.4 * i, seed=i)[0] for i in range(3)]
    for jobs in (1, 2):
        assert separate.main(["c.pt", *map(str, inputs), "-o", str(tmp_path / f"j{jobs}"), "-j", str(jobs)]) == 0
    for i in range(3):
        for s in SOURCES:
            rel = Path(f"s{i}") / f"{s}.wav"
            assert (tmp_path / "j1" / rel).read_bytes() == (tmp_path / "j2" / rel).read_bytes()
    err = capsys.readouterr().err
    assert all(f"s{i}.wav" in err for i in range(3)) and "/2.3 s" in err  # one progress bar per file


def test_output_folder_checked_up_front(toy, tmp_path, capsys):
    (tmp_path / "afile").write_text("x")
    for out, match in ((tmp_path / "afile", "is not a folder"), (tmp_path / "afile" / "sub", "cannot create")):
        with pytest.raises(SystemExit) as e:
            separate.main(["c.pt", str(song(tmp_path / "song.wav")[0]), "-o", str(out)])
        err = capsys.readouterr().err
        assert e.value.code == 2 and match in err and "Traceback" not in err, err


def test_read_and_write_errors_are_reported_per_file(toy, tmp_path, caplog):
    good, _ = song(tmp_path / "good.wav")
    blocked, _ = song(tmp_path / "blocked.wav", seed=1)
    bad = tmp_path / "broken.wav"
    bad.write_bytes(b"RIFF\x10\x00\x00\x00WAVEnot audio at all")
    (tmp_path / "out" / "blocked" / "vocals.wav").mkdir(parents=True)  # a folder where a stem goes
    with caplog.at_level(logging.ERROR):
        assert run(tmp_path, inputs=[good, bad, blocked]) == 1
    assert "skipping" in caplog.text and "broken.wav" in caplog.text
    assert "could not write the stems of" in caplog.text and "blocked.wav" in caplog.text
    assert "2 file(s) could not be separated" in caplog.text
    assert all((tmp_path / "out" / "good" / f"{s}.wav").is_file() for s in SOURCES)


def test_outputs_never_overwrite_an_input(toy, tmp_path, caplog):
    (tmp_path / "song").mkdir()
    vocals, wav = song(tmp_path / "song" / "vocals.wav")
    (tmp_path / "out" / "bass").mkdir(parents=True)
    bass, _ = song(tmp_path / "out" / "bass" / "bass.wav", seed=1)
    (tmp_path / "link").mkdir()
    linked, _ = song(tmp_path / "linked.wav", seed=2)
    (tmp_path / "link" / "drums.wav").symlink_to(linked)  # an output path that is a link to an input
    before = {p: p.read_bytes() for p in (vocals, bass, linked)}
    cases = ((vocals, ["-o", str(tmp_path / "song"), "--filename", "{stem}.{ext}"]),
             (bass, ["-o", str(tmp_path / "out")]),
             (linked, ["-o", str(tmp_path / "link"), "--filename", "{stem}.{ext}"]))
    for path, args in cases:
        caplog.clear()
        with caplog.at_level(logging.ERROR):
            assert separate.main(["ckpt.pt", str(path), *args]) == 2
        errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
        assert len(errors) == 1 and str(path) in errors[0] and "is the input" in errors[0], errors
    assert {p: p.read_bytes() for p in (vocals, bass, linked)} == before


@pytest.mark.parametrize("template", ["../{track}/{stem}.{ext}", "{track}/../../{stem}.{ext}", "/tmp/{stem}.{ext}"])
def test_filename_may_not_leave_the_output_folder(tmp_path, capsys, template):
    with pytest.raises(SystemExit) as e:
        run(tmp_path, "--filename", template)
    err = capsys.readouterr().err
    assert e.value.code == 2 and "leaves the output folder" in err and "Traceback" not in err, err
    assert not list(tmp_path.rglob("vocals.wav"))


SLOW_CLI = """
import signal, sys, time
import torch
from omegaconf import OmegaConf
from pahubert_plugin import separate
from pahubert_plugin.separation import api

class Slow(torch.nn.Module):  # a tiny 'separator' that takes its time per chunk
    sources, sample_rate, audio_channels = {sources!r}, {sr}, 2
    def forward(self, x):
        time.sleep(0.05)
        return x[:, None] * torch.full((1, 4, 1, 1), 0.25)

api.load_separation_model = lambda path, device="cpu": (Slow(), OmegaConf.create({{"task": {{"valid_segment": 0.25}}}}))
# Ctrl-C as in a terminal: a child inherits an ignored SIGINT from its parent (a background job, sometimes the
# test runner's worker), and Python then leaves it ignored
signal.signal(signal.SIGINT, signal.default_int_handler)
sys.exit(separate.main(sys.argv[1:]))
"""


def test_ctrl_c_stops_promptly_and_removes_partial_stems(tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time

    from helpers import REPO

    path, _ = song(tmp_path / "long.wav", seconds=120)
    out = tmp_path / "out"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.Popen([sys.executable, "-c", SLOW_CLI.format(sources=list(SOURCES), sr=SR), "c.pt", str(path),
                             "-o", str(out), "--clip-mode", "clamp"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=REPO, env=env)
    deadline = time.time() + 120
    while not list(out.rglob(".*.wav.part")):
        assert proc.poll() is None and time.time() < deadline, proc.communicate()[1][-2000:]
        time.sleep(0.05)
    time.sleep(0.3)
    proc.send_signal(signal.SIGINT)
    sent = time.time()
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err[-2000:]
    assert time.time() - sent < 10  # stops at the next block, not at the end of the 2-minute track
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err[-2000:]
    assert len([line for line in err.splitlines() if "interrupted" in line]) == 1, err[-2000:]
    assert not list(out.rglob("*.part")) and not list(out.rglob("*.wav"))


def test_stale_part_files_of_a_killed_run_are_removed(toy, tmp_path, caplog):
    path, _ = song(tmp_path / "song.wav")
    out = tmp_path / "out"
    stale = [out / "song" / ".vocals.wav.part", out / "older" / ".bass.flac.part", out / ".drums.mp3.part"]
    kept = [out / "song" / "notes.part", out / "older" / ".mine.txt.part", out / "older" / "vocals.wav.part"]
    for p in stale + kept:
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"half a stem")
    with caplog.at_level(logging.WARNING):
        assert run(tmp_path, inputs=[path]) == 0
    assert not any(p.exists() for p in stale) and all(p.exists() for p in kept)
    assert "removed 3 unfinished stem file(s)" in caplog.text
    assert all((out / "song" / f"{s}.wav").is_file() for s in SOURCES)


def test_a_folder_is_every_audio_file_under_it(toy, tmp_path, caplog):
    music = tmp_path / "music"
    (music / "album" / "cd2").mkdir(parents=True)
    _, a = song(music / "a.wav")
    _, b = song(tmp_path / "b.wav", seed=1)
    sf.write(music / "album" / "b.flac", b, SR, subtype="PCM_24")
    song(music / "album" / "cd2" / "b.wav", seed=2)  # the same name elsewhere: its own track
    (music / "album" / "cover.jpg").write_bytes(b"jpeg")
    (music / "notes.txt").write_text("liner notes")
    with caplog.at_level(logging.INFO):
        assert separate.main(["c.pt", str(music), "-o", str(music / "out"), "--float32", "--clip-mode", "none"]) == 0
    assert "skipped 2 other file(s)" in caplog.text and "separated 3 of 3 files" in caplog.text
    got = sorted(p.relative_to(music / "out").as_posix() for p in (music / "out").rglob("*.wav"))
    assert got == sorted(f"{t}/{s}.wav" for t in ("a", "album/b", "album/cd2/b") for s in SOURCES)
    np.testing.assert_allclose(sf.read(music / "out" / "album" / "b" / "vocals.wav")[0], 0.4 * b, atol=1e-5)
    caplog.clear()  # again: the stems under -o inside the folder are no input
    with caplog.at_level(logging.INFO):
        assert separate.main(["c.pt", str(music), "-o", str(music / "out")]) == 0
    assert "separated 3 of 3 files" in caplog.text
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.txt").write_text("x")
    with pytest.raises(SystemExit) as e:
        separate.main(["c.pt", str(tmp_path / "empty"), "-o", str(tmp_path / "o2")])
    assert e.value.code == 2


def test_high_overlap_warns_of_its_cost(toy, tmp_path, caplog):
    with caplog.at_level(logging.WARNING):
        assert run(tmp_path, "--overlap", "0.95") == 0
    assert "--overlap 0.95: the model runs 20 times per segment of audio, 15x the work" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        assert run(tmp_path, "--overlap", "0.5", "--shifts", "20") == 0
    assert "--overlap" not in caplog.text
