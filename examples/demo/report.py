"""Summarise a demo run: scratch vs pretrained vs mixture-as-estimate, paired per song.

Reads the ``pahubert-evaluate`` outputs of every fine-tuning run under RESULTS/eval/
(folders named ``<arm>_n<tracks>_s<seed>``, arm = scratch | pretrained), scores the
mixture-as-estimate baseline with the same museval code, parses validation SDR along the
way from the fine-tuning logs, and writes RESULTS/summary.md, summary.json and a PNG.

Per number of labelled songs it reports the paired per-song differences (pretrained −
scratch, mean SDR over sources, same seed), their mean over songs x seeds with a 95 %
percentile-bootstrap interval (resampling song-seed pairs), and whether the bar of issue 10
is met: pretrained ahead on every seed, mean gain >= 1 dB, interval above zero.

    python examples/demo/report.py --results results/demo --musdb-root exp/demo/midi/corpus/musdb \
        --logs exp/demo/midi/finetune/main
"""
import argparse
import glob
import json
import os
import re
import sys

import numpy as np

from pahubert_plugin import metrics
from pahubert_plugin.evaluate import native_rate, score_track
from pahubert_plugin.data.stems_dataset import list_tracks

RUN = re.compile(r"(?P<arm>scratch|pretrained)_n(?P<n>\d+)_s(?P<seed>\d+)$")


def load_runs(eval_dir):
    """{(arm, n, seed): museval summary dict} for every evaluated run."""
    runs = {}
    for path in sorted(glob.glob(os.path.join(eval_dir, "*", "summary.json"))):
        m = RUN.match(os.path.basename(os.path.dirname(path)))
        if m:
            with open(path) as f:
                runs[(m["arm"], int(m["n"]), int(m["seed"]))] = json.load(f)
    return runs


def run_sources(runs):
    """The source names of the evaluated runs, in the order of the first run's summary."""
    first = runs[sorted(runs)[0]]
    return list(first["sources"])


def _corpus_key(musdb_root, subset, sources):
    """What the baseline depends on: the test songs' files (name, size, mtime) and the sources."""
    files = []
    for dirpath, _, names in os.walk(os.path.join(musdb_root, subset)):
        for n in sorted(names):
            st = os.stat(os.path.join(dirpath, n))
            files.append([os.path.relpath(os.path.join(dirpath, n), musdb_root), st.st_size, int(st.st_mtime)])
    return {"sources": list(sources), "files": sorted(files)}


def mixture_baseline(musdb_root, subset, sources, out_json):
    """museval of the mixture used as every source's estimate, written to ``out_json``.

    It depends only on the corpus, so it is also cached beside it (``<musdb_root>/.mixture_baseline_
    <subset>.json``, keyed by the test files' names, sizes and times): a cached corpus costs no
    second scoring (about a minute and a half for the demo's 8 songs)."""
    if os.path.isfile(out_json):
        with open(out_json) as f:
            return json.load(f)
    key = _corpus_key(musdb_root, subset, sources)
    cache = os.path.join(musdb_root, f".mixture_baseline_{subset}.json")
    summary = None
    if os.path.isfile(cache):
        with open(cache) as f:
            cached = json.load(f)
        if cached.get("key") == key:
            summary = cached["summary"]
    if summary is None:
        tracks = list_tracks(musdb_root, subset, sources, native_rate_hint(musdb_root, subset), True)
        scored = {}
        for t in tracks:
            rate = native_rate(t)
            mix = t.read("mixture", rate, None).numpy().T
            scored[t.name] = json.loads(score_track(t, {s: mix for s in sources}, rate, sources).json)
        summary = metrics.summarize_museval(scored, sources)
        try:
            tmp = cache + ".tmp"
            with open(tmp, "w") as f:
                json.dump({"key": key, "summary": summary}, f)
            os.replace(tmp, cache)
        except OSError:  # a read-only corpus: no cache, the results folder still gets its copy
            pass
    with open(out_json, "w") as f:
        json.dump(summary, f, indent=1)
    return summary


def native_rate_hint(root, subset):
    import soundfile as sf

    first = sorted(glob.glob(os.path.join(root, subset, "*", "mixture.wav")))
    if not first:
        raise ValueError(f"no {root}/{subset}/<track>/mixture.wav")
    return sf.info(first[0]).samplerate


def valid_curves(log_dir):
    """{(arm, n, seed): [(num_updates, valid sdr), ...]} from fairseq's json logs."""
    curves = {}
    for path in glob.glob(os.path.join(log_dir, "*", "train.log")):
        m = RUN.match(os.path.basename(os.path.dirname(path)))
        if not m:
            continue
        points = []
        for line in open(path, errors="replace"):
            if "[valid]" in line and '"valid_sdr"' in line:
                js = json.loads(line[line.index("{"):])
                points.append((int(float(js["valid_num_updates"])), float(js["valid_sdr"])))
        curves[(m["arm"], int(m["n"]), int(m["seed"]))] = points
    return curves


