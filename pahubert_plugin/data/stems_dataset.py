"""Multi-stem datasets for separation: MUSDB18(-HQ) or any folder laid out like MUSDB18-HQ.

Layouts
  * wav folders (MUSDB18-HQ, ``is_wav=True``): ``<root>/<subset>/<track>/{mixture,<source>...}.wav``
    with any sources named in the config and any sample rate (resampled on read).  Read
    with :func:`pahubert_plugin.data.audio.read_audio` (soundfile seeks, so a random crop
    decodes only the crop; musdb would start ffmpeg for every read).
  * stems (MUSDB18 ``.stem.mp4``, ``is_wav=False``): listed and decoded through the
    ``musdb`` package (imported lazily: it needs ffmpeg at import time).

Validation (standard split): MUSDB18's 14 validation tracks (musdb's ``mus.yaml``) held out of
``train``; for folders whose track names are not MUSDB18's, ``<root>/valid`` if it exists, else
``num_valid_tracks`` last tracks of ``train`` (sorted by name).

Datasets
  * :class:`StemsChunkDataset`: random training crops with the Demucs/Open-Unmix
    augmentations (each source from a random track, random gain, channel swap, sign flip);
    the mixture is the sum of the augmented sources.
  * :class:`TrackDataset`: whole tracks (optionally capped) for validation/test.
Both collate to ``{"id", "net_input": {"mixture": (B, C, T)}, "target": (B, S, C, T), "lengths",
"nsentences", "ntokens"}`` (zero-padded to the longest); batches with mixtures of mixtures add
``"mixit"`` (B,) and ``"mixit_refs"`` (B, 2, C, T).
"""
import dataclasses
import os
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch
from fairseq.data import FairseqDataset

from .audio import AudioError, audio_info, read_audio, resampled_length


MUSDB_SOURCES = ("drums", "bass", "other", "vocals")


def musdb_validation_tracks() -> List[str]:
    """The 14 standard validation track names from the musdb package's ``mus.yaml``."""
    import yaml  # musdb's own file, read without importing musdb (no ffmpeg needed)
    import importlib.util

    spec = importlib.util.find_spec("musdb")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("the musdb package is needed for the standard MUSDB18 validation split")
    path = os.path.join(list(spec.submodule_search_locations)[0], "configs", "mus.yaml")
    with open(path) as f:
        return list(yaml.safe_load(f)["validation_tracks"])


@dataclasses.dataclass
class StemTrack:
    """One track: its name and a reader for each stem at the dataset's sample rate."""

    name: str
    num_samples: int  # at ``rate``, the dataset's sample rate
    paths: Dict[str, str] = dataclasses.field(default_factory=dict)  # wav layout
    musdb_track: object = None  # stems layout (musdb.MultiTrack)
    rate: int = 0  # the rate num_samples is counted at

    def samples_at(self, sample_rate: int) -> int:
        """Track length in samples at ``sample_rate``."""
        return resampled_length(self.num_samples, self.rate, sample_rate) if self.rate else self.num_samples

    def read(self, stem: str, sample_rate: int, channels: int, offset: int = 0,
             length: Optional[int] = None) -> torch.Tensor:
        """``(channels, length)`` float32 of ``stem`` ("mixture" or a source name)."""
        length = self.samples_at(sample_rate) - offset if length is None else length
        try:
            if self.musdb_track is None:
                wav, _ = read_audio(self.paths[stem], sample_rate, channels, offset, length)
                return wav
            return self._read_musdb(stem, sample_rate, channels, offset, length)
        except AudioError as e:
            raise AudioError(e.path, f"track {self.name!r}, stem {stem!r}: {e.reason}") from None

    def _read_musdb(self, stem, sample_rate, channels, offset, length) -> torch.Tensor:
        import torchaudio.functional as AF

        from .audio import apply_channel_policy

        track = self.musdb_track
        rate = int(track.rate)
        track.chunk_start = offset / sample_rate
        track.chunk_duration = length / sample_rate + 0.05
        try:
            audio = track.audio if stem == "mixture" else track.sources[stem].audio
        finally:
            track.chunk_start, track.chunk_duration = 0, None
        wav = torch.from_numpy(apply_channel_policy(np.ascontiguousarray(audio.T, dtype=np.float32),
                                                    channels, track.path))
        if rate != sample_rate:
            wav = AF.resample(wav, rate, sample_rate)
        wav = wav[:, :length]
        if wav.shape[-1] < length:
            wav = torch.nn.functional.pad(wav, (0, length - wav.shape[-1]))
        return wav


