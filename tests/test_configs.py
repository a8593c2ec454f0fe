"""Recipe configs: what fairseq-hydra-train composes is what the files and their _shared defaults say,
and a value shared by a family is written once."""
import glob
import os

import pytest
import yaml
from omegaconf import OmegaConf

import pahubert_plugin  # noqa: F401  (registration)
from helpers import REPO, fairseq_compose
from pahubert_plugin.configs import load_recipe_config

CONF_DIRS = [REPO / "recipes" / "musdb" / "conf", REPO / "recipes" / "pahubert" / "conf" / "pretrain"]
CONFIGS = sorted(p for d in CONF_DIRS for p in glob.glob(str(d / "*.yaml")))


def leaves(cfg, prefix=""):
    for key, value in cfg.items():
        if isinstance(value, dict):
            yield from leaves(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


@pytest.mark.parametrize("path", CONFIGS, ids=os.path.basename)
def test_fairseq_composes_what_the_files_say(path):
    composed = OmegaConf.to_container(fairseq_compose(os.path.dirname(path), os.path.basename(path)[:-5]), resolve=False)
    own = OmegaConf.to_container(load_recipe_config(path), resolve=False)
    got = dict(leaves(composed))
    for key, value in leaves(own):
        if key.startswith("hydra.") or value == "???":  # ??? marks a value for the command line
            continue
        if key not in got and f"{key}._name" in got:  # `lr_scheduler: pass_through` names the component
            key = f"{key}._name"
        assert key in got, key
        assert got[key] == value or (isinstance(value, str) and value.startswith("(")), (key, got[key], value)


@pytest.mark.parametrize("path", CONFIGS, ids=os.path.basename)
def test_a_shared_value_is_written_once(path):
    """A config never repeats a key its _shared defaults set (fairseq merges the shared file after the
    config's own content, so a repeated key would be silently overridden)."""
    raw = yaml.safe_load(open(path))
    shared = [d for d in raw.get("defaults", []) if d != "_self_"]
    assert raw.get("defaults", ["_self_"])[0] == "_self_", "list _self_ first"
    mine = {k for k, _ in leaves({k: v for k, v in raw.items() if k != "defaults"})}
    for name in shared:
        theirs = {k for k, _ in leaves(yaml.safe_load(open(os.path.join(os.path.dirname(path), name + ".yaml"))))}
        assert not mine & theirs, (name, sorted(mine & theirs))


PRESETS = sorted(glob.glob(str(REPO / "recipes" / "pahubert" / "conf" / "pretrain" / "preset" / "*.yaml")))


@pytest.mark.parametrize("path", PRESETS, ids=os.path.basename)
def test_a_preset_changes_only_what_it_names(path):
    """`+preset=<name>_<config>` on the command line of <config>.yaml: the composed config is the base
    config's with the preset's keys replaced, and the stem lists still have one entry per block."""
    conf, name = os.path.dirname(os.path.dirname(path)), os.path.basename(path)[:-5]
    base_name = name.rsplit("_", 1)[1]
    plain = dict(leaves(OmegaConf.to_container(fairseq_compose(conf, base_name), resolve=False)))
    with_preset = OmegaConf.to_container(fairseq_compose(conf, base_name, [f"+preset={name}"]), resolve=False)
    named = dict(leaves(OmegaConf.to_container(OmegaConf.load(path))))
    assert named and "preset" not in with_preset  # @package _global_: merged at the top, not nested
    got = dict(leaves(with_preset))
    assert {k for k in got if got[k] != plain.get(k)} == {k for k in named if named[k] != plain[k]}
    assert all(got[k] == v for k, v in named.items())
    m = with_preset["model"]
    assert len(m["stem_time_strides"]) == len(m["stem_channels"]) == len(m["stem_freq_strides"])
