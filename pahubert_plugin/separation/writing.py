"""Stem files: output formats, clip modes, file names, and writing stems whole or block by block.

* :data:`FORMATS`, :func:`subtype_for`, :func:`check_mp3_writer`: what ``pahubert-separate`` can write;
* :data:`CLIP_MODES`, :func:`prevent_clip`, :func:`clip_divisor`: demucs' ways of avoiding clipping;
* :func:`stem_path`: demucs' ``--filename`` template (:data:`DEFAULT_FILENAME`);
* :func:`save_stems` writes separated stems held in memory;
* :class:`StemWriter` writes one stem in chunks; ``clip_mode="rescale"`` needs the whole
  stem's peak first, so it spools float32 to a temporary file and rescales on a second pass.
  The file appears under its name only when it is complete (a hidden ``.part`` file first).

This module imports no torch (what it is handed is already a tensor), so the command line's
parser can use its constants and answer ``--help`` at once.
"""
from __future__ import annotations

import os
import re
import tempfile
from typing import TYPE_CHECKING, Dict, List

import numpy as np
import soundfile as sf

from ..data.audio import _SFC_SET_ADD_PEAK_CHUNK

if TYPE_CHECKING:
    import torch

FORMATS = {"wav": "WAV", "flac": "FLAC", "mp3": "MP3"}
CLIP_MODES = ("rescale", "clamp", "none")
DEFAULT_FILENAME = "{track}/{stem}.{ext}"
SPOOL_FRAMES = 1 << 16  # frames per write when rescaling a spooled stem


PART_NAME = re.compile(r"^\.(?P<name>.+\.(?:%s))\.part$" % "|".join(FORMATS))  # what StemWriter writes first


def part_path(path: str) -> str:
    """The hidden file a stem is written to before it appears as ``path``: ``.<name>.part`` beside it."""
    folder, name = os.path.split(os.path.abspath(path))
    return os.path.join(folder, f".{name}.part")


def remove_stale_parts(out_dir: str) -> List[str]:
    """Remove the ``.<stem>.<ext>.part`` files under ``out_dir`` that an earlier run left behind when it
    was killed (only files of :class:`StemWriter`'s naming, wav/flac/mp3); returns their paths."""
    removed = []
    for root, _, files in os.walk(out_dir):
        for name in sorted(files):
            if PART_NAME.match(name):
                path = os.path.join(root, name)
                try:
                    os.remove(path)
                except FileNotFoundError:
                    continue
                removed.append(path)
    return removed


class StemWriteError(OSError):
    """A stem could not be written (the reason is in the message)."""


def clip_divisor(peak: float) -> float:
    """What demucs' ``rescale`` clip mode divides a stem whose peak is ``peak`` by."""
    return max(1.01 * peak, 1.0)


class StemWriter:
    """Write one stem block by block to ``path`` (wav/flac/mp3, a soundfile ``subtype``).

    The file appears under its name only when :meth:`close` succeeds (it is written as a
    hidden ``.part`` file first); :meth:`abort` removes what was written.  ``clip_mode`` is as
    :func:`prevent_clip`; ``rescale`` spools float32 to a temporary
    file next to the output, then writes the rescaled stem on close.
    """

    def __init__(self, path: str, sample_rate: int, channels: int, fmt: str, subtype: str,
                 clip_mode: str = "rescale", mp3_level: float = 0.0):
        if clip_mode not in CLIP_MODES:
            raise ValueError(f"clip mode must be one of {', '.join(CLIP_MODES)}, got {clip_mode!r}")
        self.path, self.clip_mode, self.channels = path, clip_mode, channels
        self.peak = 0.0
        folder = os.path.dirname(os.path.abspath(path))
        self.part = part_path(path)
        self.file = self.spool = None
        try:
            os.makedirs(folder, exist_ok=True)
            if os.path.isdir(path):
                raise IsADirectoryError(f"{path} is a folder")
            extra = ({"bitrate_mode": "CONSTANT", "compression_level": mp3_level} if fmt == "mp3" else {})
            self.file = sf.SoundFile(self.part, "w", sample_rate, channels, subtype=subtype,
                                     format=FORMATS[fmt], **extra)
            if subtype in ("FLOAT", "DOUBLE"):  # no PEAK chunk: equal audio gives equal bytes (write_audio)
                from soundfile import _ffi, _snd

                _snd.sf_command(self.file._file, _SFC_SET_ADD_PEAK_CHUNK, _ffi.NULL, 0)
            if clip_mode == "rescale":
                self.spool = tempfile.TemporaryFile(dir=folder, prefix=".pahubert-spool-")
        except (OSError, RuntimeError) as e:
            self.abort()
            raise StemWriteError(f"{path}: {e}") from None

    def write(self, block: torch.Tensor) -> None:
        """``block (channels, n)`` float audio, before clip handling."""
        block = block.float()
        try:
            if self.clip_mode == "rescale":
                if block.numel():
                    self.peak = max(self.peak, float(block.abs().max()))
                self.spool.write(np.ascontiguousarray(block.numpy().T).tobytes())
            else:
                self.file.write(np.ascontiguousarray(_clip(block, self.clip_mode).numpy().T))
        except (OSError, RuntimeError) as e:
            raise StemWriteError(f"{self.path}: {e}") from None

    def close(self) -> None:
        import torch

        try:
            if self.spool is not None:
                divisor = clip_divisor(self.peak)
                self.spool.seek(0)
                while True:
                    raw = self.spool.read(SPOOL_FRAMES * self.channels * 4)
                    if not raw:
                        break
                    data = np.frombuffer(raw, dtype=np.float32).reshape(-1, self.channels)
                    block = torch.from_numpy(data.copy()) / divisor  # the in-memory path's division
                    self.file.write(block.numpy())
                self.spool.close()
                self.spool = None
            self.file.close()
            os.replace(self.part, self.path)
        except (OSError, RuntimeError) as e:
            self.abort()
            raise StemWriteError(f"{self.path}: {e}") from None

    def abort(self) -> None:
        for f in (self.spool, self.file):
            if f is not None:
                try:
                    f.close()
                except (OSError, RuntimeError):
                    pass
        self.spool = self.file = None
        if os.path.exists(self.part):
            os.remove(self.part)


