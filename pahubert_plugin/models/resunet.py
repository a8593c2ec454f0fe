"""fairseq model ``resunet``: the from-scratch Res-U-Net separator with decoupled masks.

Kong et al., "Decoupling magnitude and phase estimation with deep ResUNet for music
source separation", ISMIR 2021 (bytesep ``ResUNet143_DecoupledMagPhase``):
STFT -> log-compressed magnitude -> per-frequency BatchNorm -> residual conv encoder ->
bottleneck -> decoder with concatenated skips -> for every (source, channel) four maps
(magnitude mask m, phase real/imag r, i, magnitude residual q) ->
``|Y| = ReLU(|X| sigmoid(m) + q)``, ``angle(Y) = angle(X) + angle(tanh r + j tanh i)`` -> iSTFT.

:class:`DecoupledMaskHead` and :class:`SpectralSeparator` (padding, STFT, iSTFT, the
``forward(mixture) -> estimates`` contract) are shared with ``pahubert_resunet``.
"""
import ast
from dataclasses import dataclass, field
from typing import List, Sequence, Tuple

import torch
from fairseq.dataclass import FairseqDataclass
from fairseq.models import BaseFairseqModel, register_model
from omegaconf import II
from torch import nn

from .blocks import ResUNetDecoder, ResUNetEncoder, res_block
from .spectral import Spectrogram, compress

MASK_MAPS = 4  # magnitude mask, phase real, phase imag, magnitude residual
MAGNITUDES = ("relu", "leaky")
MASK_MAGNITUDE_HELP = ("magnitude of the decoupled mask head, |Y| = act(|X| sigmoid(m) + q): relu (Kong et al.; "
                       "a bin below zero outputs silence and gets no gradient) or leaky (LeakyReLU 0.01: dead bins "
                       "keep a gradient)")
SLOTS_HELP = ("outputs per source, summed into its estimate (1: one); > 1 lets mixture invariant training "
              "(task.mixit_data) assign the outputs of a mixture of two unlabelled mixtures to either of them")


def parse_strides(text: str) -> List[Tuple[int, int]]:
    """``"[[2,2],[2,1]]"`` -> ``[(2, 2), (2, 1)]`` (a literal, never eval'd code)."""
    try:
        value = ast.literal_eval(text) if isinstance(text, str) else text
        strides = [(int(f), int(t)) for f, t in value]
    except (ValueError, SyntaxError, TypeError) as e:
        raise ValueError(f"strides must be a list of [freq, time] pairs like '[[2,2],[2,1]]', got {text!r}") from e
    if any(f < 1 or t < 1 for f, t in strides):
        raise ValueError(f"strides must be >= 1, got {strides}")
    return strides


def block_strides(cfg) -> List[Tuple[int, int]]:
    """``[(freq, time), ...]`` per encoder block from ``freq_strides`` / ``time_strides`` (or the
    deprecated ``strides`` string of older checkpoints); one pair per entry of ``channels``."""
    legacy = getattr(cfg, "strides", "") or ""
    strides = parse_strides(legacy) if legacy else [(int(f), int(t)) for f, t in zip(cfg.freq_strides, cfg.time_strides)]
    if not legacy and len(cfg.freq_strides) != len(cfg.time_strides):
        raise ValueError(f"freq_strides {list(cfg.freq_strides)} and time_strides {list(cfg.time_strides)} "
                         f"must have the same length")
    if len(strides) != len(cfg.channels):
        raise ValueError(f"{len(strides)} strides for {len(cfg.channels)} encoder blocks (channels {list(cfg.channels)})")
    if any(f < 1 or t < 1 for f, t in strides):
        raise ValueError(f"strides must be >= 1, got {strides}")
    return strides


