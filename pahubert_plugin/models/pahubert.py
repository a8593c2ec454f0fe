"""Pac-HuBERT: HuBERT masked prediction on a time-frequency front end (fairseq model ``pahubert``).

Pieces, each usable on its own:

* :class:`PahubertEncoder` -- plain ``nn.Module``: STFT -> log-compressed magnitude ->
  (training-only frequency-band mask) -> residual conv2d stem (``ResUNetEncoder``, every
  audio channel is a conv input channel) -> one token per (time-strided) frame ->
  LayerNorm + Linear -> fairseq span masking with a learned mask embedding -> fairseq's
  wav2vec2 ``TransformerEncoder`` (convolutional positional embedding).  The separation
  model reuses it with its stem skips and bottleneck.
* :class:`MaskedPredictionHead` -- HuBERT's prediction head (final projection, cosine
  logits against label embeddings, masked / unmasked split), with targets at 100 Hz
  subsampled to the token rate by fairseq's ``feat2tar_ratio`` logic.
* :class:`HubertStyleModel` -- the ``get_logits`` / ``get_targets`` /
  ``get_extra_losses`` interface fairseq's HuBERT criterion (and ours) calls.

The math of masking, target subsampling and logits is fairseq's own
(``HubertModel.apply_mask``, ``forward_targets``, ``compute_nce``), called on these
modules rather than copied.
"""
import copy
import logging
import math
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import torch
from omegaconf import II, DictConfig, OmegaConf, open_dict
from torch import nn

from fairseq.data.data_utils import compute_mask_indices
from fairseq.models import BaseFairseqModel, register_model
from fairseq.models.hubert.hubert import HubertConfig, HubertModel
from fairseq.models.wav2vec.wav2vec2 import TransformerEncoder
from fairseq.modules import GradMultiply, LayerNorm

from .. import frames
from .blocks import ResUNetEncoder
from .spectral import Spectrogram, compress

logger = logging.getLogger(__name__)


def seeded_apply_mask(module, x, padding_mask, target_list=None):
    """fairseq's ``HubertModel.apply_mask`` with masks that follow torch's seed.

    fairseq's ``compute_mask_indices`` draws every row from ``np.random.default_rng(None)``
    (fresh OS entropy) unless it is given ``seed``, ``epoch`` and ``indices``; HubertModel
    gives none, so no two runs mask alike.  The seed is drawn here from torch's generator,
    which fairseq reseeds every update (``common.seed + num_updates``): masks are then as
    reproducible as dropout.  ``module`` has HubertModel's mask attributes.
    """
    B, T, C = x.shape
    mask_indices = None
    if module.mask_prob > 0:
        seed = int(torch.randint(0, 2**31 - 1, ()).item())
        mask_indices = compute_mask_indices(
            (B, T), padding_mask, module.mask_prob, module.mask_length, module.mask_selection,
            module.mask_other, min_masks=2, no_overlap=module.no_mask_overlap,
            min_space=module.mask_min_space, seed=seed, epoch=0, indices=torch.arange(B),
        )
        mask_indices = torch.from_numpy(mask_indices).to(x.device)
        x[mask_indices] = module.mask_emb
    if module.mask_channel_prob > 0:
        seed = int(torch.randint(0, 2**31 - 1, ()).item())
        mask_channel_indices = compute_mask_indices(
            (B, C), None, module.mask_channel_prob, module.mask_channel_length,
            module.mask_channel_selection, module.mask_channel_other,
            no_overlap=module.no_mask_channel_overlap, min_space=module.mask_channel_min_space,
            seed=seed, epoch=0, indices=torch.arange(B),
        )
        x[torch.from_numpy(mask_channel_indices).to(x.device).unsqueeze(1).expand(-1, T, -1)] = 0
    return x, mask_indices


