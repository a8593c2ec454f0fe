"""fairseq's HubertDataset for music: multichannel, any sample rate, crop-only reads, strict labels.

What changes against ``fairseq.data.audio.hubert_dataset.HubertDataset`` (everything else,
label offsets, label collation, batching, is fairseq's):

* audio goes through :func:`pahubert_plugin.data.audio.read_audio` (wav/flac/mp3/ogg,
  resampled to the task rate, mono files duplicated to ``channels``) and only the crop is
  decoded: a long file yields at most ``max_sample_size`` samples, read with a seek, with
  the matching slice of its labels;
* crops start on a frame boundary (multiples of the hop ``sample_rate / 100``), so audio
  and 100 Hz labels stay aligned exactly;
* batches are ``(batch, channels, samples)``;
* the manifest's rate (its ``.meta.tsv``) must be ``sample_rate``, and ``channels`` 1 or 2
  (the channel policy: the manifest keeps mono and stereo files only);
* label lengths are checked up front: a label line whose length differs from
  ``frames.num_frames(num_samples, sample_rate)`` by more than ``label_tolerance`` frames
  stops with the manifest row, the file and both lengths (fairseq only warns);
* an unreadable file met during training is a logged, counted skip;
* random crops come from a generator seeded with ``(seed, epoch, index)`` (the batch's ids
  for the collater's crop), never numpy's global one: fairseq loads batches in a background
  thread (``dataset.data_buffer_size``) or in worker processes, so global draws would
  interleave with the main thread's by timing, and workers would repeat each other's crops.
"""
import logging
import os
from typing import Any, List, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from fairseq.data.audio.hubert_dataset import HubertDataset, load_audio

from .. import frames
from .audio import MAX_CHANNELS, MP3_SLACK, AudioError, audio_info, read_audio
from .manifest import check_manifest_rate

logger = logging.getLogger(__name__)

MAX_LABEL_TOLERANCE = frames.MAX_FRAME_OFFSET  # frames.fit_frames refuses more


