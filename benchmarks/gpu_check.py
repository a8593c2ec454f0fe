"""The base recipes on one accelerator: throughput, model FLOP utilisation, memory and bf16 numerics.

Steps (each a subcommand, run by benchmarks/gpu_check.sh in its own process under its own
``timeout``; every step appends JSON records to ``$OUT/gpu_check.jsonl`` and ``table`` prints them):

* ``info``       device, library versions, the card's peak table row, the attention path;
* ``pretrain``   the ``pahubert`` pretraining step (model + criterion, synthetic batch of the config's
                 size, random labels, Adam step, gradient clipping) in fp32, fp16 autocast with a
                 GradScaler, bf16 autocast, bf16 with attention forced onto SDPA's math kernel (what the
                 fused kernels buy), bf16 with ``torch.compile`` of the transformer;
* ``maxbatch``   the largest pretraining batch that fits (bf16; the batch doubles until out of memory);
* ``finetune``   the ``resunet``, ``pahubert_resunet`` and ``demucs_v2_hubert`` fine-tuning step (L1 on
                 waveforms, Adam, clipping) in fp32 and bf16 autocast;
* ``separate``   separation real-time factor of every base model and HT-Demucs on the same input, fp32
                 and bf16 autocast, and the bf16 estimates' largest difference from fp32 over the mixture's
                 peak;
* ``numerics``   N pretraining updates on a real corpus (MIDI songs with MFCC k-means labels, carried by
                 ``prepare``), fp32 and bf16 from the same seed on the same batches: loss curves (TSV +
                 PNG) and a verdict;
* ``prepare``    (CPU, before the device run) renders the corpus and its labels into ``exp/gpu_carry``.

Figures per step: parameters; updates/s; audio seconds per second; peak memory
(``torch.cuda.max_memory_allocated``; on the CPU the process' peak RSS, which only grows);
model FLOP/s = FLOPs of one step x updates/s, where the FLOPs of one forward + backward are counted
by ``torch.utils.flop_counter.FlopCounterMode`` (matrix products, convolutions and attention only;
the optimizer step and element-wise work are not counted), and MFU = model FLOP/s / the card's
dense peak for the step's precision (:data:`PEAKS`; an unknown card or the CPU: n/a).

``--local``: the tiny configs, a couple of updates, on the CPU (what tests/test_gpu_check.py runs).
"""
import argparse
import contextlib
import functools
import json
import math
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
from omegaconf import OmegaConf
from torch.utils.flop_counter import FlopCounterMode

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import pahubert_plugin  # noqa: E402,F401
from pahubert_plugin.configs import load_recipe_config  # noqa: E402

import bench_pretrain  # noqa: E402  (benchmarks/)
import fairseq_runs  # noqa: E402  (benchmarks/)

FT_CONF = REPO / "recipes" / "musdb" / "conf"
PRETRAIN_CONF = bench_pretrain.CONF
SOURCES = ["drums", "bass", "other", "vocals"]
CARRY = REPO / "exp" / "gpu_carry"
RESULTS = "gpu_check.jsonl"

# Dense peak rates (TFLOP/s) by device name, from the vendor's datasheets (SXM parts unless named).
# The first entry whose key is in torch.cuda.get_device_name() wins, so the longer names come first.
PEAKS = [
    ("H100 PCIe", {"bf16": 756.0, "fp16": 756.0, "fp32": 51.0},
     "NVIDIA H100 PCIe datasheet (dense, without sparsity)"),
    ("H100 NVL", {"bf16": 835.0, "fp16": 835.0, "fp32": 60.0},
     "NVIDIA H100 NVL datasheet (dense, without sparsity)"),
    ("H100", {"bf16": 989.0, "fp16": 989.0, "fp32": 67.0},
     "NVIDIA H100 SXM datasheet (dense, without sparsity)"),
    ("H200", {"bf16": 989.0, "fp16": 989.0, "fp32": 67.0},
     "NVIDIA H200 SXM datasheet (dense, without sparsity: the H100's rates); an 8192^3 bf16 matrix "
     "product measured about 790 TFLOP/s on this workplace's H200 and 798 on its H100"),
    ("A100", {"bf16": 312.0, "fp16": 312.0, "fp32": 19.5},
     "NVIDIA A100 datasheet (dense, without sparsity)"),
]
MATH_PRECISION = {"fp32": "fp32", "fp16": "fp16", "bf16": "bf16", "bf16-math": "bf16", "bf16-compile": "bf16"}


# ---------------------------------------------------------------- FLOPs, peaks, MFU (unit-tested)
def card_peak(device_name, precision):
    """(dense peak FLOP/s, source) of the card named ``device_name`` for ``precision`` (fp32/fp16/bf16);
    (None, reason) for the CPU or a card not in :data:`PEAKS`."""
    if not device_name or device_name.lower().startswith("cpu"):
        return None, "CPU: no peak table"
    for key, rates, source in PEAKS:
        if key.lower() in device_name.lower():
            return rates[MATH_PRECISION.get(precision, precision)] * 1e12, source
    return None, f"{device_name!r} is not in the peak table"


def count_flops(fn):
    """FLOPs ``torch.utils.flop_counter.FlopCounterMode`` counts while ``fn()`` runs (matrix products,
    convolutions, attention), and the attention ops it saw: (total, {op name: FLOPs})."""
    counter = FlopCounterMode(display=False)
    with counter:
        fn()
    ops = {str(op): int(n) for op, n in counter.get_flop_counts().get("Global", {}).items()}
    return int(counter.get_total_flops()), ops


def mfu(flops_per_step, updates_per_s, peak):
    """(achieved model FLOP/s, its fraction of ``peak``; None without a peak)."""
    achieved = flops_per_step * updates_per_s
    return achieved, (achieved / peak if peak else None)


def fmt(value, spec, missing="n/a"):
    return missing if value is None or (isinstance(value, float) and not math.isfinite(value)) else format(value, spec)


# ---------------------------------------------------------------- device, memory, records
def device_name(device):
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"


