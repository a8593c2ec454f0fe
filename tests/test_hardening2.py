"""Issue 11 (hardening), items 2, 6, 7, 8, 9, 13, 14: no orphans, no silent damage, clear errors."""
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import soundfile as sf

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
SR = 16000


def _tone(path, seconds=1.5, sr=SR, channels=1, f0=220.0):
    t = np.arange(int(seconds * sr)) / sr
    x = 0.3 * np.sin(2 * np.pi * f0 * t)
    os.makedirs(os.path.dirname(os.fspath(path)), exist_ok=True)
    sf.write(path, np.stack([x * (1 + 0.1 * c) for c in range(channels)], axis=1).astype(np.float32), sr)


def _run(args, timeout=300, **kw):
    return subprocess.run([sys.executable, *map(str, args)], env=ENV, capture_output=True, text=True,
                          timeout=timeout, **kw)


# ---- item 2: evaluate workers die with their parent ------------------------------------------

# Runs pahubert-evaluate with a stand-in model: each worker records its pid and sleeps per track.
# The patches sit at module level, so the spawned workers (which import this file as __mp_main__)
# get them too; scores are a constant museval JSON (museval itself is tested elsewhere).
_DRIVER = r'''
import json, os, sys, time
from omegaconf import OmegaConf
from pahubert_plugin import evaluate, separate

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


separate.load_separation_model = lambda path, device="cpu": (Model(), OmegaConf.create({"task": {"sample_rate": 16000}}))
separate.Separator.from_checkpoint = staticmethod(from_checkpoint)
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
            _tone(root / "test" / f"t{i}" / f"{stem}.wav", seconds=0.5, channels=2)
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
        out = proc.communicate(timeout=30)[0]
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
