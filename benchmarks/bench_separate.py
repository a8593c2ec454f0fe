"""Separation speed and memory on this CPU: our separators next to Open-Unmix and HT-Demucs.

For every model in :data:`BUILDERS` (random weights, nothing downloaded), in its own
subprocess so measurements do not mix:

* real-time factor: wall time to separate the same 30 s stereo 44.1 kHz input with
  :func:`pahubert_plugin.separation.overlap.apply_model` (overlap-add chunks of the model's segment),
  divided by 30 s (< 1 is faster than real time); best of ``--repeats``;
* long-track real-time factor: the wall time of one chunk of the model's own segment divided by the
  chunk hop, ``(1 - overlap) x segment``: what a track much longer than the segment costs per second.
  Our models separate an input shorter than their segment in one pass of its own length, while
  HT-Demucs pads it to its training segment (``use_train_segment``; 10 s for the class defaults built
  here), so below that the RTF above charges HT-Demucs for its whole segment and flatters every ratio
  against it; and on long tracks each model pays its own overlap. This column compares what long
  tracks cost;
* peak memory separating WAV files of ``--memory-seconds`` (default 1 and 10 minutes) to 16-bit WAV
  stems the way ``pahubert-separate`` does (:meth:`Separator.separate_to_files
  <pahubert_plugin.separation.api.Separator.separate_to_files>`: read, separate and write block by block;
  ``--memory-path memory`` for the in-memory ``separate_file`` + ``save_stems``), with every
  variant: peak RSS of the process (``ru_maxrss``), the RSS after the model was built, and the ratio
  of the longest input's peak to the shortest's (1.0: memory flat in track length). The ``tile``
  variant decodes ``pahubert_resunet`` chunks in time tiles (``pahubert-separate --tile``): its cost
  in time and its saving in memory.

Add a model by adding a builder to :data:`BUILDERS` (as ``demucs_v2`` / ``demucs_v2_hubert``
are): ``name -> () -> (model, segment_seconds)``,
where ``model(mixture (batch, 2, samples)) -> (batch, sources, 2, samples)`` at 44.1 kHz.

    python benchmarks/bench_separate.py [--models tiny,base,umxl,htdemucs] [--memory-seconds 60,600]
    python benchmarks/bench_separate.py --models base,pahubert_base,htdemucs --variants fp32,opt,bf16 \
        --seconds 10 --memory-seconds 0 --repeats 1
    python benchmarks/bench_separate.py --models pahubert_base --variants opt,tile --tile 2.5 \
        --seconds 1 --memory-seconds 12 --repeats 1
"""
import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Callable, Dict, Optional, Tuple

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from pahubert_plugin.separation.inference import cpu_has_native_bf16  # noqa: E402
from pahubert_plugin.configs import load_recipe_config  # noqa: E402

SR = 44100
SOURCES = ["drums", "bass", "other", "vocals"]


def _resunet(**over):
    from pahubert_plugin.models.resunet import ResUNetConfig, ResUNetModel

    cfg = ResUNetConfig(sources=SOURCES, sample_rate=SR, audio_channels=2, **over)
    model = ResUNetModel(cfg)
    model.bench_cfg = cfg  # what save_checkpoint writes
    return model


def build_tiny():
    """recipes/musdb/conf/tiny.yaml's resunet, at 44.1 kHz (n_fft 2048)."""
    return _resunet(n_fft=2048, channels=[8, 16, 32, 32], freq_strides=[2, 2, 2, 2], time_strides=[2, 2, 1, 1],
                    units=1, bottleneck_units=1), 10.0


def build_base():
    """recipes/musdb/conf/base.yaml's resunet (Kong et al.-like)."""
    return _resunet(), 10.0


