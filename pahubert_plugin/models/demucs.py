"""Demucs V2 (Défossez et al., 2019) as plain ``nn.Module`` pieces, written from the paper.

A waveform U-Net.  The input (mixture) is upsampled x2, then ``depth`` encoder layers
``Conv1d(K=8, S=4) -> ReLU -> Conv1d(1x1, 2C) -> GLU`` with ``C`` starting at ``channels``
and growing by ``growth`` per layer; a bottleneck (2-layer BiLSTM + linear in Demucs V2,
a HuBERT transformer in :class:`DemucsHubertEncoder`, through :class:`DemucsFrontEnd`); a mirrored decoder, per layer
``Conv1d(C, 2C, K=3) -> GLU -> ConvTranspose1d(K=8, S=4) -> ReLU`` (no ReLU on the last
layer, which outputs ``sources x audio_channels`` signals), with additive skips from the
encoder layer of the same depth.  Finally the signal is downsampled back to the input rate.

Choices (documented, not taken from the paper):

* Convolutions are zero-padded by ``(K - S) / 2`` and the decoder context conv by ``K3 // 2``
  so every layer maps ``n`` to exactly ``n / S`` (encoder) or ``n * S`` (decoder) samples.
  The upsampled input is right-padded with zeros to a multiple of ``S ** depth`` and the
  output trimmed back, so **any input length works** (Demucs' own code instead runs valid
  convolutions on a longer, padded input and centre-trims).
* The x2 resampling is torchaudio's sinc interpolation (``torchaudio.functional.resample``).
* ``rescale``: initial conv weights are divided by ``sqrt(std / rescale)`` (the paper's
  weight rescaling, which the authors found to help); ``0`` disables it.
* ``normalize``: optionally standardise the mixture by the mean/std of its mono downmix and
  undo it on the output (off in the paper; useful for audio of arbitrary level).
"""
import contextlib
import math
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchaudio.functional as AF

from .hubert_encoder import FrontEnd, FrontEndOutput, HubertTokenEncoder

# Presets as data: `tiny` runs on a CPU in seconds, `base` is the paper's Demucs V2
# (~266 M parameters with the BiLSTM bottleneck).
DEMUCS_PRESETS: Dict[str, Dict] = {
    "tiny": dict(channels=8, depth=5, growth=2.0, kernel_size=8, stride=4, context=3,
                 upsample=2, lstm_layers=1),
    "base": dict(channels=64, depth=6, growth=2.0, kernel_size=8, stride=4, context=3,
                 upsample=2, lstm_layers=2),
}


@dataclass
class DemucsContext:
    """What the decoder needs from the encoder to undo padding, resampling and scaling."""

    length: int  # input samples (before upsampling and padding)
    padded: int  # upsampled + padded samples fed to the first encoder layer
    mean: Optional[torch.Tensor] = None  # (batch, 1, 1) when normalising
    std: Optional[torch.Tensor] = None


def layer_channels(channels: int, growth: float, depth: int) -> List[int]:
    """Output channels of each encoder layer: ``channels * growth ** i``."""
    return [int(round(channels * growth ** i)) for i in range(depth)]


def rescale_conv_(module: nn.Module, reference: float) -> None:
    """Divide each conv's weight and bias by ``sqrt(weight.std() / reference)`` in place."""
    if reference <= 0:
        return
    for sub in module.modules():
        if isinstance(sub, (nn.Conv1d, nn.ConvTranspose1d)):
            scale = (sub.weight.detach().std() / reference) ** 0.5
            sub.weight.data /= scale
            if sub.bias is not None:
                sub.bias.data /= scale


def _check_geometry(kernel_size: int, stride: int, context: int, upsample: int) -> None:
    if kernel_size < stride or (kernel_size - stride) % 2:
        raise ValueError(
            f"kernel_size {kernel_size} and stride {stride}: need kernel_size >= stride and an "
            f"even difference so each layer maps n samples to n/stride exactly (e.g. 8 and 4)"
        )
    if context % 2 == 0:
        raise ValueError(f"context {context} must be odd (the paper uses 3)")
    if upsample < 1:
        raise ValueError(f"upsample {upsample} must be >= 1 (the paper uses 2)")


