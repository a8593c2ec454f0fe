"""fairseq model ``demucs_v2_hubert``: Demucs V2 with HuBERT's transformer as its bottleneck.

The separation half of the time-domain variant (task ``music_separation``, criterion
``separation``): the encoder of ``demucs_hubert`` pretraining
(:class:`~pahubert_plugin.models.demucs.DemucsHubertEncoder`), a linear back to the Demucs
width and the Demucs V2 decoder with skips; ``forward(mixture) -> estimates``.

``pretrained_checkpoint`` (a ``demucs_hubert`` pretraining checkpoint or ``port_hubert --target
demucs_hubert`` output) gives the encoder's architecture (:data:`~.demucs_hubert.ARCH_FIELDS`) and,
unless ``no_pretrained_weights``, its weights; the architecture is saved with the model as
``encoder_cfg``, so a fine-tuned checkpoint rebuilds without the pretraining file
(:mod:`~pahubert_plugin.models.pretrained`).  Without a checkpoint the network is built from this
config and trained from scratch.
"""
from dataclasses import dataclass, field
from typing import Any, List, Optional

import torch
from fairseq.models import BaseFairseqModel, register_model
from torch import nn

from .demucs import DemucsDecoder, DemucsHubertEncoder
from .demucs_hubert import MODEL_NAME as PRETRAINING_MODEL, DemucsHubertConfig, build_demucs_encoder
from .demucs_v2 import separation_task_info


MODEL_NAME = "demucs_v2_hubert"


@dataclass
class DemucsV2HubertConfig(DemucsHubertConfig):
    """``demucs_hubert``'s encoder options plus the decoder's (``context``, ``rescale``)."""

    pretrained_arch: Optional[Any] = field(default=None, metadata={
        "help": "deprecated name of encoder_cfg (fine-tuned checkpoints written before 0.2); leave unset"})


@register_model(MODEL_NAME, dataclass=DemucsV2HubertConfig)
class DemucsV2HubertModel(BaseFairseqModel):
    """``encoder`` + ``bottleneck_proj`` + ``decoder``: mixture -> estimates."""

    def __init__(self, cfg: DemucsV2HubertConfig, audio_channels: int, sample_rate: int, sources: List[str]):
        super().__init__()
        self.cfg = cfg
        self.audio_channels = audio_channels
        self.sample_rate = sample_rate
        self.sources = list(sources)
        self.encoder = DemucsHubertEncoder(cfg, audio_channels)
        self.bottleneck_proj = nn.Linear(cfg.encoder_embed_dim, self.encoder.front_end.out_dim)
        self.decoder = DemucsDecoder(
            len(self.sources), audio_channels=audio_channels, channels=cfg.channels,
            depth=cfg.depth, growth=cfg.growth, kernel_size=cfg.kernel_size,
            stride=cfg.stride, context=cfg.context, upsample=cfg.upsample, rescale=cfg.rescale)

    @classmethod
    def build_model(cls, cfg: DemucsV2HubertConfig, task):
        sources, sample_rate, channels = separation_task_info(task, MODEL_NAME)
        if cfg.encoder_cfg is None and cfg.get("pretrained_arch") is not None:  # written before 0.2
            cfg.encoder_cfg = cfg.pretrained_arch
        return build_demucs_encoder(cls, cfg, MODEL_NAME, (PRETRAINING_MODEL,), channels, sample_rate,
                                    sources=sources)

    def forward(self, mixture: torch.Tensor) -> torch.Tensor:
        """mixture (batch, channels, samples) -> estimates (batch, sources, channels, samples)."""
        out = self.encoder(mixture, mask=False)
        x = self.bottleneck_proj(out.features).transpose(1, 2)  # (batch, C_last, steps)
        return self.decoder(x, out.front.skips, out.front.context)
