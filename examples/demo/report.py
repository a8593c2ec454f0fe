"""Summarise a demo run: scratch vs pretrained vs mixture-as-estimate, paired per song.

Reads the ``pahubert-evaluate`` outputs of every fine-tuning run under RESULTS/eval/
(folders named ``<arm>_n<tracks>_s<seed>``, arm = scratch | pretrained), scores the
mixture-as-estimate baseline with the same museval code, parses validation SDR along the
way from the fine-tuning logs, and writes RESULTS/summary.md, summary.json and a PNG.
``--metric SI-SDR`` reports the whole-clip SI-SDR instead of museval's SDR (the speech demo): the
mixture baseline then comes from the evaluation's own mixture-as-estimate scores, validation curves
from ``valid_si_sdr``, and a table of SI-SDRi, PESQ and STOI follows where they were scored.

Per number of labelled songs it reports the paired per-song differences (pretrained −
scratch, mean SDR over sources, same seed), their mean over songs x seeds with a 95 %
percentile-bootstrap interval (resampling song-seed pairs), and whether the evidence bar
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


def evaluated_baseline(runs, sources):
    """The mixture-as-estimate scores every ``pahubert-evaluate --metrics si_sdr`` summary holds (the
    same test clips for every run), in :func:`mixture_baseline`'s shape."""
    for summary in runs.values():
        if summary.get("mixture", {}).get("mean"):
            return summary["mixture"]
    raise ValueError("the evaluated runs hold no mixture-as-estimate scores: evaluate with --metrics si_sdr")


def valid_curves(log_dir, key="valid_sdr"):
    """{(arm, n, seed): [(num_updates, validation score), ...]} from fairseq's json logs."""
    curves = {}
    for path in glob.glob(os.path.join(log_dir, "*", "train.log")):
        m = RUN.match(os.path.basename(os.path.dirname(path)))
        if not m:
            continue
        points = {}  # a resumed run's log repeats the validations between its checkpoint and the stop: the last counts
        for line in open(path, errors="replace"):
            if "[valid]" in line and f'"{key}"' in line:
                js = json.loads(line[line.index("{"):])
                points[int(float(js["valid_num_updates"]))] = float(js[key])
        curves[(m["arm"], int(m["n"]), int(m["seed"]))] = sorted(points.items())
    return curves


def convergence(points, quarter=0.25):
    """Where a validation curve ``[(updates, score), ...]`` peaked, and how much its last ``quarter`` of the
    updates added to the best score before it (the test of a schedule long enough: < 0.1 dB)."""
    if not points:
        return None
    best_update, best = max(points, key=lambda p: (p[1], -p[0]))
    last = max(u for u, _ in points)
    before = [v for u, v in points if u <= (1 - quarter) * last]
    gain = best - max(before) if before else float("nan")
    return {"best": best, "best_update": best_update, "last_update": last, "last_quarter_gain": gain,
            "converged": bool(before) and gain < 0.1}


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


HEADINGS = {"SDR": "Test SDR (dB, museval BSSEval v4: median over 1 s frames, then over songs)",
            "SI-SDR": "Test SI-SDR (dB, whole clip, mean over clips)"}
EXTRA = ("SI-SDRi", "PESQ", "STOI")  # shown beside SI-SDR where the evaluation scored them


