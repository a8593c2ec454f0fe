"""A development corpus of procedurally composed songs rendered with sampled GM instruments.

Every song is composed as four General MIDI files, one per MUSDB stem, written with ``mido``,
and each file is rendered by FluidSynth (``fluidsynth -ni ... -F stem.wav FONT stem.mid``) with a
Debian soundfont: ``/usr/share/sounds/sf2/TimGM6mb.sf2`` by default (package
``timgm6mb-soundfont``), or ``/usr/share/sounds/sf3/MuseScore_General_Lite.sf3`` (package
``musescore-general-soundfont-small``; about 3 s of loading per stem). The FluidR3 soundfont is
refused: an independent evaluation corpus is rendered with it (from the music21 corpus, which
is not used here either), and this corpus stays disjoint from it.

Composition. Each song draws its own random stream, ``SeedSequence([seed, split, index,
attempt])``, so a song depends only on those and on (seconds, sample_rate, soundfont): the same
seed gives byte-identical files whatever ``--jobs`` is, and unlabelled songs are other songs than
the labelled ones. A song has a style (rock, pop, ballad, funk, waltz, shuffle, electronic,
compound 6/8 or 12/8) that sets the meter (4/4, 3/4, 6/8, 12/8), the tempo range, the swing and
the rhythms of every part; a key (12 roots) and mode (major, minor, dorian, mixolydian); a form
of sections (intro, verse, chorus, bridge) with their own diatonic chord progressions (templates
or random), entered at a random bar, like an excerpt. The stems:

* ``drums``  -- GM kit on MIDI channel 10: style and meter-aware kick/snare/hat/ride grooves per
  section kind, ghost notes, velocity and timing variation, tom/snare fills at section ends and a
  crash on section starts;
* ``bass``   -- GM basses 32-39 (synth bass 38/39 mostly for electronic) in E1-G3: roots,
  fifths, octaves, thirds, passing and chromatic approach notes in style-dependent rhythms;
* ``other``  -- one or two instruments (piano, chromatic percussion, organ, guitar, strings and
  ensembles, brass, synth pads) as pads, rhythmic comping (voice-led chords, power chords) or
  arpeggios;
* ``vocals`` -- a melody in a male or female voice register on GM 52-54 (choir aahs, voice oohs,
  synth voice) or 85 (lead 6 voice): phrases with breaths between them, chord tones on strong
  beats and scale steps between, phrase contours, delayed mod-wheel vibrato.

Each part has a per-song pan (CC10; bass and drums near the centre), reverb send (CC91) and
chorus send (CC93); the reverb room (size, damping, width) is drawn per song and shared by its
stems. FluidSynth renders every stem separately as float WAV at the requested rate (with
reverb and chorus on); then each stem is trimmed/padded to ``seconds * rate`` samples, brought
to a common RMS and a per-song level (-9..0 dB), all stems are scaled together so the mixture
peaks at -6..-1 dBFS, each stem is quantised to int16 and the mixture is the int32 sum of the
int16 stems (checked to fit int16). Stems and mixture are PCM_16 stereo WAV, so the stems sum
*exactly* to the mixture. A silent stem is never written: the song is recomposed (next
``attempt``) or, after a few attempts, the run stops with the song's name.

Layout under OUT (the toy corpus' layout, so the rest of the project reads it unchanged)::

    OUT/musdb/train/train_000/{mixture,drums,bass,other,vocals}.wav
    OUT/musdb/test/test_000/...
    OUT/unlabelled/unlabelled_0000.wav     (mixtures only, PCM_16)
    OUT/midi/<split>/<song>/{drums,bass,other,vocals}.mid + song.json
    OUT/corpus.json                        (parameters + a per-song summary)

``musdb.DB(root=OUT/musdb, is_wav=True)`` reads it (use ``split=None``, see corpora/toy.py).

Caching and safety: every file is written to a temporary name and moved into place
(``os.replace``); a song's ``song.json`` (holding a hash of everything the song depends on) is
written last, so a song whose files exist with a matching ``song.json`` is not rendered again and a
song interrupted half-way is redone. A finished corpus with the same parameters is reused; a
folder holding a corpus made with other parameters is refused unless ``--overwrite``.

Speed, measured on this project's 2-core CPU machine (TimGM6mb, 20 s songs, ``--jobs 2``, while
other jobs loaded the machine, load average 4-13, so these are upper bounds): 0.55 s of wall time
per song at 16 kHz (36x real time; 2 hours = 360 songs in about 3.5 minutes) and 1.1 s per song
at 44.1 kHz (18x real time). FluidSynth dominates: per stem it costs ~0.05-0.12 s of CPU at 16 kHz
and idles about as long again, which is why a song's four stems render side by side; it also
renders ~2 s past the last MIDI event (its player's release wait). Reverb and chorus cost little
(< 10 %); composing (mido) and mixing in Python take ~0.1 s per song. MuseScore_General_Lite.sf3
costs ~3 s of loading per stem (two 20 s songs took 39 s under the same load).
"""
import argparse
import hashlib
import json
import logging
import math
import os
import shutil
import sys
import tempfile
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from ..data.corpus_layout import SOURCES, SPLITS, reuse_or_clear, song_names, song_paths
from ..fileio import (CommandError, atomic_write_bytes, atomic_write_json, atomic_write_wav,
                      prints_command_errors, write_error)
from .processes import map_jobs, run_side_by_side

logger = logging.getLogger(__name__)

MIDI_VERSION = 1  # bump when composition or rendering changes, so old corpora are not reused
DEFAULT_SOUNDFONT = "/usr/share/sounds/sf2/TimGM6mb.sf2"
LITE_SOUNDFONT = "/usr/share/sounds/sf3/MuseScore_General_Lite.sf3"
SOUNDFONT_PACKAGES = {DEFAULT_SOUNDFONT: "timgm6mb-soundfont", LITE_SOUNDFONT: "musescore-general-soundfont-small"}
FLUIDSYNTH_ENV = "PAHUBERT_FLUIDSYNTH"
MAX_ATTEMPTS = 4  # recompositions of a song whose render has a silent stem
TPB = 480  # MIDI ticks per quarter note
STEP = TPB // 4  # one sixteenth note
SILENT_RMS = 1e-4  # float RMS of a FluidSynth render below which a stem counts as silent
MIN_SUNG_FRACTION = 0.1  # vocals must sing at least this fraction of the song (else recompose)

NOTE_NAMES = ["C", "C#", "D", "D#", "E", "F", "F#", "G", "G#", "A", "A#", "B"]
MODES = {"major": [0, 2, 4, 5, 7, 9, 11], "minor": [0, 2, 3, 5, 7, 8, 10],
         "dorian": [0, 2, 3, 5, 7, 9, 10], "mixolydian": [0, 2, 4, 5, 7, 9, 10]}
MODE_WEIGHTS = {"major": 0.45, "minor": 0.3, "dorian": 0.12, "mixolydian": 0.13}
# progressions as 0-based scale degrees of the song's mode
PROGRESSIONS = {
    "major": [[0, 4, 5, 3], [0, 5, 3, 4], [0, 3, 4, 3], [5, 3, 0, 4], [0, 3, 0, 4], [1, 4, 0, 0],
              [0, 0, 3, 4], [0, 2, 3, 4], [3, 4, 0, 0], [0, 4, 3, 4]],
    "minor": [[0, 5, 2, 6], [0, 3, 4, 0], [0, 6, 5, 6], [0, 3, 6, 2], [0, 5, 3, 4], [0, 3, 0, 4],
              [0, 5, 6, 0], [0, 0, 5, 6]],
    "dorian": [[0, 3, 0, 3], [0, 3, 6, 0], [0, 1, 0, 3], [0, 6, 3, 0], [0, 0, 3, 3]],
    "mixolydian": [[0, 6, 3, 0], [0, 6, 3, 3], [0, 3, 6, 0], [0, 4, 6, 3], [0, 0, 6, 3]],
}
# style: (weight, meters, tempo range of the quarter note)
STYLES = {
    "rock": (0.17, ["4/4"], (100, 160)),
    "pop": (0.17, ["4/4"], (90, 125)),
    "ballad": (0.11, ["4/4"], (66, 92)),
    "funk": (0.11, ["4/4"], (88, 118)),
    "waltz": (0.08, ["3/4"], (110, 170)),
    "shuffle": (0.1, ["4/4"], (80, 130)),
    "electronic": (0.13, ["4/4"], (115, 140)),
    "compound": (0.13, ["6/8", "12/8"], (90, 150)),
}
METER_STEPS = {"4/4": 16, "3/4": 12, "6/8": 12, "12/8": 24}  # sixteenth steps per bar
METER_SIG = {"4/4": (4, 4), "3/4": (3, 4), "6/8": (6, 8), "12/8": (12, 8)}
FORM = ["intro", "verse", "chorus", "verse", "chorus", "bridge", "chorus", "chorus", "verse", "chorus"]

