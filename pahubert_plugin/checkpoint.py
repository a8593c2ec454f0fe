"""Safe checkpoint loading under torch's default ``weights_only=True``.

fairseq checkpoints pickle a few non-tensor objects (the task's Dictionary, logging
meters, argparse Namespaces in old checkpoints, omegaconf containers in some).  We
allow-list exactly those classes with ``torch.serialization.add_safe_globals`` so
fairseq's own ``checkpoint_utils`` (``load_checkpoint_to_cpu``,
``load_model_ensemble_and_task``, trainer resume) work unchanged.  ``weights_only`` is
never turned off: anything else in a pickle is refused.
"""
import argparse
import ast
import collections
import contextlib
import contextvars
import logging
import os
import pickle
import re
import shutil
import struct
import typing
import zipfile

import numpy as np
import torch
from typing import Optional

from .fileio import atomic_write, write_error

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


class CheckpointInvalid(ValueError):
    """A file that is not a checkpoint at all (text, audio, a TorchScript archive, random bytes, ...)."""


def invalid_message(path, reason: str) -> str:
    """The project's one message for a file given as a checkpoint that is none."""
    return f"{path} is not a pahubert/fairseq checkpoint: {reason}"


# the first bytes of torch's legacy (pre-zip) format: the pickled magic number 0x1950a86a20f9469cfc6c
_LEGACY_MAGIC = (0x1950A86A20F9469CFC6C).to_bytes(10, "little")
_FORMATS = ((b"RIFF", "a RIFF/WAVE audio file"), (b"fLaC", "a FLAC audio file"), (b"OggS", "an Ogg file"),
            (b"ID3", "an MP3 file"), (b"\x93NUMPY", "a numpy .npy array"), (b"\x89HDF", "an HDF5 file"),
            (b"\x1f\x8b", "a gzip file"), (b"{", "a JSON/text file"))


def _not_a_checkpoint(path: str) -> Optional[str]:
    """Why the file at ``path`` cannot be a ``torch.save`` file, from its first bytes (None: it may be one).

    ``torch.save`` writes a zip archive holding ``<name>/data.pkl`` (or, in the legacy format, a pickle
    starting with torch's magic number). Empty and cut-off files are left to :class:`CheckpointCorrupt`."""
    with open(path, "rb") as f:
        head = f.read(64)
    if not head or (head.startswith(b"PK\x03\x04") and not zipfile.is_zipfile(path)):
        return None  # empty, or a zip archive without its end (truncated): CheckpointCorrupt says so
    if zipfile.is_zipfile(path):
        try:
            with zipfile.ZipFile(path) as z:
                names = z.namelist()
        except (zipfile.BadZipFile, OSError) as e:
            return None if isinstance(e, OSError) else f"a damaged zip archive ({e})"
        if any(n.endswith("/constants.pkl") or "/code/" in n for n in names):
            return "a TorchScript archive (torch.jit.save), not a torch.save checkpoint"
        if not any(n.endswith("/data.pkl") or n == "data.pkl" for n in names):
            return f"a zip archive without the data.pkl that torch.save writes (holds {', '.join(names[:3]) or 'nothing'})"
        return None
    if head.startswith(b"\x80") and _LEGACY_MAGIC in head[:32]:  # any pickle protocol
        return None  # torch's legacy format (truncation shows when it loads)
    for magic, what in _FORMATS:
        if head.startswith(magic):
            return what
    try:
        head.decode("utf-8")
        return "a text file"
    except UnicodeDecodeError as e:
        if len(head) == 64 and e.start >= 60 and "\x00" not in head[:e.start].decode("utf-8"):
            return "a text file"  # a character cut by the 64 bytes read
        return (f"unknown data ({os.path.getsize(path)} bytes starting {head[:8].hex(' ')}), neither the zip "
                f"archive torch.save writes nor torch's legacy format")


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
    if isinstance(error, (EOFError, zipfile.BadZipFile, struct.error)):
        return True
    text = str(error)
    return isinstance(error, RuntimeError) and ("PytorchStreamReader" in text or "zip archive" in text
                                                or "central directory" in text or "unexpected EOF" in text
                                                or "might be corrupted" in text)


def _translate(path, error):
    """Our exception for a refused, corrupt or invalid checkpoint, or None for anything else."""
    if isinstance(error, CheckpointRefused | CheckpointCorrupt | CheckpointInvalid):
        return error
    if isinstance(error, pickle.UnpicklingError):
        return CheckpointRefused(refused_message(path, error))
    if _is_corruption(error):
        return CheckpointCorrupt(corrupt_message(path, error))
    return None


