"""fairseq model ``demucs_hubert``: HuBERT masked prediction on the Demucs V2 waveform encoder.

The pretraining half of the time-domain variant (task ``pahubert_pretraining``, criterion
``pahubert``): :class:`~pahubert_plugin.models.demucs.DemucsHubertEncoder` (Demucs encoder
front end + HuBERT transformer) and HuBERT's masked prediction head on the 100 Hz labels,
subsampled to the bottleneck rate by fairseq's ``feat2tar`` rule (``label_rate * hop /
sample_rate`` label frames per token, ~4.64 at 44.1 kHz, depth 6).  Its separation half is
``demucs_v2_hubert`` (Demucs V2 decoder on this encoder), as ``pahubert`` / ``pahubert_resunet``.

``pretrained_checkpoint`` (a ``demucs_hubert`` checkpoint or ``port_hubert --target demucs_hubert``
output, e.g. a speech HuBERT) starts pretraining from its encoder: the architecture fields
(:data:`ARCH_FIELDS`) come from the checkpoint, the rest (dropouts, masking) from this config
(:mod:`~pahubert_plugin.models.pretrained`).
"""
import logging
from dataclasses import dataclass, field
from typing import Dict, List

from fairseq.models import register_model
from fairseq.models.hubert.hubert import HubertConfig
from omegaconf import OmegaConf

from .demucs import DemucsHubertEncoder
from .demucs_v2 import DemucsGeometryConfig
from .hubert_encoder import HubertPretrainingModel, MaskedPredictionHead
from .pahubert import task_audio_channels
from .pretrained import PretrainedEncoderConfig, load_pretrained_weights, remember, resolve_pretrained

logger = logging.getLogger(__name__)

MODEL_NAME = "demucs_hubert"

# Fields that decide the encoder's parameters and function: taken from a pretrained checkpoint.
# (Dropouts, masking, feature_grad_mult come from the config that loads it.)
ARCH_FIELDS = (
    "channels", "depth", "growth", "kernel_size", "stride", "upsample", "normalize",
    "encoder_layers", "encoder_embed_dim", "encoder_ffn_embed_dim", "encoder_attention_heads",
    "activation_fn", "layer_type", "layer_norm_first", "conv_pos", "conv_pos_groups",
    "conv_pos_batch_norm",
)


@dataclass
class DemucsHubertConfig(HubertConfig, DemucsGeometryConfig, PretrainedEncoderConfig):
    """HuBERT's model options (transformer, masking, logits) plus the Demucs geometry.

    ``HubertConfig``'s waveform extractor options (``extractor_mode``, ``conv_feature_layers``,
    ``conv_bias``) are unused: the Demucs encoder replaces that extractor.  Sample rate,
    channels and label rate come from the task.
    """

    label_rate: float = field(default=100.0, metadata={
        "help": "label frames per second (pretraining); taken from task.label_rate when the task has one"})


def demucs_arch(audio_channels: int, sample_rate: int):
    """``encoder_cfg_of`` for :func:`~pahubert_plugin.models.pretrained.resolve_pretrained`: the
    checkpoint's :data:`ARCH_FIELDS`, after checking its audio settings against the task's."""

    def arch(state: Dict, path: str) -> Dict:
        model_cfg, task_cfg = state["cfg"].get("model") or {}, state["cfg"].get("task") or {}
        for key, theirs, mine in (("audio_channels", task_audio_channels(task_cfg), audio_channels),
                                  ("sample_rate", task_cfg.get("sample_rate"), sample_rate)):
            if theirs is not None and int(theirs) != int(mine):
                raise ValueError(f"{path}: pretrained with task.{key}={theirs}, this task has {mine}")
        return {k: model_cfg[k] for k in ARCH_FIELDS if model_cfg.get(k) is not None}

    return arch


def with_arch(cfg, arch: Dict):
    """``cfg`` with the architecture fields of a pretrained encoder (differences logged)."""
    if not arch:
        return cfg
    changed = {k: (cfg.get(k), v) for k, v in arch.items() if cfg.get(k) != v}
    if changed:
        logger.info("architecture from the pretrained checkpoint: " + ", ".join(
            f"{k}={new!r} (config had {old!r})" for k, (old, new) in changed.items()))
    # a resolved copy: fairseq's model config interpolates into the root config, which a copy lacks
    return OmegaConf.merge(OmegaConf.to_container(cfg, resolve=True) if OmegaConf.is_config(cfg) else cfg, arch)


def build_demucs_encoder(cls, cfg, user: str, model_names, audio_channels: int, sample_rate: int, **kwargs):
    """``cls(cfg with the pretrained architecture, audio_channels, sample_rate, **kwargs)``: the one
    loading path of both Demucs + HuBERT models. Remembers the architecture, copies the weights."""
    arch, state = resolve_pretrained(cfg, model_names, user, demucs_arch(audio_channels, sample_rate))
    model = cls(with_arch(cfg, dict(arch or {})), audio_channels, sample_rate, **kwargs)
    if arch:
        remember(model, encoder_cfg=dict(arch))
    load_pretrained_weights(model, state, cfg.pretrained_checkpoint)
    return model


@register_model(MODEL_NAME, dataclass=DemucsHubertConfig)
class DemucsHubertModel(HubertPretrainingModel):
    """``encoder`` (:class:`DemucsHubertEncoder`) + ``head`` (masked prediction)."""

    def __init__(self, cfg: DemucsHubertConfig, audio_channels: int, sample_rate: int, num_classes: List[int]):
        super().__init__()
        self.cfg = cfg
        self.audio_channels = audio_channels
        self.sample_rate = sample_rate
        self.encoder = DemucsHubertEncoder(cfg, audio_channels)
        ratio = cfg.label_rate * self.encoder.hop / sample_rate  # label frames per token
        self.head = MaskedPredictionHead.from_config(cfg, num_classes, ratio)

    @classmethod
    def build_model(cls, cfg: DemucsHubertConfig, task):
        dictionaries = getattr(task, "dictionaries", None)
        if getattr(task, "sources", None) or not dictionaries or any(d is None for d in dictionaries):
            raise ValueError(
                f"{MODEL_NAME} pretrains: use task=pahubert_pretraining with a label dictionary "
                f"(dict.<label>.txt) per label set; to separate, model=demucs_v2_hubert with task=music_separation")
        label_rate = getattr(task.cfg, "label_rate", None)
        if label_rate is not None and float(label_rate) != float(cfg.label_rate):
            cfg.label_rate = float(label_rate)
        return build_demucs_encoder(cls, cfg, MODEL_NAME, (MODEL_NAME,), int(task.cfg.audio_channels),
                                    int(task.cfg.sample_rate), num_classes=[len(d) for d in dictionaries])

    @classmethod
    def build_encoder(cls, model_cfg: dict, task_cfg: dict):
        cfg = OmegaConf.merge(OmegaConf.structured(DemucsHubertConfig), model_cfg)
        cfg.label_rate = float(task_cfg.get("label_rate", cfg.label_rate))
        encoder = DemucsHubertEncoder(cfg, int(task_audio_channels(task_cfg)))
        return encoder, OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
