"""pahubert: Pac-HuBERT self-supervised music source separation as a fairseq user dir.

``import pahubert_plugin`` (or ``common.user_dir=/path/to/pahubert_plugin``) registers
every task, model and criterion of the package and allow-lists fairseq's checkpoint
classes for torch's ``weights_only`` loader.
"""
from . import checkpoint

checkpoint.register_safe_globals()

from . import criterions, models, tasks  # noqa: E402,F401  (registration side effects)

__version__ = "0.1.0"
