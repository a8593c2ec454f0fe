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
import os
import pickle
import typing

import numpy as np
import torch

_REGISTERED = False


def safe_globals() -> list:
    """The classes a fairseq checkpoint may contain besides tensors and builtins."""
    from fairseq.data.dictionary import Dictionary
    from fairseq.logging import meters
    from omegaconf import DictConfig, ListConfig
    from omegaconf.base import ContainerMetadata, Metadata
    from omegaconf.nodes import AnyNode, BooleanNode, EnumNode, FloatNode, IntegerNode, StringNode

    classes = [
        Dictionary,
        meters.AverageMeter, meters.SumMeter, meters.TimeMeter, meters.StopwatchMeter,
        meters.MetersDict,
        argparse.Namespace,
        collections.OrderedDict, collections.defaultdict,
        DictConfig, ListConfig, ContainerMetadata, Metadata,
        AnyNode, BooleanNode, EnumNode, FloatNode, IntegerNode, StringNode,
        typing.Any, dict, list, int, float, str, bool,
        # numpy scalars appear in logged metrics
        np.core.multiarray.scalar if hasattr(np, "core") else np._core.multiarray.scalar,
        np.dtype,
    ]
    classes += [type(np.dtype(t)) for t in ("float64", "float32", "int64", "int32", "bool")]
    if hasattr(meters, "ConcatTensorMeter"):
        classes.append(meters.ConcatTensorMeter)
    return classes


def register_safe_globals() -> None:
    """Allow-list fairseq's checkpoint classes once per process (idempotent)."""
    global _REGISTERED
    if not _REGISTERED:
        torch.serialization.add_safe_globals(safe_globals())
        _REGISTERED = True


def load_checkpoint(path, map_location="cpu") -> dict:
    """``torch.load`` with ``weights_only=True`` and the allow-list; a clear error otherwise."""
    register_safe_globals()
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        raise ValueError(
            f"{path}: refused to load: the checkpoint holds objects outside the allow-list of "
            f"pahubert_plugin.checkpoint (weights_only=True). Only load checkpoints you trust, "
            f"and re-save them with fairseq if they come from an old version. Detail: {e}"
        ) from None