def load_checkpoint(path, map_location="cpu", mmap: bool = False) -> dict:
    """``torch.load`` with ``weights_only=True`` and the allow-list; a clear error otherwise.

    :class:`CheckpointRefused` (objects outside the allow-list), :class:`CheckpointCorrupt` (empty or
    truncated file) and :class:`CheckpointInvalid` (no ``torch.save`` file at all: text, audio, TorchScript,
    random bytes) are ValueErrors naming ``path``; fairseq's ``load_checkpoint_to_cpu`` (used by
    ``load_model_ensemble_and_task`` and trainer resume) raises the same once the plugin is imported.
    """
    register_safe_globals()
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    reason = _not_a_checkpoint(path)
    if reason:
        raise CheckpointInvalid(invalid_message(path, reason))
    try:
        return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except Exception as e:  # noqa: BLE001  (translated or re-raised as is)
        ours = _translate(path, e)
        if ours is None:
            raise
        raise ours from None


# ---- what a checkpoint's configuration may build --------------------------------------------
#
# A checkpoint of plain dicts and strings passes weights_only and the allow-list, yet building from it runs
# what its ``cfg`` names: ``cfg.model._name`` picks any registered fairseq model, and several of fairseq's
# (wav2vec2, hubert, fconv, ...) pass configuration strings to ``eval()``. So, before anything is built:
# the model and task must be ones the entry point accepts (:func:`expecting`), and no field that fairseq
# evaluates may hold more than a literal (:func:`check_eval_fields`, for every checkpoint).

#: configuration fields fairseq passes to ``eval()`` (models/wav2vec, models/hubert, fconv, optimizers,
#: criterions, data) or to ``utils.eval_str_list``/``eval_str_dict``/``eval_bool`` (which ``eval`` strings)
EVAL_FIELDS = frozenset({
    "conv_feature_layers", "conv_aggregator_layers", "override_encoder_layers", "feature_encoder_spec",
    "conv_enc_config", "conv_dec_config", "vggblock_enc_config", "transformer_enc_config",
    "transformer_dec_config", "transformer_context", "transformer_sampling", "wer_args", "model_overrides",
    "encoder_layers", "decoder_layers", "encoder_attention", "decoder_attention", "self_attention",
    "project_input", "gated_attention", "downsample", "pretrained", "character_filters",
    "adam_betas", "adamax_betas", "lamb_betas", "adafactor_eps", "adaptive_input_cutoff",
    "adaptive_softmax_cutoff", "decoder_zero_init", "left_pad_source", "left_pad_target",
    "pipeline_balance", "pipeline_devices",
})
_MAX_LITERAL_ITEMS = 100_000


def parse_literal(text: str):
    """The value of ``text`` if it is a Python literal, or a sum/product of list or tuple literals and
    integers (fairseq's own defaults, e.g. ``"[(512,10,5)] + [(512,3,2)] * 4"``); ValueError otherwise.

    ``ast.literal_eval`` plus ``+``/``*`` on sequences and numbers: no names, calls or attributes, so
    nothing runs; repetitions are capped at 100,000 items."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        pass
    try:
        tree = ast.parse(text.strip(), mode="eval")
    except (SyntaxError, ValueError) as e:
        raise ValueError(f"not a literal ({type(e).__name__})") from None

    def value(node):
        if isinstance(node, ast.BinOp) and isinstance(node.op, (ast.Add, ast.Mult)):
            left, right = value(node.left), value(node.right)
            if isinstance(node.op, ast.Mult):
                seq, times = (left, right) if isinstance(left, (list, tuple)) else (right, left)
                if isinstance(seq, (list, tuple)) and (not isinstance(times, int) or isinstance(times, bool)
                                                       or len(seq) * max(times, 0) > _MAX_LITERAL_ITEMS):
                    raise ValueError("a sequence repeated by a non-integer or too often")
            try:
                return left + right if isinstance(node.op, ast.Add) else left * right
            except TypeError as e:
                raise ValueError(str(e)) from None
        if isinstance(node, (ast.List, ast.Tuple)):
            items = [value(e) for e in node.elts]
            return items if isinstance(node, ast.List) else tuple(items)
        try:
            return ast.literal_eval(node)
        except ValueError:
            raise ValueError(f"{type(node).__name__} is not a literal") from None

    return value(tree.body)


def _plain_config(cfg):
    """A checkpoint's ``cfg`` (dict, omegaconf container, None) or ``args`` (Namespace) as plain dicts/lists."""
    from omegaconf import OmegaConf

    if isinstance(cfg, argparse.Namespace):
        return {k: _plain_config(v) for k, v in vars(cfg).items()}
    if OmegaConf.is_config(cfg):
        return OmegaConf.to_container(cfg, resolve=False)
    if isinstance(cfg, dict):
        return {k: _plain_config(v) for k, v in cfg.items()}
    if isinstance(cfg, (list, tuple)):
        return [_plain_config(v) for v in cfg]
    return cfg


