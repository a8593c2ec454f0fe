"""fairseq task ``music_separation``: fine-tune and validate source separators on any set of stems.

The data is MUSDB18(-HQ) or any folder laid out as MUSDB18-HQ with the sources named in
``task.sources`` (music stems by default; e.g. ``task.sources=[speech,noise]``).
Training batches are random crops with the Demucs/Open-Unmix augmentations
(:class:`~pahubert_plugin.data.stems_dataset.StemsChunkDataset`).  Validation separates
whole tracks chunk by chunk with overlap-add (:mod:`pahubert_plugin.separation.overlap`), the way
inference does, and logs per source and as the mean over sources and tracks, in dB:
the MDX utterance-level SDR (``sdr_<source>``, ``sdr``) and the scale-invariant SDR
(``si_sdr_<source>``, ``si_sdr``).  Either is a best-checkpoint metric
(``checkpoint.best_checkpoint_metric=sdr`` or ``si_sdr``, ``maximize_best_checkpoint_metric=true``).
"""
import logging
from dataclasses import dataclass, field
from typing import List

import torch
from fairseq import metrics as fairseq_metrics
from fairseq.dataclass import FairseqDataclass
from fairseq.tasks import FairseqTask, register_task
from omegaconf import II, MISSING

from .. import frames
from ..separation.overlap import apply_model
from ..data.stems_dataset import (
    MUSDB_SOURCES, Augment, StemsChunkDataset, TrackDataset, list_mixtures, list_pseudo_tracks, split_tracks,
)
from ..metrics import sdr, si_sdr
from ..models.pretrained import persist_config_updates

logger = logging.getLogger(__name__)


@dataclass
class MusicSeparationConfig(FairseqDataclass):
    # data
    data: str = field(default=MISSING, metadata={
        "help": "dataset root (with train/ and test/): wav folders <split>/<track>/{mixture,<source>}.wav "
                "(MUSDB18-HQ layout, any sources) or MUSDB18 .stem.mp4 files (set is_wav=false)"})
    is_wav: bool = field(default=True, metadata={"help": "wav folders (MUSDB18-HQ layout); false: MUSDB18 .stem.mp4 via musdb"})
    sources: List[str] = field(default_factory=lambda: list(MUSDB_SOURCES), metadata={
        "help": "stem names to separate, in output order (each track folder holds <name>.wav); any names "
                "and any number, e.g. [speech,noise]"})
    sample_rate: int = field(default=44100, metadata={"help": "model rate; files at other rates are resampled on read"})
    audio_channels: int = field(default=2, metadata={"help": "channels in and out (mono files are duplicated)"})
    train_tracks: int = field(default=0, metadata={
        "help": "if > 0, keep only the first N training tracks (sorted by name) for low-resource runs"})
    num_valid_tracks: int = field(default=0, metadata={
        "help": "folders without MUSDB18's validation tracks and without a valid/ folder: hold out the "
                "last N training tracks for validation"})
    # training crops and augmentation
    segment: float = field(default=3.0, metadata={"help": "training crop length in seconds"})
    samples_per_track: int = field(default=64, metadata={"help": "training examples drawn per track per epoch"})
    random_mix: bool = field(default=True, metadata={"help": "draw each source from an independent random track"})
    gain_min: float = field(default=0.25, metadata={"help": "lower bound of the random gain per source"})
    gain_max: float = field(default=1.25, metadata={"help": "upper bound of the random gain per source"})
    channel_swap: bool = field(default=True, metadata={"help": "swap left/right of a source with p=0.5"})
    sign_flip: bool = field(default=True, metadata={"help": "negate a source with p=0.5"})
    # teacher-student: pseudo-labelled unlabelled audio
    pseudo_data: str = field(default="", metadata={
        "help": "folder of a teacher's estimates on unlabelled mixtures, <clip>/<source>.wav (e.g. "
                "pahubert-separate TEACHER.pt UNLABELLED/ -o DIR); training examples take their stems from "
                "it with probability pseudo_prob, sources from different clips (RemixIT-style remixing)"})
    pseudo_prob: float = field(default=0.5, metadata={
        "help": "with pseudo_data: probability that a training example is made of teacher estimates"})
    # mixture invariant training: unlabelled mixtures
    mixit_data: str = field(default="", metadata={
        "help": "folder of unlabelled mixtures (audio files, e.g. the speech corpus's unlabelled/): with "
                "probability mixit_prob a training example is the sum of two of them, and the model's outputs "
                "(model.slots_per_source >= 2) are assigned to whichever reconstructs the two best (MixIT, "
                "Wisdom et al. 2020) beside the labelled examples"})
    mixit_prob: float = field(default=0.5, metadata={
        "help": "with mixit_data: probability that a training example is a mixture of two unlabelled mixtures"})
    # validation
    valid_seconds: float = field(default=0.0, metadata={
        "help": "if > 0, validate on the first N seconds of each track only (small CPU runs)"})
    valid_segment: float = field(default=0.0, metadata={"help": "chunk length (s) for validation; 0: same as segment"})
    valid_overlap: float = field(default=0.25, metadata={"help": "overlap fraction of validation chunks"})
    valid_chunk_batch: int = field(default=4, metadata={"help": "validation chunks separated per forward pass"})
    seed: int = II("common.seed")