# GM drum notes
KICK, SIDE, SNARE, CLAP, CHH, PHH, OHH, CRASH, RIDE, BELL, TAMB, CRASH2 = \
    36, 37, 38, 39, 42, 44, 46, 49, 51, 53, 54, 57
TOMS = [50, 48, 47, 45, 43, 41]
BASS_PROGRAMS = {"rock": [33, 34, 32, 35, 33], "pop": [33, 32, 35, 34, 32], "ballad": [32, 33, 35],
                 "funk": [33, 36, 37, 36], "waltz": [32, 33, 35], "shuffle": [32, 33, 32, 34],
                 "electronic": [38, 39, 38, 39, 33], "compound": [32, 33, 35]}
VOCAL_PROGRAMS = [52, 52, 53, 53, 54, 85]
# (role, programs) options per style for the "other" stem
OTHER_ROLES = {
    "rock": [("power", [29, 30, 29]), ("comp", [0, 1, 16, 17, 27, 29]), ("pad", [48, 49, 16, 19])],
    "pop": [("comp", [0, 1, 4, 5, 24, 25, 27]), ("arp", [0, 4, 8, 11, 24, 46]),
            ("pad", [48, 49, 50, 88, 89, 91, 95])],
    "ballad": [("arp", [0, 1, 4, 24, 46, 8, 11]), ("pad", [48, 49, 50, 51, 88, 89, 92, 94]),
               ("comp", [0, 1, 4, 2])],
    "funk": [("comp", [7, 28, 27, 4, 5, 16]), ("stab", [61, 62, 56, 57, 7]), ("pad", [16, 17, 89])],
    "waltz": [("comp", [0, 21, 22, 1, 24, 46]), ("pad", [48, 49, 40, 41, 42, 21]), ("arp", [0, 46, 24, 10])],
    "shuffle": [("comp", [16, 17, 18, 0, 2, 3, 27]), ("pad", [16, 19, 48]), ("stab", [61, 56, 65])],
    "electronic": [("pad", [88, 89, 90, 91, 94, 95, 50, 51]), ("arp", [8, 11, 12, 13, 4, 5, 81, 80]),
                   ("stab", [4, 5, 88, 90, 62])],
    "compound": [("arp", [24, 25, 0, 46, 8, 11]), ("pad", [48, 49, 89, 19]), ("comp", [0, 1, 24, 25])],
}


class MidiCorpusError(RuntimeError):
    """A problem with the environment (FluidSynth, soundfont) or a render; the message says what."""


# --------------------------------------------------------------------------- small helpers

def _choice(rng, options):
    return options[int(rng.integers(len(options)))]


def _weighted(rng, weights: Dict[str, float]) -> str:
    keys = list(weights)
    p = np.array([weights[k] for k in keys], dtype=np.float64)
    return keys[int(rng.choice(len(keys), p=p / p.sum()))]


# --------------------------------------------------------------------------- the song plan

