"""Evaluate a separation checkpoint on a dataset with reference stems: ``pahubert-evaluate``.

The dataset is a folder of clips, ``<root>/<subset>/<clip>/{mixture,<source>...}.wav`` (the
MUSDB18-HQ layout, any sources), ``<root>/<clip>/...`` (a root without subset folders), or
MUSDB18's ``<root>/<subset>/*.stem.mp4``; the layout is detected (``--is-wav`` forces wav).
For every clip: separate the mixture at its native rate (chunked overlap-add,
:class:`~pahubert_plugin.separation.api.Separator`) and score it with ``--metrics``
(:mod:`pahubert_plugin.metrics`):

* ``sdr``: museval's BSSEval v4 on 1 s windows and hops (exactly what ``museval.eval_mus_track``
  does), the MUSDB18 convention;
* ``si_sdr``: SI-SDR of the whole clip and its improvement over the mixture (SI-SDRi);
* ``pesq``, ``stoi``: wide-band PESQ and STOI of the source named ``speech``.

The mixture used as every source's estimate is always scored beside the model (SI-SDR, PESQ,
STOI), and the summary says in a plain line when the model is worse than that baseline.
The per-clip JSON ``OUT/<subset>/<clip>.json`` is museval's own (``museval.TrackStore``) with
the whole-clip scores added (``metrics``, ``scores``, ``mixture``).  Tracks run in parallel
(``--jobs``, one model per worker); a track whose JSON holds the asked metrics is skipped on
re-run, so an interrupted evaluation resumes.
Workers die with the main process, however it ends (SIGKILL included); SIGTERM or Ctrl-C
stops the workers, says how far it got and exits 130.
A broken track (missing stem, stems of different lengths, unreadable file) is skipped with its
reason, the others are scored, and the exit status is 1.
Finally ``OUT/summary.json`` and ``OUT/summary.md``: museval's figures as median over frames per
track, then over tracks; the whole-clip figures as mean over clips; per source and their mean.

Memory: separation holds one segment of activations per chunk batch; BSSEval v4 itself
needs the whole track's references and estimates (its distortion filters are global), so a
worker holds about ``2 x sources`` copies of one track in float64.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import json
import logging
import multiprocessing
import os
import signal
import sys
import warnings
from typing import TYPE_CHECKING, Dict, List, Optional, Sequence, Tuple

import numpy as np
from tqdm import tqdm

from .data.audio import AudioError, write_audio
from .fileio import atomic_write_json, atomic_write_text, full_disk_exits
from .separation.memory import die_with_parent

if TYPE_CHECKING:  # torch, fairseq (stems_dataset) and metrics load after parsing: --help is instant
    from .data.stems_dataset import StemTrack

logger = logging.getLogger("pahubert_plugin.evaluate")

_SEPARATOR = None  # one per worker process
METRIC_NAMES = ("sdr", "si_sdr", "pesq", "stoi")
DEFAULT_METRICS = "sdr,si_sdr"
SPEECH = "speech"  # metrics.SPEECH, here without importing torch before --help


def _init_pool_worker(parent: int, *init) -> None:
    die_with_parent(parent)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group: the parent stops us
    _init_worker(*init)


def _init_worker(checkpoint: str, device: str, segment: Optional[float], overlap: float, threads: int,
                 precision: str = "fp32") -> None:
    global _SEPARATOR
    import torch

    from .separation.api import Separator

    torch.set_num_threads(max(1, threads))
    _SEPARATOR = Separator.from_checkpoint(checkpoint, device, segment, overlap, precision=precision)


def native_rate(track: StemTrack) -> int:
    if track.musdb_track is not None:
        return int(track.musdb_track.rate)
    from .data.audio import audio_info

    return audio_info(track.paths["mixture"]).sample_rate


def score_track(track: StemTrack, estimates: Dict[str, np.ndarray], rate: int, sources: List[str],
                references: Optional[Dict[str, np.ndarray]] = None):
    """museval BSSEval v4 of one track, as ``museval.eval_mus_track``: returns a ``TrackStore``.

    ``estimates``: source -> ``(samples, channels)`` at ``rate``; references (source ->
    ``(channels, samples)``) are read from the track unless given.
    """
    import museval

    if references is None:
        references = {s: track.read(s, rate, None).numpy() for s in sources}
    # float64 as musdb hands museval its references: BSSEval's least squares is unstable in float32
    refs = np.stack([references[s].T for s in sources]).astype(np.float64)
    ests = np.stack([estimates[s] for s in sources]).astype(np.float64)  # (sources, samples, channels)
    sdr, isr, sir, sar = museval.evaluate(refs, ests, win=int(1.0 * rate), hop=int(1.0 * rate), mode="v4")
    store = museval.TrackStore(win=1.0, hop=1.0, track_name=track.name)
    for i, s in enumerate(sources):
        store.add_target(target_name=s, values={"SDR": sdr[i].tolist(), "SIR": sir[i].tolist(),
                                                "ISR": isr[i].tolist(), "SAR": sar[i].tolist()})
    store.validate()
    return store


def track_record(track: StemTrack, estimates: Dict[str, np.ndarray], mixture: np.ndarray, rate: int,
                 sources: List[str], metric_names: Sequence[str]) -> dict:
    """The per-track JSON: museval's (``sdr``) plus ``metrics``, ``scores`` and ``mixture`` (the
    whole-track figures of :func:`pahubert_plugin.metrics.track_scores`).

    ``estimates``: source -> ``(channels, samples)`` and ``mixture`` ``(channels, samples)`` at ``rate``.
    A metric undefined on this track (PESQ of silence) is NaN and logged, never an error.
    """
    from . import metrics

    references = {s: track.read(s, rate, None).numpy() for s in sources}
    record = {"name": track.name}
    if "sdr" in metric_names:
        store = score_track(track, {s: estimates[s].T for s in sources}, rate, sources, references)
        record.update(json.loads(store.json))
    record["metrics"] = list(metric_names)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", metrics.UndefinedMetricWarning)
        scores = metrics.track_scores(references, estimates, mixture, rate, metric_names)
    for w in caught:
        if issubclass(w.category, metrics.UndefinedMetricWarning):
            logger.warning(f"track {track.name}: {w.message}; scored as NaN")
        else:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    record["scores"], record["mixture"] = scores["model"], scores["mixture"]
    return record


def read_json(path: str, then: str):
    """The JSON in ``path``; None when there is none, or (with a warning naming the file and ``then``,
    what happens instead) when it is damaged, e.g. empty after a full disk."""
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        logger.warning(f"{path}: unreadable ({e}); {then}")
        return None


def has_scores(json_path: str, metric_names: Sequence[str]) -> bool:
    """Whether ``json_path`` holds the scores of every metric in ``metric_names`` (a JSON written
    before ``metrics`` was recorded holds museval's ``sdr`` only)."""
    record = read_json(json_path, "rescoring the track")
    if not isinstance(record, dict):
        return False
    have = record.get("metrics", ["sdr"] if "targets" in record else [])
    return set(metric_names) <= set(have)


def evaluate_track(track: StemTrack, json_path: str, estimates_dir: Optional[str] = None,
                   metric_names: Sequence[str] = ("sdr",)) -> str:
    """Separate and score one track in this (worker) process; writes ``json_path`` atomically."""
    sep = _SEPARATOR
    rate = native_rate(track)
    mixture = track.read("mixture", rate, None)
    stems = sep.separate(mixture, rate)
    if estimates_dir:
        for s, v in stems.items():  # float wav: exactly the scored estimates
            write_audio(os.path.join(estimates_dir, track.name, f"{s}.wav"), v, rate, subtype="FLOAT")
    estimates = {s: v.numpy() for s, v in stems.items()}
    record = track_record(track, estimates, mixture.numpy(), rate, sep.sources, metric_names)
    atomic_write_text(json_path, json.dumps(record, allow_nan=True))
    return track.name


_STEM_LINKS = []  # temporary folders of usable_stem_tracks, removed at exit


def usable_stem_tracks(root: str, subset: str, sources: List[str], sample_rate: int):
    """:func:`usable_tracks` for ``.stem.mp4`` files: each file is listed by musdb on its own.

    ``musdb.DB`` probes every file of a folder with ffprobe while listing and raises on the
    first bad one; here each file gets a folder of its own (a symbolic link in a temporary
    ``<tmp>/<subset>/``, kept until the process exits), so a bad file is one counted skip.
    """
    import atexit
    import shutil
    import tempfile

    from .data.stems_dataset import list_tracks

    folder = os.path.join(root, subset)
    if not os.path.isdir(folder):
        return list_tracks(root, subset, sources, sample_rate, False), {}  # its clear ValueError
    files = sorted(f for f in os.listdir(folder) if f.endswith(".stem.mp4"))
    if not files:
        raise ValueError(f"{folder} holds no .stem.mp4 files")
    if not _STEM_LINKS:
        atexit.register(lambda: [shutil.rmtree(d, ignore_errors=True) for d in _STEM_LINKS])
    tracks, skipped = [], {}
    for name in files:
        one = tempfile.mkdtemp(prefix="pahubert-stem-")
        _STEM_LINKS.append(one)
        os.makedirs(os.path.join(one, subset))
        os.symlink(os.path.abspath(os.path.join(folder, name)), os.path.join(one, subset, name))
        track = name[: -len(".stem.mp4")]
        try:
            tracks.extend(list_tracks(one, subset, sources, sample_rate, False))
        except ImportError:
            raise
        except Exception as e:  # ffmpeg.Error, ValueError, RuntimeError from stempeg/musdb
            reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            skipped[track] = f"{os.path.join(folder, name)}: unreadable stem file ({reason})"
            logger.error(f"skipping track {track}: {skipped[track]}")
    return tracks, skipped


def usable_tracks(root: str, subset: str, sources: List[str], sample_rate: int, is_wav: bool):
    """``(tracks, skipped)``: the tracks that can be scored and ``{name: reason}`` for broken ones.

    A broken track (missing stem, unreadable stem, stems of different lengths) is skipped with its
    reason instead of stopping the evaluation, in the wav layout (``<subset>/<track>/<stem>.wav``) and
    in MUSDB18's .stem.mp4 layout (:func:`usable_stem_tracks`). A missing or empty subset folder is
    still a ValueError.
    """
    from .data import stems_dataset
    from .data.stems_dataset import list_tracks

    if not is_wav:
        return usable_stem_tracks(root, subset, sources, sample_rate)
    folder = os.path.join(root, subset)
    if not os.path.isdir(folder):
        return list_tracks(root, subset, sources, sample_rate, is_wav), {}  # its clear ValueError
    names = sorted(d for d in os.listdir(folder) if os.path.isdir(os.path.join(folder, d)))
    if not names:
        raise ValueError(f"{folder} holds no track folders")
    tracks, skipped = [], {}
    for name in names:
        try:
            tracks.append(stems_dataset._wav_track(os.path.join(folder, name), name, sources, sample_rate))
        except (ValueError, AudioError) as e:
            skipped[name] = str(e)
            logger.error(f"skipping track {name}: {e}")
    return tracks, skipped


def _has_clip_folders(folder: str) -> bool:
    return any(os.path.isfile(os.path.join(folder, d, "mixture.wav")) for d in os.listdir(folder))


def _has_stem_files(folder: str) -> bool:
    return any(f.endswith(".stem.mp4") for f in os.listdir(folder))


def resolve_layout(root: str, subset: str, is_wav: bool = False) -> Tuple[str, str, bool]:
    """``(root, subset, is_wav)`` for :func:`usable_tracks`, from what ``root`` holds.

    ``<root>/<subset>/<clip>/mixture.wav``: wav; ``<root>/<subset>/*.stem.mp4``: MUSDB18 stems
    (``is_wav=True`` forces wav). A root without a ``<subset>`` folder that holds the clips itself
    (``<root>/<clip>/mixture.wav`` or ``<root>/*.stem.mp4``) is scored whole: its parent and name
    are returned. Anything else is a ValueError naming the root and the layouts looked for.
    """
    if not os.path.isdir(root):
        raise ValueError(f"dataset root {root}: no such folder")
    folder = os.path.join(root, subset)
    if not os.path.isdir(folder):
        if _has_clip_folders(root) or (not is_wav and _has_stem_files(root)):
            logger.info(f"{root} holds the clips itself (no {subset}/ folder): scoring all of them")
            parent, name = os.path.split(os.path.abspath(root))
            return parent, name, is_wav or _has_clip_folders(root)
        raise ValueError(f"dataset root {root}: no {subset}/ folder and no clips; expected "
                         f"{folder}/<clip>/mixture.wav plus one <source>.wav per source, "
                         f"{root}/<clip>/mixture.wav, or MUSDB18 {folder}/*.stem.mp4")
    if is_wav or _has_clip_folders(folder) or not _has_stem_files(folder):
        return root, subset, True  # an empty folder gets usable_tracks' own error
    return root, subset, False


def parse_metrics(text: str, sources: Sequence[str]) -> List[str]:
    """``--metrics`` as a list, checked against the model's sources (PESQ/STOI need ``speech``)."""
    names = [m.strip() for m in text.split(",") if m.strip()]
    unknown = [m for m in names if m not in METRIC_NAMES]
    if unknown or not names:
        raise ValueError(f"--metrics {text!r}: expected a comma list of {', '.join(METRIC_NAMES)}, "
                         f"found {', '.join(unknown) or 'nothing'}")
    speech_only = [m for m in names if m in ("pesq", "stoi")]
    if speech_only and SPEECH not in sources:
        raise ValueError(f"--metrics {','.join(speech_only)} scores the source named {SPEECH!r}; this checkpoint "
                         f"separates {', '.join(sources)}: drop {','.join(speech_only)} from --metrics")
    for m in speech_only:
        module = {"pesq": "pesq", "stoi": "pystoi"}[m]
        try:
            __import__(module)
        except ImportError as e:
            raise ImportError(f"--metrics {m} needs the {module} package ({e}): pip install {module}") from None
    return list(dict.fromkeys(names))


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="pahubert-evaluate",
        description="Score a separation checkpoint on a dataset with reference stems (wav folders "
                    "<root>/<subset>/<clip>/{mixture,<source>}.wav as MUSDB18-HQ, any sources; or MUSDB18 "
                    ".stem.mp4): per-track JSON in OUT/<subset>/, summary in OUT/summary.json and "
                    "OUT/summary.md, beside the mixture used as every source's estimate. Already scored "
                    "tracks are skipped.")
    p.add_argument("checkpoint", help="fine-tuned checkpoint (task=music_separation)")
    p.add_argument("--root", "--musdb-root", dest="root", required=True,
                   help="dataset root holding <subset>/ folders (or the clip folders themselves)")
    p.add_argument("--is-wav", action="store_true",
                   help="force the wav layout <subset>/<clip>/<source>.wav (default: detected; .stem.mp4 "
                        "files are read as MUSDB18)")
    p.add_argument("--subset", default="test",
                   help="subset folder to score (default test); a root without it that holds the clips "
                        "itself is scored whole")
    p.add_argument("--metrics", default=DEFAULT_METRICS,
                   help="comma list (default %(default)s): sdr = museval BSSEval v4 SDR/SIR/ISR/SAR, median "
                        "over 1 s frames then tracks (the MUSDB18 figure); si_sdr = SI-SDR of the whole "
                        "clip and SI-SDRi, its improvement over the mixture; pesq = wide-band PESQ (at "
                        "16 kHz, resampled) and stoi = STOI, both for the source named 'speech' only. "
                        "Whole-clip figures are means over clips. The mixture as the estimate is always "
                        "scored too, and a negative SI-SDRi is said in plain words")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--jobs", type=int, default=1, help="tracks scored in parallel, one model each (default 1)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="device (default cpu)")
    p.add_argument("--segment", type=float, default=None,
                   help="chunk length in seconds (default: the checkpoint's validation chunk)")
    p.add_argument("--overlap", type=float, default=0.25, help="overlap between chunks, a fraction (default 0.25)")
    p.add_argument("--precision", default="fp32", choices=("fp32", "bf16"),
                   help="inference precision (pahubert-separate --precision); scores record it (default fp32)")
    p.add_argument("--tracks", type=int, default=0, help="score only the first N tracks (0: all)")
    p.add_argument("--force", action="store_true",
                   help="rescore every track, also when OUT holds scores of another checkpoint or settings")
    p.add_argument("--save-estimates", action="store_true",
                   help="also write the estimates as float wav to OUT/estimates/<subset>/<track>/")
    return p


