"""A training's folder across runs: a finished run stays finished, a run stopped before its first
checkpoint_last.pt resumes, one run per folder, no stale temporaries, a resumed pretraining run is the
run it resumed, and early stopping (checkpoint.patience) counts across a resume (real fairseq runs, tiny
models)."""
import errno
import fcntl
import math
import os
import re
import subprocess
import sys

import pytest
import torch

from helpers import (overrides, run_fairseq, stock_hubert_overrides, train_stock_hubert,
                     write_stock_hubert_data)

ENV = {"OMP_NUM_THREADS": "1"}


def _fairseq(args, cwd):
    env = dict(os.environ, PYTHONUNBUFFERED="1", **ENV)
    return subprocess.run([sys.executable, "-m", "fairseq_cli.hydra_train", *map(str, args)], cwd=cwd, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=600)


def _snapshot(save):
    return {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(save.glob("checkpoint*.pt"))}


def test_rerun_of_a_finished_training_changes_nothing(tmp_path):
    save, log = train_stock_hubert(tmp_path, max_update=2)
    before = _snapshot(save)
    assert {"checkpoint_last.pt", "checkpoint_best.pt"} <= before.keys()
    for _ in range(2):
        proc = _fairseq(stock_hubert_overrides(tmp_path / "data", save, 2), tmp_path)
        assert proc.returncode == 0, proc.stdout[-3000:]
        assert "already finished: checkpoint_last.pt is at update 2 = max_update" in proc.stdout, proc.stdout[-3000:]
        assert "Saved checkpoint" not in proc.stdout and "train_inner" not in proc.stdout
        assert _snapshot(save) == before


def test_missing_checkpoint_last_resumes_from_the_newest_intact_checkpoint(tmp_path):
    """A kill (or a full disk) between writing checkpoint_1_N.pt and copying it to checkpoint_last.pt."""
    from pahubert_plugin.checkpoint import checkpoint_updates

    save, _ = train_stock_hubert(tmp_path, max_update=2)
    (save / "checkpoint_last.pt").unlink()
    log = run_fairseq(["fairseq_cli.hydra_train", *stock_hubert_overrides(tmp_path / "data", save, 3)],
                      cwd=tmp_path, env=ENV)
    assert re.search(r"checkpoint_last\.pt is missing but .*checkpoint_best\.pt is not: resuming from it", log), \
        log[-3000:]
    assert re.search(r"Loaded checkpoint .*checkpoint_best\.pt \(epoch \d+ @ 2 updates\)", log), log[-3000:]
    assert re.findall(r'"num_updates": "(\d+)"', log) == ["3"]  # one update: 3, never 1 and 2 again
    assert checkpoint_updates(str(save / "checkpoint_last.pt")) == 3
    # checkpoint_best.pt holds update 2 (kept) or 3 (better), never a fresh start's update 1
    assert checkpoint_updates(str(save / "checkpoint_best.pt")) in (2, 3)


def test_second_training_on_a_locked_folder_is_refused_with_the_holders_pid(tmp_path):
    data = write_stock_hubert_data(tmp_path / "data")
    save = tmp_path / "ckpt"
    save.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; sys.stdin.read()"], stdin=subprocess.PIPE)
    try:
        with open(save / ".pahubert.lock", "w") as f:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)  # this process's lock, the child's PID written
            f.write(f"{holder.pid}\n")
            f.flush()
            proc = _fairseq(stock_hubert_overrides(data, save, 2), tmp_path)
        assert proc.returncode != 0
        assert f"{save} is in use by another run (PID {holder.pid}" in proc.stdout, proc.stdout[-3000:]
        assert not list(save.glob("checkpoint*"))
    finally:
        holder.communicate(b"")
    # the lock died with its holder: the next run trains, and holds the lock with its own PID meanwhile
    run_fairseq(["fairseq_cli.hydra_train", *stock_hubert_overrides(data, save, 1)], cwd=tmp_path, env=ENV)
    assert (save / "checkpoint_last.pt").is_file()


