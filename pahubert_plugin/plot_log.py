"""Training and validation curves of fairseq logs: ``pahubert-plot-log LOG... -o curves.png``.

Reads what ``fairseq-hydra-train`` prints (``common.log_format=json`` or ``simple``; its
``hydra_train.log``, a captured stdout or a ``fairseq-train`` log) and draws, against ``num_updates``, one panel each for

* ``loss`` (train steps, train epochs, validation),
* masked-frame accuracy ``correct_m_*`` (pretraining; HuBERT's criterion logs it),
* ``sdr`` and ``sdr_<source>`` (separation validation),

panels without data left out; several logs share the panels, one colour per log (distinct for any number
of logs), each named by the shortest end of its path that no other log shares (every recipe writes
``logs/hydra/hydra_train.log``). Losses of different scale (a pretraining loss of ~5 next to a separation
loss of ~0.05) get a panel each, so neither curve is flattened.
"""
import argparse
import json
import logging
import math
import os
import re
import statistics
import sys
from typing import Dict, List, Optional, Tuple

from .fileio import full_disk_exits

logger = logging.getLogger("pahubert_plugin.plot_log")

Record = Tuple[str, Dict[str, float]]  # (split: train_inner | train | valid..., {metric: value})

_JSON = re.compile(r"\| (train_inner|train|valid\w*) \| (\{.*\})\s*$")
_SIMPLE_INNER = re.compile(r"\| train_inner \| epoch \d+:\s+\d+ / \d+ (.*)$")
_SIMPLE_EPOCH = re.compile(r"\| (train|valid\w*) \| epoch \d+ \| (?:valid on '[^']*' subset \| )?(.*)$")
_HYDRA = re.compile(r"\[(train_inner|train|valid\w*)\]\[[A-Z]+\] - ")  # hydra_train.log: [time][valid][INFO] - ...


def _number(value) -> Optional[float]:
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def parse_line(line: str) -> Optional[Record]:
    """One fairseq stats line -> (split, metrics without the split prefix), else None."""
    line = _HYDRA.sub(r"| \1 | ", line, count=1)
    m = _JSON.search(line)
    if m:
        split = m.group(1)
        try:
            stats = json.loads(m.group(2))
        except json.JSONDecodeError:
            return None
        prefix = split + "_"
        items = ((k[len(prefix):] if k.startswith(prefix) else k, v) for k, v in stats.items())
    elif _SIMPLE_INNER.search(line):
        split = "train_inner"
        items = (kv.split("=", 1) for kv in _SIMPLE_INNER.search(line).group(1).split(", ") if "=" in kv)
    elif _SIMPLE_EPOCH.search(line):
        m = _SIMPLE_EPOCH.search(line)
        split = m.group(1)
        items = (kv.strip().split(" ", 1) for kv in m.group(2).split(" | ") if " " in kv.strip())
    else:
        return None
    values = {k.strip(): _number(v) for k, v in items}
    values = {k: v for k, v in values.items() if v is not None}
    return (split, values) if "num_updates" in values else None


def read_log(path: str) -> List[Record]:
    with open(path, errors="replace") as f:
        return [r for r in map(parse_line, f) if r is not None]


def panels(records: List[Record]) -> Dict[str, List[str]]:
    """{panel title: metric names present}, in drawing order."""
    names = sorted({k for _, stats in records for k in stats})
    found = {
        "loss": [n for n in names if n == "loss"],
        "masked accuracy": [n for n in names if re.fullmatch(r"correct_m_\d+", n)],
        "SDR (dB)": [n for n in names if n == "sdr"] + [n for n in names if n.startswith("sdr_")],
    }
    return {title: metrics for title, metrics in found.items() if metrics}


LOSS_SCALE_RATIO = 10.0  # logs whose median losses differ more than this get separate loss panels


def loss_groups(logs: Dict[str, List[Record]]) -> List[List[str]]:
    """The labels of the logs with a loss, grouped by scale: sorted by median loss, a new group wherever
    the median exceeds the group's smallest by more than :data:`LOSS_SCALE_RATIO`."""
    medians = {}
    for label, records in logs.items():
        values = [abs(st["loss"]) for _, st in records if "loss" in st and math.isfinite(st["loss"])]
        if values:
            medians[label] = max(statistics.median(values), 1e-12)
    groups: List[List[str]] = []
    low = None
    for label in sorted(medians, key=medians.get):
        if groups and medians[label] <= LOSS_SCALE_RATIO * low:
            groups[-1].append(label)
        else:
            groups.append([label])
            low = medians[label]
    return groups


def run_colours(n: int) -> list:
    """``n`` distinct colours: matplotlib's tab10 up to 10 runs, tab20 up to 20, else spread over a colormap."""
    from matplotlib import colormaps

    if n <= 10:
        return [colormaps["tab10"](i) for i in range(n)]
    if n <= 20:
        return [colormaps["tab20"](i) for i in range(n)]
    return [colormaps["turbo"](0.05 + 0.9 * i / (n - 1)) for i in range(n)]


