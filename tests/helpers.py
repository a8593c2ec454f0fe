"""Test utilities shared by several test files: constants, tiny audio, subprocess runs, stock fairseq runs.

The corpora the tests write are in conftest.py (the ``corpora`` fixture)."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import soundfile as sf

import fairseq

REPO = Path(__file__).resolve().parents[1]
PLUGIN_DIR = REPO / "pahubert_plugin"
FAIRSEQ_HUBERT_CONF = Path(fairseq.__file__).parent / "examples" / "hubert" / "config" / "pretrain"

SR = 16000  # the sample rate of most test audio
SOURCES = ["drums", "bass", "other", "vocals"]
# subprocesses see this worktree's package first, on one thread each
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))


def tone(seconds, sr, freq=440.0, channels=1, seed=0, amp=0.3, noise=0.01, detune=0.01, spread=0.0):
    """(samples, channels) float32: a sine of ``amp`` at ``freq``, the same on every channel except that
    channel ``c`` is detuned by ``1 + detune * c``, scaled by ``1 + spread * c`` and gets its own noise of
    standard deviation ``noise`` (seeded by ``seed``). The defaults: a tone plus a little noise."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * sr)) / sr
    chans = []
    for c in range(channels):
        x = amp * np.sin(2 * np.pi * freq * (1 + detune * c) * t)
        if spread:
            x = x * (1 + spread * c)
        if noise:
            x = x + noise * rng.standard_normal(t.size)
        chans.append(x)
    return np.stack(chans, axis=1).astype(np.float32)


def write_tone(path, seconds=1.5, sr=SR, channels=1, freq=220.0, **kw):
    """:func:`tone` written to ``path`` (its folder created); noise-free and louder per channel unless
    ``kw`` says otherwise."""
    kw = {"noise": 0.0, "detune": 0.0, "spread": 0.1, **kw}
    os.makedirs(os.path.dirname(os.fspath(path)), exist_ok=True)
    sf.write(path, tone(seconds, sr, freq=freq, channels=channels, **kw), sr)


def run_python(args, timeout=300, env=None, **kw):
    """``python ARGS`` in a subprocess (env :data:`ENV` plus ``env``): the CompletedProcess, text output
    captured; a failure is the caller's to check."""
    return subprocess.run([sys.executable, *map(str, args)], env=dict(ENV, **(env or {})), capture_output=True,
                          text=True, timeout=timeout, **kw)


def run_module(module, *args, timeout=300, env=None, **kw):
    """``python -m MODULE ARGS`` as :func:`run_python` runs it (console scripts: run through ``-m`` so the
    worktree's package answers)."""
    return run_python(["-m", module, *args], timeout=timeout, env=env, **kw)


def run_fairseq(args, cwd, timeout=600, env=None):
    """Run a fairseq CLI module in a subprocess; on failure show the end of its log."""
    full_env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2"))
    full_env.update(env or {})
    proc = subprocess.run([sys.executable, "-m", *map(str, args)], cwd=cwd, env=full_env,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f"{args[0]} failed ({proc.returncode}):\n{proc.stdout[-6000:]}")
    return proc.stdout


def write_stock_hubert_data(root, num_files=4, seconds=2.0, sr=16000, n_clusters=8, label_rate=50):
    """Manifests + random k-means labels in the layout of fairseq's hubert_pretraining task."""
    root = Path(root)
    (root / "audio").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for split in ("train", "valid"):
        rows, labels = [], []
        for i in range(num_files):
            wav = tone(seconds, sr, freq=200 + 50 * i, seed=i)
            name = f"audio/{split}{i}.wav"
            sf.write(root / name, wav, sr)
            rows.append(f"{name}\t{len(wav)}")
            n = len(wav) * label_rate // sr
            labels.append(" ".join(map(str, rng.integers(0, n_clusters, n))))
        (root / f"{split}.tsv").write_text(f"{root}\n" + "\n".join(rows) + "\n")
        (root / f"{split}.km").write_text("\n".join(labels) + "\n")
    (root / "dict.km.txt").write_text("".join(f"{k} 1\n" for k in range(n_clusters)))
    return root


