"""Pac-HuBERT: HuBERT masked prediction on a time-frequency front end (fairseq model ``pahubert``).

* :class:`SpectralFrontEnd` -- the :class:`~pahubert_plugin.models.hubert_encoder.FrontEnd` of
  Pac-HuBERT: STFT -> log-compressed magnitude -> (optional per-bin BatchNorm) -> (training-only
  frequency-band mask) -> residual conv2d stem (``ResUNetEncoder``, every audio channel is a conv
  input channel) -> one token per (time-strided) frame.  The separation model
  (``pahubert_resunet``) decodes from its skips and the transformer output.
* :class:`PahubertEncoder` -- that front end inside the shared
  :class:`~pahubert_plugin.models.hubert_encoder.HubertTokenEncoder` (LayerNorm, projection,
  fairseq span masking, fairseq's wav2vec2 ``TransformerEncoder``).
* :class:`PahubertModel` -- the registered pretraining model: encoder + HuBERT's
  :class:`~pahubert_plugin.models.hubert_encoder.MaskedPredictionHead` on 100 Hz labels,
  subsampled to the token rate by fairseq's ``feat2tar_ratio`` logic.
"""
import copy
import math
from dataclasses import dataclass, field
from typing import List, Optional

import torch
from omegaconf import II, DictConfig, OmegaConf, open_dict
from torch import nn

from fairseq.models import register_model
from fairseq.models.hubert.hubert import HubertConfig

from .. import frames
from .blocks import ResUNetEncoder, encoder_reach, round_up, tiled_in_time
from .hubert_encoder import FrontEnd, FrontEndOutput, HubertPretrainingModel, HubertTokenEncoder, MaskedPredictionHead
from .spectral import Spectrogram, compress


INPUT_NORMS = ("none", "freq", "freq_raw")


@dataclass
class PahubertConfig(HubertConfig):
    """HuBERT's model options (transformer, masking, logits) plus the spectral stem.

    The waveform conv extractor options inherited from ``HubertConfig``
    (``extractor_mode``, ``conv_feature_layers``, ``conv_bias``) are unused: the spectral
    stem below replaces that extractor.
    """

    # audio: tied to the task so data and model agree
    sample_rate: int = II("task.sample_rate")
    audio_channels: int = II("task.audio_channels")

    # spectral front end
    n_fft: int = field(
        default=0,
        metadata={"help": "STFT size; 0 = 2048 at 44.1 kHz scaled with the rate (1024 at 16 kHz). "
                          "The hop is always sample_rate / 100 (one frame per label)"},
    )
    freq_mask_prob: float = field(
        default=0.0,
        metadata={"help": "training only: probability per example of zeroing one random band "
                          "of frequency bins of the compressed spectrogram (all channels)"},
    )
    freq_mask_max_bins: int = field(
        default=0, metadata={"help": "widest frequency band (in STFT bins) the band mask zeroes"}
    )

    # residual conv2d stem (Res-U-Net encoder half)
    stem_channels: List[int] = field(
        default_factory=lambda: [32, 64, 128, 256, 384],
        metadata={"help": "output channels of each residual stem block"},
    )
    stem_freq_strides: List[int] = field(
        default_factory=lambda: [2, 2, 2, 2, 2],
        metadata={"help": "frequency pooling after each stem block"},
    )
    stem_time_strides: List[int] = field(
        default_factory=lambda: [1, 1, 1, 1, 1],
        metadata={"help": "time pooling after each stem block; the product is the number of "
                          "100 Hz frames per token (targets are subsampled to match)"},
    )
    stem_units: int = field(default=2, metadata={"help": "residual units per stem block"})
    stem_norm: str = field(
        default="batch",
        metadata={"help": "normalisation in the stem's residual units: batch (BatchNorm, Kong et al.) or "
                          "group (GroupNorm: no running statistics carried from pretraining data into "
                          "fine-tuning, and the same behaviour in training and eval mode)"},
    )
    input_norm: str = field(
        default="none",
        metadata={"help": "normalisation of the compressed spectrogram before the stem: none, freq "
                          "(BatchNorm2d with one channel per frequency bin, Kong et al.'s bn0: every bin "
                          "standardised with running statistics of the training data, so quiet high "
                          "bins weigh as much as loud low ones), or freq_raw (the stem sees both: the "
                          "normalised bins and the raw compressed ones as extra input channels, so level "
                          "differences between bins stay visible)"},
    )
    stem_bn_momentum: float = field(
        default=0.01,
        metadata={"help": "BatchNorm momentum of the stem (Kong et al.: 0.01); short runs need more "
                          "(0.1) or their eval-mode running statistics are still near their init"},
    )


@dataclass
class SpectralContext:
    """What :class:`SpectralFrontEnd` hands a decoder besides its skips."""

    spec: torch.Tensor  # complex (batch, channels, freq, frames): the mixture's STFT
    num_frames: int  # STFT frames before the stem's padding
    bottleneck: torch.Tensor  # (batch, C_last, F', tokens): the stem's output map


