"""Start-up time of every console script: ``--help`` and an argument error, next to ``python -c pass``.

    python benchmarks/bench_cli.py [--repeat 3]

Each command runs in a fresh interpreter (the real ``pahubert-*`` script next to this Python when it
is installed, else ``python -c`` with the script's name as ``argv[0]``); the table shows the median
wall time, the modules a ``--help`` left imported among torch/fairseq/numpy, and the load average,
since a busy machine slows every row alike.  The target is < 0.5 s per row.
"""
import argparse
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "fairseq", "numpy")


def console_scripts():
    """[(name, module, function)] from setup.py's entry points."""
    text = (REPO / "setup.py").read_text()
    return re.findall(r'"(pahubert-[\w-]+) = ([\w.]+):(\w+)"', text)


def command(name, module, func, args):
    script = Path(sys.executable).parent / name
    if script.is_file():
        return [str(script), *args]
    code = f"import sys; sys.argv[0] = {name!r}; from {module} import {func}; sys.exit({func}({args!r}))"
    return [sys.executable, "-c", code]


def timed(cmd, repeat):
    times, proc = [], None
    for _ in range(repeat):
        start = time.perf_counter()
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        times.append(time.perf_counter() - start)
    return statistics.median(times), proc


def heavy_imports(name, module, func):
    code = (f"import sys; sys.argv[0] = {name!r}; from {module} import {func}\n"
            f"try:\n    {func}(['--help'])\nexcept SystemExit:\n    pass\n"
            f"print(','.join(m for m in {HEAVY!r} if m in sys.modules) or '-')")
    out = subprocess.run([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    return out.stdout.strip().splitlines()[-1] if out.stdout.strip() else "?"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeat", type=int, default=3, help="runs per command; the median is shown (default 3)")
    args = p.parse_args(argv)
    env_note = f"load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores"
    peer, _ = timed([sys.executable, "-c", "pass"], args.repeat)
    print(f"# CLI start-up, median of {args.repeat} runs, {env_note}")
    print(f"{'command':<28} {'--help':>8} {'bad args':>9}  {'heavy imports at --help':<24} noise")
    print(f"{'python -c pass':<28} {peer:8.3f} {'':>9}")
    for name, module, func in console_scripts():
        help_s, proc = timed(command(name, module, func, ["--help"]), args.repeat)
        bad_s, bad = timed(command(name, module, func, ["--no-such-option"]), args.repeat)
        ok = proc.returncode == 0 and bad.returncode == 2
        noise = "tensorboardX" if "tensorboardX" in proc.stderr + bad.stderr else "-"
        print(f"{name:<28} {help_s:8.3f} {bad_s:9.3f}  {heavy_imports(name, module, func):<24} {noise}"
              f"{'' if ok else f'  (exit {proc.returncode}/{bad.returncode})'}")


if __name__ == "__main__":
    main()
