"""Chunked separation with overlap-add, in memory or streamed block by block, for any separation model.

A separation model maps ``mixture (batch, channels, samples)`` to
``estimates (batch, sources, channels, samples)``.  Tracks are cut into segments of
``segment`` samples that overlap by ``overlap`` (a fraction), each segment is separated,
and the results are cross-faded with a triangular window (all weights > 0, so every
sample is covered) and normalised by the summed weights, as Demucs does
(:func:`chunk_starts`, :func:`chunk_weight`).

:func:`iter_apply` yields finished blocks in order while holding only about one segment
of output, so callers can stream results to disk for tracks of any length;
:func:`apply_model` collects them into one tensor.  Neither changes the model's
train/eval mode: the caller decides (fairseq's validation and :class:`Separator` use eval).

Separation in bounded memory: read, resample, separate, resample back block by block.
Each stage is a generator of ``(channels, samples)`` (or ``(sources, channels, samples)``)
blocks, so a track of any length holds about one model segment of audio in memory:

* :func:`read_blocks` decodes a file with soundfile a block at a time;
* :class:`StreamResampler` resamples a stream so that the concatenated output equals
  ``torchaudio.functional.resample`` of the whole signal (same sinc kernel, enough context);
* :func:`stream_apply` is the one overlap-add loop: :func:`iter_apply` feeds it the whole
  tensor as one block, the streaming path a stream of blocks (same chunks, batches, weights
  and order of operations);
* :func:`average_passes` averages demucs-style shifted passes in lockstep.

Writing the stems block by block is :mod:`pahubert_plugin.separation.writing`.
Every file ``pahubert-separate`` accepts is decoded by soundfile (the rule of
:mod:`pahubert_plugin.data.audio`), so reading always streams; arrays handed to
:meth:`Separator.separate <pahubert_plugin.separation.api.Separator.separate>` are already in
memory and take the in-memory path.
"""
import math
from typing import Iterable, Iterator, List, Optional, Tuple

import numpy as np
import soundfile as sf
import torch
import torchaudio.functional as AF
from torch import nn

from ..data.audio import MP3_SLACK, AudioError, AudioInfo

READ_SAMPLES = 1 << 16  # samples (per channel) decoded per soundfile read
LOWPASS_WIDTH, ROLLOFF = 6, 0.99  # torchaudio.functional.resample's defaults


def read_blocks(info: AudioInfo, block: int = READ_SAMPLES) -> Iterator[torch.Tensor]:
    """``info.num_samples`` samples of ``info.path`` as float32 ``(channels, n)`` blocks.

    The same samples :func:`~pahubert_plugin.data.audio.read_audio` returns for the whole
    file: a decoder that stops up to one mp3 frame early is padded with zeros, one that
    stops earlier raises :class:`AudioError` (truncated), as does a NaN or infinite sample."""
    slack = MP3_SLACK if info.format == "MP3" else 0
    done = 0
    try:
        with sf.SoundFile(info.path) as f:
            while done < info.num_samples:
                data = f.read(min(block, info.num_samples - done), dtype="float32", always_2d=True)
                if data.shape[0] == 0:
                    break
                if not np.isfinite(data).all():
                    raise AudioError(info.path, "contains NaN or infinite samples")
                done += data.shape[0]
                yield torch.from_numpy(np.ascontiguousarray(data.T))
    except (RuntimeError, sf.LibsndfileError) as e:
        raise AudioError(info.path, f"decode failed ({e})") from None
    if info.num_samples - done > slack:
        raise AudioError(info.path, f"truncated: expected {info.num_samples} samples, decoded {done}")
    if done < info.num_samples:
        yield torch.zeros(info.channels, info.num_samples - done)