def _wav_track(folder: str, name: str, sources: Sequence[str], sample_rate: int,
               with_mixture: bool = True) -> StemTrack:
    paths = {}
    for stem in ["mixture", *sources] if with_mixture else list(sources):
        path = os.path.join(folder, f"{stem}.wav")
        if not os.path.isfile(path):
            have = sorted(f for f in os.listdir(folder) if f.endswith(".wav"))
            expected = f"mixture + {list(sources)}" if with_mixture else f"{list(sources)}"
            raise ValueError(f"track {name!r} ({folder}): missing stem {stem}.wav; "
                             f"expected {expected}, found {have}")
        paths[stem] = path
    lengths = {}
    for stem, path in paths.items():
        try:
            lengths[stem] = audio_info(path).samples_at(sample_rate)
        except AudioError as e:
            raise AudioError(path, f"track {name!r}: {e.reason}") from None
    if max(lengths.values()) - min(lengths.values()) > sample_rate // 100:
        raise ValueError(f"track {name!r} ({folder}): stems differ in length: {lengths} samples "
                         f"at {sample_rate} Hz")
    return StemTrack(name=name, num_samples=min(lengths.values()), paths=paths, rate=sample_rate)


def _musdb_tracks(root: str, subset: str, sources: Sequence[str], sample_rate: int) -> List[StemTrack]:
    try:
        import musdb  # lazy: musdb/stempeg need ffmpeg at import time
    except Exception as e:  # stempeg raises a bare RuntimeError without ffmpeg
        raise ImportError(f"reading MUSDB18 .stem.mp4 needs the musdb package and ffmpeg: {e}") from e
    tracks = []
    for t in musdb.DB(root=root, subsets=[subset], is_wav=False):
        missing = [s for s in sources if s not in t.sources]
        if missing:
            raise ValueError(f"track {t.name!r} ({t.path}): no stems {missing}; musdb offers {list(t.sources)}")
        if t.rate is None or t.samples is None:
            raise ValueError(f"track {t.name!r} ({t.path}): unreadable stem file")
        n = resampled_length(int(t.samples), int(t.rate), sample_rate)
        tracks.append(StemTrack(name=t.name, num_samples=n, musdb_track=t, rate=sample_rate))
    return tracks


def list_tracks(root: str, subset: str, sources: Sequence[str], sample_rate: int,
                is_wav: bool = True) -> List[StemTrack]:
    """All tracks of ``<root>/<subset>`` sorted by name; a ValueError names any bad track."""
    folder = os.path.join(root, subset)
    if not os.path.isdir(folder):
        raise ValueError(f"no folder {folder}: expected {root}/{{train,test}}/<track>/ "
                         f"(MUSDB18-HQ layout) or .stem.mp4 files")
    if not is_wav:
        return _musdb_tracks(root, subset, sources, sample_rate)
    names = sorted(d for d in os.listdir(folder) if os.path.isdir(os.path.join(folder, d)))
    if not names:
        raise ValueError(f"{folder} holds no track folders")
    return [_wav_track(os.path.join(folder, n), n, sources, sample_rate) for n in names]


def list_pseudo_tracks(folder: str, sources: Sequence[str], sample_rate: int) -> List[StemTrack]:
    """Tracks of teacher estimates, ``<folder>/<clip>/<source>.wav`` (no mixture needed), e.g. what
    ``pahubert-separate TEACHER.pt UNLABELLED/ -o FOLDER`` writes: the pseudo-labelled clips of
    teacher-student fine-tuning (``task.pseudo_data``)."""
    if not os.path.isdir(folder):
        raise ValueError(f"task.pseudo_data: no folder {folder} (expected <clip>/{{{','.join(sources)}}}.wav, "
                         f"e.g. the output of pahubert-separate)")
    names = sorted(d for d in os.listdir(folder) if os.path.isdir(os.path.join(folder, d)))
    if not names:
        raise ValueError(f"task.pseudo_data: {folder} holds no clip folders")
    return [_wav_track(os.path.join(folder, n), n, sources, sample_rate, with_mixture=False) for n in names]


AUDIO_EXTENSIONS = (".wav", ".flac")


def list_mixtures(folder: str, sample_rate: int) -> List[StemTrack]:
    """Unlabelled mixtures, the audio files directly in ``folder`` (e.g. the speech corpus's ``unlabelled/``),
    as tracks with a ``mixture`` stem only: what mixture invariant training (``task.mixit_data``) mixes."""
    if not os.path.isdir(folder):
        raise ValueError(f"task.mixit_data: no folder {folder} (expected audio files of unlabelled mixtures)")
    names = sorted(f for f in os.listdir(folder) if f.lower().endswith(AUDIO_EXTENSIONS)
                   and os.path.isfile(os.path.join(folder, f)))
    if len(names) < 2:
        raise ValueError(f"task.mixit_data: {folder} holds {len(names)} audio files ({'/'.join(AUDIO_EXTENSIONS)}); "
                         f"mixing two mixtures needs at least 2")
    tracks = []
    for name in names:
        path = os.path.join(folder, name)
        try:
            n = audio_info(path).samples_at(sample_rate)
        except AudioError as e:
            raise AudioError(path, f"task.mixit_data: {e.reason}") from None
        tracks.append(StemTrack(name=os.path.splitext(name)[0], num_samples=n, paths={"mixture": path},
                                rate=sample_rate))
    return tracks


