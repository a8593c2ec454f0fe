"""Port a fairseq speech HuBERT checkpoint into a music model's encoder.

``python -m pahubert_plugin.port_hubert SPEECH_CKPT OUT_CKPT --target demucs_v2_hubert|pahubert
[--config PRETRAIN_YAML]``

The speech checkpoint (``hubert_base_ls960.pt`` format: fairseq ``hubert`` model) is loaded
safely (:func:`pahubert_plugin.checkpoint.load_checkpoint`, ``weights_only=True``).  The music
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
``demucs_v2_hubert`` port can also continue self-supervised pretraining
(``model.pretrained_checkpoint`` of its pretraining config; ``pahubert`` pretraining has no
such field and starts from scratch).  A table of copied, reshaped and new
parameters is printed.
"""
import argparse
import logging
import os
import sys
from typing import Dict, List, NamedTuple, Optional, Tuple

import torch
from omegaconf import OmegaConf

from .checkpoint import load_checkpoint

logger = logging.getLogger(__name__)

TARGETS = ("demucs_v2_hubert", "pahubert")

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


def load_speech_hubert(path: str) -> Tuple[Dict, Dict[str, torch.Tensor]]:
    """(model config as a dict, state dict with canonical names) of a fairseq HuBERT checkpoint."""
    state = load_checkpoint(path)
    if not isinstance(state, dict) or "model" not in state:
        raise ValueError(f"{path}: not a fairseq checkpoint (no 'model' entry)")
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
    return model_cfg, weights


def _speech_layers(weights: Dict[str, torch.Tensor]) -> int:
    return len({k.split(".")[2] for k in weights if k.startswith("encoder.layers.")})


def target_config(target: str, config: Optional[str], speech_cfg: Dict, num_layers: int,
                  conv_pos: Optional[int], sample_rate: Optional[int],
                  channels: Optional[int]) -> Tuple[Dict, Dict]:
    """(model section, task section) of the ported checkpoint, as plain dicts."""
    model, task = {}, {}
    if config:
        loaded = OmegaConf.load(config)
        model = OmegaConf.to_container(loaded.get("model") or OmegaConf.create({}), resolve=False)
        task = OmegaConf.to_container(loaded.get("task") or OmegaConf.create({}), resolve=False)
        if model.get("_name") not in (None, target):
            raise ValueError(f"--config {config} configures model '{model.get('_name')}', not the "
                             f"--target {target}")
    task = {
        "_name": "pahubert_pretraining",
        "sample_rate": int(sample_rate or _plain(task.get("sample_rate")) or 44100),
        "channels": int(channels or _plain(task.get("channels")) or 2),
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


def build_encoder(target: str, model_cfg: Dict, task_cfg: Dict):
    """(encoder module, fully resolved model config dict) for ``target``."""
    if target == "demucs_v2_hubert":
        from .models.demucs import DemucsHubertEncoder
        from .models.demucs_v2_hubert import DemucsV2HubertConfig

        cfg = OmegaConf.merge(OmegaConf.structured(DemucsV2HubertConfig), model_cfg)
        cfg.label_rate = task_cfg["label_rate"]
        encoder = DemucsHubertEncoder(cfg, task_cfg["channels"])
    elif target == "pahubert":
        from .models.pahubert import PahubertEncoder, encoder_config

        cfg = encoder_config({"model": model_cfg, "task": task_cfg})
        encoder = PahubertEncoder(cfg)
    else:
        raise ValueError(f"--target must be one of {', '.join(TARGETS)}, got {target!r}")
    return encoder, OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)


def _transformer_prefix(encoder: torch.nn.Module) -> str:
    from fairseq.models.wav2vec.wav2vec2 import TransformerEncoder

    names = [n for n, m in encoder.named_modules() if isinstance(m, TransformerEncoder)]
    if len(names) != 1:
        raise ValueError(f"expected one fairseq TransformerEncoder in the target encoder, found {names}")
    return names[0] + "."


def _resize_kernel(src: torch.Tensor, size: int, pad_value: Optional[float]) -> torch.Tensor:
    """Centre-crop or pad the last axis of ``src`` to ``size`` (pad: value, or noise like src)."""
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
    """(checkpoint dict to save, rows, dropped speech keys)."""
    speech_cfg, speech = load_speech_hubert(speech_path)
    layers = _speech_layers(speech)
    num_layers = num_layers or layers
    model_cfg, task_cfg = target_config(target, config, speech_cfg, num_layers, conv_pos,
                                        sample_rate, channels)
    encoder, full_cfg = build_encoder(target, model_cfg, task_cfg)
    state, rows = port_weights(speech, encoder)
    used = {r.source for r in rows if r.source}
    dropped = [k for k in speech if k not in used]
    ckpt = {
        "args": None,
        "cfg": {"model": full_cfg, "task": task_cfg},
        "model": {"encoder." + k: v for k, v in state.items()},
        "optimizer_history": [], "extra_state": {},
        "port": {"source": os.path.abspath(speech_path), "target": target,
                 **{s: [r.name for r in rows if r.status == s] for s in ("copied", "reshaped", "new")}},
    }
    return ckpt, rows, dropped


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
        count = sum(torch.Size(r.shape).numel() for r in sel)
        lines.append(f"{status:>9}: {len(sel):4d} tensors, {count:,} values")
    groups = sorted({k.split(".layers.")[0] + (".layers.*" if ".layers." in k else "") if k.startswith("encoder.")
                     else k.split(".")[0] for k in dropped})
    lines.append(f"  dropped: {len(dropped):4d} speech tensors ({', '.join(groups)})")
    return "\n".join(lines)


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m pahubert_plugin.port_hubert",
        description="Copy a fairseq speech HuBERT checkpoint's transformer into a music model "
                    "(demucs_v2_hubert or pahubert) and write a checkpoint that fine-tuning loads "
                    "through model.pretrained_checkpoint.")
    p.add_argument("speech_ckpt", help="fairseq HuBERT checkpoint (e.g. hubert_base_ls960.pt)")
    p.add_argument("out_ckpt", help="where to write the ported checkpoint")
    p.add_argument("--target", required=True, choices=TARGETS, help="music model to port into")
    p.add_argument("--config", help="pretraining YAML of the target (model: and task: sections), e.g. "
                                    "recipes/pahubert/conf/pretrain/demucs_v2_hubert_base.yaml; "
                                    "default: the model's dataclass defaults")
    p.add_argument("--sample-rate", type=int, help="music sample rate (default: the config's task, else 44100)")
    p.add_argument("--channels", type=int, help="audio channels (default: the config's task, else 2)")
    p.add_argument("--num-layers", type=int, help="keep the first N transformer layers (default: all)")
    p.add_argument("--conv-pos", type=int, help="positional conv kernel; a size other than the speech "
                                                "model's is centre-cropped/padded (default: the speech one)")
    p.add_argument("--quiet", action="store_true", help="print only the totals, not every parameter")
    return p


def main(argv=None) -> int:
    args = get_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    import pahubert_plugin  # noqa: F401  (registers the models and the checkpoint allow-list)

    ckpt, rows, dropped = port(args.speech_ckpt, args.target, args.config, args.sample_rate,
                               args.channels, args.num_layers, args.conv_pos)
    table = format_table(rows, dropped)
    print(table if not args.quiet else table[table.index("\n\n") + 2:])
    os.makedirs(os.path.dirname(os.path.abspath(args.out_ckpt)), exist_ok=True)
    torch.save(ckpt, args.out_ckpt)
    print(f"wrote {args.out_ckpt}: fine-tune with model.pretrained_checkpoint={os.path.abspath(args.out_ckpt)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
