"""A toy multi-stem corpus: numpy-synthesised songs in the MUSDB18-HQ layout.

Every song is drawn from its own random stream, ``SeedSequence([seed, split, index])``, so a
song depends only on (seed, split, index, seconds, sample_rate): the same seed gives
byte-identical files whatever ``--jobs`` is, and unlabelled songs are never copies of the
labelled ones. A song has a tempo (80-140 BPM), a key (major or minor), a looping chord
progression, and four stems:

* ``drums``  -- kick (pitch-swept sine), snare (tone + noise), closed/open hi-hat (high-passed
  noise) and a crash, on 16-step patterns with swing, fills and velocity variation;
* ``bass``   -- a low line on the chord roots (root/fifth/octave patterns), harmonic timbre
  through a low-pass filter;
* ``other``  -- one or two of pad, keys, arpeggio, organ, playing the chords with song-specific
  harmonic spectra, envelopes and voicings;
* ``vocals`` -- a glottal source with vibrato, portamento and drift, shaped by cascaded vowel
  formant resonators (five vowels, male or female formant scale), singing a scale melody
  in phrases separated by rests, with breath noise and consonant bursts.

Each stem is stereo (its own pan, width and a short noise reverb), normalised to a common RMS
and given a level between -12 and 0 dB; all stems are then scaled together so that neither
the mixture nor any stem peaks above 0.5-0.89. Stems are written as float32 WAV
(subtype FLOAT) and the mixture is the float32 sum of the written stems, so they sum to the
mixture to float32 rounding (< 1e-6).

Layout under OUT::

    OUT/musdb/train/train_000/{mixture,drums,bass,other,vocals}.wav
    OUT/musdb/test/test_000/...
    OUT/unlabelled/unlabelled_0000.wav     (mixtures only, PCM_16)
    OUT/corpus.json                        (parameters + a per-song summary)

``musdb.DB(root=OUT/musdb, is_wav=True)`` reads it: musdb walks ``train/`` and ``test/``
folders. Its ``split="train"/"valid"`` filter is a fixed list of real MUSDB18 track names
(``musdb/configs/mus.yaml``), so with these song names ``split="train"`` keeps every
training song and ``split="valid"`` keeps none; use ``split=None`` (the default) and choose a
validation subset yourself.

A finished corpus with the same parameters is reused; a folder holding a corpus made with
other parameters is refused unless ``--overwrite`` is given.
"""
import argparse
import json
import logging
import math
import os
import sys
from typing import Dict, List, Optional, Tuple

import numpy as np

from ..data.corpus_layout import SOURCES, SPLITS, reuse_or_clear, song_names, song_paths
from ..fileio import CommandError, atomic_write_text, atomic_write_wav, prints_command_errors, write_error
from ..frames import hop_length
from .processes import map_jobs

logger = logging.getLogger(__name__)

SYNTH_VERSION = 1  # bump when the sound changes, so old corpora are not reused silently
TARGET_RMS = 0.1

_MAJOR = np.array([0, 2, 4, 5, 7, 9, 11])
_MINOR = np.array([0, 2, 3, 5, 7, 8, 10])
# chord progressions as 0-based scale degrees
_MAJOR_PROGRESSIONS = [[0, 4, 5, 3], [0, 5, 3, 4], [0, 3, 4, 3], [1, 4, 0, 5], [5, 3, 0, 4],
                       [0, 3, 0, 4]]
_MINOR_PROGRESSIONS = [[0, 5, 2, 6], [0, 3, 4, 0], [0, 6, 5, 6], [0, 3, 6, 2], [0, 5, 3, 4]]
# 16-step drum patterns
_KICKS = [[0, 4, 8, 12], [0, 8, 10], [0, 6, 8], [0, 3, 8, 10], [0, 7, 10], [0, 8]]
_SNARES = [[4, 12], [4, 12], [4, 12, 15], [8]]
_HATS = [list(range(0, 16, 2)), list(range(16)), [2, 6, 10, 14], list(range(0, 16, 2))]
# vowel formants (Hz) for an adult male voice: F1..F4 and bandwidths
_VOWELS = {
    "a": ([730, 1090, 2440, 3400], [80, 90, 120, 150]),
    "e": ([530, 1840, 2480, 3500], [60, 100, 120, 150]),
    "i": ([300, 2250, 3000, 3700], [50, 100, 140, 160]),
    "o": ([570, 840, 2410, 3400], [70, 80, 120, 150]),
    "u": ([320, 870, 2240, 3300], [50, 80, 120, 150]),
}


# --------------------------------------------------------------------------- building blocks

def midi_to_hz(m):
    return 440.0 * 2.0 ** ((np.asarray(m, dtype=np.float64) - 69.0) / 12.0)


