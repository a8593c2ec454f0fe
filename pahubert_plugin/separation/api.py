"""The ``Separator`` API: a fine-tuned checkpoint as a separator of whole recordings (as demucs' ``api.py``).

Python::

    from pahubert_plugin.separation import Separator, save_stems
    sep = Separator.from_checkpoint("exp/musdb/checkpoint_best.pt", shifts=2)
    stems = sep.separate(waveform, sample_rate)   # {"drums": (channels, samples), ...}
    stems, sr = sep.separate_file("song.flac", two_stems="vocals")  # {"vocals": ..., "no_vocals": ...}
    save_stems(stems, sr, "separated", track="song", fmt="flac", bits=24)

Any format soundfile reads works (wav, flac, ogg, mp3), at any sample rate (resampled to the
model's rate and back), mono or stereo.  :meth:`Separator.separate_to_files` streams
(:mod:`pahubert_plugin.separation.overlap`): memory stays flat in track length, and the files
equal those of ``separate_file`` + ``save_stems``.  torch and fairseq are imported when first
used, so the command line (:mod:`pahubert_plugin.separate`) answers ``--help`` at once.
"""
import os
import random
from typing import Dict, List, Optional, Tuple

from .writing import DEFAULT_FILENAME, StemWriter, _mp3_level, check_mp3_writer, stem_path, subtype_for

MAX_SHIFT_SECONDS = 0.5  # demucs' random time shift range
MAX_SHIFTS = 20  # streamed passes run in lockstep, each holding its own chunk state: memory grows with shifts
MAX_OVERLAP = 0.99  # the model runs 1 / (1 - overlap) times per segment of audio
WARN_OVERLAP = 0.9


def load_separation_model(path: str, device="cpu"):
    """Load a fine-tuned separation checkpoint (any model of the ``music_separation`` contract).

    Returns ``(model, cfg)``; the model is in eval mode on ``device``.
    """
    from ..registry import register

    register()  # our components and the checkpoint allow-list
    from fairseq import checkpoint_utils

    from ..checkpoint import mapped_loads

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
    ``demucs_v2`` base (1013 MiB of weights) that was the peak of a whole separation (docs/PERFORMANCE.md). A tensor whose dtype differs from the model's (a half-precision checkpoint) is converted, as
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
    if not 0 <= overlap <= MAX_OVERLAP:
        raise ValueError(f"overlap must be in [0, {MAX_OVERLAP}] (a fraction of the segment; the model runs "
                         f"1 / (1 - overlap) times per segment of audio), got {overlap}")
    if batch_size < 1:
        raise ValueError(f"batch size must be >= 1 chunk, got {batch_size}")
    if shifts < 0:
        raise ValueError(f"shifts must be >= 0 (0 = no random shift), got {shifts}")
    if shifts > MAX_SHIFTS:
        raise ValueError(f"shifts must be <= {MAX_SHIFTS} (each shift is one more full pass, and a streamed run "
                         f"holds every pass's chunks in memory at once), got {shifts}")


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
    in the memory of a tile instead of a chunk, slower (:func:`~pahubert_plugin.separation.inference.set_decode_tile`).
    """

    def __init__(self, model, segment: float, overlap: float = 0.25, batch_size: int = 1,
                 device="cpu", shifts: int = 0, seed: int = 0, precision: str = "fp32", tile: float = 0.0):
        import torch

        from .inference import Autocast, set_decode_tile, warn_if_emulated
        from .memory import return_freed_memory

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
        ``optimize``: :func:`~pahubert_plugin.separation.inference.optimize_for_inference` (BatchNorm folded into
        convolutions, channels_last; same estimates up to float rounding). ``precision="bf16"``:
        autocast (faster on CPUs with bfloat16 units, estimates about 1e-2 of the peak off)."""
        from .inference import check_precision, optimize_for_inference
        from .memory import drop_file_pages

        check_options(segment, overlap, batch_size, shifts, tile)
        check_precision(precision)  # before the model is loaded
        model, cfg = load_separation_model(path, device)
        if optimize:
            model = optimize_for_inference(model)
            drop_file_pages(path)  # the file pages of the weights it replaced (docs/PERFORMANCE.md)
        if segment is None:
            segment = float(cfg.task.get("valid_segment", 0) or cfg.task.get("segment", 10.0))
        return cls(model, segment, overlap, batch_size, device, shifts, precision=precision, tile=tile)

    def _to_model_channels(self, wav):
        from ..data.audio import apply_channel_policy  # the one channel rule

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

        from .overlap import iter_apply

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
        from ..data.audio import audio_info, read_audio

        if two_stems is not None and two_stems not in self.sources:
            raise ValueError(f"two_stems={two_stems!r}: the model's sources are {', '.join(self.sources)}")
        info = audio_info(path)
        wav, sr = read_audio(path, info=info)
        stems = self.separate(wav, sr, progress=progress, desc=os.path.basename(path), position=position)
        return (split_two_stems(stems, two_stems) if two_stems else stems), sr

    def separate_to_files(self, path: str, out_dir: str, track: str, two_stems: Optional[str] = None,
                          filename: str = DEFAULT_FILENAME, fmt: str = "wav", bits: int = 16,
                          as_float: bool = False, clip_mode: str = "rescale", mp3_bitrate: int = 320,
                          trackext: str = "", progress: bool = False, position: Optional[int] = None,
                          cancel=None) -> List[str]:
        """:meth:`separate_file` then :func:`save_stems` (same arguments, same files) in bounded memory.

        The file is read, resampled, separated, resampled back and written block by block, so
        memory does not grow with the track.  Returns the paths written.  A read error raises
        :class:`~pahubert_plugin.data.audio.AudioError`, a write error
        :class:`~pahubert_plugin.separation.writing.StemWriteError` (an OSError); either way no stem of the
        file is left half-written.  ``cancel`` (a ``threading.Event``): once set, the next block raises
        KeyboardInterrupt and the stems in progress are removed (how the command line stops on Ctrl-C)."""
        import torch

        from ..data.audio import audio_info
        from .overlap import fit_length, read_blocks, resample_stream, resampled_frames

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
                if cancel is not None and cancel.is_set():
                    raise KeyboardInterrupt(path)
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

        from .overlap import average_passes, crop_stream, stream_apply

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
