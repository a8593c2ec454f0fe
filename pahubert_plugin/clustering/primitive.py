"""Primitive auditory grouping features: MFCC+Δ+ΔΔ plus frame-level Bregman cues (47 dims, 100 Hz).

Bregman's *primitive* (bottom-up, learning-free) grouping principles are what unsupervised music
separation methods exploit: partials that are harmonic, start together, continue smoothly, or
repeat are heard as one source. Each cue below turns one principle into a number per 10 ms frame,
computed from one centred STFT of the mono downmix (Hann, ``n_fft`` = next power of two >= 4 hops,
hop = sample_rate / 100, so frames line up with the models' STFT and the labels).

=================  ==========================================================  ==================================
cue                how it is computed                                          grouping principle / why
=================  ==========================================================  ==================================
``harmonic_db``    log energy of the HPSS harmonic part of the 128-band mel     good continuation: sustained partials
                   spectrogram (17-frame median along time, Fitzgerald 2010)    form horizontal ridges (pitched
                                                                                instruments, voice)
``percussive_db``  log energy of the HPSS percussive part (9-band median        common onset across frequency:
                   along frequency)                                             broadband vertical ridges (drums)
``harmonic_ratio`` harmonic / (harmonic + percussive) energy, in [0, 1]         which of the two streams dominates
``flux``           half-wave-rectified rise of log-mel energy, averaged over    common fate / onset synchrony
                   the 128 mel bands (onset strength, spectral flux)            (note and drum onsets)
``harmonicity``    peak of the normalised autocorrelation for pitch lags        harmonicity: partials at multiples
                   60-1000 Hz, from the power spectrum and divided by the       of one f0 fuse (pitch salience,
                   window's own autocorrelation (Boersma 1993)                  voice and bass vs noise)
``repetition``     mean of the 5 highest cosine similarities of this frame's    repetition (REPET-SIM, Rafii & Pardo
                   mel magnitude spectrum with frames of the same clip more     2012): the repeating accompaniment
                   than 1 s away (reference frames strided to <= 1024)          vs a non-repeating foreground
``centroid``       spectral centroid, log2 Hz                                   timbral similarity (brightness)
``flatness``       log spectral flatness (geometric / arithmetic mean power)    tone vs noise (similarity)
=================  ==========================================================  ==================================

All 47 dimensions (39 MFCC + 8 cues) are then standardised per clip (zero mean, unit variance,
like Kaldi's utterance CMVN) so every cue weighs the same in the k-means distance whatever its
units, and recording level or channel colour does not split clusters. HPSS runs on the mel
spectrogram rather than the linear one: median filters over 1025 linear bins cost ~1 s per 30 s
of 44.1 kHz audio, over 128 mel bands about an eighth of that. The autocorrelation is the
circular one of the windowed frame; for lags below n_fft/2 the wrap-around term is the product of
two window tails and small.
"""
import math

import torch
import torch.nn.functional as F
import torchaudio.functional as AF

from pahubert_plugin.clustering.mfcc import mfcc_features
from pahubert_plugin.clustering.base import FeatureReader
from pahubert_plugin.frames import fit_frames, hop_length, num_frames

CUES = ("harmonic_db", "percussive_db", "harmonic_ratio", "flux", "harmonicity", "repetition",
        "centroid", "flatness")
_EPS = 1e-10


def _median_filter(x: torch.Tensor, kernel: int, dim: int, block: int = 512) -> torch.Tensor:
    """Median over a centred window of ``kernel`` along ``dim`` of a 2-D tensor (edge-padded).

    Works in blocks along the other axis so a long track never builds a (F, T, kernel) tensor.
    """
    x = x.transpose(0, 1) if dim == 0 else x  # filter along the last axis
    half = kernel // 2
    padded = F.pad(x.unsqueeze(0), (half, half), mode="replicate").squeeze(0)
    out = torch.empty_like(x)
    for i in range(0, x.shape[0], block):
        out[i:i + block] = padded[i:i + block].unfold(-1, kernel, 1).median(dim=-1).values
    return out.transpose(0, 1) if dim == 0 else out


def hpss_cues(mag: torch.Tensor, time_kernel: int = 17, freq_kernel: int = 9):
    """Harmonic/percussive energies per frame from a magnitude spectrogram ``(freq, frames)``."""
    harm = _median_filter(mag, time_kernel, dim=1)
    perc = _median_filter(mag, freq_kernel, dim=0)
    mask_h = harm.pow(2) / (harm.pow(2) + perc.pow(2) + _EPS)  # Wiener-style soft mask
    power = mag.pow(2)
    e_h = (mask_h * power).sum(0)
    e_p = ((1 - mask_h) * power).sum(0)
    return 10 * torch.log10(e_h + _EPS), 10 * torch.log10(e_p + _EPS), e_h / (e_h + e_p + _EPS)