def stock_hubert_overrides(data_dir, save_dir, max_update, embed_dim=32, layers=2):
    """Shrink fairseq's hubert_base_librispeech.yaml to seconds on a CPU."""
    conv = "[(32,10,5)] + [(32,3,2)] * 4 + [(32,2,2)] * 2"  # stride 320 = 50 Hz at 16 kHz
    return [
        "--config-dir", FAIRSEQ_HUBERT_CONF, "--config-name", "hubert_base_librispeech",
        f"common.user_dir={PLUGIN_DIR}", "common.cpu=true", "common.fp16=false", "common.log_interval=1",
        "common.tensorboard_logdir=null", "common.seed=1",
        f"task.data={data_dir}", f"task.label_dir={data_dir}", "task.labels=[km]", "model.label_rate=50",
        "task.min_sample_size=8000", "task.max_sample_size=32000",
        "dataset.num_workers=0", "dataset.max_tokens=64000", "dataset.validate_interval_updates=0",
        "distributed_training.distributed_world_size=1", "distributed_training.nprocs_per_node=1",
        "distributed_training.ddp_backend=legacy_ddp",
        f"optimization.max_update={max_update}", "lr_scheduler.warmup_updates=1",
        f"checkpoint.save_dir={save_dir}", "checkpoint.save_interval_updates=1",
        f"++model.encoder_layers={layers}", f"++model.encoder_embed_dim={embed_dim}",
        f"++model.encoder_ffn_embed_dim={2 * embed_dim}", "++model.encoder_attention_heads=2",
        "model.final_dim=16", f"model.conv_feature_layers='{conv}'", "++model.conv_pos=16",
        "++model.conv_pos_groups=4", "model.attention_dropout=0.0", "model.encoder_layerdrop=0.0",
        f"hydra.run.dir={save_dir}/hydra",
    ]


def train_stock_hubert(workdir, max_update=2):
    """Train stock fairseq `hubert` for ``max_update`` updates; returns (save_dir, log)."""
    workdir = Path(workdir)
    data = write_stock_hubert_data(workdir / "data")
    save = workdir / "ckpt"
    log = run_fairseq(["fairseq_cli.hydra_train", *stock_hubert_overrides(data, save, max_update)], cwd=workdir)
    return save, log


# ---- fairseq runs of the recipe configs, and what their logs and checkpoints hold ----
PRETRAIN_CONF = REPO / "recipes" / "pahubert" / "conf" / "pretrain"
MUSDB_CONF = REPO / "recipes" / "musdb" / "conf"


def overrides(data, save, max_update, *extra):
    """The tiny config with test-sized crops and batches."""
    return [
        "--config-dir", PRETRAIN_CONF, "--config-name", "tiny",
        f"common.user_dir={PLUGIN_DIR}", "common.cpu=true", "common.log_interval=5",
        f"task.data={data}", f"task.label_dir={data}", "task.max_sample_size=16000",
        "task.min_sample_size=8000", "dataset.batch_size=4", f"optimization.max_update={max_update}",
        "lr_scheduler.warmup_updates=5", "optimization.lr=[0.002]", f"checkpoint.save_dir={save}",
        # validate and save at the end (and every save_interval_updates), not after each tiny epoch
        "dataset.validate_interval=1000", "checkpoint.save_interval=1000",
        f"hydra.run.dir={save}/hydra", *extra,
    ]


def train_records(log):
    """The JSON stats lines of a fairseq log (train_inner and train/valid summaries)."""
    records = []
    for line in log.splitlines():
        m = re.search(r"\]\[(train_inner|train|valid)\]\[INFO\] - (\{.*\})$", line)
        if m:
            records.append((m.group(1), json.loads(m.group(2))))
    return records