def reset_peak(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory(device):
    """(GiB, what) peak memory since :func:`reset_peak`: GPU allocations, or the process' peak RSS."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 30, "GPU max_memory_allocated"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20, "process peak RSS"


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def record(out, **row):
    """Append one JSON record to OUT/gpu_check.jsonl (the table step reads them)."""
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, RESULTS), "a") as f:
        f.write(json.dumps(row) + "\n")


def autocast(device, precision):
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(MATH_PRECISION.get(precision, precision))
    return torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None)


def skip_reason(device, precision):
    if precision == "fp16" and device.type != "cuda":
        return "fp16 autocast with a GradScaler needs CUDA (the CPU has no fast fp16 training path)"
    if precision == "bf16-math" and device.type != "cuda":
        return "the SDPA backend comparison is for CUDA (the CPU has one fused kernel)"
    return None


# ---------------------------------------------------------------- models from the recipe configs
def pretrain_config(local):
    return "tiny" if local else "base"


def build_pretraining(name, device, seed=0):
    """The pretraining model + criterion of recipes/pahubert/conf/pretrain/NAME.yaml (bench_pretrain.build)."""
    torch.manual_seed(seed)
    model, criterion, task = bench_pretrain.build(name, device)
    return model, criterion, task


def synthetic_pretraining_batch(name, task, bsz, length, device, seed=0):
    gen = torch.Generator().manual_seed(seed)
    frames = length // (task.sample_rate // 100)
    return {
        "id": torch.arange(bsz),
        "net_input": {"source": (0.1 * torch.randn(bsz, task.audio_channels, length, generator=gen)).to(device),
                      "padding_mask": torch.zeros(bsz, length, dtype=torch.bool, device=device)},
        "target_list": [torch.randint(4, bench_pretrain.CLUSTERS[name] + 4, (bsz, frames), generator=gen).to(device)],
    }


def pretraining_optimizer(name, params):
    """The config's Adam (betas, eps, weight decay, peak lr) as torch.optim.Adam, and its clip norm."""
    yaml = load_recipe_config(PRETRAIN_CONF / f"{name}.yaml")
    betas = tuple(float(b) for b in str(yaml.optimizer.adam_betas).strip("()[]").split(","))
    return (torch.optim.Adam(params, lr=float(yaml.optimization.lr[0]), betas=betas, eps=float(yaml.optimizer.adam_eps),
                             weight_decay=float(yaml.optimizer.get("weight_decay", 0.0))),
            float(yaml.optimization.clip_norm))


def make_step(model, criterion, optimizer, clip, device, precision):
    """One training update: autocast forward + criterion, (scaled) backward, unscale, clip, step.
    Returns a function ``step(sample) -> loss per sample_size (float)``."""
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    params = [p for g in optimizer.param_groups for p in g["params"]]
    math_only = precision == "bf16-math"

    def step(sample):
        optimizer.zero_grad(set_to_none=True)
        ctx = (torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH) if math_only
               else contextlib.nullcontext())
        with ctx, autocast(device, precision):
            loss, sample_size, _ = criterion(model, sample)
            loss = loss / max(float(sample_size), 1.0)
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(params, clip)
        scaler.step(optimizer)
        scaler.update()
        return float(loss.detach())

    return step


@contextlib.contextmanager
def sdpa_calls():
    """Counts calls of ``torch.nn.functional.scaled_dot_product_attention`` (what
    ``F.multi_head_attention_forward``, and so fairseq's MultiheadAttention, calls with need_weights=False)."""
    calls = []
    original = torch.nn.functional.scaled_dot_product_attention

    def counted(*a, **k):
        calls.append(1)
        return original(*a, **k)

    torch.nn.functional.scaled_dot_product_attention = counted
    try:
        yield calls
    finally:
        torch.nn.functional.scaled_dot_product_attention = original


def forward_backward_flops(model, criterion, sample, device, precision="fp32"):
    """FLOPs of one forward + backward (no optimizer step) counted by FlopCounterMode, the ops it saw
    (attention ops added as ``sdpa_calls``: how many times SDPA ran)."""
    def fb():
        with autocast(device, precision):
            loss, sample_size, _ = criterion(model, sample)
        (loss / max(float(sample_size), 1.0)).backward()
    with sdpa_calls() as calls:
        total, ops = count_flops(fb)
    ops["sdpa_calls"] = len(calls)
    model.zero_grad(set_to_none=True)
    return total, ops


def attention_ops(ops):
    return sorted(op for op in ops if "attention" in op)


NO_KERNEL = "none (no FLOP formula for the CPU kernel: attention FLOPs not in the count)"


def attention_line(ops):
    kernels = attention_ops(ops)
    return (f"F.scaled_dot_product_attention called {ops.get('sdpa_calls', 0)} times in one forward+backward; "
            f"kernels counted: {', '.join(kernels) if kernels else NO_KERNEL}")


def separation_models(local):
    """name -> (recipe config, builder() -> (model, sample rate, batch, segment seconds)) of the
    fine-tuning configs (base, or tiny with ``local``), built from recipes/musdb/conf as fairseq would."""
    from pahubert_plugin.models.demucs_v2_hubert import DemucsV2HubertConfig, DemucsV2HubertModel
    from pahubert_plugin.models.pahubert_resunet import PahubertResUNetConfig, PahubertResUNetModel
    from pahubert_plugin.models.resunet import ResUNetConfig, ResUNetModel

    def musdb(config):
        yaml = load_recipe_config(FT_CONF / config)
        task = {"sources": list(yaml.task.sources), "sample_rate": int(yaml.task.sample_rate),
                "audio_channels": int(yaml.task.audio_channels)}
        return yaml, task

    def resunet():
        yaml, task = musdb("tiny.yaml" if local else "base.yaml")
        model_over = {k: v for k, v in OmegaConf.to_container(yaml.model).items() if k != "_name"}
        cfg = OmegaConf.merge(OmegaConf.structured(ResUNetConfig), model_over, task)
        return ResUNetModel(cfg), yaml, task

    def pahubert_resunet():
        yaml, task = musdb("pahubert_tiny.yaml" if local else "pahubert_base.yaml")
        enc_cfg, _, _, _ = bench_pretrain.load_config(pretrain_config(local))  # the pretraining encoder
        enc = OmegaConf.to_container(enc_cfg, resolve=True)
        if int(enc["sample_rate"]) != task["sample_rate"]:
            raise ValueError(f"pretraining config samples at {enc['sample_rate']} Hz, fine-tuning at "
                             f"{task['sample_rate']} Hz")
        model_over = {k: v for k, v in OmegaConf.to_container(yaml.model).items()
                      if k not in ("_name", "pretrained_checkpoint")}
        # the whole network trains: the encoder's frozen phase (freeze_encoder_updates) is the cheaper start
        cfg = OmegaConf.merge(OmegaConf.structured(PahubertResUNetConfig), model_over, task,
                              {"pretrained_checkpoint": "", "freeze_encoder_updates": 0})
        return PahubertResUNetModel(cfg, enc), yaml, task

    def demucs_v2_hubert():
        yaml, task = musdb("demucs_v2_hubert_tiny.yaml" if local else "demucs_v2_hubert_base.yaml")
        cfg = OmegaConf.merge(OmegaConf.structured(DemucsV2HubertConfig), yaml.model)
        model = DemucsV2HubertModel(cfg, task["audio_channels"], task["sample_rate"], sources=task["sources"])
        return model, yaml, task

    return {"resunet": resunet, "pahubert_resunet": pahubert_resunet, "demucs_v2_hubert": demucs_v2_hubert}


