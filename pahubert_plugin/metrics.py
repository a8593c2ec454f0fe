"""Pure separation metrics (no I/O, no model): the MDX-challenge SDR and museval summaries.

``sdr`` is the fast utterance-level SDR of the Music Demixing Challenge (Mitsufuji et
al. 2022): one number per source over all channels and samples,
``10 log10((sum s^2 + eps) / (sum (s - s_hat)^2 + eps))``.  It is what validation
logs during training; the published numbers use museval's BSSEval v4 (evaluate.py),
whose per-frame values :func:`summarize_museval` aggregates.
"""
import math
from typing import Dict, Iterable, List, Mapping, Sequence

import numpy as np
import torch

MDX_EPS = 1e-7
METRICS = ("SDR", "SIR", "ISR", "SAR")


def sdr(references, estimates, eps: float = MDX_EPS):
    """MDX utterance-level SDR in dB.

    ``references``/``estimates``: ``(..., sources, channels, samples)`` tensors or arrays
    of the same shape. Returns ``(..., sources)`` (same array type as the input).
    """
    if tuple(references.shape) != tuple(estimates.shape):
        raise ValueError(f"references {tuple(references.shape)} and estimates "
                         f"{tuple(estimates.shape)} must have the same shape")
    if isinstance(references, torch.Tensor):
        ref, est = references.double(), estimates.double()
        num = (ref ** 2).sum(dim=(-2, -1)) + eps
        den = ((ref - est) ** 2).sum(dim=(-2, -1)) + eps
        return (10 * torch.log10(num / den)).to(references.dtype)
    ref, est = np.asarray(references, np.float64), np.asarray(estimates, np.float64)
    num = (ref ** 2).sum(axis=(-2, -1)) + eps
    den = ((ref - est) ** 2).sum(axis=(-2, -1)) + eps
    return 10 * np.log10(num / den)


def nanmedian(values: Iterable[float]) -> float:
    """Median ignoring NaN (museval writes NaN for silent frames); NaN if nothing is left."""
    arr = np.asarray([float(v) for v in values], dtype=np.float64)
    arr = arr[~np.isnan(arr)]
    return float(np.median(arr)) if arr.size else math.nan


def track_medians(museval_json: Mapping) -> Dict[str, Dict[str, float]]:
    """Median over frames of one track's museval JSON: ``{target: {metric: value}}``."""
    out = {}
    for target in museval_json["targets"]:
        frames = target["frames"]
        out[target["name"]] = {m: nanmedian(f["metrics"][m] for f in frames) for m in METRICS}
    return out


def summarize_museval(tracks: Mapping[str, Mapping], sources: Sequence[str]) -> Dict:
    """SiSEC/museval aggregation: median over frames per track, then median over tracks.

    ``tracks``: track name -> museval JSON dict. Returns ``{"sources": {src: {metric: v}},
    "mean": {metric: v}, "tracks": {name: {src: {metric: v}}}, "num_tracks": n}``; ``mean``
    is the average of the per-source medians (the "mean SDR" of papers).
    """
    per_track = {name: track_medians(js) for name, js in tracks.items()}
    per_source = {}
    for src in sources:
        per_source[src] = {
            m: nanmedian(t[src][m] for t in per_track.values() if src in t) for m in METRICS
        }
    mean = {m: float(np.mean([per_source[s][m] for s in sources])) if sources else math.nan
            for m in METRICS}
    return {"num_tracks": len(per_track), "sources": per_source, "mean": mean, "tracks": per_track}


def markdown_table(summary: Mapping, sources: List[str], metrics: Sequence[str] = METRICS) -> str:
    """A markdown table: one row per metric, one column per source plus the mean."""
    head = "| metric | " + " | ".join(sources) + " | mean |"
    rule = "|---" * (len(sources) + 2) + "|"
    rows = [head, rule]
    for m in metrics:
        vals = [summary["sources"][s][m] for s in sources] + [summary["mean"][m]]
        rows.append(f"| {m} | " + " | ".join(f"{v:.3f}" for v in vals) + " |")
    return "\n".join(rows) + "\n"
