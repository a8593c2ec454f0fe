"""Guards around a fairseq training run in ``checkpoint.save_dir`` (installed by ``import pahubert_plugin``).

fairseq's ``checkpoint_utils.load_checkpoint`` is the first thing a training does with its folder; the
plugin wraps it (:func:`install_training_guard`, after :func:`checkpoint.install_fairseq_patches`) so that

* **one run per folder**: the first rank takes ``fcntl.flock`` on ``<save_dir>/.pahubert.lock`` (holding
  its PID) for the life of the process; a second training on the same folder stops at once with a message
  naming the holder's PID. The kernel drops the lock with the process, even on SIGKILL;
* **stale temporaries go**: under that lock, ``checkpoint*.pt.tmp`` (fairseq's atomic save) and
  ``checkpoint*.pt.*.tmp`` (the plugin's atomic copy) left by a killed or crashed run are removed; a save
  or copy that fails removes its own temporary, and a full disk ends the run with one line naming the
  checkpoint (exit status 1; a rerun resumes from the last intact checkpoint);
* **resume from the newest intact checkpoint**: when ``checkpoint_last.pt`` is missing but the folder holds
  other checkpoints of this run (a kill, or a full disk, between fairseq writing ``checkpoint_N_M.pt`` and
  copying it to ``checkpoint_last.pt``), training resumes from the one with the most updates instead of
  starting again at update 0 and overwriting ``checkpoint_best.pt``;
* **a finished run stays finished**: when the checkpoint it would resume from is already at
  ``optimization.max_update`` (or beyond), the process logs ``already finished: ...`` and exits 0 before
  loading anything; fairseq would otherwise run one more update and overwrite ``checkpoint_last.pt`` and
  ``checkpoint_best.pt`` on every rerun of the same command.

* **a resume that changes the schedule says so**: fairseq's learning-rate schedules take their length from
  ``optimization.max_update`` (``polynomial_decay``'s ``total_num_update``, ``tri_stage``'s ``max_update``),
  so a run continued with a larger ``max_update`` (3 updates, then on to 6) is not the run an uninterrupted
  6-update run makes, even though batches, crops, masks and dropout resume identically. The resume logs a
  warning naming the schedule fields that changed; fixing the schedule's length from the start (e.g.
  ``++lr_scheduler.total_num_update=6``) makes 3 + 3 updates give the weights of 6.

* **early stopping survives a resume**: fairseq's ``checkpoint.patience`` (stop when the
  ``best_checkpoint_metric`` has not improved for that many validations) keeps its count in memory only, so a
  run killed and resumed would start counting again, and a run that had stopped early would train on at
  every rerun. Each checkpoint now holds the count (``extra_state["pahubert_patience"]``: the best score and
  the validations since it); a resume restores it, and a rerun of a run that stopped early logs
  ``already finished: ... stopped early ...`` and exits 0 (a larger ``checkpoint.patience`` trains on).

These apply when ``checkpoint.restore_file`` keeps its default (``checkpoint_last.pt``: the run resumes
itself); an explicit ``restore_file`` is loaded as fairseq would.
"""
import errno
import fcntl
import glob
import logging
import os
from typing import Optional, Tuple

logger = logging.getLogger("pahubert_plugin.training")

LOCK_NAME = ".pahubert.lock"
TEMPORARY_PATTERNS = ("checkpoint*.pt.tmp", "checkpoint*.pt.*.tmp")

_HELD = {}  # realpath of the folder -> open lock file (kept open for the life of the process)
_INSTALLED = False


class FolderInUse(SystemExit):
    """Another process holds the folder's lock (a SystemExit: the CLI prints the message and exits 1)."""