def resampled_frames(length: int, orig_sr: int, new_sr: int) -> int:
    """Samples ``torchaudio.functional.resample`` returns for ``length`` input samples.

    torchaudio rounds ``new * length / orig`` through float32, which for long tracks can
    differ by one from the exact ceiling: the streaming path must cut where it cuts."""
    if orig_sr == new_sr:
        return int(length)
    g = math.gcd(int(orig_sr), int(new_sr))
    o, n = int(orig_sr) // g, int(new_sr) // g
    return int(torch.ceil(torch.as_tensor(n * length / o)).long())


class StreamResampler:
    """Resample a stream of ``(..., n)`` blocks from ``orig_sr`` to ``new_sr``.

    After the rates are reduced by their gcd to ``o -> n``, output frame ``j`` (``n``
    samples) depends on input samples ``[j*o - width, j*o + width + o)``.  Each push resamples
    the buffered input from ``ctx`` frames before the first pending frame, cut on a multiple
    of ``o``, so every emitted sample sees exactly the input the whole-signal call sees;
    :meth:`flush` finishes with the zeros the whole-signal call pads with.
    ``total`` is the input length, which fixes the output length (:func:`resampled_frames`).
    """

    def __init__(self, orig_sr: int, new_sr: int, total: int):
        g = math.gcd(int(orig_sr), int(new_sr))
        self.orig_sr, self.new_sr = int(orig_sr), int(new_sr)
        self.o, self.n = self.orig_sr // g, self.new_sr // g
        width = math.ceil(LOWPASS_WIDTH * self.o / (min(self.o, self.n) * ROLLOFF))
        self.ctx = width // self.o + 2  # frames of context; ctx * o >= width, with a margin
        self.total_out = resampled_frames(total, orig_sr, new_sr)
        self.buf: Optional[torch.Tensor] = None  # input from sample self.start (a multiple of o)
        self.start = 0
        self.frame = 0  # next output frame to emit

    def push(self, block: torch.Tensor) -> torch.Tensor:
        """Append ``block`` and return the output it completes (possibly empty)."""
        self.buf = block if self.buf is None else torch.cat([self.buf, block], -1)
        end = (self.start + self.buf.shape[-1]) // self.o - self.ctx  # frames whose input is all here
        return self._emit(end) if end > self.frame else block.new_zeros(*block.shape[:-1], 0)

    def flush(self) -> torch.Tensor:
        """The rest of the output, up to ``resampled_frames(total)`` samples in all."""
        return self._emit(None)

    def _emit(self, end: Optional[int]) -> torch.Tensor:
        lo = max(0, self.frame - self.ctx)  # first frame of the resampled slice
        x = self.buf[..., lo * self.o - self.start:]
        if end is None:  # the whole-signal call pads with at least width + o zeros
            x = nn.functional.pad(x, (0, (self.ctx + 1) * self.o))
            stop = self.total_out - lo * self.n
        else:
            x = x[..., :(end + self.ctx - lo) * self.o]
            stop = (end - lo) * self.n
        y = AF.resample(x, self.orig_sr, self.new_sr)[..., (self.frame - lo) * self.n:stop]
        if end is not None:  # keep ctx frames of input before the next pending frame
            keep = max(0, end - self.ctx) * self.o
            self.buf, self.start, self.frame = self.buf[..., keep - self.start:], keep, end
        return y


def resample_stream(blocks: Iterable[torch.Tensor], orig_sr: int, new_sr: int, total: int) -> Iterator[torch.Tensor]:
    """:class:`StreamResampler` over an iterable of blocks holding ``total`` samples in all."""
    if orig_sr == new_sr:
        yield from blocks
        return
    rs = StreamResampler(orig_sr, new_sr, total)
    for block in blocks:
        out = rs.push(block)
        if out.shape[-1]:
            yield out
    if rs.buf is not None:
        yield rs.flush()


def fit_length(blocks: Iterable[torch.Tensor], length: int) -> Iterator[torch.Tensor]:
    """The first ``length`` samples of a stream, zero-padded at the end if it is shorter."""
    done, last = 0, None
    for block in blocks:
        last = block
        take = min(block.shape[-1], length - done)
        if take > 0:
            yield block[..., :take]
            done += take
    if done < length and last is not None:
        yield last.new_zeros(*last.shape[:-1], length - done)


