"""The factory the CLIs use: :func:`build_reader` for a ``--feature`` name in :data:`FEATURES`.

Every reader subclasses :class:`~pahubert_plugin.clustering.base.FeatureReader` (the shared
interface and its promises). This module imports no torch (the readers' own modules do, when
:func:`build_reader` imports them), so the CLIs' parsers can use :data:`FEATURES` and answer
``--help`` at once.
"""
from __future__ import annotations

from typing import Optional

from pahubert_plugin.clustering.base import FeatureReader

FEATURES = ("mfcc", "primitive", "hubert")


def build_reader(feature: str, sample_rate: int, ckpt: Optional[str] = None, layer: Optional[int] = None,
                 device: str = "cpu", max_chunk: Optional[float] = None) -> FeatureReader:
    """Reader for ``feature`` in :data:`FEATURES`; ``hubert`` needs ``ckpt`` and ``layer``."""
    if feature == "mfcc":
        from pahubert_plugin.clustering.mfcc import MfccReader

        return MfccReader(sample_rate)
    if feature == "primitive":
        from pahubert_plugin.clustering.primitive import PrimitiveReader

        return PrimitiveReader(sample_rate)
    if feature == "hubert":
        if ckpt is None or layer is None:
            raise ValueError("--feature hubert needs --ckpt PATH and --layer L")
        try:
            from pahubert_plugin.clustering.hubert_reader import HubertFeatureReader
        except ImportError as e:
            raise ImportError(
                "--feature hubert needs pahubert_plugin/clustering/hubert_reader.py "
                f"(HubertFeatureReader), which could not be imported: {e}"
            ) from e
        return HubertFeatureReader(ckpt, layer, sample_rate=sample_rate, device=device, max_chunk=max_chunk)
    raise ValueError(f"unknown feature {feature!r}; expected one of {', '.join(FEATURES)}")
