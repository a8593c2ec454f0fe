"""Training and validation curves of fairseq logs: ``pahubert-plot-log LOG... -o curves.png``.

Reads what ``fairseq-hydra-train`` prints (``common.log_format=json`` or ``simple``; its
``hydra_train.log``, a captured stdout or a ``fairseq-train`` log) and draws, against ``num_updates``, one panel each for

* ``loss`` (train steps, train epochs, validation),
* masked-frame accuracy ``correct_m_*`` (pretraining; HuBERT's criterion logs it),
* ``sdr`` and ``sdr_<source>`` (separation validation),

panels without data left out; several logs share the panels, one colour per log.
"""
import argparse
import json
import logging
import os
import re
import sys
from typing import Dict, List, Optional, Tuple

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


def plot(logs: Dict[str, List[Record]], out: str, title: Optional[str] = None) -> List[str]:
    """Draw the curves of ``{label: records}`` to ``out`` (PNG); returns the panel titles."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    layout = panels([r for records in logs.values() for r in records])
    if not layout:
        raise ValueError("no loss, correct_m_* or sdr values in the logs")
    fig, axes = plt.subplots(1, len(layout), figsize=(5.5 * len(layout), 4), squeeze=False)
    styles = {"train_inner": dict(alpha=0.5, lw=1), "train": dict(ls="--", marker="."), "valid": dict(marker="o")}
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, (panel, metrics) in zip(axes[0], layout.items()):
        for i, (label, records) in enumerate(logs.items()):
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
                    ax.plot(x, y, color=colours[(i + (j if len(logs) == 1 else 0)) % len(colours)],
                            label=" ".join(filter(None, [label if len(logs) > 1 else "", split, name])), **style)
        ax.set_title(panel)
        ax.set_xlabel("updates")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return list(layout)


def _labels(paths: List[str]) -> List[str]:
    """Short names: the file name, or its folder when file names repeat (exp/a/train.log, exp/b/train.log)."""
    names = [os.path.basename(p) for p in paths]
    if len(set(names)) == len(names):
        return names
    return [os.path.join(os.path.basename(os.path.dirname(os.path.abspath(p))), os.path.basename(p)) for p in paths]


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="pahubert-plot-log",
        description="Draw training and validation curves (loss, masked accuracy, SDR per source) of fairseq "
                    "logs (log_format json or simple) against updates, into one PNG.")
    p.add_argument("logs", nargs="+", metavar="LOG", help="fairseq logs, e.g. exp/pretrain/hydra_train.log")
    p.add_argument("-o", "--out", default="curves.png", help="output PNG (default %(default)s)")
    p.add_argument("--title", help="figure title")
    return p


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
