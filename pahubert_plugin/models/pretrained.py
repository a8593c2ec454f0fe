"""The one way a model takes a pretrained encoder (fairseq ``hubert_asr``'s ``w2v_path`` pattern).

Every model that can start from a pretraining checkpoint has the three fields of
:class:`PretrainedEncoderConfig` and calls :func:`resolve_pretrained` in ``build_model``:

* ``pretrained_checkpoint``: the file.  Its saved config decides the encoder's **architecture**
  (always, also for the scratch arm); its ``encoder.*`` tensors are the initial weights unless
  ``no_pretrained_weights=true`` (same network, random init).
* ``encoder_cfg``: filled from the checkpoint at build time and saved with the trained model (the
  task writes ``model.config_updates`` into the config fairseq saves), so a fine-tuned checkpoint
  rebuilds without the pretraining file.  Leave it unset.

What "architecture" means is the model's: ``pahubert_resunet`` takes the whole Pac-HuBERT encoder
config, ``demucs_v2_hubert`` its Demucs geometry and transformer shape (``ARCH_FIELDS``).
"""
import logging
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence, Tuple

from fairseq.dataclass import FairseqDataclass

from ..checkpoint import (PRETRAINING, check_components, check_eval_fields, load_checkpoint, load_encoder_weights,
                          set_config_values)

logger = logging.getLogger(__name__)


@dataclass
class PretrainedEncoderConfig(FairseqDataclass):
    pretrained_checkpoint: str = field(default="", metadata={
        "help": "pretraining checkpoint (or port_hubert output): the encoder's architecture (always) and its "
                "initial weights (unless no_pretrained_weights)"})
    no_pretrained_weights: bool = field(default=False, metadata={
        "help": "build the checkpoint's architecture but keep it randomly initialised (the scratch arm)"})
    encoder_cfg: Optional[Any] = field(default=None, metadata={
        "help": "the encoder's architecture, filled from pretrained_checkpoint and saved with the trained "
                "model (leave unset)"})


def read_pretraining_checkpoint(path: str, model_names: Sequence[str], user: str) -> dict:
    """The checkpoint at ``path``, checked: a fairseq checkpoint of one of ``model_names`` (and, if it names
    one, of the ``pahubert_pretraining`` task) with ``encoder.*`` tensors and no field that fairseq would
    ``eval()`` holding more than a literal. Errors name the file and say what ``user`` (a model name) needs;
    junk (text, audio, TorchScript, ...) is a ValueError "PATH is not a pahubert/fairseq checkpoint: why"."""
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"model.pretrained_checkpoint={path} not found (a fine-tuned model rebuilds without it from its "
            f"saved model.encoder_cfg)")
    state = load_checkpoint(path)
    if not isinstance(state, dict) or "model" not in state or state.get("cfg") is None:
        raise ValueError(f"{path}: not a fairseq checkpoint (no 'cfg' and 'model' entries)")
    name = (state["cfg"].get("model") or {}).get("_name")
    if name not in model_names:
        raise ValueError(f"{path}: expected a '{model_names[0]}' pretraining checkpoint, found model '{name}' "
                         f"(cfg.model._name); {user} starts from {' or '.join(model_names)} encoders (pretraining "
                         f"or port_hubert output)")
    check_components(path, state, PRETRAINING, model_names=model_names, task_optional=True)
    check_eval_fields(path, state["cfg"])
    if not any(k.startswith("encoder.") for k in state["model"]):
        raise ValueError(f"{path}: no encoder.* weights in the checkpoint")
    return state


def resolve_pretrained(cfg, model_names: Sequence[str], user: str,
                       encoder_cfg_of: Callable[[dict, str], Any]) -> Tuple[Any, Optional[dict]]:
    """``(encoder_cfg, state)`` for a model config with :class:`PretrainedEncoderConfig`'s fields.

    A saved ``cfg.encoder_cfg`` wins (rebuilding a trained model; ``state`` None). Otherwise
    ``cfg.pretrained_checkpoint`` is read and ``encoder_cfg_of(state, path)`` gives the architecture;
    ``state`` is None with ``no_pretrained_weights`` (nothing to copy), the checkpoint otherwise.
    Without either, ``(None, None)``: the model builds from its own config, if it can.
    """
    if cfg.encoder_cfg is not None:
        return cfg.encoder_cfg, None
    if not cfg.pretrained_checkpoint:
        return None, None
    state = read_pretraining_checkpoint(cfg.pretrained_checkpoint, model_names, user)
    encoder_cfg = encoder_cfg_of(state, cfg.pretrained_checkpoint)
    if cfg.no_pretrained_weights:
        logger.info(f"no_pretrained_weights: encoder architecture from {cfg.pretrained_checkpoint}, "
                    f"weights randomly initialised")
        return encoder_cfg, None
    return encoder_cfg, state


def load_pretrained_weights(model, state: Optional[dict], path: str) -> None:
    """Copy ``state``'s ``encoder.*`` tensors into ``model.encoder`` (strict); nothing if ``state`` is None."""
    if state is not None:
        load_encoder_weights(model, state, path)


def remember(model, **updates) -> None:
    """Values the task writes into the saved ``cfg.model`` after ``build_model`` (``config_updates``)."""
    model.config_updates = {**getattr(model, "config_updates", {}), **updates}


def persist_config_updates(model, cfg) -> None:
    """Write ``model.config_updates`` into ``cfg`` (the ``cfg.model`` fairseq saves with checkpoints).

    Called by the tasks' ``build_model``: fairseq hands the model a merged copy of ``cfg.model``, so
    a model cannot reach the saved config itself."""
    updates = getattr(model, "config_updates", None) or {}
    if updates and cfg is not None:
        set_config_values(cfg, **updates)