def finetune_args(config_name, data, save, max_update=3, *extra):
    return [
        "fairseq_cli.hydra_train", "--config-dir", MUSDB_CONF, "--config-name", config_name,
        f"task.data={data}", f"common.user_dir={PLUGIN_DIR}", f"checkpoint.save_dir={save}",
        f"hydra.run.dir={save}/hydra", f"optimization.max_update={max_update}", "common.log_interval=1",
        "task.samples_per_track=4", "task.valid_seconds=2.0", "task.valid_segment=1.0", *extra,
    ]


def updates_done(log):
    return max(int(m) for m in re.findall(r"num_updates[\"':= ]+(\d+)", log))


def valid_sdrs(log):
    """The SDR of every validation in a fairseq log (simple format: ``valid on 'valid' subset | ... | sdr X |``)."""
    return [float(x) for x in re.findall(r"valid on 'valid' subset .*\| sdr (-?[0-9.]+) \|", log)]


def separation_weights(save):
    from pahubert_plugin.checkpoint import load_checkpoint

    state = load_checkpoint(Path(save) / "checkpoint_last.pt")
    return state["cfg"]["model"], state["model"]


def fairseq_compose(conf_dir, name, overrides=()):
    """What fairseq-hydra-train --config-dir CONF_DIR --config-name NAME OVERRIDES composes, with the
    registered dataclasses' defaults merged in (fairseq's add_defaults): a key missing from the YAML
    (which needs `+`) or unknown to the component fails here as it does there."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from fairseq.dataclass.initialize import add_defaults, hydra_init

    import pahubert_plugin  # noqa: F401  (registers our tasks and models, as common.user_dir does)

    hydra_init(name)  # as fairseq_cli.hydra_train: FairseqConfig stored under the config's name
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=conf_dir, version_base="1.1"):  # as fairseq_cli.hydra_train
        cfg = compose(config_name=name, overrides=list(overrides))
    add_defaults(cfg)
    return cfg


def corpus_songs(root):
    """The song folders of a generated corpus, ``root/musdb/{train,test}/<song>``, in order."""
    for split in ("train", "test"):
        folder = Path(root) / "musdb" / split
        for name in sorted(os.listdir(folder)):
            yield folder / name


def randomise_batchnorm(model, seed=0):
    """BatchNorm running statistics and affine weights as after training (at init they are trivial)."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=gen) * 0.5)
            m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.2)
            m.weight.data.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
            m.bias.data.copy_(torch.randn(m.num_features, generator=gen) * 0.1)
    return model


def check_corpus_layout(corpus, sample_rate, seconds, subtype, sources=("drums", "bass", "other", "vocals")):
    """Both corpus generators' layout: two train and two test songs, two unlabelled mixtures, every
    stem a stereo file of exactly ``seconds`` at ``sample_rate`` in ``subtype``."""
    import soundfile as sf

    assert [p.name for p in corpus_songs(corpus)] == ["train_000", "train_001", "test_000", "test_001"]
    assert sorted(os.listdir(Path(corpus) / "unlabelled")) == ["unlabelled_0000.wav", "unlabelled_0001.wav"]
    for song in corpus_songs(corpus):
        for stem in ("mixture", *sources):
            info = sf.info(str(song / f"{stem}.wav"))
            assert (info.samplerate, info.channels, info.frames, info.subtype) == \
                (sample_rate, 2, int(seconds * sample_rate), subtype), song / stem


def write_bad_label(data, row=2, value="999"):
    """Put label ``value`` into row ``row`` of ``data/train.km`` (a label outside the dictionary); its path."""
    path = os.path.join(data, "train.km")
    with open(path) as f:
        lines = f.read().splitlines()
    labels = lines[row - 1].split()
    labels[len(labels) // 2] = value
    lines[row - 1] = " ".join(labels)
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return path


def assert_one_line_error(proc, *expected):
    """A console script refused its arguments: exit status 2, each of ``expected`` said, no traceback."""
    text = proc.stdout + proc.stderr
    assert proc.returncode == 2, text
    assert "Traceback" not in text, text
    for e in expected:
        assert e in text, text