def test_lock_is_per_process_and_names_the_holder(tmp_path):
    from pahubert_plugin import training

    code = ("import sys; from pahubert_plugin.training import lock_folder; lock_folder(sys.argv[1]); "
            "print('locked', flush=True); sys.stdin.read()")
    holder = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(SystemExit, match=rf"in use by another run \(PID {holder.pid},"):
            training.lock_folder(str(tmp_path))
    finally:
        holder.communicate("")
    training.lock_folder(str(tmp_path))  # free again
    assert (tmp_path / ".pahubert.lock").read_text().strip() == str(os.getpid())


def test_stale_checkpoint_temporaries_are_removed_on_start(tmp_path):
    data = write_stock_hubert_data(tmp_path / "data")
    save = tmp_path / "ckpt"
    save.mkdir()
    stale = [save / "checkpoint_1_1.pt.tmp", save / "checkpoint_last.pt.x1y2z3.tmp"]
    for p in stale:
        p.write_bytes(b"\0" * 1000)
    keep = save / "notes.tmp"
    keep.write_text("not ours")
    log = run_fairseq(["fairseq_cli.hydra_train", *stock_hubert_overrides(data, save, 1)], cwd=tmp_path, env=ENV)
    assert "removed 2 temporary file(s) of an interrupted save" in log, log[-3000:]
    assert not any(p.exists() for p in stale) and keep.exists()
    assert not list(save.glob("*.pt.tmp")) and not list(save.glob("*.pt.*.tmp"))


def test_a_save_on_a_full_disk_says_so_in_one_line_and_leaves_no_temporary(tmp_path, small_disk):
    data = write_stock_hubert_data(tmp_path / "data")
    save = small_disk / "ckpt"
    args = [a for a in map(str, stock_hubert_overrides(data, save, 1)) if not a.startswith("hydra.run.dir=")]
    proc = _fairseq([*args, f"hydra.run.dir={tmp_path}/hydra"], tmp_path)
    assert proc.returncode == 1, proc.stdout[-3000:]
    assert re.search(r"^cannot write checkpoint \S*/ckpt/checkpoint\S*\.pt: No space left on device \(free space in "
                     r"\S*/ckpt, or give another folder, then rerun", proc.stdout, re.M), proc.stdout[-3000:]
    assert "Traceback" not in proc.stdout and "unexpected pos" not in proc.stdout, proc.stdout[-3000:]
    assert sorted(p.name for p in save.iterdir()) == [".pahubert.lock"]


