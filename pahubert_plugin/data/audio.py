"""All audio reading: soundfile decode, seek-based crops, channel policy, resampling.

Every module that reads audio goes through :func:`read_audio` so the rules live in one
place: float32 ``(channels, samples)``; ``offset``/``num_samples`` are counted at the
*target* rate; a crop seeks instead of decoding the whole file; an unreadable, truncated
or non-finite file raises :class:`AudioError` naming the file and the reason.

torch is imported by :func:`read_audio` when it first runs, not here: the console scripts that
only need :data:`AUDIO_EXTENSIONS` or :func:`audio_info` answer ``--help`` at once.
"""
from __future__ import annotations

import dataclasses
import math
import os
import re
import sys
from typing import TYPE_CHECKING, Optional, Tuple

import numpy as np
import soundfile as sf

if TYPE_CHECKING:
    import torch

AUDIO_EXTENSIONS = ("wav", "flac", "mp3", "ogg")
# The channel policy: every reader turns mono or stereo into what it needs (mono duplicated,
# stereo downmixed); files with more channels are skipped at manifest time.
MAX_CHANNELS = 2
# mp3 frame counts from the header are estimates: tolerate one decoder frame of slack.
MP3_SLACK = 1152 * 2


class AudioError(ValueError):
    """An audio file could not be used; ``path`` and ``reason`` say which and why."""

    def __init__(self, path, reason: str):
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{path}: {reason}")


@dataclasses.dataclass(frozen=True)
class AudioInfo:
    path: str
    sample_rate: int
    num_samples: int  # per channel, at sample_rate (soundfile calls them frames)
    channels: int
    format: str

    @property
    def seconds(self) -> float:
        return self.num_samples / self.sample_rate

    def samples_at(self, sample_rate: int) -> int:
        """Length in samples once resampled to ``sample_rate`` (what read_audio returns)."""
        return resampled_length(self.num_samples, self.sample_rate, sample_rate)


def resampled_length(samples: int, orig_sr: int, new_sr: int) -> int:
    if orig_sr == new_sr:
        return int(samples)
    return int(math.ceil(samples * new_sr / orig_sr))


def _declared_wav_frames(sf_file: sf.SoundFile) -> Optional[int]:
    """Frames the WAV header promises, from libsndfile's parse log (None if unknown)."""
    log = sf_file.extra_info or ""
    m = re.search(r"data : (\d+)(?: \(should be (\d+)\))?", log)
    if not m or not m.group(2):
        return None
    bytes_per_frame = sf_file.channels * _bytes_per_sample(sf_file.subtype)
    return int(m.group(1)) // bytes_per_frame if bytes_per_frame else None


def _bytes_per_sample(subtype: str) -> int:
    return {"PCM_U8": 1, "PCM_S8": 1, "PCM_16": 2, "PCM_24": 3, "PCM_32": 4,
            "FLOAT": 4, "DOUBLE": 8}.get(subtype, 0)


