"""Corpora the tests write, in one place: each test asks for the ``corpora`` fixture and calls a writer.

* ``corpora.write_corpus``: pahubert_pretraining layout (manifests, 100 Hz tone labels, dict), mono and
  stereo files of random lengths; ``corpora.tone_sequence`` makes one labelled tone sequence.
* ``corpora.write_pretrain_corpus``: the same layout with random labels (any model, any k).
* ``corpora.write_musdb``: a MUSDB18-HQ-layout train folder of tone stems summing to the mixture.
* ``corpora.write_layout``: train/test songs of the numpy toy synthesiser, PCM_16 like MUSDB18-HQ.
* ``corpora.make_corpus``: a messy unlabelled folder for the recipe (rates, mono, mp3, corrupt, short).

``small_disk`` is a 64 KiB tmpfs (a full disk for anything bigger than a few pages), or a skip where
mounting is refused (it needs root).
"""
import os
import subprocess
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import soundfile as sf

from pahubert_plugin import frames
from helpers import SOURCES, SR

TONES = (262.0, 440.0, 740.0, 1245.0)  # K = 4
SEGMENT = 10  # frames per tone


def tone_sequence(num_samples, sr=SR, first=0, channels=1):
    """(samples, channels) audio and its per-frame labels (tone index), frame rule exact."""
    hop = frames.hop_length(sr)
    n = frames.num_frames(num_samples, sr)
    labels = (first + np.arange(n) // SEGMENT) % len(TONES)
    per_sample = np.repeat(labels, hop)
    per_sample = np.concatenate([per_sample, np.full(num_samples - per_sample.size, per_sample[-1])])
    phase = np.cumsum(2 * np.pi * np.asarray(TONES)[per_sample] / sr)
    wav = 0.3 * np.sin(phase)[:, None] * np.linspace(1.0, 0.8, channels)[None]
    return wav.astype(np.float32), labels


def write_corpus(root, n_train=8, n_valid=2, seed=0, min_s=1.2, max_s=2.5):
    """Manifests, labels and dict in the task's layout: mono and stereo files, random lengths."""
    root = Path(root)
    (root / "audio").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for split, count in (("train", n_train), ("valid", n_valid)):
        rows, lines = [], []
        for i in range(count):
            n = int(rng.uniform(min_s, max_s) * SR)
            wav, labels = tone_sequence(n, first=int(rng.integers(len(TONES))), channels=1 + i % 2)
            name = f"audio/{split}{i}.wav"
            sf.write(root / name, wav, SR)
            rows.append(f"{name}\t{n}")
            lines.append(" ".join(map(str, labels)))
        (root / f"{split}.tsv").write_text(f"{root}\n" + "\n".join(rows) + "\n")
        (root / f"{split}.km").write_text("\n".join(lines) + "\n")
    (root / "dict.km.txt").write_text("".join(f"{k} 1\n" for k in range(len(TONES))))
    return root


def write_pretrain_corpus(root, n=6, seconds=2.0, sr=SR, k=4):
    """Manifests, random 100 Hz k-means-style labels and dict in pahubert_pretraining's layout."""
    root = Path(root)
    (root / "audio").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1)
    for split, count in (("train", n), ("valid", 2)):
        rows, lines = [], []
        for i in range(count):
            samples = int(seconds * sr) + 37 * i
            wav = (0.2 * rng.standard_normal((samples, 2))).astype(np.float32)
            sf.write(root / "audio" / f"{split}{i}.wav", wav, sr)
            rows.append(f"audio/{split}{i}.wav\t{samples}")
            lines.append(" ".join(map(str, rng.integers(0, k, frames.num_frames(samples, sr)))))
        (root / f"{split}.tsv").write_text(f"{root}\n" + "\n".join(rows) + "\n")
        (root / f"{split}.km").write_text("\n".join(lines) + "\n")
    (root / "dict.km.txt").write_text("".join(f"{j} 1\n" for j in range(k)))
    return root


def write_musdb(root, tracks=3, seconds=2.5, sr=SR):
    """A MUSDB18-HQ-layout folder of tone stems; the mixture is their sum."""
    rng = np.random.default_rng(0)
    t = np.arange(int(seconds * sr)) / sr
    for i in range(tracks):
        folder = Path(root) / "train" / f"track{i}"
        folder.mkdir(parents=True)
        stems = []
        for j, name in enumerate(SOURCES):
            f = 80.0 * (j + 1) * (1 + 0.1 * i)
            wav = 0.2 * np.sin(2 * np.pi * f * t)[:, None] * np.array([1.0, 0.7]) \
                + 0.01 * rng.standard_normal((t.size, 2))
            stems.append(wav.astype(np.float32))
            sf.write(folder / f"{name}.wav", stems[-1], sr, subtype="FLOAT")
        sf.write(folder / "mixture.wav", sum(stems), sr, subtype="FLOAT")
    return Path(root)


def write_layout(root: Path, train=3, test=2, seconds=3.0, sr=SR):
    """<root>/{train,test}/<song>/{mixture,drums,bass,other,vocals}.wav, PCM_16 like MUSDB18-HQ."""
    from pahubert_plugin.corpora.toy import synthesize_song

    for split, n in (("train", train), ("test", test)):
        for i in range(n):
            stems, _ = synthesize_song(7, split, i, seconds, sr)
            folder = root / split / f"{split}_{i:02d}"
            folder.mkdir(parents=True, exist_ok=True)
            for name in ["mixture", *SOURCES]:
                sf.write(folder / f"{name}.wav", stems[name].T, sr, subtype="PCM_16")
    return root


def _music(seconds, sr, channels, f0, rng):
    """Tone with noise bursts: two obviously different kinds of frame."""
    t = np.arange(int(seconds * sr)) / sr
    bursts = np.sin(2 * np.pi * 2 * t) > 0.3
    x = 0.3 * np.sin(2 * np.pi * f0 * t) + 0.3 * rng.standard_normal(t.size) * bursts
    return np.stack([x, 0.8 * x][:channels], axis=1).astype(np.float32)


def make_corpus(root):
    rng = np.random.default_rng(0)
    os.makedirs(os.path.join(root, "sub"))
    for i in range(3):
        sf.write(os.path.join(root, f"song{i}.wav"), _music(3 + 0.37 * i, 44100, 2, 110 * (i + 1), rng), 44100)
    sf.write(os.path.join(root, "sub", "mono.flac"), _music(2.5, 22050, 1, 330, rng), 22050)
    sf.write(os.path.join(root, "sub", "track.mp3"), _music(3.1, 44100, 2, 220, rng), 44100)
    with open(os.path.join(root, "corrupt.wav"), "wb") as f:
        f.write(rng.bytes(4000))
    sf.write(os.path.join(root, "short.wav"), _music(0.2, 44100, 2, 440, rng), 44100)


@pytest.fixture(scope="session")
def corpora():
    return SimpleNamespace(tone_sequence=tone_sequence, write_corpus=write_corpus,
                           write_pretrain_corpus=write_pretrain_corpus, write_musdb=write_musdb,
                           write_layout=write_layout, make_corpus=make_corpus, music=_music)


@pytest.fixture
def small_disk(tmp_path):
    mnt = tmp_path / "disk"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mnt)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root) to simulate a full disk")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


# The files that run for minutes, longest first. `make test` hands whole files to two processes in collection
# order (pytest-xdist --dist loadfile --no-loadscope-reorder): started first, they run beside the many short files
# instead of leaving one process alone with a long file at the end.
LONGEST_FIRST = ("test_demo.py", "test_demo_music.py", "test_gpu_check.py")


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: each file keeps its own order