def expected_labels(num_samples: int, sample_rate: int, label_rate: float) -> int:
    """Labels a clip of ``num_samples`` should have (THE frame rule at 100 Hz)."""
    if label_rate == frames.LABEL_RATE:
        return frames.num_frames(num_samples, sample_rate)
    return int(num_samples * label_rate // sample_rate)


def check_label_lengths(manifest_path: str, label_path: str, label_rate: float, sample_rate: int,
                        tolerance: int, max_keep: Optional[int] = None,
                        min_keep: Optional[int] = None) -> None:
    """Raise ValueError at the first manifest row whose label count is off by > ``tolerance``."""
    if label_rate < 0:  # sequence labels have no frame rate
        return
    root, names, inds, tot, sizes = load_audio(manifest_path, max_keep, min_keep)
    with open(label_path) as f:
        lengths = [len(line.split()) for line in f]
    if len(lengths) != tot:
        raise ValueError(
            f"{label_path} has {len(lengths)} label lines but {manifest_path} has {tot} rows; "
            f"labels must be written for exactly this manifest (re-run the labelling stage)"
        )
    for name, ind, size in zip(names, inds, sizes):
        want, have = expected_labels(size, sample_rate, label_rate), lengths[ind]
        if abs(want - have) > tolerance:
            raise ValueError(
                f"{label_path} line {ind + 1} has {have} labels, but manifest {manifest_path} "
                f"row {ind + 1} ({os.path.join(root, name)}: {size} samples at {sample_rate} Hz) "
                f"needs {want} at {label_rate:g} Hz (tolerance {tolerance}); the labels do not "
                f"belong to this manifest or sample rate: re-run the labelling stage"
            )


def check_label_values(label_path: str, dictionary, dict_path: str = "the label dictionary") -> None:
    """Raise ValueError at the first label (file, row, value) that ``dictionary`` does not hold.

    fairseq's LabelEncoder maps unknown symbols to ``<unk>`` silently, so a label 999 from another
    k-means model would train as a target; ``dictionary`` is a fairseq Dictionary (its special
    symbols do not count as labels).
    """
    allowed = set(dictionary.symbols[dictionary.nspecial:])
    with open(label_path) as f:
        for row, line in enumerate(f, start=1):
            unknown = set(line.split()) - allowed
            if unknown:
                value = sorted(unknown)[0]
                raise ValueError(
                    f"{label_path} row {row}: label {value!r} is not in {dict_path} ({len(allowed)} labels); "
                    f"the labels come from another k-means model or the dictionary is wrong: re-run the "
                    f"labelling stage (labels and dict.*.txt together)")


class PahubertDataset(HubertDataset):
    """Items: ``source`` (samples, channels) -- time first so fairseq's collater, which
    measures items with ``len()``, works unchanged -- and ``label_list`` sliced to the crop.
    Batches: ``net_input.source`` (batch, channels, samples), ``padding_mask`` (batch, samples).
    """

    def __init__(
        self,
        manifest_path: str,
        sample_rate: int,
        label_paths: List[str],
        label_rates,
        pad_list: List[int],
        eos_list: List[int],
        channels: int = 2,
        label_processors: Optional[List[Any]] = None,
        max_keep_sample_size: Optional[int] = None,
        min_keep_sample_size: Optional[int] = None,
        max_sample_size: Optional[int] = None,
        shuffle: bool = True,
        pad_audio: bool = False,
        normalize: bool = False,
        random_crop: bool = False,
        single_target: bool = False,
        label_tolerance: int = frames.LABEL_TOLERANCE,
        seed: int = 1,
        dictionaries: Optional[List[Any]] = None,
        dict_paths: Optional[List[str]] = None,
    ):
        if not 0 <= label_tolerance <= MAX_LABEL_TOLERANCE:
            raise ValueError(f"label_tolerance must be 0..{MAX_LABEL_TOLERANCE} frames, got {label_tolerance}")
        if not 1 <= channels <= MAX_CHANNELS:
            raise ValueError(f"task.audio_channels must be 1 (mono downmix) or 2 (stereo), got {channels}")
        check_manifest_rate(manifest_path, sample_rate, "task.sample_rate")
        rates = label_rates if isinstance(label_rates, Sequence) else [float(label_rates)] * len(label_paths)
        for path, rate in zip(label_paths, rates):
            check_label_lengths(manifest_path, path, rate, sample_rate, label_tolerance,
                                max_keep_sample_size, min_keep_sample_size)
        for i, (path, dictionary) in enumerate(zip(label_paths, dictionaries or [])):
            check_label_values(path, dictionary, dict_paths[i] if dict_paths else "the label dictionary")
        super().__init__(
            manifest_path, sample_rate=sample_rate, label_paths=label_paths,
            label_rates=[float(r) for r in rates], pad_list=pad_list, eos_list=eos_list,
            label_processors=label_processors, max_keep_sample_size=max_keep_sample_size,
            min_keep_sample_size=min_keep_sample_size, max_sample_size=max_sample_size,
            shuffle=shuffle, pad_audio=pad_audio, normalize=normalize, store_labels=False,
            random_crop=random_crop, single_target=single_target,
        )
        self.channels = channels
        self.hop = frames.hop_length(sample_rate)
        self.num_skipped = 0
        self.seed = seed
        self.epoch = 1
        self._collate_rng = None

    def set_epoch(self, epoch):
        self.epoch = epoch

    def rng(self, *key: int) -> np.random.Generator:
        """The generator of the draws for ``key`` (item index, or the batch's ids) this epoch."""
        return np.random.default_rng([self.seed, self.epoch, *key])

    def path(self, index: int) -> str:
        return os.path.join(self.audio_root, self.audio_names[index])

    def crop_start(self, size: int, length: int, rng: np.random.Generator) -> int:
        """A frame-aligned start for a ``length``-sample crop of a ``size``-sample clip."""
        if size <= length or not self.random_crop:
            return 0
        return self.hop * int(rng.integers(0, (size - length) // self.hop + 1))

    def read(self, index: int, offset: int = 0, length: Optional[int] = None) -> torch.Tensor:
        """(channels, samples) at the task rate, only [offset, offset + length) decoded."""
        path, size = self.path(index), self.sizes[index]
        info = audio_info(path)
        have = info.samples_at(self.sample_rate)
        slack = 2 * self.hop + (MP3_SLACK if info.format == "MP3" else 0)
        if abs(have - size) > slack:
            raise ValueError(
                f"manifest row {index + 1} says {size} samples for {path}, but the file has {have} at "
                f"{self.sample_rate} Hz: the manifest was written for another sample rate "
                f"(task.sample_rate={self.sample_rate}) or the file changed; rebuild the manifest"
            )
        wav, _ = read_audio(path, self.sample_rate, self.channels, offset=offset,
                            num_samples=size - offset if length is None else length, info=info)
        return wav

    def get_audio(self, index):
        """The whole clip, (channels, samples) (training reads crops via ``__getitem__``)."""
        return self.postprocess(self.read(index), self.sample_rate)

    def slice_label(self, label: torch.Tensor, label_rate: float, start: int, length: int):
        if label_rate < 0:
            return label
        first = int(round(start * label_rate / self.sample_rate))
        count = expected_labels(length, self.sample_rate, label_rate)
        return frames.fit_frames(label[first:first + count], count)

    def __getitem__(self, index):
        size = self.sizes[index]
        length = min(size, self.max_sample_size)
        start = self.crop_start(size, length, self.rng(index))
        try:
            wav = self.read(index, start, length)
        except AudioError as e:
            self.num_skipped += 1
            logger.warning(f"skipping unreadable audio ({self.num_skipped} so far): {e}")
            return {"id": index, "source": None, "label_list": None}
        labels = [self.slice_label(label, rate, start, length)
                  for label, rate in zip(self.get_labels(index), self.label_rates)]
        wav = self.postprocess(wav, self.sample_rate)
        return {"id": index, "source": wav.t(), "label_list": labels}  # (samples, channels)

    def postprocess(self, wav, cur_sample_rate):
        """(channels, samples) -> same; optional normalisation over the whole crop."""
        if self.normalize:
            with torch.no_grad():
                wav = F.layer_norm(wav, wav.shape)
        return wav

    def crop_to_max_size(self, wav, target_size, rng: Optional[np.random.Generator] = None):
        """Frame-aligned crop of ``wav`` (samples, channels); returns (crop, start)."""
        start = self.crop_start(len(wav), target_size, self.rng(len(self)) if rng is None else rng)
        return wav[start:start + target_size], start

    def collater(self, samples):
        # fairseq's collater (items cropped to the shortest), its crops drawn for these ids
        ids = [int(s["id"]) for s in samples if s["source"] is not None]
        self._collate_rng = self.rng(len(self), *ids)  # len(self): never an item's key
        return super().collater(samples)

    def collater_audio(self, audios, audio_size):
        """Items (samples, channels) -> batch (batch, channels, samples), padding (batch, samples)."""
        batch = audios[0].new_zeros(len(audios), self.channels, audio_size)
        padding_mask = torch.zeros(len(audios), audio_size, dtype=torch.bool)
        starts = [0] * len(audios)
        rng = self._collate_rng
        for i, audio in enumerate(audios):
            if len(audio) < audio_size:
                assert self.pad_audio, "shorter item without pad_audio"
                batch[i, :, : len(audio)] = audio.t()
                padding_mask[i, len(audio):] = True
            else:
                crop, starts[i] = self.crop_to_max_size(audio, audio_size, rng)
                batch[i] = crop.t()
        return batch, padding_mask, starts
