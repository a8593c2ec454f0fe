"""Check that a label file lines up with its manifest (stage 3, and before any pretraining).

``python -m pahubert_plugin.clustering.check_labels TSV KM --sample-rate SR [--dict dict.km.txt]``
verifies one label line per manifest row and, per row, that the number of labels equals
``num_frames(num_samples, SR)`` within ``--tolerance`` frames, and that every label is in the
dictionary (``--dict``; by default ``dict.<ext>.txt`` beside KM, where fairseq's task reads it).
It exits 1 on the first problems, naming the row, the file and both counts, and 2 on a usage
error (a missing file, a negative ``--tolerance``, a manifest written for another rate).
"""
import argparse
import os
import sys
from typing import List, Optional

from pahubert_plugin.data.manifest import check_manifest_rate
from pahubert_plugin.frames import LABEL_TOLERANCE, num_frames


class LabelMismatch(ValueError):
    """Labels and manifest disagree; the message names rows, files and counts."""


def read_manifest(tsv: str):
    """(root, [(relpath, num_samples)]) of a fairseq manifest."""
    with open(tsv) as f:
        root = f.readline().rstrip("\n")
        rows = []
        for lineno, line in enumerate(f, start=2):
            parts = line.rstrip("\n").split("\t")
            if len(parts) != 2 or not parts[1].isdigit():
                raise ValueError(f"{tsv} line {lineno}: expected 'relpath<TAB>num_samples', found {line!r}")
            rows.append((parts[0], int(parts[1])))
    return root, rows


def read_dict(path: str) -> set:
    with open(path) as f:
        return {line.split()[0] for line in f if line.strip()}


def find_problems(tsv: str, km: str, sample_rate: int, tolerance: int = LABEL_TOLERANCE,
                  dictionary: Optional[str] = None, max_report: int = 20) -> List[str]:
    """Human-readable problems (empty when the labels are aligned)."""
    _, rows = read_manifest(tsv)
    with open(km) as f:
        labels = [line.split() for line in f]
    problems = []
    if len(labels) != len(rows):
        problems.append(f"{km} has {len(labels)} label lines but {tsv} has {len(rows)} rows")
    symbols = read_dict(dictionary) if dictionary else None
    for i, ((relpath, nsample), labs) in enumerate(zip(rows, labels), start=1):
        expected = num_frames(nsample, sample_rate)
        if abs(len(labs) - expected) > tolerance:
            problems.append(f"row {i} ({relpath}): {len(labs)} labels, expected {expected} "
                            f"({nsample} samples at {sample_rate} Hz)")
        elif symbols is not None:
            unknown = sorted(set(labs) - symbols)
            if unknown:
                problems.append(f"row {i} ({relpath}): labels {unknown[:5]} not in {dictionary}")
        if len(problems) >= max_report:
            problems.append("... (further problems not listed)")
            break
    return problems


def check_labels(tsv: str, km: str, sample_rate: int, tolerance: int = LABEL_TOLERANCE, dictionary: Optional[str] = None) -> None:
    """Raise :class:`LabelMismatch` listing the problems, if any."""
    problems = find_problems(tsv, km, sample_rate, tolerance, dictionary)
    if problems:
        raise LabelMismatch("labels do not match the manifest:\n  " + "\n  ".join(problems))


def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pahubert-check-labels",
        description="Verify a k-means label file against its fairseq manifest: one line per row, "
                    "label count = num_samples // (SR/100) within --tolerance. Exits 1 on mismatch.",
    )
    parser.add_argument("tsv", help="manifest, e.g. data/train.tsv")
    parser.add_argument("km", help="label file, e.g. labels/train.km")
    parser.add_argument("--sample-rate", type=int, required=True, help="rate the manifest's num_samples use")
    parser.add_argument("--tolerance", type=int, default=LABEL_TOLERANCE,
                        help=f"allowed difference in frames per row (default {LABEL_TOLERANCE}, what pretraining "
                             f"accepts: task.label_tolerance)")
    parser.add_argument("--dict", dest="dictionary",
                        help="label dictionary; every label must be in it (default: dict.<ext>.txt beside KM, "
                             "e.g. labels/dict.km.txt for labels/train.km, if it exists)")
    parser.add_argument("--no-dict", action="store_true", help="do not check labels against a dictionary")
    return parser


def default_dict(km: str) -> Optional[str]:
    """``dict.<ext>.txt`` in the folder of ``km`` (``train.km`` -> ``dict.km.txt``), if it exists."""
    ext = os.path.splitext(km)[1].lstrip(".") or "km"
    path = os.path.join(os.path.dirname(os.path.abspath(km)), f"dict.{ext}.txt")
    return path if os.path.isfile(path) else None


def main(argv=None) -> int:
    parser = get_parser()
    args = parser.parse_args(argv)
    if args.tolerance < 0:
        parser.error(f"--tolerance is a number of frames >= 0, got {args.tolerance}")
    if args.dictionary is None and not args.no_dict:
        args.dictionary = default_dict(args.km)
        if args.dictionary is None:
            print(f"warning: no dictionary beside {args.km} (looked for dict.*.txt); label values are not "
                  f"checked: pass --dict", file=sys.stderr)
    for path in (args.tsv, args.km) + ((args.dictionary,) if args.dictionary else ()):
        if not os.path.isfile(path):
            print(f"error: {path} not found", file=sys.stderr)
            return 2
    try:
        check_manifest_rate(args.tsv, args.sample_rate)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    problems = find_problems(args.tsv, args.km, args.sample_rate, args.tolerance, args.dictionary)
    if problems:
        print(f"FAIL {args.km} vs {args.tsv}:", file=sys.stderr)
        for p in problems:
            print("  " + p, file=sys.stderr)
        return 1
    _, rows = read_manifest(args.tsv)
    checked = f", labels in {args.dictionary}" if args.dictionary else ""
    print(f"OK {args.km}: {len(rows)} rows aligned with {args.tsv} at {args.sample_rate} Hz{checked}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