def check_eval_fields(path, config, where: str = "cfg") -> None:
    """CheckpointRefused naming ``path`` and the field if a field of ``config`` that fairseq passes to
    ``eval()`` (:data:`EVAL_FIELDS`) is a string that is not a literal (:func:`parse_literal`)."""
    config = _plain_config(config)
    items = config.items() if isinstance(config, dict) else enumerate(config) if isinstance(config, list) else ()
    for key, value in items:
        field_name = f"{where}.{key}" if isinstance(config, dict) else f"{where}[{key}]"
        if isinstance(value, str) and key in EVAL_FIELDS:
            try:
                parse_literal(value)
            except ValueError as e:
                shown = value if len(value) <= 80 else value[:77] + "..."
                raise CheckpointRefused(
                    f"{path}: refused to build from this checkpoint: {field_name} = {shown!r} is not a literal "
                    f"({e}); fairseq passes {key} to eval(), so the file could run code") from None
        elif isinstance(value, (dict, list)):
            check_eval_fields(path, value, field_name)


SEPARATION, PRETRAINING = "separation", "pretraining"
#: what each kind of entry point builds from a checkpoint: (description, task names)
KINDS = {
    SEPARATION: ("a fine-tuned separation model (pahubert-separate, pahubert-evaluate)", ("music_separation",)),
    PRETRAINING: ("a pahubert pretraining model (pahubert-dump-features --feature hubert, pahubert-label-quality, "
                  "model.pretrained_checkpoint)", ("pahubert_pretraining",)),
}


_MODEL_KINDS = None  # kind -> registry names, installed by registry.register(): nothing here imports upward


def set_model_kinds(names_of) -> None:
    """Install ``names_of(kind) -> [registry names]`` (:func:`pahubert_plugin.registry.register` does)."""
    global _MODEL_KINDS
    _MODEL_KINDS = names_of


def accepted_models(kind: str) -> list:
    """Registry names of the models an entry point of ``kind`` builds: this plugin's masked-prediction
    pretraining models (:class:`~pahubert_plugin.models.hubert_encoder.HubertPretrainingModel`) for
    ``pretraining``, its other models for ``separation``. Needs :func:`pahubert_plugin.register` first."""
    if _MODEL_KINDS is None:
        raise RuntimeError("pahubert_plugin.register() has not run: no registered models to check checkpoints "
                           "against")
    return _MODEL_KINDS(kind)


def _config_of(state: dict):
    """``(model name, task name, plain config, 'cfg'|'args')`` of a fairseq checkpoint state."""
    if state.get("cfg") is not None:
        cfg = _plain_config(state["cfg"])
        if not isinstance(cfg, dict):
            return None, None, None, "cfg"
        model, task = cfg.get("model") or {}, cfg.get("task") or {}
        return ((model.get("_name") if isinstance(model, dict) else None),
                (task.get("_name") if isinstance(task, dict) else None), cfg, "cfg")
    args = _plain_config(state.get("args"))
    return args.get("arch") or args.get("_name"), args.get("task"), args, "args"


def check_components(path, state: dict, kind: str, model_names=None, task_optional: bool = False) -> None:
    """CheckpointRefused naming ``path`` and the field unless the checkpoint's model (``cfg.model._name``,
    or ``args.arch``) is one of ``model_names`` (default: :func:`accepted_models` of ``kind``) and its task
    one of ``kind``'s (or absent, with ``task_optional``: callers that build no task)."""
    what, tasks = KINDS[kind]
    model_names = list(model_names or accepted_models(kind))
    model, task, _, where = _config_of(state)
    model_field, task_field = ("cfg.model._name", "cfg.task._name") if where == "cfg" else ("args.arch", "args.task")
    if model not in model_names:
        raise CheckpointRefused(
            f"{path}: refused to build from this checkpoint: {model_field} is {model!r}, not one of the models "
            f"this loads as {what}: {', '.join(model_names)}")
    if task not in tasks and not (task_optional and task is None):
        raise CheckpointRefused(
            f"{path}: refused to build from this checkpoint: {task_field} is {task!r}, not "
            f"{' or '.join(tasks)} ({what})")


