"""Shared by bench_pretrain.py and bench_finetune.py: tiny corpora written by the benchmark,
real ``fairseq-hydra-train`` runs in a subprocess, and throughput read from fairseq's log.

Throughput of a fairseq run is measured from the log's own timestamps (millisecond
resolution): updates between the ``train_inner`` record at the end of warm-up and the last
``train_inner`` record, divided by the wall-clock time between them, less the validation
(``begin validation`` -> ``[valid]`` record) and checkpoint-writing (``Preparing to save`` ->
``Saved checkpoint``) spans that fall inside.  That is wall-clock training time including data
loading, which is also what fairseq's ``ups`` meter is (a ``TimeMeter``: updates since the last
log line / wall-clock seconds since the last log line, fairseq/logging/meters.py); fairseq's
``train_wall`` is the time spent inside ``Trainer.train_step`` only (no data loading, no
validation), printed rounded to whole seconds.
"""
import json
import os
import re
import shlex
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import numpy as np
import soundfile as sf

REPO = Path(__file__).resolve().parents[1]
PLUGIN_DIR = REPO / "pahubert_plugin"

_STAMP = r"^\[(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3})\]"
_RECORD = re.compile(_STAMP + r"\[(train_inner|train|valid)\]\[INFO\] - (\{.*\})$")
_EVENTS = {
    "valid_begin": re.compile(_STAMP + r".*begin validation on"),
    "save_begin": re.compile(_STAMP + r".*Preparing to save checkpoint"),
    "save_end": re.compile(_STAMP + r".*Saved checkpoint"),
}


def _ts(stamp):
    return datetime.strptime(stamp, "%Y-%m-%d %H:%M:%S,%f").timestamp()


def load_average():
    """'1-min 5-min 15-min' load average of this machine (what shared the cores)."""
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def thread_env(threads):
    """Environment for a child process limited to ``threads`` intra-op threads."""
    return dict(os.environ, PYTHONUNBUFFERED="1", PYTHONWARNINGS="ignore",
                OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))


