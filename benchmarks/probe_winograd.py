"""Would Winograd convolution make the faithful spectral models faster on a CPU? (measured: no; docs/PERFORMANCE.md).

The residual units of ``resunet`` and ``pahubert_resunet`` are 3x3 convolutions, stride 1, and
``benchmarks/profile_separate.py`` shows them running at dense matrix-product throughput, so the only
exact speed-up left for the same checkpoint is doing fewer multiplications. Winograd's F(2x2, 3x3)
computes each 2x2 output tile from a 4x4 input tile with 16 products per channel pair instead of 36
(2.25x fewer), at the price of input and output transforms. oneDNN offers it only on AVX-512 CPUs and
PyTorch does not expose it, so this script builds it from torch ops (transforms as strided sums, the 16
products as one batched matrix product) and times it against ``F.conv2d`` (channels_last, as
``pahubert-separate`` runs) on the shapes of the model's levels: channels doubling while the 1025 bins
halve, full time resolution.

    python benchmarks/probe_winograd.py --threads 1 [--frames 300] [--compile]

Prints, per level, the direct and Winograd times, the direct convolution's throughput and the largest
difference over the output's peak. ``--compile`` also runs the Winograd function through
``torch.compile`` (inductor's C++ backend fuses the transforms).
"""
import argparse
import time

import torch
import torch.nn.functional as F

LEVELS = [(32, 1025), (64, 513), (128, 257), (256, 129), (384, 65)]  # (channels, bins) of the stem's blocks
G = [[1.0, 0.0, 0.0], [0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0.0, 0.0, 1.0]]


def winograd_weight(w: torch.Tensor) -> torch.Tensor:
    """(K, C, 3, 3) -> (16, C, K): G w G^T for every channel pair, one (C, K) matrix per tile position."""
    g = torch.tensor(G, dtype=w.dtype)
    return torch.einsum("ai,kcij,bj->abck", g, w, g).reshape(16, w.shape[1], w.shape[0]).contiguous()


def winograd_conv(x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """``F.conv2d(x, w, padding=1)`` for ``u = winograd_weight(w)``, by F(2x2, 3x3) tiles."""
    n, c, h, w = x.shape
    k = u.shape[-1]
    th, tw = (h + 1) // 2, (w + 1) // 2
    xp = F.pad(x, (1, 2 * tw + 1 - w, 1, 2 * th + 1 - h)).permute(0, 2, 3, 1)  # (n, 2th+2, 2tw+2, c)
    r = [xp[:, i:i + 2 * th:2] for i in range(4)]
    rows = [r[0] - r[2], r[1] + r[2], r[2] - r[1], r[1] - r[3]]  # B^T d, along frequency
    v = torch.empty(16, n, th, tw, c, dtype=x.dtype)
    for a, t in enumerate(rows):  # ... B, along time
        q = [t[:, :, j:j + 2 * tw:2] for j in range(4)]
        torch.sub(q[0], q[2], out=v[4 * a])
        torch.add(q[1], q[2], out=v[4 * a + 1])
        torch.sub(q[2], q[1], out=v[4 * a + 2])
        torch.sub(q[1], q[3], out=v[4 * a + 3])
    m = torch.bmm(v.view(16, -1, c), u).view(4, 4, n, th, tw, k)
    out = torch.empty(n, th, 2, tw, 2, k, dtype=x.dtype)
    for i, t in enumerate((m[0] + m[1] + m[2], m[1] - m[2] - m[3])):  # A^T M A, A^T = [[1,1,1,0],[0,1,-1,-1]]
        out[:, :, i, :, 0] = t[0] + t[1] + t[2]
        out[:, :, i, :, 1] = t[1] - t[2] - t[3]
    return out.view(n, 2 * th, 2 * tw, k)[:, :h, :w].permute(0, 3, 1, 2)


def best_of(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    p.add_argument("--frames", type=int, default=300, help="time frames per convolution (default 300: 3 s)")
    p.add_argument("--repeats", type=int, default=3, help="timed repeats, best reported (default 3)")
    p.add_argument("--compile", action="store_true", help="also time torch.compile(winograd_conv)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    compiled = torch.compile(winograd_conv, dynamic=False) if args.compile else None
    print(f"3x3 convolution, channels_last, {args.frames} frames, {args.threads} threads, "
          f"{torch.backends.cpu.get_cpu_capability()}")
    print("| channels | bins | direct (ms) | direct GFLOP/s | Winograd F(2x2,3x3) (ms) | speed-up | max diff / peak |"
          + (" compiled (ms) | speed-up |" if compiled else ""))
    print("|---|---|---|---|---|---|---|" + ("---|---|" if compiled else ""))
    with torch.inference_mode():
        for c, bins in LEVELS:
            x = torch.randn(1, c, bins, args.frames).contiguous(memory_format=torch.channels_last)
            w = torch.randn(c, c, 3, 3) / (3 * c ** 0.5)
            wc, u = w.contiguous(memory_format=torch.channels_last), winograd_weight(w)
            ref = F.conv2d(x, wc, padding=1)
            err = float((winograd_conv(x, u) - ref).abs().max() / ref.abs().max())
            direct = best_of(lambda: F.conv2d(x, wc, padding=1), args.repeats)
            wino = best_of(lambda: winograd_conv(x, u), args.repeats)
            flops = 2 * 9 * c * c * bins * args.frames
            row = (f"| {c} | {bins} | {direct * 1e3:.0f} | {flops / direct / 1e9:.0f} | {wino * 1e3:.0f} | "
                   f"{direct / wino:.2f}x | {err:.1e} |")
            if compiled is not None:
                comp = best_of(lambda: compiled(x, u), args.repeats)
                row += f" {comp * 1e3:.0f} | {direct / comp:.2f}x |"
            print(row, flush=True)


if __name__ == "__main__":
    main()
