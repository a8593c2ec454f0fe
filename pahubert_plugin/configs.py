"""Reading a recipe YAML outside hydra (port_hubert, benchmarks, tests): its ``defaults`` included.

The recipe configs of one family keep what they share in ``<conf>/_shared/<family>.yaml`` and list it
after ``_self_`` in ``defaults`` (fairseq-hydra-train composes them). :func:`load_recipe_config` does
the same composition for code that reads a config file directly: entries are merged in order, each
later one over the earlier ones, ``_self_`` standing for the file itself.
"""
import os

from omegaconf import DictConfig, OmegaConf


def load_recipe_config(path) -> DictConfig:
    """The composed content of the recipe config at ``path`` (no schema, no command-line overrides)."""
    path = os.fspath(path)
    cfg = OmegaConf.load(path)
    defaults = cfg.pop("defaults", None) if isinstance(cfg, DictConfig) else None
    if not defaults:
        return cfg
    parts = []
    for entry in defaults:
        if entry == "_self_":
            parts.append(cfg)
        elif isinstance(entry, str):
            parts.append(load_recipe_config(os.path.join(os.path.dirname(path), entry.lstrip("/") + ".yaml")))
        else:
            raise ValueError(f"{path}: defaults entry {entry!r} is not a plain config name (only those are read here)")
    if "_self_" not in defaults:
        parts.insert(0, cfg)
    return OmegaConf.merge(*parts)