def spectral_flux(log_mel: torch.Tensor) -> torch.Tensor:
    """Onset strength: mean positive rise of ``log_mel`` ``(bands, frames)`` -> ``(frames,)``."""
    rise = F.relu(log_mel[:, 1:] - log_mel[:, :-1]).mean(0)
    return F.pad(rise, (1, 0))


def harmonicity(power: torch.Tensor, window: torch.Tensor, sample_rate: int,
                fmin: float = 60.0, fmax: float = 1000.0) -> torch.Tensor:
    """Pitch salience from ``power`` ``(freq, frames)``: max normalised autocorrelation in the f0 range."""
    n_fft = window.numel()
    ac = torch.fft.irfft(power, n=n_fft, dim=0)  # (lag, frames)
    win_ac = torch.fft.irfft(torch.fft.rfft(window).abs().pow(2), n=n_fft)
    lo = max(1, int(sample_rate / fmax))
    hi = min(n_fft // 2, int(sample_rate / fmin))
    norm = ac[lo:hi] / (ac[:1] + _EPS) / (win_ac[lo:hi, None] / win_ac[0])
    return norm.max(0).values.clamp(0.0, 1.0)


def repetition(mel_mag: torch.Tensor, min_gap: int = 100, top_k: int = 5, max_refs: int = 1024) -> torch.Tensor:
    """REPET-SIM style repetition of each frame of ``mel_mag`` ``(bands, frames)`` -> ``(frames,)``."""
    frames = mel_mag.shape[1]
    unit = F.normalize(mel_mag, dim=0)
    stride = max(1, math.ceil(frames / max_refs))
    ref_idx = torch.arange(0, frames, stride)
    sim = unit.transpose(0, 1) @ unit[:, ref_idx]  # (frames, refs), cosine in [0, 1]
    near = (torch.arange(frames)[:, None] - ref_idx[None, :]).abs() < min_gap
    sim = sim.masked_fill(near, 0.0)
    k = min(top_k, ref_idx.numel())
    return sim.topk(k, dim=1).values.mean(1)


def primitive_cues(wav: torch.Tensor, sample_rate: int, n_mels: int = 128) -> torch.Tensor:
    """The 8 cues of the module table for a mono waveform.

    Args:
        wav: ``(samples,)`` float waveform.
    Returns:
        ``(num_frames(samples, sample_rate), 8)`` float32, columns in :data:`CUES` order (unstandardised).
    """
    hop = hop_length(sample_rate)
    n = num_frames(wav.shape[-1], sample_rate)
    n_fft = 1 << math.ceil(math.log2(4 * hop))
    window = torch.hann_window(n_fft)
    if wav.shape[-1] <= n_fft // 2:  # reflect padding needs more samples than half a window
        wav = F.pad(wav, (0, n_fft // 2 + 1 - wav.shape[-1]))
    spec = torch.stft(wav, n_fft, hop, window=window, center=True, return_complex=True)
    spec = fit_frames(spec, n, axis=1)  # (freq, frames)
    mag = spec.abs()
    power = mag.pow(2)

    fb = AF.melscale_fbanks(n_fft // 2 + 1, 0.0, sample_rate / 2, n_mels, sample_rate)  # (freq, mels)
    mel_mag = (fb.transpose(0, 1) @ power).sqrt()  # (mels, frames)
    log_mel = torch.log(mel_mag.pow(2) + 1e-8)

    harm_db, perc_db, ratio = hpss_cues(mel_mag)
    freqs = torch.linspace(0, sample_rate / 2, n_fft // 2 + 1)
    total = power.sum(0) + _EPS
    centroid = torch.log2((freqs[:, None] * power).sum(0) / total + 1.0)
    flatness = torch.log(power + _EPS).mean(0) - torch.log(power.mean(0) + _EPS)
    cues = torch.stack([
        harm_db, perc_db, ratio, spectral_flux(log_mel), harmonicity(power, window, sample_rate),
        repetition(mel_mag), centroid, flatness,
    ], dim=1)
    return cues.float()


def standardise(x: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Per-dimension zero mean, unit variance over frames of ``x`` ``(frames, dim)``."""
    if x.shape[0] == 0:
        return x
    return (x - x.mean(0)) / (x.std(0, unbiased=False) + eps)


class PrimitiveReader(FeatureReader):
    """``get_feats(path) -> (frames, 47)``: MFCC+Δ+ΔΔ and the 8 cues of the module table, per-clip standardised."""

    dim = 39 + len(CUES)

    def __init__(self, sample_rate: int):
        super().__init__(sample_rate, channels=1)

    def extract(self, wav: torch.Tensor) -> torch.Tensor:
        """``wav`` ``(channels, samples)`` -> ``(frames, 47)``; channels are averaged."""
        mono = wav.mean(dim=0)
        if num_frames(mono.shape[-1], self.sample_rate) == 0:
            return mono.new_zeros(0, self.dim)
        feats = torch.cat([mfcc_features(mono, self.sample_rate), primitive_cues(mono, self.sample_rate)], dim=1)
        return standardise(feats)