def bootstrap_interval(values, n_boot=10000, level=0.95, seed=0):
    """Percentile-bootstrap interval of the mean of ``values`` (resampled with replacement)."""
    values = np.asarray(values, dtype=float)
    if values.size < 2:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, values.size, (n_boot, values.size))].mean(1)
    return tuple(float(q) for q in np.quantile(means, [(1 - level) / 2, (1 + level) / 2]))


def mean_spread(values):
    values = np.asarray(values, dtype=float)
    if values.size == 1:
        return f"{values[0]:.2f}"
    return f"{values.mean():.2f} ± {values.std(ddof=1):.2f}"


def build_report(runs, baseline, curves, sources, settings=""):
    ns = sorted({n for _, n, _ in runs})
    seeds = sorted({s for _, _, s in runs})
    lines, data = [], {"sources": sources, "mixture": baseline["sources"], "runs": {}}
    lines.append("## Test SDR (dB, museval BSSEval v4: median over 1 s frames, then over songs)\n")
    if len(seeds) > 1:
        lines.append("Where a setting has several seeds: mean ± standard deviation over seeds.\n")
    lines.append("| labelled songs | system | " + " | ".join(sources) + " | mean |")
    lines.append("|---" * (len(sources) + 3) + "|")
    mix_row = [baseline["sources"][s]["SDR"] for s in sources] + [baseline["mean"]["SDR"]]
    lines.append("| - | mixture as estimate | " + " | ".join(f"{v:.2f}" for v in mix_row) + " |")
    paired = []
    for n in ns:
        for arm in ("scratch", "pretrained"):
            keys = [(arm, n, s) for s in seeds if (arm, n, s) in runs]
            if not keys:
                continue
            cells = [mean_spread([runs[k]["sources"][src]["SDR"] for k in keys]) for src in sources]
            cells.append(mean_spread([runs[k]["mean"]["SDR"] for k in keys]))
            lines.append(f"| {n} | {arm} | " + " | ".join(cells) + " |")
            data["runs"][f"{arm}_n{n}"] = {k[2]: runs[k]["mean"]["SDR"] for k in keys}
        # paired per-song differences, pretrained - scratch, mean SDR over sources
        for seed in seeds:
            a, b = runs.get(("scratch", n, seed)), runs.get(("pretrained", n, seed))
            if not (a and b):
                continue
            common = sorted(set(a["tracks"]) & set(b["tracks"]))
            diffs = [np.nanmean([b["tracks"][t][s]["SDR"] for s in sources])
                     - np.nanmean([a["tracks"][t][s]["SDR"] for s in sources]) for t in common]
            paired.append((n, seed, diffs, common))
    lines.append("")
    lines.append("## Paired per-song differences (pretrained − scratch, mean SDR over sources)\n")
    lines.append("| labelled songs | seed | songs improved | mean difference (dB) | per song |")
    lines.append("|---|---|---|---|---|")
    for n, seed, diffs, names in paired:
        better = sum(d > 0 for d in diffs)
        lines.append(f"| {n} | {seed} | {better} of {len(diffs)} | {np.mean(diffs):+.2f} | "
                     + ", ".join(f"{d:+.2f}" for d in diffs) + " |")
    data["paired"] = [{"n": n, "seed": s, "diffs": d, "songs": t} for n, s, d, t in paired]
    lines.append("")
    lines.append("## Paired gain per number of labelled songs (all song x seed pairs)\n")
    lines.append("| labelled songs | seeds | pairs | mean gain (dB) | 95 % bootstrap interval | seeds won | "
                 "songs improved | bar met (every seed, >= +1 dB, interval > 0) |")
    lines.append("|---|---|---|---|---|---|---|---|")
    data["gain"] = {}
    for n in ns:
        rows = [(seed, d) for m, seed, d, _ in paired if m == n]
        if not rows:
            continue
        flat = np.concatenate([d for _, d in rows])
        lo, hi = bootstrap_interval(flat)
        won = sum(np.mean(d) > 0 for _, d in rows)
        bar = won == len(rows) and flat.mean() >= 1.0 and lo > 0
        lines.append(f"| {n} | {len(rows)} | {flat.size} | {flat.mean():+.2f} | [{lo:+.2f}, {hi:+.2f}] | "
                     f"{won} of {len(rows)} | {int((flat > 0).sum())} of {flat.size} | {'yes' if bar else 'no'} |")
        data["gain"][n] = {"mean": float(flat.mean()), "ci95": [lo, hi], "seeds_won": int(won),
                           "seeds": len(rows), "bar_met": bool(bar)}
    if curves:
        lines.append("")
        lines.append("## Validation SDR along fine-tuning (dB, fairseq's valid subset)\n")
        for key in sorted(curves):
            pts = curves[key]
            if pts:
                lines.append(f"- {key[0]}, {key[1]} songs, seed {key[2]}: "
                             + ", ".join(f"{u}: {v:.2f}" for u, v in pts))
        data["valid_curves"] = {f"{k[0]}_n{k[1]}_s{k[2]}": v for k, v in curves.items()}
    mean_diff = np.mean([np.mean(d) for _, _, d, _ in paired]) if paired else float("nan")
    verdict = ("Pretraining helped on average here" if mean_diff > 0 else
               "Pretraining did NOT beat scratch here") if paired else "No paired runs to compare"
    lines.insert(0, f"# Demo results\n\n**{verdict}**: mean paired difference {mean_diff:+.2f} dB "
                    f"over {sum(len(d) for _, _, d, _ in paired)} song-runs (pretrained − scratch, same seed, "
                    f"same updates). One pretraining run; seeds vary fine-tuning. See README.\n")
    if settings:
        lines.insert(1, "```\n" + settings.strip() + "\n```\n")
    data["mean_paired_difference"] = mean_diff
    return "\n".join(lines) + "\n", data


