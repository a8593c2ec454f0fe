"""Speech in machine noise: a corpus of 16 kHz mono mixtures from real recordings and synthesis.

Speech. Real recorded speech from Debian's Asterisk prompts, ``asterisk-core-sounds-en-g722`` and
``asterisk-core-sounds-es-g722`` (16 kHz G.722 files under ``/usr/share/asterisk/sounds/{en,es}``,
decoded with ``ffmpeg -f g722``), plus synthetic voices: the ``flite`` voices awb, kal16, rms
and slt (not kal, the same talent as kal16 at 8 kHz, nor awb_time, which only tells the time),
and ``espeak-ng`` voices with variants (``en-us+f3`` ...), reading sentences of real prose
shipped with Debian (the licence texts of ``/usr/share/common-licenses``). Only the ``en``
and ``es`` prompt folders are read (other Asterisk languages, the ``asterisk-moh-*`` music and
festival voices are kept for an independent evaluation); prompts that are tones, silence, music
or animals (``beep*``, ``*-2tone``, ``silence/``, ``confbridge-begin-glorious-*``,
``tt-monkeys``) are left out. Every prompt or synthesised sentence is one utterance, trimmed of
its silences and levelled (+-1.5 dB of jitter); a clip's speech track is one speaker's
utterances one after another with 0.2-1.0 s pauses, from a random 0-0.8 s start to the end of the
clip (the last utterance cut with a 50 ms fade when it does not fit).

Speakers. ``asterisk-en`` and ``asterisk-es`` (the English and the Mexican Spanish prompt
sets; both directories are named ``*_f_Allison`` by Debian, so they may be one voice talent in
two languages), one speaker per flite voice (``flite-slt``) and one per espeak-ng voice+variant
(``espeak-en-us+f4``). The test split has its own speakers, never heard in train, valid or
unlabelled (:data:`TEST_SPEAKERS`: asterisk-es, flite-slt, espeak-en-us+f4,
espeak-en-gb-scotland+m7); the other splits share :data:`TRAIN_SPEAKERS`. A clip has one
speaker: the split's recorded speaker with probability 0.3, else one of its synthetic voices.
Test clips read sentences of other licence files (:data:`TEST_TEXTS`) than the rest.

Noise. Real recordings of machines and vehicles from Debian's ``openttd-opensfx``
(``opensfx.cat``, parsed by :func:`read_opensfx`: a table of (offset, size) uint32 pairs, the
first offset flagged with bit 31, then per sound a name-length byte, the name and a RIFF WAVE
file), 44.1 kHz resampled to 16 kHz, the animal, crowd, wind, jingle and Toyland cartoon sounds
left out (:func:`is_machine_sound`); plus procedural machines in numpy: ``motor`` (harmonic hum
with a drifting speed, rotation-modulated brush noise), ``fan`` (filtered noise with blade-pass
tones), ``impacts`` (a press or hammer: modal ringing hits), ``beeps`` (alarm tones),
``compressor`` (piston knocks, air hiss) and ``conveyor`` (roller clicks, rumble, thumps). A
clip's noise is a scene: one continuous bed (a procedural motor/fan/compressor/conveyor or a
looped recording) and 1-3 more layers (loops, or short recordings as random events), each with
its own level and a slow random gain envelope, some switching on or off during the clip. Test
noises are unseen: the test split draws only :data:`TEST_OPENSFX` recordings (helicopter,
jackhammer, sawmill, chainsaw, modern jet take-off, level crossing, mining machinery, ferry
horn, electric sparking, crash, big crash) and the ``compressor`` and ``conveyor`` machines;
the other splits only the rest.

Mixing. The speech is set to -32..-22 dBFS (RMS of the clip), the noise to a speech-to-noise
ratio drawn per clip from ``--snr-range`` (default -5..15 dB; the energy ratio of the written
stems over the whole clip); with ``--reverb`` both are first convolved with room impulse
responses of one random small room (3-8 x 2.5-6 x 2.4-3.5 m, RT60 0.15-0.6 s, two source
positions and a microphone): early reflections by pyroomacoustics' image method (order 8), a
modelled exponential late tail (:func:`late_tail`; the measured RT60 is in the clip's json). A clip whose peak (mixture or stem) would pass 0.99 is scaled down. Stems and
mixture are float32 WAV and ``mixture = speech + noise`` exactly, in float32.

Layout under OUT::

    OUT/{train,valid,test}/<clip>/{mixture,speech,noise}.wav   (labelled, with stems)
    OUT/unlabelled/<clip>.wav                                  (mixtures only; give this folder
                                                                to pahubert-manifest)
    OUT/clips/<split>/<clip>.json                              (what made each clip + its hash)
    OUT/corpus.json                                            (options, sources, speakers and
                                                                noises per split, durations)

Determinism and caching. A clip draws everything from ``SeedSequence([seed, split, index])``
and depends only on that, ``--clip-seconds``, ``--snr-range``, ``--reverb`` and the sources
(file lists, sizes, tool versions): the same options give byte-identical files whatever
``--jobs``. Every file is written to a temporary name and moved into place; a clip's json,
holding the hash of what the clip depends on, is written last, so a clip is rendered again
unless its files exist with a matching json (an interrupted clip is redone, a changed option
redoes the clips it changes; more clips only add clips, fewer remove the extra ones). A folder
holding files but no corpus.json of this generator is refused unless ``--overwrite``.

Speed, measured on this project's 2-core CPU machine while other jobs loaded it (load average
7-9, so upper bounds): 1 hour of unlabelled 10 s mixtures (360 clips) in 182 s with ``--jobs 2``
(20x real time); the defaults (200 train, 20 valid, 40 test clips and 1 hour unlabelled: 620
clips, 1.7 hours, 704 MB) in about 5 minutes. Alone, one process renders a 10 s clip in ~0.4 s:
about half waiting for flite/espeak-ng/ffmpeg, half the noise scene in numpy; ``--reverb`` adds
~0.1-0.2 s per clip.

Debian packages: ffmpeg, flite, espeak-ng, asterisk-core-sounds-en-g722,
asterisk-core-sounds-es-g722, openttd-opensfx (base-files provides the licence texts).
``--reverb`` uses pyroomacoustics (installed with this package).
"""
import argparse
import functools
import hashlib
import io
import json
import logging
import math
import os
import re
import shutil
import struct
import subprocess
import tempfile
import textwrap
import time
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from ..fileio import CommandError, atomic_write_bytes, atomic_write_json, prints_command_errors, write_error
from .processes import map_jobs, run_side_by_side

logger = logging.getLogger(__name__)

PROG = "pahubert-speech-corpus"
SPEECH_VERSION = 1  # bump when rendering changes, so that old clips are rendered again
SAMPLE_RATE = 16000
ASTERISK_ROOT = "/usr/share/asterisk/sounds"
ASTERISK_PACKAGES = {"en": "asterisk-core-sounds-en-g722", "es": "asterisk-core-sounds-es-g722"}
ASTERISK_SKIP = re.compile(r"(^|/)(silence/.*|beep.*|.*-2tone|confbridge-begin-glorious-.*|tt-monkeys)\.g722$")
OPENSFX_CAT = "/usr/share/games/openttd/baseset/opensfx/opensfx.cat"
TEXT_DIR = "/usr/share/common-licenses"
TEST_TEXTS = ("Apache-2.0", "MPL-1.1", "MPL-2.0")
TOOLS = {"ffmpeg": ("ffmpeg", "PAHUBERT_FFMPEG"), "flite": ("flite", "PAHUBERT_FLITE"),
         "espeak-ng": ("espeak-ng", "PAHUBERT_ESPEAK_NG")}  # name: (Debian package, env var)
PYROOMACOUSTICS = "pyroomacoustics==0.10.1"

