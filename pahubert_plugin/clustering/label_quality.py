"""How much do k-means labels say about the sources? Compare feature sets before pretraining.

``python -m pahubert_plugin.clustering.label_quality KM_MODEL ROOT [--is-wav] [--sources a,b] --feature mfcc``

On tracks that have stems (MUSDB18 / MUSDB18-HQ, or any wav folders laid out so: ``--sources`` names
them, by default the stems of the first track folder), each 10 ms frame of the mixture gets a
reference label, its *dominant source* (the stem with the most energy in that frame, or
``silence`` when the mixture is below ``--silence-db``), and a hypothesis label, the cluster that
the k-means model (fairseq's ``ApplyKmeans``, the model loaded through the allow-list of
:mod:`pahubert_plugin.clustering.kmeans`) gives the frame's features. The statistics are fairseq's own (``examples/hubert/measure_teacher_quality.py``, which does this for phones):

* ``pnmi``: mutual information / H(source), fairseq's "phone-normalised MI";
* ``nmi``: mutual information / mean(H(source), H(cluster)), sklearn's arithmetic NMI;
* ``cluster_purity``: share of frames whose cluster's majority source is their source;
* ``source_purity``: share of frames whose source's majority cluster is their cluster;
* per source: frame share, entropy (bits) of its cluster distribution, and that entropy over
  log2(K) (1 = spread evenly over all clusters, 0 = a single cluster).

The same statistics for uniformly random labels with the same K are reported as a floor.
A table is printed and everything is written as JSON.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys

from ..fileio import full_disk_exits
from typing import TYPE_CHECKING, Dict, List

import numpy as np

from pahubert_plugin.clustering.kmeans import apply_kmeans as load_apply_kmeans
from pahubert_plugin.clustering.readers import FEATURES, build_reader
from pahubert_plugin.clustering.simple_kmeans import simple_kmeans_dir
from pahubert_plugin.frames import hop_length, num_frames

if TYPE_CHECKING:  # torch is imported where it is used: --help answers without it
    import torch

logger = logging.getLogger("pahubert.label_quality")
SILENCE = "silence"


def _teacher_quality():
    """fairseq's measure_teacher_quality module (one folder above simple_kmeans)."""
    folder = os.path.dirname(simple_kmeans_dir())
    if folder not in sys.path:
        sys.path.insert(0, folder)
    import measure_teacher_quality

    return measure_teacher_quality


def dominant_source(stems: Dict[str, torch.Tensor], mixture: torch.Tensor, sample_rate: int,
                    silence_db: float = -50.0) -> List[str]:
    """Per-frame name of the loudest stem, or ``silence``.

    Args:
        stems: name -> ``(channels, samples)`` at ``sample_rate``.
        mixture: ``(channels, samples)``, used for the silence decision.
    Returns:
        ``num_frames(samples, sample_rate)`` names.
    """
    import torch

    hop = hop_length(sample_rate)
    n = num_frames(mixture.shape[-1], sample_rate)

    def frame_power(x):  # (channels, samples) -> (frames,) mean power
        return x[:, : n * hop].reshape(x.shape[0], n, hop).pow(2).mean(dim=(0, 2))

    names = sorted(stems)
    energy = torch.stack([frame_power(stems[k]) for k in names])  # (sources, frames)
    loud = 10 * torch.log10(frame_power(mixture) + 1e-12) >= silence_db
    winner = energy.argmax(0)
    return [names[i] if keep else SILENCE for i, keep in zip(winner.tolist(), loud.tolist())]


def stems_of(root: str, subset: str, is_wav: bool) -> List[str]:
    """The source names of a dataset: the ``<name>.wav`` files besides ``mixture.wav`` in the first
    track folder of ``<root>/<subset>`` (wav layout), or MUSDB18's four stems (``.stem.mp4``)."""
    from pahubert_plugin.data.stems_dataset import MUSDB_SOURCES

    folder = os.path.join(root, subset)
    if not is_wav or not os.path.isdir(folder):
        return list(MUSDB_SOURCES)
    for track in sorted(os.listdir(folder)):
        path = os.path.join(folder, track)
        if os.path.isfile(os.path.join(path, "mixture.wav")):
            return sorted(f[:-4] for f in os.listdir(path) if f.endswith(".wav") and f != "mixture.wav")
    return list(MUSDB_SOURCES)


