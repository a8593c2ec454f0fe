"""fairseq model ``demucs_v2_hubert``: Demucs V2 with HuBERT's transformer as its bottleneck.

One registered model, two roles chosen by the task it is built for:

* ``task=pahubert_pretraining`` (criterion ``pahubert``): the Demucs encoder + transformer
  (:class:`~pahubert_plugin.models.demucs.DemucsHubertEncoder`) and HuBERT's masked
  prediction head (:class:`~pahubert_plugin.models.hubert_encoder.MaskedPredictionHead`) on the
  100 Hz labels, subsampled to the bottleneck rate by fairseq's ``feat2tar`` rule
  (``label_rate * hop / sample_rate`` label frames per token, ~4.64 at 44.1 kHz, depth 6).
  The decoder is not built (no unused parameters under DDP).
* ``task=music_separation`` (criterion ``separation``): the same encoder, a linear back to the
  Demucs width and the Demucs V2 decoder with skips; ``forward(mixture) -> estimates``.
  ``pretrained_checkpoint`` loads the ``encoder.*`` weights of a ``demucs_v2_hubert``
  pretraining checkpoint (or of ``python -m pahubert_plugin.port_hubert --target
  demucs_v2_hubert``); ``no_pretrained_weights=true`` builds the same network from scratch.
  Once loaded, ``pretrained_arch`` is saved with the model, so a fine-tuned checkpoint
  rebuilds (``Separator.from_checkpoint``) without the pretraining file.

Both roles may start from ``pretrained_checkpoint`` (e.g. continue pretraining a ported speech
model on music).  The architecture fields (:data:`ARCH_FIELDS`) of the config must equal the
checkpoint's; a mismatch or a checkpoint of another model is a ``ValueError`` that lists them.
"""
import logging
import os
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

import torch
from fairseq.models import register_model
from fairseq.models.hubert.hubert import HubertConfig
from torch import nn

from .demucs import DemucsDecoder, DemucsHubertEncoder
from .demucs_v2 import DemucsGeometryConfig, separation_task_info
from .hubert_encoder import HubertPretrainingModel, MaskedPredictionHead
from ..checkpoint import load_checkpoint, load_encoder_weights, persist_model_cfg

logger = logging.getLogger(__name__)

MODEL_NAME = "demucs_v2_hubert"

# Fields that decide the encoder's parameters and function: a pretrained checkpoint and the
# model that loads it must agree on them.  (Dropouts, masking, feature_grad_mult may differ.)
ARCH_FIELDS = (
    "channels", "depth", "growth", "kernel_size", "stride", "upsample", "normalize",
    "encoder_layers", "encoder_embed_dim", "encoder_ffn_embed_dim", "encoder_attention_heads",
    "activation_fn", "layer_type", "layer_norm_first", "conv_pos", "conv_pos_groups",
    "conv_pos_batch_norm",
)


@dataclass
class DemucsV2HubertConfig(HubertConfig, DemucsGeometryConfig):
    """HuBERT's model options (transformer, masking, logits) plus the Demucs geometry.

    ``HubertConfig``'s waveform extractor options (``extractor_mode``, ``conv_feature_layers``,
    ``conv_bias``) are unused: the Demucs encoder replaces that extractor.  Sample rate,
    channels, label rate and sources come from the task.
    """

    label_rate: float = field(default=100.0, metadata={
        "help": "label frames per second (pretraining); taken from task.label_rate when the task has one"})
    pretrained_checkpoint: Optional[str] = field(default=None, metadata={
        "help": "a demucs_v2_hubert pretraining checkpoint (or port_hubert output) whose encoder.* "
                "weights initialise this model"})
    no_pretrained_weights: bool = field(default=False, metadata={
        "help": "do not load pretrained_checkpoint (same network, random init: the scratch arm)"})
    pretrained_arch: Optional[Any] = field(default=None, metadata={
        "help": "filled when pretrained_checkpoint is loaded and saved with the model (leave unset): "
                "its architecture fields; when set, the file is not read again (rebuilding a trained model)"})


def _get(cfg, key, default=None):
    return cfg.get(key, default) if hasattr(cfg, "get") else getattr(cfg, key, default)


def check_pretrained(state: Dict, cfg, path: str, audio_channels: int, sample_rate: int) -> None:
    """Raise a ValueError unless ``state`` is a demucs_v2_hubert checkpoint matching ``cfg``."""
    ckpt_cfg = state.get("cfg") or {}
    model_cfg = _get(ckpt_cfg, "model") or {}
    name = _get(model_cfg, "_name")
    if name != MODEL_NAME:
        raise ValueError(
            f"{path}: expected a '{MODEL_NAME}' pretraining checkpoint (task pahubert_pretraining, or "
            f"port_hubert --target {MODEL_NAME}), found model '{name}'")
    diff = {k: (_get(model_cfg, k), _get(cfg, k)) for k in ARCH_FIELDS
            if _get(model_cfg, k) is not None and _get(model_cfg, k) != _get(cfg, k)}
    if diff:
        lines = ", ".join(f"model.{k}={ck!r} (config has {mine!r})" for k, (ck, mine) in diff.items())
        raise ValueError(f"{path}: architecture differs from this config; set {lines}")
    task_cfg = _get(ckpt_cfg, "task") or {}
    for key, mine in (("channels", audio_channels), ("sample_rate", sample_rate)):
        theirs = _get(task_cfg, key)
        if theirs is not None and int(theirs) != int(mine):
            raise ValueError(f"{path}: pretrained with task.{key}={theirs}, this task has {mine}")