def build_report(runs, baseline, curves, sources, settings="", metric="SDR"):
    ns = sorted({n for _, n, _ in runs})
    seeds = sorted({s for _, _, s in runs})
    unit = "songs" if metric == "SDR" else "clips"  # music songs, speech clips
    lines, data = [], {"sources": sources, "metric": metric, "mixture": baseline["sources"], "runs": {}}
    lines.append(f"## {HEADINGS.get(metric, 'Test ' + metric)}\n")
    if len(seeds) > 1:
        lines.append("Where a setting has several seeds: mean ± standard deviation over seeds.\n")
    lines.append(f"| labelled {unit} | system | " + " | ".join(sources) + " | mean |")
    lines.append("|---" * (len(sources) + 3) + "|")
    mix_row = [baseline["sources"][s][metric] for s in sources] + [baseline["mean"][metric]]
    lines.append("| - | mixture as estimate | " + " | ".join(f"{v:.2f}" for v in mix_row) + " |")
    paired = []
    for n in ns:
        for arm in ("scratch", "pretrained"):
            keys = [(arm, n, s) for s in seeds if (arm, n, s) in runs]
            if not keys:
                continue
            cells = [mean_spread([runs[k]["sources"][src][metric] for k in keys]) for src in sources]
            cells.append(mean_spread([runs[k]["mean"][metric] for k in keys]))
            lines.append(f"| {n} | {arm} | " + " | ".join(cells) + " |")
            data["runs"][f"{arm}_n{n}"] = {k[2]: runs[k]["mean"][metric] for k in keys}
        # paired per-song differences, pretrained - scratch, mean SDR over sources
        for seed in seeds:
            a, b = runs.get(("scratch", n, seed)), runs.get(("pretrained", n, seed))
            if not (a and b):
                continue
            common = sorted(set(a["tracks"]) & set(b["tracks"]))
            diffs = [np.nanmean([b["tracks"][t][s][metric] for s in sources])
                     - np.nanmean([a["tracks"][t][s][metric] for s in sources]) for t in common]
            paired.append((n, seed, diffs, common))
    if metric != "SDR":
        lines.extend(extra_table(runs, baseline, sources, ns, seeds))
    lines.append("")
    lines.append(f"## Paired per-{unit[:-1]} differences (pretrained − scratch, mean {metric} over sources)\n")
    lines.append(f"| labelled {unit} | seed | {unit} improved | mean difference (dB) | per {unit[:-1]} |")
    lines.append("|---|---|---|---|---|")
    for n, seed, diffs, names in paired:
        better = sum(d > 0 for d in diffs)
        lines.append(f"| {n} | {seed} | {better} of {len(diffs)} | {np.mean(diffs):+.2f} | "
                     + ", ".join(f"{d:+.2f}" for d in diffs) + " |")
    data["paired"] = [{"n": n, "seed": s, "diffs": d, "songs": t} for n, s, d, t in paired]
    lines.append("")
    lines.append(f"## Paired gain per number of labelled {unit} (all {unit[:-1]} x seed pairs)\n")
    lines.append(f"| labelled {unit} | seeds | pairs | mean gain (dB) | 95 % bootstrap interval | seeds won | "
                 f"{unit} improved | bar met (every seed, >= +1 dB, interval > 0) |")
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
        lines.append(f"## Validation {metric} along fine-tuning (dB, fairseq's valid subset)\n")
        for key in sorted(curves):
            pts = curves[key]
            if pts:
                lines.append(f"- {key[0]}, {key[1]} {unit}, seed {key[2]}: "
                             + ", ".join(f"{u}: {v:.2f}" for u, v in pts))
        data["valid_curves"] = {f"{k[0]}_n{k[1]}_s{k[2]}": v for k, v in curves.items()}
        lines.append("")
        lines.append(f"Where each run peaked, and what the last quarter of its updates added to the best validation "
                     f"{metric} before it (< 0.1 dB: the schedule was long enough):\n")
        lines.append(f"| run | best validation {metric} (dB) | at update | of | last quarter added (dB) | converged |")
        lines.append("|---|---|---|---|---|---|")
        data["convergence"] = {}
        for key in sorted(curves):
            c = convergence(curves[key])
            if c is None:
                continue
            data["convergence"][f"{key[0]}_n{key[1]}_s{key[2]}"] = c
            lines.append(f"| {key[0]}, {key[1]} {unit}, seed {key[2]} | {c['best']:.2f} | {c['best_update']} | "
                         f"{c['last_update']} | {c['last_quarter_gain']:+.2f} | {'yes' if c['converged'] else 'no'} |")
    mean_diff = np.mean([np.mean(d) for _, _, d, _ in paired]) if paired else float("nan")
    verdict = ("Pretraining helped on average here" if mean_diff > 0 else
               "Pretraining did NOT beat scratch here") if paired else "No paired runs to compare"
    lines.insert(0, f"# Demo results\n\n**{verdict}**: mean paired difference {mean_diff:+.2f} dB "
                    f"over {sum(len(d) for _, _, d, _ in paired)} {unit[:-1]}-runs (pretrained − scratch, same seed, "
                    f"same updates). One pretraining run; seeds vary fine-tuning. {schedule_note(data)}\n")
    worse = [f"{arm} ({n} {unit}: {np.mean([r['mean']['SI-SDRi'] for k, r in runs.items() if k[:2] == (arm, n)]):+.2f} dB)"
             for n in ns for arm in ("scratch", "pretrained")
             if any(k[:2] == (arm, n) for k in runs) and all("SI-SDRi" in r["mean"] for r in runs.values())
             and np.mean([r["mean"]["SI-SDRi"] for k, r in runs.items() if k[:2] == (arm, n)]) < 0]
    if worse:
        lines.insert(1, "Worse than returning the mixture unchanged (mean SI-SDRi below 0): " + ", ".join(worse) + ".\n")
    if settings:
        lines.insert(1, "```\n" + settings.strip() + "\n```\n")
    data["mean_paired_difference"] = mean_diff
    return "\n".join(lines) + "\n", data


