"""`make demo DEMO=speech --quick`, the porting experiment on its corpus, and the demo's option checks: end to end,
as CI runs them. The music demo's end-to-end test is in test_demo_music.py."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import REPO
from pahubert_plugin.checkpoint import load_checkpoint


def _env():
    return dict(os.environ, PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}", PYTHONUNBUFFERED="1")


@pytest.fixture(scope="module")
def quick_speech_work(tmp_path_factory):
    """The quick speech demo's corpus and MFCC units (its steps 1-2), made once for the tests that need them."""
    work = tmp_path_factory.mktemp("speech") / "work"
    proc = subprocess.run(["bash", "examples/demo/run.sh", "--corpus", "speech", "--quick", "--work", str(work),
                           "--stop-stage", "2"], cwd=REPO, env=_env(), stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-5000:]
    return work


@pytest.mark.slow
def test_quick_speech_demo_end_to_end(tmp_path, quick_speech_work):
    """`make demo DEMO=speech DEMO_ARGS=--quick`: speech in machine noise, two sources, speech metrics."""
    env = _env()
    work, results = quick_speech_work, tmp_path / "results"  # steps 1-2 find their outputs there and reuse them
    proc = subprocess.run(["bash", "examples/demo/run.sh", "--corpus", "speech", "--quick", "--work", str(work),
                           "--results", str(results)], cwd=REPO, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-5000:]
    for step in range(1, 6):
        assert f"==== [{step}/5]" in proc.stdout
    assert (work / "corpus" / "valid").is_dir() and (work / "corpus" / "test").is_dir()
    summary = json.loads((results / "summary.json").read_text())
    md = (results / "summary.md").read_text()
    assert summary["metric"] == "SI-SDR" and summary["sources"] == ["speech", "noise"]
    assert "Test SI-SDR" in md and "Paired per-clip differences" in md and "speech PESQ" in md
    (paired,) = summary["paired"]
    assert len(paired["diffs"]) == 2 and all(math.isfinite(d) for d in paired["diffs"])
    verdict = "helped" if summary["mean_paired_difference"] > 0 else "did NOT beat"
    assert verdict in md
    # the mixture-as-estimate baseline is the evaluation's own: SI-SDR finite, PESQ and STOI in range
    assert all(math.isfinite(summary["mixture"][s]["SI-SDR"]) for s in ("speech", "noise"))
    for arm in ("scratch", "pretrained"):
        scores = json.loads((results / "eval" / f"{arm}_n4_s1" / "summary.json").read_text())["sources"]["speech"]
        assert 1.0 <= scores["PESQ"] <= 4.65 and 0.0 <= scores["STOI"] <= 1.0, scores
        log = (work / "finetune" / "main" / f"{arm}_n4_s1" / "train.log").read_text()
        assert '"valid_best_si_sdr"' in log  # checkpoints were selected on validation SI-SDR
    assert all(len(v) >= 2 for v in summary["valid_curves"].values())
    # a second pretraining iteration on the same work folder reuses iteration 1 instead of training it again
    ckpt1 = work / "pahubert" / "pretrain" / "iter1_mfcc_k16" / "checkpoints" / "checkpoint_last.pt"
    before = ckpt1.stat().st_mtime_ns
    proc = subprocess.run(["bash", "examples/demo/run.sh", "--corpus", "speech", "--quick", "--work", str(work),
                           "--results", str(results), "--iteration", "2", "--iter2-clusters", "8",
                           "--stage", "3", "--stop-stage", "3"], cwd=REPO, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-5000:]
    assert "done before (40 updates), reused" in proc.stdout and ckpt1.stat().st_mtime_ns == before
    ckpt2 = work / "pahubert" / "pretrain" / "iter2_mfcc_k16_l3_k8" / "checkpoints" / "checkpoint_last.pt"
    assert ckpt2.is_file(), proc.stdout[-3000:]
    # iteration 2 clusters the checkpoint the pretrained arm fine-tunes from: the end of iteration 1
    assert "iter1_mfcc_k16/checkpoints/checkpoint_last.pt -> k-means 8" in proc.stdout, proc.stdout[-3000:]


