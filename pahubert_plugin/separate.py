"""Separate audio files with a fine-tuned checkpoint: the ``Separator`` API and ``pahubert-separate``.

Python::

    from pahubert_plugin.separate import Separator, save_stems
    sep = Separator.from_checkpoint("exp/musdb/checkpoint_best.pt", shifts=2)
    stems = sep.separate(waveform, sample_rate)   # {"drums": (channels, samples), ...}
    stems, sr = sep.separate_file("song.flac", two_stems="vocals")  # {"vocals": ..., "no_vocals": ...}
    save_stems(stems, sr, "separated", track="song", fmt="flac", bits=24)

Command line (the options of ``demucs``)::

    pahubert-separate CHECKPOINT song.mp3 other.flac -o separated/ [--two-stems vocals]
        [--mp3 | --flac] [--int24 | --float32] [--clip-mode rescale|clamp|none] [--shifts N]
        [--filename "{track}/{stem}.{ext}"] [-d cuda] [-j 2]

writes ``separated/<file name>/<source>.wav`` at the input's sample rate, length and
channel count.  Any format soundfile reads works (wav, flac, ogg, mp3), at any sample rate
(resampled to the model's rate and back), mono or stereo.  A file that cannot be read or
written is reported by name and skipped; the others are still separated and the exit status is 1.
The command line streams (:meth:`Separator.separate_to_files`, :mod:`pahubert_plugin.stream`):
memory stays flat in track length, and the files equal those of ``separate_file`` + ``save_stems``.
Heavy imports (torch, fairseq) happen after the arguments are checked, so ``--help`` is instant.
"""
import argparse
import concurrent.futures
import logging
import os
import random
import sys
import threading
from typing import Dict, List, Optional, Sequence, Tuple

logger = logging.getLogger("pahubert_plugin.separate")

FORMATS = {"wav": "WAV", "flac": "FLAC", "mp3": "MP3"}
CLIP_MODES = ("rescale", "clamp", "none")
DEFAULT_FILENAME = "{track}/{stem}.{ext}"
MAX_SHIFT_SECONDS = 0.5  # demucs' random time shift range


def load_separation_model(path: str, device="cpu"):
    """Load a fine-tuned separation checkpoint (any model of the ``music_separation`` contract).

    Returns ``(model, cfg)``; the model is in eval mode on ``device``.
    """
    import pahubert_plugin

    pahubert_plugin.register()  # our components and the checkpoint allow-list
    from fairseq import checkpoint_utils

    from .checkpoint import mapped_loads

    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        with mapped_loads():  # the optimizer state in the file is never read into memory
            state = checkpoint_utils.load_checkpoint_to_cpu(path)
        model, cfg = build_from_state(state)
    except (KeyError, AttributeError, TypeError) as e:  # a torch file, but not a fairseq checkpoint
        raise ValueError(f"{path}: not a fairseq checkpoint ({type(e).__name__}: {e}); expected "
                         f"checkpoint_best.pt of a music_separation fine-tuning run") from None
    del state  # the model's tensors keep what they use of the mapping; the rest is let go
    missing = [a for a in ("sources", "sample_rate", "audio_channels") if not hasattr(model, a)]
    if missing:
        raise ValueError(f"{path}: model {type(model).__name__} (task {cfg.task._name}) is not a separation "
                         f"model (no {missing}); expected a checkpoint fine-tuned with task=music_separation")
    return model.to(device).eval(), cfg


