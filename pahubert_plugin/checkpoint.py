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


def persist_model_cfg(cfg, key: str, value) -> None:
    """Set ``cfg.key`` on a model config so that the value reaches saved checkpoints.

    fairseq builds models from a merged copy of ``cfg.model`` whose ``_parent`` is the root
    config; the trainer saves the root, so the value is also set on the root's ``model``.
    Models use this to keep what they loaded at build time (e.g. a pretrained encoder's
    architecture), so their fine-tuned checkpoints load without the pretraining file.
    """
    from omegaconf import OmegaConf, open_dict

    with open_dict(cfg):
        cfg[key] = value
    parent = cfg._get_parent() if OmegaConf.is_config(cfg) else None
    if parent is not None and "model" in parent and parent.model is not cfg and parent.model is not None:
        if parent.model.get("_name") == cfg.get("_name"):
            with open_dict(parent.model):
                parent.model[key] = value


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
