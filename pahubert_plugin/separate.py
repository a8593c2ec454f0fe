"""``pahubert-separate``: separate audio files into stems with a fine-tuned checkpoint (the command line only).

Command line (the options of ``demucs``)::

    pahubert-separate CHECKPOINT song.mp3 other.flac -o separated/ [--two-stems vocals]
        [--mp3 | --flac] [--int24 | --float32] [--clip-mode rescale|clamp|none] [--shifts N]
        [--filename "{track}/{stem}.{ext}"] [-d cuda] [-j 2]

writes ``separated/<file name>/<source>.wav`` at the input's sample rate, length and
channel count; a folder stands for every audio file under it (``separated/<path under the folder>/<source>.wav``).
Any format soundfile reads works (wav, flac, ogg, mp3), at any sample rate
(resampled to the model's rate and back), mono or stereo.  A file that cannot be read or
written is reported by name and skipped; the others are still separated and the exit status is 1.
The command line streams (:meth:`Separator.separate_to_files
<pahubert_plugin.separation.api.Separator.separate_to_files>`): memory stays flat in track length.
The Python API is :mod:`pahubert_plugin.separation`.
Heavy imports (torch, fairseq) happen after the arguments are checked, so ``--help`` is instant.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import logging
import os
import sys
import threading
from typing import TYPE_CHECKING, List, Optional, Sequence, Tuple

from .separation.api import WARN_OVERLAP, check_options
from .separation.writing import CLIP_MODES, DEFAULT_FILENAME, _mp3_level, check_mp3_writer, stem_path, subtype_for

if TYPE_CHECKING:
    from .separation.api import Separator

logger = logging.getLogger("pahubert_plugin.separate")


def collect_inputs(audio: Sequence[str], out_dir: Optional[str] = None) -> Tuple[List[str], List[str]]:
    """The command line's inputs as ``(files, track names)``: a file stands for itself (track: its name
    without extension); a folder for every audio file under it (wav, flac, mp3, ogg; recursively,
    sorted; track: the path under the folder without extension), files under ``out_dir`` left out.
    Other files in a folder are counted and logged; a folder without audio is a ValueError."""
    from .data.audio import AUDIO_EXTENSIONS

    out_real = os.path.realpath(out_dir) if out_dir is not None else None
    files, tracks = [], []
    for arg in audio:
        if not os.path.isdir(arg):
            files.append(arg)
            tracks.append(os.path.splitext(os.path.basename(arg))[0])
            continue
        found, other = [], 0
        for root, dirs, names in os.walk(arg, followlinks=True):
            if out_real is not None and (os.path.realpath(root) + os.sep).startswith(out_real + os.sep):
                dirs[:] = []  # our own output folder: stems are no input
                continue
            dirs.sort()
            for name in sorted(names):
                if os.path.splitext(name)[1].lstrip(".").lower() in AUDIO_EXTENSIONS:
                    found.append(os.path.join(root, name))
                else:
                    other += 1
        if not found:
            raise ValueError(f"{arg}: a folder without audio files ({', '.join(AUDIO_EXTENSIONS)}) in it or below")
        if other:
            logger.info(f"{arg}: {len(found)} audio file(s); skipped {other} other file(s)")
        files += found
        tracks += [os.path.splitext(os.path.relpath(f, arg))[0] for f in found]
    return files, tracks


def output_names(paths: Sequence[str], tracks: Optional[Sequence[str]] = None) -> List[str]:
    """Track name per input (the file name without extension, or ``tracks``); a ValueError on clashes."""
    names = list(tracks) if tracks is not None else [os.path.splitext(os.path.basename(p))[0] for p in paths]
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
                    "(e.g. drums, bass, other, vocals). Writes OUT/<name>/<source>.wav at the "
                    "input's sample rate, length and channel count. Options follow demucs.")
    p.add_argument("checkpoint", help="fine-tuned checkpoint (task=music_separation)")
    p.add_argument("audio", nargs="+",
                   help="input files (any format soundfile reads: wav, flac, ogg, mp3) or folders: every wav, flac, "
                        "mp3 and ogg file under a folder, its path under the folder as the track name")
    p.add_argument("-o", "--out", required=True, help="output folder (created if missing)")
    p.add_argument("--filename", default=DEFAULT_FILENAME,
                   help="output path under OUT, with fields {track} (file name without extension), "
                        "{trackext} (its extension), {stem} and {ext} (default %(default)s)")
    p.add_argument("-d", "--device", default=None,
                   help="torch device, e.g. cpu, cuda, cuda:1 (default: cuda when available, else cpu)")
    p.add_argument("-j", "--jobs", type=int, default=1, help="files separated in parallel (default 1)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads per file (default: torch's thread count divided by --jobs, at least 1; "
                        "every job running torch's full count oversubscribes the cores)")
    p.add_argument("--two-stems", metavar="STEM",
                   help="write only STEM and no_STEM (the sum of the other sources), e.g. --two-stems vocals "
                        "(music) or --two-stems speech (a speech/noise model)")
    # model application
    p.add_argument("--segment", type=float, default=None,
                   help="chunk length in seconds (default: the checkpoint's validation chunk)")
    p.add_argument("--overlap", type=float, default=0.25,
                   help="overlap between chunks, a fraction in [0, 0.99]; the model runs 1/(1-overlap) times per "
                        "segment of audio (a warning above 0.9) (default 0.25)")
    p.add_argument("--batch-size", type=int, default=1, help="chunks per forward pass, >= 1 (default 1)")
    p.add_argument("--precision", default="fp32", choices=("fp32", "bf16"),
                   help="fp32 (default) or bf16: autocast to bfloat16, several times faster on CPUs with AMX or "
                        "AVX512-BF16 units (elsewhere emulated and slower: a warning says so), estimates about "
                        "1e-2 of the peak away from fp32 (docs/PERFORMANCE.md)")
    p.add_argument("--tile", type=float, default=0.0, metavar="SECONDS",
                   help="pahubert_resunet only: decode each chunk in time tiles of about SECONDS, for less memory "
                        "(peak memory follows the tile instead of --segment; the same estimates up to float "
                        "rounding; most of the stem runs twice: slower, docs/PERFORMANCE.md). "
                        "Default 0: whole chunks")
    p.add_argument("--shifts", type=int, default=0,
                   help="average N passes over the input shifted by a random 0-0.5 s (demucs' shift trick; "
                        "N times slower, N <= 20; default 0 = one unshifted pass)")
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
    if args.overlap > WARN_OVERLAP:
        logger.warning(f"--overlap {args.overlap:g}: the model runs {1 / (1 - args.overlap):.0f} times per segment "
                       f"of audio, {(1 - 0.25) / (1 - args.overlap):.0f}x the work of the default 0.25")
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
    args.audio, args.tracks = collect_inputs(args.audio, args.out)
    output_names(args.audio, args.tracks)
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
    """A ValueError when --filename would write two stems (or two files) to one path, or an output
    path is (through symlinks too) one of the input files."""
    seen = {}
    inputs = {os.path.realpath(p): p for p in args.audio}
    for path, track in zip(args.audio, names):
        ext = os.path.splitext(path)[1].lstrip(".")
        for stem in stems:
            out = os.path.normpath(stem_path(args.out, args.filename, track, stem, args.format, ext))
            real = os.path.realpath(out)
            if real in inputs:
                raise ValueError(f"the output {out} is the input {inputs[real]}: it would be overwritten; "
                                 f"choose another -o or --filename")
            if out in seen:
                raise ValueError(f"--filename {args.filename!r} writes both {seen[out]} and {path}:{stem} to {out}; "
                                 f"include {{track}} and {{stem}} in it")
            seen[out] = f"{path}:{stem}"


def main(argv: Optional[List[str]] = None) -> int:
    """``pahubert-separate``; exit status 0, 1 (some files failed), 2 (bad command) or 130 (Ctrl-C)."""
    try:
        return _main(argv)
    except KeyboardInterrupt:
        logger.error("interrupted before any stem was written; nothing to clean up")
        return 130


def _main(argv: Optional[List[str]] = None) -> int:
    parser = get_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        _check_args(args)
    except ValueError as e:
        parser.error(str(e))
    from .separation.api import Separator
    from .separation.memory import drop_gpu_library_pages, return_freed_memory

    return_freed_memory()  # a long file's chunks must not pile up in the heap
    try:
        device = _resolve_device(args.device)
        names = output_names(args.audio, args.tracks)
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
    from .separation.writing import StemWriteError

    from .separation.writing import remove_stale_parts

    stale = remove_stale_parts(args.out)  # a killed earlier run's half-written stems
    if stale:
        logger.warning(f"removed {len(stale)} unfinished stem file(s) of an earlier run under {args.out}, "
                       f"e.g. {stale[0]}")
    slots = list(range(args.jobs))  # tqdm bar positions, one per running file
    lock = threading.Lock()
    stop = threading.Event()  # set on Ctrl-C: the running files stop at their next block

    def one(path: str, track: str) -> Optional[str]:
        with lock:
            slot = slots.pop(0)
        try:
            sep.separate_to_files(path, args.out, track, args.two_stems, args.filename, args.format,
                                  24 if args.int24 else 16, args.float32, args.clip_mode, args.mp3_bitrate,
                                  trackext=os.path.splitext(path)[1].lstrip("."), progress=True,
                                  position=slot if args.jobs > 1 else None, cancel=stop)
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

    pool = concurrent.futures.ThreadPoolExecutor(max_workers=args.jobs)
    futures = [pool.submit(one, path, track) for path, track in zip(args.audio, names)]
    try:
        errors = [f.result() for f in futures]
    except KeyboardInterrupt:
        stop.set()  # the files in progress stop at their next block and remove their .part files
        while True:
            try:
                pool.shutdown(wait=True, cancel_futures=True)
                break
            except KeyboardInterrupt:  # a second Ctrl-C: the running files are already stopping
                continue
        done = sum(1 for f in futures if f.done() and not f.cancelled() and f.exception() is None
                   and f.result() is None)
        logger.error(f"interrupted: {done} of {len(args.audio)} files separated into {args.out}; "
                     f"the stems in progress were removed")
        return 130
    pool.shutdown(wait=True)
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
