"""benchmarks/gpu_check.py: FLOP counting, the peak table, MFU, the numerics verdict, chunked
separation, and (slow) the whole LOCAL=1 run of benchmarks/gpu_check.sh on the CPU."""
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

import gpu_check  # noqa: E402


@pytest.mark.parametrize("batch,n_in,n_out", [(3, 5, 7), (16, 64, 32)])
def test_linear_forward_backward_flops_are_6_in_out_batch(batch, n_in, n_out):
    lin = torch.nn.Linear(n_in, n_out)
    x = torch.randn(batch, n_in, requires_grad=True)
    total, ops = gpu_check.count_flops(lambda: lin(x).sum().backward())
    # forward 2*B*in*out; backward: input gradient and weight gradient, 2*B*in*out each
    assert total == 6 * n_in * n_out * batch
    assert sum(ops.values()) == total


def test_conv_flops_counted_too():
    conv = torch.nn.Conv1d(4, 8, kernel_size=3, bias=False)
    x = torch.randn(2, 4, 10)
    total, _ = gpu_check.count_flops(lambda: conv(x))
    assert total == 2 * 2 * 8 * 8 * 4 * 3  # 2 x batch x out_len x out_ch x in_ch x kernel


@pytest.mark.parametrize("name,precision,tflops", [
    ("NVIDIA H100 80GB HBM3", "bf16", 989), ("NVIDIA H100 80GB HBM3", "fp16", 989),
    ("NVIDIA H100 80GB HBM3", "fp32", 67), ("NVIDIA H200", "bf16", 989), ("NVIDIA H200", "fp32", 67),
    ("NVIDIA H200", "bf16-compile", 989), ("NVIDIA H100 PCIe", "bf16", 756), ("NVIDIA A100-SXM4-80GB", "bf16", 312)])
def test_card_peak_table(name, precision, tflops):
    peak, source = gpu_check.card_peak(name, precision)
    assert peak == tflops * 1e12
    assert "datasheet" in source


def test_card_peak_unknown_or_cpu_is_none_with_a_reason():
    assert gpu_check.card_peak("CPU", "fp32") == (None, "CPU: no peak table")
    peak, reason = gpu_check.card_peak("Tesla T4", "bf16")
    assert peak is None and "Tesla T4" in reason


def test_mfu_arithmetic():
    achieved, frac = gpu_check.mfu(2e12, 3.0, 989e12)
    assert achieved == 6e12 and frac == pytest.approx(6 / 989)
    assert gpu_check.mfu(2e12, 3.0, None) == (6e12, None)
    assert gpu_check.fmt(None, ".1%") == "n/a" and gpu_check.fmt(0.1234, ".1%") == "12.3%"


def test_fairseq_attention_goes_through_sdpa():
    """The claim the info step prints: fairseq's MultiheadAttention (as wav2vec2's encoder layers call it,
    need_weights=False) runs F.scaled_dot_product_attention, no patching needed."""
    from fairseq.modules import MultiheadAttention

    mha = MultiheadAttention(16, 4, self_attention=True)
    x = torch.randn(5, 2, 16)
    with gpu_check.sdpa_calls() as calls:
        mha(x, x, x, need_weights=False)
    assert len(calls) == 1
    with gpu_check.sdpa_calls() as calls:
        mha(x, x, x, need_weights=True)  # the weights path does its own softmax
    assert len(calls) == 0


def test_numerics_verdict():
    base = [5.0 - 0.01 * i for i in range(300)]
    same = gpu_check.numerics_verdict({"fp32": base, "bf16": [v * 1.005 for v in base]})
    assert same["match"] is True and same["window"] == 100 and "MATCHES" in same["line"]
    apart = gpu_check.numerics_verdict({"fp32": base, "bf16": [v * 1.02 for v in base]})
    assert apart["match"] is False and "DOES NOT MATCH" in apart["line"]
    nan = gpu_check.numerics_verdict({"fp32": base, "bf16": base[:-1] + [float("nan")]})
    assert nan["diverged_bf16"] is True and nan["match"] is False
    rising = gpu_check.numerics_verdict({"fp32": base, "bf16": base[:200] + [20.0] * 100})
    assert rising["diverged_bf16"] is True and rising["match"] is False
    assert gpu_check.numerics_verdict({"fp32": base})["match"] is None


def test_separate_chunks_overlap_adds_back_the_input():
    """An identity 'separator' (every source = the mixture) comes back whole through the chunking."""
    mix = torch.randn(2, 1003)
    out = gpu_check.separate_chunks(lambda x: x[:, None].repeat(1, 4, 1, 1), mix, segment=200, batch=3)
    assert out.shape == (4, 2, 1003)
    torch.testing.assert_close(out, mix[None].expand(4, -1, -1), rtol=1e-5, atol=1e-5)


