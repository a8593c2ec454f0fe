"""Memory and process helpers for long separations and their worker processes.

* :func:`return_freed_memory`: freed activations go back to the operating system (glibc ``mallopt``);
* :func:`drop_gpu_library_pages`, :func:`drop_file_pages`: drop clean file pages a CPU run no longer
  needs (``madvise`` over ``/proc/self/smaps``);
* :func:`die_with_parent`: a worker process ends with its parent, however the parent ends.

Standard library only (no torch), Linux/glibc-specific calls degrade to doing nothing elsewhere.
"""
import ctypes
import os
import re
import signal
import sys
import threading
import time

MMAP_THRESHOLD = 1 << 20  # bytes


def return_freed_memory() -> bool:
    """Make freed activations go back to the operating system (glibc only; True when set).

    glibc serves an allocation from the heap unless it is larger than its mmap threshold, and raises that
    threshold (up to 32 MiB) each time a block it had mmapped is freed; after the first chunk, tensors of a
    few MiB to 32 MiB then live in the heap, where fragmentation keeps freed memory resident, and a
    process's RSS climbs with every chunk or tile of a different size. ``mallopt(M_MMAP_THRESHOLD, 1 MiB)``
    fixes the threshold: every block of 1 MiB or more is its own mapping, unmapped when freed. Process-wide;
    ``pahubert-separate`` and ``Separator(tile=...)`` call it (docs/PERFORMANCE.md)."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # not glibc (macOS, musl without mallopt): nothing to do
        return False
    M_MMAP_THRESHOLD = -3  # malloc.h
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD))


# shared libraries that only a GPU run executes: the CUDA runtime and its maths libraries (PyPI's torch
# wheels for Linux link them into every process, CPU-only runs included)
GPU_LIBRARIES = re.compile(r"/nvidia/|/lib(torch_cuda|c10_cuda|cudnn|nccl|cublas|cusparse|cufft|curand|cusolver|"
                           r"nvrtc|nvJitLink|cupti|cufile|nvshmem|triton)[^/]*$")


def drop_gpu_library_pages() -> float:
    """Drop this process's resident pages of GPU-only shared libraries; the MiB dropped (0 off Linux).

    Loading PyPI's CUDA build of torch maps the CUDA libraries (cuBLASLt, NVRTC, nvJitLink, ...) and
    touches about 270 MiB of their pages, which then count in the resident memory of a CPU-only run for its
    whole life. Only clean pages are dropped: read-only file mappings that hold no private (copy-on-write)
    page, i.e. exactly what the kernel may reclaim on its own under memory pressure; a page touched again is
    read back from the file, so nothing a program computes can change. Call it once the model is built, for
    runs on the CPU (``pahubert-separate`` does; docs/PERFORMANCE.md)."""
    return _drop_clean_pages(lambda m: "w" not in m["perms"] and GPU_LIBRARIES.search(m["path"]))


def drop_file_pages(path: str) -> float:
    """Drop this process's resident pages of the mappings of the file ``path`` that hold no private
    (copy-on-write) page; the MiB dropped (0 off Linux).

    For a checkpoint mapped by :func:`~pahubert_plugin.checkpoint.mapped_loads`: the model's tensors are
    views of the file, and :func:`~pahubert_plugin.separation.inference.optimize_for_inference` replaces some of them (channels_last copies, folded
    convolutions) after reading them, so the file pages of the replaced weights stay resident next to their
    copies (270 MiB for ``resunet`` base) although nothing uses them any more. Pages of weights still in use
    are read back from the file when next touched: the same bytes, nothing a model computes changes. A
    mapping with a private page (a tensor written in place) is left alone."""
    real = os.path.realpath(path)
    return _drop_clean_pages(lambda m: m["path"] == real)


def _drop_clean_pages(select) -> float:
    """``madvise(MADV_DONTNEED)`` on the file mappings of this process that ``select`` picks and that hold no
    anonymous (private, copy-on-write) page; the MiB that were resident in them."""
    try:
        with open("/proc/self/smaps") as f:
            lines = f.read().splitlines()
        madvise = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):  # not Linux
        return 0.0
    madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    MADV_DONTNEED = 4
    mappings, current = [], None
    for line in lines:
        head = line.split(maxsplit=5)
        if head and "-" in head[0] and len(head) >= 5 and ":" not in head[0]:  # "start-end perms offset dev inode path"
            current = {"range": head[0], "perms": head[1], "path": head[5] if len(head) > 5 else ""}
            mappings.append(current)
        elif current is not None and line.endswith(" kB"):
            key, value = line.split(":", 1)
            current[key] = int(value.split()[0])
    dropped_kib = 0
    for m in mappings:
        if not m["path"].startswith("/") or m.get("Anonymous", 1) != 0 or m.get("Rss", 0) == 0 or not select(m):
            continue
        start, end = (int(x, 16) for x in m["range"].split("-"))
        if madvise(start, end - start, MADV_DONTNEED) == 0:
            dropped_kib += m["Rss"]
    return dropped_kib / 1024


_PR_SET_PDEATHSIG = 1  # linux/prctl.h


def die_with_parent(parent: int, poll: float = 1.0) -> None:
    """End this (worker) process when process ``parent`` ends, however it ends.

    On Linux the kernel sends SIGKILL when the parent dies (``prctl(PR_SET_PDEATHSIG)``); a
    daemon thread polling the parent pid is the fallback elsewhere (and for a parent that died
    before the prctl call).
    """
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
        except (OSError, AttributeError):
            pass
    if os.getppid() != parent:
        os._exit(1)

    def watch():
        while os.getppid() == parent:
            time.sleep(poll)
        os._exit(1)

    threading.Thread(target=watch, name="parent-watchdog", daemon=True).start()