SPLITS = ("train", "valid", "test", "unlabelled")
SPLIT_IDS = {"train": 0, "valid": 1, "test": 2, "unlabelled": 3}  # mixed into each clip's seed
STEMS = ("mixture", "speech", "noise")
# speaker: (engine, voice)
SPEAKERS = {
    "asterisk-en": ("asterisk", "en"), "asterisk-es": ("asterisk", "es"),
    "flite-awb": ("flite", "awb"), "flite-kal16": ("flite", "kal16"), "flite-rms": ("flite", "rms"),
    "flite-slt": ("flite", "slt"),
    **{f"espeak-{v}": ("espeak", v) for v in (
        "en-us+m1", "en-us+m3", "en-us+f1", "en-us+f2", "en-gb+m2", "en-gb+f3", "en-gb-x-rp+m6",
        "en-029+m5", "en-us-nyc+f5", "en-gb+klatt4", "en-us+f4", "en-gb-scotland+m7")},
}
TEST_SPEAKERS = ("asterisk-es", "flite-slt", "espeak-en-us+f4", "espeak-en-gb-scotland+m7")
TRAIN_SPEAKERS = tuple(s for s in SPEAKERS if s not in TEST_SPEAKERS)
REAL_SPEAKER_P = 0.3  # probability that a clip's speaker is the split's recorded (Asterisk) one
# OpenSFX recordings only the test split hears (whole titles); recordings made from one original
# (crash.wav: "Crash" and "Big crash") are kept in one split
TEST_OPENSFX = ("Helicopter", "Jackhammer", "Sawmill", "Lumber mill: Chainsaw", "Modern jet take off",
                "Level crossing", "Mining machinery", "Ferry horn", "Electric sparking", "Crash",
                "Big crash")
OPENSFX_NOT_MACHINE = re.compile(
    r"year|applause|oooh|sheep|cow|horse|bird|lion|monkeys|wind|unused|toyland|splat|tree",
    re.IGNORECASE)
PROCEDURAL = {"motor": "train", "fan": "train", "impacts": "train", "beeps": "train",
              "compressor": "test", "conveyor": "test"}
CONTINUOUS = ("motor", "fan", "compressor", "conveyor")  # procedural machines that can be a bed
LOOP_MIN_SECONDS = 1.5  # shorter recordings are scattered as events instead of looped
PEAK = 0.99


class SpeechCorpusError(RuntimeError):
    """A missing package or tool, or a failed render; the message says what."""


# --------------------------------------------------------------------------- files

def wav_float32_bytes(audio: np.ndarray, sample_rate: int) -> bytes:
    """A mono IEEE-float WAV file (fmt, fact and data chunks) holding exactly ``audio`` as float32.

    Written by hand rather than with libsndfile, whose float WAVs carry a PEAK chunk with the time
    of writing: these are byte-identical for the same audio."""
    data = np.ascontiguousarray(audio, dtype="<f4").tobytes()
    n = len(data) // 4
    fmt = struct.pack("<HHIIHHH", 3, 1, sample_rate, sample_rate * 4, 4, 32, 0)
    body = (b"WAVE" + b"fmt " + struct.pack("<I", len(fmt)) + fmt + b"fact" + struct.pack("<II", 4, n)
            + b"data" + struct.pack("<I", len(data)) + data)
    return b"RIFF" + struct.pack("<I", len(body)) + body


def _write_wav(path: str, audio: np.ndarray) -> None:
    atomic_write_bytes(path, wav_float32_bytes(audio, SAMPLE_RATE))


def clip_names(train: int, valid: int, test: int, unlabelled: int) -> Dict[str, List[str]]:
    counts = {"train": train, "valid": valid, "test": test, "unlabelled": unlabelled}
    width = {"unlabelled": 5}
    return {s: [f"{s}_{i:0{width.get(s, 4)}d}" for i in range(counts[s])] for s in SPLITS}


def clip_paths(out: str, split: str, name: str) -> List[str]:
    """The audio files of a clip: the mixture, then (labelled splits) speech and noise."""
    if split == "unlabelled":
        return [os.path.join(out, "unlabelled", name + ".wav")]
    return [os.path.join(out, split, name, f"{s}.wav") for s in STEMS]


def _meta_path(out: str, split: str, name: str) -> str:
    return os.path.join(out, "clips", split, name + ".json")


# --------------------------------------------------------------------------- environment

def find_tool(name: str, given: Optional[str] = None) -> str:
    """The executable of ``name`` (ffmpeg, flite, espeak-ng): ``given``, its environment variable or
    PATH; a SpeechCorpusError naming the Debian package when missing."""
    package, env = TOOLS[name]
    exe = given or os.environ.get(env) or name
    found = shutil.which(exe)
    if found is None:
        raise SpeechCorpusError(f"{name} not found (looked for {exe!r}): install the Debian package "
                                f"{package} (apt-get install {package}), or pass --{name} PATH / set {env}")
    return found


def asterisk_prompts(root: str) -> Dict[str, List[Tuple[str, int]]]:
    """``{"en": [(path, bytes), ...], "es": [...]}``: the G.722 speech prompts of ``root/en`` and
    ``root/es``, sorted. No other folder of ``root`` is read (other languages and the music on hold
    are kept for evaluation); tones, silences and music are left out (:data:`ASTERISK_SKIP`)."""
    prompts = {}
    for lang, package in ASTERISK_PACKAGES.items():
        folder = os.path.join(root, lang)
        found = []
        if os.path.isdir(folder):
            for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
                dirnames.sort()
                for fn in sorted(filenames):
                    rel = os.path.relpath(os.path.join(dirpath, fn), folder)
                    if fn.endswith(".g722") and not ASTERISK_SKIP.search(rel):
                        path = os.path.join(dirpath, fn)
                        size = os.path.getsize(path)
                        if size >= 0.3 * 8000:  # at least 0.3 s (G.722: 8000 bytes per second)
                            found.append((path, size))
        if not found:
            raise SpeechCorpusError(
                f"no G.722 speech prompts in {folder}: install the Debian package {package} "
                f"(apt-get install {package}), or pass --asterisk-root DIR holding en/ and es/")
        prompts[lang] = found
    return prompts


def read_opensfx(path: str) -> List[Tuple[str, bytes]]:
    """``[(title, riff_bytes), ...]``: every sound of an OpenTTD sample catalogue (``opensfx.cat``).

    The file starts with ``count * 8`` as uint32 (bit 31 set in the new format) followed by
    (offset, size) uint32 pairs; at each offset a name-length byte, the NUL-terminated name (here
    the title in quotes and its credits) and ``size`` bytes of a RIFF WAVE file."""
    with open(path, "rb") as f:
        data = f.read()
    if len(data) < 8:
        raise SpeechCorpusError(f"{path}: not an OpenTTD sound catalogue ({len(data)} bytes)")
    count = (struct.unpack_from("<I", data, 0)[0] & 0x7FFFFFFF) // 8
    if not 0 < count * 8 <= len(data):
        raise SpeechCorpusError(f"{path}: not an OpenTTD sound catalogue (table of {count} entries)")
    sounds = []
    for i in range(count):
        offset, size = struct.unpack_from("<II", data, 8 * i)
        offset &= 0x7FFFFFFF
        if offset >= len(data):
            raise SpeechCorpusError(f"{path}: entry {i} points past the end of the file")
        name_len = data[offset]
        name = data[offset + 1:offset + 1 + name_len].split(b"\0")[0].decode("utf-8", "replace")
        riff = data[offset + 1 + name_len:offset + 1 + name_len + size]
        if riff[:4] != b"RIFF" or riff[8:12] != b"WAVE":
            raise SpeechCorpusError(f"{path}: entry {i} ({name[:40]!r}) is not a RIFF WAVE file")
        m = re.match(r'\s*"([^"]+)"', name)
        sounds.append((m.group(1) if m else name, riff))
    return sounds


def is_machine_sound(title: str) -> bool:
    """OpenSFX sounds of machines, vehicles and industry (not animals, crowds, wind, jingles, the
    Toyland cartoons, splashes, falling trees or the empty placeholders)."""
    return not OPENSFX_NOT_MACHINE.search(title)


