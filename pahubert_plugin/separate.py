"""Separate audio files with a fine-tuned checkpoint: the ``Separator`` API and ``pahubert-separate``.

Python::

    from pahubert_plugin.separate import Separator
    sep = Separator.from_checkpoint("exp/musdb/checkpoint_best.pt")
    stems = sep.separate(waveform, sample_rate)   # {"drums": (channels, samples), ...}

Command line::

    python -m pahubert_plugin.separate CHECKPOINT song.mp3 other.flac -o separated/

writes ``separated/<file name>/<source>.wav`` at the input's sample rate, length and
channel count.  Any format soundfile reads works (wav, flac, ogg, mp3), at any sample rate
(resampled to the model's rate and back), mono or stereo.  A file that cannot be read is
reported by name and skipped; the others are still separated and the exit status is 1.
"""
import argparse
import logging
import os
import sys
from typing import Dict, List, Optional, Sequence, Union

import numpy as np
import torch
import torchaudio.functional as AF
from tqdm import tqdm

from .apply import iter_apply
from .data.audio import AudioError, audio_info, read_audio, write_audio

logger = logging.getLogger("pahubert_plugin.separate")


def load_separation_model(path: str, device: Union[str, torch.device] = "cpu"):
    """Load a fine-tuned separation checkpoint (any model of the ``music_separation`` contract).

    Returns ``(model, cfg)``; the model is in eval mode on ``device``.
    """
    import pahubert_plugin  # noqa: F401  (registers our components, allow-lists checkpoint classes)
    from fairseq import checkpoint_utils

    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    models, cfg, _task = checkpoint_utils.load_model_ensemble_and_task([path])
    model = models[0]
    missing = [a for a in ("sources", "sample_rate", "audio_channels") if not hasattr(model, a)]
    if missing:
        raise ValueError(f"{path}: model {type(model).__name__} (task {cfg.task._name}) is not a separation "
                         f"model (no {missing}); expected a checkpoint fine-tuned with task=music_separation")
    return model.to(device).eval(), cfg


class Separator:
    """Chunked separation of whole recordings with any separation model.

    ``segment`` (seconds) and ``overlap`` (fraction) control the overlap-add chunks;
    memory for activations is bounded by ``batch_size`` chunks of ``segment`` seconds.
    """

    def __init__(self, model: torch.nn.Module, segment: float, overlap: float = 0.25, batch_size: int = 1,
                 device: Union[str, torch.device] = "cpu"):
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.sources: List[str] = list(model.sources)
        self.sample_rate: int = int(model.sample_rate)
        self.audio_channels: int = int(model.audio_channels)
        if segment <= 0:
            raise ValueError(f"segment must be > 0 seconds, got {segment}")
        self.segment, self.overlap, self.batch_size = float(segment), float(overlap), int(batch_size)

    @classmethod
    def from_checkpoint(cls, path: str, device: Union[str, torch.device] = "cpu", segment: Optional[float] = None,
                        overlap: float = 0.25, batch_size: int = 1) -> "Separator":
        """``segment`` defaults to the task's validation chunk (``valid_segment`` or ``segment``)."""
        model, cfg = load_separation_model(path, device)
        if segment is None:
            segment = float(cfg.task.get("valid_segment", 0) or cfg.task.get("segment", 10.0))
        return cls(model, segment, overlap, batch_size, device)

    def _to_model_channels(self, wav: torch.Tensor) -> torch.Tensor:
        have, want = wav.shape[0], self.audio_channels
        if have == want:
            return wav
        if have == 1:
            return wav.expand(want, -1)
        if want == 1:
            return wav.mean(0, keepdim=True)
        raise ValueError(f"input has {have} channels; the model takes {want} (or mono)")

    def separate(self, waveform: Union[torch.Tensor, np.ndarray], sample_rate: int,
                 progress: bool = False) -> Dict[str, torch.Tensor]:
        """``waveform (channels, samples)`` or ``(samples,)`` at ``sample_rate`` ->
        ``{source: (channels, samples)}`` with the input's rate, length and channel count."""
        wav = torch.as_tensor(np.asarray(waveform) if not isinstance(waveform, torch.Tensor) else waveform)
        wav = wav.float()
        squeeze = wav.dim() == 1
        if squeeze:
            wav = wav.unsqueeze(0)
        if wav.dim() != 2 or wav.shape[-1] == 0:
            raise ValueError(f"waveform must be (channels, samples) with samples > 0, got {tuple(wav.shape)}")
        in_channels, length = wav.shape
        x = self._to_model_channels(wav)
        if sample_rate != self.sample_rate:
            x = AF.resample(x, sample_rate, self.sample_rate)
        segment = int(round(self.segment * self.sample_rate))
        out = torch.zeros(len(self.sources), self.audio_channels, x.shape[-1])
        bar = tqdm(total=x.shape[-1] / self.sample_rate, unit="s", disable=not progress, leave=False,
                   bar_format="{l_bar}{bar}| {n:.1f}/{total:.1f} s")
        for start, block in iter_apply(self.model, x, segment, self.overlap, self.batch_size, self.device):
            out[..., start:start + block.shape[-1]] = block
            bar.update(block.shape[-1] / self.sample_rate)
        bar.close()
        if sample_rate != self.sample_rate:
            out = AF.resample(out, self.sample_rate, sample_rate)
        out = out[..., :length]
        if out.shape[-1] < length:  # resampler rounding: a sample or two
            out = torch.nn.functional.pad(out, (0, length - out.shape[-1]))
        if in_channels == 1 and self.audio_channels > 1:  # mono in: downmix the estimates
            out = out.mean(dim=1, keepdim=True)
        elif self.audio_channels == 1 and in_channels > 1:  # mono model: same estimate on every channel
            out = out.expand(-1, in_channels, -1)
        result = {s: out[i].contiguous() for i, s in enumerate(self.sources)}
        return {s: v[0] for s, v in result.items()} if squeeze else result