def build_pahubert_base(preset: str = "", config: str = "base", decoder_units: int = 4, bottleneck_units: int = 2):
    """pahubert_resunet on a Pac-HuBERT Base encoder: recipes/pahubert/conf/pretrain/base.yaml's model
    section (the paper's 12 x 768, one token per 10 ms frame), with ``preset/<preset>.yaml`` over it;
    ``config="tiny"``: the tiny one's (the demo's model, here at 44.1 kHz)."""
    from omegaconf import OmegaConf

    from pahubert_plugin.models.pahubert import PahubertConfig
    from pahubert_plugin.models.pahubert_resunet import PahubertResUNetConfig, PahubertResUNetModel
    from pahubert_plugin.models.pretrained import remember

    conf = os.path.join(REPO, "recipes", "pahubert", "conf", "pretrain")
    yaml = load_recipe_config(os.path.join(conf, config + ".yaml"))
    if preset:
        yaml = OmegaConf.merge(yaml, OmegaConf.load(os.path.join(conf, "preset", preset + ".yaml")))
    over = {k: v for k, v in OmegaConf.to_container(yaml.model, resolve=False).items()
            if k != "_name" and not (isinstance(v, str) and "${" in v)}  # task interpolations: set below
    enc = OmegaConf.merge(OmegaConf.structured(PahubertConfig), over,
                          {"sample_rate": SR, "audio_channels": 2, "label_rate": 100, "n_fft": 0})  # 2048 at 44.1 kHz
    cfg = OmegaConf.merge(OmegaConf.structured(PahubertResUNetConfig),
                          {"sources": SOURCES, "sample_rate": SR, "audio_channels": 2,
                           "decoder_units": decoder_units, "bottleneck_units": bottleneck_units})
    enc = OmegaConf.to_container(enc, resolve=True)
    model = PahubertResUNetModel(cfg, enc)
    model.bench_cfg = cfg  # what save_checkpoint writes
    remember(model, encoder_cfg=enc)  # as build_model: a saved checkpoint carries the architecture
    return model, 10.0


def build_umxl():
    """Open-Unmix UMX-L architecture (hidden 1024, n_fft 4096), random weights."""
    import openunmix

    return openunmix.umxl(targets=SOURCES, pretrained=False, device="cpu"), 30.0


def build_htdemucs():
    """HT-Demucs (demucs 4 ``HTDemucs`` class defaults), random weights, its own segment."""
    from demucs.htdemucs import HTDemucs

    model = HTDemucs(sources=SOURCES)
    return model, float(model.segment)


def _musdb_model_cfg(dataclass, config_name):
    """The ``model:`` section of recipes/musdb/conf/<config_name> over its dataclass."""
    from omegaconf import OmegaConf

    yaml = load_recipe_config(os.path.join(REPO, "recipes", "musdb", "conf", config_name))
    return OmegaConf.merge(OmegaConf.structured(dataclass), yaml.model)


def build_demucs_v2():
    """recipes/musdb/conf/demucs_v2_base.yaml: Demucs V2 (64 ch doubling, depth 6, 2-layer BiLSTM, ~266 M)."""
    from pahubert_plugin.models.demucs_v2 import DemucsV2Config, DemucsV2Model

    cfg = _musdb_model_cfg(DemucsV2Config, "demucs_v2_base.yaml")
    model = DemucsV2Model(cfg, SOURCES, SR, 2)
    model.bench_cfg = cfg  # what save_checkpoint writes
    return model, 10.0


def build_demucs_v2_hubert():
    """recipes/musdb/conf/demucs_v2_hubert_base.yaml: Demucs V2 encoder/decoder + HuBERT Base 12 x 768."""
    from pahubert_plugin.models.demucs_v2_hubert import DemucsV2HubertConfig, DemucsV2HubertModel

    cfg = _musdb_model_cfg(DemucsV2HubertConfig, "demucs_v2_hubert_base.yaml")
    model = DemucsV2HubertModel(cfg, 2, SR, sources=SOURCES)
    model.bench_cfg = cfg  # what save_checkpoint writes
    return model, 10.0


BUILDERS: Dict[str, Callable[[], Tuple[torch.nn.Module, float]]] = {
    "tiny": build_tiny,
    "base": build_base,
    "pahubert_tiny": lambda: build_pahubert_base("", "tiny", 1, 1),  # recipes/musdb/conf/pahubert_tiny.yaml
    "pahubert_base": build_pahubert_base,
    "pahubert_base_tokens25": lambda: build_pahubert_base("tokens25_base"),
    "pahubert_base_fast": lambda: build_pahubert_base("fast_base"),
    "pahubert_base_fast_dec2": lambda: build_pahubert_base("fast_base", decoder_units=2),
    "pahubert_base_fast_dec1": lambda: build_pahubert_base("fast_base", decoder_units=1),
    "umxl": build_umxl,
    "htdemucs": build_htdemucs,
    "demucs_v2": build_demucs_v2,
    "demucs_v2_hubert": build_demucs_v2_hubert,
}