def check_structure(path, state) -> None:
    """CheckpointInvalid naming ``path`` unless ``state`` is a fairseq checkpoint's dict: ``model`` tensors
    and a ``cfg`` (or, from old fairseq, ``args``)."""
    if not isinstance(state, dict):
        raise CheckpointInvalid(invalid_message(path, f"a torch file holding a {type(state).__name__}, not the "
                                                      f"dict of a fairseq checkpoint"))
    missing = [k for k in ("model",) if not isinstance(state.get(k), dict)]
    if state.get("cfg") is None and not isinstance(state.get("args"), argparse.Namespace):
        missing.append("cfg")
    if missing:
        raise CheckpointInvalid(invalid_message(
            path, f"no {' or '.join(repr(k) for k in missing)} entry (has {', '.join(map(repr, list(state)[:6]))})"))
    cfg = state.get("cfg")
    if cfg is not None and not isinstance(_plain_config(cfg), dict):
        raise CheckpointInvalid(invalid_message(path, f"its 'cfg' entry is a {type(cfg).__name__}, not a config"))


def check_checkpoint(path, state, kind: Optional[str] = None, **components) -> None:
    """All content checks of a fairseq checkpoint read for building: :func:`check_structure`, given ``kind``
    :func:`check_components`, and :func:`check_eval_fields`."""
    check_structure(path, state)
    if kind is not None:
        check_components(path, state, kind, **components)
    _, _, config, where = _config_of(state)
    check_eval_fields(path, config, where)


_EXPECT: contextvars.ContextVar = contextvars.ContextVar("pahubert_expected_checkpoint", default=None)
_LOADING: contextvars.ContextVar = contextvars.ContextVar("pahubert_loading_checkpoint", default=None)


@contextlib.contextmanager
def expecting(kind: Optional[str]):
    """Inside, every checkpoint fairseq's ``load_checkpoint_to_cpu`` reads (``load_model_ensemble_and_task``
    included) must be of ``kind`` (:func:`check_components`), checked before anything is built from it;
    ``None``: no model/task check (the other checks always run)."""
    if kind is not None and kind not in KINDS:
        raise ValueError(f"unknown checkpoint kind {kind!r} (one of {', '.join(KINDS)})")
    token = _EXPECT.set(kind)
    try:
        yield
    finally:
        _EXPECT.reset(token)


