"""Safe checkpoint loading under torch's default ``weights_only=True``.

fairseq checkpoints pickle a few non-tensor objects (the task's Dictionary, logging
meters, argparse Namespaces in old checkpoints, omegaconf containers in some).  We
allow-list exactly those classes with ``torch.serialization.add_safe_globals`` so
fairseq's own ``checkpoint_utils`` (``load_checkpoint_to_cpu``,
``load_model_ensemble_and_task``, trainer resume) work unchanged.  ``weights_only`` is
never turned off: anything else in a pickle is refused.
"""
import argparse
import collections
import contextlib
import logging
import os
import pickle
import re
import shutil
import tempfile
import typing
import zipfile

import numpy as np
import torch
from typing import Optional

_REGISTERED = False


def safe_globals() -> list:
    """The non-tensor classes fairseq checkpoints contain.

    Current fairseq saves ``cfg`` as a plain dict and the task's Dictionary objects in
    ``task_state``; checkpoints from older fairseq (e.g. the released speech HuBERT
    models) hold an ``argparse.Namespace`` or omegaconf containers instead; logged
    metrics can be numpy scalars.  Nothing here runs code when unpickled.
    """
    from fairseq.data.dictionary import Dictionary
    from omegaconf import DictConfig, ListConfig
    from omegaconf.base import ContainerMetadata, Metadata
    from omegaconf.nodes import AnyNode, BooleanNode, FloatNode, IntegerNode, StringNode

    numpy_core = getattr(np, "_core", None) or np.core
    return [
        Dictionary,
        argparse.Namespace,
        DictConfig, ListConfig, ContainerMetadata, Metadata,
        AnyNode, BooleanNode, FloatNode, IntegerNode, StringNode,
        typing.Any, collections.defaultdict,
        numpy_core.multiarray.scalar, np.dtype,
        *(type(np.dtype(t)) for t in ("float64", "float32", "int64", "int32", "bool")),
    ]


def register_safe_globals() -> None:
    """Allow-list fairseq's checkpoint classes once per process (idempotent)."""
    global _REGISTERED
    if not _REGISTERED:
        torch.serialization.add_safe_globals(safe_globals())
        _REGISTERED = True


class CheckpointRefused(ValueError, pickle.UnpicklingError):
    """A checkpoint holding objects outside the allow-list (a ValueError and an UnpicklingError)."""


class CheckpointCorrupt(ValueError):
    """A checkpoint file that is empty or truncated (e.g. a kill during a plain copy)."""


def _refusal_detail(error) -> str:
    """What torch's weights_only unpickler refused, without its advice to turn the check off."""
    keep = []
    for line in str(error).splitlines():
        line = line.strip()
        if not line or "weights_only" in line or "documentation" in line.lower():
            continue
        for advice in ("Please use", "Please file an issue", "Alternatively", "Check the"):
            if advice in line:
                line = line[:line.index(advice)].strip()
        if line:
            keep.append(line)
    return " ".join(keep).rstrip(".") or type(error).__name__


def refused_message(path, error) -> str:
    """The project's one message for a checkpoint that the allow-list refuses."""
    return (f"{path}: refused to load: the checkpoint holds objects outside the allow-list of "
            f"pahubert_plugin.checkpoint (torch.load with weights_only=True): {_refusal_detail(error)}. "
            f"It may run code when unpickled; only use checkpoints you trust, saved by fairseq with "
            f"this plugin (re-save old ones with fairseq after checking where they come from)")


def corrupt_message(path, error) -> str:
    size = os.path.getsize(path) if os.path.isfile(path) else 0
    detail = str(error).split(". ")[0] or "unexpected end of file"
    return (f"{path}: not a readable checkpoint ({size} bytes: {type(error).__name__}: {detail}); "
            f"the file is empty or truncated, e.g. by a kill during a save")


def _is_corruption(error) -> bool:
    if isinstance(error, (EOFError, zipfile.BadZipFile)):
        return True
    text = str(error)
    return isinstance(error, RuntimeError) and ("PytorchStreamReader" in text or "zip archive" in text
                                                or "central directory" in text)


def _translate(path, error):
    """Our exception for a refused or corrupt checkpoint, or None for anything else."""
    if isinstance(error, CheckpointRefused | CheckpointCorrupt):
        return error
    if isinstance(error, pickle.UnpicklingError):
        return CheckpointRefused(refused_message(path, error))
    if _is_corruption(error):
        return CheckpointCorrupt(corrupt_message(path, error))
    return None


def load_checkpoint(path, map_location="cpu", mmap: bool = False) -> dict:
    """``torch.load`` with ``weights_only=True`` and the allow-list; a clear error otherwise.

    :class:`CheckpointRefused` (objects outside the allow-list) and :class:`CheckpointCorrupt` (empty or
    truncated file) are ValueErrors naming ``path``; fairseq's ``load_checkpoint_to_cpu`` (used by
    ``load_model_ensemble_and_task`` and trainer resume) raises the same once the plugin is imported.
    """
    register_safe_globals()
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except Exception as e:  # noqa: BLE001  (translated or re-raised as is)
        ours = _translate(path, e)
        if ours is None:
            raise
        raise ours from None


