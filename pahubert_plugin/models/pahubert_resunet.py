"""fairseq model ``pahubert_resunet``: Res-U-Net decoder on the Pac-HuBERT encoder.

The encoder (:class:`~pahubert_plugin.models.pahubert.PahubertEncoder`: spectral front end +
transformer) is rebuilt from a ``pahubert`` pretraining checkpoint's saved config and its
``encoder.*`` weights are copied (fairseq ``hubert_asr`` style).  The transformer output
is projected back to a ``(C_last, F')`` map per token, which replaces the Res-U-Net
bottleneck; the decoder mirrors the stem and takes its skips; the decoupled mask head
(Kong et al. 2021, shared with ``resunet``) gives the complex source spectrograms.

* ``no_pretrained_weights=true`` builds the same architecture randomly initialised (the
  scratch arm of a comparison); the checkpoint still supplies the architecture.
* ``freeze_encoder_updates=N``: the encoder gets no gradient for the first N updates.
* ``encoder_lr_scale``: attached to the encoder's parameters as fairseq ``optim_overrides``;
  it takes effect with ``optimizer=composite`` and ``optimizer.dynamic_groups=true``
  (see recipes/musdb/conf/pahubert_base.yaml); with a plain optimizer it has no effect.
* ``fuse_pretrained=true``: the separator keeps a whole encoder of its own, randomly initialised and
  trained (the scratch arm's network exactly), and the pretrained encoder runs beside it, frozen unless
  ``fused_lr_scale`` > 0; its features (or ``layer_weights``' mix of its layers) are added to the
  bottleneck map through a zero-initialised projection. At the first update the model computes what the
  scratch model computes, so the pretrained arm cannot be worse for lack of capacity: the features add
  to what the labels teach instead of replacing the separator's own spectrogram path.
* The encoder config is stored in the fine-tuned checkpoint (``model.encoder_cfg``), so
  inference does not need the pretraining checkpoint.
"""
import contextlib
import logging
from dataclasses import dataclass, field
from typing import List, Tuple

import torch
from fairseq.models import register_model
from omegaconf import II, OmegaConf, open_dict
from torch import nn

from .blocks import ResUNetDecoder, encoder_reach, res_block, round_up, time_reach
from .pahubert import PahubertEncoder, encoder_config
from .pretrained import PretrainedEncoderConfig, load_pretrained_weights, remember, resolve_pretrained
from .resunet import MASK_MAGNITUDE_HELP, SLOTS_HELP, SpectralSeparator

logger = logging.getLogger(__name__)


@dataclass
class PahubertResUNetConfig(PretrainedEncoderConfig):
    """``pretrained_checkpoint`` (a ``pahubert`` checkpoint) gives the whole encoder config, saved as
    ``encoder_cfg`` (:mod:`~pahubert_plugin.models.pretrained`); the fields below adjust fine-tuning."""

    sources: List[str] = II("task.sources")
    sample_rate: int = II("task.sample_rate")
    audio_channels: int = II("task.audio_channels")
    freeze_encoder_updates: int = field(default=0, metadata={
        "help": "no gradient into the encoder for this many updates"})
    encoder_lr_scale: float = field(default=1.0, metadata={
        "help": "learning-rate multiplier of the encoder (needs optimizer=composite with dynamic_groups=true)"})
    encoder_layerdrop: float = field(default=-1.0, metadata={
        "help": "override the pretrained encoder's layerdrop during fine-tuning (-1: keep)"})
    encoder_dropout: float = field(default=-1.0, metadata={
        "help": "override the pretrained encoder's dropout during fine-tuning (-1: keep)"})
    encoder_feature_grad_mult: float = field(default=-1.0, metadata={
        "help": "override the pretrained encoder's feature_grad_mult during fine-tuning (-1: keep; "
                "1: the stem trains, e.g. after pretraining with a frozen random stem; 0: stem frozen)"})
    reinit_layers: int = field(default=0, metadata={
        "help": "keep the top N transformer layers at their random init instead of the pretrained weights "
                "(the scratch arm's init exactly: few-sample BERT fine-tuning's re-initialisation of the "
                "layers most specific to the pretraining targets)"})
    reinit_pos_conv: bool = field(default=False, metadata={
        "help": "keep the transformer's convolutional positional embedding at its random init (the scratch "
                "arm's) instead of the pretrained one"})
    mask_prob: float = field(default=0.0, metadata={
        "help": "fine-tuning with masking, as fairseq's hubert_asr / wav2vec2 fine-tuning (apply_mask): in "
                "training, spans of transformer input tokens are replaced by the encoder's mask embedding "
                "with this probability (0: off). The stem skips still see every frame"})
    mask_length: int = field(default=-1, metadata={
        "help": "span length of fine-tuning masks in tokens (-1: the pretrained encoder's)"})
    bottleneck_units: int = field(default=1, metadata={
        "help": "residual units applied to the projected transformer output (0: none)"})
    decoder_units: int = field(default=2, metadata={"help": "residual units per decoder block"})
    decoder_skips: int = field(default=-1, metadata={
        "help": "stem skips the decoder takes, shallowest first (-1: all, Res-U-Net style; 0: none, so "
                "everything the decoder knows beyond the mixture passes through the transformer)"})
    mask_magnitude: str = field(default="relu", metadata={"help": MASK_MAGNITUDE_HELP})
    slots_per_source: int = field(default=1, metadata={"help": SLOTS_HELP})
    layer_weights: bool = field(default=False, metadata={
        "help": "decode a learned softmax-weighted sum of every transformer layer's output (SUPERB "
                "style) instead of the last layer's, whose features are the most specific to the "
                "pretraining labels; with fuse_pretrained, the layers of the pretrained encoder"})
    fuse_pretrained: bool = field(default=False, metadata={
        "help": "keep a randomly initialised encoder as the separator's own, trained path (the scratch "
                "network) and add the pretrained encoder's features to its bottleneck map through a "
                "zero-initialised projection (pretrained features fused with the spectrogram path, "
                "not replacing it); with no_pretrained_weights=true the side encoder is random too"})
    fused_lr_scale: float = field(default=0.0, metadata={
        "help": "with fuse_pretrained: 0 keeps the pretrained encoder frozen (eval mode, no gradient); "
                "> 0 trains it at this learning-rate multiplier (needs optimizer=composite with "
                "dynamic_groups=true, as encoder_lr_scale)"})


