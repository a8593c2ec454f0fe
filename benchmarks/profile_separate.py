"""Where separation time and memory go: a per-block profile of each model (whole-run peak RSS: bench_separate.py).

Random-weight models from ``bench_separate.BUILDERS``, each in its own subprocess (threads set),
separate ``--seconds`` of stereo 44.1 kHz noise with :func:`pahubert_plugin.separation.overlap.apply_model` (the
model's segment, overlap 0.25) after a 1 s warm-up; forward hooks time every block (STFT, each
stem/encoder block with its input shape, transformer, projection, bottleneck, each decoder level,
mask head, iSTFT) and the resident set at each block's end (the largest over calls, minus the resident
set before the separation); ``overlap-add`` is the time outside the model. Every convolution is also
timed and its multiply-adds counted, and the throughput it reaches (GFLOP/s) is put next to a dense
matrix product's measured in the same process: when the convolutions take most of the time at a
throughput close to the matrix product's, only fewer operations (a preset) make the model faster.

    nice -n 19 python benchmarks/profile_separate.py [--profile-models pahubert_base,base] [--seconds 10] [--threads 2]
"""
import argparse
import collections
import json
import math
import os
import resource
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
SR = 44100


def _parts(model):
    """``[(label, module)]`` of non-nested blocks to time, in forward order (none for models that are
    not ours, e.g. HT-Demucs: their time and convolutions are still measured)."""
    if not hasattr(model, "mask_head"):
        return []
    if hasattr(model, "net"):  # resunet
        stem, trunk, bottleneck, decoder = model.net.encoder, [("input norm", model.net.input_norm)], \
            model.net.bottleneck, model.net.decoder
    else:  # pahubert_resunet
        enc = model.encoder
        stem, bottleneck, decoder = enc.front_end.stem, model.bottleneck, model.decoder
        trunk = [("stem layer norm + proj", enc.layer_norm), ("stem layer norm + proj", enc.post_extract_proj),
                 ("transformer", enc.transformer), ("token -> map proj", model.proj)]
    parts = [("STFT", model.spectrogram)]
    if hasattr(model, "net"):
        parts += trunk
    elif model.encoder.front_end.input_norm is not None:
        parts += [("input norm", model.encoder.front_end.input_norm)]
    parts += [(f"stem block {i}", b) for i, b in enumerate(stem.blocks)]
    parts += [(f"stem pool {i}", p) for i, p in enumerate(stem.pools)]
    if not hasattr(model, "net"):
        parts += trunk
    parts += [("bottleneck", bottleneck)]
    parts += [(f"decoder level {i}", m) for i, (u, b) in enumerate(zip(decoder.ups, decoder.blocks))
              for m in (u, *b)]  # the decoder calls its units one by one
    parts += [("decoder head", decoder.head), ("mask head", model.mask_head)]
    return parts


def conv_macs(module, inp, out) -> int:
    """Multiply-adds of one call of a convolution: each output value of a ``ConvNd`` sums
    ``in_channels / groups x kernel`` products; each input value of a ``ConvTransposeNd`` is spread over
    ``out_channels / groups x kernel`` outputs."""
    from torch.nn.modules.conv import _ConvTransposeNd

    kernel = math.prod(module.kernel_size)
    if isinstance(module, _ConvTransposeNd):
        return inp.numel() * kernel * module.out_channels // module.groups
    return out.numel() * kernel * module.in_channels // module.groups