class DecoupledMaskHead(nn.Module):
    """Turns decoder maps into complex source spectrograms (Kong et al. 2021).

    ``forward(raw (batch, sources * channels * 4, freq, frames), spec complex (batch, channels,
    freq, frames))`` -> complex ``(batch, sources, channels, freq, frames)``.
    """

    frames_per_block = 128  # without autograd the masks are made this many frames at a time

    def __init__(self, num_sources: int, channels: int, magnitude: str = "relu"):
        super().__init__()
        if magnitude not in MAGNITUDES:
            raise ValueError(f"mask_magnitude must be one of {MAGNITUDES}, got {magnitude!r}")
        self.num_sources, self.channels, self.magnitude = num_sources, channels, magnitude

    @property
    def out_channels(self) -> int:
        return self.num_sources * self.channels * MASK_MAPS

    def forward(self, raw: torch.Tensor, spec: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled():
            return self._masks(raw, spec)
        # without autograd, in blocks of frames: the same values up to float rounding (each output bin
        # depends on its own bin only), a dozen full-size temporaries reduced to block-size ones
        out, n, step = None, raw.shape[-1], self.frames_per_block
        for t in range(0, n, step):
            block = self._masks(raw[..., t:t + step], spec[..., t:t + step])
            if out is None:
                out = block.new_empty(*block.shape[:-1], n)
            out[..., t:t + step] = block
        return out


    def _masks(self, raw: torch.Tensor, spec: torch.Tensor) -> torch.Tensor:
        b, _, f, n = raw.shape
        raw = raw.float().view(b, self.num_sources, self.channels, MASK_MAPS, f, n)
        mag_mask = torch.sigmoid(raw[:, :, :, 0])
        real, imag = torch.tanh(raw[:, :, :, 1]), torch.tanh(raw[:, :, :, 2])
        residual = raw[:, :, :, 3]
        norm = torch.sqrt(real ** 2 + imag ** 2).clamp_min(1e-8)
        cos_m, sin_m = real / norm, imag / norm  # normalised rotation
        mix = spec.unsqueeze(1)  # (batch, 1, channels, freq, frames)
        mag = mix.abs()
        cos_x, sin_x = mix.real / mag.clamp_min(1e-8), mix.imag / mag.clamp_min(1e-8)
        z = mag * mag_mask + residual
        out_mag = torch.relu(z) if self.magnitude == "relu" else nn.functional.leaky_relu(z, 0.01)
        out_cos = cos_x * cos_m - sin_x * sin_m
        out_sin = sin_x * cos_m + cos_x * sin_m
        return torch.complex(out_mag * out_cos, out_mag * out_sin)


class SpectralSeparator(BaseFairseqModel):
    """Shared ``forward(mixture) -> estimates`` for STFT-masking separators.

    Subclasses implement :meth:`estimate_spec`; this class pads the mixture to whole STFT
    hops plus one (so the last real sample sits inside full frames), runs the iSTFT and trims.
    """

    def __init__(self, sources: Sequence[str], sample_rate: int, audio_channels: int, spectrogram: Spectrogram,
                 mask_magnitude: str = "relu", slots_per_source: int = 1):
        super().__init__()
        self.sources, self.sample_rate, self.audio_channels = list(sources), int(sample_rate), int(audio_channels)
        self.spectrogram = spectrogram
        if int(slots_per_source) < 1:
            raise ValueError(f"model.slots_per_source must be >= 1, got {slots_per_source}")
        self.slots_per_source = int(slots_per_source)
        self.mask_head = DecoupledMaskHead(len(self.sources) * self.slots_per_source, self.audio_channels,
                                           mask_magnitude)

    def estimate_spec(self, padded: torch.Tensor) -> torch.Tensor:
        """``padded (batch, channels, samples)`` -> complex ``(batch, sources * slots_per_source, channels, freq,
        frames)``, the slots of each source next to each other."""
        raise NotImplementedError

    def forward(self, mixture: torch.Tensor, slots: bool = False) -> torch.Tensor:
        """``mixture (batch, channels, samples)`` -> ``estimates (batch, sources, channels, samples)``; each
        source is the sum of its ``slots_per_source`` outputs. ``slots=True``: the outputs themselves,
        ``(batch, sources * slots_per_source, channels, samples)`` (what mixture invariant training assigns)."""
        if mixture.dim() != 3 or mixture.shape[1] != self.audio_channels:
            raise ValueError(f"mixture must be (batch, {self.audio_channels}, samples), got {tuple(mixture.shape)}")
        length = mixture.shape[-1]
        hop = self.spectrogram.hop_length
        padded_len = -(-length // hop) * hop + hop
        padded = nn.functional.pad(mixture, (0, padded_len - length))
        est_spec = self.estimate_spec(padded)
        if self.slots_per_source > 1 and not slots:  # the iSTFT is linear: sum the slots' spectrograms
            est_spec = est_spec.unflatten(1, (len(self.sources), self.slots_per_source)).sum(2)
        return self.spectrogram.inverse(est_spec, padded_len)[..., :length]


@dataclass
class ResUNetConfig(FairseqDataclass):
    sources: List[str] = II("task.sources")
    sample_rate: int = II("task.sample_rate")
    audio_channels: int = II("task.audio_channels")
    # STFT
    n_fft: int = field(default=0, metadata={"help": "FFT size; 0: 2048 at 44.1 kHz scaled with the rate"})
    # U-Net
    channels: List[int] = field(default_factory=lambda: [32, 64, 128, 256, 384, 384], metadata={
        "help": "channels of the encoder blocks (the decoder mirrors them)"})
    freq_strides: List[int] = field(default_factory=lambda: [2, 2, 2, 2, 2, 2], metadata={
        "help": "frequency pooling after each encoder block (pahubert's stem_freq_strides)"})
    time_strides: List[int] = field(default_factory=lambda: [2, 2, 2, 2, 2, 1], metadata={
        "help": "time pooling after each encoder block (pahubert's stem_time_strides)"})
    strides: str = field(default="", metadata={
        "help": "deprecated (checkpoints written before 0.2): '[[freq, time], ...]' pairs; when set it "
                "replaces freq_strides and time_strides"})
    units: int = field(default=4, metadata={"help": "residual units per encoder/decoder block"})
    bottleneck_units: int = field(default=4, metadata={"help": "residual units at the bottleneck (0: none)"})
    mask_magnitude: str = field(default="relu", metadata={"help": MASK_MAGNITUDE_HELP})
    slots_per_source: int = field(default=1, metadata={"help": SLOTS_HELP})


class ResUNet(nn.Module):
    """Encoder-bottleneck-decoder on log magnitudes (plain module, no fairseq).

    ``forward(features (batch, channels, freq, frames))`` ->
    ``raw (batch, out_channels, freq, frames)`` (cropped back from the padded size).
    """

    def __init__(self, in_channels: int, freq_bins: int, channels: Sequence[int],
                 strides: Sequence[Tuple[int, int]], units: int, bottleneck_units: int, out_channels: int):
        super().__init__()
        self.input_norm = nn.BatchNorm2d(freq_bins, momentum=0.01)  # per frequency bin, as Kong's bn0
        self.encoder = ResUNetEncoder(in_channels, channels, strides, units)
        self.bottleneck = (res_block(channels[-1], channels[-1], bottleneck_units)
                           if bottleneck_units > 0 else nn.Identity())
        self.decoder = ResUNetDecoder(channels[-1], channels, strides, units, out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f, n = x.shape[-2:]
        x = self.input_norm(x.transpose(1, 2)).transpose(1, 2)  # normalise each freq bin
        x = self.encoder.pad(x)
        bottleneck, skips = self.encoder(x)
        raw = self.decoder(self.bottleneck(bottleneck), skips, consume=True)
        return raw[..., :f, :n]


@register_model("resunet", dataclass=ResUNetConfig)
class ResUNetModel(SpectralSeparator):
    """Res-U-Net separator trained from scratch (the baseline)."""

    def __init__(self, cfg: ResUNetConfig):
        super().__init__(cfg.sources, cfg.sample_rate, cfg.audio_channels,
                         Spectrogram(cfg.sample_rate, cfg.n_fft or None),
                         getattr(cfg, "mask_magnitude", "relu"),  # older checkpoints: relu
                         getattr(cfg, "slots_per_source", 1))
        self.net = ResUNet(self.audio_channels, self.spectrogram.freq_bins, list(cfg.channels),
                           block_strides(cfg), cfg.units, cfg.bottleneck_units, self.mask_head.out_channels)

    @classmethod
    def build_model(cls, cfg: ResUNetConfig, task=None):
        return cls(cfg)

    def estimate_spec(self, padded: torch.Tensor) -> torch.Tensor:
        spec = self.spectrogram(padded)  # (batch, channels, freq, frames) complex
        raw = self.net(compress(spec.abs()))
        return self.mask_head(raw, spec)
