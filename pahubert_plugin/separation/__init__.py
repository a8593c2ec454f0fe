"""Separation of whole recordings with a fine-tuned checkpoint, in layers (each imports only those below):

* :mod:`.api`: the :class:`Separator` class and checkpoint loading (:func:`load_separation_model`);
* :mod:`.inference`: precision (bf16 autocast) and inference-time folding (BatchNorm, channels_last);
* :mod:`.overlap`: chunking, overlap-add and streaming over files (:func:`apply_model`, :func:`stream_apply`);
* :mod:`.writing`: stem formats, clip modes and stem files (:func:`save_stems`, :class:`StemWriter`);
* :mod:`.memory`: memory and process helpers (page dropping, malloc trimming, die-with-parent).

The names below are re-exported here and imported when first used, so importing a submodule (the
command line's parser uses :mod:`.writing`) does not load torch.
"""
import importlib

_EXPORTS = {
    "Separator": "api", "load_separation_model": "api", "build_from_state": "api", "check_options": "api",
    "split_two_stems": "api",
    "apply_model": "overlap", "iter_apply": "overlap", "stream_apply": "overlap",
    "optimize_for_inference": "inference", "Autocast": "inference", "set_decode_tile": "inference",
    "save_stems": "writing", "prevent_clip": "writing", "StemWriter": "writing", "StemWriteError": "writing",
    "FORMATS": "writing", "CLIP_MODES": "writing",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))