def lock_folder(folder: str, what: str = "training") -> None:
    """Take the exclusive lock of ``folder`` for this process (idempotent), or raise :class:`FolderInUse`.

    The lock is ``fcntl.flock`` on ``<folder>/.pahubert.lock``, which holds the holder's PID (the recipes'
    ``run.sh`` take the same lock on their ``--exp-dir`` with ``flock``).
    """
    os.makedirs(folder, exist_ok=True)
    key = os.path.realpath(folder)
    if key in _HELD:
        return
    path = os.path.join(folder, LOCK_NAME)
    f = open(path, "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        if e.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
            f.close()
            raise
        f.seek(0)
        holder = f.read().strip() or "unknown"
        f.close()
        raise FolderInUse(f"{folder} is in use by another run (PID {holder}, holding {path}); refusing to start a "
                          f"second {what} there: wait for it to finish, or give another folder") from None
    f.seek(0)
    f.truncate()
    f.write(f"{os.getpid()}\n")
    f.flush()
    _HELD[key] = f


def remove_stale_temporaries(folder: str) -> list:
    """Remove the checkpoint temporaries a killed run left in ``folder`` (call only under its lock)."""
    removed = []
    for pattern in TEMPORARY_PATTERNS:
        for path in sorted(glob.glob(os.path.join(glob.escape(folder), pattern))):
            try:
                os.remove(path)
            except FileNotFoundError:
                continue
            removed.append(path)
    if removed:
        logger.warning(f"removed {len(removed)} temporary file(s) of an interrupted save in {folder}: "
                       f"{', '.join(os.path.basename(p) for p in removed)}")
    return removed


def resume_source(save_dir: str, suffix: str = "") -> Tuple[Optional[str], Optional[int]]:
    """The checkpoint a default resume in ``save_dir`` reads and its updates: an intact
    ``checkpoint_last.pt``, else the newest intact checkpoint of the folder, else ``(None, None)``."""
    from .checkpoint import checkpoint_updates, resume_fallback

    last = os.path.join(save_dir, f"checkpoint_last{suffix}.pt")
    updates = checkpoint_updates(last) if os.path.isfile(last) else None
    if updates is not None:
        return last, updates
    fallback = resume_fallback(last) if os.path.isdir(save_dir) else None
    return (fallback, checkpoint_updates(fallback)) if fallback else (None, None)


PATIENCE_KEY = "pahubert_patience"


def _early_stopping():
    """fairseq's ``should_stop_early`` (its count lives on the function), when a training has imported it."""
    import sys

    return getattr(sys.modules.get("fairseq_cli.train"), "should_stop_early", None)


def _metric(checkpoint_cfg) -> Tuple[str, bool]:
    """What the count is of: ``(best_checkpoint_metric, maximize_best_checkpoint_metric)``."""
    get = checkpoint_cfg.get if isinstance(checkpoint_cfg, dict) else lambda k, d=None: getattr(checkpoint_cfg, k, d)
    return str(get("best_checkpoint_metric", "loss")), bool(get("maximize_best_checkpoint_metric", False))


def patience_state(checkpoint_cfg=None) -> Optional[dict]:
    """The running training's early-stopping count, ``{"best": score, "num_runs": validations since, "metric":
    name, "maximize": bool}``, or None before its first validation with ``checkpoint.patience > 0``."""
    stop = _early_stopping()
    if stop is None or getattr(stop, "best", None) is None:
        return None
    state = {"best": float(stop.best), "num_runs": int(getattr(stop, "num_runs", 0))}
    if checkpoint_cfg is not None:
        state["metric"], state["maximize"] = _metric(checkpoint_cfg)
    return state


def set_patience_state(state: Optional[dict]) -> None:
    """Give fairseq's ``should_stop_early`` the count a checkpoint saved (None: a fresh count)."""
    stop = _early_stopping()
    if stop is None:
        return
    if state is None:
        for name in ("best", "num_runs"):
            if hasattr(stop, name):
                delattr(stop, name)
    else:
        stop.best, stop.num_runs = float(state["best"]), int(state["num_runs"])


def read_state(source: str) -> Optional[dict]:
    """The checkpoint a resume reads, memory-mapped (None: unreadable; fairseq's load reports it)."""
    from .checkpoint import load_checkpoint

    try:
        return load_checkpoint(source, mmap=True)
    except (ValueError, OSError, RuntimeError):
        return None


def saved_patience(state: Optional[dict]) -> Optional[dict]:
    """The early-stopping count saved in checkpoint ``state`` (None: none saved, or no state)."""
    saved = ((state or {}).get("extra_state") or {}).get(PATIENCE_KEY)
    return dict(saved) if isinstance(saved, dict) and {"best", "num_runs"} <= saved.keys() else None


def finished_message(save_dir: str, source: str, updates: int, max_update: int) -> str:
    relation = "=" if updates == max_update else ">"
    return (f"already finished: {os.path.basename(source)} is at update {updates} {relation} max_update "
            f"({max_update}) in {save_dir}; nothing to train (raise optimization.max_update to train on, or "
            f"give another checkpoint.save_dir for a new run)")


def schedule_changes(state_cfg, cfg) -> list:
    """``name: saved -> now`` for each ``lr_scheduler`` field (and ``optimization.max_update``) that differs
    between a checkpoint's saved config and the running one."""
    from omegaconf import OmegaConf

    def plain(section):
        if section is None:
            return {}
        if OmegaConf.is_config(section):
            return OmegaConf.to_container(section, resolve=True) or {}
        return dict(section) if isinstance(section, dict) else vars(section)

    saved, now = plain((state_cfg or {}).get("lr_scheduler")), plain(getattr(cfg, "lr_scheduler", None))
    changes = [f"lr_scheduler.{k}: {saved.get(k)} -> {now.get(k)}" for k in sorted(set(saved) | set(now))
               if saved.get(k) != now.get(k)]
    old = plain((state_cfg or {}).get("optimization")).get("max_update")
    new = getattr(getattr(cfg, "optimization", None), "max_update", None)
    if old is not None and new is not None and old != new:
        changes.insert(0, f"optimization.max_update: {old} -> {new}")
    return changes


def warn_schedule_changes(source: str, state: Optional[dict], cfg) -> None:
    if state is None:
        return
    changes = schedule_changes(state.get("cfg"), cfg)
    lr_changes = [c for c in changes if c.startswith("lr_scheduler.")]
    if lr_changes:
        logger.warning(
            f"resuming {source} with another learning-rate schedule than it was trained on ({'; '.join(changes)}): "
            f"the result differs from one uninterrupted run to max_update. To extend a run as if it had not stopped, "
            f"fix the schedule's length from its start (e.g. ++lr_scheduler.total_num_update=N for polynomial_decay)")


class _RecordingWriter:
    """A file object for ``torch.save`` that keeps the ``OSError`` its writes met: torch reports a failed
    write as ``RuntimeError: ... unexpected pos``, which names neither the file nor the reason."""

    def __init__(self, f):
        self.f, self.error = f, None

    def write(self, data):
        try:
            return self.f.write(data)
        except OSError as e:
            self.error = e
            raise

    def flush(self):
        return self.f.flush()


def save_checkpoint_file(obj, filename: str) -> None:
    """fairseq's atomic local save (``filename.tmp``, then a rename) through :func:`fileio.atomic_write`,
    flushed to disk; an ``OSError`` (a full disk) ends the run with one line naming the file
    (:class:`CheckpointNotWritten`) instead of fairseq's logged traceback and retries."""
    import torch

    from .checkpoint import CheckpointNotWritten
    from .fileio import atomic_write, write_error

    def write(tmp):
        with open(tmp, "wb") as f:
            writer = _RecordingWriter(f)
            try:
                torch.save(obj, writer)
            except RuntimeError:
                if writer.error is None:
                    raise
                raise writer.error from None  # the reason torch's "unexpected pos" hides

    try:
        atomic_write(filename, write, tmp=filename + ".tmp")  # fairseq's temporary name (TEMPORARY_PATTERNS)
    except OSError as e:
        raise CheckpointNotWritten(write_error(filename, e, "write checkpoint")) from None


def _is_first_rank(trainer) -> bool:
    from fairseq.distributed import utils as distributed_utils

    try:
        return distributed_utils.is_master(trainer.cfg.distributed_training)
    except AttributeError:
        return getattr(trainer, "data_parallel_rank", 0) == 0


def install_training_guard() -> None:
    """Wrap fairseq's ``load_checkpoint`` and ``torch_persistent_save`` as described above (idempotent)."""
    global _INSTALLED
    if _INSTALLED:
        return
    from fairseq import checkpoint_utils

    from .checkpoint import set_config_values

    inner_resume = checkpoint_utils.load_checkpoint

    def load_checkpoint(cfg, trainer, **passthrough_args):
        save_dir = cfg.save_dir
        default = cfg.restore_file == "checkpoint_last.pt"
        if _is_first_rank(trainer) and "://" not in save_dir:
            lock_folder(save_dir)
            remove_stale_temporaries(save_dir)
        if not default or "://" in save_dir:
            set_patience_state(None)  # as fairseq: no count carried in from another run of this process
            return inner_resume(cfg, trainer, **passthrough_args)
        suffix = trainer.checkpoint_suffix
        source, updates = resume_source(save_dir, suffix)
        optimization = getattr(getattr(trainer, "cfg", None), "optimization", None)
        max_update = int(getattr(optimization, "max_update", 0) or 0)
        if source is not None and 0 < max_update <= updates:
            logger.info(finished_message(save_dir, source, updates, max_update))
            raise SystemExit(0)
        patience = int(getattr(cfg, "patience", 0) or 0)
        first = _is_first_rank(trainer)
        state = read_state(source) if source is not None and (patience > 0 or first) else None  # read once
        counted = saved_patience(state) if patience > 0 else None
        fresh = bool(getattr(cfg, "reset_optimizer", False) or getattr(cfg, "reset_meters", False))
        if counted is not None and (fresh or (counted.get("metric"), counted.get("maximize")) != _metric(cfg)):
            # fairseq starts its best score afresh on these resets; a count of another metric or direction
            # would compare the new scores with the old best
            logger.info(f"early stopping starts a fresh count (the saved one was of {counted.get('metric')}, "
                        f"maximize={counted.get('maximize')}; resets: {fresh})")
            counted = None
        if counted is not None and counted["num_runs"] >= patience:
            logger.info(f"already finished: {os.path.basename(source)} stopped early at update {updates} "
                        f"(best {counted.get('metric', 'best_checkpoint_metric')} {counted['best']:g}, not improved "
                        f"for {counted['num_runs']} "
                        f"validations >= checkpoint.patience={patience}) in {save_dir}; nothing to train (raise "
                        f"checkpoint.patience to train on)")
            raise SystemExit(0)
        set_patience_state(counted)  # a resumed run goes on counting; a new one starts afresh
        if source is not None and first:
            warn_schedule_changes(source, state, getattr(trainer, "cfg", None))
        state = None  # the mapped file is not kept open during training
        last = os.path.join(save_dir, f"checkpoint_last{suffix}.pt")
        if source is None or os.path.exists(last):
            return inner_resume(cfg, trainer, **passthrough_args)  # a corrupt last: the inner patch's fallback
        logger.warning(f"{last} is missing but {source} is not: resuming from it, the newest intact checkpoint in "
                       f"{save_dir} (a run stopped before its first copy to checkpoint_last.pt)")
        saved = {"restore_file": cfg.restore_file, "finetune_from_model": cfg.finetune_from_model}
        set_config_values(cfg, restore_file=os.path.abspath(source), finetune_from_model=None)
        try:
            return inner_resume(cfg, trainer, **passthrough_args)
        finally:
            set_config_values(cfg, **saved)

    load_checkpoint.__wrapped__ = inner_resume
    checkpoint_utils.load_checkpoint = load_checkpoint

    inner_save = checkpoint_utils.torch_persistent_save

    def torch_persistent_save(obj, filename, async_write: bool = False):
        config = obj.get("cfg") if isinstance(obj, dict) else None
        counted = patience_state(config.get("checkpoint") if isinstance(config, dict)
                                 else getattr(config, "checkpoint", None))
        if counted is not None and isinstance(obj, dict) and isinstance(obj.get("extra_state"), dict):
            obj["extra_state"][PATIENCE_KEY] = counted  # the early-stopping count, for a resume
        if async_write or not isinstance(filename, str) or "://" in filename:
            return inner_save(obj, filename, async_write)  # remote or asynchronous: fairseq's own save
        save_checkpoint_file(obj, filename)

    torch_persistent_save.__wrapped__ = inner_save
    checkpoint_utils.torch_persistent_save = torch_persistent_save
    _INSTALLED = True