def build_htdemucs(local, sample_rate):
    """HT-Demucs (demucs 4's ``HTDemucs`` class defaults), random weights, nothing downloaded; ``local``:
    8 channels at the tiny configs' rate, so the CPU check stays short."""
    from demucs.htdemucs import HTDemucs

    if local:
        return HTDemucs(sources=SOURCES, samplerate=sample_rate, segment=2, channels=8)
    return HTDemucs(sources=SOURCES)


def n_params(model):
    return sum(p.numel() for p in model.parameters())


# ---------------------------------------------------------------- steps
def time_steps(step, sample, device, warmup, updates):
    for _ in range(warmup):
        step(sample)
    sync(device)
    reset_peak(device)
    t0 = time.perf_counter()
    losses = [step(sample) for _ in range(updates)]
    sync(device)
    return (time.perf_counter() - t0) / updates, losses


def cmd_info(args, device):
    from fairseq.modules import multihead_attention

    name = device_name(device)
    row = {"step": "info", "device": name, "torch": torch.__version__, "cuda": torch.version.cuda}
    try:
        import fairseq
        row["fairseq"] = fairseq.__version__
    except Exception as e:  # noqa: BLE001
        row["fairseq"] = f"? ({e})"
    print(f"device: {name}; torch {torch.__version__} (CUDA {torch.version.cuda}); fairseq {row['fairseq']}")
    for precision in ("fp32", "bf16"):
        peak, source = card_peak(name, precision)
        row[f"peak_{precision}"] = peak
        row["peak_source"] = source
        print(f"peak {precision}: {fmt(peak and peak / 1e12, '.0f')} TFLOP/s dense ({source})")
    if device.type == "cuda":
        row["tf32"] = {"matmul": torch.backends.cuda.matmul.allow_tf32, "cudnn": torch.backends.cudnn.allow_tf32}
        print(f"TF32 (as PyTorch's defaults are): matmul {row['tf32']['matmul']}, cuDNN convolutions "
              f"{row['tf32']['cudnn']}: the fp32 steps' convolutions run in TF32 on the tensor cores, "
              f"MFU still against the fp32 peak")
    src = Path(multihead_attention.__file__).read_text()
    row["attention"] = ("fairseq MultiheadAttention -> F.multi_head_attention_forward -> "
                        "F.scaled_dot_product_attention (need_weights=False)"
                        if "F.multi_head_attention_forward" in src else "fairseq's own attention (no SDPA)")
    print(f"attention path: {row['attention']}; fairseq has no switch for it and none is needed: "
          f"the kernel SDPA picks is read from the FLOP counter's ops in the pretrain step")
    record(args.out, **row)
    return 0


def cmd_pretrain(args, device):
    name = pretrain_config(args.local)
    cfg, task, _, dataset = bench_pretrain.load_config(name)
    bsz, length = bench_pretrain.default_batch(name, task, dataset)
    bsz = args.batch or bsz
    if args.seconds:
        length = int(args.seconds * task.sample_rate)
    dev = device_name(device)
    flops = ops = None
    for precision in args.variants.split(","):
        reason = skip_reason(device, precision)
        if reason:
            print(f"pahubert {name} {precision}: skipped ({reason})", flush=True)
            record(args.out, step="pretrain", model="pahubert", config=name, variant=precision, skipped=reason)
            continue
        model, criterion, task = build_pretraining(name, device)
        model.train()
        sample = synthetic_pretraining_batch(name, task, bsz, length, device)
        try:
            if flops is None:  # counted once, before any compilation, under the first variant's autocast
                flops, ops = forward_backward_flops(model, criterion, sample, device, MATH_PRECISION[precision])
                print(f"pahubert {name}: {flops / 1e12:.3f} TFLOP per forward+backward (FlopCounterMode: "
                      f"matmul, conv, attention; batch {bsz} x {length / task.sample_rate:.2f} s); "
                      f"{attention_line(ops)}", flush=True)
        except Exception as e:  # noqa: BLE001  (out of memory in fp32, say: the next variant counts)
            msg = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            print(f"pahubert {name} {precision}: FLOP count failed: {msg[:300]}", flush=True)
            record(args.out, step="pretrain", model="pahubert", config=name, variant=precision, error=msg[:300])
            del model, criterion, sample
            reset_peak(device)
            continue
        note = ""
        if precision == "bf16-compile":
            try:
                model.encoder.transformer = torch.compile(model.encoder.transformer, backend=args.compile_backend)
                note = f"torch.compile(model.encoder.transformer, backend={args.compile_backend!r})"
            except Exception as e:  # noqa: BLE001
                print(f"pahubert {name} {precision}: torch.compile failed: {type(e).__name__}: "
                      f"{str(e).splitlines()[0] if str(e) else ''}", flush=True)
                record(args.out, step="pretrain", model="pahubert", config=name, variant=precision,
                       error=f"torch.compile: {type(e).__name__}: {e}"[:300])
                continue
        optimizer, clip = pretraining_optimizer(name, model.parameters())
        step = make_step(model, criterion, optimizer, clip, device, precision)
        try:
            t0 = time.perf_counter()
            sec, losses = time_steps(step, sample, device, args.warmup, args.updates)
            first = time.perf_counter() - t0
        except Exception as e:  # noqa: BLE001
            msg = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            print(f"pahubert {name} {precision}: failed: {msg[:300]}", flush=True)
            record(args.out, step="pretrain", model="pahubert", config=name, variant=precision, error=msg[:300])
            del model, criterion, optimizer, step
            reset_peak(device)
            continue
        mem, mem_what = peak_memory(device)
        ups = 1.0 / sec
        peak, _ = card_peak(dev, precision)
        achieved, frac = mfu(flops, ups, peak)
        audio = ups * bsz * length / task.sample_rate
        row = dict(step="pretrain", model="pahubert", config=name, variant=precision, device=dev,
                   params=n_params(model), batch=bsz, seconds=length / task.sample_rate, updates_per_s=ups,
                   audio_s_per_s=audio, flops_per_step=flops, achieved_flops=achieved, peak_flops=peak, mfu=frac,
                   peak_mem_gib=mem, mem_what=mem_what, loss=losses[-1], attention=attention_line(ops),
                   note=note, warmup_s=first - sec * args.updates)
        if note:
            note += f", first {args.warmup} updates (compilation) {first - sec * args.updates:.1f} s"
        record(args.out, **row)
        print(f"pahubert {name} {precision}: {ups:.3f} updates/s, {audio:.1f} audio-s/s, "
              f"{achieved / 1e12:.2f} TFLOP/s model FLOPs, MFU {fmt(frac, '.1%')}, peak memory {mem:.2f} GiB "
              f"({mem_what}), loss {losses[-1]:.3f}{'; ' + note if note else ''}", flush=True)
        del model, criterion, optimizer, step, sample
        reset_peak(device)
    return 0