def output_names(paths: Sequence[str]) -> List[str]:
    """Folder name per input (the file name without extension); a ValueError on clashes."""
    names = [os.path.splitext(os.path.basename(p))[0] for p in paths]
    seen = {}
    for p, n in zip(paths, names):
        if n in seen:
            raise ValueError(f"{seen[n]} and {p} would both be written to <outdir>/{n}/; "
                             f"separate them in two runs or rename one")
        seen[n] = p
    return names


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="pahubert-separate",
        description="Separate audio files into the sources of a fine-tuned checkpoint "
                    "(e.g. drums, bass, other, vocals). Writes OUTDIR/<name>/<source>.wav at the "
                    "input's sample rate, length and channel count.")
    p.add_argument("checkpoint", help="fine-tuned checkpoint (task=music_separation)")
    p.add_argument("audio", nargs="+", help="input files: any format soundfile reads (wav, flac, ogg, mp3)")
    p.add_argument("-o", "--out", required=True, help="output folder")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="device (default cpu)")
    p.add_argument("--segment", type=float, default=None,
                   help="chunk length in seconds (default: the checkpoint's validation chunk)")
    p.add_argument("--overlap", type=float, default=0.25, help="overlap between chunks, a fraction (default 0.25)")
    p.add_argument("--batch-size", type=int, default=1, help="chunks per forward pass (default 1)")
    p.add_argument("--float", dest="float32", action="store_true",
                   help="write 32-bit float wav (default 16-bit PCM, clipped to [-1, 1])")
    return p


def main(argv: Optional[List[str]] = None) -> int:
    args = get_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.device == "cuda" and not torch.cuda.is_available():
        logger.error("--device cuda requested but CUDA is not available")
        return 2
    try:
        names = output_names(args.audio)
        sep = Separator.from_checkpoint(args.checkpoint, args.device, args.segment, args.overlap, args.batch_size)
    except (ValueError, FileNotFoundError) as e:
        logger.error(str(e))
        return 2
    failed = []
    for path, name in tqdm(list(zip(args.audio, names)), desc="separating", unit="file"):
        try:
            info = audio_info(path)
            wav, sr = read_audio(path, info=info)
            stems = sep.separate(wav, sr, progress=True)
        except AudioError as e:
            logger.error(f"skipping {path}: {e.reason}")
            failed.append(path)
            continue
        except ValueError as e:  # e.g. more channels than the model takes
            logger.error(f"skipping {path}: {e}")
            failed.append(path)
            continue
        for src, est in stems.items():
            if not args.float32:
                est = est.clamp(-1.0, 1.0)
            write_audio(os.path.join(args.out, name, f"{src}.wav"), est, sr,
                        subtype="FLOAT" if args.float32 else "PCM_16")
    done = len(args.audio) - len(failed)
    logger.info(f"separated {done} of {len(args.audio)} files into {args.out}")
    if failed:
        logger.error(f"{len(failed)} file(s) could not be separated: {', '.join(failed)}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