def load_tracks(root: str, is_wav: bool, subset: str, max_tracks: int, sample_rate: int, max_seconds: float,
                sources=None):
    """Yield (name, mixture, {stem: audio}) as ``(channels, samples)`` tensors at ``sample_rate``, tracks
    listed and read as the separation task does (``stems_dataset.list_tracks``); ``sources`` default
    :func:`stems_of` the data."""
    from pahubert_plugin.data.stems_dataset import list_tracks  # torch: only here

    sources = list(sources or stems_of(root, subset, is_wav))
    for track in list_tracks(root, subset, sources, sample_rate, is_wav)[: max_tracks or None]:
        n = track.samples_at(sample_rate)
        n = min(n, int(max_seconds * sample_rate)) if max_seconds else n
        mixture = track.read("mixture", sample_rate, None, 0, n)
        yield track.name, mixture, {s: track.read(s, sample_rate, None, 0, n) for s in sources}


def quality(refs: Dict[str, List[str]], hyps: Dict[str, List[int]], n_clusters: int) -> dict:
    """Statistics of the module docstring from per-track reference and cluster label lists."""
    mtq = _teacher_quality()
    p_xy, ref2pid, hyp2lid, total, _, _ = mtq.comp_joint_prob(refs, hyps)
    mi, pnmi, _, h_ref, h_hyp = mtq.comp_norm_mutual_info(p_xy)
    _, source_purity = mtq.comp_purity(p_xy, axis=1)
    _, cluster_purity = mtq.comp_purity(p_xy, axis=0)
    per_source = {}
    for ref, row in ref2pid.items():
        p = p_xy[row] / p_xy[row].sum()
        ent = float(-(p[p > 0] * np.log2(p[p > 0])).sum())
        per_source[ref] = {"share": float(p_xy[row].sum()), "entropy_bits": ent,
                           "entropy_norm": ent / np.log2(n_clusters) if n_clusters > 1 else 0.0}
    return {
        "frames": int(total), "mi": float(mi), "pnmi": float(pnmi),
        "nmi": float(2 * mi / (h_ref + h_hyp)) if h_ref + h_hyp > 0 else 0.0,
        "cluster_purity": float(cluster_purity), "source_purity": float(source_purity),
        "clusters_used": len(hyp2lid), "per_source": per_source,
    }


def evaluate(km_path, root, feature="mfcc", is_wav=False, subset="test", sample_rate=44100,
             max_tracks=0, max_seconds=0.0, silence_db=-50.0, seed=0, sources=None, **reader_kw) -> dict:
    apply_kmeans = load_apply_kmeans(km_path)
    n_clusters = apply_kmeans.C_np.shape[1]
    reader = build_reader(feature, sample_rate, **reader_kw)
    sources = list(sources or stems_of(root, subset, is_wav))
    refs, hyps = {}, {}
    for name, mixture, stems in load_tracks(root, is_wav, subset, max_tracks, sample_rate, max_seconds, sources):
        feats = reader.extract(mixture.mean(0, keepdim=True) if reader.channels == 1 else mixture)
        if feats.shape[1] != apply_kmeans.C_np.shape[0]:
            raise ValueError(f"{km_path} was fit on {apply_kmeans.C_np.shape[0]}-dim features, "
                             f"but --feature {feature} gives {feats.shape[1]}")
        hyps[name] = apply_kmeans(feats.numpy()).tolist()
        refs[name] = dominant_source(stems, mixture, sample_rate, silence_db)
        logger.info("%s: %d frames", name, len(refs[name]))
    rng = np.random.default_rng(seed)
    random = {k: rng.integers(0, n_clusters, len(v)).tolist() for k, v in refs.items()}
    return {"km_model": os.path.abspath(km_path), "feature": feature, "n_clusters": int(n_clusters), "sources": sources,
            "tracks": sorted(refs), "kmeans": quality(refs, hyps, n_clusters),
            "random": quality(refs, random, n_clusters)}