def load_encoder_weights(model, state: dict, path: str = "") -> int:
    """Copy a pretraining checkpoint's ``encoder.*`` tensors into ``model.encoder`` (all must fit).

    A ``port_hubert`` output lists the tensors the port created rather than copied (``port.new``: e.g. a
    Demucs encoder around a speech transformer); those keep ``model``'s own initialisation, drawn from this
    run's seed, so seeds of a ported arm differ in them as the scratch arm's do.
    Logs what was loaded and which top-level modules of ``model`` stay newly initialised;
    a ValueError naming ``path`` if the tensors do not fit. Returns the number of tensors copied.
    """
    import logging

    fresh = {k[len("encoder."):] for k in ((state.get("port") or {}).get("new") or ())}
    weights = {k[len("encoder."):]: v for k, v in state["model"].items()
               if k.startswith("encoder.") and k[len("encoder."):] not in fresh}
    result = model.encoder.load_state_dict(weights, strict=False)
    missing = [k for k in result.missing_keys if k not in fresh]
    if missing or result.unexpected_keys:
        raise ValueError(f"{path}: encoder weights do not fit the architecture in its own config: "
                         f"missing {missing[:5]}, unexpected {result.unexpected_keys[:5]}")
    new = {k: p.numel() for k, p in model.named_parameters() if not k.startswith("encoder.")}
    kept = f"; {len(fresh)} tensors the port created keep this run's random init" if fresh else ""
    logging.getLogger(type(model).__module__).info(
        f"loaded {len(weights)} encoder tensors from {path} "
        f"({sum(p.numel() for p in model.encoder.parameters())} parameters){kept}; new (random init): "
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
#    refused, corrupt and invalid files raise :class:`CheckpointRefused` / :class:`CheckpointCorrupt` /
#    :class:`CheckpointInvalid` naming the file, never torch's advice to turn the check off; what it reads is
#    checked (:func:`check_checkpoint`: structure, eval()'d fields, and the model and task of
#    :func:`expecting`) before fairseq upgrades it or anything is built from it.
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
def mapped_loads(kind: Optional[str] = SEPARATION):
    """Inside, fairseq's checkpoint loads map the file (``torch.load(mmap=True)``) instead of reading it whole:
    tensors nobody reads never become resident. For inference: a fine-tuned checkpoint also holds the
    optimizer state (two more copies of the weights under Adam, 1.1 GB for ``pahubert_resunet`` base) that
    ``load_model_ensemble_and_task`` would otherwise read into memory next to the model.

    The checkpoints read inside are of ``kind`` (:func:`expecting`; default: a fine-tuned separation model,
    what inference loads), checked before anything is built from them."""
    global _MAPPED
    _MAPPED += 1
    try:
        with expecting(kind):
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
            state = torch.load(name, *args, mmap=True, **kwargs)
        else:
            state = torch.load(f, *args, **kwargs)
        loading = _LOADING.get()
        if loading is not None:  # load_checkpoint_to_cpu's read: checked before fairseq upgrades or builds it
            check_checkpoint(loading, state, _EXPECT.get())
        return state


_CHECKPOINT_NAME = re.compile(r"^checkpoint(_\d+_\d+|\d+|_best|_last)\.pt$")


class CheckpointNotWritten(SystemExit):
    """A checkpoint could not be written or copied (a full disk): one line naming the file, exit status 1."""


def atomic_copy(src: str, dst: str) -> bool:
    """Copy ``src`` to ``dst`` through :func:`fileio.atomic_write` (never a partial ``dst``); the temporary
    ``DST.PID.tmp`` is what a resumed run removes if a kill left it (``training.TEMPORARY_PATTERNS``)."""
    def copy(tmp):
        with open(src, "rb") as inp, open(tmp, "wb") as out:
            shutil.copyfileobj(inp, out, 16 * 1024 * 1024)

    atomic_write(dst, copy, tmp=f"{dst}.{os.getpid()}.tmp")
    return True


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
        try:
            return atomic_copy(src_path, dst_path)
        except OSError as e:  # a full disk: one line naming the file, not a traceback
            raise CheckpointNotWritten(write_error(dst_path, e, f"copy {os.path.basename(src_path)} to")) from None

    copy.__doc__ = "fairseq's PathManager.copy, atomic for local files (pahubert_plugin.checkpoint)."
    PathManager.copy = staticmethod(copy)

    original_to_cpu = checkpoint_utils.load_checkpoint_to_cpu

    def load_checkpoint_to_cpu(path, arg_overrides=None, load_on_all_ranks=False):
        register_safe_globals()
        local = isinstance(path, (str, os.PathLike)) and "://" not in os.fspath(path) and os.path.isfile(path)
        reason = _not_a_checkpoint(os.fspath(path)) if local else None
        if reason:
            raise CheckpointInvalid(invalid_message(path, reason))
        token = _LOADING.set(os.fspath(path))
        try:
            return original_to_cpu(path, arg_overrides, load_on_all_ranks)
        except Exception as e:  # noqa: BLE001  (translated or re-raised as is)
            ours = _translate(path, e)
            if ours is None and isinstance(e, (KeyError, IndexError, TypeError, AttributeError)):
                ours = CheckpointInvalid(invalid_message(path, f"fairseq cannot read it ({type(e).__name__}: {e})"))
            if ours is None:
                raise
            raise ours from None
        finally:
            _LOADING.reset(token)

    load_checkpoint_to_cpu.__wrapped__ = original_to_cpu
    checkpoint_utils.load_checkpoint_to_cpu = load_checkpoint_to_cpu
    checkpoint_utils.torch = distributed_utils.torch = _WeightsOnlyTorch()

    original_resume = checkpoint_utils.load_checkpoint

    def load_checkpoint_resume(cfg, trainer, **passthrough_args):
        last = os.path.join(cfg.save_dir, f"checkpoint_last{trainer.checkpoint_suffix}.pt")
        problem = _corruption(last) if cfg.restore_file == "checkpoint_last.pt" and os.path.isfile(last) else None
        if problem is None:
            with expecting(None):  # a resume builds the run's own model and task, not the checkpoint's
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
            with expecting(None):
                return original_resume(cfg, trainer, **passthrough_args)
        finally:
            set_config_values(cfg, **saved)

    load_checkpoint_resume.__wrapped__ = original_resume
    checkpoint_utils.load_checkpoint = load_checkpoint_resume
    _PATCHED = True