class DemucsEncoder(nn.Module):
    """Resample x``upsample``, pad, and run the strided encoder layers."""

    def __init__(self, audio_channels: int = 2, channels: int = 64, depth: int = 6,
                 growth: float = 2.0, kernel_size: int = 8, stride: int = 4,
                 upsample: int = 2, normalize: bool = False, rescale: float = 0.1, **_):
        super().__init__()
        _check_geometry(kernel_size, stride, 3, upsample)
        self.audio_channels = audio_channels
        self.depth = depth
        self.stride = stride
        self.upsample = upsample
        self.normalize = normalize
        self.channels = layer_channels(channels, growth, depth)
        self.out_channels = self.channels[-1]
        pad = (kernel_size - stride) // 2
        self.layers = nn.ModuleList()
        c_in = audio_channels
        for c in self.channels:
            self.layers.append(nn.Sequential(
                nn.Conv1d(c_in, c, kernel_size, stride, padding=pad), nn.ReLU(),
                nn.Conv1d(c, 2 * c, 1), nn.GLU(dim=1),
            ))
            c_in = c
        rescale_conv_(self, rescale)

    @property
    def total_stride(self) -> int:
        """Upsampled samples per bottleneck step (``stride ** depth``)."""
        return self.stride ** self.depth

    @property
    def hop(self) -> float:
        """Input samples per bottleneck step (``stride ** depth / upsample``)."""
        return self.total_stride / self.upsample

    def num_steps(self, length: int) -> int:
        """Bottleneck steps for ``length`` input samples."""
        return max(1, math.ceil(length * self.upsample / self.total_stride))

    def forward(self, mixture: torch.Tensor):
        """mixture (batch, channels, samples) -> bottleneck (batch, C_last, steps), skips, ctx.

        ``skips[i]`` is the output of encoder layer ``i``, (batch, C_i, padded / stride**(i+1)).
        """
        if mixture.dim() != 3 or mixture.size(1) != self.audio_channels:
            raise ValueError(
                f"expected a mixture of shape (batch, {self.audio_channels}, samples), found "
                f"{tuple(mixture.shape)}; mono input must be duplicated to {self.audio_channels} "
                f"channels first"
            )
        length = mixture.size(-1)
        x, mean, std = mixture, None, None
        if self.normalize:
            mono = mixture.mean(dim=1, keepdim=True)
            mean = mono.mean(dim=-1, keepdim=True)
            std = mono.std(dim=-1, keepdim=True) if length > 1 else torch.ones_like(mean)
            x = (x - mean) / (1e-5 + std)
        if self.upsample > 1:
            x = AF.resample(x, 1, self.upsample)
        padded = self.num_steps(length) * self.total_stride
        x = F.pad(x, (0, padded - x.size(-1)))  # right-pad to a multiple of stride**depth
        skips = []
        lean = not torch.is_grad_enabled()
        for layer in self.layers:
            x = _run_lean(layer, x) if lean else layer(x)
            skips.append(x)
        return x, skips, DemucsContext(length=length, padded=padded, mean=mean, std=std)


LEAN_SLICE = 1 << 16  # time steps per slice of a stride-1 convolution + GLU in the lean path


def _run_lean(layer: nn.Sequential, x) -> torch.Tensor:
    """``layer(x)`` without autograd (``x`` a tensor, or a one-tensor list that is emptied so that the input
    is freed as soon as it is used): each ReLU in place on the convolution output before it, and a stride-1
    convolution followed by a GLU (the encoder's 1x1, the decoder's context convolution) computed
    :data:`LEAN_SLICE` steps at a time, so its double-width output never exists whole (113 MiB per 10 s
    chunk at 64 channels). The same values up to float rounding."""
    if isinstance(x, list):
        x = x.pop()
    subs = list(layer)
    i = 0
    while i < len(subs):
        sub = subs[i]
        if isinstance(sub, nn.ReLU):
            x = torch.relu_(x)
        elif i + 1 < len(subs) and isinstance(subs[i + 1], nn.GLU) and _sliceable(sub):
            x = _conv_glu_sliced(sub, subs[i + 1], x)
            i += 1
        else:
            x = sub(x)
        i += 1
    return x