OVERLAP = 0.25  # of the segment, as pahubert-separate
VARIANTS = ("fp32", "opt", "bf16", "tile")  # as built | optimize_for_inference | that + bf16 autocast |
# opt + tiled decoding (pahubert_resunet: set_decode_tile, --tile seconds)


def worker(name: str, mode: str, seconds: float, repeats: int, variant: str = "fp32", path: str = "",
           tile: float = 2.5, checkpoint: str = "") -> dict:
    """Runs in a subprocess: one model, one measurement; returns a dict.

    ``variant``: ``fp32`` the model as built; ``opt`` after
    :func:`pahubert_plugin.separation.inference.optimize_for_inference` (BatchNorm folded, channels_last);
    ``bf16`` that under bfloat16 autocast; ``tile`` ``opt`` decoding in time tiles of ``tile`` seconds
    (:func:`pahubert_plugin.separation.inference.set_decode_tile`). For the last three the estimates of the first
    segment are compared with the model as built: ``max_diff`` is the largest difference over
    the input's peak."""
    import pahubert_plugin  # noqa: F401
    from pahubert_plugin.separation.inference import Autocast, optimize_for_inference, set_decode_tile
    from pahubert_plugin.separation.overlap import apply_model

    if mode == "save":  # our models: a checkpoint file for the memory runs
        torch.manual_seed(0)
        model, segment = BUILDERS[name]()
        save_checkpoint(model, segment, path)
        return {"model": name, "checkpoint": path}
    if mode != "rtf" and checkpoint:  # memory, loaded as pahubert-separate loads it: nothing built here
        return memory_worker(None, None, path, mode, "bf16" if variant == "bf16" else "fp32", checkpoint,
                             tile if variant == "tile" else 0.0, optimize=variant != "fp32") \
            | {"model": name, "seconds": seconds, "loaded": "checkpoint"}
    torch.manual_seed(0)
    model, segment = BUILDERS[name]()
    model.eval()
    params = sum(p.numel() for p in model.parameters())
    if mode != "rtf":  # memory: nothing else runs in this process before the separation
        if variant != "fp32":
            model = optimize_for_inference(model)
        if variant == "tile":
            set_decode_tile(model, tile)
        return memory_worker(model, segment, path, mode, "bf16" if variant == "bf16" else "fp32") \
            | {"model": name, "seconds": seconds, "loaded": "built"}
    x = 0.1 * torch.randn(2, int(seconds * SR))
    seg = int(segment * SR)
    max_diff = None
    if variant != "fp32":
        with torch.inference_mode():
            ref = model(x[None, :, :seg])
        model = optimize_for_inference(model)
        if variant == "bf16":
            model = Autocast(model, "bf16")
        if variant == "tile":
            set_decode_tile(model, tile)
        with torch.inference_mode():
            max_diff = float((model(x[None, :, :seg]) - ref).abs().max() / x[:, :seg].abs().max())
    chunk = 0.1 * torch.randn(2, seg)  # one full segment
    apply_model(model, chunk, seg)  # warm-up (allocator, mkldnn)
    times, chunk_times = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        apply_model(model, x, seg, overlap=OVERLAP)
        times.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        apply_model(model, chunk, seg, overlap=OVERLAP)
        chunk_times.append(time.perf_counter() - t0)
    # a long track is separated in chunks of the segment, one every (1 - overlap) x segment seconds
    hop = segment * (1 - OVERLAP)
    return {"model": name, "variant": variant, "params_M": params / 1e6, "segment_s": segment,
            "seconds": seconds, "wall_s": min(times), "rtf": min(times) / seconds, "max_diff": max_diff,
            "chunk_s": min(chunk_times), "rtf_long": min(chunk_times) / hop}


KEEP_GPU_PAGES = "PAHUBERT_BENCH_KEEP_GPU_PAGES"  # how main tells its workers --keep-gpu-pages
DROP_GPU_PAGES = os.environ.get(KEEP_GPU_PAGES) != "1"