def build_from_state(state: dict):
    """``(model, cfg)`` from a fairseq checkpoint state, as ``load_model_ensemble_and_task`` builds it
    (task from ``cfg.task``, model from ``cfg.model``, fairseq's state-dict upgrade and pruning), except
    that the weights are *assigned*, not copied: the parameters become the checkpoint's own tensors.

    With ``state`` read by :func:`~pahubert_plugin.checkpoint.mapped_loads` those tensors are views of the
    mapped file, so the weights are resident once (as file pages, touched when used), not twice: fairseq's
    ``load_state_dict`` copies them into the freshly initialised model, and for a moment (up to the end of
    loading) both the model's copy and the file pages it was read from count in the process's RSS; for
    ``demucs_v2`` base (1013 MiB of weights) that was the peak of a whole separation (README, "Speed and
    memory"). A tensor whose dtype differs from the model's (a half-precision checkpoint) is converted, as
    a copy would."""
    import gc
    import inspect

    import torch
    from fairseq import checkpoint_utils, tasks
    from fairseq.dataclass.utils import convert_namespace_to_omegaconf

    if state.get("args") is not None:
        cfg = convert_namespace_to_omegaconf(state["args"])
    elif state.get("cfg") is not None:
        cfg = state["cfg"]
    else:
        raise KeyError(f"neither args nor cfg in the checkpoint (keys {sorted(state)})")
    task = tasks.setup_task(cfg.task, from_checkpoint=True)
    if "task_state" in state:
        task.load_state_dict(state["task_state"])
    if "from_checkpoint" in inspect.getfullargspec(task.build_model).args:
        model = task.build_model(cfg.model, from_checkpoint=True)
    else:
        model = task.build_model(cfg.model)
    history = state.get("optimizer_history") or []
    if history and "num_updates" in history[-1]:
        model.set_num_updates(history[-1]["num_updates"])
    weights = state["model"]
    model.upgrade_state_dict(weights)
    weights = checkpoint_utils.prune_state_dict(weights, cfg.model)
    own = model.state_dict(keep_vars=True)
    weights = {k: (v.to(own[k].dtype) if k in own and torch.is_tensor(v) and v.dtype != own[k].dtype else v)
               for k, v in weights.items()}
    torch.nn.Module.load_state_dict(model, weights, strict=True, assign=True)
    del own, weights
    gc.collect()  # the replaced random-init tensors can sit in reference cycles of the built model
    return model, cfg


def check_options(segment: Optional[float] = None, overlap: float = 0.25, batch_size: int = 1,
                  shifts: int = 0, tile: float = 0.0) -> None:
    """ValueError naming the option when a chunking option is out of range."""
    if not (tile >= 0 and tile < float("inf")):
        raise ValueError(f"tile must be >= 0 seconds (0: whole chunks), got {tile}")
    if segment is not None and not segment > 0:
        raise ValueError(f"segment must be > 0 seconds, got {segment}")
    if not 0 <= overlap < 1:
        raise ValueError(f"overlap must be in [0, 1) (a fraction of the segment), got {overlap}")
    if batch_size < 1:
        raise ValueError(f"batch size must be >= 1 chunk, got {batch_size}")
    if shifts < 0:
        raise ValueError(f"shifts must be >= 0 (0 = no random shift), got {shifts}")


def split_two_stems(stems: Dict, stem: str) -> Dict:
    """``{stem, no_stem}``: the chosen source and the sum of all the others (demucs ``--two-stems``)."""
    if stem not in stems:
        raise ValueError(f"--two-stems {stem}: the model's sources are {', '.join(stems)}")
    rest = [v for k, v in stems.items() if k != stem]
    return {stem: stems[stem], f"no_{stem}": sum(rest[1:], rest[0].clone())}


