"""Port a speech (or music) HuBERT checkpoint into a music model's encoder.

``pahubert-port-hubert SOURCE OUT_CKPT --target demucs_hubert|pahubert [--config PRETRAIN_YAML]``

SOURCE is either

* a fairseq checkpoint (``hubert_base_ls960.pt`` format: fairseq ``hubert`` model), loaded
  safely (:func:`pahubert_plugin.checkpoint.load_checkpoint`, ``weights_only=True``), or
* a Hugging Face ``transformers`` folder (``config.json`` + ``model.safetensors``, sharded
  safetensors or ``pytorch_model.bin``) of ``HubertModel``, ``Wav2Vec2Model`` or MERT
  (``m-a-p/MERT-v1-*``, whose transformer keeps HuBERT's parameter names).  Only the JSON and
  the tensors are read (safetensors, or torch with ``weights_only=True``): ``transformers`` is
  not needed and no code from the folder runs.  Names are mapped to fairseq's
  (:func:`hf_to_fairseq`).  MERT's CQT input features change only the input projection, which is
  new here anyway; its ``deepnorm`` residual scaling has no fairseq equivalent and is refused.

The music
model's encoder is built from ``--config`` (a pretraining YAML with ``model:`` and ``task:``
sections; dataclass defaults without one) with the transformer's shape taken from the speech
checkpoint, then:

* copied: every transformer layer, the transformer's final layer norm, the convolutional
  positional embedding and the mask embedding (same shapes, verbatim);
* reshaped: the positional convolution when ``--conv-pos`` asks for another kernel size
  (the kernel is centre-cropped, or zero-padded with its weight-norm gains at 0);
* new: everything before the transformer (the Demucs encoder or spectral stem, the layer norm
  on its features and the linear projection to the transformer width: the speech
  feature extractor's inputs and widths do not carry over) -- randomly initialised.

Speech-only parts (the waveform feature extractor, the prediction head and label
embeddings) are dropped.  The output is a pretraining-style checkpoint (``cfg.model``,
``cfg.task``, ``model`` = ``encoder.*``) that fine-tuning loads through
``model.pretrained_checkpoint`` (``demucs_v2_hubert`` or ``pahubert_resunet``); a
``demucs_hubert`` port can also continue self-supervised pretraining
(``model.pretrained_checkpoint`` of ``demucs_hubert``; ``pahubert`` pretraining has no
such field and starts from scratch).  A table of copied, reshaped and new
parameters is printed, with the source's sample rate and frame rate next to the target's.
"""
from __future__ import annotations  # annotations name torch, imported only when a port runs

import argparse
import json
import logging
import math
import os
import re
import sys
from typing import TYPE_CHECKING, Dict, List, NamedTuple, Optional, Tuple

from .fileio import full_disk_exits

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

TARGETS = ("demucs_hubert", "pahubert")  # shipped port targets; any registered pretraining model works

# transformer options that must equal the speech model's for its weights to be reused
SHAPE_FIELDS = (
    "encoder_embed_dim", "encoder_ffn_embed_dim", "encoder_attention_heads", "activation_fn",
    "layer_type", "layer_norm_first", "conv_pos_groups", "conv_pos_batch_norm",
)
# speech weight-norm names across torch versions -> one spelling
_WEIGHT_NORM = {"parametrizations.weight.original0": "weight_g",
                "parametrizations.weight.original1": "weight_v"}


class Row(NamedTuple):
    name: str  # target parameter, e.g. encoder.transformer.layers.0.fc1.weight
    status: str  # copied | reshaped | new
    source: str  # speech parameter or ""
    shape: Tuple[int, ...]
    note: str = ""


def _canonical(key: str) -> str:
    for old, new in _WEIGHT_NORM.items():
        key = key.replace(old, new)
    return key


class Rates(NamedTuple):
    sample_rate: Optional[int]  # Hz of the audio the model was trained on (None: unknown)
    frame_rate: Optional[float]  # transformer frames per second
    origin: str  # where the numbers come from