@register_model(MODEL_NAME, dataclass=DemucsV2HubertConfig)
class DemucsV2HubertModel(HubertPretrainingModel):
    """``encoder`` always; ``head`` when pretraining; ``bottleneck_proj`` + ``decoder`` when separating."""

    def __init__(self, cfg: DemucsV2HubertConfig, audio_channels: int, sample_rate: int,
                 num_classes: Optional[List[int]] = None, sources: Optional[List[str]] = None):
        super().__init__()
        self.cfg = cfg
        self.audio_channels = audio_channels
        self.sample_rate = sample_rate
        self.encoder = DemucsHubertEncoder(cfg, audio_channels)
        self.head = None
        if num_classes:
            ratio = cfg.label_rate * self.encoder.hop / sample_rate  # label frames per token
            self.head = MaskedPredictionHead.from_config(cfg, num_classes, ratio)
        self.sources = list(sources) if sources else None
        self.bottleneck_proj = self.decoder = None
        if sources:
            width = self.encoder.front_end.out_dim
            self.bottleneck_proj = nn.Linear(cfg.encoder_embed_dim, width)
            self.decoder = DemucsDecoder(
                len(self.sources), audio_channels=audio_channels, channels=cfg.channels,
                depth=cfg.depth, growth=cfg.growth, kernel_size=cfg.kernel_size,
                stride=cfg.stride, context=cfg.context, upsample=cfg.upsample, rescale=cfg.rescale)

    @classmethod
    def build_model(cls, cfg: DemucsV2HubertConfig, task):
        if getattr(task, "sources", None):  # music_separation
            sources, sample_rate, channels = separation_task_info(task, MODEL_NAME)
            model = cls(cfg, channels, sample_rate, sources=sources)
        else:  # pahubert_pretraining
            dictionaries = getattr(task, "dictionaries", None)
            if not dictionaries or any(d is None for d in dictionaries):
                raise ValueError(
                    f"{MODEL_NAME}: use task=music_separation to separate, or task=pahubert_pretraining "
                    f"with a label dictionary (dict.<label>.txt) per label set to pretrain")
            label_rate = getattr(task.cfg, "label_rate", None)
            if label_rate is not None and float(label_rate) != float(cfg.label_rate):
                cfg.label_rate = float(label_rate)
            model = cls(cfg, int(task.cfg.channels), int(task.cfg.sample_rate),
                        num_classes=[len(d) for d in dictionaries])
        if cfg.pretrained_checkpoint and not cfg.no_pretrained_weights and cfg.pretrained_arch is None:
            arch = model.load_pretrained(cfg.pretrained_checkpoint)
            persist_model_cfg(cfg, "pretrained_arch", arch)  # reaches the saved checkpoint's cfg.model
        return model

    def load_pretrained(self, path: str) -> Dict:
        """Copy the ``encoder.*`` weights of a demucs_v2_hubert checkpoint (all must fit).

        Returns the checkpoint's architecture fields.
        """
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"model.pretrained_checkpoint={path} not found (to rebuild a fine-tuned model without "
                f"it, set model.no_pretrained_weights=true)")
        state = load_checkpoint(path)
        check_pretrained(state, self.cfg, path, self.audio_channels, self.sample_rate)
        load_encoder_weights(self, state, path)
        return {k: _get(self.cfg, k) for k in ARCH_FIELDS}

    def forward(self, mixture: Optional[torch.Tensor] = None, source: Optional[torch.Tensor] = None,
                target_list: Optional[List[torch.Tensor]] = None,
                padding_mask: Optional[torch.Tensor] = None, mask: bool = True,
                features_only: bool = False, output_layer: Optional[int] = None):
        """Separation: ``mixture`` (batch, channels, samples) -> (batch, sources, channels, samples).

        Pretraining: ``source`` (batch, channels, samples), ``target_list`` [(batch, frames)] at
        the label rate -> HuBERT's net_output (``HubertPretrainingModel.pretraining_forward``).
        """
        if mixture is not None:
            return self.separate(mixture)
        return self.pretraining_forward(source, target_list, padding_mask, mask, features_only, output_layer)

    def separate(self, mixture: torch.Tensor) -> torch.Tensor:
        """mixture (batch, channels, samples) -> estimates (batch, sources, channels, samples)."""
        if self.decoder is None:
            raise ValueError(f"{MODEL_NAME} was built for pretraining (no decoder); build it with "
                             f"task=music_separation to separate")
        out = self.encoder(mixture, mask=False)
        x = self.bottleneck_proj(out.features).transpose(1, 2)  # (batch, C_last, steps)
        return self.decoder(x, out.front.skips, out.front.context)