def figure(logs: Dict[str, List[Record]], title: Optional[str] = None):
    """The matplotlib figure of the curves of ``{label: records}`` and its panel titles."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    layout = panels([r for records in logs.values() for r in records])
    if not layout:
        raise ValueError("no loss, correct_m_* or sdr values in the logs")
    # one panel per (title, metrics, logs drawn there): the loss panel split by scale
    drawn = []
    for panel, metrics in layout.items():
        groups = loss_groups(logs) if panel == "loss" else [list(logs)]
        for group in groups:
            name = panel if len(groups) == 1 else f"loss ({', '.join(group)})"
            drawn.append((name, metrics, group))
    fig, axes = plt.subplots(1, len(drawn), figsize=(5.5 * len(drawn), 4), squeeze=False)
    styles = {"train_inner": dict(alpha=0.5, lw=1), "train": dict(ls="--", marker="."), "valid": dict(marker="o")}
    single = len(logs) == 1
    colours = run_colours(max(len(layout_metrics) for _, layout_metrics, _ in drawn) if single else len(logs))
    for ax, (panel, metrics, group) in zip(axes[0], drawn):
        for i, (label, records) in enumerate(logs.items()):
            if label not in group:
                continue
            for split in sorted({s for s, _ in records}, key=lambda s: list(styles).index(s) if s in styles else 9):
                for j, metric in enumerate(metrics):
                    points = [(st["num_updates"], st[metric]) for s, st in records if s == split and metric in st]
                    if not points:
                        continue
                    x, y = zip(*points)
                    style = dict(styles.get(split, styles["valid"]))
                    if len(metrics) > 1:  # several metrics: one shade per metric
                        style["alpha"] = style.get("alpha", 1.0) * (1.0 - 0.6 * j / len(metrics))
                    name = metric if len(metrics) > 1 else ""
                    ax.plot(x, y, color=colours[j if single else i],
                            label=" ".join(filter(None, [label if not single else "", split, name])), **style)
        ax.set_title(panel)
        ax.set_xlabel("updates")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig, [panel for panel, _, _ in drawn]


def plot(logs: Dict[str, List[Record]], out: str, title: Optional[str] = None) -> List[str]:
    """Draw the curves of ``{label: records}`` to ``out`` (PNG); returns the panel titles."""
    import matplotlib.pyplot as plt

    fig, titles = figure(logs, title)
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return titles


def _labels(paths: List[str]) -> List[str]:
    """Short unique names: the shortest end of each path that no other path ends with
    (``a/logs/hydra/hydra_train.log`` and ``b/logs/hydra/hydra_train.log`` for two recipe runs); a path given
    twice is numbered (``train.log #2``)."""
    parts = [os.path.normpath(os.path.abspath(os.fspath(p))).strip(os.sep).split(os.sep) for p in paths]
    labels = []
    for i, mine in enumerate(parts):
        others = [q for j, q in enumerate(parts) if j != i and q != mine]
        k = 1
        while k < len(mine) and any(q[-k:] == mine[-k:] for q in others):
            k += 1
        labels.append(os.path.join(*mine[-k:]))
    seen: Dict[str, int] = {}
    for i, label in enumerate(labels):
        seen[label] = seen.get(label, 0) + 1
        if seen[label] > 1:
            labels[i] = f"{label} #{seen[label]}"
    return labels


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="pahubert-plot-log",
        description="Draw training and validation curves (loss, masked accuracy, SDR per source) of fairseq "
                    "logs (log_format json or simple) against updates, into one PNG.")
    p.add_argument("logs", nargs="+", metavar="LOG", help="fairseq logs, e.g. exp/mine/logs/stage4_pretrain.log (recipes/pahubert/run.sh) or a hydra_train.log")
    p.add_argument("-o", "--out", default="curves.png", help="output PNG (default %(default)s)")
    p.add_argument("--title", help="figure title")
    return p


@full_disk_exits("pahubert-plot-log")
def main(argv: Optional[List[str]] = None) -> int:
    args = get_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logs = {}
    for path, label in zip(args.logs, _labels(args.logs)):
        try:
            records = read_log(path)
        except OSError as e:
            logger.error(f"cannot read {path}: {e.strerror or e}")
            return 2
        if not records:
            logger.warning(f"{path}: no fairseq stats lines (train_inner/train/valid with num_updates)")
        logs[label] = records
    try:
        drawn = plot({k: v for k, v in logs.items() if v}, args.out, args.title)
    except ValueError as e:
        logger.error(f"nothing to draw: {e}")
        return 2
    logger.info(f"wrote {args.out}: {', '.join(drawn)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
