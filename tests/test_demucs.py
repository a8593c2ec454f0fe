"""Demucs V2 and Demucs V2 + HuBERT: shapes for any length, presets, and real fairseq runs.

The fairseq runs (pretraining with pahubert_pretraining, fine-tuning with music_separation)
use the tiny recipe configs on audio written here.
"""
import re

import numpy as np
import pytest
import torch
from fairseq.models import MODEL_REGISTRY
from omegaconf import OmegaConf

import pahubert_plugin
from pahubert_plugin import frames
from pahubert_plugin.checkpoint import load_checkpoint
from pahubert_plugin.models.demucs import DEMUCS_PRESETS, DemucsV2
from pahubert_plugin.models.demucs_v2 import DemucsV2Config, DemucsV2Model
from pahubert_plugin.models.demucs_hubert import DemucsHubertModel
from pahubert_plugin.models.demucs_v2_hubert import DemucsV2HubertConfig, DemucsV2HubertModel
from pahubert_plugin.tasks.music_separation import MusicSeparationConfig, MusicSeparationTask
from helpers import PLUGIN_DIR, REPO, SOURCES, SR, finetune_args, run_fairseq, separation_weights, updates_done, valid_sdrs
from pahubert_plugin.configs import load_recipe_config

MUSDB_CONF = REPO / "recipes" / "musdb" / "conf"
PRETRAIN_CONF = REPO / "recipes" / "pahubert" / "conf" / "pretrain"


def separation_task(sample_rate=SR, channels=2):
    cfg = OmegaConf.structured(MusicSeparationConfig)
    cfg.data, cfg.seed, cfg.sample_rate, cfg.audio_channels = "unused", 1, sample_rate, channels
    return MusicSeparationTask(cfg)


def recipe_model_cfg(dataclass, name):
    """The ``model:`` section of a recipe YAML merged over its dataclass."""
    return OmegaConf.merge(OmegaConf.structured(dataclass), load_recipe_config(MUSDB_CONF / name).model)


def test_registry_holds_our_classes():
    assert MODEL_REGISTRY["demucs_v2"] is DemucsV2Model
    assert MODEL_REGISTRY["demucs_v2_hubert"] is DemucsV2HubertModel
    assert MODEL_REGISTRY["demucs_hubert"] is DemucsHubertModel


@pytest.mark.parametrize("length", [1, 7, 4095, 16001])
@pytest.mark.parametrize("channels", [1, 2])
def test_demucs_v2_any_length(length, channels):
    model = DemucsV2(SOURCES, audio_channels=channels, **DEMUCS_PRESETS["tiny"]).eval()
    mixture = torch.randn(2, channels, length)
    with torch.no_grad():
        out = model(mixture)
    assert out.shape == (2, len(SOURCES), channels, length)
    assert torch.isfinite(out).all()


def test_demucs_v2_base_matches_the_paper_size():
    with torch.device("meta"):
        model = DemucsV2(SOURCES, rescale=0.0, **{**DEMUCS_PRESETS["base"]})
    count = sum(p.numel() for p in model.parameters())
    assert 260e6 < count < 272e6, count  # Défossez et al.: ~266 M
    assert model.encoder.out_channels == 2048 and model.encoder.hop == 2048


def test_encoder_steps_and_skip_shapes():
    """Every layer divides the (upsampled, padded) length by the stride exactly."""
    model = DemucsV2(SOURCES, **DEMUCS_PRESETS["tiny"])
    assert model.encoder.num_steps(3000) == 6 and model.encoder.num_steps(3073) == 7
    x, skips, ctx = model.encoder(torch.randn(1, 2, 3000))
    assert ctx.padded == 6 * 4 ** 5 and ctx.length == 3000
    assert [s.shape[-1] for s in skips] == [6 * 4 ** (4 - i) for i in range(5)]
    assert [s.shape[1] for s in skips] == [8, 16, 32, 64, 128] and x.shape == (1, 128, 6)


def test_wrong_channel_count_is_a_clear_error():
    model = DemucsV2(SOURCES, audio_channels=2, **DEMUCS_PRESETS["tiny"])
    with pytest.raises(ValueError, match=r"\(batch, 2, samples\)"):
        model(torch.randn(1, 1, 1000))