@functools.lru_cache(maxsize=4)
def opensfx_sounds(path: str) -> Dict[str, np.ndarray]:
    """The machine sounds of ``opensfx.cat`` as float64 mono at 16 kHz, silences trimmed, by title."""
    import soundfile as sf
    from scipy.signal import resample_poly

    out = {}
    for title, riff in read_opensfx(path):
        if not is_machine_sound(title):
            continue
        audio, sr = sf.read(io.BytesIO(riff), dtype="float64", always_2d=True)
        audio = audio.mean(axis=1)
        if sr != SAMPLE_RATE:
            g = math.gcd(sr, SAMPLE_RATE)
            audio = resample_poly(audio, SAMPLE_RATE // g, sr // g)
        audio = _trim(audio, rel=0.01)
        if len(audio) >= 0.05 * SAMPLE_RATE:
            out[title] = audio
    return out


def split_sentences(text: str) -> List[str]:
    """Sentences (and clauses of long ones) of 4-18 words, plain ASCII words and punctuation."""
    text = re.sub(r"\s+", " ", text)
    out = []
    for sent in re.split(r"(?<=[.!?;:])\s+", text):
        if re.search(r"https?:|www\.|@|<|>", sent):
            continue
        sent = re.sub(r"[^A-Za-z0-9,.'()\- ]+", " ", sent)
        sent = re.sub(r"^\s*(\(?[0-9a-z]{1,3}[.)]\s*)+", "", sent)  # "1.", "(a)", "b)" enumerations
        sent = re.sub(r"\s+", " ", sent).strip(" -")
        words, chunk = sent.split(" "), []
        for w in words:  # break long sentences at commas into chunks of at most 18 words
            chunk.append(w)
            if (w.endswith(",") and len(chunk) >= 8) or len(chunk) >= 18:
                out.append(" ".join(chunk).rstrip(","))
                chunk = []
        if chunk:
            out.append(" ".join(chunk).rstrip(","))
    keep = []
    for s in out:
        letters = sum(c.isalpha() for c in s)
        if 4 <= len(s.split()) <= 18 and letters > 0.7 * len(s.replace(" ", "")):
            keep.append(s)
    return keep


def read_texts(text_dir: str) -> Dict[str, List[str]]:
    """``{"train": [...], "test": [...]}`` sentences of the licence texts: test sentences come from
    :data:`TEST_TEXTS`, the others from the other files, none in both."""
    if not os.path.isdir(text_dir):
        raise SpeechCorpusError(f"{text_dir} not found: install the Debian package base-files, or pass "
                                f"--text-dir DIR holding plain-text prose")
    seen, sentences = set(), {"train": [], "test": []}
    for fn in sorted(os.listdir(text_dir)):
        path = os.path.join(text_dir, fn)
        real = os.path.realpath(path)
        if real in seen or not os.path.isfile(real):
            continue
        seen.add(real)
        with open(real, encoding="utf-8", errors="replace") as f:
            sents = split_sentences(f.read())
        sentences["test" if fn in TEST_TEXTS else "train"].extend(sents)
    test = set(sentences["test"])
    for k in sentences:
        sentences[k] = list(dict.fromkeys(s for s in sentences[k] if k == "test" or s not in test))
        if len(sentences[k]) < 20:
            raise SpeechCorpusError(f"{text_dir}: only {len(sentences[k])} {k} sentences found "
                                    f"(test ones from {', '.join(TEST_TEXTS)}); expected Debian's "
                                    f"licence texts (package base-files)")
    return sentences


def _version(exe: str, flag: str) -> str:
    try:
        proc = subprocess.run([exe, flag], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              timeout=30, stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise SpeechCorpusError(f"could not run {exe} {flag}: {e}") from e
    lines = [ln.strip() for ln in proc.stdout.splitlines() if ln.strip()]
    return next((ln for ln in lines if "version" in ln.lower()), lines[0] if lines else "")


def check_flite_voices(flite: str) -> None:
    proc = subprocess.run([flite, "-lv"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          timeout=30, stdin=subprocess.DEVNULL)
    have = set(proc.stdout.split())
    missing = [v for e, v in SPEAKERS.values() if e == "flite" and v not in have]
    if missing:
        raise SpeechCorpusError(f"{flite} lacks the voices {', '.join(missing)} (flite -lv: "
                                f"{proc.stdout.strip()}); install Debian's flite package")


def import_pyroomacoustics():
    try:
        import pyroomacoustics
    except ImportError as e:
        raise SpeechCorpusError(f"--reverb needs pyroomacoustics ({e}): pip install {PYROOMACOUSTICS}") from e
    return pyroomacoustics


def prepare_sources(asterisk_root: str = ASTERISK_ROOT, opensfx: str = OPENSFX_CAT,
                    text_dir: str = TEXT_DIR, ffmpeg: Optional[str] = None, flite: Optional[str] = None,
                    espeak_ng: Optional[str] = None, reverb: bool = False) -> dict:
    """Check every package and tool (a SpeechCorpusError naming the Debian package of the first one
    missing) and gather what the workers need: tool paths, prompt lists, sentences, noise pools,
    and ``fingerprint``, a hash of all of it and of the tool versions."""
    tools = {"ffmpeg": find_tool("ffmpeg", ffmpeg), "flite": find_tool("flite", flite),
             "espeak-ng": find_tool("espeak-ng", espeak_ng)}
    prompts = asterisk_prompts(asterisk_root)
    if not os.path.isfile(opensfx):
        raise SpeechCorpusError(f"{opensfx} not found: install the Debian package openttd-opensfx "
                                f"(apt-get install openttd-opensfx), or pass --opensfx PATH")
    titles = sorted(opensfx_sounds(os.path.abspath(opensfx)))
    missing = [t for t in TEST_OPENSFX if t not in titles]
    if missing:
        raise SpeechCorpusError(f"{opensfx} lacks the test recordings {missing}: expected Debian's "
                                f"openttd-opensfx 1.0.x")
    sentences = read_texts(text_dir)
    check_flite_voices(tools["flite"])
    import scipy

    versions = {"ffmpeg": _version(tools["ffmpeg"], "-version"), "flite": _version(tools["flite"], "--version"),
                "espeak-ng": _version(tools["espeak-ng"], "--version"), "numpy": np.__version__,
                "scipy": scipy.__version__}
    if reverb:
        versions["pyroomacoustics"] = import_pyroomacoustics().__version__
    with open(opensfx, "rb") as f:
        opensfx_sha = hashlib.sha256(f.read()).hexdigest()
    noises = {"test": {"opensfx": sorted(t for t in titles if t in TEST_OPENSFX),
                       "procedural": sorted(k for k, v in PROCEDURAL.items() if v == "test")},
              "train": {"opensfx": sorted(t for t in titles if t not in TEST_OPENSFX),
                        "procedural": sorted(k for k, v in PROCEDURAL.items() if v == "train")}}
    blob = {"prompts": {k: [(os.path.relpath(p, asterisk_root), s) for p, s in v] for k, v in prompts.items()},
            "opensfx": opensfx_sha, "sentences": sentences, "versions": versions, "noises": noises}
    fingerprint = hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()[:16]
    return {"tools": tools, "prompts": prompts, "opensfx": os.path.abspath(opensfx), "sentences": sentences,
            "noises": noises, "versions": versions, "fingerprint": fingerprint,
            "asterisk_root": os.path.abspath(asterisk_root), "text_dir": os.path.abspath(text_dir)}


# --------------------------------------------------------------------------- signal helpers

def _rms(x: np.ndarray) -> float:
    return float(np.sqrt(np.mean(np.square(x, dtype=np.float64)))) if len(x) else 0.0


def _unit(x: np.ndarray) -> np.ndarray:
    return x / (_rms(x) + 1e-12)


def _trim(x: np.ndarray, rel: float = 0.02, sr: int = SAMPLE_RATE) -> np.ndarray:
    """``x`` without its leading and trailing quiet part (below ``rel`` of the peak), 20/50 ms kept."""
    if not len(x):
        return x
    loud = np.flatnonzero(np.abs(x) > rel * np.abs(x).max())
    if not len(loud):
        return x[:0]
    return x[max(loud[0] - int(0.02 * sr), 0):min(loud[-1] + int(0.05 * sr), len(x))]


def _slow_curve(rng, n: int, sr: int, period: float, depth: float) -> np.ndarray:
    """A smooth random curve around 0 (normal values of std ``depth`` every ``period`` seconds,
    raised-cosine interpolated, random phase)."""
    step = period * sr
    k = int(np.ceil(n / step)) + 2
    vals = rng.normal(0.0, depth, k)
    pos = np.arange(n) / step + rng.uniform(0, 1)
    i = pos.astype(np.int64)
    w = (1 - np.cos(np.pi * (pos - i))) / 2
    return vals[i] * (1 - w) + vals[i + 1] * w


def _colored(rng, n: int, slope_db: float) -> np.ndarray:
    """Unit-RMS noise whose power falls ``-slope_db`` dB per octave (0 white, -3 pink, -6 brown)."""
    spec = np.fft.rfft(rng.standard_normal(n))
    f = np.fft.rfftfreq(n)
    f[0] = f[1] if n > 1 else 1.0
    spec *= f ** (slope_db / (20 * np.log10(2)))
    return _unit(np.fft.irfft(spec, n))


def _filter(x: np.ndarray, sr: int, lo: Optional[float], hi: Optional[float], order: int = 2) -> np.ndarray:
    from scipy.signal import butter, sosfilt

    if lo and hi:
        sos = butter(order, [lo, min(hi, 0.45 * sr)], btype="bandpass", fs=sr, output="sos")
    elif lo:
        sos = butter(order, lo, btype="highpass", fs=sr, output="sos")
    else:
        sos = butter(order, min(hi, 0.45 * sr), btype="lowpass", fs=sr, output="sos")
    return sosfilt(sos, x)


def _phase(rng, n: int, sr: int, freq: float, drift: float, period: float = 3.0) -> np.ndarray:
    """Phase (radians) of a rotation at ``freq`` Hz whose speed drifts slowly by ~``drift`` (relative)."""
    f = freq * np.exp(_slow_curve(rng, n, sr, period, drift))
    return 2 * np.pi * np.cumsum(f) / sr + rng.uniform(0, 2 * np.pi)


def _events(rng, n: int, sr: int, period: float, regular: bool, jitter: float = 0.05) -> np.ndarray:
    """Sample positions of events every ``period`` s (regular, with ``jitter``) or at random
    (Poisson, mean interval ``period``), from a random phase."""
    pos, out = rng.uniform(0, period), []
    while pos * sr < n:
        out.append(int(pos * sr))
        pos += period * (1 + rng.normal(0, jitter)) if regular else rng.exponential(period)
    return np.array(out, dtype=np.int64)


def _place(n: int, positions: np.ndarray, sounds: Sequence[np.ndarray]) -> np.ndarray:
    out = np.zeros(n)
    for p, s in zip(positions, sounds):
        seg = s[:n - p]
        out[p:p + len(seg)] += seg
    return out


def _ringing_hit(rng, sr: int, modes: int, f_lo: float, f_hi: float, tau: Tuple[float, float]) -> np.ndarray:
    """A struck object: a short noise burst plus decaying sinusoidal modes."""
    dur = 6 * tau[1]
    t = np.arange(int(dur * sr)) / sr
    x = np.zeros(len(t))
    for _ in range(modes):
        f = np.exp(rng.uniform(np.log(f_lo), np.log(f_hi)))
        x += rng.uniform(0.3, 1) * np.exp(-t / rng.uniform(*tau)) * np.sin(2 * np.pi * f * t + rng.uniform(0, 6.3))
    burst = int(rng.uniform(0.002, 0.01) * sr)
    x[:burst] += rng.standard_normal(burst) * np.linspace(1, 0, burst) * rng.uniform(0.3, 1.5)
    return x


# --------------------------------------------------------------------------- procedural machines

def motor(rng, n: int, sr: int) -> np.ndarray:
    """An electric motor or engine: harmonics of a drifting rotation, brush noise, maybe mains hum."""
    f0 = rng.uniform(22, 120)
    phase = _phase(rng, n, sr, f0, rng.uniform(0.01, 0.05), rng.uniform(1.5, 4))
    tilt, x = rng.uniform(0.6, 1.6), np.zeros(n)
    for k in range(1, int(min(rng.integers(6, 24), 5000 / f0)) + 1):
        x += k ** -tilt * rng.lognormal(0, 0.4) * np.sin(k * phase + rng.uniform(0, 2 * np.pi))
    x = _unit(x)
    if rng.random() < 0.4:  # magnetostriction hum at twice the mains frequency
        mains = 100.0 if rng.random() < 0.5 else 120.0
        t = np.arange(n) / sr
        x += 10 ** (rng.uniform(-18, -6) / 20) * np.sqrt(2) * np.sin(2 * np.pi * mains * t)
    brush = _unit(_filter(_colored(rng, n, -3), sr, rng.uniform(500, 1500), rng.uniform(2500, 6000)))
    x += 10 ** (rng.uniform(-24, -10) / 20) * brush * (1 + 0.5 * np.sin(phase))
    return _unit(x)


def fan(rng, n: int, sr: int) -> np.ndarray:
    """A fan or blower: band-limited noise, blade-pass tones, rotation amplitude modulation."""
    noise = _unit(_filter(_colored(rng, n, rng.uniform(-4.5, -1.5)), sr, rng.uniform(60, 300),
                          rng.uniform(1500, 6000)))
    blades = int(rng.integers(3, 10))
    rot = _phase(rng, n, sr, rng.uniform(8, 40), rng.uniform(0.005, 0.03))
    tones = sum(rng.uniform(0.3, 1) / h * np.sin(h * blades * rot + rng.uniform(0, 6.3)) for h in (1, 2, 3))
    x = noise * (1 + rng.uniform(0.05, 0.3) * np.sin(rot)) + 10 ** (rng.uniform(-18, -6) / 20) * _unit(tones)
    return _unit(x)


def impacts(rng, n: int, sr: int) -> np.ndarray:
    """A stamping press or hammer: ringing hits, regular or at random, over a faint rumble."""
    period = rng.uniform(0.35, 2.5)
    pos = _events(rng, n, sr, period, regular=rng.random() < 0.6)
    modes, f_lo, f_hi = int(rng.integers(2, 6)), rng.uniform(120, 600), rng.uniform(1200, 5000)
    hits = [rng.lognormal(0, 0.3) * _ringing_hit(rng, sr, modes, f_lo, f_hi, (0.02, rng.uniform(0.05, 0.3)))
            for _ in pos]
    x = _unit(_place(n, pos, hits)) if len(pos) else np.zeros(n)
    return _unit(x + 0.05 * _unit(_filter(_colored(rng, n, -6), sr, None, 300)))


def beeps(rng, n: int, sr: int) -> np.ndarray:
    """An alarm or reversing beeper: square-ish tones switched on and off, sometimes two-tone."""
    f1 = rng.uniform(700, 3200)
    f2 = f1 * rng.uniform(0.6, 0.85) if rng.random() < 0.3 else f1
    on, off = rng.uniform(0.08, 0.5), rng.uniform(0.1, 1.0)
    t = np.arange(n) / sr
    cyc = (t + rng.uniform(0, on + off)) % (2 * (on + off))
    freq = np.where(cyc < on + off, f1, f2)
    ph = 2 * np.pi * np.cumsum(freq) / sr
    tone = np.sin(ph) + (np.sin(3 * ph) / 3 if 3 * max(f1, f2) < 0.45 * sr else 0)
    gate = ((cyc % (on + off)) < on).astype(float)
    ramp = int(0.005 * sr)
    gate = np.convolve(gate, np.ones(ramp) / ramp, mode="same")
    return _unit(tone * gate + 1e-3 * rng.standard_normal(n))


def compressor(rng, n: int, sr: int) -> np.ndarray:
    """A reciprocating air compressor: piston knocks, valve clatter, air hiss, a load change."""
    rate = rng.uniform(8, 22)
    pos = _events(rng, n, sr, 1 / rate, regular=True, jitter=0.02)
    knock_f, clatter_f = rng.uniform(60, 250), rng.uniform(600, 2000)
    t = np.arange(int(0.2 * sr)) / sr
    knock = (np.exp(-t / rng.uniform(0.01, 0.04)) * np.sin(2 * np.pi * knock_f * t)
             + 0.4 * np.exp(-t / rng.uniform(0.003, 0.008)) * np.sin(2 * np.pi * clatter_f * t))
    x = _unit(_place(n, pos, [knock * rng.lognormal(0, 0.15) for _ in pos]))
    x += 10 ** (rng.uniform(-20, -8) / 20) * _unit(_filter(rng.standard_normal(n), sr, rng.uniform(2000, 5000), None))
    if rng.random() < 0.4:  # unloads (or loads) at a random time
        step = np.clip((np.arange(n) / sr - rng.uniform(0, n / sr)) / 0.5, 0, 1)
        x *= 1 - 0.7 * step if rng.random() < 0.5 else 0.3 + 0.7 * step
    return _unit(x)


def conveyor(rng, n: int, sr: int) -> np.ndarray:
    """A belt conveyor: roller clicks with accents, low belt rumble, items thumping down."""
    period = rng.uniform(0.08, 0.4)
    pos = _events(rng, n, sr, period, regular=True, jitter=0.03)
    accent = int(rng.integers(2, 7))
    lo = rng.uniform(1500, 3000)
    clicks = []
    for k in range(len(pos)):
        m = int(0.01 * sr)
        c = _filter(rng.standard_normal(m), sr, lo, 2 * lo) * np.exp(-np.arange(m) / (0.002 * sr))
        clicks.append(c * (2.0 if k % accent == 0 else 1.0))
    x = _unit(_place(n, pos, clicks)) if len(pos) else np.zeros(n)
    x += 10 ** (rng.uniform(-10, 0) / 20) * _unit(_filter(_colored(rng, n, -6), sr, None, rng.uniform(150, 400)))
    tpos = _events(rng, n, sr, rng.uniform(0.7, 3.0), regular=False)
    if len(tpos):
        thumps = [_ringing_hit(rng, sr, 2, 70, 250, (0.02, 0.08)) for _ in tpos]
        x += 10 ** (rng.uniform(-8, 0) / 20) * _unit(_place(n, tpos, thumps))
    return _unit(x)


MACHINES = {"motor": motor, "fan": fan, "impacts": impacts, "beeps": beeps, "compressor": compressor,
            "conveyor": conveyor}


# --------------------------------------------------------------------------- the noise scene

def _loop(x: np.ndarray, n: int, start: int, fade: int) -> np.ndarray:
    """``x`` from ``start`` repeated to ``n`` samples, each seam cross-faded over ``fade`` samples."""
    out = x[start:].copy()
    while len(out) < n:
        f = max(1, min(fade, len(x) // 4, len(out) // 4))
        ramp = np.linspace(0, 1, f)
        out[-f:] = out[-f:] * (1 - ramp) + x[:f] * ramp
        out = np.concatenate([out, x[f:]])
    return out[:n]


def _recording_layer(rng, sound: np.ndarray, n: int, sr: int) -> Tuple[np.ndarray, str]:
    if len(sound) >= LOOP_MIN_SECONDS * sr:
        return _unit(_loop(sound, n, int(rng.integers(0, len(sound) // 2)), int(0.05 * sr))), "loop"
    pos = _events(rng, n, sr, rng.uniform(1.2, 6.0), regular=False)
    if not len(pos):
        pos = np.array([int(rng.integers(0, max(1, n - len(sound))))])
    x = _place(n, pos, [sound * 10 ** (rng.uniform(-4, 4) / 20) for _ in pos])
    return _unit(x), "events"


def noise_scene(rng, n: int, sr: int, pool: dict, opensfx: Dict[str, np.ndarray]) -> Tuple[np.ndarray, List[dict]]:
    """A machine scene of ``n`` samples from the noise ``pool`` of a split (see the module
    docstring): a bed and 1-3 layers, each with a level and a slow gain envelope."""
    titles, machines = pool["opensfx"], pool["procedural"]
    long_titles = [t for t in titles if len(opensfx[t]) >= LOOP_MIN_SECONDS * sr]
    beds = [m for m in machines if m in CONTINUOUS]
    total, layers = np.zeros(n), []
    for k in range(1 + int(rng.integers(1, 4))):
        if k == 0:
            recorded = rng.random() < 0.5
            name = (long_titles[int(rng.integers(len(long_titles)))] if recorded
                    else beds[int(rng.integers(len(beds)))])
            level = 0.0
        else:
            recorded = rng.random() < 0.55
            name = titles[int(rng.integers(len(titles)))] if recorded else machines[int(rng.integers(len(machines)))]
            level = float(rng.uniform(-12, 0))
        if recorded:
            x, mode = _recording_layer(rng, opensfx[name], n, sr)
        else:
            x, mode = MACHINES[name](rng, n, sr), "procedural"
        gain_db = level + np.clip(_slow_curve(rng, n, sr, rng.uniform(1.5, 4), rng.uniform(1.5, 4)), -9, 9)
        gain = 10 ** (gain_db / 20)
        span = None
        if k > 0 and rng.random() < 0.5:  # a machine switching on or off during the clip
            t0, t1 = sorted(rng.uniform(-0.3, 1.3, 2) * n / sr)
            t0, t1 = max(t0, 0.0), min(t1, n / sr)
            if t1 - t0 > 0.5:
                t = np.arange(n) / sr
                ramp = rng.uniform(0.2, 1.5)
                gain = gain * np.clip((t - t0) / ramp, 0, 1) * np.clip((t1 - t) / ramp, 0, 1)
                span = [round(float(t0), 2), round(float(t1), 2)]
        total += x * gain
        layers.append({"source": ("opensfx:" if recorded else "procedural:") + name, "mode": mode,
                       "level_db": round(level, 2), **({"span_s": span} if span else {})})
    return total, layers


# --------------------------------------------------------------------------- speech

def _run_all(cmds: Sequence[List[str]], what: str) -> None:
    """Run commands side by side; a SpeechCorpusError with the stderr of the first one that fails."""
    for argv, (returncode, so, se) in zip(cmds, run_side_by_side(cmds, 300, SpeechCorpusError, what)):
        if returncode != 0:
            tail = " ".join((se + so).strip().splitlines()[-3:])
            raise SpeechCorpusError(f"{os.path.basename(argv[0])} failed ({what}, exit {returncode}): "
                                    f"{tail or 'no output'}")


def decode_g722(paths: Sequence[str], ffmpeg: str, tmp: str) -> List[np.ndarray]:
    """Decode G.722 files with one ffmpeg run -> float64 mono 16 kHz arrays."""
    cmd = [ffmpeg, "-nostdin", "-v", "error", "-y"]
    for p in paths:
        cmd += ["-f", "g722", "-i", p]
    outs = []
    for i in range(len(paths)):
        outs.append(os.path.join(tmp, f"g722_{i}.raw"))
        cmd += ["-map", f"{i}:a", "-ac", "1", "-ar", str(SAMPLE_RATE), "-f", "s16le", outs[-1]]
    _run_all([cmd], f"decoding {len(paths)} G.722 prompts such as {paths[0]}")
    return [np.fromfile(o, dtype="<i2").astype(np.float64) / 32768.0 for o in outs]


def synthesize(engine: str, voice: str, texts: Sequence[str], tools: dict, tmp: str, rate: float,
               pitch: int) -> List[np.ndarray]:
    """Speak each text with flite or espeak-ng -> float64 mono 16 kHz arrays. ``rate`` scales the
    speed (1 = the voice's default), ``pitch`` is espeak-ng's 0-99 pitch."""
    import soundfile as sf
    from scipy.signal import resample_poly

    cmds, wavs = [], []
    for i, text in enumerate(texts):
        txt, wav = os.path.join(tmp, f"tts_{i}.txt"), os.path.join(tmp, f"tts_{i}.wav")
        with open(txt, "w") as f:
            f.write(text + "\n")
        if engine == "flite":
            argv = [tools["flite"], "-voice", voice, "--setf", f"duration_stretch={1 / rate:.3f}", "-f", txt,
                    "-o", wav]
        else:
            argv = [tools["espeak-ng"], "-v", voice, "-s", str(int(round(175 * rate))), "-p", str(pitch),
                    "-w", wav, "-f", txt]
        cmds.append(argv)
        wavs.append(wav)
    _run_all(cmds, f"{engine} voice {voice}")
    out = []
    for wav in wavs:
        audio, sr = sf.read(wav, dtype="float64", always_2d=True)
        audio = audio.mean(axis=1)
        if sr != SAMPLE_RATE:
            g = math.gcd(sr, SAMPLE_RATE)
            audio = resample_poly(audio, SAMPLE_RATE // g, sr // g)
        out.append(audio)
    return out


def speech_track(rng, speaker: str, n: int, sr: int, ctx: dict, text_pool: str, tmp: str) -> Tuple[np.ndarray, dict]:
    """One speaker's utterances with 0.2-1.0 s pauses filling ``n`` samples (see the module docstring)."""
    engine, voice = SPEAKERS[speaker]
    rate, pitch = float(rng.uniform(0.88, 1.12)), int(np.clip(round(rng.normal(50, 8)), 20, 80))
    sentences = ctx["sentences"][text_pool]
    track = np.zeros(n)
    pos = int(rng.uniform(0, 0.8) * sr)
    count, spoken, batches = 0, 0.0, 0
    while pos < n - int(0.3 * sr) or count == 0:
        batches += 1
        if batches > 20:
            raise SpeechCorpusError(f"speaker {speaker}: 20 batches of utterances did not fill {n / sr:g} s")
        need = (n - pos) / sr + 1.0  # seconds still to fill, with a margin
        if engine == "asterisk":
            prompts, chosen, est = ctx["prompts"][voice], [], 0.0
            while est < need and len(chosen) < 40:
                path, size = prompts[int(rng.integers(len(prompts)))]
                chosen.append(path)
                est += size / 8000 + 0.6
            utts = decode_g722(chosen, ctx["tools"]["ffmpeg"], tmp)
        else:
            chosen, est = [], 0.0
            while est < need and len(chosen) < 20:
                s = sentences[int(rng.integers(len(sentences)))]
                chosen.append(s)
                est += len(s.split()) / (2.7 * rate) + 0.6
            utts = synthesize(engine, voice, chosen, ctx["tools"], tmp, rate, pitch)
        for u in utts:
            if pos >= n - int(0.3 * sr) and count:
                break
            u = _trim(u)
            if len(u) < 0.1 * sr:
                continue
            u = u * (0.1 * 10 ** (rng.normal(0, 1.5) / 20) / (_rms(u) + 1e-12))
            seg = u[:max(n - pos, 0)].copy()
            if len(seg) < len(u):  # cut at the end of the clip: fade out
                f = min(int(0.05 * sr), len(seg))
                seg[len(seg) - f:] *= np.linspace(1, 0, f)
            track[pos:pos + len(seg)] += seg
            spoken += len(seg) / sr
            count += 1
            pos += len(u) + int(rng.uniform(0.2, 1.0) * sr)
        if pos >= n:
            break
    info = {"speaker": speaker, "utterances": count, "speech_seconds": round(spoken, 2)}
    if engine != "asterisk":
        info["rate"] = round(rate, 3)
    if engine == "espeak":
        info["pitch"] = pitch
    return track, info


# --------------------------------------------------------------------------- reverb and mixing

EARLY_ORDER = 8  # image-source order of the early reflections; the late tail is modelled (see room_reverb)


def late_tail(rng, early: np.ndarray, sr: int, rt60: float) -> np.ndarray:
    """An impulse response from ``early`` (image-method early reflections): from 20 ms after the
    direct sound, cross-faded over 30 ms, Gaussian noise whose level falls 60 dB in ``rt60`` seconds,
    its energy matched to ``early`` over the cross-fade. (The image method alone needs orders of
    100+ in a small room at RT60 0.6 s, seconds per response; pyroomacoustics' ray tracing is not
    reproducible.)"""
    direct = int(np.argmax(np.abs(early)))
    t1 = direct + int(0.02 * sr)
    t2 = t1 + int(0.03 * sr)
    length = max(len(early), t1 + int(1.1 * rt60 * sr))
    rir = np.zeros(length)
    rir[:len(early)] = early
    t = (np.arange(length) - t1) / sr
    tail = rng.standard_normal(length) * 10 ** (-3 * np.maximum(t, 0) / rt60)
    tail *= np.sqrt(np.sum(rir[t1:t2] ** 2) / (np.sum(tail[t1:t2] ** 2) + 1e-20))
    fade = np.clip((np.arange(length) - t1) / (t2 - t1), 0, 1)
    return rir * (1 - fade) + tail * fade


def room_reverb(rng, speech: np.ndarray, noise: np.ndarray, sr: int) -> Tuple[np.ndarray, np.ndarray, dict]:
    """Both stems through one random small shoebox room: the speech and the machines at two
    positions, one microphone; early reflections by pyroomacoustics' image method, the late
    reverberation by :func:`late_tail`. Lengths are kept (the tails are cut)."""
    from scipy.signal import fftconvolve

    pra = import_pyroomacoustics()
    dims = np.array([rng.uniform(3, 8), rng.uniform(2.5, 6), rng.uniform(2.4, 3.5)])
    rt60 = float(rng.uniform(0.15, 0.6))
    absorption, max_order = pra.inverse_sabine(rt60, dims)
    room = pra.ShoeBox(dims, fs=sr, materials=pra.Material(absorption), max_order=min(max_order, EARLY_ORDER))

    def point():
        return dims * rng.uniform(0.15, 0.85, 3)

    mic, src_speech, src_noise = point(), point(), point()
    room.add_source(src_speech)
    room.add_source(src_noise)
    room.add_microphone(mic)
    room.compute_rir()
    rirs = [late_tail(rng, np.asarray(room.rir[0][k], dtype=np.float64), sr, rt60) for k in (0, 1)]
    n = len(speech)
    speech = fftconvolve(speech, rirs[0])[:n]
    noise = fftconvolve(noise, rirs[1])[:n]
    info = {"room_m": [round(float(d), 2) for d in dims], "rt60_s": round(rt60, 3),
            "measured_rt60_s": round(float(pra.experimental.measure_rt60(rirs[0], fs=sr)), 3),
            "speech_distance_m": round(float(np.linalg.norm(src_speech - mic)), 2),
            "noise_distance_m": round(float(np.linalg.norm(src_noise - mic)), 2)}
    return speech, noise, info


def mix(rng, speech: np.ndarray, noise: np.ndarray, snr_range: Tuple[float, float]):
    """Set the levels (speech -32..-22 dBFS, noise at an SNR drawn from ``snr_range``), scale the
    clip down if a peak would pass 0.99; float32 speech, noise and mixture = speech + noise."""
    level = float(rng.uniform(-32, -22))
    snr = float(rng.uniform(*snr_range))
    s = speech * (10 ** (level / 20) / (_rms(speech) + 1e-12))
    nz = noise * (_rms(s) / (_rms(noise) + 1e-12) / 10 ** (snr / 20))
    peak = max(np.abs(s + nz).max(), np.abs(s).max(), np.abs(nz).max())
    scale = 1.0
    if peak > PEAK:
        scale = PEAK * (1 - 1e-4) / peak
        s, nz = s * scale, nz * scale
    s32, n32 = s.astype(np.float32), nz.astype(np.float32)
    m32 = s32 + n32
    info = {"snr_db": round(snr, 3), "speech_dbfs": round(level + 20 * math.log10(scale), 2),
            "scaled_down_db": round(-20 * math.log10(scale), 2) + 0.0, "peak": round(float(np.abs(m32).max()), 4)}
    return m32, s32, n32, info


# --------------------------------------------------------------------------- one clip

_CTX: Optional[dict] = None  # the sources, set in each worker process


def _init_worker(ctx: dict) -> None:
    global _CTX
    _CTX = ctx


def _clip_hash(params: dict, split: str, index: int) -> str:
    blob = json.dumps({"params": params, "split": split, "index": index}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _cached(out: str, split: str, name: str, digest: str) -> Optional[dict]:
    try:
        with open(_meta_path(out, split, name)) as f:
            meta = json.load(f)
    except (OSError, ValueError):
        return None
    if meta.get("hash") == digest and all(os.path.isfile(p) for p in clip_paths(out, split, name)):
        return meta["info"]
    return None


def render_clip(rng, split: str, ctx: dict, clip_params: dict, tmp: str):
    """Speech track, noise scene, optional reverb and mix of one clip -> (mixture, speech, noise, info)."""
    sr = SAMPLE_RATE
    n = int(round(clip_params["clip_seconds"] * sr))
    pool = "test" if split == "test" else "train"
    speakers = TEST_SPEAKERS if split == "test" else TRAIN_SPEAKERS
    real = [s for s in speakers if SPEAKERS[s][0] == "asterisk"]
    synthetic = [s for s in speakers if SPEAKERS[s][0] != "asterisk"]
    speaker = (real[int(rng.integers(len(real)))] if rng.random() < REAL_SPEAKER_P
               else synthetic[int(rng.integers(len(synthetic)))])
    speech, info = speech_track(rng, speaker, n, sr, ctx, pool, tmp)
    noise, layers = noise_scene(rng, n, sr, ctx["noises"][pool], opensfx_sounds(ctx["opensfx"]))
    info["noise"] = layers
    if clip_params["reverb"]:
        speech, noise, info["reverb"] = room_reverb(rng, speech, noise, sr)
    m32, s32, n32, mix_info = mix(rng, speech, noise, tuple(clip_params["snr_range"]))
    info.update(mix_info)
    return m32, s32, n32, info


def make_clip(job) -> Tuple[str, str, Optional[dict], bool, Optional[str]]:
    """Render and write one clip unless cached (a process-pool job).
    Returns (split, name, info, rendered, error); a failure is returned, not raised."""
    out, split, index, name, params = job
    try:
        digest = _clip_hash(params, split, index)
        info = _cached(out, split, name, digest)
        if info is not None:
            return split, name, info, False, None
        meta_path = _meta_path(out, split, name)
        if os.path.exists(meta_path):
            os.remove(meta_path)  # stale: the files are about to change
        folder = os.path.join(out, split, name)
        if split != "unlabelled" and os.path.isdir(folder):  # leftovers of an interrupted write
            for entry in os.listdir(folder):
                if ".tmp-" in entry:
                    os.remove(os.path.join(folder, entry))
        rng = np.random.default_rng(np.random.SeedSequence([params["seed"], SPLIT_IDS[split], index]))
        with tempfile.TemporaryDirectory(prefix="pahubert-speech-") as tmp:
            m32, s32, n32, info = render_clip(rng, split, _CTX, params, tmp)
        paths = clip_paths(out, split, name)
        for path, audio in zip(paths, (m32, s32, n32)):
            _write_wav(path, audio)
        atomic_write_json(meta_path, {"hash": digest, "info": info})  # last: marks the clip done
        return split, name, info, True, None
    except Exception as e:  # noqa: BLE001 -- counted and reported by the caller
        return split, name, None, False, f"{type(e).__name__}: {e}"


# --------------------------------------------------------------------------- corpus on disk

def unlabelled_count(minutes: float, clip_seconds: float) -> int:
    """Clips of ``clip_seconds`` for ``minutes`` of unlabelled audio: ceil(minutes * 60 / clip_seconds)."""
    return int(math.ceil(minutes * 60 / clip_seconds - 1e-9))


def _remove_stale(out: str, names: Dict[str, List[str]]) -> int:
    """Remove clips of a previous, larger corpus and temporary files of interrupted writes (only
    names this generator writes); returns the number of clips removed."""
    removed = 0
    for split in SPLITS:
        keep = set(names[split])
        pattern = re.compile(rf"^({split}_\d+)(\.wav|\.json)?(\.tmp-\d+)?$")
        for folder in (os.path.join(out, "clips", split), os.path.join(out, split)):
            if not os.path.isdir(folder):
                continue
            for entry in os.listdir(folder):
                m = pattern.match(entry)
                if not m or (m.group(1) in keep and not m.group(3)):
                    continue
                path = os.path.join(folder, entry)
                if os.path.isdir(path):
                    shutil.rmtree(path)
                else:
                    os.remove(path)
                removed += int(folder == os.path.join(out, "clips", split) and not m.group(3))
    return removed


def generate_corpus(out, train_clips: int = 200, valid_clips: int = 20, test_clips: int = 40,
                    unlabelled_minutes: float = 60.0, clip_seconds: float = 10.0, seed: int = 0,
                    snr_range: Tuple[float, float] = (-5.0, 15.0), reverb: bool = False, jobs: int = 1,
                    overwrite: bool = False, progress: bool = True, asterisk_root: str = ASTERISK_ROOT,
                    opensfx: str = OPENSFX_CAT, text_dir: str = TEXT_DIR, ffmpeg: Optional[str] = None,
                    flite: Optional[str] = None, espeak_ng: Optional[str] = None) -> dict:
    """Write the corpus under ``out`` (see the module docstring) and return corpus.json's dict with
    ``rendered`` (clips rendered by this call), ``failed`` (``{clip: error}``) and ``seconds``."""
    t0 = time.time()
    out = os.fspath(out)
    if os.path.exists(out) and not os.path.isdir(out):
        raise ValueError(f"OUT {out} is a file, not a folder")
    if not (math.isfinite(clip_seconds) and 0.5 <= clip_seconds <= 600):
        raise ValueError(f"--clip-seconds must be between 0.5 and 600, got {clip_seconds}")
    if not (math.isfinite(unlabelled_minutes) and unlabelled_minutes >= 0):
        raise ValueError(f"--unlabelled-minutes must be finite and >= 0, got {unlabelled_minutes}")
    for opt, value in (("train-clips", train_clips), ("valid-clips", valid_clips), ("test-clips", test_clips)):
        if value < 0:
            raise ValueError(f"--{opt} must be >= 0, got {value}")
    lo, hi = map(float, snr_range)
    if not (math.isfinite(lo) and math.isfinite(hi) and lo <= hi):
        raise ValueError(f"--snr-range must be two finite numbers LOW <= HIGH, got {lo:g} {hi:g}")
    if jobs < 1:
        raise ValueError(f"--jobs must be >= 1, got {jobs}")
    ctx = prepare_sources(asterisk_root, opensfx, text_dir, ffmpeg, flite, espeak_ng, reverb)
    unlabelled = unlabelled_count(unlabelled_minutes, clip_seconds)
    names = clip_names(train_clips, valid_clips, test_clips, unlabelled)
    clip_params = {"version": SPEECH_VERSION, "seed": int(seed), "clip_seconds": float(clip_seconds),
                   "sample_rate": SAMPLE_RATE, "snr_range": [lo, hi], "reverb": bool(reverb),
                   "sources": ctx["fingerprint"]}
    options = {"train_clips": int(train_clips), "valid_clips": int(valid_clips), "test_clips": int(test_clips),
               "unlabelled_minutes": float(unlabelled_minutes), "unlabelled_clips": unlabelled,
               "clip_seconds": float(clip_seconds), "seed": int(seed), "snr_range": [lo, hi],
               "reverb": bool(reverb), "sample_rate": SAMPLE_RATE, "version": SPEECH_VERSION}

    meta_path = os.path.join(out, "corpus.json")
    ours = False
    if os.path.isfile(meta_path):
        try:
            with open(meta_path) as f:
                ours = json.load(f).get("generator") == PROG
        except (OSError, ValueError):
            ours = False
    folders = list(SPLITS) + ["clips"]
    used = [d for d in folders if os.path.isdir(os.path.join(out, d)) and os.listdir(os.path.join(out, d))]
    if used and not ours:
        if not overwrite:
            raise ValueError(f"{out} holds {', '.join(used)} but no corpus.json of {PROG}: choose another "
                             f"folder or pass --overwrite (which removes {', '.join(used)})")
        for d in used:
            shutil.rmtree(os.path.join(out, d))
    os.makedirs(out, exist_ok=True)
    removed = _remove_stale(out, names)

    jobs_list = [(out, split, i, nm, clip_params) for split in SPLITS for i, nm in enumerate(names[split])]
    def worker_died(job, e):
        return job[1], job[3], None, False, f"worker process failed: {type(e).__name__}: {e}"
    results = map_jobs(make_clip, jobs_list, jobs, "speech corpus", "clip", progress,
                       initializer=_init_worker, initargs=(ctx,), on_worker_error=worker_died)
    clips = {s: {} for s in SPLITS}
    failed, rendered = {}, 0
    for split, nm, info, did, error in results:
        if error is not None:
            failed[f"{split}/{nm}"] = error
            logger.error("%s/%s failed: %s", split, nm, error)
            continue
        clips[split][nm] = info
        rendered += int(did)
    speakers = {s: sorted({c["speaker"] for c in clips[s].values()}) for s in SPLITS}
    meta = {
        "generator": PROG, "status": "failed" if failed else "complete", "options": options,
        "layout": {"labelled": "<split>/<clip>/{mixture,speech,noise}.wav", "unlabelled": "unlabelled/<clip>.wav",
                   "clip_info": "clips/<split>/<clip>.json", "format": "WAV float32 mono 16 kHz"},
        "sources": {"asterisk_root": ctx["asterisk_root"], "asterisk_prompts": {k: len(v) for k, v in ctx["prompts"].items()},
                    "opensfx": ctx["opensfx"], "text_dir": ctx["text_dir"], "test_texts": list(TEST_TEXTS),
                    "sentences": {k: len(v) for k, v in ctx["sentences"].items()}, "versions": ctx["versions"],
                    "fingerprint": ctx["fingerprint"]},
        "speaker_pools": {"test": list(TEST_SPEAKERS), "train, valid, unlabelled": list(TRAIN_SPEAKERS)},
        "noise_pools": {"test": ctx["noises"]["test"], "train, valid, unlabelled": ctx["noises"]["train"]},
        "speakers": speakers,
        "clips_per_split": {s: len(clips[s]) for s in SPLITS},
        "seconds_per_split": {s: round(len(clips[s]) * clip_seconds, 3) for s in SPLITS},
        "speech_seconds_per_split": {s: round(sum(c["speech_seconds"] for c in clips[s].values()), 2)
                                     for s in SPLITS},
        "clips": clips,
    }
    if failed:
        meta["failed"] = failed
    atomic_write_json(meta_path, meta)
    meta["rendered"], meta["failed"], meta["removed"] = rendered, failed, removed
    meta["seconds"] = round(time.time() - t0, 2)
    logger.info("rendered %d of %d clips (%d cached, %d failed) in %.1f s", rendered, len(jobs_list),
                len(jobs_list) - rendered - len(failed), len(failed), meta["seconds"])
    return meta


def get_parser() -> argparse.ArgumentParser:
    description = (
        "Render speech in machine noise, 16 kHz mono float32 WAV: labelled clips "
        "OUT/{train,valid,test}/<clip>/{mixture,speech,noise}.wav (mixture = speech + noise exactly) and "
        "unlabelled mixtures OUT/unlabelled/<clip>.wav (the folder to give pahubert-manifest), plus "
        "OUT/corpus.json. Speech: recorded Asterisk prompts (en, es) and flite/espeak-ng voices reading "
        "Debian's licence texts; test speakers and test noises are never in the other splits. Noise: "
        "OpenTTD's OpenSFX machine and vehicle recordings and procedural machines, layered into scenes. "
        "Deterministic for a seed whatever --jobs; finished clips are reused.")
    packages = ("Needs the Debian packages ffmpeg, flite, espeak-ng, asterisk-core-sounds-en-g722, "
                "asterisk-core-sounds-es-g722 and openttd-opensfx (apt-get install ...); --reverb needs "
                f"pip install {PYROOMACOUSTICS}.")
    wrap = functools.partial(textwrap.fill, width=100, break_on_hyphens=False, break_long_words=False)
    p = argparse.ArgumentParser(prog=PROG, description=wrap(description) + "\n\n" + wrap(packages),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", help="output folder")
    p.add_argument("--train-clips", type=int, default=200, help="labelled training clips (default 200)")
    p.add_argument("--valid-clips", type=int, default=20, help="labelled validation clips (default 20)")
    p.add_argument("--test-clips", type=int, default=40,
                   help="labelled test clips, unseen speakers and noises (default 40)")
    p.add_argument("--unlabelled-minutes", type=float, default=60.0, metavar="M",
                   help="minutes of unlabelled mixtures (ceil(M * 60 / clip seconds) clips; default 60)")
    p.add_argument("--clip-seconds", type=float, default=10.0, help="clip length in seconds (default 10)")
    p.add_argument("--snr-range", type=float, nargs=2, default=(-5.0, 15.0), metavar=("LOW", "HIGH"),
                   help="speech-to-noise ratio in dB drawn per clip (default -5 15)")
    p.add_argument("--reverb", action="store_true",
                   help="put speech and noise in one random small room per clip (pyroomacoustics)")
    p.add_argument("--seed", type=int, default=0, help="corpus seed (default 0)")
    p.add_argument("--jobs", type=int, default=1, help="worker processes (default 1); the output does not depend on it")
    p.add_argument("--overwrite", action="store_true",
                   help="clear OUT's split folders when they hold something other than this generator's corpus")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    src = p.add_argument_group("sources (defaults: the Debian packages' paths)")
    src.add_argument("--asterisk-root", default=ASTERISK_ROOT,
                     help=f"folder holding the en/ and es/ G.722 prompts, only those two are read (default {ASTERISK_ROOT})")
    src.add_argument("--opensfx", default=OPENSFX_CAT, help=f"OpenSFX catalogue (default {OPENSFX_CAT})")
    src.add_argument("--text-dir", default=TEXT_DIR, help=f"prose the synthetic voices read (default {TEXT_DIR})")
    for name, (_, env) in TOOLS.items():
        src.add_argument(f"--{name}", default=None, metavar="PATH",
                         help=f"{name} executable (default ${env} or {name} on PATH)")
    return p


@prints_command_errors
def main(argv: Optional[List[str]] = None) -> int:
    args = get_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        meta = generate_corpus(args.out, args.train_clips, args.valid_clips, args.test_clips,
                               args.unlabelled_minutes, args.clip_seconds, args.seed, tuple(args.snr_range),
                               args.reverb, args.jobs, args.overwrite, not args.no_progress, args.asterisk_root,
                               args.opensfx, args.text_dir, getattr(args, "ffmpeg"), getattr(args, "flite"),
                               getattr(args, "espeak_ng"))
    except (ValueError, SpeechCorpusError) as e:
        raise CommandError(f"{PROG}: error: {e}")
    except OSError as e:  # a full disk or an unwritable folder: one line naming the file
        raise CommandError(f"{PROG}: error: {write_error(e.filename or args.out, e)}") from None
    counts, secs = meta["clips_per_split"], meta["seconds_per_split"]
    print(f"speech corpus in {args.out}: " + ", ".join(f"{counts[s]} {s}" for s in SPLITS)
          + f" clips of {args.clip_seconds:g} s ({secs['unlabelled'] / 3600:.2f} h unlabelled); "
          f"speakers train {len(meta['speakers']['train'])}, test {len(meta['speakers']['test'])}; "
          f"{meta['rendered']} rendered now in {meta['seconds']:.1f} s")
    if meta["failed"]:
        print(f"{PROG}: {len(meta['failed'])} clips failed (see the log above and corpus.json)")
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