class _Window:
    """The samples ``[start, start + len)`` of a block stream, pulled on demand."""

    def __init__(self, blocks: Iterable[torch.Tensor]):
        self.blocks = iter(blocks)
        self.buf: Optional[torch.Tensor] = None
        self.start = 0

    def get(self, lo: int, hi: int) -> torch.Tensor:
        while self.buf is None or self.start + self.buf.shape[-1] < hi:
            block = next(self.blocks, None)
            assert block is not None, f"the stream ended before sample {hi}"
            self.buf = block if self.buf is None else torch.cat([self.buf, block], -1)
        return self.buf[..., lo - self.start:hi - self.start]

    def drop(self, upto: int) -> None:
        """Forget the samples before ``upto``."""
        if self.buf is not None and upto > self.start:
            self.buf, self.start = self.buf[..., upto - self.start:], upto


@torch.inference_mode()
def stream_apply(model: nn.Module, blocks: Iterable[torch.Tensor], total: int, segment: int,
                 overlap: float = 0.25, batch_size: int = 1,
                 device: Optional[torch.device] = None) -> Iterator[Tuple[int, torch.Tensor]]:
    """:func:`iter_apply` on the concatenation of ``blocks``.

    ``blocks`` are ``(channels, n)`` tensors holding ``total`` samples in all; yields
    ``(start, block (sources, channels, n))`` float32 on the CPU, the same chunks, batches
    and cross-fade as ``iter_apply`` on the whole tensor, so the results are equal.
    Input is held from the current batch's first chunk on only.
    """
    if device is None:  # where the model lives (CPU for a model without tensors)
        tensor = next(iter(list(model.parameters()) + list(model.buffers())), None)
        device = tensor.device if tensor is not None else torch.device("cpu")
    device = torch.device(device)
    window = _Window(blocks)
    if total <= segment:  # one pass, no cross-fade, as iter_apply
        yield 0, model(window.get(0, total).unsqueeze(0).to(device))[0].float().cpu()
        return
    starts = chunk_starts(total, segment, overlap)
    weight = chunk_weight(segment)
    base = 0  # first sample not yet emitted
    acc: Optional[torch.Tensor] = None  # (sources, channels, samples from base)
    wsum = torch.zeros(0)
    for b in range(0, len(starts), batch_size):
        batch_starts = starts[b:b + batch_size]
        window.drop(batch_starts[0])
        chunks = []
        for s in batch_starts:
            chunk = window.get(s, min(s + segment, total))
            if chunk.shape[-1] < segment:  # last chunk: zero-pad so the batch stacks
                chunk = nn.functional.pad(chunk, (0, segment - chunk.shape[-1]))
            chunks.append(chunk)
        est = model(torch.stack(chunks).to(device)).float().cpu()  # (n, sources, channels, segment)
        for i, s in enumerate(batch_starts):
            length = min(segment, total - s)
            end = s + length - base  # buffer index one past this chunk
            if acc is None:
                acc = est.new_zeros(est.shape[1], est.shape[2], end)
                wsum = est.new_zeros(end)
            if end > acc.shape[-1]:  # grow the buffer to hold this chunk
                acc = nn.functional.pad(acc, (0, end - acc.shape[-1]))
                wsum = nn.functional.pad(wsum, (0, end - wsum.shape[-1]))
            lo = s - base
            acc[..., lo:end] += est[i, ..., :length] * weight[:length]
            wsum[lo:end] += weight[:length]
            # samples before the next chunk's start get no more contributions
            nxt = starts[b + i + 1] if b + i + 1 < len(starts) else total
            done = nxt - base
            if done > 0:
                yield base, acc[..., :done] / wsum[:done]
                acc, wsum, base = acc[..., done:].clone(), wsum[done:].clone(), nxt