class Song:
    """Style, meter, tempo, key, form and chords shared by all stems of one song.

    Time is counted in sixteenth-note steps (``STEP`` = 120 ticks at 480 ticks per quarter);
    ``bars`` lists for every bar its section kind, position in the section and the chords
    ``[(start_step, end_step, chord)]``; a chord is ``{"root": pc, "pcs": [pcs...], "degree": d}``.
    """

    def __init__(self, rng, seconds: float):
        self.style = _weighted(rng, {k: v[0] for k, v in STYLES.items()})
        _, meters, (lo, hi) = STYLES[self.style]
        self.meter = _choice(rng, meters)
        self.steps = METER_STEPS[self.meter]
        self.compound = self.meter in ("6/8", "12/8")
        self.bpm = float(rng.uniform(lo, hi))  # quarter notes per minute
        self.key = int(rng.integers(12))
        self.mode = _weighted(rng, MODE_WEIGHTS)
        self.scale = [(self.key + i) % 12 for i in MODES[self.mode]]
        self.swing = 0.0  # delay of off-beat eighths (shuffle) or sixteenths (funk), in steps
        if self.style == "shuffle":
            self.swing = 2.0 / 3.0  # triplet feel: the off-beat eighth at 2/3 of the beat
        elif self.style == "funk":
            self.swing = float(rng.choice([0.0, rng.uniform(0.1, 0.3)]))
        elif self.style in ("pop", "rock") and rng.random() < 0.15:
            self.swing = float(rng.uniform(0.1, 0.25))
        self.sevenths = bool(rng.random() < (0.5 if self.style in ("funk", "shuffle", "ballad") else 0.15))
        self.seconds_per_step = 60.0 / self.bpm / 4
        bar_seconds = self.steps * self.seconds_per_step
        need = int(math.ceil(seconds / bar_seconds)) + 2  # bars to cover the excerpt, plus a tail
        # progressions per section kind
        if self.steps == 16 and self.bpm < 100 and rng.random() < 0.3:
            chords_per_bar = 2.0
        elif self.bpm > 130 and rng.random() < 0.5:
            chords_per_bar = 0.5
        else:
            chords_per_bar = 1.0
        self.chords_per_bar = chords_per_bar
        progs = {}
        for kind in ("intro", "verse", "chorus", "bridge"):
            if kind == "intro" and rng.random() < 0.6:
                progs[kind] = None  # filled below: intro plays the verse's chords
                continue
            progs[kind] = self._progression(rng)
        progs["intro"] = progs["intro"] or progs["verse"]
        self.progressions = progs
        # form: enter the cycle at a random section and a random bar of it; an intro (no
        # vocals) only opens the excerpt when it takes at most a third of it
        bars = []
        pos = int(rng.integers(0, 6))
        intro_bars = 4 if 4 * bar_seconds <= seconds / 3 else 2
        if pos == 0 and 2 * bar_seconds > seconds / 3:
            pos = 1
        start_bar = None
        while len(bars) < need + (start_bar or 0):
            kind = FORM[pos % len(FORM)]
            length = {"intro": intro_bars, "bridge": 4}.get(kind, _choice(rng, [4, 8, 8]))
            prog = progs[kind]
            for b in range(length):
                bars.append((kind, b, length, self._bar_chords(prog, b)))
            if start_bar is None:
                start_bar = int(rng.integers(0, length)) if kind != "intro" else 0
            pos += 1
        self.bars = bars[start_bar:start_bar + need]
        self.first_section = self.bars[0][0]

    def _triad(self, degree: int) -> dict:
        count = 4 if self.sevenths else 3
        pcs = [self.scale[(degree + 2 * i) % 7] for i in range(count)]
        return {"root": pcs[0], "pcs": pcs, "degree": degree}

    def _consonant(self, degree: int) -> bool:
        return (self.scale[(degree + 4) % 7] - self.scale[degree]) % 12 == 7

    def _progression(self, rng) -> List[int]:
        if rng.random() < 0.7:
            prog = list(_choice(rng, PROGRESSIONS[self.mode]))
        else:  # a random diatonic progression without diminished chords
            allowed = [d for d in range(7) if self._consonant(d)]
            prog = [0] + [int(_choice(rng, allowed)) for _ in range(3)]
            while len(set(prog)) < 2:
                prog[-1] = int(_choice(rng, allowed))
        if rng.random() < 0.2:  # rotate: start a section elsewhere in the cycle
            k = int(rng.integers(1, 4))
            prog = prog[k:] + prog[:k]
        return prog

    def _bar_chords(self, prog: List[int], bar_in_section: int) -> List[Tuple[int, int, dict]]:
        if self.chords_per_bar == 2.0:
            i = 2 * bar_in_section
            half = self.steps // 2
            return [(0, half, self._triad(prog[i % len(prog)])),
                    (half, self.steps, self._triad(prog[(i + 1) % len(prog)]))]
        per = 1 if self.chords_per_bar == 1.0 else 2
        return [(0, self.steps, self._triad(prog[(bar_in_section // per) % len(prog)]))]

    def tick(self, bar: int, step: float) -> int:
        """Absolute MIDI tick of ``step`` (sixteenths, may be fractional) in ``bar``, with swing."""
        s = float(step)
        if self.swing and not self.compound:
            whole = int(math.floor(s))
            if self.style == "shuffle" and whole % 4 == 2 and whole == s:
                s += self.swing
            elif self.style != "shuffle" and whole % 2 == 1 and whole == s:
                s += self.swing
        return int(round((bar * self.steps + s) * STEP))

    def chord_at(self, bar: int, step: float) -> dict:
        bar = min(max(bar, 0), len(self.bars) - 1)
        for start, end, chord in self.bars[bar][3]:
            if start <= step < end:
                return chord
        return self.bars[bar][3][-1][2]

    def describe(self) -> dict:
        def names(prog):
            return [int(d) + 1 for d in prog]
        return {"style": self.style, "meter": self.meter, "bpm": round(self.bpm, 2),
                "key": NOTE_NAMES[self.key], "mode": self.mode, "swing": round(self.swing, 3),
                "sevenths": self.sevenths, "chords_per_bar": self.chords_per_bar,
                "progressions": {k: names(v) for k, v in self.progressions.items()},
                "sections": _runs([b[0] for b in self.bars])}


def _runs(kinds: Sequence[str]) -> List[str]:
    out = []
    for k in kinds:
        if out and out[-1][0] == k:
            out[-1][1] += 1
        else:
            out.append([k, 1])
    return [f"{k}x{n}" for k, n in out]


def place(pc: int, low: int) -> int:
    """The MIDI note of pitch class ``pc`` in [low, low + 12)."""
    return low + (pc - low) % 12


# --------------------------------------------------------------------------- MIDI writing

class Part:
    """Notes and controller events of one stem, turned into a type-1 MIDI file."""

    def __init__(self, song: Song):
        self.song = song
        self.notes: List[Tuple[int, int, int, int, int]] = []  # (tick, dur, channel, note, vel)
        self.events: List[Tuple[int, int, str, dict]] = []  # (tick, order, type, kwargs)

    def note(self, tick: int, dur: int, channel: int, note: int, vel: int) -> None:
        if dur > 0 and 0 <= note <= 127:
            self.notes.append((max(int(tick), 0), max(int(dur), 1), channel, int(note),
                               int(min(max(vel, 1), 127))))

    def control(self, tick: int, channel: int, control: int, value: int) -> None:
        self.events.append((max(int(tick), 0), 1, "control_change",
                            dict(channel=channel, control=control, value=int(min(max(value, 0), 127)))))

    def setup(self, channel: int, program: Optional[int], pan: float, reverb: int, chorus: int,
              volume: int = 100) -> None:
        if program is not None:
            self.events.append((0, 0, "program_change", dict(channel=channel, program=int(program))))
        self.control(0, channel, 7, volume)
        self.control(0, channel, 10, int(round(64 + 63 * pan)))
        self.control(0, channel, 91, reverb)
        self.control(0, channel, 93, chorus)
        self.control(0, channel, 11, 127)

    def midi_bytes(self, end_tick: int) -> bytes:
        """The part as a type-1 MIDI file; notes starting at or after ``end_tick`` are dropped and
        the rest end by ``end_tick`` (the excerpt is cut there: rendering past it is wasted)."""
        import io

        import mido

        num, den = METER_SIG[self.song.meter]
        mid = mido.MidiFile(type=1, ticks_per_beat=TPB)
        conductor = mido.MidiTrack()
        conductor.append(mido.MetaMessage("set_tempo", tempo=int(round(60e6 / self.song.bpm)), time=0))
        conductor.append(mido.MetaMessage("time_signature", numerator=num, denominator=den, time=0))
        conductor.append(mido.MetaMessage("end_of_track", time=end_tick))
        mid.tracks.append(conductor)
        timeline = []  # (tick, order, note id, message); note-offs sort before note-ons
        for tick, order, kind, kw in self.events:
            if tick < end_tick:
                timeline.append((tick, order, -1, mido.Message(kind, **kw)))
        for i, (tick, dur, ch, note, vel) in enumerate(sorted(self.notes)):
            if tick >= end_tick:
                continue
            timeline.append((tick, 3, i, mido.Message("note_on", channel=ch, note=note, velocity=vel)))
            timeline.append((min(tick + dur, end_tick), 2, i,
                             mido.Message("note_off", channel=ch, note=note, velocity=0)))
        for ch in sorted({n[2] for n in self.notes}):  # all sound off: FluidSynth stops at silence
            timeline.append((end_tick, 4, -1, mido.Message("control_change", channel=ch, control=120, value=0)))
        timeline.sort(key=lambda e: (e[0], e[1], e[2]))
        track = mido.MidiTrack()
        now = 0
        sounding: Dict[Tuple[int, int], int] = {}  # (channel, note) -> id of the note sounding
        for tick, _, i, msg in timeline:
            if msg.type == "note_on":
                key = (msg.channel, msg.note)
                if key in sounding:  # re-struck while sounding: end the old note here
                    track.append(mido.Message("note_off", channel=msg.channel, note=msg.note,
                                              velocity=0, time=tick - now))
                    now = tick
                sounding[key] = i
            elif msg.type == "note_off":
                key = (msg.channel, msg.note)
                if sounding.get(key) != i:  # that note was already ended by a re-strike
                    continue
                del sounding[key]
            track.append(msg.copy(time=tick - now))
            now = tick
        track.append(mido.MetaMessage("end_of_track", time=max(end_tick - now, 0)))
        mid.tracks.append(track)
        buf = io.BytesIO()
        mid.save(file=buf)
        return buf.getvalue()


def _humanise(rng, tick: int, spread: float) -> int:
    return int(round(tick + rng.normal(0, spread))) if spread else tick


def _section_energy(kind: str) -> int:
    return {"intro": -12, "verse": -4, "chorus": 8, "bridge": 0}[kind]


# --------------------------------------------------------------------------- drums

def _groove(song: Song, rng, kind: str) -> Dict[int, List[Tuple[float, int]]]:
    """One bar of drum hits {note: [(step, velocity), ...]} for a section kind."""
    st = song.style
    g: Dict[int, List[Tuple[float, int]]] = {}

    def add(note, steps, vel):
        g.setdefault(note, []).extend((float(s), int(vel)) for s in steps)

    chorus = kind == "chorus"
    hat = RIDE if (chorus and rng.random() < 0.4) else CHH
    if song.meter == "4/4":
        if st == "electronic":
            add(KICK, [0, 4, 8, 12], 110)
            add(_choice(rng, [CLAP, SNARE, CLAP]), [4, 12], 105)
            add(OHH, [2, 6, 10, 14], 80)
            if rng.random() < 0.7:
                add(CHH, [s for s in range(16) if s % 4 in (1, 3)], 55)
        elif st == "funk":
            add(KICK, _choice(rng, [[0, 3, 10], [0, 6, 10, 11], [0, 3, 7, 10], [0, 2, 7, 10, 13]]), 105)
            add(SNARE, [4, 12], 112)
            ghosts = [s for s in (1, 3, 6, 7, 9, 11, 14, 15) if rng.random() < 0.35]
            add(SNARE, ghosts, 38)
            add(hat, range(16), 60)
            if rng.random() < 0.5:
                add(OHH, [_choice(rng, [6, 14])], 80)
        elif st == "shuffle":
            add(KICK, _choice(rng, [[0, 8], [0, 6, 8], [0, 8, 14]]), 100)
            add(SNARE, [4, 12], 105)
            add(RIDE if rng.random() < 0.5 else hat, [0, 2, 4, 6, 8, 10, 12, 14], 72)
        elif st == "ballad":
            add(KICK, _choice(rng, [[0, 8], [0, 10], [0, 7, 8]]), 90)
            add(SIDE if kind != "chorus" else SNARE, [4, 12], 85)
            add(hat, _choice(rng, [range(0, 16, 2), range(16)]), 50)
        else:  # rock, pop
            kicks = _choice(rng, [[0, 8], [0, 8, 10], [0, 6, 8], [0, 8, 11], [0, 3, 8, 10], [0, 7, 8, 10]])
            add(KICK, kicks, 105)
            add(SNARE, [4, 12], 110)
            if st == "pop" and rng.random() < 0.4:
                add(hat, range(16), 55)
            else:
                add(hat, range(0, 16, 2), 70)
            if chorus and rng.random() < 0.5:
                add(OHH, [14], 78)
            if st == "pop" and rng.random() < 0.3:
                add(TAMB, [4, 12], 60)
    elif song.meter == "3/4":
        add(KICK, [0] if rng.random() < 0.6 else [0, 8], 95)
        add(_choice(rng, [SIDE, SNARE, PHH]), [4, 8], 70)
        add(hat if rng.random() < 0.6 else RIDE, _choice(rng, [[0, 4, 8], range(0, 12, 2)]), 60)
    elif song.meter == "6/8":
        add(KICK, _choice(rng, [[0], [0, 10], [0, 4]]), 100)
        add(_choice(rng, [SNARE, SIDE]), [6], 100)
        add(hat, range(0, 12, 2), 65)
    else:  # 12/8
        add(KICK, _choice(rng, [[0, 12], [0, 10, 12], [0, 12, 22]]), 100)
        add(SNARE, [6, 18], 105)
        add(hat if rng.random() < 0.6 else RIDE, range(0, 24, 2), 62)
    if kind == "intro":  # lighter: drop the snare and most kicks
        g.pop(SNARE, None), g.pop(CLAP, None), g.pop(SIDE, None)
        g[KICK] = g.get(KICK, [(0.0, 90)])[:1]
    return g


def _fill(song: Song, rng, part: Part, bar: int, energy: int) -> float:
    """Write a fill at the end of ``bar``; returns the step where it starts."""
    beat = 6 if song.compound else 4
    length = beat * int(rng.choice([1, 2])) if song.steps >= 12 else beat
    start = song.steps - length
    unit = 2 if (song.compound or song.bpm > 135 or rng.random() < 0.3) else 1
    voices = [SNARE] + TOMS
    n_hits = length // unit
    path = _choice(rng, ["down", "snare_then_toms", "random"])
    for i in range(n_hits):
        if path == "down":
            note = TOMS[min(i * len(TOMS) // max(n_hits, 1), len(TOMS) - 1)]
        elif path == "snare_then_toms":
            note = SNARE if i < n_hits // 2 else TOMS[min((i - n_hits // 2) * 2, len(TOMS) - 1)]
        else:
            note = int(_choice(rng, voices))
        vel = 70 + 40 * i / max(n_hits - 1, 1) + energy + rng.normal(0, 6)
        part.note(_humanise(rng, song.tick(bar, start + i * unit), 4), STEP * unit, 9, note, int(vel))
    part.note(song.tick(bar, start), STEP, 9, KICK, 90 + energy)
    return float(start)


def drums(song: Song, rng, mix: dict) -> Tuple[Part, dict]:
    part = Part(song)
    part.setup(9, None, pan=mix["pan"], reverb=mix["reverb"], chorus=0)
    grooves = {k: _groove(song, rng, k) for k in ("intro", "verse", "chorus", "bridge")}
    spread = 0.0 if song.style == "electronic" else float(rng.uniform(2, 6))
    fills = 0
    for b, (kind, pos, length, _) in enumerate(song.bars):
        energy = _section_energy(kind)
        last = pos == length - 1
        fill_from = song.steps + 1.0
        if (last and kind != "intro" and rng.random() < 0.8) or (pos % 4 == 3 and rng.random() < 0.2):
            fill_from = _fill(song, rng, part, b, energy)
            fills += 1
        if pos == 0 or b == 0:
            part.note(song.tick(b, 0), 4 * STEP, 9, _choice(rng, [CRASH, CRASH2]), 100 + energy)
            part.note(song.tick(b, 0), STEP, 9, KICK, 105 + energy)
        for note, hits in grooves[kind].items():
            for step, vel in hits:
                if step >= fill_from:  # the fill replaces the groove there
                    continue
                accent = 8 if step % 4 == 0 else 0
                v = vel + accent + energy + rng.normal(0, 7)
                part.note(_humanise(rng, song.tick(b, step), spread), STEP, 9, note, int(v))
        if rng.random() < 0.2 and song.meter == "4/4":  # an extra syncopated kick
            part.note(song.tick(b, _choice(rng, [3, 7, 11, 14])), STEP, 9, KICK, 80 + energy)
    return part, {"fills": fills}


# --------------------------------------------------------------------------- bass

# patterns: (step, length in steps, kind) with kinds R root, 5 fifth, 8 octave, 3 third,
# 6 sixth, 7 seventh, A approach to the next chord's root, P passing tone toward it
BASS_PATTERNS = {
    "rock": [[(s, 2, "R") for s in range(0, 14, 2)] + [(14, 2, "A")],
             [(0, 2, "R"), (2, 2, "R"), (4, 2, "R"), (6, 2, "8"), (8, 2, "R"), (10, 2, "R"), (12, 2, "5"), (14, 2, "A")],
             [(0, 3, "R"), (3, 3, "R"), (6, 2, "R"), (8, 3, "R"), (11, 3, "5"), (14, 2, "A")]],
    "pop": [[(0, 6, "R"), (6, 2, "R"), (8, 4, "5"), (12, 4, "A")], [(0, 8, "R"), (8, 8, "5")],
            [(0, 3, "R"), (3, 3, "R"), (6, 2, "5"), (8, 4, "R"), (12, 2, "8"), (14, 2, "A")]],
    "ballad": [[(0, 8, "R"), (8, 8, "5")], [(0, 12, "R"), (12, 4, "P")], [(0, 16, "R")],
               [(0, 6, "R"), (6, 2, "5"), (8, 8, "8")]],
    "funk": [[(0, 1, "R"), (3, 1, "8"), (4, 1, "R"), (6, 2, "R"), (10, 1, "R"), (11, 1, "8"), (14, 1, "7"), (15, 1, "A")],
             [(0, 2, "R"), (2, 1, "8"), (5, 1, "R"), (7, 1, "5"), (8, 1, "R"), (10, 2, "8"), (13, 1, "3"), (14, 2, "A")],
             [(0, 1, "R"), (1, 1, "R"), (3, 1, "8"), (6, 1, "R"), (8, 1, "5"), (10, 1, "R"), (12, 1, "8"), (14, 1, "P")]],
    "electronic": [[(s, 2, "R") for s in (2, 6, 10, 14)], [(s, 1, "R") for s in range(16)],
                   [(0, 3, "R"), (3, 3, "R"), (6, 2, "8"), (8, 3, "R"), (11, 3, "R"), (14, 2, "8")],
                   [(0, 2, "R"), (2, 2, "8"), (4, 2, "R"), (6, 2, "8"), (8, 2, "R"), (10, 2, "8"), (12, 2, "R"), (14, 2, "8")]],
    "shuffle": [[(0, 4, "R"), (4, 4, "3"), (8, 4, "5"), (12, 4, "A")], [(0, 4, "R"), (4, 4, "5"), (8, 4, "8"), (12, 4, "A")],
                [(0, 2, "R"), (2, 2, "R"), (4, 2, "3"), (6, 2, "3"), (8, 2, "5"), (10, 2, "5"), (12, 2, "6"), (14, 2, "6")]],
    "waltz": [[(0, 4, "R"), (8, 4, "5")], [(0, 8, "R"), (8, 4, "5")], [(0, 12, "R")], [(0, 4, "R"), (4, 4, "5"), (8, 4, "A")]],
    "6/8": [[(0, 6, "R"), (6, 6, "5")], [(0, 4, "R"), (4, 2, "R"), (6, 4, "5"), (10, 2, "A")], [(0, 12, "R")]],
    "12/8": [[(0, 12, "R"), (12, 12, "5")], [(0, 6, "R"), (6, 6, "5"), (12, 6, "8"), (18, 6, "A")],
             [(0, 4, "R"), (4, 2, "R"), (6, 6, "5"), (12, 4, "R"), (16, 2, "R"), (18, 6, "A")]],
}


def bass(song: Song, rng, mix: dict) -> Tuple[Part, dict]:
    part = Part(song)
    program = int(_choice(rng, BASS_PROGRAMS[song.style]))
    part.setup(0, program, pan=mix["pan"], reverb=mix["reverb"], chorus=mix["chorus"])
    key = song.meter if song.compound else song.style
    patterns = BASS_PATTERNS[key]
    by_kind = {k: patterns[int(rng.integers(len(patterns)))] for k in ("intro", "verse", "chorus", "bridge")}
    low = int(rng.integers(28, 32))  # the root sits in [low, low + 12): E1..D#2 up to G1..F#2
    legato = 0.5 if song.style in ("funk", "electronic") else float(rng.uniform(0.8, 0.95))
    scale_notes = [n for n in range(24, 60) if n % 12 in song.scale]
    spread = 0.0 if song.style == "electronic" else 4.0
    for b, (kind, pos, length, _) in enumerate(song.bars):
        pattern = by_kind[kind]
        if song.style == "waltz" and b % 2 == 1:  # alternate root/fifth bar to bar
            pattern = [(s, l, "5" if k == "R" and s == 0 else k) for s, l, k in pattern]
        for step, dur, what in pattern:
            chord = song.chord_at(b, step)
            root = place(chord["root"], low)
            nxt = song.chord_at(b + (step + dur) // song.steps, (step + dur) % song.steps)
            nroot = place(nxt["root"], low)
            third = root + (chord["pcs"][1] - chord["root"]) % 12
            fifth = root + (chord["pcs"][2] - chord["root"]) % 12
            if what == "R":
                note = root
            elif what == "5":
                note = fifth if rng.random() < 0.85 else fifth - 12
            elif what == "8":
                note = root + 12
            elif what == "3":
                note = third
            elif what == "6":
                note = root + 9
            elif what == "7":
                note = root + ((chord["pcs"][3] - chord["root"]) % 12 if len(chord["pcs"]) > 3 else 10)
            elif what == "A":
                if nroot == root:
                    note = fifth if rng.random() < 0.5 else root + 12
                elif rng.random() < 0.5:
                    note = nroot + _choice(rng, [-1, 1])  # chromatic approach
                else:
                    below = [n for n in scale_notes if n < nroot]
                    note = below[-1] if below else nroot - 2
            else:  # P: a scale tone between this root and the next
                between = [n for n in scale_notes if min(root, nroot) < n < max(root, nroot)]
                note = _choice(rng, between) if between else fifth
            while note > 50:  # keep most of the energy below 300 Hz: nothing above D3
                note -= 12
            note = int(max(note, 28))
            vel = 84 + (8 if step % 4 == 0 else 0) + _section_energy(kind) // 2 + rng.normal(0, 6)
            if song.style == "funk" and what in ("8", "7") and rng.random() < 0.5:
                vel += 10
            part.note(_humanise(rng, song.tick(b, step), spread), int(dur * STEP * legato), 0, note, int(vel))
    return part, {"program": program, "low": low}


# --------------------------------------------------------------------------- other

def _voicing(pcs: Sequence[int], low: int, high: int, prev: Optional[List[int]]) -> List[int]:
    """Close voicing of ``pcs`` between low and high, nearest the previous voicing."""
    candidates = []
    for inv in range(len(pcs)):
        order = list(pcs[inv:]) + list(pcs[:inv])
        for base in range(low, high):
            if base % 12 != order[0]:
                continue
            notes = [base]
            for pc in order[1:]:
                n = notes[-1] + 1
                while n % 12 != pc:
                    n += 1
                notes.append(n)
            if notes[-1] <= high:
                candidates.append(notes)
    if not candidates:
        return [place(pc, low) for pc in pcs]
    if prev is None:
        mid = (low + high) / 2
        return min(candidates, key=lambda c: abs(np.mean(c) - mid))
    return min(candidates, key=lambda c: sum(min(abs(n - p) for p in prev) for n in c))


COMP_RHYTHMS = {
    "rock": [[(s, 2) for s in range(0, 16, 2)], [(0, 3), (3, 3), (6, 2), (8, 3), (11, 3), (14, 2)], [(0, 8), (8, 8)]],
    "pop": [[(0, 8), (8, 8)], [(0, 4), (4, 4), (8, 4), (12, 4)], [(0, 3), (3, 3), (6, 4), (10, 2), (12, 4)]],
    "ballad": [[(0, 8), (8, 8)], [(0, 16)], [(0, 4), (4, 4), (8, 4), (12, 4)]],
    "funk": [[(0, 1), (3, 1), (6, 1), (7, 1), (10, 1), (12, 1), (14, 1)], [(2, 1), (4, 1), (7, 1), (10, 1), (11, 1), (14, 1)],
             [(1, 1), (3, 1), (5, 1), (8, 1), (9, 1), (11, 1), (13, 1), (15, 1)]],
    "waltz": [[(4, 3), (8, 3)], [(0, 4), (4, 3), (8, 3)]],
    "shuffle": [[(0, 4), (4, 4), (8, 4), (12, 4)], [(2, 2), (6, 2), (10, 2), (14, 2)], [(0, 3), (6, 2), (8, 3), (14, 2)]],
    "electronic": [[(2, 2), (6, 2), (10, 2), (14, 2)], [(0, 3), (3, 3), (6, 4), (10, 3), (13, 3)]],
    "6/8": [[(0, 6), (6, 6)], [(0, 4), (4, 2), (6, 4), (10, 2)]],
    "12/8": [[(0, 6), (6, 6), (12, 6), (18, 6)], [(0, 12), (12, 12)]],
}


def _other_instrument(song: Song, rng, part: Part, channel: int, role: str, program: int, mix: dict) -> dict:
    pan = float(np.clip(mix["pan"] + (rng.uniform(-0.3, 0.3) if channel else 0.0), -0.9, 0.9))
    part.setup(channel, program, pan=pan, reverb=mix["reverb"], chorus=mix["chorus"])
    key = song.meter if song.compound else song.style
    if role == "power":  # power chords low on a distorted guitar
        low, high = 40, 60
    elif role == "pad":
        low, high = int(rng.integers(50, 58)), 79
    elif role == "arp":
        low, high = int(rng.integers(52, 62)), 88
    else:
        low, high = int(rng.integers(52, 60)), 78
    rhythms = COMP_RHYTHMS[key]
    if song.style == "waltz":
        rhythms = COMP_RHYTHMS["waltz"]
    rhythm_by_kind = {k: rhythms[int(rng.integers(len(rhythms)))] for k in ("intro", "verse", "chorus", "bridge")}
    arp_unit = 2 if (song.compound or song.bpm > 110 or rng.random() < 0.5) else 1
    arp_shape = _choice(rng, ["up", "updown", "random", "alberti"])
    staccato = role == "stab" or song.style == "funk"
    prev = None
    base_vel = {"pad": 62, "arp": 72, "comp": 78, "power": 92, "stab": 88}[role]
    for b, (kind, pos, length, chords) in enumerate(song.bars):
        energy = _section_energy(kind)
        for start, end, chord in chords:
            voicing = _voicing(chord["pcs"], low, high, prev)
            prev = voicing
            if role == "power":
                r = place(chord["root"], low)
                voicing = [r, r + 7, r + 12]
            if role == "pad":
                for n in voicing:
                    part.note(song.tick(b, start), (end - start) * STEP - 10, channel, n,
                              int(base_vel + energy + rng.normal(0, 4)))
            elif role == "arp":
                tones = voicing + [n + 12 for n in voicing if n + 12 <= high]
                count = (end - start) // arp_unit
                for i in range(count):
                    if arp_shape == "up":
                        n = tones[i % len(tones)]
                    elif arp_shape == "updown":
                        cyc = tones + tones[-2:0:-1]
                        n = cyc[i % len(cyc)]
                    elif arp_shape == "alberti":
                        n = voicing[[0, 2, 1, 2][i % 4] % len(voicing)]
                    else:
                        n = int(_choice(rng, tones))
                    vel = base_vel + (10 if i % 4 == 0 else 0) + energy + rng.normal(0, 6)
                    part.note(_humanise(rng, song.tick(b, start + i * arp_unit), 3),
                              int(arp_unit * STEP * 1.6), channel, n, int(vel))
            else:  # comp, power, stab: chords in the style's rhythm
                for step, dur in rhythm_by_kind[kind]:
                    if not start <= step < end:
                        continue
                    length_ticks = int(dur * STEP * (0.45 if staccato else 0.9))
                    vel = base_vel + (8 if step % 4 == 0 else 0) + energy + rng.normal(0, 6)
                    t0 = _humanise(rng, song.tick(b, step), 3)
                    strum = 8 if program in range(24, 32) else 0  # guitars: a quick strum
                    for i, n in enumerate(voicing):
                        part.note(t0 + i * strum, length_ticks, channel, n, int(vel))
    return {"role": role, "program": int(program), "pan": round(pan, 2)}


def other(song: Song, rng, mix: dict) -> Tuple[Part, dict]:
    part = Part(song)
    options = OTHER_ROLES[song.style]
    count = 2 if rng.random() < 0.6 else 1
    picks = rng.choice(len(options), size=count, replace=False)
    infos = []
    for channel, i in enumerate(sorted(int(p) for p in picks)):
        role, programs = options[i]
        infos.append(_other_instrument(song, rng, part, channel, role, int(_choice(rng, programs)), mix))
    return part, {"instruments": infos}


# --------------------------------------------------------------------------- vocals

NOTE_LENGTHS = {  # note lengths in sixteenth steps and their weights, per style
    "ballad": ([2, 4, 6, 8], [0.3, 0.4, 0.15, 0.15]),
    "funk": ([1, 2, 3, 4], [0.3, 0.4, 0.15, 0.15]),
    "electronic": ([2, 4, 6], [0.45, 0.4, 0.15]),
    "waltz": ([4, 8, 2], [0.5, 0.25, 0.25]),
    "compound": ([2, 4, 6], [0.45, 0.25, 0.3]),
}


def vocals(song: Song, rng, mix: dict, seconds: float) -> Tuple[Part, dict]:
    part = Part(song)
    program = int(_choice(rng, VOCAL_PROGRAMS))
    part.setup(0, program, pan=mix["pan"], reverb=mix["reverb"], chorus=mix["chorus"])
    female = bool(rng.random() < 0.5)
    low = int(rng.integers(57, 61)) if female else int(rng.integers(47, 52))  # A3.. / B2..
    pool = [n for n in range(low, low + 16) if n % 12 in song.scale]
    lengths, weights = NOTE_LENGTHS.get(song.style, ([2, 2, 4, 6, 1], [0.35, 0.1, 0.3, 0.15, 0.1]))
    weights = np.array(weights) / np.sum(weights)
    total_steps = len(song.bars) * song.steps
    beat = 6 if song.compound else 4
    vib_depth = int(rng.integers(25, 70))
    vib_delay = float(rng.uniform(0.2, 0.35))  # seconds into a note before vibrato
    cursor = 0 if song.first_section != "intro" else sum(1 for b in song.bars if b[0] == "intro") * song.steps
    cursor += int(rng.choice([0, 0, beat // 2, beat]))
    phrases, notes_out, sung_steps = 0, 0, 0
    pos = pool.index(min(pool, key=lambda n: abs(n - (low + 7))))
    while cursor < total_steps:
        bar = cursor // song.steps
        kind = song.bars[min(bar, len(song.bars) - 1)][0]
        if kind == "intro":
            cursor = (bar + 1) * song.steps
            continue
        phrase_len = song.steps * int(rng.choice([1, 2, 2, 4] if song.style != "ballad" else [2, 4]))
        contour = _choice(rng, ["arch", "down", "up", "wave"])
        lift = 2 if kind == "chorus" else 0  # choruses sit higher
        end = min(cursor + phrase_len, total_steps)
        i, first = 0, True
        while cursor < end:
            length = int(rng.choice(lengths, p=weights))
            length = max(1, min(length, end - cursor))
            frac = i / 6.0
            shape = {"arch": math.sin(math.pi * min(frac, 1.0)), "down": 1 - min(frac, 1.0),
                     "up": min(frac, 1.0), "wave": 0.5 + 0.5 * math.sin(2 * math.pi * frac)}[contour]
            target = int(round(2 + lift + 5 * shape))  # in scale steps above the pool centre-low
            step_move = int(np.clip(target - pos, -2, 2)) if not first else 0
            if rng.random() < 0.25:
                step_move += int(rng.choice([-1, 1]))
            pos = int(np.clip(pos + step_move, 0, len(pool) - 1))
            note = pool[pos]
            bar_i, step_i = divmod(cursor, song.steps)
            chord = song.chord_at(bar_i, step_i)
            strong = step_i % beat == 0 or cursor + length >= end
            if strong and note % 12 not in chord["pcs"]:
                tones = [k for k, n in enumerate(pool) if n % 12 in chord["pcs"]]
                if tones:
                    pos = min(tones, key=lambda k: abs(k - pos))
                    note = pool[pos]
            tick = song.tick(bar_i, step_i)
            dur_ticks = length * STEP - int(rng.integers(15, 50))
            vel = 82 + 6 * (pos / max(len(pool) - 1, 1)) + _section_energy(kind) // 2 + rng.normal(0, 5)
            part.note(tick, dur_ticks, 0, note, int(vel))
            dur_s = dur_ticks * song.seconds_per_step / STEP
            if dur_s > vib_delay + 0.1:  # delayed vibrato through the mod wheel (CC1)
                ramp_ticks = int(0.15 / song.seconds_per_step * STEP)
                delay_ticks = int(vib_delay / song.seconds_per_step * STEP)
                for k in range(4):
                    part.control(tick + delay_ticks + k * ramp_ticks // 4, 0, 1, vib_depth * (k + 1) // 4)
                part.control(tick + dur_ticks, 0, 1, 0)
            if tick * song.seconds_per_step / STEP < seconds:
                sung_steps += length
            notes_out += 1
            cursor += length
            i += 1
            first = False
        phrases += 1
        # a breath: from a sixteenth to a bar
        cursor += int(rng.choice([1, 2, beat, beat, 2 * beat, song.steps]))
    return part, {"program": program, "female": female, "low": low, "phrases": phrases, "notes": notes_out,
                  "sung_fraction": round(sung_steps * song.seconds_per_step / seconds, 3)}


# --------------------------------------------------------------------------- composition

def _mix_settings(rng) -> Dict[str, dict]:
    return {
        "drums": {"pan": float(rng.uniform(-0.05, 0.05)), "reverb": int(rng.integers(10, 60)), "chorus": 0,
                  "gain_db": float(rng.uniform(-6, 0))},
        "bass": {"pan": float(rng.uniform(-0.1, 0.1)), "reverb": int(rng.integers(0, 30)),
                 "chorus": int(rng.integers(0, 25)), "gain_db": float(rng.uniform(-8, 0))},
        "other": {"pan": float(rng.uniform(-0.5, 0.5)), "reverb": int(rng.integers(20, 90)),
                  "chorus": int(rng.integers(0, 70)), "gain_db": float(rng.uniform(-9, 0))},
        "vocals": {"pan": float(rng.uniform(-0.15, 0.15)), "reverb": int(rng.integers(30, 100)),
                   "chorus": int(rng.integers(0, 45)), "gain_db": float(rng.uniform(-6, 0))},
    }


def compose_song(seed: int, split: str, index: int, seconds: float, attempt: int = 0
                 ) -> Tuple[Dict[str, bytes], dict]:
    """Compose one song: ``({stem: MIDI file bytes}, info)``; info holds the song's description,
    per-stem details, the mix (levels, pans, sends) and the reverb room for rendering."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {sorted(SPLITS)}, got {split!r}")
    streams = np.random.SeedSequence([seed, SPLITS[split], index, attempt]).spawn(len(SOURCES) + 2)
    rng = np.random.default_rng(streams[0])
    song = Song(rng, seconds)
    mix = _mix_settings(np.random.default_rng(streams[1]))
    info = song.describe()
    info["attempt"] = attempt
    info["reverb_room"] = {"room-size": round(float(rng.uniform(0.2, 0.85)), 3),
                           "damp": round(float(rng.uniform(0.0, 0.6)), 3),
                           "width": round(float(rng.uniform(0.5, 1.0)), 3),
                           "level": round(float(rng.uniform(0.5, 0.9)), 3)}
    info["headroom_db"] = round(float(rng.uniform(1.0, 6.0)), 2)
    end_tick = int(round((seconds + 0.05) / song.seconds_per_step * STEP))
    midis = {}
    for name, stream in zip(SOURCES, streams[2:]):
        srng = np.random.default_rng(stream)
        if name == "vocals":
            part, details = vocals(song, srng, mix[name], seconds)
        else:
            part, details = {"drums": drums, "bass": bass, "other": other}[name](song, srng, mix[name])
        midis[name] = part.midi_bytes(end_tick)
        info[name] = dict(details, **{k: (round(v, 2) if isinstance(v, float) else v) for k, v in mix[name].items()})
    return midis, info


# --------------------------------------------------------------------------- rendering

def find_fluidsynth(fluidsynth: Optional[str] = None) -> str:
    """The FluidSynth executable: ``fluidsynth`` argument, $PAHUBERT_FLUIDSYNTH, or PATH."""
    exe = fluidsynth or os.environ.get(FLUIDSYNTH_ENV) or "fluidsynth"
    found = shutil.which(exe)
    if found is None:
        raise MidiCorpusError(
            f"FluidSynth not found (looked for {exe!r}): install the Debian package fluidsynth "
            f"(apt-get install fluidsynth), or pass --fluidsynth PATH / set {FLUIDSYNTH_ENV}")
    return found


def check_soundfont(soundfont: str) -> str:
    path = os.path.abspath(os.fspath(soundfont))
    if "fluidr3" in os.path.basename(os.path.realpath(path)).lower():
        raise ValueError(f"soundfont {soundfont} is FluidR3, which renders the independent evaluation "
                         f"corpus; use {DEFAULT_SOUNDFONT} or {LITE_SOUNDFONT} to keep this corpus disjoint")
    if not os.path.isfile(path):
        package = SOUNDFONT_PACKAGES.get(path)
        hint = (f"install the Debian package {package} (apt-get install {package})" if package else
                f"install timgm6mb-soundfont ({DEFAULT_SOUNDFONT}) or musescore-general-soundfont-small "
                f"({LITE_SOUNDFONT}) with apt-get, or pass --soundfont PATH")
        raise MidiCorpusError(f"soundfont {path} not found: {hint}")
    return path


def _fluidsynth_cmd(fluidsynth: str, midi_path: str, wav_path: str, sample_rate: int, soundfont: str,
                    room: Optional[dict], gain: float) -> List[str]:
    cmd = [fluidsynth, "-ni", "-q", "-g", str(gain), "-r", str(sample_rate), "-O", "float", "-T", "wav",
           "-R", "1", "-C", "1", "-o", "synth.lock-memory=0", "-o", "synth.cpu-cores=1"]
    for k, v in (room or {}).items():
        cmd += ["-o", f"synth.reverb.{k}={v}"]
    return cmd + ["-F", wav_path, soundfont, midi_path]


def render_midis(pairs: Sequence[Tuple[str, str]], sample_rate: int, soundfont: str, fluidsynth: str,
                 room: Optional[dict] = None, gain: float = 0.4) -> List[np.ndarray]:
    """Render MIDI files with FluidSynth, ``[(midi_path, wav_path), ...]`` -> float audio
    ``(samples, 2)`` each (reverb and chorus on). The processes run side by side: a FluidSynth
    fast render spends about half its wall time waiting, so this halves a song's render time."""
    import soundfile as sf

    cmds = [_fluidsynth_cmd(fluidsynth, midi_path, wav_path, sample_rate, soundfont, room, gain)
            for midi_path, wav_path in pairs]
    results = run_side_by_side(cmds, 600, MidiCorpusError, f"rendering {len(pairs)} MIDI file(s)")
    audio_out = []
    for (midi_path, wav_path), (returncode, stdout, stderr) in zip(pairs, results):
        tail = "\n".join((stderr + stdout).strip().splitlines()[-8:])
        if returncode != 0 or not os.path.isfile(wav_path) or "failed to load" in tail.lower():
            raise MidiCorpusError(f"fluidsynth failed on {midi_path} (exit {returncode}): "
                                  f"{tail or 'no output'}")
        audio, sr = sf.read(wav_path, dtype="float64", always_2d=True)
        if sr != sample_rate:
            raise MidiCorpusError(f"fluidsynth wrote {sr} Hz for {midi_path}, asked for {sample_rate}")
        if audio.shape[1] == 1:
            audio = np.repeat(audio, 2, axis=1)
        audio_out.append(audio[:, :2])
    return audio_out


def mix_stems(rendered: Dict[str, np.ndarray], info: dict, samples: int) -> Dict[str, np.ndarray]:
    """Trim/pad, level and quantise the rendered stems; returns int16 stems and an exact mixture.

    Each stem is brought to a common RMS and its per-song ``gain_db``; one scale for all stems
    puts the float mixture's (or any stem's) peak at ``-headroom_db`` dBFS; the int16 mixture is
    the int32 sum of the int16 stems, checked to fit int16.
    """
    stems = {}
    for name in SOURCES:
        x = rendered[name][:samples]
        if len(x) < samples:
            x = np.concatenate([x, np.zeros((samples - len(x), x.shape[1]))])
        rms = float(np.sqrt(np.mean(x ** 2)))
        stems[name] = x * (0.1 * 10 ** (info[name]["gain_db"] / 20) / rms)
    peak = max(float(np.abs(sum(stems.values())).max()), *(float(np.abs(s).max()) for s in stems.values()))
    target = 10 ** (-info["headroom_db"] / 20)
    for _ in range(10):
        scale = 32767.0 * target / peak
        ints = {k: np.clip(np.round(v * scale), -32767, 32767).astype(np.int16) for k, v in stems.items()}
        mixture = np.zeros((samples, 2), dtype=np.int32)
        for k in SOURCES:
            mixture += ints[k]
        if np.abs(mixture).max() <= 32767:
            ints["mixture"] = mixture.astype(np.int16)
            return ints
        target *= 0.95
    raise AssertionError("int16 mixture does not fit after 10 gain reductions")  # cannot happen


def _song_hash(params: dict, split: str, index: int) -> str:
    blob = json.dumps({"params": params, "split": split, "index": index}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _meta_path(out: str, split: str, name: str) -> str:
    return os.path.join(out, "midi", split, name, "song.json")


def _cached(out: str, split: str, name: str, digest: str) -> Optional[dict]:
    try:
        with open(_meta_path(out, split, name)) as f:
            meta = json.load(f)
    except (OSError, ValueError):
        return None
    if meta.get("hash") == digest and all(os.path.isfile(p) for p in song_paths(out, split, name)):
        return meta["info"]
    return None


def make_song(job) -> Tuple[str, str, dict, bool]:
    """Compose, render and write one song (a process-pool job). Returns (split, name, info, rendered)."""
    out, split, index, name, params, fluidsynth = job
    digest = _song_hash(params, split, index)
    info = _cached(out, split, name, digest)
    if info is not None:
        return split, name, info, False
    meta_path = _meta_path(out, split, name)
    if os.path.exists(meta_path):
        os.remove(meta_path)  # stale: the files are about to change
    seconds, rate = params["seconds"], params["sample_rate"]
    samples = int(round(seconds * rate))
    midi_dir = os.path.dirname(meta_path)
    problems = []
    for attempt in range(MAX_ATTEMPTS):
        midis, info = compose_song(params["seed"], split, index, seconds, attempt)
        if info["vocals"]["sung_fraction"] < MIN_SUNG_FRACTION:
            problems.append(f"attempt {attempt}: vocals sing {info['vocals']['sung_fraction']:.0%} of it")
            continue
        pairs = []
        with tempfile.TemporaryDirectory(prefix="pahubert-midi-") as tmp:
            for stem in SOURCES:
                mid = os.path.join(midi_dir, f"{stem}.mid")
                atomic_write_bytes(mid, midis[stem])
                pairs.append((mid, os.path.join(tmp, f"{stem}.wav")))
            audio = render_midis(pairs, rate, params["soundfont"], fluidsynth, room=info["reverb_room"])
        rendered = dict(zip(SOURCES, audio))
        silent = [s for s in SOURCES
                  if float(np.sqrt(np.mean(rendered[s][:samples] ** 2))) < SILENT_RMS]
        if not silent:
            break
        problems.append(f"attempt {attempt}: silent {', '.join(silent)}")
    else:
        raise MidiCorpusError(f"{split}/{name}: a stem stayed silent in {MAX_ATTEMPTS} compositions "
                              f"({'; '.join(problems)}); does soundfont {params['soundfont']} hold every GM "
                              f"program (see {midi_dir}/*.mid)?")
    ints = mix_stems(rendered, info, samples)
    info["rms_dbfs"] = {k: round(float(20 * np.log10(np.sqrt(np.mean((v / 32768.0) ** 2)) + 1e-12)), 2)
                        for k, v in ints.items()}
    paths = song_paths(out, split, name)
    if split == "unlabelled":
        atomic_write_wav(paths[0], ints["mixture"], rate)
    else:
        for path, key in zip(paths, ("mixture",) + SOURCES):
            atomic_write_wav(path, ints[key], rate)
    atomic_write_json(meta_path, {"hash": digest, "info": info})  # last: marks the song done
    return split, name, info, True


# --------------------------------------------------------------------------- corpus on disk

def unlabelled_count(hours: float, seconds: float) -> int:
    """Songs of ``seconds`` needed for ``hours`` of unlabelled audio: ceil(hours * 3600 / seconds)."""
    return int(math.ceil(hours * 3600 / seconds - 1e-9))


def generate_corpus(out, unlabelled: int = 40, train: int = 8, test: int = 6, seconds: float = 20.0,
                    sample_rate: int = 16000, seed: int = 0, jobs: int = 1, overwrite: bool = False,
                    soundfont: str = DEFAULT_SOUNDFONT, fluidsynth: Optional[str] = None,
                    progress: bool = True, unlabelled_hours: Optional[float] = None) -> dict:
    """Write the corpus under ``out`` (see the module docstring); returns the corpus.json dict,
    with ``"rendered"`` = the number of songs rendered by this call (0 when all were cached)."""
    out = os.fspath(out)
    if os.path.exists(out) and not os.path.isdir(out):
        raise ValueError(f"OUT {out} is a file, not a folder")
    if not (isinstance(seconds, (int, float)) and math.isfinite(seconds) and seconds > 0):
        raise ValueError(f"--seconds must be finite and > 0, got {seconds}")
    if sample_rate % 100 or not 8000 <= sample_rate <= 96000:
        raise ValueError(f"--sample-rate must be a multiple of 100 (labels are 100 Hz) between 8000 "
                         f"and 96000 (FluidSynth's range), got {sample_rate}")
    if unlabelled_hours is not None:
        if not (math.isfinite(unlabelled_hours) and unlabelled_hours >= 0):
            raise ValueError(f"--unlabelled-hours must be finite and >= 0, got {unlabelled_hours}")
        unlabelled = unlabelled_count(unlabelled_hours, seconds)
    for name, value in (("unlabelled", unlabelled), ("train", train), ("test", test)):
        if value < 0:
            raise ValueError(f"--{name} must be >= 0, got {value}")
    if jobs < 1:
        raise ValueError(f"--jobs must be >= 1, got {jobs}")
    soundfont = check_soundfont(soundfont)
    exe = find_fluidsynth(fluidsynth)
    params = {"midi_version": MIDI_VERSION, "unlabelled": int(unlabelled), "train": int(train),
              "test": int(test), "seconds": float(seconds), "sample_rate": int(sample_rate),
              "seed": int(seed), "soundfont": soundfont, "soundfont_bytes": os.path.getsize(soundfont)}
    song_params = {k: params[k] for k in ("midi_version", "seconds", "sample_rate", "seed", "soundfont",
                                          "soundfont_bytes")}
    names = song_names(train, test, unlabelled)
    meta_path = os.path.join(out, "corpus.json")
    def complete():
        return all(_cached(out, split, nm, _song_hash(song_params, split, i)) is not None
                   for split, ns in names.items() for i, nm in enumerate(ns))

    existing = reuse_or_clear(out, params, complete, ("musdb", "unlabelled", "midi"), overwrite)
    if existing is not None:
        existing["rendered"] = 0
        return existing

    os.makedirs(out, exist_ok=True)
    meta = {"params": params, "status": "partial", "songs": {k: {} for k in names}}
    atomic_write_json(meta_path, meta)
    jobs_list = [(out, split, i, nm, song_params, exe)
                 for split in ("train", "test", "unlabelled") for i, nm in enumerate(names[split])]
    rendered = 0
    results = map_jobs(make_song, jobs_list, jobs, "midi corpus", "song", progress)
    for split, nm, info, did in results:
        meta["songs"][split][nm] = info
        rendered += int(did)
    meta["status"] = "complete"
    atomic_write_json(meta_path, meta)
    meta["rendered"] = rendered
    logger.info("rendered %d of %d songs (%d cached)", rendered, len(jobs_list), len(jobs_list) - rendered)
    return meta


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="pahubert-midi-corpus",
        description="Compose songs procedurally (one General MIDI file per stem: drums, bass, other, "
                    "vocals) and render them with FluidSynth and a GM soundfont into the MUSDB18-HQ "
                    "layout OUT/musdb/{train,test}/<song>/*.wav (PCM_16; the stems sum exactly to "
                    "mixture.wav) plus unlabelled mixtures of other songs in OUT/unlabelled/. "
                    "Deterministic for a seed whatever --jobs; finished songs and corpora are reused. "
                    "Needs the Debian packages fluidsynth and timgm6mb-soundfont "
                    "(or musescore-general-soundfont-small).")
    p.add_argument("out", help="output folder")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--unlabelled", type=int, default=40, help="unlabelled mixtures (default 40)")
    group.add_argument("--unlabelled-hours", type=float, default=None, metavar="H",
                       help="instead of --unlabelled: enough unlabelled songs for H hours "
                            "(ceil(H * 3600 / seconds) songs)")
    p.add_argument("--train", type=int, default=8, help="labelled training songs (default 8)")
    p.add_argument("--test", type=int, default=6, help="labelled test songs (default 6)")
    p.add_argument("--seconds", type=float, default=20.0, help="song length in seconds (default 20)")
    p.add_argument("--sample-rate", type=int, default=16000,
                   help="sample rate in Hz, a multiple of 100; FluidSynth renders at it directly "
                        "(default 16000)")
    p.add_argument("--seed", type=int, default=0, help="corpus seed (default 0)")
    p.add_argument("--jobs", type=int, default=1, help="worker processes (default 1); "
                   "the output does not depend on it")
    p.add_argument("--soundfont", default=DEFAULT_SOUNDFONT,
                   help=f"GM soundfont (default {DEFAULT_SOUNDFONT}, Debian timgm6mb-soundfont; "
                        f"{LITE_SOUNDFONT} from musescore-general-soundfont-small sounds richer but "
                        f"loads in ~3 s per stem). FluidR3 is refused (reserved for evaluation).")
    p.add_argument("--fluidsynth", default=None, metavar="PATH",
                   help=f"FluidSynth executable (default: ${FLUIDSYNTH_ENV} or fluidsynth on PATH)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace OUT/musdb, OUT/unlabelled and OUT/midi if they hold another corpus")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def run(argv: Optional[List[str]] = None) -> dict:
    """The command line's work: parse ``argv``, write the corpus, print one summary line and return
    its metadata dict (:func:`main` is the console script and returns the exit status)."""
    args = get_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        meta = generate_corpus(args.out, args.unlabelled, args.train, args.test, args.seconds,
                               args.sample_rate, args.seed, jobs=args.jobs, overwrite=args.overwrite,
                               soundfont=args.soundfont, fluidsynth=args.fluidsynth,
                               progress=not args.no_progress, unlabelled_hours=args.unlabelled_hours)
    except (ValueError, MidiCorpusError) as e:
        raise CommandError(f"pahubert-midi-corpus: error: {e}")
    except OSError as e:  # a full disk or an unwritable folder: one line naming the file
        raise CommandError(f"pahubert-midi-corpus: error: {write_error(e.filename or args.out, e)}") from None
    counts = {k: len(v) for k, v in meta["songs"].items()}
    hours = counts["unlabelled"] * args.seconds / 3600
    print(f"midi corpus in {args.out}: {counts['train']} train, {counts['test']} test, "
          f"{counts['unlabelled']} unlabelled songs ({hours:.2f} h) of {args.seconds:g} s at "
          f"{args.sample_rate} Hz; {meta['rendered']} rendered now")
    return meta


@prints_command_errors
def main(argv: Optional[List[str]] = None) -> int:
    """``pahubert-midi-corpus``: exit status 0 on success; an error is one line on stderr and exit status 2."""
    run(argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
