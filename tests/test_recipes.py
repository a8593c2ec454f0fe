"""The recipes' run.sh across runs: one run per --exp-dir, finished stages skipped on a rerun, a space in
--exp-dir, the manifest's own error on a full disk, no stale temporaries, the repo's .venv found."""
import fcntl
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PAHUBERT = REPO / "recipes" / "pahubert" / "run.sh"
MUSDB = REPO / "recipes" / "musdb" / "run.sh"
SR = 16000
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO),
           PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"])


def _run(script, *args, env=ENV, timeout=900, cwd=None):
    return subprocess.run(["bash", str(script), *map(str, args)], env=env, capture_output=True, text=True,
                          timeout=timeout, cwd=cwd)


@pytest.mark.parametrize("script,args", [
    (PAHUBERT, ["--stage", "1", "--stop-stage", "1"]),
    (MUSDB, ["--stage", "2", "--stop-stage", "2"]),
])
def test_second_run_on_one_exp_dir_is_refused_with_the_holders_pid(tmp_path, script, args):
    exp = tmp_path / "exp"
    exp.mkdir()
    with open(exp / ".pahubert.lock", "w") as f:  # a first run holds the lock
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        f.write("4242\n")
        f.flush()
        proc = _run(script, "--exp-dir", exp, "--musdb-root", tmp_path, *args) if script == MUSDB else \
            _run(script, "--exp-dir", exp, *args)
    assert proc.returncode != 0
    assert f"run.sh: {exp} is in use by another run (PID 4242, holding {exp}/.pahubert.lock)" in proc.stderr, \
        proc.stdout + proc.stderr
    assert not (exp / "logs" / "stage1.log").exists() and not (exp / "logs" / "stage2.log").exists()