def test_carried_data_missing_names_prepare(tmp_path):
    with pytest.raises(SystemExit, match=r"train\.tsv is missing; run .*gpu_check\.py prepare"):
        gpu_check.carried_data(tmp_path / "nothing", tmp_path / "work")


NUMBER = re.compile(r"^-?\d+(\.\d+)?(e[-+]\d+)?%?$")


def _rows(table, first):
    return [[c.strip() for c in line.strip().strip("|").split("|")] for line in table.splitlines()
            if line.startswith(f"| {first}")]


def _finite(cell):
    assert NUMBER.match(cell), cell
    assert math.isfinite(float(cell.rstrip("%")))


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("fluidsynth") is None, reason="prepare renders the MIDI corpus with fluidsynth")
def test_local_run_prints_a_row_per_model(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    carry = tmp_path / "carry"
    subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_check.py"), "prepare", "--local", "--carry",
                    str(carry), "--work", str(tmp_path / "work"), "--songs", "3", "--song-seconds", "8",
                    "--out", str(tmp_path / "out")], env=env, check=True, capture_output=True, cwd=REPO)
    out = tmp_path / "out"
    proc = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_check.sh")], capture_output=True, text=True,
                          env=dict(env, LOCAL="1", PYTHON=sys.executable, OUT=str(out), DATA=str(carry)), cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    table = (out / "table.md").read_text()
    assert "FlopCounterMode" in table
    pre = {r[2]: r for r in _rows(table, "pretrain")}
    assert {"fp32", "bf16", "bf16-compile"} <= set(pre), table
    assert pre["fp16"][3].startswith("skipped: fp16 autocast")  # the CPU says why
    for variant in ("fp32", "bf16", "bf16-compile"):
        row = pre[variant]
        for cell in (row[3], row[5], row[6], row[7], row[10]):  # params, updates/s, audio-s/s, TFLOP/step, memory
            _finite(cell)
        assert row[9] == "n/a"  # no MFU on the CPU
    ft = {(r[1], r[2]): r for r in _rows(table, "finetune")}
    for model in ("resunet", "pahubert_resunet", "demucs_v2_hubert"):
        for variant in ("fp32", "bf16"):
            row = ft[(model, variant)]
            for cell in (row[3], row[5], row[6], row[7], row[10]):
                _finite(cell)
    sep = {(r[0], r[1]): r for r in _rows(table, "") if len(r) == 8 and r[1] in ("fp32", "bf16")}
    for model in ("resunet", "pahubert_resunet", "demucs_v2_hubert", "htdemucs"):
        for variant in ("fp32", "bf16"):
            row = sep[(model, variant)]
            for cell in (row[2], row[4], row[5], row[7]):  # params, RTF, audio-s/s, memory
                _finite(cell)
        _finite(sep[(model, "bf16")][6])  # bf16 vs fp32 difference
    assert re.search(r"largest pretraining batch \(fp32\): \d+ x", table)
    assert re.search(r"numerics \(\d+ updates.*bf16 (MATCHES|DOES NOT MATCH) fp32", table)
    assert (out / "numerics.tsv").read_text().startswith("update\tloss_fp32\tloss_bf16\n")
    assert (out / "numerics.png").stat().st_size > 0


class _Attention(torch.nn.Module):
    """fairseq's MultiheadAttention as wav2vec2's layers call it, and a head."""

    def __init__(self):
        super().__init__()
        from fairseq.modules import MultiheadAttention

        self.mha = MultiheadAttention(16, 4, self_attention=True)
        self.head = torch.nn.Linear(16, 1)

    def forward(self, x):
        return self.head(self.mha(x, x, x, need_weights=False)[0])


def _criterion(model, sample):
    loss = (model(sample["x"]) - sample["y"]).pow(2).sum()
    return loss, sample["y"].numel(), {}


@pytest.mark.parametrize("precision", ["fp32", "bf16", "bf16-math", "fp16"])
def test_make_step_trains_in_every_precision(precision):
    """The step the pretrain/finetune/numerics steps time (autocast, GradScaler for fp16, SDPA's math
    kernel for bf16-math, clipping, Adam) lowers the loss on the CPU too."""
    torch.manual_seed(0)
    model = _Attention()
    sample = {"x": torch.randn(6, 3, 16), "y": torch.randn(6, 3, 1)}
    step = gpu_check.make_step(model, _criterion, torch.optim.Adam(model.parameters(), lr=1e-2), 1.0,
                               torch.device("cpu"), precision)
    losses = [step(sample) for _ in range(20)]
    assert all(math.isfinite(v) for v in losses)
    assert losses[-1] < 0.9 * losses[0]