def check_provenance(args) -> None:
    """Scores in ``args.out`` must come from this checkpoint and these settings, or be redone.

    ``OUT/<subset>.provenance.json`` records what produced the per-track JSONs; a re-run with
    another checkpoint (or a retrained one: size and mtime change) stops instead of mixing
    old and new scores, unless ``--force`` clears them.
    """
    st = os.stat(args.checkpoint)
    want = {"checkpoint": os.path.realpath(args.checkpoint), "size": st.st_size, "mtime": st.st_mtime,
            "segment": args.segment, "overlap": args.overlap, "subset": args.subset}
    if args.precision != "fp32":  # fp32 scores keep the provenance of earlier versions
        want["precision"] = args.precision
    path = os.path.join(args.out, f"{args.subset}.provenance.json")
    folder = os.path.join(args.out, args.subset)
    clear = args.force
    if os.path.isfile(path):
        have = read_json(path, "what made the scores there is unknown: rescoring every track")
        if have is None:
            clear = True
        elif have != want:
            if not args.force:
                raise ValueError(f"{args.out} holds scores made with {have}, not {want}: use another --out, "
                                 f"or --force to rescore every track")
    if clear and os.path.isdir(folder):
        for name in os.listdir(folder):
            if name.endswith(".json"):
                os.remove(os.path.join(folder, name))
    os.makedirs(args.out, exist_ok=True)
    atomic_write_json(path, want, sort_keys=False)


