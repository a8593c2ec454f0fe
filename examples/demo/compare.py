"""Paired per-song comparison of two fine-tuned arms from *different* settings on the same test songs.

``report.py`` pairs the scratch and pretrained arms of one setting; this pairs any two, e.g. the
pretrained arm of ``fnorm_bs8`` against the strongest scratch arm measured (``bs8``, no input
normalisation), seed by seed:

    python examples/demo/compare.py results/diagnosis/fnorm_bs8:pretrained results/diagnosis/bs8:scratch \\
        --songs 2 --seeds 1,2,3

Prints SDR per source of each side (median over songs, as museval's summary), the paired difference (A − B, mean SDR over sources per song)
with a 95 % percentile-bootstrap interval over songs x seeds, and how many seeds and songs A won. Speech runs
(``run.sh --corpus speech``) are scored in SI-SDR: ``--metric SI-SDR --songs 12`` (per source the mean over
clips, as ``report.py``'s speech tables).
"""
import argparse
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from report import bootstrap_interval  # noqa: E402  (the same interval as the demo's report)


def song_sdrs(setting: str, arm: str, songs: int, seed: int, metric: str = "SDR"):
    """{song: {source: METRIC}} of one evaluated run (RESULTS/<setting>/eval/<arm>_n<songs>_s<seed>)."""
    path = os.path.join(setting, "eval", f"{arm}_n{songs}_s{seed}", "summary.json")
    if not os.path.isfile(path):
        raise SystemExit(f"compare.py: {path} not found (run that setting with --seeds {seed} first)")
    with open(path) as f:
        summary = json.load(f)
    try:
        return {song: {s: v[metric] for s, v in per.items()} for song, per in summary["tracks"].items()}
    except KeyError:
        scored = sorted({m for per in summary["tracks"].values() for v in per.values() for m in v})
        raise SystemExit(f"compare.py: {path} has no {metric} (it has {', '.join(scored)}; see --metric)") from None


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("a", help="RESULTS_DIR/SETTING:ARM, e.g. results/diagnosis/fnorm_bs8:pretrained")
    p.add_argument("b", help="the other side, e.g. results/diagnosis/bs8:scratch")
    p.add_argument("--songs", type=int, default=2, help="labelled songs of the runs (default 2)")
    p.add_argument("--seeds", default="1", help="comma list of seeds, paired seed by seed (default 1)")
    p.add_argument("--metric", default="SDR", choices=["SDR", "SI-SDR"],
                   help="SDR (museval, music; default) or SI-SDR (speech runs)")
    args = p.parse_args(argv)
    sides = [x.rsplit(":", 1) for x in (args.a, args.b)]
    seeds = [int(s) for s in args.seeds.split(",")]
    diffs, seed_means, per_source = [], [], {0: [], 1: []}
    # per source: median over songs for museval SDR, mean over clips for SI-SDR (as report.py's tables)
    average = np.median if args.metric == "SDR" else np.mean
    for seed in seeds:
        a, b = (song_sdrs(setting, arm, args.songs, seed, args.metric) for setting, arm in sides)
        if sorted(a) != sorted(b):
            raise SystemExit(f"compare.py: seed {seed}: the two runs scored different songs")
        d = [np.mean(list(a[s].values())) - np.mean(list(b[s].values())) for s in sorted(a)]
        diffs += d
        seed_means.append(np.mean(d))
        for k, run in enumerate((a, b)):
            per_source[k].append({src: average([run[s][src] for s in run]) for src in next(iter(run.values()))})
    sources = list(per_source[0][0])
    print(f"# python examples/demo/compare.py {args.a} {args.b} --songs {args.songs} --seeds {args.seeds}"
          f" --metric {args.metric}\n")
    how = "the median over songs" if args.metric == "SDR" else "the mean over clips"
    print(f"{args.metric} (dB): per source {how}, averaged over seeds; mean over sources\n")
    print("| side | " + " | ".join(sources) + " | mean |")
    print("|---|" + "---|" * (len(sources) + 1))
    for k, label in ((0, args.a), (1, args.b)):
        means = [np.mean([r[src] for r in per_source[k]]) for src in sources]
        print(f"| {label} | " + " | ".join(f"{m:.2f}" for m in means) + f" | {np.mean(means):.2f} |")
    lo, hi = bootstrap_interval(diffs)
    print(f"\npaired A − B ({args.metric}): {np.mean(diffs):+.2f} dB [{lo:+.2f}, {hi:+.2f}] over {len(diffs)} song x seed pairs; "
          f"per seed {', '.join(f'{m:+.2f}' for m in seed_means)}; A ahead on {sum(m > 0 for m in seed_means)} "
          f"of {len(seeds)} seeds and {sum(d > 0 for d in diffs)} of {len(diffs)} songs")
    return 0


if __name__ == "__main__":
    sys.exit(main())
