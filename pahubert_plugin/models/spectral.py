"""Shared spectral front end: STFT whose frames follow THE frame rule (one frame per label)."""
import math
from typing import Optional

import torch
from torch import nn

from .. import frames


def default_n_fft(sample_rate: int) -> int:
    """2048 at 44.1 kHz, scaled with the rate to the nearest power of two (1024 at 16 kHz)."""
    return 2 ** int(round(math.log2(2048 * sample_rate / 44100)))


class Spectrogram(nn.Module):
    """Centred Hann STFT with hop ``sample_rate / 100``, trimmed to ``frames.num_frames``.

    ``forward``: waveform ``(..., samples)`` -> complex ``(..., freq, frames)`` with
    ``freq = n_fft // 2 + 1`` and ``frames = num_frames(samples, sample_rate)``.
    ``inverse``: complex ``(..., freq, frames)`` -> waveform ``(..., length)``.
    """

    def __init__(self, sample_rate: int, n_fft: Optional[int] = None):
        super().__init__()
        self.sample_rate = sample_rate
        self.hop_length = frames.hop_length(sample_rate)
        self.n_fft = n_fft or default_n_fft(sample_rate)
        if self.n_fft < 2 * self.hop_length:
            raise ValueError(f"n_fft {self.n_fft} must be at least twice the hop {self.hop_length}")
        self.register_buffer("window", torch.hann_window(self.n_fft), persistent=False)

    @property
    def freq_bins(self) -> int:
        return self.n_fft // 2 + 1

    def forward(self, wav: torch.Tensor) -> torch.Tensor:
        lead, length = wav.shape[:-1], wav.shape[-1]
        spec = torch.stft(
            wav.reshape(-1, length).float(), self.n_fft, self.hop_length, window=self.window,
            center=True, pad_mode="constant", return_complex=True,
        )  # (N, freq, length // hop + 1)
        spec = spec[..., : frames.num_frames(length, self.sample_rate)]
        return spec.reshape(*lead, *spec.shape[-2:])

    def inverse(self, spec: torch.Tensor, length: int) -> torch.Tensor:
        lead = spec.shape[:-2]
        flat = spec.reshape(-1, *spec.shape[-2:])
        if torch.is_grad_enabled():
            wav = self._istft(flat, length)
        else:  # one signal at a time: the same values with a fraction of istft's temporaries
            wav = torch.cat([self._istft(one, length) for one in flat.split(1)])
        return wav.reshape(*lead, length)

    def _istft(self, spec: torch.Tensor, length: int) -> torch.Tensor:
        return torch.istft(spec, self.n_fft, self.hop_length, window=self.window, center=True, length=length)


def compress(magnitude: torch.Tensor) -> torch.Tensor:
    """Log compression of magnitudes, the input representation of every spectral model."""
    return torch.log1p(magnitude)
