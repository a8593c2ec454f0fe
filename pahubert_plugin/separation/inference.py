"""Inference-time precision and folding, for any separation model.

* :func:`optimize_for_inference`: BatchNorm folded into the convolution before it, ``channels_last``
  weights (same estimates up to float rounding);
* :class:`Autocast`, :func:`check_precision`, :func:`warn_if_emulated`: ``bf16`` autocast and a
  warning where the CPU only emulates bfloat16;
* :func:`set_decode_tile`: decode each chunk in time tiles (``pahubert_resunet``).

None of them changes the model's train/eval mode except :func:`optimize_for_inference`
(eval, as it folds BatchNorm's running statistics).
"""
import logging

import torch
from torch import nn

PRECISIONS = ("fp32", "bf16")
logger = logging.getLogger("pahubert_plugin.separation.inference")


def check_precision(precision: str) -> None:
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")


def cpu_has_native_bf16() -> bool:
    """Whether oneDNN runs bfloat16 on this CPU's own units (AVX512-BF16 or AMX); without them it emulates
    bfloat16, which was 10x slower than fp32 for a convolution on an AVX2 CPU (docs/PERFORMANCE.md)."""
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def warn_if_emulated(precision: str, device) -> bool:
    """Log a warning when ``precision`` is bf16 on a CPU without bfloat16 units; returns whether it warned."""
    if precision != "bf16" or torch.device(device).type != "cpu" or cpu_has_native_bf16():
        return False
    logger.warning("--precision bf16: this CPU has no bfloat16 units (AVX512-BF16 or AMX; torch reports "
                   "%s), so bfloat16 is emulated and separation will be several times SLOWER than fp32 "
                   "(a convolution took 10x as long on an AVX2 CPU); use --precision fp32",
                   torch.backends.cpu.get_cpu_capability())
    return True


def optimize_for_inference(model: nn.Module) -> nn.Module:
    """``model`` in eval mode, changed in place for faster inference with the same outputs.

    * every BatchNorm that directly follows a convolution (the second of each residual unit,
      :class:`~pahubert_plugin.models.blocks.ResUnit`) is folded into that convolution's weights
      (``torch.nn.utils.fusion.fuse_conv_bn_eval``); the others follow an activation or a skip
      concatenation and stay;
    * 4-D weights move to ``channels_last``, the layout oneDNN's CPU convolutions run fastest in.

    Estimates change only by float rounding (tests/test_inference_equivalence.py: within 1e-5 of the
    mixture's peak). Use the result for inference only: its state dict no longer matches the
    checkpoint's (fused BatchNorms are gone)."""
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    from ..models.blocks import ResUnit

    model.eval()
    for unit in model.modules():
        if not isinstance(unit, ResUnit):
            continue
        body = unit.body  # norm, act, conv, norm, act, conv
        if isinstance(body[3], nn.BatchNorm2d) and body[3].track_running_stats:
            body[2] = fuse_conv_bn_eval(body[2], body[3])
            body[3] = nn.Identity()
    if any(isinstance(m, nn.Conv2d) for m in model.modules()):
        model.to(memory_format=torch.channels_last)
    return model


def set_decode_tile(model: nn.Module, seconds: float) -> nn.Module:
    """Make ``model`` decode each chunk in time tiles of about ``seconds`` (0: whole chunks); see
    :meth:`~pahubert_plugin.models.pahubert_resunet.PahubertResUNetModel.set_decode_tile`. A ValueError for
    models that cannot (every other model's memory is already one chunk's, without tiles)."""
    target = getattr(model, "model", model)  # Autocast and benchmark wrappers hold the model as .model
    if not hasattr(target, "set_decode_tile"):
        raise ValueError(f"tiled decoding (--tile) is for pahubert_resunet models; {type(target).__name__} "
                         f"decodes whole chunks: use a shorter --segment for less memory")
    target.set_decode_tile(seconds)
    return model


class Autocast(nn.Module):
    """``model`` run under ``torch.autocast`` (``bf16``: bfloat16 matrix products and convolutions,
    float32 elsewhere; fast on CPUs with AMX or AVX512-BF16). Estimates differ from fp32 by about
    1e-2 of the mixture's peak: benchmarks/bench_separate.py reports the SDR difference."""

    def __init__(self, model: nn.Module, precision: str = "bf16"):
        super().__init__()
        check_precision(precision)
        self.model, self.precision = model, precision

    def forward(self, mixture: torch.Tensor) -> torch.Tensor:
        with torch.autocast(mixture.device.type, dtype=torch.bfloat16, enabled=self.precision == "bf16"):
            return self.model(mixture).float()
