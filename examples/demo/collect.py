"""One table from many demo settings: scratch, pretrained and the paired gain per setting.

Reads RESULTS_ROOT/<setting>/summary.json (written by report.py for every ``run.sh --tag``)
and, when given, a descriptions file (``tag<TAB>what changed``), and prints a markdown table
(also written to --out).

    python examples/demo/collect.py results/diagnosis --describe examples/demo/diagnose.tsv \\
        --out results/diagnosis/table.md
"""
import argparse
import glob
import json
import os
import sys

import numpy as np


def load(root):
    rows = []
    for path in sorted(glob.glob(os.path.join(root, "*", "summary.json"))):
        tag = os.path.basename(os.path.dirname(path))
        with open(path) as f:
            data = json.load(f)
        for n, gain in sorted(data.get("gain", {}).items(), key=lambda kv: int(kv[0])):
            scratch = list(data["runs"].get(f"scratch_n{n}", {}).values())
            pre = list(data["runs"].get(f"pretrained_n{n}", {}).values())
            diffs = [d for p in data["paired"] if int(p["n"]) == int(n) for d in p["diffs"]]
            rows.append({"tag": tag, "n": int(n), "scratch": float(np.mean(scratch)), "pretrained": float(np.mean(pre)),
                         "seeds": gain["seeds"], "gain": gain["mean"], "ci": gain["ci95"],
                         "improved": int(sum(d > 0 for d in diffs)), "songs": len(diffs)})
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("root", help="folder holding <setting>/summary.json")
    p.add_argument("--describe", default=None, help="tab-separated file: setting tag, description")
    p.add_argument("--out", default=None, help="write the table here too")
    args = p.parse_args(argv)
    desc = {}
    if args.describe and os.path.isfile(args.describe):
        for line in open(args.describe):
            if line.strip() and not line.startswith("#"):
                tag, _, text = line.rstrip("\n").partition("\t")
                desc[tag] = text
    rows = load(args.root)
    if not rows:
        print(f"collect.py: no <setting>/summary.json under {args.root}", file=sys.stderr)
        return 1
    order = {t: i for i, t in enumerate(desc)}
    rows.sort(key=lambda r: (order.get(r["tag"], len(order)), r["tag"], r["n"]))
    lines = ["| setting | what changed | labelled songs | seeds | scratch (dB) | pretrained (dB) | "
             "paired gain (dB) | 95 % interval | songs improved |", "|---" * 9 + "|"]
    for r in rows:
        lines.append(f"| {r['tag']} | {desc.get(r['tag'], '')} | {r['n']} | {r['seeds']} | {r['scratch']:.2f} | "
                     f"{r['pretrained']:.2f} | {r['gain']:+.2f} | [{r['ci'][0]:+.2f}, {r['ci'][1]:+.2f}] | "
                     f"{r['improved']} of {r['songs']} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
