"""Stage 0: fairseq audio manifests (``train.tsv`` / ``valid.tsv``) from a folder of audio.

Output, in ``OUT_DIR``:

``{split}.tsv``
    fairseq's format: first line the absolute root, then ``relpath<TAB>num_samples`` where
    ``num_samples`` is the length *at the target rate* (what :func:`read_audio` returns for
    ``sample_rate=SR``). Exactly two columns, so fairseq's ``get_path_iterator`` and
    ``HubertDataset`` parse it unchanged.
``{split}.meta.tsv``
    Row-aligned sidecar with a header: relpath, num_samples, source_rate, source_frames,
    channels, format, sample_rate. It records the source rate so a resampled file is never
    silently mis-timed, and the rate ``num_samples`` is counted at (:func:`manifest_rate`),
    which every consumer checks against its own.
``skipped.tsv``
    ``relpath<TAB>reason<TAB>detail`` for every file not used; reason is one of
    ``unreadable``, ``truncated``, ``too_short``, ``silent``, ``channels`` (more than
    :data:`~pahubert_plugin.data.audio.MAX_CHANNELS`), ``bad_name`` (a TAB or newline in the
    path, which the tsv cannot hold; written escaped) or ``duplicate`` (the same file reached
    again through a link).

Links are followed, but each real directory is walked once (a ``sub/loop -> ..`` link is
logged and not entered) and each real file listed once, so no file lands in both splits.

Every file is decoded once in full (in blocks, at its native rate) so that truncated mp3s
and all-silent clips (FMA has both) are caught here rather than in the middle of training.
The scan runs in a process pool with a progress bar and never dies on one bad file.
"""
import argparse
import hashlib
import logging
import math
import multiprocessing
import os
import sys
from collections import Counter
from typing import List, NamedTuple, Optional, Sequence, Tuple

import numpy as np
import tqdm

from pahubert_plugin.data.audio import AUDIO_EXTENSIONS, MAX_CHANNELS, AudioError, audio_info, read_audio
from pahubert_plugin.frames import hop_length

logger = logging.getLogger("pahubert.manifest")

SKIP_REASONS = ("unreadable", "truncated", "too_short", "silent", "channels", "bad_name", "duplicate")
_BLOCK_SECONDS = 60.0


class Probe(NamedTuple):
    """What the scan learned about one file: ``reason`` is None when the file is kept."""

    relpath: str
    reason: Optional[str]
    detail: str = ""
    num_samples: int = 0
    source_rate: int = 0
    source_frames: int = 0
    channels: int = 0
    format: str = ""


def find_audio(root: str, exts: Sequence[str]) -> Tuple[List[str], List[Probe]]:
    """``(relpaths, skipped)``: files under ``root`` whose extension is in ``exts``, sorted.

    Links are followed, each real directory and file once (real folders are walked before
    links): a directory reached again is logged and not entered, and of several paths to one
    file the one without links is kept, the others skipped as ``duplicate``. A path holding a
    TAB or newline is skipped as ``bad_name``.
    """
    exts = {"." + e.lower().lstrip(".") for e in exts}
    skipped, seen_dirs, paths = [], set(), {}  # paths: (st_dev, st_ino) -> relpaths
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        st = os.stat(dirpath)
        if (st.st_dev, st.st_ino) in seen_dirs:
            logger.warning("not entering %s: it leads back to %s, already scanned (a symlink loop or "
                           "a second link to it)", dirpath, os.path.realpath(dirpath))
            dirnames[:] = []
            continue
        seen_dirs.add((st.st_dev, st.st_ino))
        dirnames.sort(key=lambda d: (os.path.islink(os.path.join(dirpath, d)), d))
        for name in filenames:
            if os.path.splitext(name)[1].lower() not in exts:
                continue
            path = os.path.join(dirpath, name)
            rel = os.path.relpath(path, root)
            if any(c in rel for c in "\t\n\r"):
                skipped.append(Probe(_escaped(rel), "bad_name", "a TAB or newline in the path, which a tsv "
                                     "manifest cannot hold: rename the file"))
                continue
            try:
                st = os.stat(path)
            except OSError as e:  # a dangling link
                skipped.append(Probe(rel, "unreadable", f"cannot stat ({e.strerror})"))
                continue
            paths.setdefault((st.st_dev, st.st_ino), []).append(rel)
    found = []
    for rels in paths.values():
        rels.sort(key=lambda r: (os.path.realpath(os.path.join(root, r)) != os.path.join(root, r), r))
        found.append(rels[0])
        skipped += [Probe(r, "duplicate", f"the same file as {rels[0]}") for r in rels[1:]]
    return sorted(found), sorted(skipped)