class Wavetable:
    """A periodic waveform given by harmonic amplitudes, band-limited to the pitch played.

    ``amps[k - 1]`` is the amplitude of harmonic ``k``. Tables are built per band of
    fundamental frequency so no harmonic crosses 0.45 * sample_rate (no aliasing).
    """

    SIZE = 2048
    BANDS_PER_OCTAVE = 4

    def __init__(self, amps, sample_rate: int):
        self.amps = np.asarray(amps, dtype=np.float64)
        self.sr = sample_rate
        self._tables: Dict[int, np.ndarray] = {}

    def _band(self, f0):
        return np.ceil(np.log2(np.maximum(f0, 20.0) / 20.0) * self.BANDS_PER_OCTAVE).astype(int)

    def _table(self, band: int) -> np.ndarray:
        if band not in self._tables:
            f_top = 20.0 * 2.0 ** (band / self.BANDS_PER_OCTAVE)
            kmax = int(max(1, min(len(self.amps), 0.45 * self.sr // f_top)))
            spec = np.zeros(self.SIZE // 2 + 1, dtype=np.complex128)
            spec[1:kmax + 1] = -0.5j * self.SIZE * self.amps[:kmax]  # irfft -> sum a_k sin(k x)
            tab = np.fft.irfft(spec, self.SIZE)
            self._tables[band] = np.append(tab, tab[0])  # wrap point for interpolation
        return self._tables[band]

    def render(self, phase, f0) -> np.ndarray:
        """phase: (samples,) in cycles; f0: scalar or (samples,) Hz. Returns (samples,)."""
        pos = (phase % 1.0) * self.SIZE
        idx = pos.astype(np.int64)
        frac = pos - idx
        bands = self._band(np.asarray(f0))
        if bands.ndim == 0:
            tab = self._table(int(bands))
            return tab[idx] + frac * (tab[idx + 1] - tab[idx])
        out = np.empty_like(pos)
        for b in np.unique(bands):  # one lookup per pitch band, not per sample
            m = bands == b
            tab = self._table(int(b))
            out[m] = tab[idx[m]] + frac[m] * (tab[idx[m] + 1] - tab[idx[m]])
        return out


def envelope(length: int, gate: int, sr: int, attack: float, decay: float, sustain: float,
             release: float) -> np.ndarray:
    """ADSR-style envelope of ``length`` samples for a note held ``gate`` samples."""
    t = np.arange(length) / sr
    gate_s = gate / sr
    held = np.minimum(t / max(attack, 1e-4), 1.0) * (sustain + (1 - sustain) * np.exp(-t / decay))
    t_end = min(gate_s, t[-1]) if length else 0.0
    at_end = min(t_end / max(attack, 1e-4), 1.0) * (sustain + (1 - sustain) * np.exp(-t_end / decay))
    return np.where(t < gate_s, held, at_end * np.exp(-(t - gate_s) / release))


def add_note(out: np.ndarray, wt: Wavetable, midi: float, start: int, gate: int, env_args,
             velocity: float, rng, detune_cents: float = 0.0, tail: float = 0.0) -> None:
    """Render one note into ``out`` (samples,) in place; the release tail may pass ``gate``."""
    sr = wt.sr
    if start >= len(out) or gate <= 0:
        return
    length = min(gate + int(tail * sr), len(out) - start)
    f0 = float(midi_to_hz(midi)) * 2.0 ** (detune_cents / 1200.0)
    phase = rng.random() + f0 * np.arange(length) / sr
    out[start:start + length] += velocity * envelope(length, gate, sr, *env_args) * wt.render(phase, f0)


def pan(mono: np.ndarray, position: float) -> np.ndarray:
    """Constant-power pan, position in [-1 (left), 1 (right)]: (samples,) -> (2, samples)."""
    angle = (position + 1.0) * np.pi / 4.0
    return np.stack([np.cos(angle) * mono, np.sin(angle) * mono])


def one_pole(x: np.ndarray, tau: float, sr: int, axis: int = -1) -> np.ndarray:
    """First-order low-pass smoothing with time constant ``tau`` seconds (unit DC gain)."""
    from scipy import signal  # here, not at the top: 1-2 s that --help need not wait for

    a = np.exp(-1.0 / max(tau * sr, 1e-6))
    first = np.take(x, [0], axis=axis)
    y, _ = signal.lfilter([1 - a], [1, -a], x, axis=axis, zi=first * a)
    return y


def butter(x: np.ndarray, cutoff, sr: int, btype: str, order: int = 2, axis: int = -1):
    """Butterworth filter with cut-offs clamped below Nyquist."""
    from scipy import signal

    cutoff = np.clip(np.asarray(cutoff, dtype=np.float64), 10.0, 0.45 * sr)
    sos = signal.butter(order, cutoff, btype=btype, fs=sr, output="sos")
    return signal.sosfilt(sos, x, axis=axis)


def reverb(x: np.ndarray, rng, sr: int, seconds: float, wet: float) -> np.ndarray:
    """Add a decorrelated stereo noise-tail reverb to (2, samples) audio."""
    from scipy import signal

    length = int(seconds * sr / 2)
    t = np.arange(length) / sr
    ir = rng.standard_normal((2, length)) * np.exp(-6.9 * t / seconds)  # RT60 = seconds, cut at -30 dB
    ir[:, : int(0.01 * sr)] = 0.0  # pre-delay
    ir = butter(ir, 6000.0, sr, "lowpass", axis=1)
    ir /= np.sqrt(np.sum(ir ** 2, axis=1, keepdims=True))
    tail = signal.fftconvolve(x.mean(axis=0, keepdims=True), ir, axes=1)[:, : x.shape[1]]
    return x + wet * tail


def add_at(out: np.ndarray, clip: np.ndarray, start: int) -> None:
    """out[start:start + len(clip)] += clip, cropped to ``out`` (start may be negative)."""
    lo, hi = max(start, 0), min(start + len(clip), len(out))
    if lo < hi:
        out[lo:hi] += clip[lo - start:hi - start]


# --------------------------------------------------------------------------- the song plan

class Plan:
    """Tempo, key and chords shared by all stems of one song."""

    def __init__(self, rng, seconds: float, sr: int):
        self.sr = sr
        self.n = int(round(seconds * sr))
        self.tempo = float(rng.uniform(80, 140))
        self.beat = 60.0 / self.tempo
        self.step = self.beat / 4  # sixteenth note
        self.bar = 4 * self.beat
        self.n_bars = int(np.ceil(seconds / self.bar)) + 1
        self.key = int(rng.integers(12))
        self.minor = bool(rng.random() < 0.4)
        self.scale = (_MINOR if self.minor else _MAJOR) + self.key
        progs = _MINOR_PROGRESSIONS if self.minor else _MAJOR_PROGRESSIONS
        self.progression = progs[rng.integers(len(progs))]
        self.bars_per_chord = 2 if (self.tempo > 115 and rng.random() < 0.5) else 1
        self.sevenths = bool(rng.random() < 0.3)
        self.swing = float(rng.choice([0.0, 0.0, 0.0, rng.uniform(0.1, 0.3)]))
        # chord tones (pitch classes, root first) for every bar
        self.chords: List[np.ndarray] = []
        for b in range(self.n_bars):
            deg = self.progression[(b // self.bars_per_chord) % len(self.progression)]
            count = 4 if self.sevenths else 3
            tones = [self.scale[(deg + 2 * i) % 7] for i in range(count)]
            self.chords.append(np.array(tones) % 12)

    def step_time(self, bar: int, step: int) -> float:
        swing = self.swing * self.step if step % 2 else 0.0
        return bar * self.bar + step * self.step + swing

    def chord_at(self, t: float) -> np.ndarray:
        return self.chords[min(int(t // self.bar), self.n_bars - 1)]

    def describe(self) -> dict:
        names = ["C", "C#", "D", "D#", "E", "F", "F#", "G", "G#", "A", "A#", "B"]
        return {"tempo": round(self.tempo, 2), "key": names[self.key] + ("m" if self.minor else ""),
                "progression": [int(d) + 1 for d in self.progression], "swing": round(self.swing, 3)}


def place(pitch_class: int, low: int) -> int:
    """The MIDI note of ``pitch_class`` in [low, low + 12)."""
    return low + (pitch_class - low) % 12


# --------------------------------------------------------------------------- stems

def drums(plan: Plan, rng) -> Tuple[np.ndarray, dict]:
    noise = np.random.default_rng(rng.integers(2 ** 63))  # sample-length draws: choices stay rate-independent
    sr, n = plan.sr, plan.n
    t = np.arange(int(0.8 * sr)) / sr
    # kick: pitch-swept sine plus a click
    f_hi, f_lo = rng.uniform(90, 180), rng.uniform(40, 60)
    f = f_lo + (f_hi - f_lo) * np.exp(-t / rng.uniform(0.02, 0.06))
    kick = np.sin(2 * np.pi * np.cumsum(f) / sr) * np.exp(-t / rng.uniform(0.1, 0.3))
    kick += 0.3 * butter(noise.standard_normal(len(t)), 3000, sr, "lowpass") * np.exp(-t / 0.004)
    # snare: tonal body plus band-passed noise
    rattle = butter(noise.standard_normal(len(t)), [rng.uniform(800, 2000), 9000], sr, "bandpass")
    snare = (0.6 * np.sin(2 * np.pi * rng.uniform(150, 250) * t) * np.exp(-t / rng.uniform(0.03, 0.08))
             + rng.uniform(0.6, 1.2) * rattle * np.exp(-t / rng.uniform(0.08, 0.2)))
    hiss = butter(noise.standard_normal(len(t)), rng.uniform(5000, 8000), sr, "highpass", order=4)
    hat_closed = hiss * np.exp(-t / rng.uniform(0.015, 0.05))
    hat_open = hiss * np.exp(-t / rng.uniform(0.15, 0.3))
    tc = np.arange(int(2.0 * sr)) / sr
    crash = butter(noise.standard_normal(len(tc)), 3500, sr, "highpass") * np.exp(-tc / rng.uniform(0.5, 1.0))

    kick_pat = _KICKS[rng.integers(len(_KICKS))]
    snare_pat = _SNARES[rng.integers(len(_SNARES))]
    hat_pat = _HATS[rng.integers(len(_HATS))]
    open_hat = bool(rng.random() < 0.4)
    hits: Dict[str, Tuple[list, list]] = {k: ([], []) for k in ("kick", "snare", "closed", "open", "crash")}

    def hit(kind, bar, step, vel):
        jitter = rng.normal(0, 0.003)
        hits[kind][0].append(plan.step_time(bar, step) + jitter)
        hits[kind][1].append(vel * rng.uniform(0.85, 1.0))

    for b in range(plan.n_bars):
        fill = b % 4 == 3 and rng.random() < 0.5
        for s in kick_pat:
            hit("kick", b, s, 1.0)
        if rng.random() < 0.25:  # an extra syncopated kick
            hit("kick", b, int(rng.choice([3, 7, 11, 14])), 0.7)
        for s in snare_pat:
            if not (fill and s >= 12):
                hit("snare", b, s, 1.0 if s in (4, 12, 8) else 0.4)
        if fill:
            for s in range(12, 16):
                hit("snare", b, s, 0.5 + 0.12 * (s - 12))
        for s in hat_pat:
            if open_hat and s == 14:
                hit("open", b, s, 0.8)
            else:
                hit("closed", b, s, 1.0 if s % 4 == 0 else 0.65)
        if b % 4 == 0:
            hit("crash", b, 0, 0.7)
    parts = {"kick": (kick, 0.0, 1.0), "snare": (snare, rng.uniform(-0.15, 0.15), 0.8),
             "closed": (hat_closed, rng.uniform(0.25, 0.5) * rng.choice([-1, 1]), 0.35),
             "open": (hat_open, 0.0, 0.3), "crash": (crash, rng.uniform(-0.5, 0.5), 0.3)}
    parts["open"] = (hat_open, parts["closed"][1], 0.3)
    out = np.zeros((2, n))
    for name, (template, position, level) in parts.items():
        times, vels = hits[name]
        if not times:
            continue
        mono = np.zeros(n)
        for time, vel in zip(times, vels):
            add_at(mono, template * vel, int(round(time * sr)))
        out += level * pan(mono, position)
    out = reverb(out, noise, sr, rng.uniform(0.3, 0.8), rng.uniform(0.05, 0.2))
    return out, {"kick": kick_pat, "snare": snare_pat, "hats": len(hat_pat), "open_hat": open_hat}


def _harmonics(rng, kind: str, count: int = 64) -> np.ndarray:
    k = np.arange(1, count + 1, dtype=np.float64)
    if kind == "saw":
        amps = 1.0 / k
    elif kind == "square":
        amps = np.where(k % 2 == 1, 1.0 / k, rng.uniform(0, 0.1) / k)
    elif kind == "triangle":
        amps = np.where(k % 2 == 1, 1.0 / k ** 2, 0.0)
    elif kind == "mellow":
        amps = 1.0 / k ** rng.uniform(1.6, 2.4)
    elif kind == "organ":
        amps = np.zeros(count)
        for h in (1, 2, 3, 4, 6, 8):
            amps[h - 1] = rng.uniform(0.2, 1.0)
        amps[0] = 1.0
    else:
        raise ValueError(f"unknown timbre {kind!r}")
    return amps * np.exp(rng.normal(0, 0.25, count))  # a little per-song colour


def bass(plan: Plan, rng) -> Tuple[np.ndarray, dict]:
    noise = np.random.default_rng(rng.integers(2 ** 63))  # sample-length draws: choices stay rate-independent
    sr, n = plan.sr, plan.n
    timbre = str(rng.choice(["saw", "square", "mellow", "triangle"]))
    wt = Wavetable(_harmonics(rng, timbre, 40), sr)
    low = int(rng.integers(28, 36))
    pattern = int(rng.integers(4))
    steps = [[0, 4, 8, 12], [0, 2, 4, 6, 8, 10, 12, 14], [0, 3, 6, 8, 11, 14], [0, 6, 8, 10]][pattern]
    intervals = [0, 0, 0, 7, 12, 0]  # root, root, root, fifth, octave ...
    gate_frac = rng.uniform(0.5, 0.95)
    env = (0.004, rng.uniform(0.15, 0.6), rng.uniform(0.3, 0.8), 0.03)
    mono = np.zeros(n)
    for b in range(plan.n_bars):
        root = place(int(plan.chords[b][0]), low)
        for i, s in enumerate(steps):
            nxt = steps[i + 1] if i + 1 < len(steps) else 16
            t0 = plan.step_time(b, s)
            interval = intervals[i % len(intervals)] if pattern in (1, 2) else 0
            gate = int((nxt - s) * plan.step * gate_frac * sr)
            add_note(mono, wt, root + interval, int(t0 * sr), gate, env,
                     rng.uniform(0.8, 1.0) * (1.0 if s % 4 == 0 else 0.85), rng, tail=0.15)
    cutoff = rng.uniform(250, 900)
    mono = np.tanh(rng.uniform(1.0, 2.5) * mono / (np.abs(mono).max() + 1e-9))  # gentle drive
    mono = butter(mono, cutoff, sr, "lowpass", order=4)  # after the drive: nothing above cutoff
    out = pan(mono, rng.uniform(-0.1, 0.1))
    out = reverb(out, noise, sr, 0.3, rng.uniform(0.0, 0.08))
    return out, {"timbre": timbre, "low_midi": low, "pattern": pattern, "cutoff": round(cutoff)}


def _part(plan: Plan, rng, kind: str) -> np.ndarray:
    """One accompaniment part of ``other``: (2, samples)."""
    sr, n = plan.sr, plan.n
    out = np.zeros((2, n))
    low = int(rng.integers(50, 58))
    if kind == "pad":
        wt = Wavetable(_harmonics(rng, "saw"), sr)
        env = (rng.uniform(0.05, 0.4), 1.0, 1.0, rng.uniform(0.15, 0.4))
        span = plan.bars_per_chord
        voices = np.zeros((len(plan.chords[0]), 2, n))  # (voice, detune side, samples)
        for b in range(0, plan.n_bars, span):
            for v, pc in enumerate(plan.chords[b]):
                for side, det in enumerate((-1, 1)):
                    add_note(voices[v, side], wt, place(int(pc), low), int(b * plan.bar * sr),
                             int(span * plan.bar * sr), env, 0.5, rng,
                             detune_cents=det * rng.uniform(3, 12), tail=1.0)
        for v in range(len(voices)):
            for side, det in enumerate((-1, 1)):
                out += pan(voices[v, side], det * (0.2 + 0.15 * v))
        return butter(out, rng.uniform(1500, 4000), sr, "lowpass", axis=1)
    if kind in ("keys", "organ"):
        wt = Wavetable(_harmonics(rng, "mellow" if kind == "keys" else "organ"), sr)
        bright = Wavetable(_harmonics(rng, "saw"), sr) if kind == "keys" else None
        comp = [[0, 8], [0, 6, 8, 14], [0, 4, 8, 12], [2, 6, 10, 14], [0, 3, 6, 10]][rng.integers(5)]
        if kind == "keys":
            env = (0.003, rng.uniform(0.3, 1.0), 0.0, 0.15)
        else:
            env = (0.01, 1.0, 1.0, 0.05)
            comp = [0, 8] if rng.random() < 0.5 else [0]
        gate_frac = rng.uniform(0.4, 0.95)
        spread = rng.uniform(0.1, 0.5)
        voices = np.zeros((len(plan.chords[0]), n))
        for b in range(plan.n_bars):
            for i, s in enumerate(comp):
                nxt = comp[i + 1] if i + 1 < len(comp) else 16
                start = int(plan.step_time(b, s) * sr)
                gate = int((nxt - s) * plan.step * gate_frac * sr)
                vel = rng.uniform(0.7, 1.0)
                for v, pc in enumerate(plan.chords[b]):
                    add_note(voices[v], wt, place(int(pc), low), start, gate, env, vel, rng, tail=0.5)
                    if bright is not None:  # a bright attack that fades fast
                        add_note(voices[v], bright, place(int(pc), low), start, gate,
                                 (0.002, 0.08, 0.0, 0.05), 0.3 * vel, rng, tail=0.2)
        for v in range(len(voices)):
            out += pan(voices[v], spread * (v - 1))
        if kind == "organ":  # tremolo
            t = np.arange(n) / sr
            out *= 1.0 - rng.uniform(0.1, 0.3) * (0.5 + 0.5 * np.sin(2 * np.pi * rng.uniform(5, 7) * t))
        return out
    if kind == "arp":
        wt = Wavetable(_harmonics(rng, str(rng.choice(["square", "triangle", "saw"]))), sr)
        every = int(rng.choice([2, 2, 1]))  # 8ths or 16ths
        order = str(rng.choice(["up", "down", "updown", "random"]))
        env = (0.002, rng.uniform(0.08, 0.3), 0.0, 0.05)
        mono = np.zeros(n)
        base = low + 12
        for b in range(plan.n_bars):
            notes = sorted(place(int(pc), base) for pc in plan.chords[b])
            notes = notes + [notes[0] + 12]
            if order == "down":
                notes = notes[::-1]
            elif order == "updown":
                notes = notes + notes[-2:0:-1]
            for j, s in enumerate(range(0, 16, every)):
                m = notes[rng.integers(len(notes))] if order == "random" else notes[j % len(notes)]
                add_note(mono, wt, m, int(plan.step_time(b, s) * sr), int(every * plan.step * 0.8 * sr),
                         env, rng.uniform(0.7, 1.0), rng, tail=0.3)
        mono = butter(mono, rng.uniform(2000, 6000), sr, "lowpass")
        # ping-pong echo (a dotted eighth) for width
        d = int(0.75 * plan.beat * sr)
        side = rng.choice([-1, 1])
        out = pan(mono, side * rng.uniform(0.1, 0.4))
        echo = np.zeros((2, n))
        echo[0, d:] = 0.35 * mono[:-d]
        echo[1, 2 * d:] = 0.2 * mono[:-2 * d]
        return out + (echo if side > 0 else echo[::-1])
    raise ValueError(f"unknown part {kind!r}")


def other(plan: Plan, rng) -> Tuple[np.ndarray, dict]:
    noise = np.random.default_rng(rng.integers(2 ** 63))  # sample-length draws: choices stay rate-independent
    kinds = ["pad", "keys", "arp", "organ"]
    main = kinds[rng.integers(len(kinds))]
    parts = [main]
    out = _part(plan, rng, main)
    out /= np.sqrt(np.mean(out ** 2)) + 1e-9
    if rng.random() < 0.5:
        second = str(rng.choice([k for k in kinds if k != main]))
        extra = _part(plan, rng, second)
        out += 10 ** (rng.uniform(-10, -4) / 20) * extra / (np.sqrt(np.mean(extra ** 2)) + 1e-9)
        parts.append(second)
    out = reverb(out, noise, plan.sr, rng.uniform(0.6, 1.5), rng.uniform(0.1, 0.3))
    return out, {"parts": parts}


def _formant_sos(freqs, bws, sr) -> np.ndarray:
    """Cascade of unit-DC-gain two-pole resonators (Klatt), one second-order section each."""
    sos = []
    for f, bw in zip(freqs, bws):
        if f >= 0.45 * sr:
            continue
        r = np.exp(-np.pi * bw / sr)
        b1, b2 = 2 * r * np.cos(2 * np.pi * f / sr), -r * r
        sos.append([1 - b1 - b2, 0, 0, 1, -b1, -b2])
    return np.array(sos)


def vocals(plan: Plan, rng) -> Tuple[np.ndarray, dict]:
    from scipy import signal

    noise = np.random.default_rng(rng.integers(2 ** 63))  # sample-length draws: choices stay rate-independent
    sr, n = plan.sr, plan.n
    female = bool(rng.random() < 0.5)
    low = int(rng.integers(55, 62)) if female else int(rng.integers(48, 55))
    pool = np.array([m for m in range(low, low + 15) if m % 12 in plan.scale % 12])
    vowels = list(rng.choice(list(_VOWELS), size=int(rng.integers(3, 6)), replace=False))
    eighth = plan.beat / 2
    total = plan.n_bars * 8
    # melody: phrases of notes on the eighth grid separated by rests
    onsets, durs, pitches, vowel_ids = [], [], [], []
    cursor = int(rng.choice([0, 0, 2, 8]))
    pos = int(rng.integers(len(pool)))
    while cursor < total:
        end = min(cursor + int(rng.choice([4, 6, 8, 12])), total)
        while cursor < end:
            length = int(min(rng.choice([1, 1, 2, 2, 2, 3, 4]), end - cursor))
            pos = int(np.clip(pos + rng.choice([-2, -1, -1, 0, 1, 1, 2]), 0, len(pool) - 1))
            m = int(pool[pos])
            if cursor % 4 == 0 and rng.random() < 0.7:  # strong beats favour chord tones
                chord = plan.chord_at(cursor * eighth + plan.swing)
                tones = [p for p in pool if p % 12 in chord]
                m = int(min(tones, key=lambda p: abs(p - m)))
                pos = int(np.searchsorted(pool, m))
            onsets.append(cursor * eighth)
            durs.append(length * eighth - rng.uniform(0.02, 0.06))
            pitches.append(m)
            vowel_ids.append(int(rng.integers(len(vowels))))
            cursor += length
        cursor += int(rng.choice([2, 3, 4, 6, 8]))
    onsets, durs, pitches = np.array(onsets), np.array(durs), np.array(pitches, dtype=np.float64)

    t = np.arange(n) / sr
    note = np.maximum(np.searchsorted(onsets, t, side="right") - 1, 0)
    since = t - onsets[note]
    active = (since >= 0) & (since < durs[note])
    # pitch: portamento, delayed vibrato and slow drift
    midi = one_pole(pitches[note], rng.uniform(0.03, 0.07), sr)
    vib_depth = rng.uniform(0.2, 0.7) * np.clip((since - 0.15) / 0.25, 0.0, 1.0)
    midi += vib_depth * np.sin(2 * np.pi * rng.uniform(4.5, 6.5) * t + rng.uniform(0, 2 * np.pi))
    drift = one_pole(noise.standard_normal(n), 0.1, sr)
    midi += 0.08 * drift / (drift.std() + 1e-9)
    f0 = midi_to_hz(midi)
    # amplitude: attack/release per note, smoothed; louder notes higher up
    att, rel = rng.uniform(0.02, 0.06), rng.uniform(0.05, 0.12)
    amp = np.clip(since / att, 0, 1) * np.clip((durs[note] - since) / rel, 0, 1) * active
    amp = one_pole(amp, 0.01, sr) * (0.8 + 0.2 * (pitches[note] - low) / 15)
    # source: glottal spectrum with tilt, plus breath noise
    tilt = rng.uniform(0.9, 1.4)
    source = Wavetable(1.0 / np.arange(1, 121) ** tilt, sr).render(np.cumsum(f0) / sr + rng.random(), f0)
    source = amp * (source + rng.uniform(0.02, 0.08) * noise.standard_normal(n))
    # vowels: cascaded formant resonators per vowel, cross-faded note by note
    scale = rng.uniform(1.1, 1.2) if female else rng.uniform(0.95, 1.05)
    weights = one_pole((np.array(vowel_ids)[note][None, :] == np.arange(len(vowels))[:, None]).astype(float),
                       0.03, sr, axis=1)
    voice = np.zeros(n)
    for v, name in enumerate(vowels):
        freqs, bws = _VOWELS[name]
        voice += weights[v] * signal.sosfilt(_formant_sos(np.array(freqs) * scale, bws, sr), source)
    # consonant bursts at some note onsets
    burst_len = int(0.04 * sr)
    burst = butter(noise.standard_normal(burst_len), rng.uniform(2500, 5000), sr, "highpass") \
        * np.exp(-np.arange(burst_len) / (0.012 * sr))
    level = np.sqrt(np.mean(voice[active] ** 2)) if active.any() else 1.0
    for onset in onsets[rng.random(len(onsets)) < 0.4]:
        add_at(voice, 0.6 * level * burst, int(round((onset - 0.02) * sr)))
    out = pan(voice, rng.uniform(-0.2, 0.2))
    out = reverb(out, noise, sr, rng.uniform(0.8, 1.8), rng.uniform(0.1, 0.3))
    return out, {"female": female, "low_midi": low, "vowels": [str(v) for v in vowels], "notes": len(onsets),
                 "tilt": round(tilt, 2)}


_STEMS = {"drums": drums, "bass": bass, "other": other, "vocals": vocals}


def synthesize_song(seed: int, split: str, index: int, seconds: float,
                    sample_rate: int) -> Tuple[Dict[str, np.ndarray], dict]:
    """Synthesise one song.

    Returns ``(stems, info)``: ``stems`` maps each of :data:`SOURCES` and ``"mixture"`` to a
    float32 array (2, samples); the mixture is the float32 sum of the stems.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {sorted(SPLITS)}, got {split!r}")
    if seconds <= 0 or sample_rate < 8000:
        raise ValueError(f"need seconds > 0 and sample_rate >= 8000, got {seconds}, {sample_rate}")
    streams = np.random.SeedSequence([seed, SPLITS[split], index]).spawn(len(SOURCES) + 1)
    rng = np.random.default_rng(streams[0])
    plan = Plan(rng, seconds, sample_rate)
    info = plan.describe()
    stems = {}
    for name, stream in zip(SOURCES, streams[1:]):
        audio, details = _STEMS[name](plan, np.random.default_rng(stream))
        gain_db = float(rng.uniform(-12.0, 0.0))
        stems[name] = audio * (TARGET_RMS * 10 ** (gain_db / 20) / (np.sqrt(np.mean(audio ** 2)) + 1e-12))
        info[name] = dict(details, gain_db=round(gain_db, 2))
    # one scale for all stems so neither the mixture nor any stem clips
    peak = max(np.abs(sum(stems.values())).max(), *(np.abs(s).max() for s in stems.values()))
    target = float(rng.uniform(0.5, 0.89))
    stems = {k: (v * (target / peak)).astype(np.float32) for k, v in stems.items()}
    mixture = np.zeros_like(stems["drums"])
    for name in SOURCES:
        mixture += stems[name]
    stems["mixture"] = mixture
    info["peak"] = round(target, 3)
    return stems, info


# --------------------------------------------------------------------------- corpus on disk

def _make_song(job) -> Tuple[str, str, dict]:
    out, split, index, name, seconds, sample_rate, seed = job
    stems, info = synthesize_song(seed, split, index, seconds, sample_rate)
    if split == "unlabelled":
        atomic_write_wav(song_paths(out, split, name)[0], stems["mixture"].T, sample_rate, subtype="PCM_16")
    else:
        for path, key in zip(song_paths(out, split, name), ("mixture",) + SOURCES):
            atomic_write_wav(path, stems[key].T, sample_rate, subtype="FLOAT")
    return split, name, info


def generate_corpus(out, unlabelled: int = 40, train: int = 8, test: int = 6, seconds: float = 15.0,
                    sample_rate: int = 16000, seed: int = 0, jobs: int = 1, overwrite: bool = False,
                    progress: bool = True) -> dict:
    """Write the corpus under ``out`` (see the module docstring); returns the corpus.json dict.

    Reuses a finished corpus with the same parameters; refuses a folder holding another
    corpus (or foreign musdb/ or unlabelled/ folders) unless ``overwrite``.
    """
    out = os.fspath(out)
    for name, value in (("unlabelled", unlabelled), ("train", train), ("test", test)):
        if value < 0:
            raise ValueError(f"--{name} must be >= 0, got {value}")
    if not (math.isfinite(seconds) and seconds > 0):
        raise ValueError(f"--seconds must be a finite number > 0, got {seconds}")
    hop_length(sample_rate)  # a multiple of 100 Hz: one label per STFT hop
    if sample_rate < 8000:
        raise ValueError(f"--sample-rate must be >= 8000 Hz, got {sample_rate}")
    if os.path.exists(out) and not os.path.isdir(out):
        raise ValueError(f"{out} exists and is not a folder; give a new or existing folder as OUT")
    params = {"synth_version": SYNTH_VERSION, "unlabelled": int(unlabelled), "train": int(train),
              "test": int(test), "seconds": float(seconds), "sample_rate": int(sample_rate),
              "seed": int(seed)}
    names = song_names(train, test, unlabelled)
    meta_path = os.path.join(out, "corpus.json")
    def complete():
        return all(os.path.isfile(p) for split, ns in names.items() for nm in ns for p in song_paths(out, split, nm))

    existing = reuse_or_clear(out, params, complete, ("musdb", "unlabelled"), overwrite)
    if existing is not None:
        return existing

    os.makedirs(out, exist_ok=True)
    meta = {"params": params, "status": "partial", "songs": {k: {} for k in names}}
    atomic_write_text(meta_path, json.dumps(meta, indent=1))
    jobs_list = [(out, split, i, nm, seconds, sample_rate, seed)
                 for split in ("train", "test", "unlabelled") for i, nm in enumerate(names[split])]
    if jobs > 1:
        import scipy.signal  # noqa: F401  (loaded once before the pool forks, not in every worker)
    for split, nm, info in map_jobs(_make_song, jobs_list, jobs, "toy corpus", "song", progress):
        meta["songs"][split][nm] = info
    meta["status"] = "complete"
    atomic_write_text(meta_path, json.dumps(meta, indent=1))
    return meta


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="pahubert-toy-corpus",
        description="Synthesise a toy multi-stem corpus (drums, bass, other, vocals) in the "
                    "MUSDB18-HQ layout OUT/musdb/{train,test}/<song>/*.wav plus unlabelled "
                    "mixtures of other songs in OUT/unlabelled/. Deterministic for a seed; "
                    "a finished corpus with the same parameters is reused.")
    p.add_argument("out", help="output folder")
    p.add_argument("--unlabelled", type=int, default=40, help="unlabelled mixtures (default 40)")
    p.add_argument("--train", type=int, default=8, help="labelled training songs (default 8)")
    p.add_argument("--test", type=int, default=6, help="labelled test songs (default 6)")
    p.add_argument("--seconds", type=float, default=15.0, help="song length in seconds (default 15)")
    p.add_argument("--sample-rate", type=int, default=16000, help="sample rate in Hz (default 16000)")
    p.add_argument("--seed", type=int, default=0, help="corpus seed (default 0)")
    p.add_argument("--jobs", type=int, default=1, help="worker processes (default 1); "
                   "the output does not depend on it")
    p.add_argument("--overwrite", action="store_true",
                   help="replace OUT/musdb and OUT/unlabelled if they hold another corpus")
    return p


@prints_command_errors
def main(argv: Optional[List[str]] = None) -> int:
    args = get_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        meta = generate_corpus(args.out, args.unlabelled, args.train, args.test, args.seconds,
                               args.sample_rate, args.seed, jobs=args.jobs, overwrite=args.overwrite)
    except ValueError as e:
        raise CommandError(f"pahubert-toy-corpus: error: {e}")
    except OSError as e:  # a full disk or an unwritable folder: one line naming the file
        raise CommandError(f"pahubert-toy-corpus: error: {write_error(e.filename or args.out, e)}") from None
    counts = {k: len(v) for k, v in meta["songs"].items()}
    print(f"toy corpus in {args.out}: {counts['train']} train, {counts['test']} test, "
          f"{counts['unlabelled']} unlabelled songs of {args.seconds:g} s at {args.sample_rate} Hz")
    return 0


if __name__ == "__main__":
    sys.exit(main())
