"""The one interface every feature reader shares: :class:`FeatureReader`.

fairseq's ``simple_kmeans/feature_utils.dump_feature`` calls ``reader.get_feats(path, nsample)``
and appends the ``(frames, dim)`` result to a shard. Our readers add two promises:

* ``frames == pahubert_plugin.frames.num_frames(num_samples, sample_rate)`` for a clip of
  ``num_samples`` samples at the reader's rate, so labels line up with the models' STFT
  frames (hop = sample_rate / 100);
* audio goes through :func:`pahubert_plugin.data.audio.read_audio` (soundfile decode,
  resampling to ``sample_rate``), so mp3/flac/ogg at any rate work.

A reader that works on audio implements :meth:`FeatureReader.extract`; one that needs its own
reading (e.g. a model with chunked inference) may override :meth:`get_feats` instead.
The readers (:mod:`.mfcc`, :mod:`.primitive`, :mod:`.hubert_reader`) subclass it, and the
factory the CLIs use (:func:`pahubert_plugin.clustering.readers.build_reader`) imports them, so
nothing imports in a circle. This module imports no torch.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Optional

from pahubert_plugin.data.audio import read_audio
from pahubert_plugin.frames import hop_length, num_frames

if TYPE_CHECKING:
    import torch


class FeatureReader:
    """Base class: ``get_feats(path, ref_len=None) -> (frames, dim)`` float32 tensor.

    Args:
        sample_rate: rate the audio is resampled to before featurisation (multiple of 100).
        channels: channel count ``extract`` receives (1 = mono downmix, None = as stored).
    """

    dim: int = -1  # feature dimension, set by subclasses

    def __init__(self, sample_rate: int, channels: Optional[int] = 1):
        hop_length(sample_rate)  # validates the rate
        self.sample_rate = int(sample_rate)
        self.channels = channels

    def read(self, path, ref_len: Optional[int] = None) -> torch.Tensor:
        """``(channels, samples)`` at ``self.sample_rate``; exactly ``ref_len`` samples if given.

        ``ref_len`` is the manifest's num_samples; a file that no longer holds that many
        samples raises an AudioError naming the file (the manifest is stale).
        """
        wav, _ = read_audio(path, sample_rate=self.sample_rate, channels=self.channels, num_samples=ref_len)
        return wav

    def extract(self, wav: torch.Tensor) -> torch.Tensor:
        """Features of ``wav`` ``(channels, samples)`` -> ``(num_frames(samples, sr), dim)``."""
        raise NotImplementedError

    def get_feats(self, path, ref_len: Optional[int] = None) -> torch.Tensor:
        """Features of the file at ``path``: ``(frames, dim)`` float32."""
        import torch

        with torch.no_grad():
            wav = self.read(path, ref_len)
            feats = self.extract(wav)
        expected = num_frames(wav.shape[-1], self.sample_rate)
        assert feats.shape[0] == expected, (feats.shape, expected)
        return feats

    def __repr__(self) -> str:
        return f"{type(self).__name__}(sample_rate={self.sample_rate}, dim={self.dim})"
