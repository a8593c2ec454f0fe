"""Recipe configs: what fairseq-hydra-train composes is what the files and their _shared defaults say,
and a value shared by a family is written once."""
import glob
import os
import subprocess
import sys

import pytest
import yaml
from omegaconf import OmegaConf

import pahubert_plugin  # noqa: F401  (registration)
from helpers import ENV, REPO, fairseq_compose
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


# ---- every field README and the recipes tell users to set exists in the shipped YAMLs -------

CONF = os.path.join(REPO, "recipes")
FINETUNE_CONFS = sorted(f[:-5] for f in os.listdir(os.path.join(CONF, "musdb", "conf")) if f.endswith(".yaml"))
PRETRAIN_CONFS = sorted(f[:-5] for f in os.listdir(os.path.join(CONF, "pahubert", "conf", "pretrain"))
                        if f.endswith(".yaml"))
# what README, recipes/*/README.md and the recipes' run.sh tell users to write (plain `key=value`)
COMMON = ["common.user_dir=/p/pahubert_plugin", "checkpoint.save_dir=/x/ckpt", "hydra.run.dir=/x/hydra",
          "distributed_training.distributed_world_size=8", "optimization.update_freq=[4]"]
FINETUNE = COMMON + ["task.data=/d/musdb", "task.train_tracks=2", "task.sources=[vocals,noise]",
                     "task.num_valid_tracks=1", "task.is_wav=true"]
PRETRAINED = ["model.pretrained_checkpoint=/x/ported.pt", "model.no_pretrained_weights=true"]
PRETRAIN = COMMON + ["task.data=/d/manifests", "task.label_dir=/d/labels", "task.labels=[km]",
                     "task.sample_rate=16000", "task.label_rate=100", "model.label_rate=100"]


@pytest.mark.parametrize("name", FINETUNE_CONFS)
def test_finetuning_overrides_compose_against_shipped_yaml(name):
    extra = PRETRAINED if name.startswith(("pahubert", "demucs_v2_hubert")) else []
    cfg = fairseq_compose(os.path.join(CONF, "musdb", "conf"), name, FINETUNE + extra)
    assert cfg.task.train_tracks == 2 and list(cfg.task.sources) == ["vocals", "noise"]
    if extra:
        assert cfg.model.pretrained_checkpoint == "/x/ported.pt" and cfg.model.no_pretrained_weights


@pytest.mark.parametrize("name", PRETRAIN_CONFS)
def test_pretraining_overrides_compose_against_shipped_yaml(name):
    extra = PRETRAINED[:1] if name.startswith("demucs_hubert") else []
    cfg = fairseq_compose(os.path.join(CONF, "pahubert", "conf", "pretrain"), name, PRETRAIN + extra)
    assert cfg.task.label_dir == "/d/labels" and cfg.distributed_training.distributed_world_size == 8
    if extra:
        assert cfg.model.pretrained_checkpoint == "/x/ported.pt"


DOCS = ["README.md", "docs/ARCHITECTURE.md", "docs/RESULTS.md", "docs/PERFORMANCE.md", "docs/DEVELOPMENT.md",
        "recipes/pahubert/README.md", "recipes/musdb/README.md"]


def _readme_commands(name="README.md"):
    """The fairseq-hydra-train commands of a markdown file's code blocks, continuation lines joined."""
    import shlex

    with open(os.path.join(REPO, name)) as f:
        text = f.read().replace("\\\n", " ")
    return [shlex.split(line.strip().replace("$PWD", str(REPO))) for line in text.splitlines()
            if line.strip().startswith("fairseq-hydra-train ")]


def test_readme_fairseq_hydra_train_commands_compose():
    """Every fairseq-hydra-train command README, docs/ and the recipe READMEs show composes against the
    shipped YAMLs (a renamed or removed field fails here, not in a user's shell)."""
    assert len(_readme_commands()) >= 3  # README shows pretraining, fine-tuning and a speech fine-tuning
    commands = [argv for name in DOCS for argv in _readme_commands(name)]
    for argv in commands:
        conf_dir = os.path.join(REPO, argv[argv.index("--config-dir") + 1])
        name = argv[argv.index("--config-name") + 1]
        overrides = [a for i, a in enumerate(argv[1:], 1) if not a.startswith("--") and not argv[i - 1].startswith("--")]
        cfg = fairseq_compose(conf_dir, name, overrides)
        assert cfg.common.user_dir.endswith("pahubert_plugin"), argv
        # a field left at ??? stops fairseq-hydra-train at once (MissingMandatoryValue): the command sets it
        assert not OmegaConf.missing_keys(cfg), (argv, sorted(OmegaConf.missing_keys(cfg)))


def test_musdb_recipe_asks_the_config_whether_it_needs_a_pretrained_checkpoint(tmp_path):
    """recipes/musdb/run.sh reads model.pretrained_checkpoint from the config (??? = required), not the
    config's name: pahubert_tiny stops at once without --pretrained, naming the fix."""
    (tmp_path / "musdb").mkdir()
    for config, stops in (("pahubert_tiny", True), ("demucs_v2_hubert_tiny", False)):
        proc = subprocess.run(["bash", os.path.join(REPO, "recipes", "musdb", "run.sh"), "--musdb-root",
                               str(tmp_path / "musdb"), "--exp-dir", str(tmp_path / config), "--config", config,
                               "--stage", "1", "--stop-stage", "1", "--", "optimization.max_update=0"],
                              env=dict(ENV, PYTHON=sys.executable), capture_output=True, text=True, timeout=300)
        assert ("needs --pretrained CKPT" in proc.stderr) == stops, (config, proc.stderr[-2000:])
        if stops:
            assert proc.returncode == 1