def write_pretraining_corpus(root, n_files=32, seconds=3.5, sr=16000, channels=2, n_clusters=100, seed=0):
    """Manifests (train, valid), random 100 Hz k-means labels and dict.km.txt in the
    pahubert_pretraining layout; audio: a few random tones plus noise per file, stereo."""
    root = Path(root)
    (root / "audio").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    n = int(seconds * sr)
    t = np.arange(n) / sr
    for split, count in (("train", n_files), ("valid", 2)):
        rows, labels = [], []
        for i in range(count):
            freqs = rng.uniform(80, 4000, size=4)
            mono = sum(0.1 * np.sin(2 * np.pi * f * t + rng.uniform(0, 6.3)) for f in freqs)
            wav = np.stack([mono + 0.02 * rng.standard_normal(n) for _ in range(channels)], axis=1)
            name = f"audio/{split}{i}.wav"
            sf.write(root / name, wav.astype(np.float32), sr)
            rows.append(f"{name}\t{n}")
            labels.append(" ".join(map(str, rng.integers(0, n_clusters, n // (sr // 100)))))
        (root / f"{split}.tsv").write_text(f"{root}\n" + "\n".join(rows) + "\n")
        (root / f"{split}.km").write_text("\n".join(labels) + "\n")
    (root / "dict.km.txt").write_text("".join(f"{k} 1\n" for k in range(n_clusters)))
    return root


def write_musdb_corpus(root, train=4, test=1, seconds=10.0, sr=16000, seed=0):
    """A tiny MUSDB18-HQ-layout corpus: <root>/{train,test}/<song>/{mixture,drums,bass,other,vocals}.wav
    (16-bit stereo, the numpy toy synthesiser's songs)."""
    from pahubert_plugin.corpora.toy import SOURCES, synthesize_song

    root = Path(root)
    for split, count in (("train", train), ("test", test)):
        for i in range(count):
            stems, _ = synthesize_song(seed, split, i, seconds, sr)
            folder = root / split / f"{split}_{i:03d}"
            folder.mkdir(parents=True, exist_ok=True)
            for key in ("mixture",) + tuple(SOURCES):
                sf.write(folder / f"{key}.wav", stems[key].T, sr, subtype="FLOAT")
    return root


def command_line(args, threads):
    return f"OMP_NUM_THREADS={threads} " + " ".join(shlex.quote(str(a)) for a in
                                                   [sys.executable, "-m", "fairseq_cli.hydra_train", *args])


def run_hydra_train(args, cwd, threads, timeout=600):
    """Run fairseq-hydra-train; returns (log, wall seconds of the whole process)."""
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "fairseq_cli.hydra_train", *map(str, args)], cwd=cwd,
                          env=thread_env(threads), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, timeout=timeout)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"fairseq-hydra-train failed ({proc.returncode}):\n{proc.stdout[-6000:]}")
    return proc.stdout, wall


def parse_log(log):
    """(records, events): records = [(time, kind, dict)] of train_inner/train/valid JSON lines,
    events = [(time, name)] for validation and checkpoint begin/end lines."""
    records, events = [], []
    for line in log.splitlines():
        m = _RECORD.search(line)
        if m:
            records.append((_ts(m.group(1)), m.group(2), json.loads(m.group(3))))
            if m.group(2) == "valid":
                events.append((_ts(m.group(1)), "valid_end"))
            continue
        for name, pattern in _EVENTS.items():
            m = pattern.search(line)
            if m:
                events.append((_ts(m.group(1)), name))
    return records, events


def _spans(events, begin, end):
    spans, opened = [], None
    for t, name in events:
        if name == begin:
            opened = t
        elif name == end and opened is not None:
            spans.append((opened, t))
            opened = None
    return spans


def _inside(spans, t0, t1):
    return sum(max(0.0, min(b, t1) - max(a, t0)) for a, b in spans)


def throughput(log, warmup_updates):
    """Training throughput of a fairseq run from its log (see the module docstring).

    Returns a dict: updates, seconds (wall-clock training time over the measured updates, less
    validation and checkpointing), ups, fairseq_ups (fairseq's own meter, update-weighted over the
    same log intervals), train_wall (fairseq's train_wall summed over them), valid_s / save_s
    (seconds of every validation and checkpoint write of the run), valid_n / save_n (their counts),
    total_train_wall (fairseq's train_wall of the whole run), done_s (fairseq's 'done training in').
    """
    records, events = parse_log(log)
    inner = [(t, r) for t, kind, r in records if kind == "train_inner"]
    if not inner:
        raise RuntimeError(f"no train_inner records in the log:\n{log[-3000:]}")
    valid = _spans(events, "valid_begin", "valid_end")
    save = _spans(events, "save_begin", "save_end")
    start = [(t, r) for t, r in inner if int(r["num_updates"]) >= warmup_updates]
    if len(start) < 2:
        raise RuntimeError(f"need train_inner records after update {warmup_updates}: have updates "
                           f"{[r['num_updates'] for _, r in inner]} (lower the warm-up or the log interval)")
    (t0, r0), (t1, r1) = start[0], start[-1]
    updates = int(r1["num_updates"]) - int(r0["num_updates"])
    seconds = (t1 - t0) - _inside(valid, t0, t1) - _inside(save, t0, t1)
    later = start[1:]
    steps = [int(b["num_updates"]) - int(a["num_updates"]) for (_, a), (_, b) in zip(start, later)]
    fairseq_ups = sum(steps) / sum(n / float(r["ups"]) for n, (_, r) in zip(steps, later))
    done = re.search(r"done training in ([\d.]+) seconds", log)
    epochs = [r for _, kind, r in records if kind == "train"]
    return {
        "updates": updates, "seconds": seconds, "ups": updates / seconds, "fairseq_ups": fairseq_ups,
        "train_wall": sum(float(r["train_wall"]) for _, r in later),
        "valid_s": sum(b - a for a, b in valid), "valid_n": len(valid),
        "save_s": sum(b - a for a, b in save), "save_n": len(save),
        "total_train_wall": sum(float(r["train_train_wall"]) for r in epochs) if epochs else None,
        "done_s": float(done.group(1)) if done else None,
        "last_update": int(inner[-1][1]["num_updates"]),
    }