@dataclass
class PahubertConfig(HubertConfig):
    """HuBERT's model options (transformer, masking, logits) plus the spectral stem.

    The waveform conv extractor options inherited from ``HubertConfig``
    (``extractor_mode``, ``conv_feature_layers``, ``conv_bias``) are unused: the spectral
    stem below replaces that extractor.
    """

    # audio: tied to the task so data and model agree
    sample_rate: int = II("task.sample_rate")
    audio_channels: int = II("task.channels")

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
        metadata={"help": "normalisation of the compressed spectrogram before the stem: none, or freq "
                          "(BatchNorm2d with one channel per frequency bin, Kong et al.'s bn0: every bin "
                          "standardised with running statistics of the training data, so quiet high "
                          "bins weigh as much as loud low ones)"},
    )
    stem_bn_momentum: float = field(
        default=0.01,
        metadata={"help": "BatchNorm momentum of the stem (Kong et al.: 0.01); short runs need more "
                          "(0.1) or their eval-mode running statistics are still near their init"},
    )


class PahubertEncoder(nn.Module):
    """Spectral stem + HuBERT transformer; see the module docstring.

    Attributes: ``embed_dim`` (D), ``bottleneck_shape`` = (C_last, F'), ``time_stride``
    (frames per token), ``spectrogram``, ``stem``, ``transformer``.
    """

    def __init__(self, cfg: PahubertConfig):
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
        strides = list(zip(cfg.stem_freq_strides, cfg.stem_time_strides))
        self.stem = ResUNetEncoder(self.audio_channels, cfg.stem_channels, strides, cfg.stem_units,
                                   getattr(cfg, "stem_norm", None) or "batch")  # older checkpoints: batch
        for module in self.stem.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.momentum = cfg.stem_bn_momentum
        input_norm = getattr(cfg, "input_norm", None) or "none"  # older checkpoints: none
        if input_norm not in ("none", "freq"):
            raise ValueError(f"input_norm must be none or freq, got {input_norm!r}")
        self.input_norm = (nn.BatchNorm2d(self.spectrogram.freq_bins, momentum=cfg.stem_bn_momentum)
                           if input_norm == "freq" else None)
        freq_stride, self.time_stride = self.stem.stride
        self.bottleneck_shape = (cfg.stem_channels[-1], math.ceil(self.spectrogram.freq_bins / freq_stride))
        stem_dim = self.bottleneck_shape[0] * self.bottleneck_shape[1]

        self.embed_dim = cfg.encoder_embed_dim
        self.feature_grad_mult = cfg.feature_grad_mult
        self.layer_norm = LayerNorm(stem_dim)
        self.post_extract_proj = nn.Linear(stem_dim, self.embed_dim)
        self.dropout_input = nn.Dropout(cfg.dropout_input)

        # attribute names are the ones fairseq's HubertModel.apply_mask reads
        self.mask_prob, self.mask_length = cfg.mask_prob, cfg.mask_length
        self.mask_selection, self.mask_other = cfg.mask_selection, cfg.mask_other
        self.no_mask_overlap, self.mask_min_space = cfg.no_mask_overlap, cfg.mask_min_space
        self.mask_channel_prob, self.mask_channel_length = cfg.mask_channel_prob, cfg.mask_channel_length
        self.mask_channel_selection, self.mask_channel_other = cfg.mask_channel_selection, cfg.mask_channel_other
        self.no_mask_channel_overlap = cfg.no_mask_channel_overlap
        self.mask_channel_min_space = cfg.mask_channel_min_space
        self.mask_emb = nn.Parameter(torch.FloatTensor(self.embed_dim).uniform_())

        self.transformer = TransformerEncoder(cfg)

    apply_mask = seeded_apply_mask

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
        """Sample-level ``(batch, samples)`` padding mask -> token-level ``(batch, tokens)``."""
        if padding_mask is None:
            return None
        valid_frames = (~padding_mask).sum(-1) // self.spectrogram.hop_length
        valid_tokens = torch.div(valid_frames + self.time_stride - 1, self.time_stride, rounding_mode="floor")
        return torch.arange(num_tokens, device=padding_mask.device)[None] >= valid_tokens[:, None]

    def forward(
        self,
        source: torch.Tensor,
        padding_mask: Optional[torch.Tensor] = None,
        mask: bool = False,
        output_layer: Optional[int] = None,
    ) -> Dict[str, object]:
        """Encode ``source`` (batch, channels, samples); ``padding_mask`` (batch, samples), True = pad.

        Returns a dict: ``features`` (batch, tokens, D) transformer output (of layer
        ``output_layer``, counted from 1, if given); ``padding_mask`` (batch, tokens) or None;
        ``mask_indices`` (batch, tokens) bool or None; ``skips`` (stem block outputs,
        shallowest first, (batch, C_i, F_i, frames_i)); ``bottleneck`` (batch, C_last, F',
        tokens); ``spec`` complex (batch, channels, freq, frames); ``num_frames`` (STFT frames
        before stem padding); ``layer_results`` (fairseq's per-layer tuples);
        ``features_pen`` (scalar, HuBERT's penalty on the stem features).
        """
        if source.dim() != 3 or source.shape[1] != self.audio_channels:
            raise ValueError(
                f"expected source of shape (batch, {self.audio_channels} channels, samples), "
                f"got {tuple(source.shape)}"
            )
        spec = self.spectrogram(source.float())  # (B, C, F, frames), fp32 even under .half()
        num_frames = spec.shape[-1]
        x = compress(spec.abs())
        if self.input_norm is not None:  # (B, C, F, T) -> one BatchNorm channel per frequency bin
            x = self.input_norm(x.transpose(1, 2)).transpose(1, 2)
        x = self.band_mask(x)
        x = self.stem.pad(x).to(self.post_extract_proj.weight.dtype)  # (B, C, F_pad, frames_pad)
        if self.feature_grad_mult > 0:
            bottleneck, skips = self.stem(x)  # (B, C_last, F', T')
            if self.feature_grad_mult != 1.0:
                bottleneck = GradMultiply.apply(bottleneck, self.feature_grad_mult)
        else:
            with torch.no_grad():
                bottleneck, skips = self.stem(x)
        # one token per (strided) frame: (B, C_last, F', T') -> (B, T', C_last * F')
        tokens = bottleneck.permute(0, 3, 1, 2).flatten(2)
        features_pen = tokens.float().pow(2).mean()
        x = self.dropout_input(self.post_extract_proj(self.layer_norm(tokens)))  # (B, T', D)

        padding_mask = self.token_padding_mask(padding_mask, x.shape[1])
        mask_indices = None
        if mask:
            # fairseq writes mask_emb into x in place: match dtypes (x is fp16 under autocast)
            x, mask_indices = self.apply_mask(x.to(self.mask_emb.dtype), padding_mask, None)
        x, layer_results = self.transformer(
            x, padding_mask=padding_mask, layer=None if output_layer is None else output_layer - 1
        )
        return {
            "features": x, "padding_mask": padding_mask, "mask_indices": mask_indices,
            "skips": skips, "bottleneck": bottleneck, "spec": spec, "num_frames": num_frames,
            "layer_results": layer_results, "features_pen": features_pen,
        }