def cmd_maxbatch(args, device):
    """Double the batch (bf16, the config's crop) until out of memory; the last that fit."""
    name = pretrain_config(args.local)
    _, task, _, dataset = bench_pretrain.load_config(name)
    bsz, length = bench_pretrain.default_batch(name, task, dataset)
    bsz = args.batch or bsz
    precision = "bf16" if device.type == "cuda" else "fp32"  # bf16 is emulated, slow, on most CPUs
    model, criterion, task = build_pretraining(name, device)
    model.train()
    optimizer, clip = pretraining_optimizer(name, model.parameters())
    step = make_step(model, criterion, optimizer, clip, device, precision)
    fit, tried, reason, mem = None, [], f"cap {args.max_batch}", None
    deadline = time.monotonic() + args.budget
    while bsz <= args.max_batch:
        if time.monotonic() > deadline:
            reason = f"time budget {args.budget:g} s"
            break
        tried.append(bsz)
        try:
            reset_peak(device)
            sample = synthetic_pretraining_batch(name, task, bsz, length, device)
            step(sample)
            sync(device)
            fit, mem = bsz, peak_memory(device)[0]
            print(f"pahubert {name} {precision}: batch {bsz} x {length / task.sample_rate:.2f} s fits, "
                  f"peak {mem:.2f} GiB", flush=True)
            del sample
        except torch.cuda.OutOfMemoryError:
            reason = f"batch {bsz}: torch.cuda.OutOfMemoryError"
            sample = None
            optimizer.zero_grad(set_to_none=True)
            reset_peak(device)
            break
        bsz *= 2
    print(f"pahubert {name} {precision}: largest batch that fits {fit} x {length / task.sample_rate:.2f} s "
          f"(stopped: {reason})", flush=True)
    record(args.out, step="maxbatch", model="pahubert", config=name, variant=precision, device=device_name(device),
           max_batch=fit, seconds=length / task.sample_rate, tried=tried, stopped=reason, peak_mem_gib=mem)
    return 0


def separation_batch(task, bsz, seconds, device, seed=0):
    gen = torch.Generator().manual_seed(seed)
    n = int(seconds * task["sample_rate"])
    target = 0.05 * torch.randn(bsz, len(task["sources"]), task["audio_channels"], n, generator=gen)
    return {"net_input": {"mixture": target.sum(1).to(device)}, "target": target.to(device)}


def cmd_finetune(args, device):
    from pahubert_plugin.criterions.separation import SeparationCriterion

    dev = device_name(device)
    for name, builder in separation_models(args.local).items():
        if args.models and name not in args.models.split(","):
            continue
        flops = None
        for precision in args.variants.split(","):
            reason = skip_reason(device, precision)
            if reason:
                print(f"{name} {precision}: skipped ({reason})", flush=True)
                record(args.out, step="finetune", model=name, variant=precision, skipped=reason)
                continue
            try:
                torch.manual_seed(0)
                model, yaml, task = builder()
                model.to(device).train()
                crit = SeparationCriterion(SimpleNamespace(sources=task["sources"]),
                                           float(yaml.criterion.wave_weight), float(yaml.criterion.stft_weight),
                                           sources=task["sources"])
                bsz = args.batch or int(yaml.dataset.batch_size)
                seconds = args.seconds or float(yaml.task.segment)
                sample = separation_batch(task, bsz, seconds, device)
                if flops is None:  # once per model, under the first variant's autocast
                    flops, _ = forward_backward_flops(model, crit, sample, device, precision)
                optimizer = torch.optim.Adam(model.parameters(), lr=float(yaml.optimization.lr[0]))
                step = make_step(model, crit, optimizer, float(yaml.optimization.get("clip_norm", 0) or 1e9),
                                 device, precision)
                sec, losses = time_steps(step, sample, device, args.warmup, args.updates)
            except Exception as e:  # noqa: BLE001
                msg = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]
                print(f"{name} {precision}: failed: {msg}", flush=True)
                record(args.out, step="finetune", model=name, variant=precision, error=msg)
                reset_peak(device)
                continue
            mem, mem_what = peak_memory(device)
            ups = 1.0 / sec
            peak, _ = card_peak(dev, precision)
            achieved, frac = mfu(flops, ups, peak)
            audio = ups * bsz * seconds
            record(args.out, step="finetune", model=name, variant=precision, device=dev, params=n_params(model),
                   batch=bsz, seconds=seconds, updates_per_s=ups, audio_s_per_s=audio, flops_per_step=flops,
                   achieved_flops=achieved, peak_flops=peak, mfu=frac, peak_mem_gib=mem, mem_what=mem_what,
                   loss=losses[-1])
            print(f"{name} {precision}: {n_params(model) / 1e6:.1f} M params, batch {bsz} x {seconds:g} s: "
                  f"{ups:.3f} updates/s, {audio:.1f} audio-s/s, {flops / 1e12:.3f} TFLOP/step, "
                  f"{achieved / 1e12:.2f} TFLOP/s, MFU {fmt(frac, '.1%')}, peak memory {mem:.2f} GiB ({mem_what})",
                  flush=True)
            del model, optimizer, step, sample
            reset_peak(device)
    return 0


