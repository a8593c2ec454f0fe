"""pahubert-evaluate when things go wrong: workers end with their parent, SIGTERM and Ctrl-C stop it cleanly
and a re-run resumes, a broken track (wav folders or .stem.mp4) is a counted skip, not the end."""
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest

from helpers import ENV, SOURCES, write_tone


# ---- workers die with their parent; signals stop the run, a re-run resumes --------------------

_DRIVER = r'''
import json, os, sys, time
from omegaconf import OmegaConf
from pahubert_plugin import evaluate
from pahubert_plugin.separation import api

SOURCES = ["drums", "bass", "other", "vocals"]


class Model:
    sources = SOURCES


class Slow:
    sources = SOURCES

    def separate(self, mixture, rate):
        time.sleep(float(os.environ["SLEEP"]))
        return {s: mixture / 4 for s in SOURCES}


def from_checkpoint(*a, **k):
    open(os.path.join(os.environ["PID_DIR"], str(os.getpid())), "w").close()
    return Slow()


class Store:
    json = json.dumps({"targets": [{"name": s, "frames": [{"metrics": {m: 1.0 for m in ("SDR", "SIR", "ISR", "SAR")}}]}
                                   for s in SOURCES]})


api.load_separation_model = lambda path, device="cpu": (Model(), OmegaConf.create({"task": {"sample_rate": 16000}}))
api.Separator.from_checkpoint = staticmethod(from_checkpoint)
evaluate.score_track = lambda *a: Store()

if __name__ == "__main__":
    sys.exit(evaluate.main(sys.argv[1:]))
'''


def _alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"  # a zombie has ended
    except FileNotFoundError:
        return False


