"""The benchmark scripts run end to end on tiny models and report what they claim (benchmarks/; the figures
themselves are in README). Each starts processes or times real work: all are marked slow."""
import pytest
import torch


@pytest.mark.slow
def test_bench_separate_prints_speed_and_flat_memory_columns(tmp_path):
    """benchmarks/bench_separate.py runs end to end on the tiny model: a real-time factor, a peak RSS
    per --memory-seconds length (streamed to stems, as pahubert-separate) and their ratio."""
    import json
    import subprocess
    import sys

    from helpers import REPO

    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "bench_separate.py"), "--models", "tiny",
                           "--seconds", "1", "--memory-seconds", "2,4", "--repeats", "1", "--threads", "1",
                           "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    header = ("| RTF vs htdemucs, same variant | RTF long track | long vs htdemucs fp32 | long vs htdemucs, same "
              "variant | max diff vs fp32 / peak | peak RSS 2 s (MB) | peak RSS 4 s (MB) |")
    assert header + " longest / shortest |" in proc.stdout
    row = json.loads(out.read_text())[0]
    assert row["model"] == "tiny" and 0 < row["rtf"] < 100
    # long-track RTF: one chunk of the segment over the hop (0.75 x segment)
    assert row["rtf_long"] == pytest.approx(row["chunk_s"] / (0.75 * row["segment_s"]))
    peaks = [row["memory"][k]["peak_rss_mb"] for k in ("2.0", "4.0")]
    assert all(100 < p < 20000 for p in peaks), peaks


@pytest.mark.slow
def test_profile_separate_counts_convolution_work():
    """benchmarks/profile_separate.py: per-block rows that add up to the wall time, a convolution
    throughput next to a matrix product's, and multiply-adds counted exactly (Conv2d by its outputs,
    grouped Conv1d, ConvTranspose2d by its inputs: hand-computed figures)."""
    import sys

    from helpers import REPO

    sys.path.insert(0, str(REPO / "benchmarks"))
    import profile_separate

    r = profile_separate.profile_worker("tiny", 1.0, "opt")
    assert r["model"] == "tiny" and r["variant"] == "opt" and r["conv_calls"] > 0
    assert 0 < r["conv_s"] <= r["wall_s"] and r["conv_gflop"] > 0 and r["matmul_gflops"] > 0
    assert sum(row[1] for row in r["rows"]) == pytest.approx(r["wall_s"], rel=1e-6)

    x = torch.zeros(1, 2, 5, 7)
    conv = torch.nn.Conv2d(2, 4, (3, 3), padding=1)
    assert profile_separate.conv_macs(conv, x, conv(x)) == 4 * 5 * 7 * 2 * 9
    up = torch.nn.ConvTranspose2d(2, 6, (1, 2), stride=(1, 2))
    assert profile_separate.conv_macs(up, x, up(x)) == 2 * 5 * 7 * 6 * 2
    pos = torch.nn.Conv1d(8, 8, 5, padding=2, groups=4)
    y = torch.zeros(1, 8, 11)
    assert profile_separate.conv_macs(pos, y, pos(y)) == 8 * 11 * 5 * 2


@pytest.mark.slow
def test_bench_separate_tile_variant(tmp_path):
    """bench_separate.py --variants tile: the tiled model's estimates against the model as built, its speed
    and memory; a model without tiled decoding gets an error row that says so."""
    import json
    import subprocess
    import sys

    from helpers import REPO

    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "bench_separate.py"), "--models",
                           "pahubert_tiny,tiny", "--variants", "tile", "--tile", "0.5", "--seconds", "1",
                           "--memory-seconds", "2", "--repeats", "1", "--threads", "1", "--out", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = json.loads(out.read_text())
    assert rows[0]["model"] == "pahubert_tiny" and rows[0]["variant"] == "tile"
    assert rows[0]["max_diff"] <= 1e-5 and rows[0]["rtf_long"] > 0
    assert rows[0]["memory"]["2.0"]["peak_rss_mb"] > 100
    assert "tiled decoding (--tile) is for pahubert_resunet models" in rows[1]["error"]
    assert "| pahubert_tiny | tile | 2 |" in proc.stdout  # the memory table: input, peak, wall


@pytest.mark.slow
def test_winograd_probe_computes_the_convolution_it_times(capsys):
    """benchmarks/probe_winograd.py (the evidence that Winograd does not pay here) times a real 3x3
    convolution: equal to F.conv2d on odd and even sizes, and its table prints one row per level."""
    import importlib.util

    from helpers import REPO

    spec = importlib.util.spec_from_file_location("probe_winograd", f"{REPO}/benchmarks/probe_winograd.py")
    probe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(probe)
    torch.manual_seed(0)
    for c, k, h, w in [(3, 5, 7, 9), (4, 4, 8, 6), (2, 3, 1, 1)]:
        x, wt = torch.randn(2, c, h, w), torch.randn(k, c, 3, 3)
        ref = torch.nn.functional.conv2d(x, wt, padding=1)
        torch.testing.assert_close(probe.winograd_conv(x, probe.winograd_weight(wt)), ref, rtol=1e-5, atol=1e-5)
    probe.main(["--frames", "4", "--repeats", "1"])
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ") and line[2].isdigit()]
    assert len(rows) == len(probe.LEVELS) and all("x |" in r for r in rows)
