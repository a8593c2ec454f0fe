"""Console scripts: instant --help without torch/fairseq, no tensorboardX notice, tensorboard event
files from a tiny fairseq run, and pahubert-plot-log on fairseq's json and simple logs."""
import json
import re
import subprocess
import sys

import pytest

from helpers import REPO, run_fairseq, stock_hubert_overrides, write_stock_hubert_data
from pahubert_plugin import plot_log

SCRIPTS = re.findall(r'"(pahubert-[\w-]+) = ([\w.]+):(\w+)"', (REPO / "setup.py").read_text())
HEAVY = ("torch", "torchaudio", "fairseq", "scipy", "sklearn")


def test_setup_lists_the_console_scripts():
    names = [name for name, _, _ in SCRIPTS]
    assert {"pahubert-separate", "pahubert-port-hubert", "pahubert-plot-log", "pahubert-evaluate"} <= set(names)


def run_script(name, module, func, args):
    """The console script's main in a fresh interpreter (argv[0] as the installed script sets it)."""
    code = (f"import sys; sys.argv[0] = {name!r}\nfrom {module} import {func}\n"
            f"try:\n    rc = {func}({args!r})\nexcept SystemExit as e:\n    rc = e.code\n"
            f"print('HEAVY=' + ','.join(m for m in {HEAVY!r} if m in sys.modules))\nsys.exit(rc)")
    return subprocess.run([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True, cwd=REPO, timeout=300)


@pytest.mark.parametrize("name,module,func", SCRIPTS, ids=[s[0] for s in SCRIPTS])
def test_help_and_argument_errors_import_nothing_heavy(name, module, func):
    for args, code in ((["--help"], 0), (["--no-such-option"], 2)):
        proc = run_script(name, module, func, args)
        assert proc.returncode == code, proc.stderr[-2000:]
        assert "usage:" in proc.stdout + proc.stderr
        assert proc.stdout.strip().splitlines()[-1] == "HEAVY=", f"{name} {args[0]}: {proc.stdout[-300:]}"
        assert "tensorboardX" not in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize("name,module,func", SCRIPTS, ids=[s[0] for s in SCRIPTS])
def test_every_script_answers_help_without_noise(name, module, func):
    proc = run_script(name, module, func, ["--help"])
    assert proc.returncode == 0 and "usage:" in proc.stdout, proc.stderr[-2000:]
    assert "tensorboardX" not in proc.stderr and "Traceback" not in proc.stderr


def test_scripts_exit_zero_on_success(tmp_path):
    """The console scripts that finish quickly on tiny input exit 0 on success (a main that returns
    a dict makes the installed script exit 1 and print the dict on stderr)."""
    import os
    import shutil
    from pahubert_plugin.corpora import speech_noise as sn
    from pahubert_plugin.corpora.midi import DEFAULT_SOUNDFONT
    scripts = {name: (module, func) for name, module, func in SCRIPTS}
    toy = tmp_path / "toy"
    tiny = ["--train", "0", "--test", "0", "--seconds", "1", "--sample-rate", "8000"]
    runs = [("pahubert-toy-corpus", [str(toy), "--unlabelled", "2"] + tiny),
            ("pahubert-manifest", [str(toy / "unlabelled"), str(tmp_path / "manifest"), "--sample-rate", "8000",
                                   "--valid-percent", "0", "--min-seconds", "0.5", "--jobs", "1"])]
    if shutil.which("fluidsynth") and os.path.isfile(DEFAULT_SOUNDFONT):
        runs.append(("pahubert-midi-corpus", [str(tmp_path / "midi"), "--unlabelled", "1", "--no-progress"] + tiny))
    if shutil.which("flite") and shutil.which("ffmpeg") and os.path.exists(f"{sn.ASTERISK_ROOT}/en"):
        runs.append(("pahubert-speech-corpus", [str(tmp_path / "speech"), "--train-clips", "1", "--valid-clips", "1",
                                                "--test-clips", "1", "--unlabelled-minutes", "0.05",
                                                "--clip-seconds", "1", "--no-progress"]))
    for name, args in runs:
        proc = run_script(name, *scripts[name], args)
        assert proc.returncode == 0, f"{name}: exit {proc.returncode}\n{proc.stderr[-2000:]}"
        assert "Traceback" not in proc.stderr, proc.stderr[-2000:]


def test_plugin_import_is_quiet_and_registers():
    proc = subprocess.run([sys.executable, "-c", "import pahubert_plugin, fairseq.models as m; "
                           "print('pahubert' in m.MODEL_REGISTRY)"], capture_output=True, text=True, timeout=300)
    assert proc.stdout.strip() == "True" and proc.stderr == "", proc.stderr


# ---------------------------------------------------------------------------------------------
# pahubert-plot-log

JSON_LOG = """\
2026-01-01 10:00:00 | INFO | fairseq_cli.train | task: pahubert_pretraining
2026-01-01 10:00:01 | INFO | train_inner | {"epoch": 1, "update": 0.5, "loss": "5.1", "correct_m_0": "0.10", "num_updates": "10", "lr": "0.0001"}
2026-01-01 10:00:02 | INFO | train_inner | {"epoch": 1, "update": 1.0, "loss": "4.2", "correct_m_0": "0.20", "num_updates": "20"}
2026-01-01 10:00:03 | INFO | valid | {"epoch": 1, "valid_loss": "4.4", "valid_correct_m_0": "0.18", "valid_num_updates": "20"}
[2026-01-01 10:00:03,001][train][INFO] - {"epoch": 1, "train_loss": "4.6", "train_num_updates": "20"}
"""
SIMPLE_LOG = """\
2026-01-01 10:00:01 | INFO | train_inner | epoch 001:     10 / 25 loss=0.31, loss_wave=0.2, lr=0.003, num_updates=10
2026-01-01 10:00:02 | INFO | valid | epoch 001 | valid on 'valid' subset | loss 0.29 | sdr 1.5 | sdr_bass 1.1 | sdr_drums 2.0 | num_updates 10
2026-01-01 10:00:03 | INFO | valid | epoch 002 | valid on 'valid' subset | loss 0.25 | sdr 2.5 | sdr_bass 2.1 | sdr_drums 3.0 | num_updates 20 | best_sdr 2.5
"""


def test_parse_json_and_simple_lines(tmp_path):
    (tmp_path / "pre.log").write_text(JSON_LOG)
    (tmp_path / "ft.log").write_text(SIMPLE_LOG)
    pre, ft = plot_log.read_log(tmp_path / "pre.log"), plot_log.read_log(tmp_path / "ft.log")
    assert [s for s, _ in pre] == ["train_inner", "train_inner", "valid", "train"]
    assert pre[2][1] == {"epoch": 1.0, "loss": 4.4, "correct_m_0": 0.18, "num_updates": 20.0}
    assert ft[0] == ("train_inner", {"loss": 0.31, "loss_wave": 0.2, "lr": 0.003, "num_updates": 10.0})
    assert ft[2][1]["sdr_drums"] == 3.0 and ft[2][1]["num_updates"] == 20
    assert plot_log.panels(pre + ft) == {"loss": ["loss"], "masked accuracy": ["correct_m_0"],
                                         "SDR (dB)": ["sdr", "sdr_bass", "sdr_drums"]}


def test_plot_log_writes_png(tmp_path, caplog):
    import matplotlib.image

    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    (tmp_path / "a" / "train.log").write_text(JSON_LOG)
    (tmp_path / "b" / "train.log").write_text(SIMPLE_LOG)
    out = tmp_path / "plots" / "curves.png"
    assert plot_log.main([str(tmp_path / "a" / "train.log"), str(tmp_path / "b" / "train.log"),
                          "-o", str(out), "--title", "t"]) == 0
    img = matplotlib.image.imread(out)
    assert img.shape[1] > 3 * img.shape[0] * 0.9  # three panels side by side
    (tmp_path / "empty.log").write_text("nothing here\n")
    with caplog.at_level("ERROR"):
        assert plot_log.main([str(tmp_path / "empty.log"), "-o", str(tmp_path / "x.png")]) == 2
        assert plot_log.main([str(tmp_path / "missing.log"), "-o", str(tmp_path / "x.png")]) == 2
    assert "nothing to draw" in caplog.text and "cannot read" in caplog.text


@pytest.mark.slow
def test_tiny_run_writes_tensorboard_events_and_a_plottable_log(tmp_path):
    """common.tensorboard_logdir works (tensorboardX is installed) and the json log plots."""
    data = write_stock_hubert_data(tmp_path / "data")
    save, tb = tmp_path / "ckpt", tmp_path / "tb"
    args = [a for a in stock_hubert_overrides(data, save, 2) if not str(a).startswith("common.tensorboard_logdir=")]
    log = run_fairseq(["fairseq_cli.hydra_train", *args, f"common.tensorboard_logdir={tb}",
                       "common.log_format=json"], cwd=tmp_path)
    assert "Please install tensorboardX" not in log
    events = list(tb.rglob("events.out.tfevents.*"))
    assert {e.parent.name for e in events} >= {"train_inner", "valid"}, events
    assert all(e.stat().st_size > 0 for e in events)
    (tmp_path / "train.log").write_text(log)
    records = plot_log.read_log(tmp_path / "train.log")
    assert any(s == "valid" and "correct_m_0" in st for s, st in records), log[-2000:]
    assert plot_log.main([str(tmp_path / "train.log"), "-o", str(tmp_path / "c.png")]) == 0
    assert json.loads(json.dumps(records))  # plain numbers only
