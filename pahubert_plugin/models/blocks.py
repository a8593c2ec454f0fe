"""Residual conv2d U-Net pieces (Kong et al., ISMIR 2021, "decoupling magnitude and phase").

Plain ``nn.Module``s shared by the Pac-HuBERT encoder stem and the Res-U-Net separator.
Tensors are ``(batch, channels, freq, frames)`` throughout.
"""
from typing import List, Optional, Sequence, Tuple

import torch
from torch import nn

Stride = Tuple[int, int]  # (freq, time)
NORMS = ("batch", "group")


def norm_layer(channels: int, norm: str = "batch", momentum: float = 0.01) -> nn.Module:
    """``batch``: BatchNorm2d (Kong et al.); ``group``: GroupNorm with up to 8 groups, which
    keeps no running statistics (nothing to re-estimate when a pretrained stem meets new data)."""
    if norm == "batch":
        return nn.BatchNorm2d(channels, momentum=momentum)
    if norm == "group":
        groups = max(g for g in (8, 4, 2, 1) if channels % g == 0)
        return nn.GroupNorm(groups, channels)
    raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")


class ResUnit(nn.Module):
    """Norm -> LeakyReLU(0.01) -> 3x3 conv, twice, plus a (1x1 if needed) shortcut."""

    def __init__(self, in_channels: int, out_channels: int, momentum: float = 0.01, norm: str = "batch"):
        super().__init__()
        self.body = nn.Sequential(
            norm_layer(in_channels, norm, momentum), nn.LeakyReLU(0.01),
            nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
            norm_layer(out_channels, norm, momentum), nn.LeakyReLU(0.01),
            nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False),
        )
        self.shortcut = (
            nn.Identity() if in_channels == out_channels else nn.Conv2d(in_channels, out_channels, 1)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled():
            return self.shortcut(x) + self.body(x)
        return self._forward_lean(x)

    def _forward_lean(self, x: torch.Tensor) -> torch.Tensor:
        """The same values (up to float rounding) without autograd, with fewer full-size temporaries alive:
        activations in place on tensors this unit made, the shortcut added into the body's output
        (float addition commutes, so the sum is bit-identical; under autocast, where the two can differ
        in dtype, the promoted out-of-place sum as in training). At 1025 bins one temporary is ~140 MB
        per 10 s of stereo audio at 32 channels (benchmarks/bench_separate.py measures the peak)."""
        h = x
        for layer in self.body:
            if isinstance(layer, nn.LeakyReLU) and h is not x:
                h = nn.functional.leaky_relu_(h, layer.negative_slope)
            else:
                h = layer(h)
        short = self.shortcut(x)
        return h.add_(short) if short.dtype == h.dtype else short + h


def res_block(in_channels: int, out_channels: int, units: int, norm: str = "batch") -> nn.Sequential:
    return nn.Sequential(
        *[ResUnit(in_channels if i == 0 else out_channels, out_channels, norm=norm) for i in range(units)]
    )


def total_stride(strides: Sequence[Stride]) -> Stride:
    f = t = 1
    for sf, st in strides:
        f, t = f * sf, t * st
    return f, t


class ResUNetEncoder(nn.Module):
    """Residual blocks, each followed by average pooling with its (freq, time) stride.

    ``forward``: ``(batch, in_channels, freq, frames)`` -> bottleneck
    ``(batch, channels[-1], freq / Sf, frames / St)`` and the list of skip tensors
    (each block's output before pooling, shallowest first).  ``freq`` and ``frames`` must
    be multiples of the total strides ``(Sf, St)``; :meth:`pad` does that.
    """

    def __init__(self, in_channels: int, channels: Sequence[int], strides: Sequence[Stride], units: int,
                 norm: str = "batch"):
        super().__init__()
        if len(channels) != len(strides):
            raise ValueError(f"{len(channels)} channel sizes but {len(strides)} strides")
        self.channels, self.strides = list(channels), [tuple(s) for s in strides]
        self.norm = norm  # the decoder of a separator mirrors it
        self.stride = total_stride(self.strides)
        ins = [in_channels] + self.channels[:-1]
        self.blocks = nn.ModuleList(res_block(i, o, units, norm) for i, o in zip(ins, self.channels))
        self.pools = nn.ModuleList(nn.AvgPool2d(s) for s in self.strides)

    def pad(self, x: torch.Tensor) -> torch.Tensor:
        """Zero-pad the freq and frame axes of ``x`` up to multiples of the total stride."""
        sf, st = self.stride
        pf, pt = (-x.shape[-2]) % sf, (-x.shape[-1]) % st
        return nn.functional.pad(x, (0, pt, 0, pf)) if pf or pt else x

    def forward(self, x: torch.Tensor, keep_skips: bool = True) -> Tuple[torch.Tensor, List[torch.Tensor]]:
        """``keep_skips=False``: the skip list comes back empty, and each block's output is freed as soon as
        it is pooled (the bottleneck alone, in the memory of one block)."""
        x, skips = self._run(x, len(self.blocks), keep_skips)
        return (self.pools[-1](x) if self.pools else x), skips

    def deepest(self, x: torch.Tensor) -> torch.Tensor:
        """The last block's output before its pooling (the deepest skip), keeping nothing else."""
        return self._run(x, len(self.blocks), keep_skips=False)[0]

    def shallow_skips(self, x: torch.Tensor) -> List[torch.Tensor]:
        """The skips of every block but the last (the output of :meth:`deepest` completes them)."""
        return self._run(x, len(self.blocks) - 1, keep_skips=True)[1]

    def _run(self, x: torch.Tensor, stop: int, keep_skips: bool) -> Tuple[torch.Tensor, List[torch.Tensor]]:
        """Blocks ``[0, stop)``, each but the first after the previous block's pooling: the last block's output
        before its own pooling, and the skips (each block's output) when kept."""
        skips = []
        for i in range(stop):
            if i:
                x = self.pools[i - 1](x)
            x = self.blocks[i](x)
            if keep_skips:
                skips.append(x)
        return x, skips


def time_reach(module: nn.Module, scale: int = 1) -> int:
    """Frames (at the input's time resolution) by which the zero padding of ``module``'s convolutions
    reaches inward from a cut in time: each convolution of time kernel k and dilation d at a level of
    ``scale`` input frames per frame adds ``(k // 2) * d * scale``."""
    return sum((m.kernel_size[1] // 2) * m.dilation[1] * scale for m in module.modules() if isinstance(m, nn.Conv2d))


def round_up(value: int, unit: int) -> int:
    return -(-value // unit) * unit


def encoder_reach(encoder: "ResUNetEncoder") -> Tuple[List[int], List[int], int]:
    """For tiling an encoder in time: ``(skip_reach, scales, bottleneck_reach)``, the reach (input frames) of a
    cut into each block's output (skip) and into the bottleneck, and each block's frames per input frame.
    A pooled frame is contaminated when any frame of its window is, so the reach is rounded up to whole
    frames of every pooling level."""
    reach, scale, skip_reach, scales = 0, 1, [], []
    for block, (_, st) in zip(encoder.blocks, encoder.strides):
        reach += time_reach(block, scale)
        skip_reach.append(reach)
        scales.append(scale)
        scale *= st
        reach = round_up(reach, scale)
    return skip_reach, scales, round_up(reach, encoder.stride[1])


def tiled_in_time(fn, x: torch.Tensor, tile: int, margin: int, stride: int = 1) -> torch.Tensor:
    """``fn`` (local in time: output frame j depends on input frames near ``j * stride`` only) applied to
    ``x (..., frames)`` tile by tile: each tile of ``tile`` frames with ``margin`` frames of context each
    side, the outputs cut back to the tile and concatenated. ``tile``, ``margin`` and the frames of ``x``
    must be multiples of ``stride``; with a margin of at least ``fn``'s reach the result is ``fn(x)``."""
    total, pieces = x.shape[-1], []
    for a in range(0, total, tile):
        b = min(total, a + tile)
        lo, hi = max(0, a - margin), min(total, b + margin)
        y = fn(x[..., lo:hi])
        pieces.append(y[..., (a - lo) // stride:(b - lo) // stride])
        del y
    return torch.cat(pieces, dim=-1)


class ResUNetDecoder(nn.Module):
    """Mirror of :class:`ResUNetEncoder`: transposed-conv upsampling, concatenated skips.

    ``forward(bottleneck (batch, in_channels, F/Sf, T/St), skips)`` ->
    ``(batch, out_channels, F, T)``.  ``num_skips`` (None: all) keeps only the skips of the
    ``num_skips`` shallowest encoder blocks; deeper levels see the upsampled bottleneck alone,
    so everything they carry has passed through the bottleneck (for ``pahubert_resunet``: the
    transformer) instead of bypassing it.
    """

    def __init__(self, in_channels: int, channels: Sequence[int], strides: Sequence[Stride],
                 units: int, out_channels: int, num_skips: Optional[int] = None, norm: str = "batch"):
        super().__init__()
        depth = len(channels)
        self.num_skips = depth if num_skips is None or num_skips < 0 else min(num_skips, depth)
        self.ups, self.blocks = nn.ModuleList(), nn.ModuleList()
        self.uses_skip = []
        prev = in_channels
        for level, (ch, (sf, st)) in enumerate(zip(reversed(channels), reversed([tuple(s) for s in strides]))):
            use = depth - 1 - level < self.num_skips  # encoder block index counted from the input
            self.uses_skip.append(use)
            self.ups.append(nn.ConvTranspose2d(prev, ch, kernel_size=(sf, st), stride=(sf, st)))
            self.blocks.append(res_block(2 * ch if use else ch, ch, units, norm))
            prev = ch
        self.head = nn.Conv2d(prev, out_channels, 1)

    def forward(self, x: torch.Tensor, skips: List[torch.Tensor], consume: bool = False,
                windows: Optional[Sequence[Tuple[int, int]]] = None) -> torch.Tensor:
        """``consume=True`` pops ``skips`` (the list is left empty) so that each skip can be freed as
        soon as its level has used it: the models pass their own list, which saves the memory of all
        skips but the current one at the widest levels (same values).

        ``windows`` (deepest level first): each level keeps only frames ``[start, stop)`` of its own time
        resolution, counted from the first frame of ``x``'s window, cutting the upsampled input and the skip
        before its units; the windows must nest. For decoding a tile with context: a level needs only as much
        context as its own and the later levels' convolutions reach (``pahubert_resunet``'s tiled decoding).
        The output starts at the last window's ``start``."""
        if len(skips) != len(self.ups):
            raise ValueError(f"the decoder has {len(self.ups)} levels but got {len(skips)} skips")
        if windows is not None and len(windows) != len(self.ups):
            raise ValueError(f"the decoder has {len(self.ups)} levels but got {len(windows)} windows")
        if not consume:
            skips = list(skips)
        offset = 0  # frames of this level's resolution cut from the front of x so far
        for level, (up, block, use) in enumerate(zip(self.ups, self.blocks, self.uses_skip)):
            x = up(x)
            skip = skips.pop()
            if windows is not None:
                offset *= up.stride[1]
                start, stop = windows[level]
                if start < offset or stop - offset > x.shape[-1]:
                    raise ValueError(f"decoder window {windows[level]} of level {level} is not inside the frames "
                                     f"[{offset}, {offset + x.shape[-1]}) its input covers")
                x, skip, offset = x[..., start - offset:stop - offset], skip[..., start:stop], start
            if use:
                x = torch.cat([x, skip], dim=1)
            del skip
            for unit in block:  # not block(x): a call argument stays alive until the call returns
                x = unit(x)
        return self.head(x)