def split_tracks(root: str, split: str, sources: Sequence[str], sample_rate: int, is_wav: bool = True,
                 num_valid_tracks: int = 0, train_tracks: int = 0) -> List[StemTrack]:
    """Tracks of a fairseq split: ``train``, ``valid`` (see module doc) or any subset folder."""
    if split not in ("train", "valid"):
        return list_tracks(root, split, sources, sample_rate, is_wav)
    if split == "valid" and os.path.isdir(os.path.join(root, "valid")):
        return list_tracks(root, "valid", sources, sample_rate, is_wav)
    train = list_tracks(root, "train", sources, sample_rate, is_wav)
    has_valid_folder = os.path.isdir(os.path.join(root, "valid"))
    standard = set(musdb_validation_tracks())
    if has_valid_folder:
        held = set()
    elif any(t.name in standard for t in train):
        held = standard
    elif num_valid_tracks > 0:
        if num_valid_tracks >= len(train):
            raise ValueError(f"num_valid_tracks={num_valid_tracks} leaves no training tracks of {len(train)}")
        held = {t.name for t in train[-num_valid_tracks:]}
    else:
        held = set()
        if split == "valid":
            raise ValueError(f"{root}/train has none of MUSDB18's validation tracks and there is no "
                             f"{root}/valid folder: set task.num_valid_tracks=N to hold out the last N "
                             f"training tracks")
    if split == "valid":
        return [t for t in train if t.name in held]
    kept = [t for t in train if t.name not in held]
    if train_tracks > 0:
        if train_tracks > len(kept):
            raise ValueError(f"train_tracks={train_tracks} but only {len(kept)} training tracks exist")
        kept = kept[:train_tracks]
    return kept


@dataclasses.dataclass
class Augment:
    """Training augmentations (Demucs / Open-Unmix)."""

    random_mix: bool = True  # each source from an independently drawn track
    gain_min: float = 0.25
    gain_max: float = 1.25
    channel_swap: bool = True
    sign_flip: bool = True