class MaskedPredictionHead(nn.Module):
    """HuBERT's masked-prediction head on any token sequence.

    ``feat2tar_ratio`` = label frames per token (1 for 100 Hz tokens and 100 Hz labels,
    ``time_stride`` for a strided stem, ~4.65 for a 21.5 Hz Demucs bottleneck).
    """

    def __init__(self, embed_dim: int, num_classes: List[int], feat2tar_ratio: float,
                 final_dim: int = 0, logit_temp: float = 0.1, untie_final_proj: bool = False,
                 target_glu: bool = False, skip_masked: bool = False, skip_nomask: bool = False):
        super().__init__()
        final_dim = final_dim if final_dim > 0 else embed_dim
        self.num_classes = list(num_classes)
        self.feat2tar_ratio = feat2tar_ratio
        self.logit_temp = logit_temp
        self.untie_final_proj = untie_final_proj
        self.skip_masked, self.skip_nomask = skip_masked, skip_nomask
        self.target_glu = (
            nn.Sequential(nn.Linear(final_dim, final_dim * 2), nn.GLU()) if target_glu else None
        )
        out = final_dim * len(self.num_classes) if untie_final_proj else final_dim
        self.final_proj = nn.Linear(embed_dim, out)
        self.label_embs_concat = nn.Parameter(torch.FloatTensor(sum(self.num_classes), final_dim))
        nn.init.uniform_(self.label_embs_concat)

    compute_nce = HubertModel.compute_nce
    _forward_targets = HubertModel.forward_targets  # expects features (B, D, T)

    def forward_targets(self, features: torch.Tensor, target_list: List[torch.Tensor]):
        """Trim ``features`` (B, T', D) to the labels and pick each token's label (fairseq's rule)."""
        features, target_list = self._forward_targets(features.transpose(1, 2), target_list)
        return features.transpose(1, 2), target_list

    def _predict(self, x, target, label_embs):
        """(S, classes + 1) logits, column 0 = the target: fairseq's ``compute_nce`` of ``x`` against
        its label's embedding and every label embedding, those equal to the target's at -inf."""
        if self.target_glu is not None:  # the GLU acts on each (class, token) pair: fairseq's own path
            return self.expanded_logits(x, target, label_embs)
        return self.cosine_logits(x, target, label_embs)

    def expanded_logits(self, x, target, label_embs):
        """fairseq's path: ``compute_nce`` on the (classes, S, D) expansion of the label embeddings."""
        y = torch.index_select(label_embs, 0, target.long())  # (S, D)
        negs = label_embs.unsqueeze(1).expand(-1, x.size(0), -1)  # (classes, S, D)
        if self.target_glu is not None:
            y, negs = self.target_glu(y), self.target_glu(negs)
        return self.compute_nce(x, y, negs)

    def cosine_logits(self, x, target, label_embs):
        """``compute_nce`` without its (classes, S, D) expansion: the negatives are the label embeddings
        themselves, so every cosine is one (S, D) x (D, classes) product. Same values and -inf pattern
        (tests/test_pretraining.py compares the two); 1/3 of a CPU pretraining step at 100 clusters
        went into the expanded elementwise ops (benchmarks/bench_pretrain.py --logits-peer)."""
        xf, ef = x.float(), label_embs.float()
        cos = (xf @ ef.t()) / (xf.norm(dim=-1, keepdim=True) * ef.norm(dim=-1)[None]).clamp_min(1e-8)
        logits = (cos.type_as(x) / self.logit_temp)
        target = target.long()
        pos = logits.gather(1, target[:, None])
        same = (ef[:, None, :] == ef[None, :, :]).all(-1)  # (classes, classes): exact duplicates
        negs = logits.masked_fill(same[target], float("-inf"))  # fairseq's neg_is_pos
        return torch.cat([pos, negs], dim=1)

    def _logits(self, x, selected, target_list):
        proj = self.final_proj(x[selected])
        projs = proj.chunk(len(target_list), dim=-1) if self.untie_final_proj else [proj] * len(target_list)
        embs = self.label_embs_concat.split(self.num_classes, 0)
        return [self._predict(p, t[selected], e) for p, t, e in zip(projs, target_list, embs)]

    def forward(
        self,
        features: torch.Tensor,
        target_list: List[torch.Tensor],
        mask_indices: Optional[torch.Tensor] = None,
        padding_mask: Optional[torch.Tensor] = None,
        features_pen: Optional[torch.Tensor] = None,
    ) -> Dict[str, object]:
        """``features`` (B, T', D); ``target_list`` [(B, T_labels)] at the label rate;
        ``mask_indices`` / ``padding_mask`` (B, T') bool or None.

        Returns HuBERT's net_output: ``logit_m_list`` / ``logit_u_list`` (one (S, classes+1)
        tensor per label set, or None when skipped), ``padding_mask`` (B, T'') after trimming
        to the labels, ``features_pen``.
        """
        if not target_list:
            raise ValueError("masked prediction needs target_list (one (batch, frames) tensor per label set)")
        features, target_list = self.forward_targets(features, target_list)
        b, t = features.shape[:2]
        no = features.new_zeros((b, t), dtype=torch.bool)
        padding_mask = no if padding_mask is None else padding_mask[:, :t]
        masked = no if mask_indices is None else mask_indices[:, :t]
        n = len(target_list)
        logit_m = [None] * n if self.skip_masked else self._logits(features, ~padding_mask & masked, target_list)
        logit_u = [None] * n if self.skip_nomask else self._logits(features, ~padding_mask & ~masked, target_list)
        out = {"logit_m_list": logit_m, "logit_u_list": logit_u, "padding_mask": padding_mask}
        if features_pen is not None:
            out["features_pen"] = features_pen
        return out


