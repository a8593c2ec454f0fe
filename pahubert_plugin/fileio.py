"""Atomic file writes: a file appears under its name complete, or not at all.

Every writer here writes a temporary file in the destination's folder (so the final
``os.replace`` is a rename within one file system), flushes it to disk (``fsync``), and replaces the
destination in one step; if writing fails, the temporary file is removed and the destination is
untouched (an older version stays as it was). The destination's folder is created if missing.

Used by the corpus generators (songs, ``song.json``, ``corpus.json``) and ``pahubert-evaluate``
(per-track scores), whose re-runs trust that a file that exists is whole. Standard library,
numpy and soundfile only.
"""
import errno
import json
import os
from typing import Callable, Optional


def atomic_write(path, write: Callable[[str], None]) -> None:
    """``write(tmp)`` fills a temporary file next to ``path``, which then replaces ``path``. A write that
    fails on a full disk raises ``OSError(ENOSPC)`` naming ``path``, whatever the writer said."""
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        try:
            os.remove(tmp)
        except OSError:
            pass
        full = getattr(e, "errno", None) in (errno.ENOSPC, errno.EDQUOT)
        if isinstance(e, (OSError, RuntimeError)) and not full and _free_bytes(os.path.dirname(path)) < 1 << 20:
            # libsndfile says only "System error.", numpy's tofile "N requested and M written"
            raise OSError(errno.ENOSPC, f"No space left on device ({e})", path) from e
        raise


def write_error(path, error: BaseException, what: str = "write") -> Optional[str]:
    """One line for an ``OSError`` met while writing ``path`` (``None`` for any other error): the file meant
    (not the temporary the error may name), the system's reason and, for a full disk or quota, what to do; e.g. ``cannot write ckpt/x.pt: No space left
    on device (free space in ckpt, or give another folder, then rerun: finished work is kept)``."""
    if not isinstance(error, OSError):
        return None
    folder = os.path.dirname(os.path.abspath(os.fspath(path))) or "."
    reason = error.strerror or str(error)
    full = error.errno in (errno.ENOSPC, errno.EDQUOT)
    if error.errno is None and _free_bytes(folder) < 1 << 20:  # a short write (numpy's tofile) on a full disk
        full, reason = True, f"No space left on device ({reason})"
    line = f"cannot {what} {os.fspath(path)}: {reason}"
    if full:
        line += f" (free space in {folder}, or give another folder, then rerun: finished work is kept)"
    return line


def _free_bytes(folder: str) -> int:
    """Free bytes of the file system holding ``folder`` (or its nearest existing parent)."""
    import shutil

    while not os.path.isdir(folder) and os.path.dirname(folder) != folder:
        folder = os.path.dirname(folder)
    try:
        return shutil.disk_usage(folder).free
    except OSError:
        return 1 << 62


def atomic_write_bytes(path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically."""
    def write(tmp):
        with open(tmp, "wb") as f:
            f.write(data)

    atomic_write(path, write)


def atomic_write_text(path, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path, obj, indent: int = 1, sort_keys: bool = True) -> None:
    """``json.dumps(obj, indent, sort_keys)`` plus a final newline, written atomically."""
    atomic_write_text(path, json.dumps(obj, indent=indent, sort_keys=sort_keys) + "\n")


def atomic_write_wav(path, data, sample_rate: int, subtype: str = "PCM_16") -> None:
    """Write ``data`` ``(samples, channels)`` or ``(samples,)`` as a WAV file atomically.

    Float WAVs are written without libsndfile's PEAK chunk, which holds the time of writing, so
    the same audio gives the same bytes (as :func:`pahubert_plugin.data.audio.write_audio`)."""
    import numpy as np
    import soundfile as sf

    from .data.audio import _SFC_SET_ADD_PEAK_CHUNK

    data = np.ascontiguousarray(data)

    def write(tmp):
        channels = data.shape[1] if data.ndim > 1 else 1
        with sf.SoundFile(tmp, "w", sample_rate, channels, subtype=subtype, format="WAV") as f:
            if subtype in ("FLOAT", "DOUBLE"):
                from soundfile import _ffi, _snd

                _snd.sf_command(f._file, _SFC_SET_ADD_PEAK_CHUNK, _ffi.NULL, 0)
            f.write(data)

    atomic_write(path, write)