def load_encoder_weights(model, state: dict, path: str = "") -> int:
    """Copy a pretraining checkpoint's ``encoder.*`` tensors into ``model.encoder`` (all must fit).

    Logs what was loaded and which top-level modules of ``model`` stay newly initialised;
    a ValueError naming ``path`` if the tensors do not fit. Returns the number of tensors copied.
    """
    import logging

    weights = {k[len("encoder."):]: v for k, v in state["model"].items() if k.startswith("encoder.")}
    result = model.encoder.load_state_dict(weights, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise ValueError(f"{path}: encoder weights do not fit the architecture in its own config: "
                         f"missing {result.missing_keys[:5]}, unexpected {result.unexpected_keys[:5]}")
    new = {k: p.numel() for k, p in model.named_parameters() if not k.startswith("encoder.")}
    logging.getLogger(type(model).__module__).info(
        f"loaded {len(weights)} encoder tensors from {path} "
        f"({sum(p.numel() for p in model.encoder.parameters())} parameters); new (random init): "
        f"{', '.join(sorted({k.split('.')[0] for k in new})) or 'nothing'} ({sum(new.values())} parameters)")
    return len(weights)


# ---- fairseq patches (installed once by ``import pahubert_plugin``) ----------------------------
#
# 1. ``fairseq.file_io.PathManager.copy``: fairseq's ``save_checkpoint`` writes the first checkpoint
#    atomically (``.tmp`` + rename) but *copies* it to checkpoint_last.pt / checkpoint_best.pt with a
#    plain ``shutil.copyfile``: a kill inside that copy left a 0-byte checkpoint_last.pt. Local copies
#    now go to a temporary file in the destination folder, are fsynced and ``os.replace``d over the
#    destination, so it is always either the old or the new complete file.
# 2. ``fairseq.checkpoint_utils.load_checkpoint_to_cpu`` (model loading everywhere, trainer resume):
#    refused and corrupt files raise :class:`CheckpointRefused` / :class:`CheckpointCorrupt` naming
#    the file, never torch's advice to turn the check off.
# 3. ``fairseq.checkpoint_utils.load_checkpoint`` (resume): a corrupt checkpoint_last.pt is treated
#    as missing: a warning names it and training resumes from the newest intact checkpoint of the
#    folder (most updates), or stops with a message naming the file and the fix.
# 4. ``torch`` as ``fairseq.checkpoint_utils`` and ``fairseq.distributed.utils`` see it
#    (:class:`_WeightsOnlyTorch`): their ``torch.load`` calls (``load_checkpoint_to_cpu``,
#    ``load_pretrained_component_from_model``, and ``broadcast_object``, by which every rank but 0 unpickles
#    the checkpoint state rank 0 read) pass no ``weights_only``, where torch lets an environment
#    switch lift the restriction; they now pass ``weights_only=True``, which no switch overrides.

_PATCHED = False
_MAPPED = 0  # > 0 inside mapped_loads()


@contextlib.contextmanager
def mapped_loads():
    """Inside, fairseq's checkpoint loads map the file (``torch.load(mmap=True)``) instead of reading it whole:
    tensors nobody reads never become resident. For inference: a fine-tuned checkpoint also holds the
    optimizer state (two more copies of the weights under Adam, 1.1 GB for ``pahubert_resunet`` base) that
    ``load_model_ensemble_and_task`` would otherwise read into memory next to the model."""
    global _MAPPED
    _MAPPED += 1
    try:
        yield
    finally:
        _MAPPED -= 1


class _WeightsOnlyTorch:
    """``torch`` for ``fairseq.checkpoint_utils``: the same module, but ``load`` always restricted (and, inside
    :func:`mapped_loads`, mapping local zip checkpoints)."""

    def __getattr__(self, name):
        return getattr(torch, name)

    @staticmethod
    def load(f, *args, **kwargs):
        kwargs["weights_only"] = True  # explicit: no environment variable can turn it off
        name = getattr(f, "name", None)
        if _MAPPED and isinstance(name, str) and os.path.isfile(name) and zipfile.is_zipfile(name):
            return torch.load(name, *args, mmap=True, **kwargs)
        return torch.load(f, *args, **kwargs)


_CHECKPOINT_NAME = re.compile(r"^checkpoint(_\d+_\d+|\d+|_best|_last)\.pt$")


def atomic_copy(src: str, dst: str) -> bool:
    """Copy ``src`` to ``dst`` through a temporary file and ``os.replace`` (never a partial ``dst``)."""
    folder = os.path.dirname(os.path.abspath(dst))
    fd, tmp = tempfile.mkstemp(prefix=os.path.basename(dst) + ".", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as out, open(src, "rb") as inp:
            shutil.copyfileobj(inp, out, 16 * 1024 * 1024)
            out.flush()
            os.fsync(out.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, dst)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return True


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def checkpoint_updates(path: str) -> Optional[int]:
    """Number of updates of an intact checkpoint, or None if it is empty, truncated or refused."""
    try:
        state = load_checkpoint(path, mmap=zipfile.is_zipfile(path))
    except (ValueError, OSError, RuntimeError):
        return None
    history = state.get("optimizer_history") or [{}]
    return int(history[-1].get("num_updates", 0))


def resume_fallback(last: str) -> Optional[str]:
    """For a corrupt ``last`` (checkpoint_last.pt): the newest intact checkpoint beside it, or None.

    Candidates are fairseq's ``checkpoint_N_M.pt``, ``checkpointN.pt`` and ``checkpoint_best.pt``;
    the one with the most updates wins (ties: the later modification time).
    """
    folder = os.path.dirname(os.path.abspath(last))
    best = None
    for name in os.listdir(folder):
        path = os.path.join(folder, name)
        if not _CHECKPOINT_NAME.match(name) or os.path.abspath(path) == os.path.abspath(last):
            continue
        updates = checkpoint_updates(path)
        if updates is not None:
            key = (updates, os.path.getmtime(path))
            if best is None or key > best[0]:
                best = (key, path)
    return best[1] if best else None


def _corruption(path: str) -> Optional[str]:
    """None if ``path`` loads; the corrupt-file message if it does not; refused files raise."""
    try:
        load_checkpoint(path, mmap=zipfile.is_zipfile(path))
    except CheckpointRefused:
        raise
    except (ValueError, OSError, RuntimeError) as e:
        return str(e)
    return None


def set_config_values(cfg, **values) -> None:
    """Set fields of an omegaconf config (struct or not) or of a dataclass instance."""
    from omegaconf import OmegaConf, open_dict

    if OmegaConf.is_config(cfg):
        with open_dict(cfg):
            for k, v in values.items():
                cfg[k] = v
    else:
        for k, v in values.items():
            setattr(cfg, k, v)


def install_fairseq_patches() -> None:
    """Install the four patches above once per process (idempotent)."""
    global _PATCHED
    if _PATCHED:
        return
    from fairseq import checkpoint_utils
    from fairseq.distributed import utils as distributed_utils
    from fairseq.file_io import PathManager

    original_copy = PathManager.copy

    def copy(src_path: str, dst_path: str, overwrite: bool = False) -> bool:
        if "://" in src_path or "://" in dst_path:  # remote (iopath) paths: fairseq's own copy
            return original_copy(src_path, dst_path, overwrite)
        if not overwrite and os.path.exists(dst_path):
            return False
        return atomic_copy(src_path, dst_path)

    copy.__doc__ = "fairseq's PathManager.copy, atomic for local files (pahubert_plugin.checkpoint)."
    PathManager.copy = staticmethod(copy)

    original_to_cpu = checkpoint_utils.load_checkpoint_to_cpu

    def load_checkpoint_to_cpu(path, arg_overrides=None, load_on_all_ranks=False):
        register_safe_globals()
        try:
            return original_to_cpu(path, arg_overrides, load_on_all_ranks)
        except Exception as e:  # noqa: BLE001  (translated or re-raised as is)
            ours = _translate(path, e)
            if ours is None:
                raise
            raise ours from None

    load_checkpoint_to_cpu.__wrapped__ = original_to_cpu
    checkpoint_utils.load_checkpoint_to_cpu = load_checkpoint_to_cpu
    checkpoint_utils.torch = distributed_utils.torch = _WeightsOnlyTorch()

    original_resume = checkpoint_utils.load_checkpoint

    def load_checkpoint_resume(cfg, trainer, **passthrough_args):
        last = os.path.join(cfg.save_dir, f"checkpoint_last{trainer.checkpoint_suffix}.pt")
        problem = _corruption(last) if cfg.restore_file == "checkpoint_last.pt" and os.path.isfile(last) else None
        if problem is None:
            return original_resume(cfg, trainer, **passthrough_args)
        fallback = resume_fallback(last)
        if fallback is None:
            raise CheckpointCorrupt(
                f"{problem}. No intact checkpoint to resume from in {cfg.save_dir}: move {last} away (or "
                f"delete it) to start training from scratch, or resume from a copy with "
                f"checkpoint.restore_file=PATH")
        logging.getLogger("pahubert_plugin.checkpoint").warning(
            f"{problem}; treating it as missing and resuming from {fallback}, the newest intact checkpoint "
            f"in {cfg.save_dir} (the next save replaces {last})")
        # a resume of this run: fairseq ignores finetune_from_model when checkpoint_last.pt exists
        saved = {"restore_file": cfg.restore_file, "finetune_from_model": cfg.finetune_from_model}
        set_config_values(cfg, restore_file=os.path.abspath(fallback), finetune_from_model=None)
        try:
            return original_resume(cfg, trainer, **passthrough_args)
        finally:
            set_config_values(cfg, **saved)

    load_checkpoint_resume.__wrapped__ = original_resume
    checkpoint_utils.load_checkpoint = load_checkpoint_resume
    _PATCHED = True