def average_passes(passes: List[Iterable[torch.Tensor]]) -> Iterator[torch.Tensor]:
    """The running mean of equally long block streams, emitted as far as all of them reach.

    Sums in the order ``0 + p0 + p1 + ...`` and then divides, as the in-memory shift loop."""
    its = [iter(p) for p in passes]
    pending: List[Optional[torch.Tensor]] = [None] * len(its)
    while True:
        for i, it in enumerate(its):
            while pending[i] is None or pending[i].shape[-1] == 0:
                pending[i] = next(it, None)
                if pending[i] is None:
                    return
        k = min(p.shape[-1] for p in pending)
        out = 0
        for i, p in enumerate(pending):
            out = out + p[..., :k]
            pending[i] = p[..., k:]
        yield out / len(its)


def crop_stream(blocks: Iterable[torch.Tensor], skip: int, length: int) -> Iterator[torch.Tensor]:
    """Samples ``[skip, skip + length)`` of a stream."""
    pos = 0
    for block in blocks:
        n = block.shape[-1]
        lo, hi = max(skip - pos, 0), min(skip + length - pos, n)
        if hi > lo:
            yield block[..., lo:hi]
        pos += n
        if pos >= skip + length:
            return


def chunk_weight(length: int) -> torch.Tensor:
    """Triangular cross-fade window of ``length`` strictly positive weights, peak 1."""
    half = length // 2
    ramp = torch.cat([torch.arange(1, half + 1), torch.arange(length - half, 0, -1)]).float()
    return ramp / ramp.max()


def chunk_starts(total: int, segment: int, overlap: float) -> list:
    """Start samples of the chunks covering ``total`` samples; the last chunk ends at or after it."""
    if segment <= 0:
        raise ValueError(f"segment must be positive, got {segment} samples")
    if not 0 <= overlap < 1:
        raise ValueError(f"overlap must be in [0, 1), got {overlap}")
    stride = max(1, int(round(segment * (1 - overlap))))
    starts = [0]
    while starts[-1] + segment < total:
        starts.append(starts[-1] + stride)
    return starts


@torch.inference_mode()
def iter_apply(model: nn.Module, mixture: torch.Tensor, segment: int, overlap: float = 0.25, batch_size: int = 1,
               device: Optional[torch.device] = None) -> Iterator[Tuple[int, torch.Tensor]]:
    """Separate ``mixture (channels, samples)`` chunk by chunk.

    Yields ``(start, block)`` with ``block (sources, channels, n)`` float32 on the CPU;
    consecutive blocks tile ``[0, samples)`` exactly.  ``segment`` is in samples;
    ``batch_size`` chunks go through the model at once.
    """
    if mixture.dim() != 2:
        raise ValueError(f"mixture must be (channels, samples), got shape {tuple(mixture.shape)}")
    # the one overlap-add loop, fed the whole tensor as one block
    yield from stream_apply(model, [mixture], mixture.shape[-1], segment, overlap, batch_size, device)


def apply_model(model: nn.Module, mixture: torch.Tensor, segment: int, overlap: float = 0.25, batch_size: int = 1,
                device: Optional[torch.device] = None) -> torch.Tensor:
    """Separate ``mixture (channels, samples)`` or ``(batch, channels, samples)``.

    Returns ``(sources, channels, samples)`` or ``(batch, sources, channels, samples)``,
    float32 on the CPU, built from :func:`iter_apply`.
    """
    if mixture.dim() == 3:
        return torch.stack([apply_model(model, m, segment, overlap, batch_size, device) for m in mixture])
    out = None
    for start, block in iter_apply(model, mixture, segment, overlap, batch_size, device):
        if out is None:
            out = block.new_zeros(*block.shape[:-1], mixture.shape[-1])
        out[..., start:start + block.shape[-1]] = block
    return out