def extra_table(runs, baseline, sources, ns, seeds):
    """Rows of SI-SDRi / PESQ / STOI (mean over seeds) for each arm and the mixture, where scored."""
    cols = [(src, key) for src in sources for key in EXTRA
            if any(key in r["sources"].get(src, {}) for r in runs.values())]
    if not cols:
        return []
    out = ["", "## Speech metrics (mean over clips; PESQ wide band, STOI: source 'speech' only)\n",
           "| labelled clips | system | " + " | ".join(f"{src} {key}" for src, key in cols) + " |",
           "|---" * (len(cols) + 2) + "|"]
    mix = [baseline["sources"][src].get(key) for src, key in cols]
    out.append("| - | mixture as estimate | " + " | ".join("-" if v is None else f"{v:.2f}" for v in mix) + " |")
    for n in ns:
        for arm in ("scratch", "pretrained"):
            keys = [(arm, n, s) for s in seeds if (arm, n, s) in runs]
            if keys:
                cells = [mean_spread([runs[k]["sources"][src][key] for k in keys]) for src, key in cols]
                out.append(f"| {n} | {arm} | " + " | ".join(cells) + " |")
    return out


def plot(runs, baseline, curves, sources, path, metric="SDR"):
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
            vals = [baseline["sources"][s][metric] for s in sources] + [baseline["mean"][metric]]
            err = None
        else:
            ks = [k for k in runs if k[:2] == key]
            per = np.array([[runs[k]["sources"][s][metric] for s in sources] + [runs[k]["mean"][metric]] for k in ks])
            vals, err = per.mean(0), (per.std(0, ddof=1) if len(ks) > 1 else None)
        ax.bar(x + (i - (len(systems) - 1) / 2) * width, vals, width, yerr=err, label=name)
    ax.set_xticks(x, labels)
    ax.set_ylabel(f"{metric} (dB)")
    ax.set_title("Test SDR (museval v4)" if metric == "SDR" else f"Test {metric}")
    ax.axhline(0, color="k", lw=0.5)
    ax.legend(fontsize=7)
    ax = axes[1]
    for key, pts in sorted(curves.items()):
        if pts:
            u, v = zip(*pts)
            ax.plot(u, v, "-o" if key[0] == "pretrained" else "--s", ms=3,
                    label=f"{key[0]} n={key[1]} s={key[2]}")
    ax.set_xlabel("fine-tuning updates")
    ax.set_ylabel(f"valid {metric} (dB)")
    ax.set_title(f"Validation {metric} along fine-tuning")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def schedule_note(data) -> str:
    """Whether this compares ceilings or starts: how many runs still gained on validation in their last quarter."""
    found = data.get("convergence") or {}
    if not found:
        return "docs/RESULTS.md has the figures at convergence."
    gaining = sum(not c["converged"] for c in found.values())
    if not gaining:
        return f"Every run ({len(found)}) had stopped gaining on validation (last quarter < 0.1 dB, below)."
    return (f"{gaining} of {len(found)} runs were still gaining on validation in their last quarter (below): this "
            f"compares where the arms got within this budget, not their ceilings; docs/RESULTS.md has the "
            f"figures at convergence.")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--results", required=True, help="results folder holding eval/<arm>_n<N>_s<seed>/")
    p.add_argument("--musdb-root", required=True,
                   help="corpus root in the MUSDB18-HQ layout, any sources (its test songs)")
    p.add_argument("--settings", default=None, help="text file with the command and settings, quoted in summary.md")
    p.add_argument("--logs", default=None, help="fine-tuning folder holding <arm>_n<N>_s<seed>/train.log")
    p.add_argument("--subset", default="test")
    p.add_argument("--metric", default="SDR", choices=["SDR", "SI-SDR"],
                   help="SDR: museval's (music); SI-SDR: whole-clip SI-SDR from pahubert-evaluate --metrics si_sdr "
                        "(speech), with SI-SDRi, PESQ and STOI beside it where scored (default SDR)")
    p.add_argument("--sources", default=None,
                   help="comma list of sources, in table order (default: those of the evaluated runs)")
    args = p.parse_args(argv)
    runs = load_runs(os.path.join(args.results, "eval"))
    if not runs:
        print(f"report.py: no evaluated runs under {args.results}/eval", file=sys.stderr)
        return 1
    sources = args.sources.split(",") if args.sources else run_sources(runs)
    if args.metric == "SDR":
        baseline = mixture_baseline(args.musdb_root, args.subset, sources,
                                    os.path.join(args.results, "mixture_baseline.json"))
    else:
        baseline = evaluated_baseline(runs, sources)
    valid_key = "valid_sdr" if args.metric == "SDR" else "valid_si_sdr"
    curves = valid_curves(args.logs, valid_key) if args.logs else {}
    # a tag's fine-tuning folder can hold other label budgets' runs: the summary's curves are this results folder's
    curves = {key: pts for key, pts in curves.items() if key in runs}
    settings = open(args.settings).read() if args.settings and os.path.isfile(args.settings) else ""
    text, data = build_report(runs, baseline, curves, sources, settings, args.metric)
    with open(os.path.join(args.results, "summary.md"), "w") as f:
        f.write(text)
    with open(os.path.join(args.results, "summary.json"), "w") as f:
        json.dump(data, f, indent=1, default=float)
    plot(runs, baseline, curves, sources, os.path.join(args.results, "sdr.png"), args.metric)
    print(text)
    print(f"wrote {args.results}/summary.md, summary.json, sdr.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