# Hugging Face HuBERT/wav2vec 2.0/MERT transformer names -> fairseq's TransformerEncoder names
_HF_NAMES = (
    (r"^masked_spec_embed$", "mask_emb"),
    (r"^encoder\.pos_conv_embed\.conv\.", "encoder.pos_conv.0."),
    (r"^encoder\.layer_norm\.", "encoder.layer_norm."),
    (r"^encoder\.layers\.(\d+)\.attention\.([qkv]|out)_proj\.", r"encoder.layers.\1.self_attn.\2_proj."),
    (r"^encoder\.layers\.(\d+)\.layer_norm\.", r"encoder.layers.\1.self_attn_layer_norm."),
    (r"^encoder\.layers\.(\d+)\.feed_forward\.intermediate_dense\.", r"encoder.layers.\1.fc1."),
    (r"^encoder\.layers\.(\d+)\.feed_forward\.output_dense\.", r"encoder.layers.\1.fc2."),
    (r"^encoder\.layers\.(\d+)\.final_layer_norm\.", r"encoder.layers.\1.final_layer_norm."),
)
HF_MODEL_TYPES = {"hubert": "HubertModel", "wav2vec2": "Wav2Vec2Model", "mert_model": "MERT"}
# transformers' activation names -> fairseq's
_HF_ACTIVATIONS = {"gelu": "gelu", "relu": "relu", "tanh": "tanh", "linear": "linear", "gelu_fast": "gelu_fast",
                   "gelu_new": "gelu_accurate"}


def hf_to_fairseq(key: str) -> str:
    """fairseq name of a transformers parameter (``hubert.``/``wav2vec2.`` prefixes dropped);
    names outside the transformer (feature extractor, projection) are returned as they are."""
    key = re.sub(r"^(hubert|wav2vec2|mert|model)\.", "", key)
    for pattern, repl in _HF_NAMES:
        new, n = re.subn(pattern, repl, key)
        if n:
            return _canonical(new)
    return key