class Separator:
    """Chunked separation of whole recordings with any separation model.

    ``segment`` (seconds) and ``overlap`` (fraction in [0, 1)) control the overlap-add chunks;
    memory for activations is bounded by ``batch_size`` chunks of ``segment`` seconds.
    ``shifts`` > 0 averages that many passes over the input delayed by a random 0-0.5 s
    (demucs' shift trick; the offsets come from ``seed``, so results are reproducible).
    ``tile`` > 0 (seconds; ``pahubert_resunet`` only) decodes each chunk in time tiles: the same estimates
    in the memory of a tile instead of a chunk, slower (:func:`~pahubert_plugin.apply.set_decode_tile`).
    """

    def __init__(self, model, segment: float, overlap: float = 0.25, batch_size: int = 1,
                 device="cpu", shifts: int = 0, seed: int = 0, precision: str = "fp32", tile: float = 0.0):
        import torch

        from .apply import Autocast, return_freed_memory, set_decode_tile, warn_if_emulated

        check_options(segment, overlap, batch_size, shifts, tile)
        self.device = torch.device(device)
        warn_if_emulated(precision, self.device)
        self.model = model.to(self.device).eval()
        if tile > 0:  # the memory of a tile: what a tile frees must leave the process too
            set_decode_tile(self.model, tile)
            return_freed_memory()
        self.tile = float(tile)
        self.precision = precision
        self._runner = Autocast(self.model, precision) if precision != "fp32" else self.model
        self.sources: List[str] = list(model.sources)
        self.sample_rate: int = int(model.sample_rate)
        self.audio_channels: int = int(model.audio_channels)
        self.segment, self.overlap, self.batch_size = float(segment), float(overlap), int(batch_size)
        self.shifts, self.seed = int(shifts), int(seed)

    @classmethod
    def from_checkpoint(cls, path: str, device="cpu", segment: Optional[float] = None,
                        overlap: float = 0.25, batch_size: int = 1, shifts: int = 0,
                        precision: str = "fp32", optimize: bool = True, tile: float = 0.0) -> "Separator":
        """``segment`` defaults to the task's validation chunk (``valid_segment`` or ``segment``).
        ``optimize``: :func:`~pahubert_plugin.apply.optimize_for_inference` (BatchNorm folded into
        convolutions, channels_last; same estimates up to float rounding). ``precision="bf16"``:
        autocast (faster on CPUs with bfloat16 units, estimates about 1e-2 of the peak off)."""
        from .apply import check_precision, drop_file_pages, optimize_for_inference

        check_options(segment, overlap, batch_size, shifts, tile)
        check_precision(precision)  # before the model is loaded
        model, cfg = load_separation_model(path, device)
        if optimize:
            model = optimize_for_inference(model)
            drop_file_pages(path)  # the file pages of the weights it replaced (README: Speed and memory)
        if segment is None:
            segment = float(cfg.task.get("valid_segment", 0) or cfg.task.get("segment", 10.0))
        return cls(model, segment, overlap, batch_size, device, shifts, precision=precision, tile=tile)

    def _to_model_channels(self, wav):
        from .data.audio import apply_channel_policy  # the one channel rule

        return apply_channel_policy(wav, self.audio_channels, "input")

    def _to_input_channels(self, out, in_channels: int):
        """``(sources, model channels, n)`` -> ``(sources, in_channels, n)``."""
        if in_channels == 1 and self.audio_channels > 1:  # mono in: downmix the estimates
            return out.mean(dim=1, keepdim=True)
        if self.audio_channels == 1 and in_channels > 1:  # mono model: same estimate on every channel
            return out.expand(-1, in_channels, -1)
        return out

    def _bar(self, samples: int, progress: bool, desc: Optional[str], position: Optional[int]):
        """A tqdm bar counting seconds of model-rate audio, all shifted passes included."""
        from tqdm import tqdm

        return tqdm(total=max(1, self.shifts) * samples / self.sample_rate, unit="s", disable=not progress,
                    desc=desc, position=position, leave=position is None,
                    bar_format="{l_bar}{bar}| {n:.1f}/{total:.1f} s")

    def _apply(self, x, bar, scale: float = 1.0):
        """``x (channels, samples)`` at the model's rate -> ``(sources, channels, samples)``;
        ``bar`` advances by ``scale`` seconds per second of ``x``."""
        import torch

        from .apply import iter_apply

        segment = int(round(self.segment * self.sample_rate))
        out = torch.zeros(len(self.sources), self.audio_channels, x.shape[-1])
        for start, block in iter_apply(self._runner, x, segment, self.overlap, self.batch_size, self.device):
            out[..., start:start + block.shape[-1]] = block
            step = scale * block.shape[-1] / self.sample_rate
            bar.update(min(step, bar.total - bar.n))  # past its total tqdm drops the total
        return out

    def _apply_shifted(self, x, bar):
        """Average of ``shifts`` passes over ``x`` delayed by random offsets (demucs ``apply_model``)."""
        import torch

        if not self.shifts:
            return self._apply(x, bar)
        rng = random.Random(self.seed)
        max_shift = int(MAX_SHIFT_SECONDS * self.sample_rate)
        length = x.shape[-1]
        out = 0
        for _ in range(self.shifts):
            delay = rng.randint(0, max_shift)
            shifted = torch.nn.functional.pad(x, (delay, 0))  # the input starts `delay` samples later
            out = out + self._apply(shifted, bar, length / shifted.shape[-1])[..., delay:delay + length]
        return out / self.shifts

    def separate(self, waveform, sample_rate: int, progress: bool = False, desc: Optional[str] = None,
                 position: Optional[int] = None) -> Dict:
        """``waveform (channels, samples)`` or ``(samples,)`` at ``sample_rate`` ->
        ``{source: (channels, samples)}`` with the input's rate, length and channel count.

        ``progress`` shows a bar (seconds of audio done) named ``desc`` at tqdm ``position``."""
        import numpy as np
        import torch
        import torchaudio.functional as AF

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
        bar = self._bar(x.shape[-1], progress, desc, position)
        out = self._apply_shifted(x, bar)
        bar.close()
        if sample_rate != self.sample_rate:
            out = AF.resample(out, self.sample_rate, sample_rate)
        out = out[..., :length]
        if out.shape[-1] < length:  # resampler rounding: a sample or two
            out = torch.nn.functional.pad(out, (0, length - out.shape[-1]))
        out = self._to_input_channels(out, in_channels)
        result = {s: out[i].contiguous() for i, s in enumerate(self.sources)}
        return {s: v[0] for s, v in result.items()} if squeeze else result

    def separate_file(self, path: str, two_stems: Optional[str] = None, progress: bool = False,
                      position: Optional[int] = None) -> Tuple[Dict, int]:
        """Read ``path`` (any format soundfile decodes) and separate it.

        Returns ``({stem: (channels, samples)}, sample_rate)`` at the file's rate, length and
        channel count; ``two_stems="vocals"`` gives ``{"vocals", "no_vocals"}``.  An unreadable
        file raises :class:`~pahubert_plugin.data.audio.AudioError` (a ValueError) naming it."""
        from .data.audio import audio_info, read_audio

        if two_stems is not None and two_stems not in self.sources:
            raise ValueError(f"two_stems={two_stems!r}: the model's sources are {', '.join(self.sources)}")
        info = audio_info(path)
        wav, sr = read_audio(path, info=info)
        stems = self.separate(wav, sr, progress=progress, desc=os.path.basename(path), position=position)
        return (split_two_stems(stems, two_stems) if two_stems else stems), sr

    def separate_to_files(self, path: str, out_dir: str, track: str, two_stems: Optional[str] = None,
                          filename: str = DEFAULT_FILENAME, fmt: str = "wav", bits: int = 16,
                          as_float: bool = False, clip_mode: str = "rescale", mp3_bitrate: int = 320,
                          trackext: str = "", progress: bool = False, position: Optional[int] = None) -> List[str]:
        """:meth:`separate_file` then :func:`save_stems` (same arguments, same files) in bounded memory.

        The file is read, resampled, separated, resampled back and written block by block, so
        memory does not grow with the track.  Returns the paths written.  A read error raises
        :class:`~pahubert_plugin.data.audio.AudioError`, a write error
        :class:`~pahubert_plugin.stream.StemWriteError` (an OSError); either way no stem of the
        file is left half-written."""
        import torch

        from .data.audio import audio_info
        from .stream import StemWriter, fit_length, read_blocks, resample_stream, resampled_frames

        if two_stems is not None and two_stems not in self.sources:
            raise ValueError(f"two_stems={two_stems!r}: the model's sources are {', '.join(self.sources)}")
        subtype = subtype_for(fmt, bits, as_float)
        level = _mp3_level(mp3_bitrate) if fmt == "mp3" else 0.0
        if fmt == "mp3":
            check_mp3_writer()
        info = audio_info(path)
        self._to_model_channels(torch.zeros(info.channels, 0))  # channel count checked before any work
        rate, length = info.sample_rate, info.num_samples
        total = resampled_frames(length, rate, self.sample_rate)  # model-rate samples
        x = resample_stream((self._to_model_channels(b) for b in read_blocks(info)), rate, self.sample_rate, length)
        bar = self._bar(total, progress, os.path.basename(path), position)
        est = fit_length(resample_stream(self._stream_estimates(x, total, bar), self.sample_rate, rate, total), length)
        names = [two_stems, f"no_{two_stems}"] if two_stems else self.sources
        writers = []
        try:
            for name in names:
                writers.append(StemWriter(stem_path(out_dir, filename, track, name, fmt, trackext), rate,
                                          info.channels, fmt, subtype, clip_mode, level))
            for block in est:
                stems = dict(zip(self.sources, self._to_input_channels(block, info.channels)))
                stems = split_two_stems(stems, two_stems) if two_stems else stems
                for name, writer in zip(names, writers):
                    writer.write(stems[name])
            for writer in writers:
                writer.close()
        except BaseException:
            for writer in writers:
                writer.abort()
            raise
        finally:
            bar.close()
        return [w.path for w in writers]

    def _stream_estimates(self, x, total: int, bar):
        """Model-rate input blocks holding ``total`` samples -> ``(sources, channels, n)`` blocks,
        the ``shifts`` passes averaged as :meth:`_apply_shifted` does."""
        import itertools

        import torch

        from .stream import average_passes, crop_stream, stream_apply

        segment = int(round(self.segment * self.sample_rate))

        def estimates(blocks, samples):
            for _, est in stream_apply(self._runner, blocks, samples, segment, self.overlap, self.batch_size,
                                       self.device):
                yield est

        passes = [estimates(x, total)] if not self.shifts else []
        if self.shifts:  # every pass reads its own copy of the input stream, in lockstep
            rng = random.Random(self.seed)
            max_shift = int(MAX_SHIFT_SECONDS * self.sample_rate)
            for copy in itertools.tee(x, self.shifts):
                delay = rng.randint(0, max_shift)  # the input starts `delay` samples later
                shifted = itertools.chain([torch.zeros(self.audio_channels, delay)], copy)
                passes.append(crop_stream(estimates(shifted, total + delay), delay, total))
        for est in (average_passes(passes) if self.shifts else passes[0]):
            step = max(1, self.shifts) * est.shape[-1] / self.sample_rate
            bar.update(min(step, bar.total - bar.n))
            yield est


