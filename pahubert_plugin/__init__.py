"""pahubert: Pac-HuBERT self-supervised music source separation as a fairseq user dir.

``import pahubert_plugin`` (or ``common.user_dir=/path/to/pahubert_plugin``) registers
every task, model and criterion of the package, allow-lists fairseq's checkpoint
classes for torch's ``weights_only`` loader, and makes fairseq's checkpoint copies atomic and
its resume robust to a truncated checkpoint_last.pt (:func:`checkpoint.install_fairseq_patches`), and guards
a training's folder: one run at a time, resume from the newest intact checkpoint, a finished run left as
it is (:func:`training.install_training_guard`); :func:`register` lives in :mod:`pahubert_plugin.registry`.

The one exception is those of our console scripts that call :func:`register` themselves once
their arguments parse and fairseq is needed, or never need it (:data:`DEFERRING_SCRIPTS`):
importing fairseq takes seconds, and there ``--help`` and argument errors answer at once.
"""
import os as _os
import sys as _sys

from .registry import register

__version__ = "0.1.0"  # the one version string: setup.py reads it from here


# console scripts that register on their own when they need fairseq (dump-features and
# label-quality: when the hubert reader loads a checkpoint), or never do; tests/test_layout.py checks
# this list against setup.py's console_scripts
DEFERRING_SCRIPTS = frozenset({
    "pahubert-separate", "pahubert-evaluate", "pahubert-port-hubert", "pahubert-plot-log",
    "pahubert-manifest", "pahubert-toy-corpus", "pahubert-midi-corpus", "pahubert-speech-corpus",
    "pahubert-check-labels",
    "pahubert-dump-features", "pahubert-label-quality",
})


def _in_deferring_script() -> bool:
    """True when the running program is one of :data:`DEFERRING_SCRIPTS`."""
    return bool(_sys.argv) and _os.path.basename(_sys.argv[0] or "") in DEFERRING_SCRIPTS


if not _in_deferring_script():
    register()