def summarize(out: str, subset: str, names: List[str], sources: List[str],
              metric_names: Sequence[str] = ("sdr",)) -> dict:
    """Read the per-track JSONs of ``names`` and write summary.json + summary.md."""
    from . import metrics

    tracks = {}
    for name in names:
        path = os.path.join(out, subset, f"{name}.json")
        record = read_json(path, "left out of the summary")
        if isinstance(record, dict):
            tracks[name] = record
    summary = metrics.summarize_tracks(tracks, sources, metric_names)
    summary["subset"] = subset
    atomic_write_text(os.path.join(out, "summary.json"), json.dumps(summary, indent=1, allow_nan=True))
    how = []
    if "sdr" in metric_names:
        how.append("SDR/SIR/ISR/SAR: museval BSSEval v4, median over 1 s frames, then over tracks")
    if any(m in metric_names for m in ("si_sdr", "pesq", "stoi")):
        how.append("SI-SDR (dB), SI-SDRi (dB, over the mixture), PESQ (wide band), STOI: whole tracks, "
                   "mean over tracks; 'mixture' rows: the mixture as every source's estimate")
    verdicts = metrics.verdict_lines(summary)
    atomic_write_text(os.path.join(out, "summary.md"),
                      (f"{subset}, {summary['num_tracks']} tracks. " + "; ".join(how) + ".\n\n"
                + metrics.markdown_table(summary, sources)
                + ("\n" + "\n".join(verdicts) + "\n" if verdicts else "")))
    return summary


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def _score(name: str, run, failed: List[str], bar) -> None:
    """``run()`` scores track ``name`` (in this process or a worker's future): a bad track is logged and
    counted in ``failed``, the progress bar moves either way. The one failure rule of both loops."""
    try:
        run()
    except (AudioError, ValueError) as e:
        logger.error(f"track {name}: {e}")
        failed.append(name)
    bar.update()