def test_a_full_disk_while_copying_to_checkpoint_last_is_one_line(tmp_path, monkeypatch):
    from pahubert_plugin import checkpoint

    checkpoint.install_fairseq_patches()
    from fairseq.file_io import PathManager

    src = tmp_path / "checkpoint_1_1.pt"
    src.write_bytes(b"x" * 100)

    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint.shutil, "copyfileobj", no_space)
    with pytest.raises(SystemExit, match=r"^cannot copy checkpoint_1_1\.pt to \S*checkpoint_last\.pt: No space left"):
        PathManager.copy(str(src), str(tmp_path / "checkpoint_last.pt"), overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint_1_1.pt"]


# ---- a resumed pretraining run is the run it resumed --------------------------------------------

RESUME_ARGS = ("common.log_interval=1", "common.seed=7", "model.mask_prob=0.5", "task.max_sample_size=12000",
               "task.min_sample_size=8000", "dataset.batch_size=2", "model.encoder_layers=1",
               "lr_scheduler.warmup_updates=1", "checkpoint.save_interval_updates=1000")


def _pretrain(root, data, save, max_update, *extra):
    from pahubert_plugin.checkpoint import load_checkpoint

    log = run_fairseq(["fairseq_cli.hydra_train", *overrides(data, save, max_update, *RESUME_ARGS, *extra)],
                      cwd=root, env=ENV)
    return log, load_checkpoint(save / "checkpoint_last.pt")["model"]


@pytest.mark.slow
def test_pretraining_resumed_mid_epoch_and_across_epochs_equals_the_uninterrupted_run(corpora, tmp_path):
    """3 + 3 updates give the weights of 6 (4 batches an epoch: the resume is mid-epoch 1 and crosses into 2)
    once the schedule's length is the final one; without it the resume names what differs."""
    data = corpora.write_corpus(tmp_path / "data", n_train=8, n_valid=1)
    fixed = "++lr_scheduler.total_num_update=6"
    _, whole = _pretrain(tmp_path, data, tmp_path / "whole", 6, fixed)
    _pretrain(tmp_path, data, tmp_path / "parts", 3, fixed)
    log, resumed = _pretrain(tmp_path, data, tmp_path / "parts", 6, fixed)
    assert "another learning-rate schedule" not in log
    differ = [k for k in whole if not torch.equal(whole[k], resumed[k])]
    assert not differ, differ
    # polynomial_decay decays over max_update: 3, then 6, is another schedule, and the resume says so
    _pretrain(tmp_path, data, tmp_path / "grown", 3)
    log, grown = _pretrain(tmp_path, data, tmp_path / "grown", 6)
    assert re.search(r"resuming .*checkpoint_last\.pt with another learning-rate schedule than it was trained on "
                     r"\(optimization\.max_update: 3 -> 6; lr_scheduler\.total_num_update: 3\.0 -> 6\.0\)", log), log[-3000:]
    assert any(not torch.equal(whole[k], grown[k]) for k in whole)


@pytest.mark.slow
def test_early_stopping_counts_across_a_resume_and_a_stopped_run_stays_stopped(tmp_path, corpora):
    """fairseq's checkpoint.patience on a real fine-tuning run: with the learning rate at 0 the validation score
    never improves, so patience=2 stops after the third validation. A rerun of the stopped run trains nothing; a
    rerun with patience=4 goes on counting from the saved count (2) and stops two validations later, where a
    fresh count would need four more."""
    from helpers import finetune_args, updates_done

    from pahubert_plugin.checkpoint import load_checkpoint

    data = corpora.write_musdb(tmp_path / "musdb", tracks=2, seconds=1.5)
    save = tmp_path / "ckpt"

    def run(patience, *extra):
        args = finetune_args("demucs_v2_tiny.yaml", data, save, 20, "optimization.lr=[0.0]",
                             "dataset.validate_interval_updates=1", "checkpoint.save_interval_updates=1",
                             f"checkpoint.patience={patience}", *extra)
        return run_fairseq(args, cwd=tmp_path)

    log = run(2)
    assert "early stop since valid performance hasn't improved for last 2 runs" in log, log[-3000:]
    assert updates_done(log) == 3
    saved = load_checkpoint(str(save / "checkpoint_last.pt"))["extra_state"]["pahubert_patience"]
    assert saved["num_runs"] == 2 and math.isfinite(saved["best"])
    before = _snapshot(save)

    log = run(2)
    assert "already finished: checkpoint_last.pt stopped early at update 3" in log, log[-3000:]
    assert "train_inner" not in log and _snapshot(save) == before

    log = run(4)
    assert "early stop since valid performance hasn't improved for last 4 runs" in log, log[-3000:]
    assert updates_done(log) == 5  # counted on from 2; a fresh count would have stopped at update 8
    saved = load_checkpoint(str(save / "checkpoint_last.pt"))["extra_state"]["pahubert_patience"]
    assert (saved["num_runs"], saved["metric"], saved["maximize"]) == (4, "sdr", True)

    # a count of another metric is not compared with the new one's scores: the count starts afresh
    log = run(2, "checkpoint.best_checkpoint_metric=loss", "checkpoint.maximize_best_checkpoint_metric=false")
    assert "early stopping starts a fresh count (the saved one was of sdr" in log, log[-3000:]
    assert updates_done(log) == 8