def _no_project_path(tmp_path):
    """A PATH whose `python` lacks the project (a system python3 without omegaconf), as before `source .venv`."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    system = shutil.which("python3", path="/usr/bin:/bin")
    if system is None:
        pytest.skip("no system python3")
    (bin_dir / "python").symlink_to(system)
    return f"{bin_dir}:/usr/bin:/bin"


def test_recipe_without_the_venv_says_to_activate_it(tmp_path, corpora):
    """A checkout without its .venv (CI's has one: the recipes are copied out of it), run without activating it."""
    repo = tmp_path / "repo"
    shutil.copytree(REPO / "recipes", repo / "recipes")
    audio = tmp_path / "audio"
    corpora.make_corpus(str(audio))
    env = {k: v for k, v in ENV.items() if k not in ("PYTHON", "PYTHONPATH", "VIRTUAL_ENV")}
    env["PATH"] = _no_project_path(tmp_path)
    for script, args in ((repo / "recipes" / "pahubert" / "run.sh", ["--audio-dir", audio, "--stage", "0",
                                                                     "--stop-stage", "0"]),
                         (repo / "recipes" / "musdb" / "run.sh", ["--musdb-root", tmp_path])):
        proc = _run(script, "--exp-dir", tmp_path / "exp", *args, env=env)
        assert proc.returncode != 0
        assert "cannot import the project (omegaconf, fairseq, pahubert_plugin)" in proc.stderr, proc.stderr
        assert f"source {repo}/.venv/bin/activate" in proc.stderr, proc.stderr
        assert "YAML" not in proc.stderr and "cannot read" not in proc.stderr


def test_recipe_finds_the_repos_venv(tmp_path, corpora):
    """A checkout with its .venv (here a link to this interpreter's environment), run without activating it."""
    repo = tmp_path / "repo"
    shutil.copytree(REPO / "recipes", repo / "recipes")
    (repo / ".venv").symlink_to(Path(sys.prefix))
    audio = tmp_path / "audio"
    corpora.make_corpus(str(audio))
    env = {k: v for k, v in ENV.items() if k not in ("PYTHON", "VIRTUAL_ENV")}
    env["PATH"] = _no_project_path(tmp_path)
    proc = _run(repo / "recipes" / "pahubert" / "run.sh", "--audio-dir", audio, "--exp-dir", tmp_path / "exp",
                "--sample-rate", SR, "--nj", "1", "--stage", "0", "--stop-stage", "0", env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert re.search(r"^kept \d+", proc.stdout, re.M), proc.stdout


@pytest.fixture
def full_disk(small_disk):
    """The small disk with one 4 KiB page free (room for one small file)."""
    (small_disk / "filler").write_bytes(b"\0" * (60 * 1024))
    return small_disk


def test_stage0_reports_the_manifests_own_error_on_a_full_disk(tmp_path, corpora, full_disk):
    audio = tmp_path / "audio"
    corpora.make_corpus(str(audio))
    proc = _run(PAHUBERT, "--audio-dir", audio, "--exp-dir", tmp_path / "exp", "--data-dir", full_disk / "data",
                "--sample-rate", SR, "--nj", "1", "--stage", "0", "--stop-stage", "1")
    assert proc.returncode != 0
    assert re.search(r"run\.sh: stage 0: pahubert-manifest failed \(exit 2\): .*cannot write the manifests in "
                     r".*No space left on device", proc.stderr), proc.stdout + proc.stderr
    assert "stage 1" not in proc.stdout


def _tiny_pretraining(updates):
    return ["--", "common.cpu=true", "common.log_interval=1", f"optimization.max_update={updates}",
            "task.max_sample_size=16000", "task.min_sample_size=8000", "dataset.batch_size=4",
            "lr_scheduler.warmup_updates=1", "dataset.validate_interval=1000", "checkpoint.save_interval=1000"]


@pytest.mark.slow
def test_rerun_skips_finished_stages_under_an_exp_dir_with_a_space(tmp_path, corpora):
    audio = tmp_path / "audio"
    corpora.make_corpus(str(audio))
    exp = tmp_path / "my exp"
    stale = exp / "feat" / "mfcc" / ".train_0_1.x1y2"  # a killed dump's shard folder
    stale.mkdir(parents=True)
    (stale / "train_0_1.npy").write_bytes(b"\0" * 1000)
    args = ["--audio-dir", audio, "--exp-dir", exp, "--sample-rate", SR, "--nj", "1", "--n-clusters", 4,
            "--valid-percent", "0.2", "--pretrain-config", "tiny", "--stage", 0, "--stop-stage", 4, *_tiny_pretraining(2)]
    first = _run(PAHUBERT, *args)
    assert first.returncode == 0, first.stdout + first.stderr[-4000:]
    assert not stale.exists()
    ckpt = exp / "pretrain" / "iter1_mfcc_k4" / "checkpoints"
    outputs = [ckpt / "checkpoint_best.pt", ckpt / "checkpoint_last.pt", exp / "labels" / "mfcc_k4" / "train.km",
               exp / "km" / "mfcc_k4.km", exp / "data" / "train.tsv"]
    before = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in outputs}

    again = _run(PAHUBERT, *args)
    assert again.returncode == 0, again.stdout + again.stderr[-4000:]
    for n in range(5):
        assert re.search(rf"stage {n}: skipped: done, and its inputs, options and outputs have not changed", again.stdout), \
            again.stdout
    assert {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in outputs} == before
    # the same folders spelled another way (relative to the run's directory, with "." and "..")
    respelled = _run(PAHUBERT, *["./audio" if a == audio else "sub/../my exp" if a == exp else a for a in args],
                     cwd=tmp_path)
    assert respelled.returncode == 0, respelled.stdout + respelled.stderr[-4000:]
    assert all(f"stage {n}: skipped: done" in respelled.stdout for n in range(5)), respelled.stdout
    assert {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in outputs} == before

    # stage 4 without its stamp (e.g. an older recipe's run): fairseq finds the run finished and trains nothing
    (exp / ".stages" / "stage4").unlink()
    third = _run(PAHUBERT, *args[:-len(_tiny_pretraining(2)) - 4], "--stage", 4, "--stop-stage", 4, *_tiny_pretraining(2))
    assert third.returncode == 0, third.stdout + third.stderr[-4000:]
    assert "already finished: checkpoint_last.pt is at update 2 = max_update" in third.stdout, third.stdout
    assert {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in outputs} == before

    # a changed option reruns that stage and those after it
    more = _run(PAHUBERT, *args[:-len(_tiny_pretraining(2))], *_tiny_pretraining(3))
    assert more.returncode == 0, more.stdout + more.stderr[-4000:]
    assert "stage 3: skipped" in more.stdout and "stage 4: skipped" not in more.stdout
    from pahubert_plugin.checkpoint import checkpoint_updates

    assert checkpoint_updates(str(ckpt / "checkpoint_last.pt")) == 3


@pytest.mark.slow
def test_musdb_rerun_is_a_no_op_under_an_exp_dir_with_a_space(tmp_path, corpora):
    data = corpora.write_musdb(tmp_path / "musdb data")
    exp = tmp_path / "musdb exp"
    args = ["--musdb-root", data, "--exp-dir", exp, "--config", "tiny", "--eval-subset", "train", "--eval-tracks", 1,
            "--eval-jobs", 1, "--stage", 1, "--stop-stage", 2, "--", "optimization.max_update=2",
            "task.samples_per_track=4", "task.valid_seconds=2.0", "task.valid_segment=1.0", "common.log_interval=1"]
    first = _run(MUSDB, *args)
    assert first.returncode == 0, first.stdout[-4000:] + first.stderr[-4000:]
    ckpts = sorted((exp / "checkpoints").glob("checkpoint*.pt"))
    assert {p.name for p in ckpts} >= {"checkpoint_best.pt", "checkpoint_last.pt"}
    before = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in ckpts}
    again = _run(MUSDB, *args)
    assert again.returncode == 0, again.stdout[-4000:] + again.stderr[-4000:]
    assert "already finished: checkpoint_last.pt is at update 2 = max_update" in again.stdout, again.stdout[-4000:]
    assert "holds scores made with" not in again.stdout + again.stderr
    assert {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted((exp / "checkpoints").glob("checkpoint*.pt"))} \
        == before


