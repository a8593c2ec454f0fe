"""`make demo --quick` on the rendered music corpus: the whole method end to end, as CI runs it. The speech
demo's end-to-end tests are in test_demo.py; the two files run side by side under `make test`'s two processes."""
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import REPO


@pytest.mark.slow
def test_quick_demo_end_to_end(tmp_path):
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}", PYTHONUNBUFFERED="1")
    work, results = tmp_path / "work", tmp_path / "results"
    proc = subprocess.run(["bash", "examples/demo/run.sh", "--quick", "--work", str(work), "--results", str(results)],
                          cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stdout[-5000:]
    for step in range(1, 6):
        assert f"==== [{step}/5]" in proc.stdout
    for arm in ("scratch", "pretrained"):  # the two arms train side by side: each finishing line names its run
        assert re.search(rf"{arm}, 4 songs, seed 1, finished: last validation \"valid_sdr\": \"-?[0-9.]+\"",
                         proc.stdout), proc.stdout
    summary = json.loads((results / "summary.json").read_text())
    md = (results / "summary.md").read_text()
    assert "mixture as estimate" in md and "Paired per-song differences" in md
    assert (results / "sdr.png").stat().st_size > 10_000
    # both arms were trained, scored on both test songs, and the verdict matches the numbers
    (paired,) = summary["paired"]
    assert len(paired["diffs"]) == 2 and all(math.isfinite(d) for d in paired["diffs"])
    verdict = "helped" if summary["mean_paired_difference"] > 0 else "did NOT beat"
    assert verdict in md
    # fine-tuning learned something: both arms beat using the mixture as every source's estimate
    mixture_mean = sum(v["SDR"] for v in summary["mixture"].values()) / 4
    for arm in ("scratch_n4", "pretrained_n4"):
        assert summary["runs"][arm]["1"] > mixture_mean + 1.0, (arm, summary["runs"][arm], mixture_mean)
    # the mixture baseline is cached with the corpus (a cached corpus is not scored twice)
    cache = json.loads((work / "corpus" / "musdb" / ".mixture_baseline_test.json").read_text())
    assert cache["summary"] == json.loads((results / "mixture_baseline.json").read_text())
    assert len([f for f in cache["key"]["files"] if f[0].endswith("mixture.wav")]) == 2
    # validation SDR was logged along the way for both arms
    assert all(len(v) >= 2 for v in summary["valid_curves"].values())
    # a re-run reuses every finished step
    rerun = subprocess.run(["bash", "examples/demo/run.sh", "--quick", "--work", str(work), "--results", str(results),
                            "--stage", "4"], cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                           text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stdout[-3000:]
    assert rerun.stdout.count("done before, reused") == 2