def audio_info(path) -> AudioInfo:
    """Header information; raises AudioError for unreadable or truncated files."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise AudioError(path, "no such file")
    try:
        with sf.SoundFile(path) as f:
            info = AudioInfo(path, int(f.samplerate), int(f.frames), int(f.channels), f.format)
            declared = _declared_wav_frames(f) if f.format == "WAV" else None
    except (RuntimeError, sf.LibsndfileError) as e:
        raise AudioError(path, f"unreadable ({e})") from None
    if declared is not None and declared > info.num_samples:
        raise AudioError(path, f"truncated: header declares {declared} frames, file holds {info.num_samples}")
    if info.num_samples <= 0:
        raise AudioError(path, "no audio frames")
    return info


def apply_channel_policy(wav, channels: Optional[int], path="<array>"):
    """THE channel rule (files, datasets, separation input): ``wav`` (channels, samples), a numpy
    array or a torch tensor. ``channels=1`` downmixes (mean); mono becomes ``channels`` identical
    channels; None keeps; anything else is an :class:`AudioError` naming ``path``."""
    have = wav.shape[0]
    if channels is None or channels == have:
        return wav
    numpy = isinstance(wav, np.ndarray)
    if channels == 1:
        return wav.mean(axis=0, keepdims=True) if numpy else wav.mean(dim=0, keepdim=True)
    if have == 1:
        return np.repeat(wav, channels, axis=0) if numpy else wav.expand(channels, -1)
    raise AudioError(path, f"has {have} channels; cannot turn them into {channels} (mono and {channels} "
                           f"channels are accepted)")


def read_audio(
    path,
    sample_rate: Optional[int] = None,
    channels: Optional[int] = None,
    offset: int = 0,
    num_samples: Optional[int] = None,
    info: Optional[AudioInfo] = None,
) -> Tuple[torch.Tensor, int]:
    """Read ``path`` as float32 ``(channels, samples)`` at ``sample_rate`` (native if None).

    ``offset`` and ``num_samples`` are counted at the output rate; only that span is decoded.
    A request that runs past the end of the file raises (it would be silently mis-timed).
    Returns the waveform and its sample rate.
    """
    import torch
    import torchaudio.functional as AF

    path = os.fspath(path)
    info = info or audio_info(path)
    src_sr = info.sample_rate
    out_sr = sample_rate or src_sr
    total = info.samples_at(out_sr)
    if num_samples is None or num_samples < 0:
        num_samples = total - offset
    if offset < 0 or num_samples <= 0 or offset + num_samples > total + (MP3_SLACK if info.format == "MP3" else 0):
        raise AudioError(path, f"cannot read {num_samples} samples at offset {offset}: file has {total} at {out_sr} Hz")

    # Span in source samples, with a small margin so the resampler has context at both ends.
    # When resampling, the span starts on a sample shared by both rates' grids (a multiple of
    # src / gcd), so the crop lands on exactly the samples of a full read's output.
    src_start = int(math.floor(offset * src_sr / out_sr))
    src_stop = int(math.ceil((offset + num_samples) * src_sr / out_sr))
    if src_sr == out_sr:
        lo, hi = src_start, src_stop
    else:
        step = src_sr // math.gcd(src_sr, out_sr)
        lo = max(0, src_start - 64) // step * step
        hi = min(info.num_samples, src_stop + 64)
    try:
        with sf.SoundFile(path) as f:
            if lo:
                f.seek(lo)
            data = f.read(hi - lo, dtype="float32", always_2d=True)
    except (RuntimeError, sf.LibsndfileError) as e:
        raise AudioError(path, f"decode failed ({e})") from None
    short = (hi - lo) - data.shape[0]
    if short > (MP3_SLACK if info.format == "MP3" else 0):
        raise AudioError(path, f"truncated: expected {hi - lo} frames from {lo}, decoded {data.shape[0]}")
    if not np.isfinite(data).all():
        raise AudioError(path, "contains NaN or infinite samples")

    wav = apply_channel_policy(np.ascontiguousarray(data.T), channels, path)
    out = torch.from_numpy(wav)
    if src_sr != out_sr:
        out = AF.resample(out, src_sr, out_sr)
        out = out[:, offset - lo * out_sr // src_sr:]  # drop the left margin (exact: see above)
    out = out[:, :num_samples]
    if out.shape[1] < num_samples:  # mp3 slack or resampler rounding: a few samples at most
        out = torch.nn.functional.pad(out, (0, num_samples - out.shape[1]))
    return out.contiguous(), out_sr


_SFC_SET_ADD_PEAK_CHUNK = 0x1050  # libsndfile command (sndfile.h)


def write_audio(path, wav, sample_rate: int, subtype: str = "PCM_16") -> None:
    """Write ``(channels, samples)`` float audio; the parent folder is created.

    Float WAVs are written without libsndfile's PEAK chunk, which holds the time of writing:
    the same audio then gives the same bytes (the corpora promise byte-identical files).
    """
    torch = sys.modules.get("torch")  # not imported here: a tensor means torch is loaded already
    is_tensor = torch is not None and isinstance(wav, torch.Tensor)
    wav = wav.detach().cpu().numpy() if is_tensor else np.asarray(wav)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    data = np.ascontiguousarray(wav.T)
    with sf.SoundFile(path, "w", sample_rate, data.shape[1] if data.ndim > 1 else 1, subtype=subtype) as f:
        if subtype in ("FLOAT", "DOUBLE"):
            from soundfile import _ffi, _snd

            _snd.sf_command(f._file, _SFC_SET_ADD_PEAK_CHUNK, _ffi.NULL, 0)
        f.write(data)