def run_jobs(jobs, init, num_jobs: int, bar) -> List[str]:
    """Score ``jobs`` (in ``num_jobs`` worker processes); returns the names of failed tracks.

    Ctrl-C or SIGTERM (serial: :func:`_raise_interrupt`; parallel: a flag polled between waits)
    kills the workers and then raises KeyboardInterrupt: no orphan keeps scoring.
    """
    failed = []
    if num_jobs == 1 or len(jobs) <= 1:
        if jobs:
            _init_worker(*init)
        for job in jobs:
            _score(job[0].name, lambda job=job: evaluate_track(*job), failed, bar)
        return failed
    ctx = multiprocessing.get_context("spawn")  # no fork of a process holding torch threads
    pool = concurrent.futures.ProcessPoolExecutor(num_jobs, mp_context=ctx, initializer=_init_pool_worker,
                                                  initargs=(os.getpid(), *init))
    # Ctrl-C and SIGTERM only set a flag here: raised from a signal handler, KeyboardInterrupt can land
    # while this thread holds one of concurrent.futures' locks, and the pool's exit handler then waits
    # forever (seen once in ~20 full test runs). The loop below polls the flag between waits instead.
    stop: List[int] = []
    previous = {s: signal.signal(s, lambda signum, frame: stop.append(signum)) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        futures = {pool.submit(evaluate_track, *job): job[0].name for job in jobs}
        pending = set(futures)
        while pending and not stop:
            done, pending = concurrent.futures.wait(pending, timeout=0.25,
                                                    return_when=concurrent.futures.FIRST_COMPLETED)
            for fut in done:
                _score(futures[fut], fut.result, failed, bar)
        if stop:
            raise KeyboardInterrupt(f"signal {stop[0]}")
    except BaseException:
        workers = list((pool._processes or {}).values())  # shutdown() alone waits for running tracks
        for p in workers:
            p.terminate()
        pool.shutdown(wait=False, cancel_futures=True)
        for p in workers:
            p.join(5)
        raise
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    pool.shutdown()
    return failed


@full_disk_exits("pahubert-evaluate")
def main(argv: Optional[List[str]] = None) -> int:
    args = get_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.jobs < 1:
        logger.error("--jobs must be >= 1")
        return 2
    from .separation.api import load_separation_model

    try:
        model, cfg = load_separation_model(args.checkpoint)  # validates the checkpoint once, up front
        sources = list(model.sources)
        del model
        metric_names = parse_metrics(args.metrics, sources)
        root, folder, is_wav = resolve_layout(args.root, args.subset, args.is_wav)
        tracks, skipped = usable_tracks(root, folder, sources, int(cfg.task.sample_rate), is_wav)
        check_provenance(args)
    except (ValueError, FileNotFoundError, ImportError) as e:
        logger.error(str(e))
        return 2
    if args.tracks > 0:
        tracks = tracks[:args.tracks]
    names = [t.name for t in tracks]
    todo = [t for t in tracks if not has_scores(os.path.join(args.out, args.subset, f"{t.name}.json"), metric_names)]
    if len(todo) < len(tracks):
        logger.info(f"{len(tracks) - len(todo)} of {len(tracks)} tracks already scored in {args.out}; skipping them")
    estimates_dir = os.path.join(args.out, "estimates", args.subset) if args.save_estimates else None
    jobs = [(t, os.path.join(args.out, args.subset, f"{t.name}.json"), estimates_dir, metric_names) for t in todo]
    threads = max(1, (os.cpu_count() or 1) // args.jobs)
    init = (args.checkpoint, args.device, args.segment, args.overlap, threads, args.precision)
    bar = tqdm(total=len(jobs), desc="evaluating", unit="track")
    previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        failed = run_jobs(jobs, init, args.jobs, bar)
    except KeyboardInterrupt:
        bar.close()
        done = sum(has_scores(j[1], metric_names) for j in jobs)
        logger.error(f"interrupted: {done} of {len(jobs)} remaining tracks scored in {args.out}; "
                     f"run the same command again to resume")
        if args.jobs > 1 and len(jobs) > 1:
            # belt and braces: run_jobs stops the pool from a flag, but a signal just before it took
            # over the handlers would still raise inside concurrent.futures; skip its exit handler
            # (it can wait forever for the pool's manager thread). The workers are gone and every
            # finished track is on disk.
            sys.stdout.flush()
            sys.stderr.flush()
            logging.shutdown()
            os._exit(130)
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)
    bar.close()
    summary = summarize(args.out, args.subset, names, sources, metric_names)
    print(open(os.path.join(args.out, "summary.md")).read())
    failed = list(skipped) + failed
    if failed:
        logger.error(f"{len(failed)} track(s) skipped or failed and are missing from the summary: "
                     f"{', '.join(failed)}")
        return 1
    means = ", ".join(f"{k} {summary['mean'][k]:.3f}" for k in ("SDR", "SI-SDR", "SI-SDRi", "PESQ", "STOI")
                      if k in summary["mean"])
    logger.info(f"mean over sources: {means} over {summary['num_tracks']} tracks")
    return 0


if __name__ == "__main__":
    sys.exit(main())
