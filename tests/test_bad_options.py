"""Bad inputs answered up front with one message naming the file or option: k-means models and feature
shards that do not fit each other, a transformers folder whose config.json lies, out-of-range task options."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))


def _run(args, cwd=None, timeout=300):
    proc = subprocess.run([sys.executable, "-m", *map(str, args)], env=ENV, capture_output=True, text=True,
                          timeout=timeout, cwd=cwd)
    return proc.returncode, proc.stdout + proc.stderr


# ---- stage 2/3: k-means model and feature shards -----------------------------------------------

def _shard(feat_dir, dim, lengths=(30, 20), split="train", seed=0):
    os.makedirs(feat_dir, exist_ok=True)
    feats = np.random.default_rng(seed).standard_normal((sum(lengths), dim)).astype(np.float32)
    np.save(os.path.join(feat_dir, f"{split}_0_1.npy"), feats)
    with open(os.path.join(feat_dir, f"{split}_0_1.len"), "w") as f:
        f.write("".join(f"{n}\n" for n in lengths))
    return feats


def _learn(feat_dir, km_path, k=3):
    from pahubert_plugin.clustering import kmeans

    assert kmeans.main(["learn", str(feat_dir), "train", "1", str(km_path), str(k), "--n_init", "1",
                        "--batch_size", "20"]) == 0


def test_learn_writes_a_loadable_model_atomically(tmp_path, monkeypatch):
    import joblib

    from pahubert_plugin.clustering import kmeans

    feats = _shard(tmp_path / "feat", 5)
    km = tmp_path / "km" / "m.km"
    km.parent.mkdir()
    _learn(tmp_path / "feat", km)
    model = kmeans.load_kmeans(km)
    assert model.cluster_centers_.shape == (3, 5)
    assert kmeans.apply_kmeans(km)(feats).shape == (50,)
    before = km.read_bytes()

    def dies_half_way(value, f, *a, **k):  # a kill in the middle of the dump
        f.write(b"\x80\x04partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(joblib, "dump", dies_half_way)
    with pytest.raises(KeyboardInterrupt):
        _learn(tmp_path / "feat", km)
    assert km.read_bytes() == before and os.listdir(km.parent) == ["m.km"]


def test_recipe_learns_kmeans_through_the_atomic_writer():
    text = open(os.path.join(REPO, "recipes", "pahubert", "run.sh")).read()
    assert "-m pahubert_plugin.clustering.kmeans learn" in text
    assert "learn_kmeans.py" not in text.split("kmeans() {")[1].split("}")[0]


def test_labels_with_a_model_of_another_dimension(tmp_path):
    _shard(tmp_path / "feat5", 5)
    _learn(tmp_path / "feat5", tmp_path / "m.km")
    _shard(tmp_path / "feat", 7)
    lab = tmp_path / "lab"
    lab.mkdir()
    (lab / "train_0_1.km").write_text("stale\n")
    rc, out = _run(["pahubert_plugin.clustering.kmeans", tmp_path / "feat", "train", tmp_path / "m.km", 1, 0, lab])
    assert rc == 2, out
    assert f"{tmp_path / 'feat' / 'train_0_1.npy'} holds features of dimension 7" in out, out
    assert f"k-means model {tmp_path / 'm.km'} has centroids of dimension 5" in out, out
    assert "matmul" not in out and "Traceback" not in out, out
    assert os.listdir(lab) == [], "no label shard (neither a stale one nor an empty one) after a failure"


def test_labels_shard_lengths_must_add_up(tmp_path):
    from pahubert_plugin.clustering.kmeans import dump_label

    _shard(tmp_path / "feat", 5)
    _learn(tmp_path / "feat", tmp_path / "m.km")
    (tmp_path / "feat" / "train_0_1.len").write_text("30\n30\n")
    with pytest.raises(ValueError, match=r"train_0_1\.len adds up to 60 frames in 2 files, but .*train_0_1\.npy has 50"):
        dump_label(str(tmp_path / "feat"), "train", str(tmp_path / "m.km"), 1, 0, str(tmp_path / "lab"))
    assert not (tmp_path / "lab" / "train_0_1.km").exists()


def test_labels_written_whole(tmp_path):
    """The good case still writes fairseq's output (one line of labels per file), and nothing else."""
    from pahubert_plugin.clustering.kmeans import dump_label

    _shard(tmp_path / "feat", 5)
    _learn(tmp_path / "feat", tmp_path / "m.km")
    dump_label(str(tmp_path / "feat"), "train", str(tmp_path / "m.km"), 1, 0, str(tmp_path / "lab"))
    lines = (tmp_path / "lab" / "train_0_1.km").read_text().splitlines()
    assert [len(line.split()) for line in lines] == [30, 20]
    assert os.listdir(tmp_path / "lab") == ["train_0_1.km"]


