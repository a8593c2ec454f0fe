"""Kaldi-compatible MFCC + delta + delta-delta (39 dims at 100 Hz), HuBERT iteration 1's feature.

Same recipe as fairseq's ``simple_kmeans/dump_mfcc_feature.py`` (which no longer runs: it
reads audio through torchaudio's removed sox effects), on the mono downmix at any rate that
is a multiple of 100 Hz: ``torchaudio.compliance.kaldi.mfcc`` with 13 cepstra, 25 ms window,
10 ms shift, no energy, no dither; ``snip_edges=False`` so a clip of ``n`` samples gives about
``n / hop`` frames, then :func:`pahubert_plugin.frames.fit_frames` to exactly the rule.
"""
import torch
import torchaudio.compliance.kaldi as kaldi
import torchaudio.functional as AF

from pahubert_plugin.clustering.base import FeatureReader
from pahubert_plugin.frames import fit_frames, num_frames


def mfcc_features(wav: torch.Tensor, sample_rate: int, num_ceps: int = 13, num_mel_bins: int = 23) -> torch.Tensor:
    """MFCC+Δ+ΔΔ of a mono waveform.

    Args:
        wav: ``(1, samples)`` or ``(samples,)`` float waveform.
    Returns:
        ``(num_frames(samples, sample_rate), 3 * num_ceps)`` float32.
    """
    wav = wav.reshape(1, -1).float()
    n = num_frames(wav.shape[-1], sample_rate)
    if n == 0:
        return wav.new_zeros(0, 3 * num_ceps)
    window = int(sample_rate * 0.025)
    if wav.shape[-1] < window:  # Kaldi needs one full window; a clip this short is 1-2 frames
        wav = torch.nn.functional.pad(wav, (0, window - wav.shape[-1]))
    mfcc = kaldi.mfcc(
        wav, sample_frequency=sample_rate, num_ceps=num_ceps, num_mel_bins=num_mel_bins,
        frame_length=25.0, frame_shift=10.0, use_energy=False, dither=0.0, snip_edges=False,
    )  # (frames, ceps)
    mfcc = fit_frames(mfcc, n, axis=0).transpose(0, 1)  # (ceps, frames) for compute_deltas
    deltas = AF.compute_deltas(mfcc)
    ddeltas = AF.compute_deltas(deltas)
    return torch.cat([mfcc, deltas, ddeltas], dim=0).transpose(0, 1).contiguous()


class MfccReader(FeatureReader):
    """``get_feats(path) -> (frames, 39)``: Kaldi MFCC + Δ + ΔΔ of the mono downmix."""

    dim = 39

    def __init__(self, sample_rate: int):
        super().__init__(sample_rate, channels=1)

    def extract(self, wav: torch.Tensor) -> torch.Tensor:
        """``wav`` ``(channels, samples)`` -> ``(frames, 39)``; channels are averaged."""
        return mfcc_features(wav.mean(dim=0), self.sample_rate)
