"""Separation in bounded memory: read, resample, separate, resample back and write block by block.

Each stage is a generator of ``(channels, samples)`` (or ``(sources, channels, samples)``)
blocks, so a track of any length holds about one model segment of audio in memory:

* :func:`read_blocks` decodes a file with soundfile a block at a time;
* :class:`StreamResampler` resamples a stream so that the concatenated output equals
  ``torchaudio.functional.resample`` of the whole signal (same sinc kernel, enough context);
* :func:`stream_apply` is :func:`pahubert_plugin.apply.iter_apply` fed by a stream instead
  of a whole tensor (same chunks, batches, weights and order of operations);
* :func:`average_passes` averages demucs-style shifted passes in lockstep;
* :class:`StemWriter` writes a stem in chunks; ``clip_mode="rescale"`` needs the whole
  stem's peak first, so it spools float32 to a temporary file and rescales on a second pass.

Every file ``pahubert-separate`` accepts is decoded by soundfile (the rule of
:mod:`pahubert_plugin.data.audio`), so reading always streams; arrays handed to
:meth:`Separator.separate <pahubert_plugin.separate.Separator.separate>` are already in
memory and take the in-memory path.
"""
import math
import os
import tempfile
from typing import Iterable, Iterator, List, Optional, Tuple

import numpy as np
import soundfile as sf
import torch
import torchaudio.functional as AF
from torch import nn

from .apply import chunk_starts, chunk_weight
from .data.audio import _SFC_SET_ADD_PEAK_CHUNK, MP3_SLACK, AudioError, AudioInfo

READ_SAMPLES = 1 << 16  # samples (per channel) decoded per soundfile read
SPOOL_FRAMES = 1 << 16  # frames per write when rescaling a spooled stem
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
    """:func:`~pahubert_plugin.apply.iter_apply` on the concatenation of ``blocks``.

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


class StemWriteError(OSError):
    """A stem could not be written (the reason is in the message)."""


def clip_divisor(peak: float) -> float:
    """What demucs' ``rescale`` clip mode divides a stem whose peak is ``peak`` by."""
    return max(1.01 * peak, 1.0)


class StemWriter:
    """Write one stem block by block to ``path`` (wav/flac/mp3, a soundfile ``subtype``).

    The file appears under its name only when :meth:`close` succeeds (it is written as a
    hidden ``.part`` file first); :meth:`abort` removes what was written.  ``clip_mode`` is as
    :func:`pahubert_plugin.separate.prevent_clip`; ``rescale`` spools float32 to a temporary
    file next to the output, then writes the rescaled stem on close.
    """

    def __init__(self, path: str, sample_rate: int, channels: int, fmt: str, subtype: str,
                 clip_mode: str = "rescale", mp3_level: float = 0.0):
        from .separate import CLIP_MODES, FORMATS

        if clip_mode not in CLIP_MODES:
            raise ValueError(f"clip mode must be one of {', '.join(CLIP_MODES)}, got {clip_mode!r}")
        self.path, self.clip_mode, self.channels = path, clip_mode, channels
        self.peak = 0.0
        folder = os.path.dirname(os.path.abspath(path))
        self.part = os.path.join(folder, f".{os.path.basename(path)}.part")
        self.file = self.spool = None
        try:
            os.makedirs(folder, exist_ok=True)
            if os.path.isdir(path):
                raise IsADirectoryError(f"{path} is a folder")
            extra = ({"bitrate_mode": "CONSTANT", "compression_level": mp3_level} if fmt == "mp3" else {})
            self.file = sf.SoundFile(self.part, "w", sample_rate, channels, subtype=subtype,
                                     format=FORMATS[fmt], **extra)
            if subtype in ("FLOAT", "DOUBLE"):  # no PEAK chunk: equal audio gives equal bytes (write_audio)
                from soundfile import _ffi, _snd

                _snd.sf_command(self.file._file, _SFC_SET_ADD_PEAK_CHUNK, _ffi.NULL, 0)
            if clip_mode == "rescale":
                self.spool = tempfile.TemporaryFile(dir=folder, prefix=".pahubert-spool-")
        except (OSError, RuntimeError) as e:
            self.abort()
            raise StemWriteError(f"{path}: {e}") from None

    def write(self, block: torch.Tensor) -> None:
        """``block (channels, n)`` float audio, before clip handling."""
        block = block.float()
        try:
            if self.clip_mode == "rescale":
                if block.numel():
                    self.peak = max(self.peak, float(block.abs().max()))
                self.spool.write(np.ascontiguousarray(block.numpy().T).tobytes())
            else:
                self.file.write(np.ascontiguousarray(_clip(block, self.clip_mode).numpy().T))
        except (OSError, RuntimeError) as e:
            raise StemWriteError(f"{self.path}: {e}") from None

    def close(self) -> None:
        try:
            if self.spool is not None:
                divisor = clip_divisor(self.peak)
                self.spool.seek(0)
                while True:
                    raw = self.spool.read(SPOOL_FRAMES * self.channels * 4)
                    if not raw:
                        break
                    data = np.frombuffer(raw, dtype=np.float32).reshape(-1, self.channels)
                    block = torch.from_numpy(data.copy()) / divisor  # the in-memory path's division
                    self.file.write(block.numpy())
                self.spool.close()
                self.spool = None
            self.file.close()
            os.replace(self.part, self.path)
        except (OSError, RuntimeError) as e:
            self.abort()
            raise StemWriteError(f"{self.path}: {e}") from None

    def abort(self) -> None:
        for f in (self.spool, self.file):
            if f is not None:
                try:
                    f.close()
                except (OSError, RuntimeError):
                    pass
        self.spool = self.file = None
        if os.path.exists(self.part):
            os.remove(self.part)


def _clip(block: torch.Tensor, mode: str) -> torch.Tensor:
    return block.clamp(-0.99, 0.99) if mode == "clamp" else block