def separate_chunks(model, mix, segment, overlap=0.25, batch=4):
    """``mix`` (channels, samples) -> (sources, channels, samples): chunks of ``segment`` samples every
    ``(1 - overlap) x segment``, run ``batch`` at a time, overlap-added with a triangular weight."""
    c, n = mix.shape
    hop = max(1, int(segment * (1 - overlap)))
    starts = list(range(0, max(n - segment, 0) + hop, hop))
    window = torch.minimum(torch.arange(1, segment + 1), torch.arange(segment, 0, -1)).float().to(mix.device)
    out, weight = None, torch.zeros(n, device=mix.device)
    for i in range(0, len(starts), batch):
        group = starts[i:i + batch]
        chunks = torch.stack([torch.nn.functional.pad(mix[:, s:s + segment], (0, s + segment - min(n, s + segment)))
                              for s in group])
        est = model(chunks).float()
        if out is None:
            out = torch.zeros(est.shape[1], c, n, device=mix.device)
        for j, s in enumerate(group):
            m = min(segment, n - s)
            out[..., s:s + m] += est[j, ..., :m] * window[:m]
            weight[s:s + m] += window[:m]
    return out / weight.clamp_min(1e-8)


def cmd_separate(args, device):
    dev = device_name(device)
    builders = dict(separation_models(args.local))
    sample_rate = 16000 if args.local else 44100
    builders["htdemucs"] = lambda: (build_htdemucs(args.local, sample_rate), None, {"sample_rate": sample_rate})
    gen = torch.Generator().manual_seed(0)
    mix = (0.1 * torch.randn(2, int(args.input_seconds * sample_rate), generator=gen)).to(device)
    peak_in = float(mix.abs().max())
    for name, builder in builders.items():
        try:
            torch.manual_seed(0)
            model, _, task = builder()
            if int(task["sample_rate"]) != sample_rate:
                raise ValueError(f"{name} is built at {task['sample_rate']} Hz, the input is {sample_rate} Hz")
            model.to(device).eval()
            segment = int((float(model.segment) if name == "htdemucs" else args.segment) * sample_rate)
            ref = None
            for precision in ("fp32", "bf16"):
                with torch.inference_mode(), autocast(device, precision):
                    first = model(mix[None, :, :segment]).float()  # warm-up, and the first segment's estimates
                    if ref is None:
                        ref = first
                    diff = float((first - ref).abs().max()) / peak_in
                    reset_peak(device)
                    times = []
                    for _ in range(args.repeats):
                        sync(device)
                        t0 = time.perf_counter()
                        separate_chunks(model, mix, segment)
                        sync(device)
                        times.append(time.perf_counter() - t0)
                mem, mem_what = peak_memory(device)
                rtf = min(times) / args.input_seconds
                record(args.out, step="separate", model=name, variant=precision, device=dev, params=n_params(model),
                       input_s=args.input_seconds, segment_s=segment / sample_rate, rtf=rtf,
                       audio_s_per_s=1.0 / rtf, max_diff_vs_fp32=diff if precision != "fp32" else None,
                       peak_mem_gib=mem, mem_what=mem_what)
                print(f"separate {name} {precision}: {n_params(model) / 1e6:.1f} M params, segment "
                      f"{segment / sample_rate:g} s: RTF {rtf:.4f} ({1 / rtf:.1f} audio-s/s) on "
                      f"{args.input_seconds:g} s, peak memory {mem:.2f} GiB ({mem_what})"
                      f"{f', max |bf16 - fp32| / mixture peak {diff:.2e}' if precision != 'fp32' else ''}", flush=True)
            del model, ref
            reset_peak(device)
        except Exception as e:  # noqa: BLE001
            msg = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]
            print(f"separate {name}: failed: {msg}", flush=True)
            record(args.out, step="separate", model=name, variant="-", error=msg)
            reset_peak(device)
    return 0


# ---------------------------------------------------------------- numerics on the carried corpus
def carried_data(carry, work):
    """The carried corpus as a pahubert_pretraining data folder under ``work`` (manifest rooted at the
    carried audio wherever the repo is)."""
    carry = Path(carry)
    for f in ("train.tsv", "train.km", "dict.km.txt"):
        if not (carry / f).is_file():
            raise SystemExit(f"numerics: {carry / f} is missing; run `python benchmarks/gpu_check.py prepare` "
                             f"on the CPU first (it writes {carry})")
    work = Path(work)
    work.mkdir(parents=True, exist_ok=True)
    rows = (carry / "train.tsv").read_text().splitlines()[1:]
    (work / "train.tsv").write_text(f"{(carry / 'audio').resolve()}\n" + "\n".join(rows) + "\n")
    shutil.copy(carry / "train.km", work / "train.km")
    shutil.copy(carry / "dict.km.txt", work / "dict.km.txt")
    return work


def collate_epoch(ds, group):
    epoch, indices = group
    ds.set_epoch(epoch)
    return ds.collater([ds[i] for i in indices])


def warmup_lr(optimizer, peak, warmup, update):
    for g in optimizer.param_groups:
        g["lr"] = peak * min(1.0, (update + 1) / warmup)