def _read_json(path: str):
    """The JSON in ``path``; ValueError naming the file if it is not JSON."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None


def _safetensors_files(folder: str) -> Optional[List[str]]:
    """The safetensors file(s) of a transformers folder (single or sharded by an index), or None."""
    single, index = os.path.join(folder, "model.safetensors"), os.path.join(folder, "model.safetensors.index.json")
    if os.path.isfile(single):
        return [single]
    if not os.path.isfile(index):
        return None
    weight_map = _read_json(index)
    weight_map = weight_map.get("weight_map") if isinstance(weight_map, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise ValueError(f"{index}: no weight_map of tensor names to shard files")
    shards = [os.path.join(folder, s) for s in sorted(set(weight_map.values()))]
    for shard in shards:
        if os.path.dirname(os.path.abspath(shard)) != os.path.abspath(folder) or not os.path.isfile(shard):
            raise ValueError(f"{index}: shard {os.path.relpath(shard, folder)} is not a file of {folder}")
    return shards


def _safetensors_shapes(files: List[str]) -> Dict[str, Tuple[int, ...]]:
    """Tensor name -> shape from the safetensors headers (nothing is loaded); errors name the file."""
    from safetensors import safe_open

    shapes = {}
    for path in files:
        try:
            with safe_open(path, framework="pt") as f:
                for key in f.keys():
                    shapes[key] = tuple(f.get_slice(key).get_shape())
        except Exception as e:  # noqa: BLE001  (safetensors raises its own SafetensorError, OSError, ...)
            raise ValueError(f"{path}: not a readable safetensors file ({type(e).__name__}: {e})") from None
    return shapes


def _load_safetensors(files: List[str]) -> Dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    tensors = {}
    for path in files:
        try:
            tensors.update(load_file(path))
        except Exception as e:  # noqa: BLE001
            raise ValueError(f"{path}: not a readable safetensors file ({type(e).__name__}: {e})") from None
    return tensors


def _read_tensors(folder: str) -> Dict[str, torch.Tensor]:
    """Tensors of a transformers folder: (sharded) safetensors, else pytorch_model.bin with weights_only."""
    files = _safetensors_files(folder)
    if files is not None:
        return _load_safetensors(files)
    binary = os.path.join(folder, "pytorch_model.bin")
    if os.path.isfile(binary):
        from .checkpoint import load_checkpoint  # weights_only=True; a refusal names the file

        state = load_checkpoint(binary)
        if not isinstance(state, dict) or not all(hasattr(v, "shape") for v in state.values()):
            raise ValueError(f"{binary}: not a state dict of tensors")
        return state
    raise ValueError(f"{folder}: no model.safetensors, model.safetensors.index.json or pytorch_model.bin; "
                     f"expected a transformers save_pretrained folder")


# fairseq model config field -> where it comes from, for messages
_CONFIG_NAMES = {"encoder_embed_dim": "hidden_size", "encoder_ffn_embed_dim": "intermediate_size",
                 "encoder_attention_heads": "num_attention_heads", "conv_pos": "num_conv_pos_embeddings",
                 "conv_pos_groups": "num_conv_pos_embedding_groups"}


def check_shapes(where: str, model_cfg: Dict, shapes: Dict[str, Tuple[int, ...]], names: Optional[Dict] = None) -> None:
    """ValueError naming ``where`` (the config file) and the field unless the transformer options of
    ``model_cfg`` (fairseq names) are positive integers that agree with the tensors' ``shapes``
    (fairseq-named): checked before anything of that size is built."""
    names = names or {}

    def field_name(key):
        return names.get(key, key)

    for key in ("encoder_embed_dim", "encoder_ffn_embed_dim", "encoder_attention_heads", "conv_pos", "conv_pos_groups"):
        value = model_cfg.get(key)
        if value is None and key in ("conv_pos", "conv_pos_groups"):
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{where}: {field_name(key)} must be a positive integer, found {value!r}")
    dim, heads = model_cfg["encoder_embed_dim"], model_cfg["encoder_attention_heads"]
    if dim % heads:
        raise ValueError(f"{where}: {field_name('encoder_embed_dim')}={dim} is not a multiple of "
                         f"{field_name('encoder_attention_heads')}={heads}")
    expected = {
        "encoder.layers.0.self_attn.q_proj.weight": ((dim, dim), "encoder_embed_dim"),
        "encoder.layers.0.fc1.weight": ((model_cfg["encoder_ffn_embed_dim"], dim), "encoder_ffn_embed_dim"),
    }
    groups, kernel = model_cfg.get("conv_pos_groups"), model_cfg.get("conv_pos")
    if groups and kernel:
        if dim % groups:
            raise ValueError(f"{where}: {field_name('encoder_embed_dim')}={dim} is not a multiple of "
                             f"{field_name('conv_pos_groups')}={groups}")
        for suffix in ("weight_v", "weight"):
            expected[f"encoder.pos_conv.0.{suffix}"] = ((dim, dim // groups, kernel), "conv_pos")
    for name, (shape, key) in expected.items():
        found = shapes.get(name)
        if found is not None and tuple(found) != shape:
            raise ValueError(f"{where}: {field_name(key)}={model_cfg[key]} does not fit the tensors: {name} has shape "
                             f"{list(found)}, the config implies {list(shape)}")
    if "encoder.layers.0.self_attn.q_proj.weight" not in shapes and any(k.startswith("encoder.layers.") for k in shapes):
        raise ValueError(f"{where}: no encoder.layers.0.self_attn.q_proj.weight among the tensors; cannot check "
                         f"{field_name('encoder_embed_dim')}")


def load_hf_folder(folder: str) -> Tuple[Dict, Dict[str, torch.Tensor], Rates]:
    """(fairseq-style model config, fairseq-named weights, rates) of a transformers folder."""
    config_path = os.path.join(folder, "config.json")
    if not os.path.isfile(config_path):
        raise ValueError(f"{folder}: no config.json; expected a transformers folder (config.json + "
                         f"model.safetensors or pytorch_model.bin) or a fairseq .pt checkpoint")
    hf = _read_json(config_path)
    if not isinstance(hf, dict):
        raise ValueError(f"{config_path}: expected a JSON object, found {type(hf).__name__}")
    kind = hf.get("model_type")
    if kind not in HF_MODEL_TYPES:
        raise ValueError(f"{config_path}: model_type {kind!r} is not one of {', '.join(HF_MODEL_TYPES)} "
                         f"(HubertModel, Wav2Vec2Model, MERT)")
    if hf.get("deepnorm"):
        raise ValueError(f"{config_path}: a MERT model with deepnorm=true scales its residuals by "
                         f"(2 x layers)^0.25, which fairseq's transformer does not; its layers cannot be reused")
    if hf.get("conv_pos_batch_norm") or hf.get("position_embeddings_type") not in (None, "conv"):
        raise ValueError(f"{config_path}: only convolutional positional embeddings without batch norm port")
    act = hf.get("hidden_act", "gelu")
    if act not in _HF_ACTIVATIONS:
        raise ValueError(f"{config_path}: activation {act!r} has no fairseq equivalent "
                         f"({', '.join(_HF_ACTIVATIONS)} do)")
    model_cfg = {
        "_name": HF_MODEL_TYPES[kind],
        "encoder_embed_dim": hf.get("hidden_size"), "encoder_ffn_embed_dim": hf.get("intermediate_size"),
        "encoder_attention_heads": hf.get("num_attention_heads"), "activation_fn": _HF_ACTIVATIONS[act],
        "layer_type": "transformer", "layer_norm_first": bool(hf.get("do_stable_layer_norm", False)),
        "conv_pos": hf.get("num_conv_pos_embeddings", 128), "conv_pos_groups": hf.get("num_conv_pos_embedding_groups", 16),
        "conv_pos_batch_norm": False,
    }
    files = _safetensors_files(folder)
    if files is not None:  # the shapes from the headers: the config is checked before anything is loaded
        check_shapes(config_path, model_cfg, {hf_to_fairseq(k): v for k, v in _safetensors_shapes(files).items()},
                     _CONFIG_NAMES)
    weights = {hf_to_fairseq(k): v for k, v in _read_tensors(folder).items()}
    check_shapes(config_path, model_cfg, {k: tuple(v.shape) for k, v in weights.items()}, _CONFIG_NAMES)
    if not any(k.startswith("encoder.layers.") for k in weights):
        raise ValueError(f"{folder}: no transformer layers (encoder.layers.*) among its tensors")
    rate, origin = hf.get("sample_rate"), "config.json sample_rate"
    pre = os.path.join(folder, "preprocessor_config.json")
    if rate is None and os.path.isfile(pre):
        pre_cfg = _read_json(pre)
        rate, origin = (pre_cfg.get("sampling_rate") if isinstance(pre_cfg, dict) else None,
                        "preprocessor_config.json sampling_rate")
    if rate is None:
        rate, origin = 16000, "assumed 16000 (no sample_rate in config.json or preprocessor_config.json)"
    stride = hf.get("conv_stride", ())
    if (isinstance(rate, bool) or not isinstance(rate, (int, float)) or not rate > 0
            or not isinstance(stride, list) or not all(isinstance(x, int) and x > 0 for x in stride)):
        raise ValueError(f"{config_path if origin.startswith('config') else pre}: {origin.split()[-1]}={rate!r} "
                         f"and conv_stride={stride!r} must be positive numbers")
    stride = math.prod(stride)
    return model_cfg, weights, Rates(int(rate), int(rate) / stride if stride else None, origin)


def load_source(path: str) -> Tuple[Dict, Dict[str, torch.Tensor], Rates]:
    """A transformers folder or a fairseq checkpoint: (model config, fairseq-named weights, rates)."""
    if os.path.isdir(path):
        return load_hf_folder(path)
    if not os.path.isfile(path):
        raise ValueError(f"{path}: no such file or folder")
    return load_speech_hubert(path)


def load_speech_hubert(path: str) -> Tuple[Dict, Dict[str, torch.Tensor], Rates]:
    """(model config as a dict, state dict with canonical names, rates) of a fairseq HuBERT checkpoint."""
    from omegaconf import OmegaConf

    from .checkpoint import check_eval_fields, load_checkpoint

    state = load_checkpoint(path)
    if not isinstance(state, dict) or "model" not in state:
        raise ValueError(f"{path}: not a fairseq checkpoint (no 'model' entry)")
    for where in ("cfg", "args"):  # nothing is built from them here, but a field fairseq eval()s stays a literal
        if state.get(where) is not None:
            check_eval_fields(path, state[where], where)
    cfg = state.get("cfg")
    if cfg is not None and cfg.get("model") is not None:
        model_cfg = OmegaConf.to_container(OmegaConf.create(cfg["model"]), resolve=False) \
            if not isinstance(cfg["model"], dict) else dict(cfg["model"])
    elif state.get("args") is not None:  # pre-hydra checkpoints
        model_cfg = dict(vars(state["args"]), _name=getattr(state["args"], "arch", None))
    else:
        raise ValueError(f"{path}: the checkpoint has neither cfg.model nor args")
    weights = {_canonical(k): v for k, v in state["model"].items()}
    name = model_cfg.get("_name")
    if not any(k.startswith("encoder.layers.") for k in weights) or "mask_emb" not in weights:
        raise ValueError(
            f"{path}: expected a fairseq speech HuBERT checkpoint (model 'hubert' with "
            f"encoder.layers.* and mask_emb), found model '{name}' with keys "
            f"{', '.join(list(weights)[:5])}, ...")
    if name not in (None, "hubert"):
        logger.warning(f"{path}: model is '{name}', not 'hubert'; porting its HuBERT-style encoder")
    prefix = "cfg.model." if cfg is not None and cfg.get("model") is not None else "args."
    check_shapes(path, model_cfg, {k: tuple(v.shape) for k, v in weights.items() if hasattr(v, "shape")},
                 {k: prefix + k for k in _CONFIG_NAMES})
    task = cfg.get("task") if cfg is not None else None
    rate = (task.get("sample_rate") if task is not None else None) or model_cfg.get("sample_rate")
    return model_cfg, weights, Rates(int(rate) if rate else None, _plain(model_cfg.get("label_rate")),
                                     "fairseq task.sample_rate, model.label_rate")


def _speech_layers(weights: Dict[str, torch.Tensor]) -> int:
    return len({k.split(".")[2] for k in weights if k.startswith("encoder.layers.")})


def target_config(target: str, config: Optional[str], speech_cfg: Dict, num_layers: int,
                  conv_pos: Optional[int], sample_rate: Optional[int],
                  channels: Optional[int]) -> Tuple[Dict, Dict]:
    """(model section, task section) of the ported checkpoint, as plain dicts."""
    from omegaconf import OmegaConf

    from .configs import load_recipe_config

    model, task = {}, {}
    if config:
        loaded = load_recipe_config(config)  # its _shared defaults included
        model = OmegaConf.to_container(loaded.get("model") or OmegaConf.create({}), resolve=False)
        task = OmegaConf.to_container(loaded.get("task") or OmegaConf.create({}), resolve=False)
        if model.get("_name") not in (None, target):
            raise ValueError(f"--config {config} configures model '{model.get('_name')}', not the "
                             f"--target {target}")
    task = {
        "_name": "pahubert_pretraining",
        "sample_rate": int(sample_rate or _plain(task.get("sample_rate")) or 44100),
        "audio_channels": int(channels or _plain(task.get("audio_channels")) or 2),
        "label_rate": float(_plain(task.get("label_rate")) or 100.0),
    }
    model["_name"] = target
    for key in SHAPE_FIELDS:
        if key in speech_cfg:
            if key in model and model[key] != speech_cfg[key]:
                logger.warning(f"model.{key}: {model[key]} in --config replaced by the speech "
                               f"model's {speech_cfg[key]}")
            model[key] = speech_cfg[key]
    model["encoder_layers"] = num_layers
    model["conv_pos"] = conv_pos or speech_cfg.get("conv_pos", 128)
    model.pop("pretrained_checkpoint", None)
    return model, task


def _plain(value):
    """A YAML value, or None for an interpolation like ${...} (the task then decides)."""
    return None if isinstance(value, str) and value.startswith("${") else value


def pretraining_models() -> Dict[str, type]:
    """Every registered masked-prediction pretraining model (a port target), by registry key."""
    from .registry import register
    from .training import save_checkpoint_file

    register()  # our models
    from fairseq.models import MODEL_REGISTRY

    from .models.hubert_encoder import HubertPretrainingModel

    return {name: cls for name, cls in sorted(MODEL_REGISTRY.items())
            if isinstance(cls, type) and issubclass(cls, HubertPretrainingModel)}


def build_encoder(target: str, model_cfg: Dict, task_cfg: Dict):
    """(encoder module, fully resolved model config dict) for ``target`` (its ``build_encoder``)."""
    models = pretraining_models()
    if target not in models:
        raise ValueError(f"--target must be a registered pretraining model ({', '.join(models)}), got {target!r}")
    return models[target].build_encoder(model_cfg, task_cfg)


def _transformer_prefix(encoder: torch.nn.Module) -> str:
    from fairseq.models.wav2vec.wav2vec2 import TransformerEncoder

    names = [n for n, m in encoder.named_modules() if isinstance(m, TransformerEncoder)]
    if len(names) != 1:
        raise ValueError(f"expected one fairseq TransformerEncoder in the target encoder, found {names}")
    return names[0] + "."


def _resize_kernel(src: torch.Tensor, size: int, pad_value: Optional[float]) -> torch.Tensor:
    """Centre-crop or pad the last axis of ``src`` to ``size`` (pad: value, or noise like src)."""
    import torch

    have = src.shape[-1]
    if size <= have:
        start = (have - size) // 2
        return src[..., start:start + size].clone()
    left = (size - have) // 2
    shape = (*src.shape[:-1], size)
    out = (torch.full(shape, pad_value, dtype=src.dtype) if pad_value is not None
           else torch.randn(shape, dtype=src.dtype) * src.std())
    out[..., left:left + have] = src
    return out


def port_weights(speech: Dict[str, torch.Tensor], encoder: torch.nn.Module
                 ) -> Tuple[Dict[str, torch.Tensor], List[Row]]:
    """Fill ``encoder``'s state dict from the speech weights -> (state, one Row per tensor)."""
    prefix = _transformer_prefix(encoder)
    state, rows = {}, []
    for name, tensor in encoder.state_dict().items():
        src = ""
        if name.startswith(prefix):
            src = "encoder." + _canonical(name[len(prefix):])
        elif name.rsplit(".", 1)[-1] == "mask_emb":
            src = "mask_emb"
        value, status, note = tensor, "new", ""
        if src in speech and speech[src].shape == tensor.shape:
            value, status = speech[src].clone(), "copied"
        elif src in speech and ".pos_conv." in src and speech[src].shape[:-1] == tensor.shape[:-1]:
            pad = 0.0 if src.endswith("weight_g") else None
            value, status = _resize_kernel(speech[src], tensor.shape[-1], pad), "reshaped"
            note = f"kernel {speech[src].shape[-1]} -> {tensor.shape[-1]}"
        elif src in speech:
            note = f"speech shape {tuple(speech[src].shape)} does not fit"
        elif src:
            note = "no such speech parameter"
        state[name] = value
        rows.append(Row("encoder." + name, status, src if status != "new" else "", tuple(tensor.shape), note))
    return state, rows