def _escaped(text: str) -> str:
    """``text`` with TAB, newline and backslash escaped, safe in one tsv field."""
    return text.encode("unicode_escape").decode("ascii")


def _classify(err: AudioError) -> str:
    return "truncated" if "truncated" in err.reason else "unreadable"


def probe_file(root: str, relpath: str, sample_rate: int, min_seconds: float, silence_db: float) -> Probe:
    """Read the header, decode the whole file block by block, and decide keep or skip."""
    path = os.path.join(root, relpath)
    try:
        info = audio_info(path)
    except AudioError as e:
        return Probe(relpath, _classify(e), e.reason)
    meta = dict(num_samples=info.samples_at(sample_rate), source_rate=info.sample_rate,
                source_frames=info.num_samples, channels=info.channels, format=info.format)
    if info.channels > MAX_CHANNELS:  # the pretraining dataset could not read it
        return Probe(relpath, "channels", f"{info.channels} channels; mono or stereo files only: "
                                          f"downmix to stereo first", **meta)
    if info.seconds < min_seconds:
        return Probe(relpath, "too_short", f"{info.seconds:.3f} s < {min_seconds} s", **meta)
    peak = 0.0
    block = max(1, int(_BLOCK_SECONDS * info.sample_rate))
    try:
        for start in range(0, info.num_samples, block):
            wav, _ = read_audio(path, offset=start, num_samples=min(block, info.num_samples - start), info=info)
            peak = max(peak, float(wav.abs().max()))
    except AudioError as e:
        return Probe(relpath, _classify(e), e.reason, **meta)
    peak_db = 20 * math.log10(peak) if peak > 0 else -math.inf
    if peak_db < silence_db:
        return Probe(relpath, "silent", f"peak {peak_db:.1f} dBFS < {silence_db} dBFS", **meta)
    return Probe(relpath, None, "", **meta)


def _probe_star(args) -> Probe:
    return probe_file(*args)


def _init_worker():
    import torch

    torch.set_num_threads(1)


