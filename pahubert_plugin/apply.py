"""Chunked inference with overlap-add, for any separation model.

A separation model maps ``mixture (batch, channels, samples)`` to
``estimates (batch, sources, channels, samples)``.  Tracks are cut into segments of
``segment`` samples that overlap by ``overlap`` (a fraction), each segment is separated,
and the results are cross-faded with a triangular window (all weights > 0, so every
sample is covered) and normalised by the summed weights, as Demucs does.

:func:`iter_apply` yields finished blocks in order while holding only about one segment
of output, so callers can stream results to disk for tracks of any length;
:func:`apply_model` collects them into one tensor.  Neither changes the model's
train/eval mode: the caller decides (fairseq's validation and :class:`Separator` use eval).
"""
import logging
import os
import re
from typing import Iterator, Optional, Tuple

import torch
from torch import nn


PRECISIONS = ("fp32", "bf16")
logger = logging.getLogger("pahubert_plugin.apply")


def check_precision(precision: str) -> None:
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")


def cpu_has_native_bf16() -> bool:
    """Whether oneDNN runs bfloat16 on this CPU's own units (AVX512-BF16 or AMX); without them it emulates
    bfloat16, which was 10x slower than fp32 for a convolution on an AVX2 CPU (README: Speed and memory)."""
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def warn_if_emulated(precision: str, device) -> bool:
    """Log a warning when ``precision`` is bf16 on a CPU without bfloat16 units; returns whether it warned."""
    if precision != "bf16" or torch.device(device).type != "cpu" or cpu_has_native_bf16():
        return False
    logger.warning("--precision bf16: this CPU has no bfloat16 units (AVX512-BF16 or AMX; torch reports "
                   "%s), so bfloat16 is emulated and separation will be several times SLOWER than fp32 "
                   "(a convolution took 10x as long on an AVX2 CPU); use --precision fp32",
                   torch.backends.cpu.get_cpu_capability())
    return True


def optimize_for_inference(model: nn.Module) -> nn.Module:
    """``model`` in eval mode, changed in place for faster inference with the same outputs.

    * every BatchNorm that directly follows a convolution (the second of each residual unit,
      :class:`~pahubert_plugin.models.blocks.ResUnit`) is folded into that convolution's weights
      (``torch.nn.utils.fusion.fuse_conv_bn_eval``); the others follow an activation or a skip
      concatenation and stay;
    * 4-D weights move to ``channels_last``, the layout oneDNN's CPU convolutions run fastest in.

    Estimates change only by float rounding (tests/test_inference_speed.py: within 1e-5 of the
    mixture's peak). Use the result for inference only: its state dict no longer matches the
    checkpoint's (fused BatchNorms are gone)."""
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    from .models.blocks import ResUnit

    model.eval()
    for unit in model.modules():
        if not isinstance(unit, ResUnit):
            continue
        body = unit.body  # norm, act, conv, norm, act, conv
        if isinstance(body[3], nn.BatchNorm2d) and body[3].track_running_stats:
            body[2] = fuse_conv_bn_eval(body[2], body[3])
            body[3] = nn.Identity()
    if any(isinstance(m, nn.Conv2d) for m in model.modules()):
        model.to(memory_format=torch.channels_last)
    return model


MMAP_THRESHOLD = 1 << 20  # bytes