class SpectralFrontEnd(FrontEnd):
    """Pac-HuBERT's time-frequency front end; see the module docstring.

    Attributes: ``out_dim`` (C_last * F'), ``bottleneck_shape`` = (C_last, F'), ``time_stride``
    (100 Hz frames per token), ``spectrogram``, ``input_norm`` (or None), ``stem``.
    """

    legacy_prefixes = {"stem.": "front_end.stem.", "input_norm.": "front_end.input_norm."}

    def __init__(self, cfg: "PahubertConfig"):
        super().__init__()
        self.cfg = cfg
        if not (len(cfg.stem_channels) == len(cfg.stem_freq_strides) == len(cfg.stem_time_strides)):
            raise ValueError(
                f"stem_channels {list(cfg.stem_channels)}, stem_freq_strides {list(cfg.stem_freq_strides)} "
                f"and stem_time_strides {list(cfg.stem_time_strides)} must have the same length"
            )
        self.sample_rate = int(cfg.sample_rate)
        self.audio_channels = int(cfg.audio_channels)
        self.spectrogram = Spectrogram(self.sample_rate, cfg.n_fft or None)
        input_norm = getattr(cfg, "input_norm", None) or "none"  # older checkpoints: none
        if input_norm not in INPUT_NORMS:
            raise ValueError(f"input_norm must be one of {', '.join(INPUT_NORMS)}, got {input_norm!r}")
        self.input_norm = (nn.BatchNorm2d(self.spectrogram.freq_bins, momentum=cfg.stem_bn_momentum)
                           if input_norm != "none" else None)
        self.keep_raw = input_norm == "freq_raw"
        strides = list(zip(cfg.stem_freq_strides, cfg.stem_time_strides))
        in_channels = self.audio_channels * (2 if self.keep_raw else 1)
        self.stem = ResUNetEncoder(in_channels, cfg.stem_channels, strides, cfg.stem_units,
                                   getattr(cfg, "stem_norm", None) or "batch")  # older checkpoints: batch
        for module in self.stem.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.momentum = cfg.stem_bn_momentum
        freq_stride, self.time_stride = self.stem.stride
        self.bottleneck_shape = (cfg.stem_channels[-1], math.ceil(self.spectrogram.freq_bins / freq_stride))
        self.out_dim = self.bottleneck_shape[0] * self.bottleneck_shape[1]

    @property
    def hop(self) -> float:
        return float(self.spectrogram.hop_length * self.time_stride)

    def num_tokens(self, num_samples: int) -> int:
        """Tokens the encoder makes for ``num_samples`` samples."""
        return math.ceil(frames.num_frames(num_samples, self.sample_rate) / self.time_stride)

    def band_mask(self, x: torch.Tensor) -> torch.Tensor:
        """Zero one random frequency band per chosen example of ``x`` (batch, channels, freq, frames)."""
        p, width = self.cfg.freq_mask_prob, min(self.cfg.freq_mask_max_bins, x.shape[2])
        if not self.training or p <= 0 or width <= 0:
            return x
        b, f = x.shape[0], x.shape[2]
        widths = torch.randint(1, width + 1, (b, 1), device=x.device)
        starts = (torch.rand(b, 1, device=x.device) * (f - widths + 1)).long()
        bins = torch.arange(f, device=x.device)[None]
        band = (bins >= starts) & (bins < starts + widths) & (torch.rand(b, 1, device=x.device) < p)
        return x.masked_fill(band[:, None, :, None], 0.0)

    def token_padding_mask(self, padding_mask: Optional[torch.Tensor], num_tokens: int):
        """A token is padding when none of its frames holds a whole hop of valid samples."""
        if padding_mask is None:
            return None
        valid_frames = (~padding_mask).sum(-1) // self.spectrogram.hop_length
        valid_tokens = torch.div(valid_frames + self.time_stride - 1, self.time_stride, rounding_mode="floor")
        return torch.arange(num_tokens, device=padding_mask.device)[None] >= valid_tokens[:, None]

    keep_skips = True  # False: the stem's skips are not kept (FrontEndOutput.skips is empty) ...
    tile_frames = 0  # ... and with tile_frames > 0 the stem runs in time tiles and FrontEndOutput.skips holds the
    # deepest skip alone, whole (pahubert_resunet's tiled decoding: the block that costs most is not run twice)

    def stem_input(self, source: torch.Tensor):
        """``source`` (batch, channels, samples) -> the stem's input (B, C, F_pad, frames_pad) and the
        mixture's complex STFT (B, C, F, frames)."""
        if source.dim() != 3 or source.shape[1] != self.audio_channels:
            raise ValueError(
                f"expected source of shape (batch, {self.audio_channels} channels, samples), "
                f"got {tuple(source.shape)}"
            )
        spec = self.spectrogram(source.float())  # (B, C, F, frames), fp32 even under .half()
        x = compress(spec.abs())
        if self.input_norm is not None:  # (B, C, F, T) -> one BatchNorm channel per frequency bin
            normed = self.input_norm(x.transpose(1, 2)).transpose(1, 2)
            x = torch.cat([normed, x], dim=1) if self.keep_raw else normed  # freq_raw: (B, 2C, F, T)
        x = self.band_mask(x)
        return self.stem.pad(x).to(next(self.stem.parameters()).dtype), spec

    def forward(self, source: torch.Tensor) -> FrontEndOutput:
        """``source`` (batch, channels, samples) -> tokens (batch, T', C_last * F'), stem skips and
        a :class:`SpectralContext`."""
        x, spec = self.stem_input(source)
        if self.keep_skips or self.tile_frames <= 0:
            bottleneck, skips = self.stem(x, keep_skips=self.keep_skips)  # (B, C_last, F', T')
        else:  # the deepest skip and the bottleneck, in the memory of a tile and of that skip
            skip_reach, scales, _ = encoder_reach(self.stem)
            deep = tiled_in_time(self.stem.deepest, x, self.tile_frames, round_up(skip_reach[-1], self.time_stride),
                                 scales[-1])
            bottleneck, skips = self.stem.pools[-1](deep), [deep]
        tokens = bottleneck.permute(0, 3, 1, 2).flatten(2)  # one token per (strided) frame: (B, T', C_last * F')
        return FrontEndOutput(tokens, skips, SpectralContext(spec, spec.shape[-1], bottleneck))