def port(speech_path: str, target: str, config: Optional[str] = None,
         sample_rate: Optional[int] = None, channels: Optional[int] = None,
         num_layers: Optional[int] = None, conv_pos: Optional[int] = None) -> Tuple[Dict, List[Row], List[str]]:
    """(checkpoint dict to save, rows, dropped speech keys); ``speech_path`` is a fairseq
    checkpoint or a transformers folder (:func:`load_source`)."""
    speech_cfg, speech, source_rates = load_source(speech_path)
    layers = _speech_layers(speech)
    num_layers = num_layers or layers
    model_cfg, task_cfg = target_config(target, config, speech_cfg, num_layers, conv_pos,
                                        sample_rate, channels)
    encoder, full_cfg = build_encoder(target, model_cfg, task_cfg)
    state, rows = port_weights(speech, encoder)
    used = {r.source for r in rows if r.source}
    dropped = [k for k in speech if k not in used]
    hop = getattr(encoder, "hop", None)  # input samples per transformer frame, where not the label rate
    target_rates = Rates(task_cfg["sample_rate"], task_cfg["sample_rate"] / hop if hop else task_cfg["label_rate"],
                         "ported task.sample_rate, encoder frames")
    ckpt = {
        "args": None,
        "cfg": {"model": full_cfg, "task": task_cfg},
        "model": {"encoder." + k: v for k, v in state.items()},
        "optimizer_history": [], "extra_state": {},
        "port": {"source": os.path.abspath(speech_path), "target": target, "source_kind": speech_cfg.get("_name"),
                 "source_rates": source_rates._asdict(), "target_rates": target_rates._asdict(),
                 **{s: [r.name for r in rows if r.status == s] for s in ("copied", "reshaped", "new")}},
    }
    return ckpt, rows, dropped


