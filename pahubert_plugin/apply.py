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
from typing import Iterator, Optional, Tuple

import torch
from torch import nn


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
def iter_apply(
    model: nn.Module,
    mixture: torch.Tensor,
    segment: int,
    overlap: float = 0.25,
    batch_size: int = 1,
    device: Optional[torch.device] = None,
) -> Iterator[Tuple[int, torch.Tensor]]:
    """Separate ``mixture (channels, samples)`` chunk by chunk.

    Yields ``(start, block)`` with ``block (sources, channels, n)`` float32 on the CPU;
    consecutive blocks tile ``[0, samples)`` exactly.  ``segment`` is in samples;
    ``batch_size`` chunks go through the model at once.
    """
    if mixture.dim() != 2:
        raise ValueError(f"mixture must be (channels, samples), got shape {tuple(mixture.shape)}")
    from .stream import stream_apply  # the one overlap-add loop, fed the whole tensor as one block

    yield from stream_apply(model, [mixture], mixture.shape[-1], segment, overlap, batch_size, device)


def apply_model(
    model: nn.Module,
    mixture: torch.Tensor,
    segment: int,
    overlap: float = 0.25,
    batch_size: int = 1,
    device: Optional[torch.device] = None,
) -> torch.Tensor:
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
