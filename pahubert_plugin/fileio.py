"""Atomic file writes: a file appears under its name complete, or not at all.

Every writer here writes a temporary file in the destination's folder (so the final
``os.replace`` is a rename within one file system), flushes it to disk (``fsync``), and replaces the
destination in one step; if writing fails, the temporary file is removed and the destination is
untouched (an older version stays as it was). The destination's folder is created if missing.

Used by the corpus generators (songs, ``song.json``, ``corpus.json``) and ``pahubert-evaluate``
(per-track scores), whose re-runs trust that a file that exists is whole. :func:`write_error` and
:func:`full_disk_exits` turn a full disk into one line naming the file, for every console script. Standard library,
numpy and soundfile only.
"""
import errno
import json
import os
from typing import Callable, Optional


def atomic_write(path, write: Callable[[str], None], tmp: Optional[str] = None) -> None:
    """``write(tmp)`` fills a temporary file next to ``path`` (default name ``PATH.tmp-PID``), which then
    replaces ``path``. A write that fails on a full disk raises ``OSError(ENOSPC)`` naming ``path``,
    whatever the writer said."""
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = tmp or f"{path}.tmp-{os.getpid()}"
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
        if getattr(e, "errno", None) is None and disk_full(e, os.path.dirname(os.path.abspath(path))):
            # libsndfile says only "System error.", numpy's tofile "N requested and M written"
            raise OSError(errno.ENOSPC, f"No space left on device ({e})", path) from e
        if disk_full(e) and getattr(e, "filename", None) is None:  # name the file the system did not
            raise OSError(e.errno, e.strerror, path) from e
        raise


def write_error(path, error: BaseException, what: str = "write") -> Optional[str]:
    """One line for an ``OSError`` met while writing ``path`` (``None`` for any other error): the file
    meant (not the temporary the error may name), the system's reason and, for a full disk or quota, what
    to do; e.g. ``cannot write ckpt/x.pt: No space left on device (free space in ckpt, or give another
    folder, then rerun: finished work is kept)``."""
    if not isinstance(error, OSError):
        return None
    folder = os.path.dirname(os.path.abspath(os.fspath(path))) or "."
    reason = error.strerror or str(error)
    full = disk_full(error, folder)
    if full and error.errno is None:  # a short write (numpy's tofile) on a full disk
        reason = f"No space left on device ({reason})"
    line = f"cannot {what} {os.fspath(path)}: {reason}"
    if full:
        line += f" (free space in {folder}, or give another folder, then rerun: finished work is kept)"
    return line


def disk_full(error: BaseException, folder=None) -> bool:
    """Whether ``error`` is a full disk (or quota): ``ENOSPC``/``EDQUOT``, or an error without an errno
    (libsndfile's "System error.", numpy's short writes) while ``folder``'s file system has < 1 MiB free."""
    code = getattr(error, "errno", None)
    if code in (errno.ENOSPC, errno.EDQUOT):
        return True
    return (code is None and folder is not None and isinstance(error, (OSError, RuntimeError))
            and _free_bytes(os.path.abspath(os.fspath(folder))) < 1 << 20)


class CommandError(SystemExit):
    """A console script's one-line error, exit status 2 like argparse's and the other scripts' errors; ``str()``
    is the line. :func:`prints_command_errors` on the script's ``main`` prints it as the script ends; a library
    caller that catches it sees nothing printed."""

    def __init__(self, line: str):
        super().__init__(2)
        self.line = line

    def __str__(self) -> str:
        return self.line


def prints_command_errors(main):
    """Decorator for a console script's ``main``: a :class:`CommandError` raised below it is printed to stderr
    (its one line) and ends the script with exit status 2."""
    import functools
    import sys

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except CommandError as e:
            print(e.line, file=sys.stderr, flush=True)
            raise
    return wrapper


def full_disk_exits(prog: str):
    """Decorator for a console script's ``main``: a full disk anywhere below it ends in one line,
    ``PROG: error: cannot write FILE: No space left on device (...)``, and exit status 2, instead of a
    traceback. Other errors pass through."""
    import functools
    import sys

    def decorate(main):
        @functools.wraps(main)
        def wrapper(*args, **kwargs):
            try:
                return main(*args, **kwargs)
            except OSError as e:
                if not disk_full(e):
                    raise
                print(f"{prog}: error: {write_error(e.filename or '(file not named by the system)', e)}",
                      file=sys.stderr, flush=True)
                return 2
        return wrapper
    return decorate


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