def _sliceable(conv: nn.Module) -> bool:
    return (type(conv) is nn.Conv1d and conv.stride == (1,) and conv.dilation == (1,) and conv.groups == 1
            and conv.padding == (conv.kernel_size[0] // 2,) and conv.kernel_size[0] % 2 == 1
            and conv.padding_mode == "zeros")


def _conv_glu_sliced(conv: nn.Conv1d, glu: nn.GLU, x: torch.Tensor, step: int = 0) -> torch.Tensor:
    """``glu(conv(x))`` over time slices of ``x`` with ``kernel // 2`` steps of context each side (zeros
    past the ends, as the convolution's own padding)."""
    step = step or LEAN_SLICE
    n = x.shape[-1]
    if n <= step:
        return glu(conv(x))
    half = conv.kernel_size[0] // 2
    out = x.new_empty(x.shape[0], conv.out_channels // 2, n)
    for a in range(0, n, step):
        b = min(a + step, n)
        lo, hi = max(a - half, 0), min(b + half, n)
        piece = F.pad(x[..., lo:hi], (half - (a - lo), half - (hi - b)))
        out[..., a:b] = glu(F.conv1d(piece, conv.weight, conv.bias))
    return out


class DemucsDecoder(nn.Module):
    """Mirror of :class:`DemucsEncoder`: context conv + GLU, transposed conv, additive skips."""

    def __init__(self, num_sources: int, audio_channels: int = 2, channels: int = 64,
                 depth: int = 6, growth: float = 2.0, kernel_size: int = 8, stride: int = 4,
                 context: int = 3, upsample: int = 2, rescale: float = 0.1, **_):
        super().__init__()
        _check_geometry(kernel_size, stride, context, upsample)
        self.num_sources = num_sources
        self.audio_channels = audio_channels
        self.upsample = upsample
        chans = layer_channels(channels, growth, depth)
        outs = [num_sources * audio_channels] + chans[:-1]
        pad = (kernel_size - stride) // 2
        self.layers = nn.ModuleList()
        for i in reversed(range(depth)):  # deepest first
            c, c_out = chans[i], outs[i]
            block = [
                nn.Conv1d(c, 2 * c, context, padding=context // 2), nn.GLU(dim=1),
                nn.ConvTranspose1d(c, c_out, kernel_size, stride, padding=pad),
            ]
            if i > 0:
                block.append(nn.ReLU())
            self.layers.append(nn.Sequential(*block))
        rescale_conv_(self, rescale)

    def forward(self, x: torch.Tensor, skips: Sequence[torch.Tensor],
                ctx: DemucsContext) -> torch.Tensor:
        """x (batch, C_last, steps), skips from the encoder -> (batch, sources, channels, samples).

        Without autograd (``torch.no_grad`` / ``inference_mode``) a ``skips`` list is emptied as its
        tensors are used, so that each can be freed (:meth:`_forward_lean`)."""
        if not torch.is_grad_enabled():  # inference: the same values with fewer full-size tensors alive;
            x = self._forward_lean(x, skips if isinstance(skips, list) else list(skips))  # empties a list
        else:
            for layer, skip in zip(self.layers, reversed(skips)):
                x = layer(x + skip)
        if self.upsample > 1:
            x = AF.resample(x, self.upsample, 1)
        x = x[..., :ctx.length]  # drop the padding added by the encoder
        if ctx.std is not None:
            x = x * (1e-5 + ctx.std) + ctx.mean
        return x.reshape(x.size(0), self.num_sources, self.audio_channels, x.size(-1))

    def _forward_lean(self, x: torch.Tensor, skips: List[torch.Tensor]) -> torch.Tensor:
        """The decoder layers without autograd: ``skips`` is emptied as it is used (each skip is let go
        once its layer has added it), every skip after the first is added into the previous layer's own
        output in place, and each layer runs through :func:`_run_lean`; the same values up to float
        rounding. The first layer's input is the bottleneck's, which callers may hold, so it is added out
        of place."""
        own = False
        for layer in self.layers:
            skip = skips.pop()
            x = x.add_(skip) if own else x + skip
            del skip
            box = [x]
            del x  # _run_lean holds the layer's input alone: freed once its first operation has run
            x = _run_lean(layer, box)
            own = True
        return x


@contextlib.contextmanager
def _native_cpu_kernels():
    """oneDNN off while inside (process-wide: the ``torch.backends.mkldnn.enabled`` switch, set directly because
    ``torch.backends.mkldnn.flags`` also touches the TF32 settings and warns about them)."""
    before = torch._C._get_mkldnn_enabled()
    torch._C._set_mkldnn_enabled(False)
    try:
        yield
    finally:
        torch._C._set_mkldnn_enabled(before)


class BLSTM(nn.Module):
    """Demucs V2 bottleneck: a bidirectional LSTM (hidden = dim) and a linear back to dim."""

    def __init__(self, dim: int, layers: int = 2):
        super().__init__()
        self.lstm = nn.LSTM(dim, dim, num_layers=layers, bidirectional=True)
        self.linear = nn.Linear(2 * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (batch, dim, steps) -> (batch, dim, steps).

        Without autograd the LSTM runs torch's native CPU kernels instead of oneDNN's: oneDNN repacks the
        weights on every call (about 190 MiB of temporaries at ``base``'s 2048 units: the peak of a whole
        demucs_v2 base separation) and was slower here (8.0 s against 6.5-7.3 s for one 10 s chunk's
        bottleneck, one thread); the outputs differ by float rounding (3e-7)."""
        seq = x.permute(2, 0, 1)  # (steps, batch, dim)
        if torch.is_grad_enabled() or seq.device.type != "cpu":
            y, _ = self.lstm(seq)
        else:
            with _native_cpu_kernels():
                y, _ = self.lstm(seq)
        return self.linear(y).permute(1, 2, 0)


class DemucsV2(nn.Module):
    """Demucs V2: encoder, BiLSTM bottleneck, decoder.

    Args:
        sources: names of the separated sources (output order).
        audio_channels: channels in and out (2 for MUSDB18).
        channels, depth, growth, kernel_size, stride, context, upsample: geometry (see module
            docstring); the paper uses 64, 6, 2, 8, 4, 3, 2.
        lstm_layers: BiLSTM layers in the bottleneck (the paper uses 2).
        normalize, rescale: see the module docstring.
    """

    def __init__(self, sources: Sequence[str], audio_channels: int = 2, channels: int = 64,
                 depth: int = 6, growth: float = 2.0, kernel_size: int = 8, stride: int = 4,
                 context: int = 3, upsample: int = 2, lstm_layers: int = 2,
                 normalize: bool = False, rescale: float = 0.1):
        super().__init__()
        geometry = dict(audio_channels=audio_channels, channels=channels, depth=depth,
                        growth=growth, kernel_size=kernel_size, stride=stride,
                        upsample=upsample, rescale=rescale)
        self.sources = list(sources)
        self.audio_channels = audio_channels
        self.encoder = DemucsEncoder(normalize=normalize, **geometry)
        self.bottleneck = BLSTM(self.encoder.out_channels, lstm_layers)
        self.decoder = DemucsDecoder(len(self.sources), context=context, **geometry)

    def forward(self, mixture: torch.Tensor) -> torch.Tensor:
        """mixture (batch, channels, samples) -> estimates (batch, sources, channels, samples)."""
        x, skips, ctx = self.encoder(mixture)
        return self.decoder(self.bottleneck(x), skips, ctx)


class DemucsFrontEnd(FrontEnd):
    """The Demucs V2 encoder as a :class:`~pahubert_plugin.models.hubert_encoder.FrontEnd`: its
    bottleneck steps are the tokens (``out_dim`` = the last layer's channels, 2048 in ``base``), its
    layer outputs the skips and :class:`DemucsContext` the context of :class:`DemucsDecoder`.

    ``cfg`` holds the Demucs geometry (``channels, depth, growth, kernel_size, stride, upsample,
    normalize, rescale``).
    """

    legacy_prefixes = {"demucs.": "front_end.demucs."}

    def __init__(self, cfg, audio_channels: int = 2):
        super().__init__()
        self.demucs = DemucsEncoder(
            audio_channels=audio_channels, channels=cfg.channels, depth=cfg.depth,
            growth=cfg.growth, kernel_size=cfg.kernel_size, stride=cfg.stride,
            upsample=cfg.upsample, normalize=cfg.normalize, rescale=cfg.rescale)
        self.out_dim = self.demucs.out_channels

    @property
    def hop(self) -> float:
        return self.demucs.hop

    def token_padding_mask(self, padding_mask: Optional[torch.Tensor], num_tokens: int):
        """A token is padding when it starts at or after the last valid sample; None without padding."""
        if padding_mask is None or not padding_mask.any():
            return None
        valid = (~padding_mask).sum(dim=1, keepdim=True)  # (batch, 1)
        starts = torch.arange(num_tokens, device=padding_mask.device) * self.hop
        return starts.unsqueeze(0) >= valid

    def forward(self, source: torch.Tensor) -> FrontEndOutput:
        feats, skips, ctx = self.demucs(source)  # (batch, C_last, steps)
        return FrontEndOutput(feats.transpose(1, 2), skips, ctx)


class DemucsHubertEncoder(HubertTokenEncoder):
    """Demucs V2 encoder + HuBERT's transformer in place of the BiLSTM (``cfg``: the config of
    ``demucs_v2_hubert``, Demucs geometry plus fairseq ``HubertConfig``'s transformer and masking)."""

    def __init__(self, cfg, audio_channels: int = 2):
        super().__init__(DemucsFrontEnd(cfg, audio_channels), cfg)