def prevent_clip(wav, mode: str = "rescale"):
    """demucs' clip modes: ``rescale`` the whole stem below full scale, ``clamp`` samples, or ``none``."""
    if mode == "rescale":
        from .stream import clip_divisor

        return wav / clip_divisor(float(wav.abs().max()))
    if mode == "clamp":
        return wav.clamp(-0.99, 0.99)
    if mode == "none":
        return wav
    raise ValueError(f"clip mode must be one of {', '.join(CLIP_MODES)}, got {mode!r}")


def subtype_for(fmt: str, bits: int = 16, as_float: bool = False) -> str:
    """soundfile subtype of an output format; a ValueError for combinations it cannot store."""
    if fmt not in FORMATS:
        raise ValueError(f"output format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    if fmt == "mp3":
        if as_float or bits != 16:
            raise ValueError("mp3 output has no bit depth: drop --int24/--float32")
        return "MPEG_LAYER_III"
    if as_float:
        if fmt == "flac":
            raise ValueError("FLAC stores integers only: use --int24 for FLAC, or --float32 with wav")
        return "FLOAT"
    if bits not in (16, 24):
        raise ValueError(f"bits must be 16 or 24, got {bits}")
    return f"PCM_{bits}"


def check_mp3_writer() -> None:
    """A ValueError when the installed libsndfile cannot encode mp3 (it can from 1.1.0)."""
    import soundfile as sf

    if "MP3" not in sf.available_formats():
        raise ValueError(f"--mp3 needs libsndfile >= 1.1.0 with mp3 support; this soundfile uses libsndfile "
                         f"{sf.__libsndfile_version__}. Write --flac or wav and convert, or upgrade soundfile")


def stem_path(out_dir: str, filename: str, track: str, stem: str, ext: str, trackext: str = "") -> str:
    """``out_dir/filename`` with demucs' template fields ``{track} {trackext} {stem} {ext}``."""
    try:
        rel = filename.format(track=track, trackext=trackext, stem=stem, ext=ext)
    except (KeyError, IndexError, ValueError) as e:
        raise ValueError(f"--filename {filename!r}: unknown or bad field ({e}); use {{track}}, {{trackext}}, "
                         f"{{stem}} and {{ext}}, e.g. {DEFAULT_FILENAME!r}") from None
    return os.path.join(out_dir, rel)


def save_stems(stems: Dict, sample_rate: int, out_dir: str, track: str, filename: str = DEFAULT_FILENAME,
               fmt: str = "wav", bits: int = 16, as_float: bool = False, clip_mode: str = "rescale",
               mp3_bitrate: int = 320, trackext: str = "") -> List[str]:
    """Write ``{stem: (channels, samples)}`` as ``out_dir/filename`` (wav/flac/mp3); returns the paths.

    Every stem goes through :func:`prevent_clip` (``clip_mode``) first, as in demucs; mp3 is
    constant bit rate ``mp3_bitrate`` kbit/s (libsndfile's LAME encoder)."""
    import soundfile as sf
    import torch

    from .data.audio import write_audio

    subtype = subtype_for(fmt, bits, as_float)
    if fmt == "mp3":
        check_mp3_writer()
    paths = []
    for stem, wav in stems.items():  # the streaming twin is Separator.separate_to_files
        wav = prevent_clip(torch.as_tensor(wav).float(), clip_mode)
        path = stem_path(out_dir, filename, track, stem, fmt, trackext)
        if fmt == "mp3":
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            data = wav.detach().cpu().numpy().T if wav.dim() > 1 else wav.detach().cpu().numpy()
            with sf.SoundFile(path, "w", sample_rate, data.shape[1] if data.ndim > 1 else 1, subtype=subtype,
                              format="MP3", bitrate_mode="CONSTANT",
                              compression_level=_mp3_level(mp3_bitrate)) as f:
                f.write(data)
        else:
            write_audio(path, wav, sample_rate, subtype=subtype)
        paths.append(path)
    return paths


def _mp3_level(kbps: int) -> float:
    """libsndfile's compression level for a constant mp3 bit rate: 0 = 320 kbit/s ... 1 = 32 kbit/s."""
    if not 32 <= kbps <= 320:
        raise ValueError(f"mp3 bit rate must be 32-320 kbit/s, got {kbps}")
    return min((320 - kbps) / (320 - 32), 0.99)  # libsndfile refuses 1.0; 0.99 is 32 kbit/s too


def output_names(paths: Sequence[str]) -> List[str]:
    """Track name per input (the file name without extension); a ValueError on clashes."""
    names = [os.path.splitext(os.path.basename(p))[0] for p in paths]
    seen = {}
    for p, n in zip(paths, names):
        if n in seen:
            raise ValueError(f"{seen[n]} and {p} would both be written to <outdir>/{n}/; "
                             f"separate them in two runs or rename one")
        seen[n] = p
    return names


def check_out_dir(path: str) -> None:
    """Create the output folder now; a ValueError when it is a file or cannot be written."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise ValueError(f"-o {path}: exists and is not a folder; choose another output folder")
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        raise ValueError(f"-o {path}: cannot create the output folder ({e.strerror or e})") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise ValueError(f"-o {path}: the output folder is not writable; choose another one")


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="pahubert-separate",
        description="Separate audio files into the sources of a fine-tuned checkpoint "
                    "(e.g. drums, bass, other, vocals). Writes OUTDIR/<name>/<source>.wav at the "
                    "input's sample rate, length and channel count. Options follow demucs.")
    p.add_argument("checkpoint", help="fine-tuned checkpoint (task=music_separation)")
    p.add_argument("audio", nargs="+", help="input files: any format soundfile reads (wav, flac, ogg, mp3)")
    p.add_argument("-o", "--out", required=True, help="output folder (created if missing)")
    p.add_argument("--filename", default=DEFAULT_FILENAME,
                   help="output path under OUTDIR, with fields {track} (file name without extension), "
                        "{trackext} (its extension), {stem} and {ext} (default %(default)s)")
    p.add_argument("-d", "--device", default=None,
                   help="torch device, e.g. cpu, cuda, cuda:1 (default: cuda when available, else cpu)")
    p.add_argument("-j", "--jobs", type=int, default=1, help="files separated in parallel (default 1)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads per file (default: torch's thread count divided by --jobs, at least 1; "
                        "every job running torch's full count oversubscribes the cores)")
    p.add_argument("--two-stems", metavar="STEM",
                   help="write only STEM and no_STEM (the sum of the other sources), e.g. --two-stems vocals")
    # model application
    p.add_argument("--segment", type=float, default=None,
                   help="chunk length in seconds (default: the checkpoint's validation chunk)")
    p.add_argument("--overlap", type=float, default=0.25,
                   help="overlap between chunks, a fraction in [0, 1) (default 0.25)")
    p.add_argument("--batch-size", type=int, default=1, help="chunks per forward pass, >= 1 (default 1)")
    p.add_argument("--precision", default="fp32", choices=("fp32", "bf16"),
                   help="fp32 (default) or bf16: autocast to bfloat16, several times faster on CPUs with AMX or "
                        "AVX512-BF16 units (elsewhere emulated and slower: a warning says so), estimates about "
                        "1e-2 of the peak away from fp32 (README: Speed)")
    p.add_argument("--tile", type=float, default=0.0, metavar="SECONDS",
                   help="pahubert_resunet only: decode each chunk in time tiles of about SECONDS, for less memory "
                        "(peak memory follows the tile instead of --segment; the same estimates up to float "
                        "rounding; most of the stem runs twice: slower, README: Speed and memory). "
                        "Default 0: whole chunks")
    p.add_argument("--shifts", type=int, default=0,
                   help="average N passes over the input shifted by a random 0-0.5 s (demucs' shift trick; "
                        "N times slower; default 0 = one unshifted pass)")
    # output format
    fmt = p.add_mutually_exclusive_group()
    fmt.add_argument("--mp3", action="store_const", const="mp3", dest="format", help="write mp3 (default wav)")
    fmt.add_argument("--flac", action="store_const", const="flac", dest="format", help="write FLAC (default wav)")
    depth = p.add_mutually_exclusive_group()
    depth.add_argument("--int24", action="store_true", help="24-bit integer wav/FLAC (default 16-bit)")
    depth.add_argument("--float32", "--float", dest="float32", action="store_true", help="32-bit float wav")
    p.add_argument("--clip-mode", default="rescale", choices=CLIP_MODES,
                   help="avoid clipping: rescale a stem whose peak exceeds full scale, clamp samples, "
                        "or none (default rescale, as demucs)")
    p.add_argument("--mp3-bitrate", type=int, default=320, help="mp3 constant bit rate in kbit/s (default 320)")
    return p


def _check_args(args) -> None:
    """Every check that needs neither the model nor torch, so a bad command fails at once."""
    check_options(args.segment, args.overlap, args.batch_size, args.shifts, args.tile)
    if args.jobs < 1:
        raise ValueError(f"-j/--jobs must be >= 1, got {args.jobs}")
    if args.threads is not None and args.threads < 1:
        raise ValueError(f"--threads must be >= 1, got {args.threads}")
    args.format = args.format or "wav"
    subtype_for(args.format, 24 if args.int24 else 16, args.float32)
    if args.format == "mp3":
        _mp3_level(args.mp3_bitrate)
        check_mp3_writer()
    stem_path(args.out, args.filename, "track", "stem", args.format)
    output_names(args.audio)
    check_out_dir(args.out)


def set_threads(threads: Optional[int], jobs: int) -> int:
    """Set torch's intra-op threads for ``jobs`` files in parallel; returns the previous count.

    Each job is a Python thread with its own OpenMP team of ``torch.get_num_threads()``
    threads, so by default the count is split between the jobs (outputs do not change)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(threads if threads is not None else max(1, before // jobs))
    return before


def _resolve_device(device: Optional[str]) -> str:
    import torch

    if device is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {device} requested but CUDA is not available; use -d cpu")
    try:
        torch.device(device)
    except RuntimeError as e:
        raise ValueError(f"--device {device}: {e}") from None
    return device


def _check_paths(args, names: List[str], stems: List[str]) -> None:
    """A ValueError when --filename would write two stems (or two files) to one path."""
    seen = {}
    for path, track in zip(args.audio, names):
        ext = os.path.splitext(path)[1].lstrip(".")
        for stem in stems:
            out = os.path.normpath(stem_path(args.out, args.filename, track, stem, args.format, ext))
            if out in seen:
                raise ValueError(f"--filename {args.filename!r} writes both {seen[out]} and {path}:{stem} to {out}; "
                                 f"include {{track}} and {{stem}} in it")
            seen[out] = f"{path}:{stem}"


def main(argv: Optional[List[str]] = None) -> int:
    parser = get_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        _check_args(args)
    except ValueError as e:
        parser.error(str(e))
    from .apply import drop_gpu_library_pages, return_freed_memory

    return_freed_memory()  # a long file's chunks must not pile up in the heap
    try:
        device = _resolve_device(args.device)
        names = output_names(args.audio)
        sep = Separator.from_checkpoint(args.checkpoint, device, args.segment, args.overlap, args.batch_size,
                                        args.shifts, precision=args.precision, tile=args.tile)
        if args.two_stems is not None and args.two_stems not in sep.sources:
            raise ValueError(f"--two-stems {args.two_stems}: the checkpoint's sources are {', '.join(sep.sources)}")
        _check_paths(args, names, [args.two_stems, f"no_{args.two_stems}"] if args.two_stems else sep.sources)
    except (ValueError, FileNotFoundError) as e:
        logger.error(str(e))
        return 2
    import torch

    if sep.device.type == "cpu":  # the CUDA libraries' pages in a CPU run: about 270 MiB of resident memory
        logger.debug("dropped %.0f MiB of GPU library pages", drop_gpu_library_pages())
    threads_before = set_threads(args.threads, args.jobs)
    try:
        return _separate_all(args, sep, names)
    finally:
        torch.set_num_threads(threads_before)  # main() may run again in this process (tests, notebooks)


def _separate_all(args, sep: Separator, names: List[str]) -> int:
    """Stream every file of ``args.audio`` to its stems, ``args.jobs`` at a time; the exit status."""
    from .data.audio import AudioError
    from .stream import StemWriteError

    slots = list(range(args.jobs))  # tqdm bar positions, one per running file
    lock = threading.Lock()

    def one(path: str, track: str) -> Optional[str]:
        with lock:
            slot = slots.pop(0)
        try:
            sep.separate_to_files(path, args.out, track, args.two_stems, args.filename, args.format,
                                  24 if args.int24 else 16, args.float32, args.clip_mode, args.mp3_bitrate,
                                  trackext=os.path.splitext(path)[1].lstrip("."), progress=True,
                                  position=slot if args.jobs > 1 else None)
        except AudioError as e:
            return f"skipping {path}: {e.reason}"
        except ValueError as e:  # e.g. more channels than the model takes
            return f"skipping {path}: {e}"
        except StemWriteError as e:
            return f"could not write the stems of {path}: {e}"
        finally:
            with lock:
                slots.append(slot)
        return None

    with concurrent.futures.ThreadPoolExecutor(max_workers=args.jobs) as pool:
        errors = list(pool.map(one, args.audio, names))
    failed = [p for p, e in zip(args.audio, errors) if e]
    for e in filter(None, errors):
        logger.error(e)
    logger.info(f"separated {len(args.audio) - len(failed)} of {len(args.audio)} files into {args.out}")
    if failed:
        logger.error(f"{len(failed)} file(s) could not be separated: {', '.join(failed)}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