def format_rates(source: Dict, target: Dict) -> str:
    """Two lines: the source's and the target's sample and frame rates (``Rates`` as dicts)."""
    def one(r):
        frames = f"{r['frame_rate']:g} Hz frames" if r["frame_rate"] else "frame rate unknown"
        audio = f"{r['sample_rate']} Hz audio" if r["sample_rate"] else "sample rate unknown"
        return f"{audio}, {frames}  ({r['origin']})"
    return f"   source: {one(source)}\n   target: {one(target)}"


def format_table(rows: List[Row], dropped: List[str]) -> str:
    """The printed report: one line per parameter, then totals."""
    width = max(len(r.name) for r in rows)
    lines = [f"{'parameter':<{width}}  {'status':<8}  {'shape':<18}  source / note"]
    for r in rows:
        lines.append(f"{r.name:<{width}}  {r.status:<8}  {str(list(r.shape)):<18}  "
                     f"{r.source}{'  ' if r.source and r.note else ''}{r.note}")
    lines.append("")
    for status in ("copied", "reshaped", "new"):
        sel = [r for r in rows if r.status == status]
        count = sum(math.prod(r.shape) for r in sel)
        lines.append(f"{status:>9}: {len(sel):4d} tensors, {count:,} values")
    groups = sorted({k.split(".layers.")[0] + (".layers.*" if ".layers." in k else "") if k.startswith("encoder.")
                     else k.split(".")[0] for k in dropped})
    lines.append(f"  dropped: {len(dropped):4d} speech tensors ({', '.join(groups)})")
    return "\n".join(lines)


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="pahubert-port-hubert",
        description="Copy the transformer of a fairseq HuBERT checkpoint or of a Hugging Face "
                    "transformers folder (HubertModel, Wav2Vec2Model, MERT) into a music model "
                    "(demucs_hubert or pahubert) and write a checkpoint that fine-tuning loads "
                    "through model.pretrained_checkpoint.")
    p.add_argument("speech_ckpt", metavar="SOURCE",
                   help="fairseq HuBERT checkpoint (e.g. hubert_base_ls960.pt) or a transformers folder with "
                        "config.json + model.safetensors/pytorch_model.bin (e.g. a local copy of "
                        "facebook/hubert-base-ls960 or m-a-p/MERT-v1-95M); nothing is downloaded")
    p.add_argument("out_ckpt", help="where to write the ported checkpoint")
    p.add_argument("--target", required=True,
                   help=f"music pretraining model to port into: {' or '.join(TARGETS)} (or any registered "
                        f"model built on models/hubert_encoder.py's HubertPretrainingModel)")
    p.add_argument("--config", help="pretraining YAML of the target (model: and task: sections), e.g. "
                                    "recipes/pahubert/conf/pretrain/demucs_hubert_base.yaml; "
                                    "default: the model's dataclass defaults")
    p.add_argument("--sample-rate", type=int, help="music sample rate (default: the config's task, else 44100)")
    p.add_argument("--channels", type=int, help="audio channels (default: the config's task, else 2)")
    p.add_argument("--num-layers", type=int, help="keep the first N transformer layers (default: all)")
    p.add_argument("--conv-pos", type=int, help="positional conv kernel; a size other than the speech "
                                                "model's is centre-cropped/padded (default: the speech one)")
    p.add_argument("--quiet", action="store_true", help="print only the totals, not every parameter")
    return p


@full_disk_exits("pahubert-port-hubert")
def main(argv=None) -> int:
    args = get_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from .registry import register
    from .training import save_checkpoint_file

    register()  # the models and the checkpoint allow-list
    import torch

    try:
        ckpt, rows, dropped = port(args.speech_ckpt, args.target, args.config, args.sample_rate,
                                   args.channels, args.num_layers, args.conv_pos)
    except ValueError as e:  # not a HuBERT-style source, a refused checkpoint, a config for another model
        logger.error(str(e))
        return 2
    table = format_table(rows, dropped)
    print(table if not args.quiet else table[table.index("\n\n") + 2:])
    print(format_rates(ckpt["port"]["source_rates"], ckpt["port"]["target_rates"]))
    os.makedirs(os.path.dirname(os.path.abspath(args.out_ckpt)), exist_ok=True)
    save_checkpoint_file(ckpt, args.out_ckpt)  # atomic: a kill or a full disk leaves no partial file
    print(f"wrote {args.out_ckpt}: fine-tune with model.pretrained_checkpoint={os.path.abspath(args.out_ckpt)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