def cmd_numerics(args, device):
    from pahubert_plugin.criterions.pahubert import PahubertCriterion
    from pahubert_plugin.models.pahubert import PahubertModel

    name = pretrain_config(args.local)
    cfg, task_yaml, _, _ = bench_pretrain.load_config(name)
    length = int(args.seconds * task_yaml.sample_rate)
    work = tempfile.mkdtemp(prefix="gpu_check_numerics_")
    data = carried_data(args.data, work)
    task = bench_pretrain.corpus_task(name, data, length)
    ds = task.dataset("train")
    ds.set_epoch(1)
    rng = np.random.default_rng(args.seed)
    # batch i: random files, cropped by the dataset's own random crop of epoch i + 1 (a file's crop is drawn
    # from (seed, epoch, index)), so batches differ; drawn once, both precisions train on the same batches
    groups = [(i + 1, rng.choice(len(ds), size=args.batch, replace=len(ds) < args.batch).tolist())
              for i in range(args.updates)]
    t0 = time.perf_counter()
    loader = torch.utils.data.DataLoader(groups, batch_size=None, num_workers=min(8, os.cpu_count() or 1),
                                         collate_fn=functools.partial(collate_epoch, ds))
    batches = list(loader)
    print(f"numerics: {len(batches)} batches of {args.batch} x {args.seconds:g} s crops from {len(ds)} files "
          f"({data}) in {time.perf_counter() - t0:.1f} s; {len(task.dictionaries[0])} label classes", flush=True)
    curves, done = {}, args.updates
    for precision in args.precisions.split(","):
        reason = skip_reason(device, precision)
        if reason:
            print(f"numerics {precision}: skipped ({reason})", flush=True)
            continue
        torch.manual_seed(args.seed)
        np.random.seed(args.seed)  # fairseq's span masking draws from numpy's global generator
        model = PahubertModel.build_model(cfg, task).to(device).train()
        criterion = PahubertCriterion(task, *bench_pretrain._crit_args(name))
        optimizer, clip = pretraining_optimizer(name, model.parameters())
        peak_lr = optimizer.param_groups[0]["lr"]
        step = make_step(model, criterion, optimizer, clip, device, precision)
        losses, start = [], time.perf_counter()
        for i, batch in enumerate(batches[:done]):
            if time.perf_counter() - start > args.time_limit:
                print(f"numerics {precision}: time limit {args.time_limit:g} s reached after {i} updates", flush=True)
                break
            warmup_lr(optimizer, peak_lr, args.warmup_updates, i)
            sample = {**batch, "net_input": {k: v.to(device) if torch.is_tensor(v) else v
                                             for k, v in batch["net_input"].items()},
                      "target_list": [t.to(device) for t in batch["target_list"]]}
            losses.append(step(sample))
        sync(device)
        elapsed = time.perf_counter() - start
        done = min(done, len(losses))  # the next precision runs the same updates
        curves[precision] = losses
        print(f"numerics {precision}: {len(losses)} updates in {elapsed:.1f} s ({len(losses) / elapsed:.2f} updates/s),"
              f" loss {losses[0]:.3f} -> {losses[-1]:.3f}", flush=True)
        del model, optimizer, step
        reset_peak(device)
    verdict = numerics_verdict({k: v[:done] for k, v in curves.items()})
    tsv = os.path.join(args.out, "numerics.tsv")
    names = list(curves)
    with open(tsv, "w") as f:
        f.write("update\t" + "\t".join(f"loss_{p}" for p in names) + "\n")
        for i in range(done):
            f.write(f"{i + 1}\t" + "\t".join(f"{curves[p][i]:.6f}" for p in names) + "\n")
    png = plot_curves(curves, done, os.path.join(args.out, "numerics.png"),
                      f"pahubert {name}, batch {args.batch} x {args.seconds:g} s, {device_name(device)}")
    print(f"numerics: loss curves {tsv}{', ' + png if png else ''}", flush=True)
    print(f"numerics verdict: {verdict['line']}", flush=True)
    record(args.out, step="numerics", model="pahubert", config=name, device=device_name(device), updates=done,
           batch=args.batch, seconds=args.seconds, **{k: v for k, v in verdict.items()})
    shutil.rmtree(work, ignore_errors=True)
    return 0