def check_options(cfg) -> None:
    """ValueError naming the first out-of-range ``task.*`` option (checked when the task is set up,
    before any file is read)."""
    from .pahubert_pretraining import check_ranges

    check_ranges(cfg, [
        ("sample_rate", lambda v: v > 0, "> 0 Hz"), ("audio_channels", lambda v: v >= 1, ">= 1"),
        ("segment", lambda v: v > 0, "> 0 seconds (the training crop)"),
        ("samples_per_track", lambda v: v >= 1, ">= 1"), ("train_tracks", lambda v: v >= 0, ">= 0 (0: all)"),
        ("num_valid_tracks", lambda v: v >= 0, ">= 0"), ("gain_min", lambda v: v >= 0, ">= 0"),
        ("gain_max", lambda v: v >= cfg.gain_min, f">= task.gain_min={cfg.gain_min}"),
        ("valid_seconds", lambda v: v >= 0, ">= 0 seconds (0: whole tracks)"),
        ("valid_segment", lambda v: v >= 0, ">= 0 seconds (0: task.segment)"),
        ("valid_overlap", lambda v: 0 <= v < 1, "in [0, 1) (a fraction of the chunk)"),
        ("valid_chunk_batch", lambda v: v >= 1, ">= 1 chunk"),
        ("pseudo_prob", lambda v: 0 <= v <= 1, "in [0, 1] (a probability)"),
        ("mixit_prob", lambda v: 0 <= v <= 1, "in [0, 1] (a probability)"),
    ])