def format_table(result: dict) -> str:
    km, rnd = result["kmeans"], result["random"]
    lines = [f"label quality: {result['feature']} k={result['n_clusters']} on {len(result['tracks'])} tracks, "
             f"{km['frames']} frames",
             f"{'':16s}{'k-means':>10s}{'random':>10s}"]
    for key in ("nmi", "pnmi", "cluster_purity", "source_purity"):
        lines.append(f"{key:16s}{km[key]:10.3f}{rnd[key]:10.3f}")
    lines.append(f"{'source':16s}{'share':>10s}{'H bits':>10s}{'H/log2K':>10s}")
    for src, d in sorted(km["per_source"].items()):
        lines.append(f"{src:16s}{d['share']:10.3f}{d['entropy_bits']:10.3f}{d['entropy_norm']:10.3f}")
    return "\n".join(lines)


def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pahubert-label-quality",
        description="Score a k-means model's labels against the dominant source of each frame on a dataset "
                    "with stems (MUSDB18 or wav folders laid out as MUSDB18-HQ, any sources): NMI, purity, "
                    "per-source entropy, and a random-label floor. Prints a table, writes JSON.",
    )
    parser.add_argument("km_model", help="k-means model from stage 2 (joblib)")
    parser.add_argument("musdb_root", metavar="root",
                        help="dataset root: MUSDB18 (.stem.mp4), or wav folders <subset>/<track>/<stem>.wav with --is-wav")
    parser.add_argument("--is-wav", action="store_true",
                        help="root holds wav folders (MUSDB18-HQ layout <subset>/<track>/{mixture,<source>}.wav)")
    parser.add_argument("--sources", default=None,
                        help="comma list of the stems each track holds, e.g. speech,noise (default: the "
                             "<name>.wav files of the first track folder; MUSDB18's four for .stem.mp4)")
    parser.add_argument("--subset", default="test", help="subset folder (default test)")
    parser.add_argument("--feature", choices=FEATURES, default="mfcc", help="the feature the model was fit on")
    parser.add_argument("--sample-rate", type=int, default=44100, help="rate the features were computed at: the k-means model's (default %(default)s, the GPU recipe's; the "
                             "CPU recipes use 16000)")
    parser.add_argument("--max-tracks", type=int, default=0, help="use only the first N tracks (0 = all)")
    parser.add_argument("--max-seconds", type=float, default=0.0, help="use only the first S seconds of each track")
    parser.add_argument("--silence-db", type=float, default=-50.0,
                        help="frames whose mixture power is below this (dBFS) are labelled silence")
    parser.add_argument("--ckpt", help="[hubert] checkpoint")
    parser.add_argument("--layer", type=int, help="[hubert] layer")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="[hubert] device")
    parser.add_argument("--out", help="JSON output (default KM_MODEL.quality.json)")
    return parser


@full_disk_exits("pahubert-label-quality")
def main(argv=None) -> int:
    args = get_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s | %(levelname)s | %(name)s | %(message)s")
    reader_kw = dict(ckpt=args.ckpt, layer=args.layer, device=args.device) if args.feature == "hubert" else {}
    sources = [s.strip() for s in args.sources.split(",") if s.strip()] if args.sources else None
    try:
        result = evaluate(args.km_model, args.musdb_root, args.feature, args.is_wav, args.subset,
                          args.sample_rate, args.max_tracks, args.max_seconds, args.silence_db,
                          sources=sources, **reader_kw)
    except (ValueError, FileNotFoundError) as e:
        logger.error(str(e))
        return 2
    out = args.out or args.km_model + ".quality.json"
    with open(out, "w") as f:
        json.dump(result, f, indent=2)
    print(format_table(result))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