def numerics_verdict(curves, tolerance=0.01, window=100):
    """bf16 matches fp32 when the mean loss of the last ``window`` updates (a third of the run if
    shorter) is within ``tolerance`` relative and neither run diverged (a non-finite loss, or a final
    mean above 1.5x the first 10 updates' mean)."""
    if "fp32" not in curves or "bf16" not in curves or not curves["fp32"]:
        return {"match": None, "line": f"n/a (runs: {', '.join(f'{k} {len(v)} updates' for k, v in curves.items())})"}
    n = len(curves["fp32"])
    w = min(window, max(1, n // 3))
    out = {"window": w}
    for p in ("fp32", "bf16"):
        loss = np.asarray(curves[p], dtype=float)
        out[f"final_{p}"] = float(loss[-w:].mean())
        out[f"diverged_{p}"] = bool(not np.isfinite(loss).all() or loss[-w:].mean() > 1.5 * loss[:10].mean())
    rel = abs(out["final_bf16"] - out["final_fp32"]) / abs(out["final_fp32"])
    out["rel_diff"] = float(rel)
    out["match"] = bool(rel <= tolerance and not out["diverged_fp32"] and not out["diverged_bf16"])
    out["line"] = (f"bf16 {'MATCHES' if out['match'] else 'DOES NOT MATCH'} fp32: final-{w}-update mean loss "
                   f"{out['final_bf16']:.4f} vs {out['final_fp32']:.4f} ({rel:.2%} apart, tolerance {tolerance:.0%}); "
                   f"diverged: fp32 {out['diverged_fp32']}, bf16 {out['diverged_bf16']} ({n} updates)")
    return out


def plot_curves(curves, n, path, title):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(7, 4))
    for p, loss in curves.items():
        ax.plot(np.arange(1, n + 1), loss[:n], label=p, lw=1)
    ax.set_xlabel("update")
    ax.set_ylabel("HuBERT loss / scored frame")
    ax.set_title(title, fontsize=9)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ---------------------------------------------------------------- prepare (CPU, before the device run)
def cmd_prepare(args, device):
    """Render the MIDI development corpus, label it with the project's MFCC k-means (recipes/pahubert/run.sh
    stages 0-3) and write a compact copy (16-bit FLAC, manifest, labels) to ``--carry``."""
    import soundfile as sf

    name = pretrain_config(args.local)
    sr = int(load_recipe_config(PRETRAIN_CONF / f"{name}.yaml").task.sample_rate)
    work = Path(args.work)
    corpus = work / f"midi_{sr}"
    module = None
    for candidate in ("pahubert_plugin.corpora.midi", "pahubert_plugin.data.midi_corpus"):
        try:
            __import__(candidate)
            module = candidate
            break
        except ImportError:
            continue
    if module is None:
        raise SystemExit("prepare: neither pahubert_plugin.corpora.midi nor pahubert_plugin.data.midi_corpus imports")
    py = sys.executable
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    run = [py, "-m", module, str(corpus), "--unlabelled", str(args.songs), "--train", "0", "--test", "0",
           "--seconds", str(args.song_seconds), "--sample-rate", str(sr), "--seed", "0", "--jobs", str(args.jobs)]
    print("prepare: " + " ".join(run), flush=True)
    subprocess.run(run, check=True, env=env, cwd=REPO)
    exp = work / f"clustering_{sr}"
    recipe = [
        "bash", str(REPO / "recipes" / "pahubert" / "run.sh"), "--audio-dir", str(corpus / "unlabelled"),
        "--exp-dir", str(exp), "--sample-rate", str(sr), "--n-clusters", str(args.clusters), "--nj", str(args.jobs),
        "--valid-percent", "0", "--stage", "0", "--stop-stage", "3"]
    print("prepare: " + " ".join(recipe), flush=True)
    subprocess.run(recipe, check=True, env=dict(env, PYTHON=py), cwd=REPO)
    labels = exp / "labels" / f"mfcc_k{args.clusters}"
    manifest = (exp / "data" / "train.tsv").read_text().splitlines()
    root, rows = Path(manifest[0]), manifest[1:]
    carry = Path(args.carry)
    if carry.exists():
        shutil.rmtree(carry)
    (carry / "audio").mkdir(parents=True)
    out_rows = []
    for row in rows:
        rel, frames = row.split("\t")[:2]
        wav, rate = sf.read(root / rel, dtype="int16", always_2d=True)
        flac = Path(rel).with_suffix(".flac").name
        sf.write(carry / "audio" / flac, wav, rate, subtype="PCM_16", format="FLAC")
        if sf.info(carry / "audio" / flac).frames != int(frames):
            raise SystemExit(f"prepare: {flac} has {sf.info(carry / 'audio' / flac).frames} frames, manifest {frames}")
        out_rows.append(f"{flac}\t{frames}")
    (carry / "train.tsv").write_text("audio\n" + "\n".join(out_rows) + "\n")  # root rewritten at run time
    shutil.copy(labels / "train.km", carry / "train.km")
    shutil.copy(labels / "dict.km.txt", carry / "dict.km.txt")
    size = sum(f.stat().st_size for f in carry.rglob("*") if f.is_file())
    whl = REPO / ".whl"
    wheels = sum(f.stat().st_size for f in whl.glob("*.whl")) if whl.is_dir() else 0
    tracked = sum((REPO / f).stat().st_size for f in subprocess.run(
        ["git", "ls-files"], capture_output=True, text=True, cwd=REPO).stdout.split() if (REPO / f).is_file())
    total = size + wheels + tracked
    print(f"prepare: {len(out_rows)} songs x {args.song_seconds:g} s at {sr} Hz, {args.clusters} MFCC k-means "
          f"clusters -> {carry} ({size / 2 ** 20:.1f} MiB); with .whl ({wheels / 2 ** 20:.1f} MiB) and the tracked "
          f"files ({tracked / 2 ** 20:.1f} MiB) {total / 2 ** 20:.1f} MiB travel (limit 64 MiB)", flush=True)
    if total > 62 * 2 ** 20:
        raise SystemExit(f"prepare: {total / 2 ** 20:.1f} MiB would travel, over the device's 64 MiB; use fewer "
                         f"--songs or shorter --song-seconds")
    return 0


# ---------------------------------------------------------------- the summary table
def cmd_table(args, device):
    path = os.path.join(args.out, RESULTS)
    if not os.path.exists(path):
        print(f"table: no results in {path}")
        return 1
    rows = [json.loads(line) for line in open(path) if line.strip()]
    info = next((r for r in rows if r["step"] == "info"), {})
    print(f"\n=== gpu_check summary: {info.get('device', '?')}, torch {info.get('torch', '?')} ===")
    print(f"peaks (dense TFLOP/s): bf16/fp16 {fmt(info.get('peak_bf16') and info['peak_bf16'] / 1e12, '.0f')}, "
          f"fp32 {fmt(info.get('peak_fp32') and info['peak_fp32'] / 1e12, '.0f')} ({info.get('peak_source', '?')}). "
          f"FLOPs: "
          f"torch.utils.flop_counter.FlopCounterMode over one forward+backward (matmul, conv, attention); "
          f"MFU = FLOPs/step x updates/s / peak. Memory: GPU max_memory_allocated, CPU: process peak RSS")
    print("| step | model | variant | params (M) | batch x s | updates/s | audio-s/s | TFLOP/step | TFLOP/s "
          "| MFU | peak mem (GiB) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        if r["step"] not in ("pretrain", "finetune"):
            continue
        if "skipped" in r or "error" in r:
            why = f"skipped: {r['skipped']}" if "skipped" in r else f"error: {r['error']}"
            print(f"| {r['step']} | {r['model']} | {r['variant']} | {why} |")
            continue
        print(f"| {r['step']} | {r['model']} | {r['variant']} | {r['params'] / 1e6:.1f} "
              f"| {r['batch']} x {r['seconds']:.2f} "
              f"| {r['updates_per_s']:.3f} | {r['audio_s_per_s']:.1f} | {r['flops_per_step'] / 1e12:.3f} "
              f"| {r['achieved_flops'] / 1e12:.3g} | {fmt(r['mfu'], '.1%')} | {r['peak_mem_gib']:.2f} |")
    att = next((r["attention"] for r in rows if r["step"] == "pretrain" and "attention" in r), None)
    print(f"\nattention: {info.get('attention', '?')}; {att or 'no pretrain step recorded it'}")
    for r in rows:
        if r["step"] == "maxbatch":
            print(f"\nlargest pretraining batch ({r['variant']}): {r['max_batch']} x {r['seconds']:.2f} s "
                  f"(tried {r['tried']}; stopped: {r['stopped']})")
    sep = [r for r in rows if r["step"] == "separate"]
    if sep:
        print("\n| separate | variant | params (M) | segment (s) | RTF | audio-s/s | max diff vs fp32 / peak "
              "| peak mem (GiB) |")
        print("|---|---|---|---|---|---|---|---|")
        for r in sep:
            if "error" in r:
                print(f"| {r['model']} | - | error: {r['error']} |")
                continue
            print(f"| {r['model']} | {r['variant']} | {r['params'] / 1e6:.1f} | {r['segment_s']:g} | {r['rtf']:.4f} "
                  f"| {r['audio_s_per_s']:.1f} | {fmt(r['max_diff_vs_fp32'], '.2e', '-')} | {r['peak_mem_gib']:.2f} |")
    for r in rows:
        if r["step"] == "numerics":
            print(f"\nnumerics ({r['updates']} updates, batch {r['batch']} x {r['seconds']:g} s): {r['line']}")
    return 0


# ---------------------------------------------------------------- command line
def get_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("step", choices=["info", "pretrain", "maxbatch", "finetune", "separate", "numerics", "prepare",
                                    "table"])
    p.add_argument("--local", action="store_true", help="tiny configs on the CPU (LOCAL=1)")
    p.add_argument("--device", default=None, help="cuda | cpu (default: cuda if available, cpu with --local)")
    p.add_argument("--out", default=os.environ.get("OUT", "/tmp/out"), help="results folder (default $OUT)")
    p.add_argument("--variants", default=None, help="pretrain: fp32,fp16,bf16,bf16-math,bf16-compile; "
                   "finetune: fp32,bf16")
    p.add_argument("--models", default="", help="finetune: comma list (default all)")
    p.add_argument("--updates", type=int, default=None, help="timed updates (pretrain/finetune) or numerics updates")
    p.add_argument("--warmup", type=int, default=None, help="untimed updates first")
    p.add_argument("--batch", type=int, default=None, help="override the config's batch")
    p.add_argument("--seconds", type=float, default=None, help="override the crop length (s)")
    p.add_argument("--max-batch", type=int, default=None, help="maxbatch: stop doubling here")
    p.add_argument("--compile-backend", default=None, help="pretrain bf16-compile: torch.compile backend "
                   "(default inductor; eager with --local: graph capture only, inductor's C++ build takes minutes)")
    p.add_argument("--budget", type=float, default=90.0, help="maxbatch: seconds before it stops doubling")
    p.add_argument("--input-seconds", type=float, default=None, help="separate: input length (s)")
    p.add_argument("--segment", type=float, default=None, help="separate: our models' chunk (s)")
    p.add_argument("--repeats", type=int, default=None, help="separate: timed repeats (best kept)")
    p.add_argument("--data", default=str(CARRY), help="numerics: the carried corpus (prepare's --carry)")
    p.add_argument("--precisions", default="fp32,bf16", help="numerics: precisions, same seed")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--warmup-updates", type=int, default=None, help="numerics: linear lr warm-up to the "
                   "config's peak lr")
    p.add_argument("--time-limit", type=float, default=None, help="numerics: seconds per precision")
    p.add_argument("--carry", default=str(CARRY), help="prepare: output folder (travels with the repo)")
    p.add_argument("--work", default=os.path.join(tempfile.gettempdir(), "pahubert_gpu_prepare"),
                   help="prepare: scratch folder (corpus, features, k-means; reused)")
    p.add_argument("--songs", type=int, default=10, help="prepare: songs")
    p.add_argument("--song-seconds", type=float, default=20.0, help="prepare: seconds per song")
    p.add_argument("--clusters", type=int, default=100, help="prepare: MFCC k-means clusters")
    p.add_argument("--jobs", type=int, default=2, help="prepare: worker processes")
    return p


DEFAULTS = {  # (GPU, LOCAL) per option left unset
    "updates": {"pretrain": (8, 2), "finetune": (6, 2), "numerics": (300, 4)},
    "warmup": (2, 1),
    "max_batch": (1024, 4),
    "input_seconds": (30.0, 4.0),
    "segment": (10.0, 1.0),
    "repeats": (2, 1),
    "warmup_updates": (50, 2),
    "time_limit": (100.0, 120.0),
    "numerics_batch": (4, 2),
    "numerics_seconds": (3.0, 2.0),
}


def main(argv=None):
    args = get_parser().parse_args(argv)
    k = 1 if args.local else 0
    if args.updates is None:
        args.updates = DEFAULTS["updates"].get(args.step, (10, 2))[k]
    if args.compile_backend is None:
        args.compile_backend = "eager" if args.local else "inductor"
    if args.step == "maxbatch" and args.local:
        args.batch = args.batch or 1
    for key in ("warmup", "max_batch", "input_seconds", "segment", "repeats", "warmup_updates", "time_limit"):
        if getattr(args, key) is None:
            setattr(args, key, DEFAULTS[key][k])
    if args.step == "numerics":
        args.batch = args.batch or DEFAULTS["numerics_batch"][k]
        args.seconds = args.seconds or DEFAULTS["numerics_seconds"][k]
    if args.variants is None:
        args.variants = {"pretrain": "fp32,fp16,bf16,bf16-math", "finetune": "fp32,bf16"}.get(args.step, "")
    if args.local:
        torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() and not args.local else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch.cuda.is_available() is False on this machine")
    print(f"[{args.step}] {device_name(device)}; load average {fairseq_runs.load_average()}", flush=True)
    return {"info": cmd_info, "pretrain": cmd_pretrain, "maxbatch": cmd_maxbatch, "finetune": cmd_finetune,
            "separate": cmd_separate, "numerics": cmd_numerics, "prepare": cmd_prepare,
            "table": cmd_table}[args.step](args, device)


if __name__ == "__main__":
    sys.exit(main())
