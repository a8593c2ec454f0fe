"""Pure separation metrics (no I/O, no model): SDR, SI-SDR, PESQ, STOI and their summaries.

``sdr`` is the fast utterance-level SDR of the Music Demixing Challenge (Mitsufuji et
al. 2022): one number per source over all channels and samples,
``10 log10((sum s^2 + eps) / (sum (s - s_hat)^2 + eps))``.  The published music numbers
use museval's BSSEval v4 (evaluate.py), whose per-frame values :func:`summarize_museval`
aggregates.

``si_sdr`` is the scale-invariant SDR of Le Roux et al. (2019), the figure speech
separation reports, with ``si_sdr_improvement`` over the mixture (SI-SDRi); ``pesq_wb``
(ITU-T P.862.2 wide band, the ``pesq`` package) and ``stoi`` (Taal et al. 2011, the
``pystoi`` package) are scored for a source named ``speech``.  :func:`track_scores` gives
all of them for one track, the model's estimates beside the mixture used as every
source's estimate; :func:`summarize_tracks` aggregates tracks.  A metric that is undefined
for an input (PESQ finds no utterance in silence, STOI has too few voiced frames) is NaN
with an :class:`UndefinedMetricWarning`, never an exception.
"""
import math
import warnings
from typing import Dict, Iterable, List, Mapping, Optional, Sequence

import numpy as np
import torch

MDX_EPS = 1e-7
SI_SDR_EPS = 1e-8
METRICS = ("SDR", "SIR", "ISR", "SAR")  # museval's, per frame
PESQ_RATE = 16000  # wide-band PESQ is defined at 16 kHz
SPEECH = "speech"  # the source name PESQ and STOI are scored for
# whole-track metrics, per source: name in --metrics -> the keys it writes
TRACK_METRICS = {"si_sdr": ("SI-SDR", "SI-SDRi"), "pesq": ("PESQ",), "stoi": ("STOI",)}