class StemsChunkDataset(FairseqDataset):
    """Random crops of ``segment`` samples; ``samples_per_track`` examples per (labelled) track per epoch.

    Example ``index`` is drawn from a generator seeded with ``(seed, epoch, index)``, so an
    epoch is reproducible and differs from the next.

    With ``pseudo_tracks`` (teacher estimates on unlabelled mixtures), an example takes its stems from
    them with probability ``pseudo_prob``, each source from an independently drawn clip when
    ``augment.random_mix``: the teacher's speech of one clip over its noise of another, the remixing of
    RemixIT (Tzinis et al., 2022), here with a fixed teacher (one round of teacher-student).

    With ``mixit_tracks`` (unlabelled mixtures), an example is with probability ``mixit_prob`` a mixture of
    two of them (each a random crop with the gain, channel and sign augmentations) whose target is the two
    mixtures, ``"mixit_refs"`` ``(2, channels, segment)``: mixture invariant training (Wisdom et al., 2020)
    beside the labelled examples. Its ``"target"`` is zeros and is not used.
    """

    def __init__(self, tracks: List[StemTrack], sources: Sequence[str], sample_rate: int, channels: int,
                 segment: int, samples_per_track: int, augment: Augment, seed: int = 1,
                 pseudo_tracks: Optional[List[StemTrack]] = None, pseudo_prob: float = 0.0,
                 mixit_tracks: Optional[List[StemTrack]] = None, mixit_prob: float = 0.0):
        if not tracks:
            raise ValueError("no training tracks")
        self.pseudo_tracks, self.pseudo_prob = list(pseudo_tracks or []), float(pseudo_prob)
        self.mixit_tracks, self.mixit_prob = list(mixit_tracks or []), float(mixit_prob)
        self.tracks, self.sources = tracks, list(sources)
        self.sample_rate, self.channels, self.segment = sample_rate, channels, segment
        self.samples_per_track, self.augment, self.seed = samples_per_track, augment, seed
        self.epoch = 1

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __len__(self):
        return len(self.tracks) * self.samples_per_track

    def _crop(self, track: StemTrack, stem: str, rng: np.random.Generator, offset: Optional[int]):
        if track.num_samples <= self.segment:
            wav = track.read(stem, self.sample_rate, self.channels)
            return torch.nn.functional.pad(wav, (0, self.segment - wav.shape[-1])), 0
        if offset is None:
            offset = int(rng.integers(0, track.num_samples - self.segment + 1))
        return track.read(stem, self.sample_rate, self.channels, offset, self.segment), offset

    def _augment(self, wav: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
        aug = self.augment
        wav = wav * float(rng.uniform(aug.gain_min, aug.gain_max))
        if aug.channel_swap and wav.shape[0] == 2 and rng.random() < 0.5:
            wav = wav.flip(0)
        if aug.sign_flip and rng.random() < 0.5:
            wav = -wav
        return wav

    def __getitem__(self, index):
        rng = np.random.default_rng([self.seed, self.epoch, index])
        aug = self.augment
        if self.mixit_tracks and rng.random() < self.mixit_prob:  # no draw without them: same streams as before
            picks = rng.choice(len(self.mixit_tracks), size=2, replace=False)
            refs = torch.stack([self._augment(self._crop(self.mixit_tracks[k], "mixture", rng, None)[0], rng)
                                for k in picks])  # (2, channels, segment)
            target = refs.new_zeros(len(self.sources), *refs.shape[1:])
            return {"id": index, "mixture": refs.sum(0), "target": target, "mixit_refs": refs}
        pool, own = self.tracks, self.tracks[index // self.samples_per_track]
        if self.pseudo_tracks and rng.random() < self.pseudo_prob:  # no draw without them: same streams as before
            pool = self.pseudo_tracks
            own = pool[int(rng.integers(len(pool)))]
        offset = None
        stems = []
        for src in self.sources:
            track = pool[int(rng.integers(len(pool)))] if aug.random_mix else own
            wav, off = self._crop(track, src, rng, None if aug.random_mix else offset)
            offset = off if not aug.random_mix else None
            stems.append(self._augment(wav, rng))
        target = torch.stack(stems)  # (sources, channels, segment)
        return {"id": index, "mixture": target.sum(0), "target": target}

    def num_tokens(self, index):
        return self.segment

    def size(self, index):
        return self.segment

    def ordered_indices(self):
        return np.arange(len(self))

    def collater(self, samples):
        return collate(samples)


class TrackDataset(FairseqDataset):
    """Whole tracks (validation/test): mixture and stems, optionally the first ``max_samples``."""

    def __init__(self, tracks: List[StemTrack], sources: Sequence[str], sample_rate: int, channels: int,
                 max_samples: int = 0):
        self.tracks, self.sources = tracks, list(sources)
        self.sample_rate, self.channels, self.max_samples = sample_rate, channels, max_samples

    def __len__(self):
        return len(self.tracks)

    def _length(self, index):
        n = self.tracks[index].num_samples
        return min(n, self.max_samples) if self.max_samples > 0 else n

    def __getitem__(self, index):
        track, n = self.tracks[index], self._length(index)
        read = lambda stem: track.read(stem, self.sample_rate, self.channels, 0, n)  # noqa: E731
        target = torch.stack([read(s) for s in self.sources])
        return {"id": index, "mixture": read("mixture"), "target": target}

    def num_tokens(self, index):
        return self._length(index)

    def size(self, index):
        return self._length(index)

    def ordered_indices(self):
        return np.arange(len(self))

    def collater(self, samples):
        return collate(samples)


def collate(samples: List[dict]) -> dict:
    """Stack examples, zero-padding to the longest; ``lengths`` keeps the true lengths."""
    if not samples:
        return {}
    lengths = [s["mixture"].shape[-1] for s in samples]
    longest = max(lengths)
    pad = lambda x: torch.nn.functional.pad(x, (0, longest - x.shape[-1]))  # noqa: E731
    mixture = torch.stack([pad(s["mixture"]) for s in samples])
    batch = {
        "id": torch.LongTensor([s["id"] for s in samples]),
        "net_input": {"mixture": mixture},
        "target": torch.stack([pad(s["target"]) for s in samples]),
        "lengths": torch.LongTensor(lengths),
        "nsentences": len(samples),
        "ntokens": int(sum(lengths)),
    }
    if any("mixit_refs" in s for s in samples):  # mixtures of mixtures: "mixit" marks them, zeros elsewhere
        zeros = mixture.new_zeros(2, *mixture.shape[1:])
        batch["mixit"] = torch.BoolTensor(["mixit_refs" in s for s in samples])
        batch["mixit_refs"] = torch.stack([pad(s["mixit_refs"]) if "mixit_refs" in s else zeros for s in samples])
    return batch