def test_manifest_on_a_full_disk_names_the_folder_and_the_error(tmp_path, corpora, caplog):
    """/dev/full answers every write with ENOSPC: train.tsv linked to it is a full disk without root."""
    from pahubert_plugin.data.manifest import main

    if not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full")
    audio, out = tmp_path / "audio", tmp_path / "data"
    corpora.make_corpus(str(audio))
    out.mkdir()
    (out / "train.tsv").symlink_to("/dev/full")
    with caplog.at_level("ERROR"):
        assert main([str(audio), str(out), "--sample-rate", str(SR), "--jobs", "1"]) == 2
    assert re.search(rf"cannot write the manifests in {re.escape(str(out))}: No space left on device", caplog.text), \
        caplog.text


@pytest.mark.parametrize("script", ["recipes/pahubert/run.sh", "recipes/musdb/run.sh"])
def test_recipe_help_lists_every_option_with_its_real_default(script):
    """--help prints each variable parse_options.sh accepts as --name-with-dashes with the value the script
    starts from, so a user who leaves an option out knows what they get (base configs, 44.1 kHz)."""
    text = (REPO / script).read_text()
    block = text[text.index("# ---- options"):text.index("\nPYTHON=")]
    defaults = dict(re.findall(r"^([a-z0-9_]+)=(\S*)", block, re.M))
    proc = subprocess.run(["bash", script, "--help"], cwd=REPO, stdout=subprocess.PIPE, text=True, timeout=60)
    assert proc.returncode == 0
    for name, value in defaults.items():
        shown = value if value not in ("", '""') else ("(none)" if value == "" else '""')
        assert re.search(rf"^  --{name.replace('_', '-')} +{re.escape(shown)}( |$)", proc.stdout, re.M), \
            (name, value, proc.stdout)
    usage = proc.stdout[proc.stdout.index("Usage:"):proc.stdout.index("Options (default):")]
    for name, value in re.findall(r"\[--([a-z-]+) ([^\]\s]+)\]", usage):  # [--opt VALUE] in the usage line
        if value.isupper():
            continue  # a placeholder (CKPT, DIR)
        assert defaults[name.replace("-", "_")] == value, (name, value)