def return_freed_memory() -> bool:
    """Make freed activations go back to the operating system (glibc only; True when set).

    glibc serves an allocation from the heap unless it is larger than its mmap threshold, and raises that
    threshold (up to 32 MiB) each time a block it had mmapped is freed; after the first chunk, tensors of a
    few MiB to 32 MiB then live in the heap, where fragmentation keeps freed memory resident, and a
    process's RSS climbs with every chunk or tile of a different size. ``mallopt(M_MMAP_THRESHOLD, 1 MiB)``
    fixes the threshold: every block of 1 MiB or more is its own mapping, unmapped when freed. Process-wide;
    ``pahubert-separate`` and ``Separator(tile=...)`` call it (README: Speed and memory)."""
    import ctypes

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
    runs on the CPU (``pahubert-separate`` does; README: Speed and memory)."""
    return _drop_clean_pages(lambda m: "w" not in m["perms"] and GPU_LIBRARIES.search(m["path"]))


def drop_file_pages(path: str) -> float:
    """Drop this process's resident pages of the mappings of the file ``path`` that hold no private
    (copy-on-write) page; the MiB dropped (0 off Linux).

    For a checkpoint mapped by :func:`~pahubert_plugin.checkpoint.mapped_loads`: the model's tensors are
    views of the file, and :func:`optimize_for_inference` replaces some of them (channels_last copies, folded
    convolutions) after reading them, so the file pages of the replaced weights stay resident next to their
    copies (270 MiB for ``resunet`` base) although nothing uses them any more. Pages of weights still in use
    are read back from the file when next touched: the same bytes, nothing a model computes changes. A
    mapping with a private page (a tensor written in place) is left alone."""
    real = os.path.realpath(path)
    return _drop_clean_pages(lambda m: m["path"] == real)


def _drop_clean_pages(select) -> float:
    """``madvise(MADV_DONTNEED)`` on the file mappings of this process that ``select`` picks and that hold no
    anonymous (private, copy-on-write) page; the MiB that were resident in them."""
    import ctypes

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


def set_decode_tile(model: nn.Module, seconds: float) -> nn.Module:
    """Make ``model`` decode each chunk in time tiles of about ``seconds`` (0: whole chunks); see
    :meth:`~pahubert_plugin.models.pahubert_resunet.PahubertResUNetModel.set_decode_tile`. A ValueError for
    models that cannot (every other model's memory is already one chunk's, without tiles)."""
    target = getattr(model, "model", model)  # Autocast and benchmark wrappers hold the model as .model
    if not hasattr(target, "set_decode_tile"):
        raise ValueError(f"tiled decoding (--tile) is for pahubert_resunet models; {type(target).__name__} "
                         f"decodes whole chunks: use a shorter --segment for less memory")
    target.set_decode_tile(seconds)
    return model


class Autocast(nn.Module):
    """``model`` run under ``torch.autocast`` (``bf16``: bfloat16 matrix products and convolutions,
    float32 elsewhere; fast on CPUs with AMX or AVX512-BF16). Estimates differ from fp32 by about
    1e-2 of the mixture's peak: benchmarks/bench_separate.py reports the SDR difference."""

    def __init__(self, model: nn.Module, precision: str = "bf16"):
        super().__init__()
        check_precision(precision)
        self.model, self.precision = model, precision

    def forward(self, mixture: torch.Tensor) -> torch.Tensor:
        with torch.autocast(mixture.device.type, dtype=torch.bfloat16, enabled=self.precision == "bf16"):
            return self.model(mixture).float()


def chunk_weight(length: int) -> torch.Tensor:
    """Triangular cross-fade window of ``length`` strictly positive weights, peak 1."""
    half = length // 2
    ramp = torch.cat([torch.arange(1, half + 1), torch.arange(length - half, 0, -1)]).float()
    return ramp / ramp.max()


def chunk_starts(total: int, segment: int, overlap: float) -> list:
    """Start samples of the chunks covering ``total`` samples; the last chunk ends at or after it."""
    if segment <= 0:
        raise ValueError(f"segment must be positive, got {segment} samples")
    if not 0 <= overlap < 1:
        raise ValueError(f"overlap must be in [0, 1), got {overlap}")
    stride = max(1, int(round(segment * (1 - overlap))))
    starts = [0]
    while starts[-1] + segment < total:
        starts.append(starts[-1] + stride)
    return starts


@torch.inference_mode()
def iter_apply(model: nn.Module, mixture: torch.Tensor, segment: int, overlap: float = 0.25, batch_size: int = 1,
               device: Optional[torch.device] = None) -> Iterator[Tuple[int, torch.Tensor]]:
    """Separate ``mixture (channels, samples)`` chunk by chunk.

    Yields ``(start, block)`` with ``block (sources, channels, n)`` float32 on the CPU;
    consecutive blocks tile ``[0, samples)`` exactly.  ``segment`` is in samples;
    ``batch_size`` chunks go through the model at once.
    """
    if mixture.dim() != 2:
        raise ValueError(f"mixture must be (channels, samples), got shape {tuple(mixture.shape)}")
    from .stream import stream_apply  # the one overlap-add loop, fed the whole tensor as one block

    yield from stream_apply(model, [mixture], mixture.shape[-1], segment, overlap, batch_size, device)


def apply_model(model: nn.Module, mixture: torch.Tensor, segment: int, overlap: float = 0.25, batch_size: int = 1,
                device: Optional[torch.device] = None) -> torch.Tensor:
    """Separate ``mixture (channels, samples)`` or ``(batch, channels, samples)``.

    Returns ``(sources, channels, samples)`` or ``(batch, sources, channels, samples)``,
    float32 on the CPU, built from :func:`iter_apply`.
    """
    if mixture.dim() == 3:
        return torch.stack([apply_model(model, m, segment, overlap, batch_size, device) for m in mixture])
    out = None
    for start, block in iter_apply(model, mixture, segment, overlap, batch_size, device):
        if out is None:
            out = block.new_zeros(*block.shape[:-1], mixture.shape[-1])
        out[..., start:start + block.shape[-1]] = block
    return out
