"""fairseq model ``demucs_v2``: the Demucs V2 waveform separator (Défossez et al., 2019).

A thin wrapper around :class:`pahubert_plugin.models.demucs.DemucsV2`; sources, sample rate
and channels come from the ``music_separation`` task.  Presets: ``recipes/musdb/conf/
demucs_v2_{tiny,base}.yaml`` (``base`` is the paper's 64 channels, depth 6, 2-layer BiLSTM,
~266 M parameters).
"""
from dataclasses import dataclass, field

import torch
from fairseq.dataclass import FairseqDataclass
from fairseq.models import BaseFairseqModel, register_model

from .demucs import DemucsV2


@dataclass
class DemucsGeometryConfig(FairseqDataclass):
    """Encoder/decoder geometry shared by ``demucs_v2`` and ``demucs_v2_hubert``."""

    channels: int = field(default=64, metadata={"help": "channels of the first encoder layer (paper: 64)"})
    depth: int = field(default=6, metadata={"help": "encoder/decoder layers (paper: 6)"})
    growth: float = field(default=2.0, metadata={"help": "channel growth per layer (paper: 2)"})
    kernel_size: int = field(default=8, metadata={"help": "encoder/decoder conv kernel (paper: 8)"})
    stride: int = field(default=4, metadata={"help": "encoder/decoder conv stride (paper: 4)"})
    context: int = field(default=3, metadata={"help": "kernel of the decoder's GLU conv (paper: 3)"})
    upsample: int = field(default=2, metadata={"help": "input upsampling factor (paper: 2)"})
    normalize: bool = field(default=False, metadata={
        "help": "standardise the mixture by its mono mean/std and undo it on the output"})
    rescale: float = field(default=0.1, metadata={
        "help": "initial conv weight rescaling reference (paper: 0.1); 0 disables"})


@dataclass
class DemucsV2Config(DemucsGeometryConfig):
    lstm_layers: int = field(default=2, metadata={"help": "BiLSTM layers in the bottleneck (paper: 2)"})


def separation_task_info(task, model_name: str):
    """(sources, sample_rate, audio_channels) from a ``music_separation`` task, or a clear error."""
    sources = getattr(task, "sources", None)
    if not sources:
        raise ValueError(
            f"model {model_name} separates sources: use it with task=music_separation "
            f"(found task {type(task).__name__} without `sources`)")
    return list(sources), int(task.cfg.sample_rate), int(task.cfg.audio_channels)


@register_model("demucs_v2", dataclass=DemucsV2Config)
class DemucsV2Model(BaseFairseqModel):
    """``forward(mixture (batch, channels, samples)) -> (batch, sources, channels, samples)``."""

    def __init__(self, cfg: DemucsV2Config, sources, sample_rate: int, audio_channels: int):
        super().__init__()
        self.cfg = cfg
        self.sources = list(sources)
        self.sample_rate = sample_rate
        self.audio_channels = audio_channels
        self.demucs = DemucsV2(
            self.sources, audio_channels=audio_channels, channels=cfg.channels, depth=cfg.depth,
            growth=cfg.growth, kernel_size=cfg.kernel_size, stride=cfg.stride,
            context=cfg.context, upsample=cfg.upsample, lstm_layers=cfg.lstm_layers,
            normalize=cfg.normalize, rescale=cfg.rescale)

    @classmethod
    def build_model(cls, cfg: DemucsV2Config, task):
        return cls(cfg, *separation_task_info(task, "demucs_v2"))

    def forward(self, mixture: torch.Tensor) -> torch.Tensor:
        """mixture (batch, channels, samples) -> estimates (batch, sources, channels, samples)."""
        return self.demucs(mixture)