def sdr(references, estimates, eps: float = MDX_EPS):
    """MDX utterance-level SDR in dB.

    ``references``/``estimates``: ``(..., sources, channels, samples)`` tensors or arrays
    of the same shape. Returns ``(..., sources)`` (same array type as the input). ``eps`` may be a tensor
    that broadcasts against ``(..., sources)`` (a floor per row: the thresholded SNR loss).
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


class UndefinedMetricWarning(UserWarning):
    """A metric is undefined for this input and was returned as NaN."""


def si_sdr(references, estimates, eps: float = SI_SDR_EPS):
    """Scale-invariant SDR in dB (Le Roux et al., "SDR - half-baked or well done?", 2019).

    ``references``/``estimates``: arrays (or CPU tensors) ``(..., channels, samples)`` that
    broadcast against each other, e.g. ``(sources, channels, samples)`` and a mixture
    ``(channels, samples)``.  Returns ``(...)`` float64: the channels of one signal are scored
    together (one scale), each channel made zero-mean first.  With ``s``, ``e`` zero-mean,
    ``a = (<e, s> + eps) / (|s|^2 + eps)``, the value is
    ``10 log10((|a s|^2 + eps) / (|e - a s|^2 + eps))``: any rescaling of ``e`` scores the same,
    a perfect estimate scores about ``10 log10(|s|^2 / eps)``.
    """
    ref = np.asarray(references, dtype=np.float64)
    est = np.asarray(estimates, dtype=np.float64)
    if ref.ndim < 2 or est.ndim < 2 or ref.shape[-1] != est.shape[-1]:
        raise ValueError(f"references {ref.shape} and estimates {est.shape} must be (..., channels, samples) "
                         f"with the same number of samples")
    try:
        ref, est = np.broadcast_arrays(ref, est)
    except ValueError:
        raise ValueError(f"references {ref.shape} and estimates {est.shape} do not broadcast") from None
    ref = ref - ref.mean(axis=-1, keepdims=True)
    est = est - est.mean(axis=-1, keepdims=True)
    scale = ((ref * est).sum(axis=(-2, -1)) + eps) / ((ref ** 2).sum(axis=(-2, -1)) + eps)
    target = scale[..., None, None] * ref
    num = (target ** 2).sum(axis=(-2, -1)) + eps
    den = ((est - target) ** 2).sum(axis=(-2, -1)) + eps
    return 10 * np.log10(num / den)


def si_sdr_improvement(references, estimates, mixture, eps: float = SI_SDR_EPS):
    """SI-SDRi in dB: :func:`si_sdr` of the estimates minus that of the mixture as the estimate.

    ``mixture`` broadcasts against ``references`` (``(channels, samples)`` for
    ``(sources, channels, samples)``; ``mixture[..., None, :, :]`` for a batch).
    """
    return si_sdr(references, estimates, eps) - si_sdr(references, mixture, eps)


def _mono(x, name: str) -> np.ndarray:
    """``(samples,)`` or ``(channels, samples)`` -> ``(samples,)`` float64, channels averaged."""
    x = np.asarray(x, dtype=np.float64)
    if x.ndim == 2:
        return x.mean(axis=0)
    if x.ndim != 1:
        raise ValueError(f"{name} must be (samples,) or (channels, samples), found shape {x.shape}")
    return x


def _resample(x: np.ndarray, rate: int, target: int) -> np.ndarray:
    if rate == target:
        return x
    from scipy.signal import resample_poly

    g = math.gcd(int(rate), int(target))
    return resample_poly(x, target // g, rate // g)


def pesq_wb(reference, estimate, sample_rate: int) -> float:
    """Wide-band PESQ (ITU-T P.862.2, MOS-LQO from about 1.04 to 4.64) of one source.

    ``reference``/``estimate``: ``(samples,)`` or ``(channels, samples)`` (channels are averaged:
    PESQ is mono) at ``sample_rate``, resampled to 16 kHz.  NaN with an
    :class:`UndefinedMetricWarning` where PESQ is undefined (no utterance detected, e.g. silence;
    a signal under about a quarter of a second).
    """
    from pesq import BufferTooShortError, NoUtterancesError, pesq

    ref = _resample(_mono(reference, "reference"), sample_rate, PESQ_RATE)
    est = _resample(_mono(estimate, "estimate"), sample_rate, PESQ_RATE)
    if ref.shape != est.shape:
        raise ValueError(f"reference {ref.shape} and estimate {est.shape} differ in length")
    if not (np.abs(ref).max(initial=0.0) > 0 and np.isfinite(ref).all() and np.isfinite(est).all()):
        warnings.warn("PESQ undefined: silent or non-finite reference", UndefinedMetricWarning)
        return math.nan
    try:
        return float(pesq(PESQ_RATE, ref, est, "wb"))
    except NoUtterancesError:
        warnings.warn("PESQ undefined: no utterances detected", UndefinedMetricWarning)
    except BufferTooShortError:
        warnings.warn(f"PESQ undefined: {ref.size / PESQ_RATE:.2f} s is too short", UndefinedMetricWarning)
    return math.nan


def stoi(reference, estimate, sample_rate: int) -> float:
    """STOI (Taal et al. 2011, the ``pystoi`` package; 0 to 1, higher is more intelligible) of one source.

    Inputs as :func:`pesq_wb` (pystoi resamples to 10 kHz itself).  NaN with an
    :class:`UndefinedMetricWarning` for a silent reference or where pystoi finds too few
    non-silent frames (it would return 1e-5).
    """
    from pystoi import stoi as pystoi

    ref, est = _mono(reference, "reference"), _mono(estimate, "estimate")
    if ref.shape != est.shape:
        raise ValueError(f"reference {ref.shape} and estimate {est.shape} differ in length")
    if not (np.abs(ref).max(initial=0.0) > 0 and np.isfinite(ref).all() and np.isfinite(est).all()):
        warnings.warn("STOI undefined: silent or non-finite reference", UndefinedMetricWarning)
        return math.nan
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        value = float(pystoi(ref, est, int(sample_rate)))
    if any("Not enough STFT frames" in str(w.message) for w in caught):
        warnings.warn("STOI undefined: too few non-silent frames", UndefinedMetricWarning)
        return math.nan
    return value


def track_scores(references: Mapping[str, np.ndarray], estimates: Mapping[str, np.ndarray],
                 mixture: np.ndarray, sample_rate: int, metrics: Sequence[str]) -> Dict[str, Dict]:
    """Whole-track metrics of one track, the model's and the mixture-as-estimate baseline.

    ``references``/``estimates``: source -> ``(channels, samples)``; ``mixture``
    ``(channels, samples)``.  ``metrics``: names of :data:`TRACK_METRICS` (others are ignored);
    PESQ and STOI are scored for the source named ``speech`` only; every metric of a silent
    reference is NaN (with an :class:`UndefinedMetricWarning`).  Returns
    ``{"model": {source: {"SI-SDR", "SI-SDRi", "PESQ", "STOI"}}, "mixture": {source: {"SI-SDR",
    "PESQ", "STOI"}}}`` with the keys asked for.
    """
    model, base = {}, {}
    for src, ref in references.items():
        est = estimates[src]
        model[src], base[src] = {}, {}
        if "si_sdr" in metrics:
            if np.any(np.asarray(ref) != np.asarray(ref).mean(axis=-1, keepdims=True)):
                ours, mix = float(si_sdr(ref, est)), float(si_sdr(ref, mixture))
            else:  # no signal to be scale-invariant to: the score would only measure eps
                warnings.warn(f"SI-SDR undefined: {src} is silent", UndefinedMetricWarning)
                ours = mix = math.nan
            model[src].update({"SI-SDR": ours, "SI-SDRi": ours - mix})
            base[src]["SI-SDR"] = mix
        for name, fn in (("pesq", pesq_wb), ("stoi", stoi)):
            if name in metrics and src == SPEECH:
                key = TRACK_METRICS[name][0]
                model[src][key] = fn(ref, est, sample_rate)
                base[src][key] = fn(ref, mixture, sample_rate)
    return {"model": model, "mixture": base}


def nanmean(values: Iterable[float]) -> float:
    """Mean ignoring NaN; NaN if nothing is left."""
    arr = np.asarray([float(v) for v in values], dtype=np.float64)
    arr = arr[~np.isnan(arr)]
    return float(arr.mean()) if arr.size else math.nan


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


def summarize_tracks(tracks: Mapping[str, Mapping], sources: Sequence[str], metrics: Sequence[str]) -> Dict:
    """Summary of per-track records (evaluate.py's JSON) for ``metrics`` (``sdr``, ``si_sdr``, ``pesq``, ``stoi``).

    ``sdr``: museval's SDR/SIR/ISR/SAR aggregated as :func:`summarize_museval` (median over frames,
    then over tracks).  The whole-track metrics (``record["scores"]``, and ``record["mixture"]``
    for the mixture as the estimate) are averaged over tracks, ignoring NaN.  Returns
    :func:`summarize_museval`'s dict (``num_tracks``, ``sources``, ``mean``, ``tracks``) with the
    whole-track keys added, plus ``mixture`` (``sources`` and ``mean`` of the baseline),
    ``undefined`` (``{key: {source: number of tracks where the model's or the mixture's value is NaN}}``) and
    ``worse_than_mixture`` (``{source: SI-SDRi}`` for every source whose SI-SDRi is negative).
    """
    if "sdr" in metrics:
        summary = summarize_museval(tracks, sources)
    else:
        summary = {"num_tracks": len(tracks), "sources": {s: {} for s in sources}, "mean": {},
                   "tracks": {name: {s: {} for s in sources} for name in tracks}}
    keys = [k for m in metrics for k in TRACK_METRICS.get(m, ())]
    mixture = {"sources": {s: {} for s in sources}, "mean": {}}
    undefined: Dict[str, Dict[str, int]] = {}
    for side, out, field in (("model", summary, "scores"), ("mixture", mixture, "mixture")):
        for key in keys:
            for src in sources:
                values = [r[field][src][key] for r in tracks.values() if key in r.get(field, {}).get(src, {})]
                if not values:
                    continue
                out["sources"][src][key] = nanmean(values)
                if side == "model":
                    for name, r in tracks.items():
                        if key in r.get(field, {}).get(src, {}):
                            summary["tracks"][name][src][key] = float(r[field][src][key])
            have = [out["sources"][s][key] for s in sources if key in out["sources"][s]]
            if have:
                out["mean"][key] = nanmean(have)
    for key in keys:
        if key == "SI-SDRi":  # NaN exactly where SI-SDR is
            continue
        for src in sources:
            count = sum(any(math.isnan(float(r[f][src][key])) for f in ("scores", "mixture")
                            if key in r.get(f, {}).get(src, {})) for r in tracks.values())
            if count:
                undefined.setdefault(key, {})[src] = count
    summary["mixture"] = mixture
    summary["undefined"] = undefined
    summary["worse_than_mixture"] = {s: summary["sources"][s]["SI-SDRi"] for s in sources
                                     if summary["sources"][s].get("SI-SDRi", math.nan) < 0}
    summary["metrics"] = list(metrics)
    return summary


def markdown_table(summary: Mapping, sources: List[str], metrics: Optional[Sequence[str]] = None) -> str:
    """A markdown table: one row per metric (default: every metric the summary holds), one column per
    source plus the mean; ``-`` where a source has no value (PESQ of a source not named speech).
    Rows ``mixture <metric>`` follow for the mixture-as-estimate baseline when the summary has it."""
    def keys_of(part):
        found = [k for k in (*METRICS, "SI-SDR", "SI-SDRi", "PESQ", "STOI")
                 if k in part["mean"] or any(k in part["sources"][s] for s in sources)]
        return [k for k in found if metrics is None or k in metrics]

    def cell(v):
        return "-" if v is None else f"{v:.3f}"

    head = "| metric | " + " | ".join(sources) + " | mean |"
    rule = "|---" * (len(sources) + 2) + "|"
    rows = [head, rule]
    parts = [("", summary)] + ([("mixture ", summary["mixture"])] if "mixture" in summary else [])
    for label, part in parts:
        for m in keys_of(part):
            vals = [part["sources"][s].get(m) for s in sources] + [part["mean"].get(m)]
            rows.append(f"| {label}{m} | " + " | ".join(cell(v) for v in vals) + " |")
    return "\n".join(rows) + "\n"


def verdict_lines(summary: Mapping, num_tracks: Optional[int] = None) -> List[str]:
    """Plain sentences a reader must not miss: sources the model made worse than the mixture
    itself (negative SI-SDRi), and metrics that were undefined (NaN) on some tracks."""
    lines = [f"{src}: the model is worse than returning the mixture (SI-SDRi {v:.1f} dB)"
             for src, v in summary.get("worse_than_mixture", {}).items()]
    n = summary["num_tracks"] if num_tracks is None else num_tracks
    for key, per in summary.get("undefined", {}).items():
        for src, count in per.items():
            lines.append(f"{src}: {key} undefined on {count} of {n} tracks (silent or too short reference): "
                         f"NaN there, left out of the means")
    return lines