def _clip(block: torch.Tensor, mode: str) -> torch.Tensor:
    return block.clamp(-0.99, 0.99) if mode == "clamp" else block


def prevent_clip(wav, mode: str = "rescale"):
    """demucs' clip modes: ``rescale`` the whole stem below full scale, ``clamp`` samples, or ``none``."""
    if mode == "rescale":
        return wav / clip_divisor(float(wav.abs().max()))
    if mode == "clamp":
        return wav.clamp(-0.99, 0.99)
    if mode == "none":
        return wav
    raise ValueError(f"clip mode must be one of {', '.join(CLIP_MODES)}, got {mode!r}")


def subtype_for(fmt: str, bits: int = 16, as_float: bool = False) -> str:
    """soundfile subtype of an output format; a ValueError for combinations it cannot store."""
    if fmt not in FORMATS:
        raise ValueError(f"output format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    if fmt == "mp3":
        if as_float or bits != 16:
            raise ValueError("mp3 output has no bit depth: drop --int24/--float32")
        return "MPEG_LAYER_III"
    if as_float:
        if fmt == "flac":
            raise ValueError("FLAC stores integers only: use --int24 for FLAC, or --float32 with wav")
        return "FLOAT"
    if bits not in (16, 24):
        raise ValueError(f"bits must be 16 or 24, got {bits}")
    return f"PCM_{bits}"


def check_mp3_writer() -> None:
    """A ValueError when the installed libsndfile cannot encode mp3 (it can from 1.1.0)."""
    if "MP3" not in sf.available_formats():
        raise ValueError(f"--mp3 needs libsndfile >= 1.1.0 with mp3 support; this soundfile uses libsndfile "
                         f"{sf.__libsndfile_version__}. Write --flac or wav and convert, or upgrade soundfile")


def stem_path(out_dir: str, filename: str, track: str, stem: str, ext: str, trackext: str = "") -> str:
    """``out_dir/filename`` with demucs' template fields ``{track} {trackext} {stem} {ext}``."""
    try:
        rel = filename.format(track=track, trackext=trackext, stem=stem, ext=ext)
    except (KeyError, IndexError, ValueError) as e:
        raise ValueError(f"--filename {filename!r}: unknown or bad field ({e}); use {{track}}, {{trackext}}, "
                         f"{{stem}} and {{ext}}, e.g. {DEFAULT_FILENAME!r}") from None
    norm = os.path.normpath(rel)
    if os.path.isabs(rel) or norm == os.pardir or norm.startswith(os.pardir + os.sep):
        raise ValueError(f"--filename {filename!r} gives {rel!r}, which leaves the output folder {out_dir}; "
                         f"use a relative path without '..', e.g. {DEFAULT_FILENAME!r}")
    return os.path.join(out_dir, rel)


def save_stems(stems: Dict, sample_rate: int, out_dir: str, track: str, filename: str = DEFAULT_FILENAME,
               fmt: str = "wav", bits: int = 16, as_float: bool = False, clip_mode: str = "rescale",
               mp3_bitrate: int = 320, trackext: str = "") -> List[str]:
    """Write ``{stem: (channels, samples)}`` as ``out_dir/filename`` (wav/flac/mp3); returns the paths.

    Every stem goes through :func:`prevent_clip` (``clip_mode``) first, as in demucs; mp3 is
    constant bit rate ``mp3_bitrate`` kbit/s (libsndfile's LAME encoder)."""
    import torch

    from ..data.audio import write_audio

    subtype = subtype_for(fmt, bits, as_float)
    if fmt == "mp3":
        check_mp3_writer()
    paths = []
    for stem, wav in stems.items():  # the streaming twin is Separator.separate_to_files
        wav = prevent_clip(torch.as_tensor(wav).float(), clip_mode)
        path = stem_path(out_dir, filename, track, stem, fmt, trackext)
        if fmt == "mp3":
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            data = wav.detach().cpu().numpy().T if wav.dim() > 1 else wav.detach().cpu().numpy()
            with sf.SoundFile(path, "w", sample_rate, data.shape[1] if data.ndim > 1 else 1, subtype=subtype,
                              format="MP3", bitrate_mode="CONSTANT",
                              compression_level=_mp3_level(mp3_bitrate)) as f:
                f.write(data)
        else:
            write_audio(path, wav, sample_rate, subtype=subtype)
        paths.append(path)
    return paths


def _mp3_level(kbps: int) -> float:
    """libsndfile's compression level for a constant mp3 bit rate: 0 = 320 kbit/s ... 1 = 32 kbit/s."""
    if not 32 <= kbps <= 320:
        raise ValueError(f"mp3 bit rate must be 32-320 kbit/s, got {kbps}")
    return min((320 - kbps) / (320 - 32), 0.99)  # libsndfile refuses 1.0; 0.99 is 32 kbit/s too