def probe_all(root, relpaths, sample_rate, min_seconds, silence_db, jobs) -> List[Probe]:
    tasks = [(root, rel, sample_rate, min_seconds, silence_db) for rel in relpaths]
    bar = dict(total=len(tasks), desc="scan", unit="file", dynamic_ncols=True)
    if jobs <= 1 or len(tasks) < 2:
        return [_probe_star(t) for t in tqdm.tqdm(tasks, **bar)]
    # fork reuses the parent's imports (torch, soundfile): workers start in milliseconds
    import torch  # noqa: F401  (read_audio's imports, loaded once here rather than in every worker)
    import torchaudio.functional  # noqa: F401

    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else None
    ctx = multiprocessing.get_context(method)
    chunk = max(1, min(64, len(tasks) // (jobs * 8)))
    with ctx.Pool(jobs, initializer=_init_worker) as pool:
        return list(tqdm.tqdm(pool.imap(_probe_star, tasks, chunksize=chunk), **bar))


def _unit_hash(seed: int, relpath: str) -> float:
    """A stable number in [0, 1) per file: the split does not move when files are added."""
    digest = hashlib.md5(f"{seed}:{relpath}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def split_train_valid(kept: List[Probe], valid_percent: float, seed: int):
    scores = [_unit_hash(seed, p.relpath) for p in kept]
    valid = [p for p, s in zip(kept, scores) if s < valid_percent]
    if valid_percent > 0 and not valid and len(kept) >= 2:
        valid = [kept[int(np.argmin(scores))]]  # a tiny corpus still gets a valid set
    chosen = {p.relpath for p in valid}
    train = [p for p in kept if p.relpath not in chosen]
    return train, valid


def write_split(out_dir: str, split: str, root: str, probes: List[Probe], sample_rate: int) -> None:
    with open(os.path.join(out_dir, f"{split}.tsv"), "w") as f:
        f.write(root + "\n")
        for p in probes:
            f.write(f"{p.relpath}\t{p.num_samples}\n")
    with open(os.path.join(out_dir, f"{split}.meta.tsv"), "w") as f:
        f.write("relpath\tnum_samples\tsource_rate\tsource_frames\tchannels\tformat\tsample_rate\n")
        for p in probes:
            f.write(f"{p.relpath}\t{p.num_samples}\t{p.source_rate}\t{p.source_frames}\t{p.channels}\t{p.format}"
                    f"\t{sample_rate}\n")


def meta_path(tsv: str) -> str:
    """The sidecar of ``.../train.tsv``: ``.../train.meta.tsv``."""
    return os.path.splitext(os.fspath(tsv))[0] + ".meta.tsv"


def manifest_rate(tsv: str) -> Optional[int]:
    """The rate ``tsv``'s num_samples are counted at, from its ``.meta.tsv`` sidecar.

    None when it is unknown: no sidecar (a manifest written by hand or by fairseq's
    wav2vec_manifest.py), an older sidecar without the column, or no rows.
    """
    path = meta_path(tsv)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        header = f.readline().rstrip("\n").split("\t")
        if "sample_rate" not in header:
            return None
        col = header.index("sample_rate")
        rates = {line.rstrip("\n").split("\t")[col] for line in f if line.strip()}
    if len(rates) > 1:
        raise ValueError(f"{path} mixes sample rates {sorted(rates)}; rebuild the manifest with pahubert-manifest")
    return int(rates.pop()) if rates else None


def check_manifest_rate(tsv: str, sample_rate: int, option: str = "--sample-rate") -> None:
    """Raise ValueError naming both rates if ``tsv`` was written for another rate than ``sample_rate``."""
    rate = manifest_rate(tsv)
    if rate is not None and rate != int(sample_rate):
        raise ValueError(f"{tsv} counts num_samples at {rate} Hz (see {meta_path(tsv)}), but {option} is "
                         f"{sample_rate} Hz: use {option}={rate}, or rebuild the manifest with "
                         f"pahubert-manifest --sample-rate {sample_rate}")


def summary_line(train, valid, skipped, sample_rate) -> str:
    counts = Counter(p.reason for p in skipped)
    by_reason = ", ".join(f"{r} {counts.get(r, 0)}" for r in SKIP_REASONS)
    hours = sum(p.num_samples for p in train + valid) / sample_rate / 3600
    return (f"kept {len(train) + len(valid)} (train {len(train)}, valid {len(valid)}), "
            f"skipped {len(skipped)} ({by_reason}), total {hours:.3f} h")


def build_manifest(audio_dir, out_dir, sample_rate, valid_percent=0.01, exts=AUDIO_EXTENSIONS,
                   min_seconds=1.0, silence_db=-60.0, seed=0, jobs=1) -> str:
    """Scan ``audio_dir`` and write the manifests into ``out_dir``; returns the summary line."""
    return summary_line(*scan_and_write(audio_dir, out_dir, sample_rate, valid_percent, exts, min_seconds,
                                        silence_db, seed, jobs), sample_rate)


def scan_and_write(audio_dir, out_dir, sample_rate, valid_percent=0.01, exts=AUDIO_EXTENSIONS,
                   min_seconds=1.0, silence_db=-60.0, seed=0, jobs=1):
    """:func:`build_manifest`'s work; returns ``(train, valid, skipped)`` probes."""
    hop_length(sample_rate)  # a ValueError now rather than after the scan
    if not 0.0 <= valid_percent < 1.0:
        raise ValueError(f"--valid-percent is a fraction in [0, 1), got {valid_percent}")
    root = os.path.realpath(audio_dir)
    if not os.path.isdir(root):
        raise ValueError(f"audio dir {audio_dir} is not a directory")
    if "\n" in root:
        raise ValueError(f"audio dir {root!r} holds a newline, which the manifest's first line cannot hold")
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise ValueError(f"output dir {out_dir} is a file; give a folder for the manifests")
    relpaths, skipped = find_audio(root, exts)
    if not relpaths and not skipped:
        raise ValueError(f"no files with extensions {','.join(exts)} under {root}")
    logger.info("found %d audio files under %s", len(relpaths), root)
    probes = probe_all(root, relpaths, sample_rate, min_seconds, silence_db, jobs)
    kept = [p for p in probes if p.reason is None]
    skipped = skipped + [p for p in probes if p.reason is not None]
    train, valid = split_train_valid(kept, valid_percent, seed)

    os.makedirs(out_dir, exist_ok=True)
    write_split(out_dir, "train", root, train, sample_rate)
    write_split(out_dir, "valid", root, valid, sample_rate)
    with open(os.path.join(out_dir, "skipped.tsv"), "w") as f:
        for p in skipped:
            f.write(f"{p.relpath}\t{p.reason}\t{p.detail}\n")
    for p in skipped:
        logger.warning("skipped %s: %s (%s)", p.relpath, p.reason, p.detail)
    return train, valid, skipped


def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pahubert-manifest",
        description="Stage 0: scan AUDIO_DIR and write fairseq manifests train.tsv/valid.tsv "
                    "(num_samples at --sample-rate), {split}.meta.tsv (source and target rates) and skipped.tsv. "
                    "Exit status: 0 all files kept, 1 some skipped (manifests written), 2 nothing kept or an error.",
    )
    parser.add_argument("audio_dir", help="folder of audio, walked recursively")
    parser.add_argument("out_dir", help="where train.tsv, valid.tsv and skipped.tsv go")
    parser.add_argument("--sample-rate", type=int, default=44100,
                        help="target rate; num_samples is counted at this rate (multiple of 100; default %(default)s)")
    parser.add_argument("--valid-percent", type=float, default=0.01,
                        help="fraction of files (0-1) for valid.tsv, chosen by a stable hash of the path (default %(default)s)")
    parser.add_argument("--exts", default=",".join(AUDIO_EXTENSIONS),
                        help="comma-separated extensions to include (default %(default)s)")
    parser.add_argument("--min-seconds", type=float, default=1.0,
                        help="files shorter than this are skipped as too_short (default %(default)s)")
    parser.add_argument("--silence-db", type=float, default=-60.0,
                        help="files whose peak is below this many dBFS are skipped as silent (default %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the train/valid split")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1,
                        help="parallel worker processes for the scan (default: every core, %(default)s here; on a machine "
                             "shared with other jobs give fewer)")
    return parser


def main(argv=None) -> int:
    args = get_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s | %(levelname)s | %(name)s | %(message)s",
                        stream=sys.stdout)
    try:
        train, valid, skipped = scan_and_write(
            args.audio_dir, args.out_dir, args.sample_rate, args.valid_percent,
            [e for e in args.exts.split(",") if e], args.min_seconds, args.silence_db, args.seed, args.jobs,
        )
    except ValueError as e:
        logger.error(str(e))
        return 2
    except OSError as e:  # a full disk, a read-only or vanished output folder
        logger.error(f"cannot write the manifests in {args.out_dir}: {e.strerror or e} "
                     f"({e.filename or args.out_dir}); free space or give another output folder")
        return 2
    print(summary_line(train, valid, skipped, args.sample_rate), flush=True)
    skipped_tsv = os.path.join(args.out_dir, "skipped.tsv")
    if not train and not valid:
        logger.error("no usable audio in %s: all %d files were skipped (reasons in %s)",
                     args.audio_dir, len(skipped), skipped_tsv)
        return 2
    if skipped:  # the rule for bulk jobs (README, Guarantees): log, count, exit non-zero at the end
        logger.error("%d file(s) skipped (reasons in %s); the manifests hold the other %d",
                     len(skipped), skipped_tsv, len(train) + len(valid))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