def profile_worker(name: str, seconds: float, variant: str = "opt") -> dict:
    import torch
    from torch.nn.modules.conv import _ConvNd

    import bench_separate
    from pahubert_plugin.separation.overlap import apply_model

    torch.manual_seed(0)
    model, segment = bench_separate.BUILDERS[name]()
    model.eval()
    if variant == "opt":  # as pahubert-separate runs it: BatchNorm folded, channels_last
        from pahubert_plugin.separation.inference import optimize_for_inference

        model = optimize_for_inference(model)
    seg = int(segment * SR)
    x = 0.1 * torch.randn(2, int(seconds * SR))
    apply_model(model, x[:, :SR], seg)  # warm-up (allocator, oneDNN kernels)
    spent, shapes, calls = collections.defaultdict(float), {}, collections.Counter()
    starts, live = {}, collections.defaultdict(float)
    page = os.sysconf("SC_PAGE_SIZE")

    def resident_mb() -> float:  # now, not the peak: tensors this size are mmapped and freed at once
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * page / 2 ** 20

    def pre(label):
        def hook(module, args):
            starts[id(module)] = time.perf_counter()
            shapes.setdefault(label, tuple(args[0].shape) if args and hasattr(args[0], "shape") else ())
        return hook

    def post(label):
        def hook(module, args, out):
            spent[label] += time.perf_counter() - starts.pop(id(module))
            calls[label] += 1
            live[label] = max(live[label], resident_mb() - base_mb)
        return hook

    for label, module in _parts(model) + [("model", model)]:
        module.register_forward_pre_hook(pre(label))
        module.register_forward_hook(post(label))
    inverse = getattr(getattr(model, "spectrogram", None), "inverse", None)

    def timed_inverse(spec, length):
        t0 = time.perf_counter()
        out = inverse(spec, length)
        spent["iSTFT"] += time.perf_counter() - t0
        calls["iSTFT"] += 1
        shapes.setdefault("iSTFT", tuple(spec.shape))
        return out

    if inverse is not None:
        model.spectrogram.inverse = timed_inverse
    conv = {"s": 0.0, "flop": 0.0, "calls": 0}
    conv_starts = {}

    def conv_pre(module, args):
        conv_starts[id(module)] = time.perf_counter()

    def conv_post(module, args, out):
        conv["s"] += time.perf_counter() - conv_starts.pop(id(module))
        conv["flop"] += 2.0 * conv_macs(module, args[0], out)
        conv["calls"] += 1

    for module in model.modules():
        if isinstance(module, _ConvNd):
            module.register_forward_pre_hook(conv_pre)
            module.register_forward_hook(conv_post)
    base_mb = resident_mb()
    t0 = time.perf_counter()
    apply_model(model, x, seg, overlap=bench_separate.OVERLAP)
    total = time.perf_counter() - t0
    inner = sum(v for k, v in spent.items() if k != "model")
    spent["other (inside the model)"] = spent["model"] - inner
    spent["overlap-add, chunking (outside)"] = total - spent["model"]
    rows = [(k, spent[k], calls.get(k, 0), shapes.get(k, ""), live.get(k)) for k in spent if k != "model"]
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    torch.mm(a, b)
    t1 = time.perf_counter()
    for _ in range(5):
        torch.mm(a, b)
    matmul_gflops = 5 * 2 * 2048 ** 3 / (time.perf_counter() - t1) / 1e9
    return {"model": name, "variant": variant, "seconds": seconds, "segment_s": segment, "chunks": calls["model"],
            "wall_s": total, "rtf": total / seconds, "threads": torch.get_num_threads(),
            "params_M": sum(p.numel() for p in model.parameters()) / 1e6,
            "peak_over_start_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - base_mb,
            "rows": [[k, t, c, str(s), m] for k, t, c, s, m in rows],
            "conv_s": conv["s"], "conv_gflop": conv["flop"] / 1e9, "conv_calls": conv["calls"],
            "matmul_gflops": matmul_gflops}


def run(args_list, threads: int) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONWARNINGS="ignore")
    proc = subprocess.run([sys.executable, __file__, *args_list], env=env, capture_output=True, text=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        return {"error": (proc.stderr or proc.stdout)[-800:]}
    return json.loads(lines[-1])


def print_profile(r: dict) -> None:
    print(f"\n### {r['model']} ({r['variant']}, {r['params_M']:.1f} M parameters): {r['seconds']:g} s stereo "
          f"44.1 kHz, {r['chunks']} chunks of {r['segment_s']:g} s, {r['threads']} threads: "
          f"{r['wall_s']:.1f} s wall, RTF {r['rtf']:.2f}; peak RSS {r['peak_over_start_mb']:.0f} MB over the "
          f"resident set before the separation (model and imports)")
    print("| block | seconds | share | calls | input shape (first call) | resident after it, over the start (MB) |")
    print("|---|---|---|---|---|---|")
    for label, t, calls, shape, mb in r["rows"]:
        mb = "" if mb is None else f"{mb:.0f}"
        print(f"| {label} | {t:.2f} | {100 * t / r['wall_s']:.1f} % | {calls} | {shape} | {mb} |")
    rate = r["conv_gflop"] / r["conv_s"]
    print(f"convolutions: {r['conv_s']:.1f} s ({100 * r['conv_s'] / r['wall_s']:.0f} % of the wall), "
          f"{r['conv_calls']} calls, {r['conv_gflop']:.0f} GFLOP ({r['conv_gflop'] / r['seconds']:.0f} per second "
          f"of input; HT-Demucs pads inputs shorter than its segment) at {rate:.1f} GFLOP/s; a 2048 x 2048 "
          f"matrix product in the same process: {r['matmul_gflops']:.1f} GFLOP/s (convolutions at "
          f"{100 * rate / r['matmul_gflops']:.0f} % of it)")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--profile-models", default="pahubert_base,base", help="comma list ('' to skip)")
    p.add_argument("--seconds", type=float, default=10.0, help="input length for the profile")
    p.add_argument("--threads", type=int, default=2, help="torch threads per case")
    p.add_argument("--variant", default="opt", choices=["opt", "fp32"],
                   help="opt: BatchNorm folded + channels_last, as pahubert-separate runs (default); fp32: as built")
    p.add_argument("--worker", nargs="+", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        print(json.dumps(profile_worker(args.worker[0], float(args.worker[1]), *args.worker[2:3])))
        return 0
    for name in filter(None, args.profile_models.split(",")):
        r = run(["--worker", name, str(args.seconds), args.variant], args.threads)
        print_profile(r) if "error" not in r else print(f"{name}: error {r['error']}")
        sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