@register_task("music_separation", dataclass=MusicSeparationConfig)
class MusicSeparationTask(FairseqTask):
    cfg: MusicSeparationConfig

    def __init__(self, cfg: MusicSeparationConfig):
        super().__init__(cfg)
        check_options(cfg)  # before any file is read: a bad option is named, not blamed on a stem file
        frames.hop_length(cfg.sample_rate)  # fail early on a rate the STFT rule cannot use
        if not cfg.sources:
            raise ValueError("task.sources is empty: name at least one stem")
        self.sources = list(cfg.sources)

    @classmethod
    def setup_task(cls, cfg: MusicSeparationConfig, **kwargs):
        return cls(cfg)  # touches no data: Separator.from_checkpoint works without the dataset

    def build_model(self, cfg, from_checkpoint=False):
        """fairseq's, then what the model learnt at build time (a pretrained encoder's architecture)
        is written into ``cfg``, the model config fairseq saves (``models.pretrained``)."""
        model = super().build_model(cfg, from_checkpoint)
        persist_config_updates(model, cfg)
        if self.cfg.mixit_data and getattr(model, "slots_per_source", 1) < 2:
            raise ValueError(f"task.mixit_data needs a model with several outputs per source to assign to the two "
                             f"mixtures: set model.slots_per_source=2 or more (resunet, pahubert_resunet); this "
                             f"{type(model).__name__} has {getattr(model, 'slots_per_source', 1)}")
        return model

    def load_dataset(self, split: str, epoch=1, combine=False, **kwargs):
        cfg = self.cfg
        tracks = split_tracks(cfg.data, split, self.sources, cfg.sample_rate, cfg.is_wav,
                              cfg.num_valid_tracks, cfg.train_tracks if split == "train" else 0)
        if not tracks:
            raise ValueError(f"split {split!r} of {cfg.data} has no tracks")
        if split == "train":
            augment = Augment(cfg.random_mix, cfg.gain_min, cfg.gain_max, cfg.channel_swap, cfg.sign_flip)
            pseudo = list_pseudo_tracks(cfg.pseudo_data, self.sources, cfg.sample_rate) if cfg.pseudo_data else []
            if pseudo:
                logger.info(f"train: {len(pseudo)} pseudo-labelled clips from {cfg.pseudo_data}, "
                            f"p={cfg.pseudo_prob:g} per example")
            mixtures = list_mixtures(cfg.mixit_data, cfg.sample_rate) if cfg.mixit_data else []
            if mixtures:
                logger.info(f"train: {len(mixtures)} unlabelled mixtures from {cfg.mixit_data} for mixture "
                            f"invariant training, p={cfg.mixit_prob:g} per example")
            self.datasets[split] = StemsChunkDataset(
                tracks, self.sources, cfg.sample_rate, cfg.audio_channels,
                int(round(cfg.segment * cfg.sample_rate)), cfg.samples_per_track, augment, cfg.seed,
                pseudo_tracks=pseudo, pseudo_prob=cfg.pseudo_prob, mixit_tracks=mixtures,
                mixit_prob=cfg.mixit_prob)
        else:
            self.datasets[split] = TrackDataset(
                tracks, self.sources, cfg.sample_rate, cfg.audio_channels,
                int(round(cfg.valid_seconds * cfg.sample_rate)))
        logger.info(f"{split}: {len(tracks)} tracks ({', '.join(t.name for t in tracks[:5])}"
                    f"{', ...' if len(tracks) > 5 else ''}), {len(self.datasets[split])} examples")

    def max_positions(self):
        return None

    @property
    def source_dictionary(self):
        return None

    @property
    def target_dictionary(self):
        return None

    def valid_step(self, sample, model, criterion):
        """Separate each whole track with overlap-add; loss, SDR and SI-SDR over the true length."""
        cfg = self.cfg
        segment = int(round((cfg.valid_segment or cfg.segment) * cfg.sample_rate))
        mixture, target = sample["net_input"]["mixture"], sample["target"]
        device = mixture.device
        loss_sum, logging_output = 0.0, {}
        sdr_sum = torch.zeros(len(self.sources), dtype=torch.float64)
        si_sdr_sum = torch.zeros(len(self.sources), dtype=torch.float64)
        with torch.no_grad():
            for i, n in enumerate(sample["lengths"].tolist()):
                est = apply_model(model, mixture[i, :, :n], segment, cfg.valid_overlap,
                                  cfg.valid_chunk_batch, device)  # (sources, channels, n) on CPU
                ref = target[i, ..., :n].float().cpu()
                loss, parts = criterion.compute_loss(est.unsqueeze(0), ref.unsqueeze(0))
                loss_sum += float(loss)
                for k, v in parts.items():
                    logging_output[k] = logging_output.get(k, 0.0) + float(v)
                sdr_sum += sdr(ref, est).double()
                si_sdr_sum += torch.from_numpy(si_sdr(ref.numpy(), est.numpy()))
        count = len(sample["lengths"])
        logging_output.update({
            "loss": loss_sum, "sample_size": count, "nsentences": count, "ntokens": sample["ntokens"],
            # sums over tracks (of the per-track mean over sources), so logs add across workers
            "sdr_count": count, "sdr_sum": float(sdr_sum.sum() / len(self.sources)),
            "si_sdr_sum": float(si_sdr_sum.sum() / len(self.sources)),
        })
        for j, src in enumerate(self.sources):
            logging_output[f"sdr_{src}_sum"] = float(sdr_sum[j])
            logging_output[f"si_sdr_{src}_sum"] = float(si_sdr_sum[j])
        return torch.tensor(loss_sum), count, logging_output

    def reduce_metrics(self, logging_outputs, criterion):
        super().reduce_metrics(logging_outputs, criterion)
        count = sum(log.get("sdr_count", 0) for log in logging_outputs)
        if count == 0:
            return
        for name in ("sdr", "si_sdr"):
            total = sum(log.get(f"{name}_sum", 0.0) for log in logging_outputs)
            fairseq_metrics.log_scalar(name, total / count, count, round=3)
            for src in self.sources:
                s = sum(log.get(f"{name}_{src}_sum", 0.0) for log in logging_outputs)
                fairseq_metrics.log_scalar(f"{name}_{src}", s / count, count, round=3)