@pytest.mark.parametrize("args, message", [
    (["--feature", "chroma"], "--feature must be mfcc or primitive, got chroma"),
    (["--n-clusters", "0"], "--n-clusters must be a positive integer, got 0"),
    (["--n-clusters", "50k"], "--n-clusters must be a positive integer, got 50k"),
    (["--select", "median"], "--select must be best or last, got median"),
    (["--corpus", "birdsong"], "--corpus must be midi, toy or speech, got birdsong"),
    (["--parallel", "0"], "--parallel must be a positive integer, got 0"),
    (["--stop-stage", "6"], "--stop-stage must be 1 to 5, got 6"),
    (["--finetune-config", "demucs_v3"], "--finetune-config: no recipes/musdb/conf/demucs_v3.yaml"),
    (["--pretrained-checkpoint", "/nonexistent/hubert.pt"], "--pretrained-checkpoint: no file /nonexistent/hubert.pt"),
])
def test_demo_refuses_bad_options_before_any_work(tmp_path, args, message):
    work = tmp_path / "work"
    proc = subprocess.run(["bash", "examples/demo/run.sh", "--work", str(work), *args], cwd=REPO,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=60)
    assert proc.returncode == 1 and message in proc.stdout, proc.stdout
    assert not work.exists()  # refused before anything was made


def test_demo_help_names_the_clustering_options():
    proc = subprocess.run(["bash", "examples/demo/run.sh", "--help"], cwd=REPO, stdout=subprocess.PIPE, text=True,
                          timeout=60)
    assert proc.returncode == 0
    assert "--feature mfcc|primitive" in proc.stdout and "--n-clusters K" in proc.stdout
    assert "--stop-stage N" in proc.stdout and "--parallel P" in proc.stdout
    assert "--finetune-config NAME" in proc.stdout and "--pretrained-checkpoint F" in proc.stdout


@pytest.mark.parametrize("script, says", [
    ("examples/demo/speech_convergence.sh", ["teacher", "--finetune-updates N"]),
    ("examples/demo/speech_to_music.sh", ["pahubert-port-hubert", "--speech-work DIR", "--quick"]),
])
def test_driver_scripts_explain_themselves_and_refuse_unknown_options(script, says):
    proc = subprocess.run(["bash", script, "--help"], cwd=REPO, stdout=subprocess.PIPE, text=True, timeout=60)
    assert proc.returncode == 0 and all(word in proc.stdout for word in says), proc.stdout
    proc = subprocess.run(["bash", script, "--bogus"], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, timeout=60)
    assert proc.returncode == 1 and "unknown option --bogus" in proc.stdout


@pytest.mark.slow
def test_quick_speech_hubert_ported_into_demucs_end_to_end(tmp_path, quick_speech_work):
    """The porting experiment: stock fairseq HuBERT on speech -> pahubert-port-hubert -> Demucs V2 on music."""
    env = _env()
    speech, work, results = quick_speech_work, tmp_path / "port", tmp_path / "results"
    cmd = ["bash", "examples/demo/speech_to_music.sh", "--quick", "--speech-work", str(speech), "--work", str(work),
           "--results", str(results)]
    proc = subprocess.run(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          timeout=1200)
    assert proc.returncode == 0, proc.stdout[-5000:]
    for step in range(1, 6):
        assert f"==== [port {step}/5]" in proc.stdout
    # a stock fairseq HuBERT was trained (fairseq's own model and criterion, nothing of the plugin) ...
    hubert_log = (work / "hubert" / "train.log").read_text()
    assert "'_name': 'hubert'" in hubert_log and "'_name': 'hubert_pretraining'" in hubert_log
    assert "masked-frame accuracy on its validation clips: 0." in proc.stdout
    # ... its transformer went into Demucs V2, and the pretrained arm started from it; scratch did not
    ported = work / "ported_demucs_hubert_tiny.pt"
    ft = work / "music" / "finetune" / "speech_hubert"
    port = load_checkpoint(ported)["port"]  # the tensors the port made (Demucs around the transformer) are new
    taken, made = len(port["copied"]) + len(port["reshaped"]), len(port["new"])
    assert taken == 38 and made > 0
    log = (ft / "pretrained_n4_s1" / "train.log").read_text()
    assert f"loaded {taken} encoder tensors from {ported} " in log, log[-3000:]
    assert f"{made} tensors the port created keep this run's random init" in log
    assert "weights randomly initialised" in (ft / "scratch_n4_s1" / "train.log").read_text()
    summary = json.loads((results / "speech_hubert" / "summary.json").read_text())
    (paired,) = summary["paired"]
    assert len(paired["diffs"]) == 2 and all(math.isfinite(d) for d in paired["diffs"])
    assert summary["sources"] == ["drums", "bass", "other", "vocals"]
    assert "demucs_v2_hubert_tiny" in (results / "speech_hubert" / "settings.txt").read_text()
    # a rerun trains nothing again
    rerun = subprocess.run(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                           timeout=900)
    assert rerun.returncode == 0, rerun.stdout[-3000:]
    assert "stock fairseq HuBERT: " in rerun.stdout and rerun.stdout.count("done before, reused") == 4