def _start_evaluate(tmp_path, sleep, tracks=4):
    root = tmp_path / "musdb"
    for i in range(tracks):
        for stem in ("mixture", "drums", "bass", "other", "vocals"):
            write_tone(root / "test" / f"t{i}" / f"{stem}.wav", seconds=0.5, channels=2)
    (tmp_path / "driver.py").write_text(_DRIVER)
    (tmp_path / "model.pt").write_bytes(b"stand-in")
    pid_dir = tmp_path / "pids"
    pid_dir.mkdir(exist_ok=True)
    for f in pid_dir.iterdir():
        f.unlink()
    env = dict(ENV, SLEEP=str(sleep), PID_DIR=str(pid_dir))
    cmd = [sys.executable, str(tmp_path / "driver.py"), str(tmp_path / "model.pt"), "--musdb-root", str(root),
           "--is-wav", "--out", str(tmp_path / "eval"), "--jobs", "2"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 120
    while len(os.listdir(pid_dir)) < 2 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    workers = [int(p) for p in os.listdir(pid_dir)]
    assert len(workers) == 2, proc.communicate()[0] if proc.poll() is not None else "workers did not start"
    return proc, workers, cmd, env


def _wait_gone(pids, seconds=5.0):
    deadline = time.time() + seconds
    while any(map(_alive, pids)) and time.time() < deadline:
        time.sleep(0.1)
    return [p for p in pids if _alive(p)]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_evaluate_workers_die_with_a_killed_parent(tmp_path):
    proc, workers, _, _ = _start_evaluate(tmp_path, sleep=60)
    try:
        proc.kill()  # SIGKILL: no handler, no cleanup in the parent
        proc.wait(10)
        assert _wait_gone(workers) == []
    finally:
        for pid in workers:
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_evaluate_stops_cleanly_on_sigterm_and_resumes(tmp_path, sig):
    proc, workers, cmd, env = _start_evaluate(tmp_path, sleep=60)
    try:
        proc.send_signal(sig)
        out = proc.communicate(timeout=120)[0]  # generous: a loaded 2-core CI machine is slow to exit
        assert proc.returncode == 130, out
        assert "interrupted: 0 of 4 remaining tracks scored" in out and "run the same command again" in out, out
        assert "Traceback" not in out, out
        assert _wait_gone(workers) == []
    finally:
        for pid in workers:
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
    done = subprocess.run(cmd, env=dict(env, SLEEP="0"), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert json.loads((tmp_path / "eval" / "summary.json").read_text())["num_tracks"] == 4


# ---- one broken track does not abort the evaluation -----------------------------------------

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

    from pahubert_plugin import evaluate
    from pahubert_plugin.separation import api

    root = corpora.write_layout(tmp_path / "musdb", train=0, test=3, seconds=1.0)
    os.remove(root / "test" / "test_01" / "bass.wav")
    vocals, sr = sf.read(root / "test" / "test_02" / "vocals.wav")
    sf.write(root / "test" / "test_02" / "vocals.wav", vocals[: len(vocals) // 2], sr)
    ckpt = tmp_path / "model.pt"
    ckpt.write_bytes(b"stand-in: the model is replaced below")

    class Model:
        sources = SOURCES

    monkeypatch.setattr(api, "load_separation_model",
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


@pytest.mark.skipif(shutil.which("ffmpeg") is None or shutil.which("ffprobe") is None,
                    reason="MUSDB18 .stem.mp4 needs ffmpeg")
def test_evaluate_skips_a_broken_stem_mp4_and_lists_the_rest(tmp_path):
    import numpy as np
    import stempeg

    from pahubert_plugin.evaluate import usable_tracks

    test = tmp_path / "musdb" / "test"
    test.mkdir(parents=True)
    x = (np.random.default_rng(0).standard_normal((5, 44100, 2)) * 0.05).astype(np.float32)
    x[0] = x[1:].sum(0)  # mixture, drums, bass, other, vocals (MUSDB18 stream order)
    stempeg.write_stems(str(test / "good.stem.mp4"), x, sample_rate=44100, writer=stempeg.StreamsWriter(codec="aac"))
    (test / "bad.stem.mp4").write_bytes(b"not an mp4" * 100)
    tracks, skipped = usable_tracks(str(tmp_path / "musdb"), "test", ["drums", "bass", "other", "vocals"], 44100,
                                    is_wav=False)
    assert [t.name for t in tracks] == ["good"]
    assert list(skipped) == ["bad"] and "bad.stem.mp4" in skipped["bad"], skipped
    assert abs(tracks[0].num_samples - 44100) < 2048  # aac padding


# ---- damaged provenance or per-track JSON: named in a warning, treated as absent ------------------

def test_damaged_provenance_and_track_json_are_named_and_redone(tmp_path):
    root = tmp_path / "musdb"
    for i in range(2):
        for stem in ("mixture", "drums", "bass", "other", "vocals"):
            write_tone(root / "test" / f"t{i}" / f"{stem}.wav", seconds=0.5, channels=2)
    (tmp_path / "driver.py").write_text(_DRIVER)
    (tmp_path / "model.pt").write_bytes(b"stand-in")
    (tmp_path / "pids").mkdir()
    env = dict(ENV, SLEEP="0", PID_DIR=str(tmp_path / "pids"))
    out = tmp_path / "eval"
    cmd = [sys.executable, str(tmp_path / "driver.py"), str(tmp_path / "model.pt"), "--musdb-root", str(root),
           "--is-wav", "--out", str(out), "--jobs", "1"]

    def run():
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stdout + proc.stderr
        assert json.loads((out / "summary.json").read_text())["num_tracks"] == 2
        return proc.stdout + proc.stderr

    run()
    provenance = out / "test.provenance.json"
    want = json.loads(provenance.read_text())
    (out / "test" / "t1.json").write_text("")  # a full disk's leftovers
    log = run()
    assert f"{out / 'test' / 't1.json'}: unreadable" in log and "rescoring the track" in log, log
    assert json.loads((out / "test" / "t1.json").read_text())["targets"]
    provenance.write_text("")
    (out / "test" / "t0.json").write_text('{"targets": [')
    log = run()
    assert f"{provenance}: unreadable" in log and "rescoring every track" in log, log
    assert json.loads(provenance.read_text()) == want
    assert all(json.loads((out / "test" / f"t{i}.json").read_text())["targets"] for i in range(2))