class Described(torch.nn.Module):
    """Any builder's model with what :class:`~pahubert_plugin.separation.api.Separator` reads from ours
    (``sources``, ``sample_rate``, ``audio_channels``): every builder's model is 44.1 kHz stereo in
    :data:`SOURCES` order."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model, self.sources, self.sample_rate, self.audio_channels = model, SOURCES, SR, 2

    def forward(self, mixture: torch.Tensor) -> torch.Tensor:
        return self.model(mixture)


PEERS = ("umxl", "htdemucs")  # not fairseq models: memory runs always build them in the process
FAIRSEQ_NAMES = {"ResUNetModel": "resunet", "PahubertResUNetModel": "pahubert_resunet",
                 "DemucsV2Model": "demucs_v2", "DemucsV2HubertModel": "demucs_v2_hubert"}


def save_checkpoint(model, segment: float, path: str) -> None:
    """``model`` (one of ours, random weights) as the fine-tuned fairseq checkpoint a user would hand to
    ``pahubert-separate``: ``cfg`` (task ``music_separation`` at 44.1 kHz stereo, :data:`SOURCES`, chunks of
    ``segment`` seconds; the model's config with what its ``build_model`` saves, e.g. the encoder
    architecture) and the weights. No optimizer state (the loader maps the file and never reads it)."""
    from omegaconf import OmegaConf

    name = FAIRSEQ_NAMES[type(model).__name__]
    cfg = OmegaConf.to_container(OmegaConf.create(model.bench_cfg), resolve=True, enum_to_str=True)
    cfg.update({"_name": name, **OmegaConf.to_container(OmegaConf.create(getattr(model, "config_updates", {})),
                                                        resolve=True, enum_to_str=True)})
    task = {"_name": "music_separation", "data": "", "sources": list(SOURCES), "sample_rate": SR,
            "audio_channels": 2, "segment": segment, "valid_segment": segment}
    torch.save({"cfg": {"task": task, "model": cfg}, "model": model.state_dict(),
                "optimizer_history": [{"criterion_name": "SeparationCriterion", "optimizer_name": "Adam",
                                       "lr_scheduler_state": {}, "num_updates": 0}],
                "extra_state": {}, "last_optimizer_state": None}, path)


def memory_worker(model, segment: Optional[float], path: str, mode: str, precision: str = "fp32",
                  checkpoint: str = "", tile: float = 0.0, optimize: bool = True) -> dict:
    """Separate the WAV at ``path`` to 16-bit stems (``stream``: as pahubert-separate; ``memory``: the
    whole track in memory) into a temporary folder next to it; peak RSS of this process. With
    ``checkpoint`` (our models) the model is loaded from that file as ``pahubert-separate`` does
    (``Separator.from_checkpoint``: the weights mapped, not copied), else ``model`` is used as built."""
    from pahubert_plugin.separation import Separator, save_stems
    from pahubert_plugin.separation.memory import drop_gpu_library_pages, return_freed_memory

    return_freed_memory()  # as pahubert-separate's main does
    if checkpoint:
        sep = Separator.from_checkpoint(checkpoint, "cpu", segment, precision=precision, optimize=optimize,
                                        tile=tile)  # segment None: the one saved in the checkpoint
    else:
        sep = Separator(Described(model), segment, precision=precision)
    if DROP_GPU_PAGES:
        drop_gpu_library_pages()  # as pahubert-separate's main does on the CPU
    model_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    out = tempfile.mkdtemp(prefix="rss-", dir=os.path.dirname(path))
    t0 = time.perf_counter()
    try:
        if mode == "stream":
            sep.separate_to_files(path, out, "song")
        else:
            stems, sr = sep.separate_file(path)
            save_stems(stems, sr, out, "song")
    finally:
        shutil.rmtree(out)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"peak_rss_mb": peak, "model_rss_mb": model_rss, "delta_mb": peak - model_rss,
            "wall_s": time.perf_counter() - t0}


def write_noise(path: str, seconds: float, block: int = 1 << 20) -> None:
    """``seconds`` of stereo 44.1 kHz noise as 16-bit WAV, written in blocks (this process stays small)."""
    import numpy as np
    import soundfile as sf

    rng = np.random.default_rng(0)
    left = int(seconds * SR)
    with sf.SoundFile(path, "w", SR, 2, subtype="PCM_16") as f:
        while left > 0:
            n = min(block, left)
            f.write((0.1 * rng.standard_normal((n, 2))).astype(np.float32))
            left -= n


def run_worker(name, mode, seconds, repeats, threads, variant="fp32", path="", tile=2.5, checkpoint="") -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONWARNINGS="ignore")
    env[KEEP_GPU_PAGES] = "1" if not DROP_GPU_PAGES else "0"
    proc = subprocess.run([sys.executable, __file__, "--worker", name, "--mode", mode, "--seconds", str(seconds),
                           "--repeats", str(repeats), "--variant", variant, "--path", path, "--tile", str(tile),
                           "--checkpoint", checkpoint], env=env, capture_output=True, text=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        return {"model": name, "error": (proc.stderr or proc.stdout)[-500:]}
    return json.loads(lines[-1])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default=",".join(BUILDERS), help=f"comma list of {list(BUILDERS)}")
    p.add_argument("--seconds", type=float, default=30.0,
                   help="input length for the real-time factor (0: memory runs only)")
    p.add_argument("--memory-seconds", default="60,600",
                   help="comma list of input lengths (s) for peak memory ('' or 0: skip)")
    p.add_argument("--memory-path", default="stream", choices=["stream", "memory"],
                   help="stream: block by block, as pahubert-separate; memory: the whole track in memory")
    p.add_argument("--repeats", type=int, default=2, help="timed repeats (best is reported)")
    p.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch threads per model")
    p.add_argument("--variants", default="fp32",
                   help="comma list of fp32 (as built), opt (BatchNorm folded + channels_last, what "
                        "pahubert-separate runs), bf16 (opt under bfloat16 autocast, --precision bf16), "
                        "tile (opt decoding each chunk in time tiles of --tile seconds, pahubert-separate "
                        "--tile; pahubert_resunet models only). Memory runs use every variant")
    p.add_argument("--tile", type=float, default=2.5, help="tile length (s) of the tile variant (default 2.5)")
    p.add_argument("--out", default=None, help="also write the results as JSON here")
    p.add_argument("--keep-gpu-pages", action="store_true",
                   help="memory runs keep the CUDA libraries' resident pages (pahubert-separate drops them on "
                        "the CPU: pahubert_plugin.separation.memory.drop_gpu_library_pages); for the before/after figure")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--mode", default="rtf", help=argparse.SUPPRESS)
    p.add_argument("--variant", default="fp32", help=argparse.SUPPRESS)
    p.add_argument("--path", default="", help=argparse.SUPPRESS)
    p.add_argument("--checkpoint", default="", help=argparse.SUPPRESS)
    p.add_argument("--from-built", action="store_true",
                   help="memory runs use the model built in the measuring process (random weights, the older "
                        "method) instead of loading our models from a checkpoint file as pahubert-separate "
                        "does (HT-Demucs and UMX-L are always built)")
    args = p.parse_args(argv)
    global DROP_GPU_PAGES
    if args.keep_gpu_pages:
        DROP_GPU_PAGES = False
    if args.worker:
        print(json.dumps(worker(args.worker, args.mode, args.seconds, args.repeats, args.variant, args.path,
                                args.tile, args.checkpoint)))
        return 0
    names = [n for n in args.models.split(",") if n]
    unknown = [n for n in names if n not in BUILDERS]
    if unknown:
        p.error(f"unknown models {unknown}; choose from {list(BUILDERS)}")
    variants = [v for v in args.variants.split(",") if v]
    if any(v not in VARIANTS for v in variants):
        p.error(f"--variants: choose from {list(VARIANTS)}")
    try:
        lengths = sorted({float(v) for v in args.memory_seconds.split(",") if v and float(v) > 0})
    except ValueError:
        p.error(f"--memory-seconds: a comma list of seconds, got {args.memory_seconds!r}")
    tmp = tempfile.mkdtemp(prefix="bench-separate-")
    try:
        inputs = {}
        for seconds in lengths:
            inputs[seconds] = os.path.join(tmp, f"noise{seconds:g}.wav")
            write_noise(inputs[seconds], seconds)
        results = []
        for name in names:
            for variant in variants:
                r = (run_worker(name, "rtf", args.seconds, args.repeats, args.threads, variant, tile=args.tile)
                     if args.seconds > 0 else {"model": name, "variant": variant})
                if "error" not in r and inputs:
                    ckpt = ""
                    if not args.from_built and name not in PEERS:
                        ckpt = os.path.join(tmp, f"{name}.pt")
                        if not os.path.exists(ckpt):
                            saved = run_worker(name, "save", 0, 1, args.threads, path=ckpt)
                            if "error" in saved:
                                r["memory_error"] = saved["error"]
                                ckpt = None
                    if ckpt is not None:
                        r["memory"] = {s: run_worker(name, args.memory_path, s, 1, args.threads, variant, path,
                                                     args.tile, ckpt) for s, path in inputs.items()}
                results.append(r)
                print(json.dumps(r), flush=True)
    finally:
        shutil.rmtree(tmp)
    memory = (f"peak RSS separating {', '.join(f'{s:g}' for s in lengths)} s to 16-bit WAV stems "
              f"({args.memory_path} path, CUDA library pages {'dropped' if DROP_GPU_PAGES else 'kept'})"
              if lengths else "no memory runs")
    bf16 = "native bfloat16" if cpu_has_native_bf16() else "bfloat16 emulated (no AVX512-BF16 / AMX)"
    print(f"\n{args.seconds:g} s stereo 44.1 kHz, {args.threads} threads, CPU: {os.cpu_count()} cores, "
          f"{torch.backends.cpu.get_cpu_capability()}, {bf16}; {memory}")
    htdemucs = {r["variant"]: r for r in results if r.get("model") == "htdemucs" and "rtf" in r}
    mem_cols = "".join(f" peak RSS {s:g} s (MB) |" for s in lengths)
    print(f"| model | variant | params (M) | segment (s) | RTF | RTF vs htdemucs fp32 | RTF vs htdemucs, same variant "
          f"| RTF long track | long vs htdemucs fp32 | long vs htdemucs, same variant "
          f"| max diff vs fp32 / peak |{mem_cols}{' longest / shortest |' if len(lengths) > 1 else ''}")
    print("|---" * (11 + len(lengths) + (len(lengths) > 1)) + "|")
    for r in results:
        if "error" not in r and "rtf" not in r:  # --seconds 0: memory runs only (the table below)
            continue
        if "error" in r:
            print(f"| {r['model']} | {r.get('variant', '?')} | error: "
                  f"{r['error'].splitlines()[-1] if r['error'] else '?'} |")
            continue
        ratio = " | ".join(f"{r['rtf'] / htdemucs[v]['rtf']:.2f}" if v in htdemucs else "-"
                           for v in ("fp32", r["variant"]))
        long = " | ".join(f"{r['rtf_long'] / htdemucs[v]['rtf_long']:.2f}" if v in htdemucs else "-"
                          for v in ("fp32", r["variant"]))
        diff = "-" if r.get("max_diff") is None else f"{r['max_diff']:.1e}"
        mem = r.get("memory", {})
        peaks = [mem.get(s, {}).get("peak_rss_mb") for s in lengths]
        cells = "".join(f" {v:.0f} |" if v is not None else " - |" for v in peaks)
        if len(lengths) > 1:
            cells += f" {peaks[-1] / peaks[0]:.3f} |" if None not in peaks else " - |"
        print(f"| {r['model']} | {r['variant']} | {r['params_M']:.2f} | {r['segment_s']:.1f} | {r['rtf']:.3f} | "
              f"{ratio} | {r['rtf_long']:.3f} | {long} | {diff} |{cells}")
    if lengths:  # what each memory run took: the tile variant's time cost next to its saving
        print("\n| model | variant | input (s) | peak RSS (MB) | RSS with the model built (MB) | wall (s) |")
        print("|---" * 6 + "|")
        for r in results:
            for sec, m in r.get("memory", {}).items():
                if "error" in m:
                    print(f"| {r['model']} | {r['variant']} | {sec:g} | error: {m['error'].splitlines()[-1]} |")
                else:
                    print(f"| {r['model']} | {r['variant']} | {sec:g} | {m['peak_rss_mb']:.0f} | "
                          f"{m['model_rss_mb']:.0f} | {m['wall_s']:.2f} |")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
