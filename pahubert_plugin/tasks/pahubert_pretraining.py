"""Pac-HuBERT pretraining task (fairseq task ``pahubert_pretraining``).

fairseq's HuBERT pretraining task with music's data: multichannel audio at any native
rate (resampled to ``sample_rate``), crop-only reads and strict 100 Hz label checks, via
:class:`pahubert_plugin.data.hubert_dataset.PahubertDataset`.  Data layout is HuBERT's:
``{data}/{split}.tsv`` manifests, ``{label_dir}/{split}.{label}`` label lines and
``{label_dir}/dict.{label}.txt`` per label set.
"""
import os
from dataclasses import dataclass, field
from typing import List, Optional

from omegaconf import II, OmegaConf

from fairseq.data import Dictionary
from fairseq.tasks import register_task
from fairseq.tasks.hubert_pretraining import (
    HubertPretrainingConfig,
    HubertPretrainingTask,
    LabelEncoder,
)

from .. import frames
from ..data.hubert_dataset import PahubertDataset
from ..models.pretrained import persist_config_updates



@dataclass
class PahubertPretrainingConfig(HubertPretrainingConfig):
    # audio (manifest num_samples are counted at this rate)
    sample_rate: int = field(
        default=44100,
        metadata={"help": "rate the model sees; files at other rates are resampled on read. "
                          "The manifest's num_samples must be counted at this rate"},
    )
    audio_channels: int = field(
        default=2,
        metadata={"help": "audio channels the model sees (2 = stereo, as in separation); mono "
                          "files are duplicated, stereo files downmixed when 1 (the name of the "
                          "music_separation task's field)"},
    )
    channels: Optional[int] = field(
        default=None,
        metadata={"help": "deprecated name of audio_channels (checkpoints written before 0.2); leave unset"},
    )
    # labels
    labels: List[str] = field(
        default_factory=lambda: ["km"],
        metadata={"help": "label set extensions: {label_dir}/{split}.{label} and dict.{label}.txt"},
    )
    label_rate: float = field(default=100.0, metadata={"help": "label frame rate in Hz (100 = one label per STFT frame)"})
    label_tolerance: int = field(
        default=frames.LABEL_TOLERANCE,
        metadata={"help": "frames a label line may differ from frames.num_frames(num_samples) "
                          "before loading stops with the row named (0-3)"},
    )
    # crops (in samples at sample_rate)
    max_sample_size: int = field(
        default=441000, metadata={"help": "crop length in samples (only the crop is decoded)"}
    )
    min_sample_size: int = field(
        default=88200, metadata={"help": "skip manifest rows shorter than this many samples"}
    )
    seed: int = field(
        default=II("common.seed"),
        metadata={"help": "seed of the random crops (with the epoch and the item index)"},
    )


def check_ranges(cfg, rules) -> None:
    """ValueError ``task.NAME=VALUE: must be WHAT`` for the first ``(name, ok, what)`` rule whose value
    (if set: None and interpolations are left to the task) fails ``ok``; numbers only."""
    for name, ok, what in rules:
        try:
            value = getattr(cfg, name, None)
        except Exception:  # noqa: BLE001  (an interpolation that does not resolve here: the task's to judge)
            continue
        if value is None or isinstance(value, str):
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value or not ok(value):
            raise ValueError(f"task.{name}={value}: must be {what}")


def check_options(cfg) -> None:
    """ValueError naming the first out-of-range ``task.*`` option (checked when the task is set up,
    before any file is read)."""
    check_ranges(cfg, [
        ("sample_rate", lambda v: v > 0, "> 0 Hz"), ("audio_channels", lambda v: v >= 1, ">= 1"),
        ("channels", lambda v: v >= 1, ">= 1 (deprecated name of audio_channels)"),
        ("label_rate", lambda v: v > 0, "> 0 Hz"), ("label_tolerance", lambda v: v >= 0, ">= 0 frames"),
        ("min_sample_size", lambda v: v >= 0, ">= 0 samples"),
        ("max_sample_size", lambda v: v > 0, "> 0 samples (the crop length)"),
        ("max_keep_size", lambda v: v > 0, "> 0 samples"),
    ])


@register_task("pahubert_pretraining", dataclass=PahubertPretrainingConfig)
class PahubertPretrainingTask(HubertPretrainingTask):
    cfg: PahubertPretrainingConfig

    def __init__(self, cfg: PahubertPretrainingConfig) -> None:
        if cfg.fine_tuning:
            raise ValueError("pahubert_pretraining does not fine-tune; use the music_separation task")
        check_options(cfg)  # before any file is read: a bad option is named, not blamed on a file
        if cfg.channels is not None:  # a checkpoint written before 0.2
            cfg.audio_channels, cfg.channels = int(cfg.channels), None
        super().__init__(cfg)

    def build_model(self, cfg, from_checkpoint=False):
        """fairseq's, then what the model learnt at build time (a pretrained encoder's architecture)
        is written into ``cfg``, the model config fairseq saves (``models.pretrained``)."""
        model = super().build_model(cfg, from_checkpoint)
        persist_config_updates(model, cfg)
        return model

    def load_dictionaries(self):
        dictionaries = []
        for label in self.cfg.labels:
            path = os.path.join(self.get_label_dir(), f"dict.{label}.txt")
            if not os.path.isfile(path):
                raise FileNotFoundError(
                    f"label dictionary {path} not found: run the labelling stage (dict.{label}.txt) "
                    f"or point task.label_dir / task.labels at it"
                )
            dictionaries.append(Dictionary.load(path))
        return dictionaries

    def load_dataset(self, split: str, **kwargs) -> None:
        manifest = os.path.join(self.cfg.data, f"{split}.tsv")
        if not os.path.isfile(manifest):
            raise FileNotFoundError(f"manifest {manifest} not found (task.data={self.cfg.data})")
        dicts = self.dictionaries
        self.datasets[split] = PahubertDataset(
            manifest,
            sample_rate=self.cfg.sample_rate,
            channels=self.cfg.audio_channels,
            label_paths=[os.path.join(self.get_label_dir(), f"{split}.{l}") for l in self.cfg.labels],
            label_rates=self.cfg.label_rate,
            pad_list=[d.pad() for d in dicts],
            eos_list=[d.eos() for d in dicts],
            label_processors=[LabelEncoder(d) for d in dicts],
            max_keep_sample_size=self.cfg.max_keep_size,
            min_keep_sample_size=self.cfg.min_sample_size,
            max_sample_size=self.cfg.max_sample_size,
            pad_audio=self.cfg.pad_audio,
            normalize=self.cfg.normalize,
            random_crop=self.cfg.random_crop,
            single_target=self.cfg.single_target,
            label_tolerance=self.cfg.label_tolerance,
            seed=self.crop_seed(),
            dictionaries=dicts,
            dict_paths=[os.path.join(self.get_label_dir(), f"dict.{l}.txt") for l in self.cfg.labels],
        )

    def crop_seed(self) -> int:
        """``task.seed`` (= ``common.seed`` under fairseq-hydra-train); 1 where it cannot be
        resolved (a task config built on its own, an old checkpoint's task config)."""
        if not OmegaConf.is_config(self.cfg):
            seed = getattr(self.cfg, "seed", None)
        else:
            seed = OmegaConf.select(self.cfg, "seed", default=None, throw_on_resolution_failure=False)
        return 1 if seed is None or isinstance(seed, str) else int(seed)