def plot(runs, baseline, curves, sources, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ns = sorted({n for _, n, _ in runs})
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    ax = axes[0]
    labels = sources + ["mean"]
    x = np.arange(len(labels))
    systems = [("mixture", None)] + [(f"{arm} ({n})", (arm, n)) for n in ns for arm in ("scratch", "pretrained")]
    width = 0.8 / len(systems)
    for i, (name, key) in enumerate(systems):
        if key is None:
            vals = [baseline["sources"][s]["SDR"] for s in sources] + [baseline["mean"]["SDR"]]
            err = None
        else:
            ks = [k for k in runs if k[:2] == key]
            per = np.array([[runs[k]["sources"][s]["SDR"] for s in sources] + [runs[k]["mean"]["SDR"]] for k in ks])
            vals, err = per.mean(0), (per.std(0, ddof=1) if len(ks) > 1 else None)
        ax.bar(x + (i - (len(systems) - 1) / 2) * width, vals, width, yerr=err, label=name)
    ax.set_xticks(x, labels)
    ax.set_ylabel("SDR (dB)")
    ax.set_title("Test SDR (museval v4)")
    ax.axhline(0, color="k", lw=0.5)
    ax.legend(fontsize=7)
    ax = axes[1]
    for key, pts in sorted(curves.items()):
        if pts:
            u, v = zip(*pts)
            ax.plot(u, v, "-o" if key[0] == "pretrained" else "--s", ms=3,
                    label=f"{key[0]} n={key[1]} s={key[2]}")
    ax.set_xlabel("fine-tuning updates")
    ax.set_ylabel("valid SDR (dB)")
    ax.set_title("Validation SDR along fine-tuning")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--results", required=True, help="results folder holding eval/<arm>_n<N>_s<seed>/")
    p.add_argument("--musdb-root", required=True,
                   help="corpus root in the MUSDB18-HQ layout, any sources (its test songs)")
    p.add_argument("--settings", default=None, help="text file with the command and settings, quoted in summary.md")
    p.add_argument("--logs", default=None, help="fine-tuning folder holding <arm>_n<N>_s<seed>/train.log")
    p.add_argument("--subset", default="test")
    p.add_argument("--sources", default=None,
                   help="comma list of sources, in table order (default: those of the evaluated runs)")
    args = p.parse_args(argv)
    runs = load_runs(os.path.join(args.results, "eval"))
    if not runs:
        print(f"report.py: no evaluated runs under {args.results}/eval", file=sys.stderr)
        return 1
    sources = args.sources.split(",") if args.sources else run_sources(runs)
    baseline = mixture_baseline(args.musdb_root, args.subset, sources,
                                os.path.join(args.results, "mixture_baseline.json"))
    curves = valid_curves(args.logs) if args.logs else {}
    settings = open(args.settings).read() if args.settings and os.path.isfile(args.settings) else ""
    text, data = build_report(runs, baseline, curves, sources, settings)
    with open(os.path.join(args.results, "summary.md"), "w") as f:
        f.write(text)
    with open(os.path.join(args.results, "summary.json"), "w") as f:
        json.dump(data, f, indent=1, default=float)
    plot(runs, baseline, curves, sources, os.path.join(args.results, "sdr.png"))
    print(text)
    print(f"wrote {args.results}/summary.md, summary.json, sdr.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