class PahubertEncoder(HubertTokenEncoder):
    """:class:`SpectralFrontEnd` + HuBERT's transformer half (``self.front_end``, ``self.transformer``)."""

    def __init__(self, cfg: "PahubertConfig"):
        super().__init__(SpectralFrontEnd(cfg), cfg)


def task_audio_channels(task_cfg):
    """``audio_channels`` of a task config (``channels`` in pretraining checkpoints written before 0.2)."""
    get = task_cfg.get if hasattr(task_cfg, "get") else lambda k, d=None: getattr(task_cfg, k, d)
    value = get("audio_channels", None)
    return get("channels", None) if value is None else value


def _tie_to_task(cfg, task_cfg) -> DictConfig:
    """A copy of the model config with the task's audio settings (the data's truth)."""
    cfg = copy.deepcopy(cfg) if OmegaConf.is_config(cfg) else OmegaConf.structured(cfg)
    values = {"sample_rate": getattr(task_cfg, "sample_rate", None), "audio_channels": task_audio_channels(task_cfg),
              "label_rate": getattr(task_cfg, "label_rate", None)}
    with open_dict(cfg):
        for key, value in values.items():
            if value is not None:
                cfg[key] = value
    return cfg


def encoder_config(ckpt_cfg) -> DictConfig:
    """The full :class:`PahubertConfig` of a saved ``pahubert`` checkpoint's ``cfg``.

    For code that rebuilds only the encoder (the separation model): ``ckpt_cfg`` is the
    checkpoint's ``cfg`` (dict or DictConfig with ``model`` and ``task``); defaults are
    filled and sample rate, channels and label rate come from the saved task.
    """
    model_cfg, task_cfg = ckpt_cfg["model"], ckpt_cfg["task"]
    name = model_cfg.get("_name")
    if name != "pahubert":
        raise ValueError(f"expected a 'pahubert' pretraining checkpoint, found model '{name}'")
    model_cfg = OmegaConf.create(OmegaConf.to_container(OmegaConf.create(model_cfg), resolve=False))
    model_cfg = _tie_to_task(model_cfg, OmegaConf.create(task_cfg))
    merged = OmegaConf.merge(OmegaConf.structured(PahubertConfig), model_cfg)
    OmegaConf.resolve(merged)
    return merged


@register_model("pahubert", dataclass=PahubertConfig)
class PahubertModel(HubertPretrainingModel):
    """Pac-HuBERT pretraining model: ``self.encoder`` (:class:`PahubertEncoder`) + ``self.head``."""

    def __init__(self, cfg: PahubertConfig, num_classes: List[int]):
        super().__init__()
        self.cfg = cfg
        self.encoder = PahubertEncoder(cfg)
        ratio = cfg.label_rate * self.encoder.front_end.time_stride / frames.LABEL_RATE
        self.head = MaskedPredictionHead.from_config(cfg, num_classes, ratio)

    @classmethod
    def build_model(cls, cfg: PahubertConfig, task):
        cfg = _tie_to_task(cfg, task.cfg)
        dictionaries = task.dictionaries
        if any(d is None for d in dictionaries):
            raise ValueError("pahubert pretraining needs a label dictionary (dict.<label>.txt) per label set")
        return cls(cfg, [len(d) for d in dictionaries])

    @classmethod
    def build_encoder(cls, model_cfg: dict, task_cfg: dict):
        cfg = encoder_config({"model": model_cfg, "task": task_cfg})
        return PahubertEncoder(cfg), OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