def _pahubert_encoder_cfg(state: dict, path: str):
    try:
        return OmegaConf.to_container(encoder_config(state["cfg"]), resolve=True)
    except ValueError as e:
        raise ValueError(f"{path}: {e}; pahubert_resunet needs a checkpoint of pahubert pretraining "
                         f"(task=pahubert_pretraining, model=pahubert)") from None


@register_model("pahubert_resunet", dataclass=PahubertResUNetConfig)
class PahubertResUNetModel(SpectralSeparator):
    """Pac-HuBERT encoder + Res-U-Net decoder + decoupled mask head."""

    def __init__(self, cfg: PahubertResUNetConfig, encoder_cfg):
        super().__init__(cfg.sources, cfg.sample_rate, cfg.audio_channels, None,
                         getattr(cfg, "mask_magnitude", "relu"),  # older checkpoints: relu
                         getattr(cfg, "slots_per_source", 1))
        enc_cfg = OmegaConf.merge(OmegaConf.create(encoder_cfg))
        with open_dict(enc_cfg):
            if cfg.encoder_layerdrop >= 0:
                enc_cfg.encoder_layerdrop = cfg.encoder_layerdrop
            if cfg.encoder_dropout >= 0:
                enc_cfg.dropout = cfg.encoder_dropout
            if getattr(cfg, "encoder_feature_grad_mult", -1.0) >= 0:  # older fine-tuned checkpoints lack it
                enc_cfg.feature_grad_mult = cfg.encoder_feature_grad_mult
        if int(enc_cfg.sample_rate) != self.sample_rate or int(enc_cfg.audio_channels) != self.audio_channels:
            raise ValueError(
                f"the pretrained encoder takes {enc_cfg.audio_channels} channels at {enc_cfg.sample_rate} Hz "
                f"but the task has {self.audio_channels} at {self.sample_rate} Hz; set task.sample_rate and "
                f"task.audio_channels to match")
        if cfg.layer_weights and float(enc_cfg.encoder_layerdrop) > 0:
            raise ValueError("model.layer_weights=true needs every layer's output: set model.encoder_layerdrop=0")
        self.encoder = PahubertEncoder(enc_cfg)
        front = self.encoder.front_end
        self.spectrogram = front.spectrogram  # same STFT for analysis and synthesis
        stem = front.stem
        c_last, f_last = front.bottleneck_shape
        self.proj = nn.Linear(self.encoder.embed_dim, c_last * f_last)
        self.bottleneck = (res_block(c_last, c_last, cfg.bottleneck_units, stem.norm) if cfg.bottleneck_units > 0
                           else nn.Identity())
        self.decoder = ResUNetDecoder(c_last, stem.channels, stem.strides, cfg.decoder_units,
                                      self.mask_head.out_channels, num_skips=cfg.decoder_skips, norm=stem.norm)
        self.layer_weights = (nn.Parameter(torch.zeros(int(enc_cfg.encoder_layers)))
                              if cfg.layer_weights else None)
        self.fused_encoder, self.fuse_proj, self.fused_frozen = None, None, True
        if getattr(cfg, "fuse_pretrained", False):  # older fine-tuned checkpoints: off
            self._build_fused(cfg, enc_cfg)
        self.encoder.mask_prob = float(getattr(cfg, "mask_prob", 0.0))  # older fine-tuned checkpoints: off
        if getattr(cfg, "mask_length", -1) > 0:
            self.encoder.mask_length = int(cfg.mask_length)
        self.encoder.mask_channel_prob = 0.0
        self.freeze_encoder_updates = cfg.freeze_encoder_updates
        self.num_updates = 0
        if cfg.encoder_lr_scale != 1.0:
            for p in self.encoder.parameters():
                p.optim_overrides = {"optimizer": {"lr_scale": cfg.encoder_lr_scale}}

    def _build_fused(self, cfg: PahubertResUNetConfig, enc_cfg) -> None:
        """The side encoder (pretrained weights go here) and its zero-initialised projection."""
        clashes = [name for name, bad in (("reinit_layers", cfg.reinit_layers > 0),
                                          ("reinit_pos_conv", cfg.reinit_pos_conv),
                                          ("freeze_encoder_updates", cfg.freeze_encoder_updates > 0),
                                          ("encoder_lr_scale", cfg.encoder_lr_scale != 1.0)) if bad]
        if clashes:
            raise ValueError(f"model.fuse_pretrained=true keeps the separator's own encoder at random init and "
                             f"fully trained; model.{', model.'.join(clashes)} would change that path (use "
                             f"model.fused_lr_scale for the pretrained encoder)")
        if cfg.fused_lr_scale < 0:
            raise ValueError(f"model.fused_lr_scale must be >= 0 (0: frozen), got {cfg.fused_lr_scale}")
        self.fused_encoder = PahubertEncoder(enc_cfg)
        self.fused_encoder.front_end.keep_skips = False  # only its tokens are used
        self.fused_encoder.mask_prob = self.fused_encoder.mask_channel_prob = 0.0
        c_last, f_last = self.encoder.front_end.bottleneck_shape
        self.fuse_proj = nn.Linear(self.fused_encoder.embed_dim, c_last * f_last)
        nn.init.zeros_(self.fuse_proj.weight)  # at init: the scratch model's bottleneck map exactly
        nn.init.zeros_(self.fuse_proj.bias)
        self.fused_frozen = cfg.fused_lr_scale == 0
        for p in self.fused_encoder.parameters():
            if self.fused_frozen:
                p.requires_grad_(False)
            elif cfg.fused_lr_scale != 1.0:
                p.optim_overrides = {"optimizer": {"lr_scale": cfg.fused_lr_scale}}
        if self.fused_frozen:
            self.fused_encoder.eval()

    def train(self, mode: bool = True):
        super().train(mode)
        if self.fused_encoder is not None and self.fused_frozen:
            self.fused_encoder.eval()  # a frozen feature extractor: no dropout, no BatchNorm statistics updates
        return self

    @classmethod
    def build_model(cls, cfg: PahubertResUNetConfig, task=None):
        encoder_cfg, state = resolve_pretrained(cfg, ("pahubert",), "pahubert_resunet", _pahubert_encoder_cfg)
        if encoder_cfg is None:
            raise ValueError("pahubert_resunet needs model.pretrained_checkpoint=<pahubert checkpoint> "
                             "(also with no_pretrained_weights=true: it defines the architecture)")
        model = cls(cfg, encoder_cfg)
        remember(model, encoder_cfg=encoder_cfg)
        if state is not None:
            model.load_pretrained_encoder(state, cfg)
        return model

    def load_pretrained_encoder(self, state: dict, cfg: PahubertResUNetConfig) -> None:
        """The checkpoint's encoder weights, except the parts ``reinit_layers`` / ``reinit_pos_conv``
        keep at their random init (the scratch arm's init exactly)."""
        n_top = int(getattr(cfg, "reinit_layers", 0))
        layers = self.encoder.transformer.layers
        if not 0 <= n_top <= len(layers):
            raise ValueError(f"model.reinit_layers={n_top}: the encoder has {len(layers)} transformer layers")
        keep = {f"layer {i + 1}": layers[i] for i in range(len(layers) - n_top, len(layers))}
        if getattr(cfg, "reinit_pos_conv", False):
            keep["pos_conv"] = self.encoder.transformer.pos_conv
        init = {name: {k: v.clone() for k, v in m.state_dict().items()} for name, m in keep.items()}
        if self.fused_encoder is not None:  # the pretrained weights go to the side encoder
            holder = nn.Module()
            holder.encoder = self.fused_encoder
            load_pretrained_weights(holder, state, cfg.pretrained_checkpoint)
            return
        load_pretrained_weights(self, state, cfg.pretrained_checkpoint)
        for name, module in keep.items():
            module.load_state_dict(init[name])
        if keep:
            logger.info(f"random init kept for: {', '.join(keep)}")

    def set_num_updates(self, num_updates):
        super().set_num_updates(num_updates)
        self.num_updates = num_updates

    def _layer_mix(self, out) -> torch.Tensor:
        """An encoder output's features (batch, tokens, D): the last layer's, or ``layer_weights``' mix."""
        if self.layer_weights is None:
            return out.features
        # layer_results: (tokens, batch, D) after each layer -> (layers, batch, tokens, D)
        stacked = torch.stack([r[0] for r in out.layer_results], dim=0).transpose(1, 2)
        weights = torch.softmax(self.layer_weights, dim=0).to(stacked.dtype)
        return (weights[:, None, None, None] * stacked).sum(0)

    def _fused_features(self, padded: torch.Tensor) -> torch.Tensor:
        """The side encoder's features of ``padded`` (batch, channels, samples) -> (batch, tokens, D). A frozen
        encoder runs without gradient; ``layer_weights``' mix of its layers is outside that and trains."""
        with torch.no_grad() if self.fused_frozen else contextlib.nullcontext():
            out = self.fused_encoder(padded)
        return self._layer_mix(out)

    def _bottleneck_map(self, out, padded: torch.Tensor) -> torch.Tensor:
        """The encoder's output -> the decoder's bottleneck map (batch, C_last, F', tokens)."""
        if self.fused_encoder is None:
            x = self.proj(self._layer_mix(out))  # (batch, tokens, C_last * F')
        else:  # the own encoder's last layer plus the pretrained features
            x = self.proj(out.features) + self.fuse_proj(self._fused_features(padded))
        c_last, f_last = self.encoder.front_end.bottleneck_shape
        # (batch, tokens, C_last * F') -> (batch, C_last, F', tokens)
        x = x.view(x.shape[0], x.shape[1], c_last, f_last).permute(0, 2, 3, 1)
        return self.bottleneck(x)

    def estimate_spec(self, padded: torch.Tensor) -> torch.Tensor:
        if self.decode_tile_frames > 0 and not torch.is_grad_enabled() and not self.training:
            return self._estimate_spec_tiled(padded)
        frozen = self.training and self.num_updates < self.freeze_encoder_updates
        with torch.no_grad() if frozen else contextlib.nullcontext():
            out = self.encoder(padded, mask=self.training and self.encoder.mask_prob > 0)
        spec, n_frames = out.front.context.spec, out.front.context.num_frames  # complex (B, C, F, frames)
        raw = self.decoder(self._bottleneck_map(out, padded), out.front.skips, consume=True)[..., :spec.shape[-2], :n_frames]
        return self.mask_head(raw, spec)

    # ---- tiled decoding (inference only): memory of a tile instead of a chunk, same estimates ----------------
    decode_tile_frames = 0  # > 0: set_decode_tile() was called

    def set_decode_tile(self, seconds: float) -> None:
        """Decode each chunk in time tiles of about ``seconds`` (0: whole chunks, the default).

        The transformer still sees the whole chunk, so the estimates are the same up to float rounding: a
        first pass runs the stem tile by tile keeping only its deepest skip (the last block's output, whose
        block costs most) and the transformer; then for every tile the stem's other blocks run again on the
        tile plus a margin on each side (:meth:`tile_margin` frames: as far as a tile's edge can reach into
        its output through the stem's and the decoder's convolutions) and the decoder decodes it, each level
        with only the context it needs (:meth:`decoder_margins`). Peak memory follows the tile instead of the
        chunk (the five full-time-resolution stem skips of a 10 s chunk alone are ~0.65 GB at base size, the
        deepest one ~0.1 GB); the price is most of the stem twice plus the margins
        (``benchmarks/bench_separate.py --variants tile`` measures both). Needs BatchNorm in the stem and the
        decoder: GroupNorm normalises over the whole chunk, so a tile would see other statistics."""
        seconds = float(seconds)
        if not (seconds >= 0 and seconds < float("inf")):
            raise ValueError(f"decode tile must be >= 0 seconds, got {seconds}")
        if seconds > 0 and any(isinstance(m, nn.GroupNorm) for m in self.modules()):
            raise ValueError("tiled decoding needs BatchNorm in the stem and the decoder; this model has GroupNorm "
                             "(model.stem_norm=group), which normalises over the whole chunk: decode whole chunks")
        front = self.encoder.front_end
        stride = front.time_stride
        frames = int(round(seconds * self.sample_rate / front.spectrogram.hop_length))
        self.decode_tile_frames = 0 if seconds == 0 else max(stride, round_up(frames, stride))

    def tile_margin(self) -> int:
        """STFT frames of context each side of a tile that make its decoded frames exact: how far the zeros at
        a tile's edge reach inward through the stem's convolutions (to each skip) and then the decoder's
        (:func:`~pahubert_plugin.models.blocks.encoder_reach`); a multiple of the stem's time stride."""
        stem = self.encoder.front_end.stem
        skip_reach, scales, _ = encoder_reach(stem)
        skip_reach[-1] = 0  # the deepest skip comes whole from the first pass (tiles with the stem's own margin)
        reach = 0  # so does the bottleneck map: exact
        for level, block in enumerate(self.decoder.blocks):
            i = len(stem.blocks) - 1 - level  # the stem block this level mirrors
            if self.decoder.uses_skip[level]:
                reach = max(reach, skip_reach[i])
            reach += time_reach(block, scales[i])
        return round_up(reach + time_reach(self.decoder.head), stem.stride[1])

    def decoder_margins(self) -> List[Tuple[int, int]]:
        """Per decoder level (deepest first): ``(margin, scale)``, the input frames of context each side of a
        tile that the level's input needs (how far its own and the later levels' convolutions reach, a
        multiple of its scale) and the input frames per frame at that level."""
        _, scales, _ = encoder_reach(self.encoder.front_end.stem)
        depth = len(self.decoder.blocks)
        reach, out = time_reach(self.decoder.head), []
        for level in reversed(range(depth)):  # from the output inward
            scale = scales[depth - 1 - level]
            reach = round_up(reach + time_reach(self.decoder.blocks[level], scale), scale)
            out.append((reach, scale))
        return out[::-1]

    def _estimate_spec_tiled(self, padded: torch.Tensor) -> torch.Tensor:
        front = self.encoder.front_end
        front.keep_skips, front.tile_frames = False, self.decode_tile_frames
        try:
            out = self.encoder(padded)  # the stem tile by tile, the transformer on the whole chunk
        finally:
            front.keep_skips, front.tile_frames = True, 0
        spec, n_frames = out.front.context.spec, out.front.context.num_frames
        x = self._bottleneck_map(out, padded)  # (B, C_last, F', tokens)
        (deep,), scale_deep = out.front.skips, encoder_reach(front.stem)[1][-1]
        del out
        stem_in, _ = front.stem_input(padded)  # (B, C, F_pad, frames_pad), frames_pad = tokens x time stride
        stride, tile, margin = front.time_stride, self.decode_tile_frames, self.tile_margin()
        levels = self.decoder_margins()
        n_bins, total, out = spec.shape[-2], stem_in.shape[-1], None
        for a in range(0, n_frames, tile):  # the frames past n_frames (the stem's padding) are never needed
            b = min(n_frames, a + tile)
            end = round_up(b, stride)
            lo, hi = max(0, a - margin), min(total, end + margin)
            # each decoder level on its tile plus the context its remaining convolutions reach, not the whole margin
            windows = [((max(lo, a - m) - lo) // scale, (min(hi, end + m) - lo) // scale) for m, scale in levels]
            skips = front.stem.shallow_skips(stem_in[..., lo:hi]) + [deep[..., lo // scale_deep:hi // scale_deep]]
            raw = self.decoder(x[..., lo // stride:hi // stride], skips, consume=True, windows=windows)
            first = lo + windows[-1][0] * levels[-1][1]  # the input frame the decoder's output starts at
            est = self.mask_head(raw[..., :n_bins, a - first:b - first], spec[..., a:b])  # the head is frame-wise
            del raw
            if out is None:
                out = est.new_empty(*est.shape[:-1], n_frames)
            out[..., a:b] = est
        return out