def test_fairseq_demucs_v2_from_recipe():
    model = DemucsV2Model.build_model(recipe_model_cfg(DemucsV2Config, "demucs_v2_tiny.yaml"), separation_task())
    assert model.sources == SOURCES and model.sample_rate == SR and model.audio_channels == 2
    assert model(mixture=torch.randn(1, 2, 5555)).shape == (1, 4, 2, 5555)


@pytest.mark.parametrize("length", [1, 513, 16001])
def test_demucs_v2_hubert_separates_any_length(length):
    cfg = recipe_model_cfg(DemucsV2HubertConfig, "demucs_v2_hubert_tiny.yaml")
    model = DemucsV2HubertModel.build_model(cfg, separation_task()).eval()
    with torch.no_grad():
        out = model(mixture=torch.randn(2, 2, length))
    assert out.shape == (2, 4, 2, length)
    assert not hasattr(model, "head")  # the separator has no pretraining modules


def test_demucs_v2_hubert_encoder_tokens_masks_and_padding():
    cfg = recipe_model_cfg(DemucsV2HubertConfig, "demucs_v2_hubert_tiny.yaml")
    cfg.mask_length = 2  # the padded example keeps only 10 tokens
    model = DemucsHubertModel(cfg, 2, SR, [10])
    hop = model.encoder.hop
    assert hop == 512  # 4**5 / 2 input samples per token
    source = torch.randn(2, 2, 16000)
    padding = torch.zeros(2, 16000, dtype=torch.bool)
    padding[1, 5000:] = True
    out = model.encoder(source, padding_mask=padding, mask=True)
    tokens = -(-16000 // 512)
    assert out.features.shape == (2, tokens, 64)
    assert out.padding_mask[0].sum() == 0
    assert out.padding_mask[1].sum() == tokens - (-(-5000 // 512))  # tokens starting past 5000
    assert out.mask_indices.shape == (2, tokens) and out.mask_indices.any()
    feats, pad = model.extract_features(source, output_layer=1)
    assert feats.shape == (2, tokens, 64) and pad is None


def test_separation_task_is_required_for_a_separator():
    cfg = OmegaConf.structured(DemucsV2Config)

    class NotSeparation:
        pass

    with pytest.raises(ValueError, match="music_separation"):
        DemucsV2Model.build_model(cfg, NotSeparation())


# ---------------------------------------------------------------------------------------------
# real fairseq runs

@pytest.mark.slow
def test_demucs_v2_finetunes(corpora, tmp_path):
    data = corpora.write_musdb(tmp_path / "musdb")
    log = run_fairseq(finetune_args("demucs_v2_tiny.yaml", data, tmp_path / "ckpt"), cwd=tmp_path)
    assert updates_done(log) == 3
    valid = valid_sdrs(log)
    assert valid and all(np.isfinite(v) for v in valid), valid  # the validation scored SDR, with a number
    cfg, weights = separation_weights(tmp_path / "ckpt")
    assert cfg["_name"] == "demucs_v2" and any(k.startswith("demucs.bottleneck.lstm") for k in weights)


@pytest.mark.slow
def test_demucs_v2_hubert_pretrains_then_finetunes(corpora, tmp_path):
    corpus = corpora.write_pretrain_corpus(tmp_path / "corpus")
    pre = tmp_path / "pretrain"
    log = run_fairseq([
        "fairseq_cli.hydra_train", "--config-dir", PRETRAIN_CONF, "--config-name", "demucs_hubert_tiny",
        f"common.user_dir={PLUGIN_DIR}", "common.cpu=true", "common.log_interval=1",
        f"task.data={corpus}", f"task.label_dir={corpus}", "task.max_sample_size=24000",
        "task.min_sample_size=8000", "dataset.batch_size=4", "optimization.max_update=3",
        "lr_scheduler.warmup_updates=1", f"checkpoint.save_dir={pre}", f"hydra.run.dir={pre}/hydra",
    ], cwd=tmp_path)
    assert updates_done(log) == 3
    assert re.search(r"\"loss\": \"?\d", log)
    pre_state = load_checkpoint(pre / "checkpoint_last.pt")
    assert pre_state["cfg"]["model"]["_name"] == "demucs_hubert"
    assert any(k.startswith("head.") for k in pre_state["model"])
    assert not any(k.startswith("decoder.") for k in pre_state["model"])
    # the stage-5 reader (HuBERT's extract_features signature) reads it at the 100 Hz frame rule
    from pahubert_plugin.clustering.hubert_reader import HubertFeatureReader

    reader = HubertFeatureReader(str(pre / "checkpoint_last.pt"), layer=1, sample_rate=SR)
    feats = reader.get_feats(corpus / "audio" / "train1.wav")
    assert feats.shape == (frames.num_frames(32037, SR), 64)

    data = corpora.write_musdb(tmp_path / "musdb")
    ft = tmp_path / "finetune"
    log = run_fairseq(finetune_args("demucs_v2_hubert_tiny.yaml", data, ft, 2,
                                    f"model.pretrained_checkpoint={pre / 'checkpoint_last.pt'}",
                                    "optimization.lr=[1e-12]", "model.dropout=0.0",
                                    "model.encoder_layerdrop=0.0"), cwd=tmp_path)
    assert updates_done(log) == 2
    assert re.search(r"loaded \d+ encoder tensors from", log)
    # with a vanishing learning rate the encoder is still the pretrained one
    _, weights = separation_weights(ft)
    for key, value in pre_state["model"].items():
        if key.startswith("encoder."):
            assert torch.allclose(weights[key].float(), value.float(), atol=1e-5), key
    assert any(k.startswith("decoder.") for k in weights)
    # inference rebuilds the fine-tuned model without its pretraining checkpoint
    from pahubert_plugin.separation import Separator

    assert separation_weights(ft)[0]["encoder_cfg"]["encoder_embed_dim"] == 64
    (pre / "checkpoint_last.pt").rename(pre / "moved.pt")
    models = [Separator.from_checkpoint(str(ft / "checkpoint_last.pt")).model]
    assert models[0].eval()(mixture=torch.randn(1, 2, 4321)).shape == (1, 4, 2, 4321)


def test_architecture_comes_from_the_checkpoint_and_foreign_ones_are_refused(tmp_path, caplog):
    cfg = recipe_model_cfg(DemucsV2HubertConfig, "demucs_v2_hubert_tiny.yaml")
    model = DemucsV2HubertModel.build_model(cfg, separation_task())
    good = {"cfg": {"model": {**OmegaConf.to_container(cfg, enum_to_str=True), "_name": "demucs_hubert"},
                    "task": {"audio_channels": 2, "sample_rate": SR}},
            "model": {f"encoder.{k}": v for k, v in model.encoder.state_dict().items()}}
    path = tmp_path / "pre.pt"
    torch.save(good, path)
    loaded = _build_with(path)
    assert torch.equal(loaded.encoder.mask_emb, model.encoder.mask_emb)
    assert loaded.config_updates["encoder_cfg"]["encoder_layers"] == 2  # the task saves it with the model
    with caplog.at_level("INFO"):
        other = _build_with(path, encoder_layers=3, encoder_embed_dim=32)
    assert len(other.encoder.transformer.layers) == 2 and other.encoder.embed_dim == 64
    assert torch.equal(other.encoder.mask_emb, model.encoder.mask_emb)
    assert "encoder_layers=2 (config had 3)" in caplog.text
    scratch = _build_with(path, encoder_layers=3, no_pretrained_weights=True)  # the scratch arm: same network
    assert len(scratch.encoder.transformer.layers) == 2
    assert not torch.equal(scratch.encoder.mask_emb, model.encoder.mask_emb)
    rebuilt = _build_with(tmp_path / "gone.pt", encoder_cfg=dict(loaded.config_updates["encoder_cfg"]),
                          encoder_layers=3)  # a fine-tuned model's saved architecture: the file is not read
    assert len(rebuilt.encoder.transformer.layers) == 2
    foreign = dict(good, cfg={"model": {"_name": "pahubert"}, "task": {}})
    torch.save(foreign, path)
    with pytest.raises(ValueError, match="expected a 'demucs_hubert' pretraining checkpoint"):
        _build_with(path)
    torch.save(good, path)
    with pytest.raises(ValueError, match="task.sample_rate=16000, this task has 44100"):
        _build_with(path, sample_rate=44100)


def test_missing_pretrained_checkpoint_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="gone.pt not found"):
        _build_with(tmp_path / "gone.pt")


def _build_with(path, sample_rate=SR, **overrides):
    cfg = recipe_model_cfg(DemucsV2HubertConfig, "demucs_v2_hubert_tiny.yaml")
    cfg.pretrained_checkpoint = str(path)
    for key, value in overrides.items():
        cfg[key] = value
    return DemucsV2HubertModel.build_model(cfg, separation_task(sample_rate))
