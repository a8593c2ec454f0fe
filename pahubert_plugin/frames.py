"""THE samples-to-frames rule shared by clustering, datasets and models.

Labels are 100 Hz (10 ms), the HuBERT convention, and one STFT frame is one label:
the hop is ``sample_rate / 100`` samples.  A clip of ``n`` samples has
``n // hop`` frames.  Every producer of per-frame data (MFCC, primitive cues,
hidden features, STFT tokens) trims or pads its own frame axis to this count with
:func:`fit_frames`, so all of them agree exactly.
"""
import sys

import numpy as np

LABEL_RATE = 100
LABEL_TOLERANCE = 2  # frames a label line may differ from num_frames(): training and check-labels alike
MAX_FRAME_OFFSET = 3  # fit_frames refuses more, so no tolerance may exceed it


def hop_length(sample_rate: int, label_rate: int = LABEL_RATE) -> int:
    """Samples per frame; a ValueError if ``sample_rate`` is not a multiple of ``label_rate``."""
    if sample_rate <= 0 or sample_rate % label_rate != 0:
        raise ValueError(
            f"sample rate {sample_rate} Hz is not a positive multiple of the {label_rate} Hz "
            f"label rate; resample to e.g. 16000 or 44100 Hz"
        )
    return sample_rate // label_rate


def num_frames(num_samples: int, sample_rate: int, label_rate: int = LABEL_RATE) -> int:
    """Number of label frames for ``num_samples`` samples at ``sample_rate``."""
    return int(num_samples) // hop_length(sample_rate, label_rate)


def fit_frames(x, n: int, axis: int = 0):
    """Trim or edge-pad ``x`` (numpy array or tensor) along ``axis`` to exactly ``n`` frames.

    Producers differ from the rule by at most a couple of frames at the edges
    (centred STFT, Kaldi windows); anything further off is a bug, so it raises.
    """
    have = x.shape[axis]
    if abs(have - n) > MAX_FRAME_OFFSET:
        raise ValueError(f"frame count {have} is {have - n:+d} off the expected {n}")
    if have == 0 and n > 0:
        raise ValueError(f"no frames to fit to the expected {n}")
    if have >= n:
        index = [slice(None)] * x.ndim
        index[axis] = slice(0, n)
        return x[tuple(index)]
    pad = n - have
    torch = sys.modules.get("torch")  # not imported here: a tensor means torch is loaded already
    if torch is not None and isinstance(x, torch.Tensor):
        return torch.cat([x] + [x.narrow(axis, have - 1, 1)] * pad, dim=axis)
    last = np.take(x, [have - 1], axis=axis)
    return np.concatenate([x] + [last] * pad, axis=axis)