class HubertStyleModel(BaseFairseqModel):
    """The model-side interface of HuBERT's criterion (fairseq's own methods)."""

    get_logits = HubertModel.get_logits
    get_targets = HubertModel.get_targets
    get_extra_losses = HubertModel.get_extra_losses

    def extract_features(self, source, padding_mask=None, mask=False, output_layer=None):
        raise NotImplementedError


def _tie_to_task(cfg, task_cfg) -> DictConfig:
    """A copy of the model config with the task's audio settings (the data's truth)."""
    cfg = copy.deepcopy(cfg) if OmegaConf.is_config(cfg) else OmegaConf.structured(cfg)
    with open_dict(cfg):
        for key, task_key in (("sample_rate", "sample_rate"), ("audio_channels", "channels"),
                              ("label_rate", "label_rate")):
            value = getattr(task_cfg, task_key, None)
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
class PahubertModel(HubertStyleModel):
    """Pac-HuBERT pretraining model: ``self.encoder`` (:class:`PahubertEncoder`) + ``self.head``."""

    def __init__(self, cfg: PahubertConfig, num_classes: List[int]):
        super().__init__()
        self.cfg = cfg
        self.encoder = PahubertEncoder(cfg)
        ratio = cfg.label_rate * self.encoder.time_stride / frames.LABEL_RATE
        self.head = MaskedPredictionHead(
            cfg.encoder_embed_dim, num_classes, ratio, final_dim=cfg.final_dim,
            logit_temp=cfg.logit_temp, untie_final_proj=cfg.untie_final_proj,
            target_glu=cfg.target_glu, skip_masked=cfg.skip_masked, skip_nomask=cfg.skip_nomask,
        )

    @classmethod
    def build_model(cls, cfg: PahubertConfig, task):
        cfg = _tie_to_task(cfg, task.cfg)
        dictionaries = task.dictionaries
        if any(d is None for d in dictionaries):
            raise ValueError("pahubert pretraining needs a label dictionary (dict.<label>.txt) per label set")
        return cls(cfg, [len(d) for d in dictionaries])

    def forward(
        self,
        source: torch.Tensor,
        target_list: Optional[List[torch.Tensor]] = None,
        padding_mask: Optional[torch.Tensor] = None,
        mask: bool = True,
        features_only: bool = False,
        output_layer: Optional[int] = None,
    ) -> Dict[str, object]:
        """``source`` (batch, channels, samples); ``target_list`` [(batch, frames)] at 100 Hz.

        Returns HuBERT's net_output (see :class:`MaskedPredictionHead`) or, with
        ``features_only``, the encoder's dict plus ``x`` = ``features``.
        """
        out = self.encoder(source, padding_mask=padding_mask, mask=mask, output_layer=output_layer)
        if features_only:
            return {**out, "x": out["features"]}
        return self.head(out["features"], target_list, out["mask_indices"], out["padding_mask"],
                         out["features_pen"])

    def extract_features(self, source, padding_mask=None, mask=False, output_layer=None):
        """HuBERT's signature: -> (features (batch, tokens, D), padding_mask (batch, tokens) or None)."""
        out = self.encoder(source, padding_mask=padding_mask, mask=mask, output_layer=output_layer)
        return out["features"], out["padding_mask"]

    def remove_pretraining_modules(self):
        self.head = None