def test_truncated_kmeans_model_is_named_wherever_it_is_cut(tmp_path):
    from pahubert_plugin.clustering.kmeans import load_kmeans

    _shard(tmp_path / "feat", 5)
    _learn(tmp_path / "feat", tmp_path / "m.km")
    data = (tmp_path / "m.km").read_bytes()
    cut = tmp_path / "cut.km"
    for n in sorted({0, 1, 2, 10, 50, 100, 200, 400, 800, len(data) // 2, len(data) - 50, len(data) - 1}):
        if n >= len(data):
            continue
        cut.write_bytes(data[:n])
        with pytest.raises(ValueError) as e:
            load_kmeans(cut)
        assert str(cut) in str(e.value), (n, str(e.value))
    rc, out = _run(["pahubert_plugin.clustering.kmeans", tmp_path / "feat", "train", cut, 1, 0, tmp_path / "lab"])
    assert rc == 2 and str(cut) in out and "Traceback" not in out, out


# ---- pahubert-port-hubert: config.json against the tensors ------------------------------------

def _hf_folder(path):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.HubertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                                    num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=4,
                                    conv_dim=(32, 32), conv_stride=(5, 2), conv_kernel=(10, 3))
    transformers.HubertModel(cfg).save_pretrained(str(path))
    return path


@pytest.fixture(scope="module")
def hf_source(tmp_path_factory):
    return _hf_folder(tmp_path_factory.mktemp("hf") / "hubert")


def _variant(src, dst, **changes):
    import shutil

    shutil.copytree(src, dst)
    config = json.loads((dst / "config.json").read_text())
    config.update(changes)
    (dst / "config.json").write_text(json.dumps(config))
    return dst


@pytest.mark.parametrize("changes,message", [
    ({"hidden_size": 10 ** 9}, r"hidden_size=1000000000 does not fit the tensors: encoder\.layers\.0\.self_attn\.q_proj"),
    ({"num_attention_heads": 0}, r"num_attention_heads must be a positive integer, found 0"),
    ({"num_attention_heads": 3}, r"hidden_size=32 is not a multiple of num_attention_heads=3"),
    ({"intermediate_size": 65}, r"intermediate_size=65 does not fit the tensors"),
    ({"num_conv_pos_embeddings": 7}, r"num_conv_pos_embeddings=7 does not fit the tensors"),
    ({"hidden_size": "32"}, r"hidden_size must be a positive integer, found '32'"),
])
def test_config_json_is_checked_against_the_tensor_shapes(hf_source, tmp_path, changes, message):
    from pahubert_plugin import port_hubert

    folder = _variant(hf_source, tmp_path / "hf", **changes)
    with pytest.raises(ValueError, match=rf"{folder / 'config.json'}: {message}"):
        port_hubert.port(str(folder), "pahubert")


def test_config_checked_before_the_tensors_are_loaded(hf_source, tmp_path, monkeypatch):
    """The shapes come from the safetensors header: a config that lies is refused without reading the weights."""
    import safetensors.torch

    from pahubert_plugin import port_hubert

    folder = _variant(hf_source, tmp_path / "hf", hidden_size=10 ** 9)
    monkeypatch.setattr(safetensors.torch, "load_file", lambda *a, **k: pytest.fail("tensors loaded"))
    with pytest.raises(ValueError, match="hidden_size=1000000000 does not fit"):
        port_hubert.port(str(folder), "pahubert")


def test_bad_json_and_bad_safetensors_name_the_file(hf_source, tmp_path):
    import shutil

    folder = tmp_path / "hf"
    shutil.copytree(hf_source, folder)
    (folder / "config.json").write_text('{"model_type": "hubert", "hidden_size": 32,')
    rc, out = _run(["pahubert_plugin.port_hubert", folder, tmp_path / "o.pt", "--target", "pahubert"])
    assert rc == 2 and f"{folder / 'config.json'}: not valid JSON" in out and "Traceback" not in out, out
    shutil.copy(hf_source / "config.json", folder / "config.json")
    data = (folder / "model.safetensors").read_bytes()
    for name, junk in (("garbage", b"\xff" * 64), ("cut", data[: len(data) // 2]), ("header", data[:6])):
        (folder / "model.safetensors").write_bytes(junk)
        rc, out = _run(["pahubert_plugin.port_hubert", folder, tmp_path / "o.pt", "--target", "pahubert"])
        assert rc == 2 and f"{folder / 'model.safetensors'}: not a readable safetensors file" in out, (name, out)
        assert "Traceback" not in out, (name, out)
    assert not (tmp_path / "o.pt").exists()


def test_fairseq_source_options_are_checked_against_its_tensors(tmp_path):
    from pahubert_plugin.port_hubert import load_speech_hubert

    weights = {"encoder.layers.0.self_attn.q_proj.weight": torch.zeros(32, 32), "encoder.layers.0.fc1.weight":
               torch.zeros(64, 32), "mask_emb": torch.zeros(32)}
    model = {"_name": "hubert", "encoder_embed_dim": 10 ** 9, "encoder_ffn_embed_dim": 64,
             "encoder_attention_heads": 2}
    torch.save({"cfg": {"model": model, "task": {"sample_rate": 16000}}, "model": weights}, tmp_path / "s.pt")
    with pytest.raises(ValueError, match=rf"{tmp_path / 's.pt'}: cfg.model.encoder_embed_dim=1000000000 does not fit"):
        load_speech_hubert(str(tmp_path / "s.pt"))
    model.update(encoder_embed_dim=32, encoder_attention_heads=0)
    torch.save({"cfg": {"model": model, "task": {"sample_rate": 16000}}, "model": weights}, tmp_path / "s.pt")
    with pytest.raises(ValueError, match=r"cfg.model.encoder_attention_heads must be a positive integer, found 0"):
        load_speech_hubert(str(tmp_path / "s.pt"))


# ---- task options -----------------------------------------------------------------------------

def _separation_cfg(**values):
    from omegaconf import OmegaConf

    from pahubert_plugin.tasks.music_separation import MusicSeparationConfig

    cfg = OmegaConf.structured(MusicSeparationConfig(data="/nowhere", seed=1))
    for k, v in values.items():
        cfg[k] = v
    return cfg


@pytest.mark.parametrize("option,value", [
    ("segment", 0.0), ("segment", -1.0), ("sample_rate", 0), ("sample_rate", -44100), ("audio_channels", 0),
    ("samples_per_track", 0), ("valid_overlap", 1.0), ("valid_overlap", -0.1), ("valid_segment", -1.0),
    ("valid_seconds", -2.0), ("valid_chunk_batch", 0), ("gain_min", -0.5), ("train_tracks", -1),
])
def test_separation_task_names_the_bad_option(option, value):
    from pahubert_plugin.tasks.music_separation import MusicSeparationTask

    with pytest.raises(ValueError, match=rf"^task\.{option}={value}: must be "):
        MusicSeparationTask.setup_task(_separation_cfg(**{option: value}))


def test_separation_task_gain_range():
    from pahubert_plugin.tasks.music_separation import MusicSeparationTask

    with pytest.raises(ValueError, match=r"task\.gain_max=0\.5: must be >= task\.gain_min=1\.0"):
        MusicSeparationTask.setup_task(_separation_cfg(gain_min=1.0, gain_max=0.5))
    MusicSeparationTask.setup_task(_separation_cfg(gain_min=1.0, gain_max=1.0))  # equal: no augmentation gain


@pytest.mark.parametrize("option,value", [
    ("sample_rate", 0), ("audio_channels", 0), ("label_rate", 0.0), ("label_rate", -100.0),
    ("max_sample_size", 0), ("min_sample_size", -1), ("label_tolerance", -1),
])
def test_pretraining_task_names_the_bad_option(tmp_path, option, value):
    from omegaconf import OmegaConf

    from pahubert_plugin.tasks.pahubert_pretraining import PahubertPretrainingConfig, PahubertPretrainingTask

    cfg = OmegaConf.structured(PahubertPretrainingConfig(data=str(tmp_path), label_dir=str(tmp_path), seed=1))
    cfg[option] = value
    with pytest.raises(ValueError, match=rf"^task\.{option}={value}: must be "):
        PahubertPretrainingTask.setup_task(cfg)


def test_segment_zero_in_fine_tuning_names_the_option(tmp_path):
    """fairseq-hydra-train with task.segment=0: the option is named, no stem file is blamed."""
    from conftest import write_musdb

    from helpers import MUSDB_CONF, PLUGIN_DIR

    write_musdb(tmp_path / "musdb", tracks=2, seconds=1.0)
    rc, out = _run(["fairseq_cli.hydra_train", "--config-dir", MUSDB_CONF, "--config-name", "tiny",
                    f"task.data={tmp_path / 'musdb'}", f"common.user_dir={PLUGIN_DIR}", "task.segment=0",
                    f"checkpoint.save_dir={tmp_path / 'ckpt'}", f"hydra.run.dir={tmp_path / 'ckpt'}",
                    "optimization.max_update=1", "task.num_valid_tracks=1"], cwd=tmp_path)
    assert rc != 0
    assert "task.segment=0.0: must be > 0 seconds" in out, out[-3000:]
    assert "cannot read" not in out, out[-3000:]
