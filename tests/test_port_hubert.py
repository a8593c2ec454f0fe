"""Porting a speech HuBERT checkpoint trained here by STOCK fairseq (`hubert` model, task and
criterion) into demucs_v2_hubert and pahubert, then fine-tuning the ported model."""
import re

import pytest
import torch

import pahubert_plugin
from pahubert_plugin import port_hubert
from pahubert_plugin.checkpoint import load_checkpoint, load_encoder_weights
from helpers import REPO, finetune_args, run_fairseq, separation_weights, train_stock_hubert, updates_done

PRETRAIN_CONF = REPO / "recipes" / "pahubert" / "conf" / "pretrain"
TINY = PRETRAIN_CONF / "demucs_hubert_tiny.yaml"
# the stock test model (tests/helpers.py): 2 layers, width 32, FFN 64, 2 heads, conv_pos 16 / 4 groups
SPEECH_SHAPE = ["model.encoder_layers=2", "model.encoder_embed_dim=32", "model.encoder_ffn_embed_dim=64",
                "model.encoder_attention_heads=2", "model.conv_pos=16", "model.conv_pos_groups=4"]


@pytest.fixture(scope="module")
def speech_ckpt(tmp_path_factory):
    """Stock fairseq HuBERT, 2 updates on 16 kHz mono audio with random 50 Hz labels."""
    save, log = train_stock_hubert(tmp_path_factory.mktemp("speech"), max_update=2)
    state = load_checkpoint(save / "checkpoint_last.pt")
    assert state["cfg"]["model"]["_name"] == "hubert" and state["cfg"]["task"]["_name"] == "hubert_pretraining"
    return save / "checkpoint_last.pt"


def run_port(capsys, speech, out, *args):
    assert port_hubert.main([str(speech), str(out), *map(str, args)]) == 0
    return capsys.readouterr().out


def test_port_into_demucs_v2_hubert_copies_exactly(speech_ckpt, tmp_path, capsys):
    out = tmp_path / "ported.pt"
    table = run_port(capsys, speech_ckpt, out, "--target", "demucs_hubert", "--config", TINY)
    speech = load_checkpoint(speech_ckpt)["model"]
    ported = load_checkpoint(out)
    copied = ported["port"]["copied"]
    # 2 layers x 16 tensors, pos conv (bias, g, v), final layer norm (2), mask embedding
    assert len(copied) == 2 * 16 + 3 + 2 + 1
    for name in copied:
        src = "mask_emb" if name == "encoder.mask_emb" else "encoder." + name[len("encoder.transformer."):]
        assert torch.equal(ported["model"][name], speech[src]), name
    new = ported["port"]["new"]
    assert "encoder.post_extract_proj.weight" in new and "encoder.layer_norm.weight" in new
    assert any(n.startswith("encoder.front_end.demucs.") for n in new) and not ported["port"]["reshaped"]
    assert not any(n.startswith("encoder.transformer.") for n in new)
    # the printed table names every tensor and the totals
    assert "encoder.transformer.layers.1.fc2.weight" in table and re.search(r"copied:\s+38 tensors", table)
    assert "dropped" in table and "feature_extractor" in table
    # the ported config keeps the recipe's Demucs geometry and the speech transformer's shape
    model_cfg, task_cfg = ported["cfg"]["model"], ported["cfg"]["task"]
    assert (model_cfg["_name"], model_cfg["channels"], model_cfg["depth"]) == ("demucs_hubert", 8, 5)
    assert (model_cfg["encoder_embed_dim"], model_cfg["encoder_layers"], model_cfg["conv_pos"]) == (32, 2, 16)
    assert task_cfg["sample_rate"] == 16000 and task_cfg["audio_channels"] == 2


def test_port_reshapes_positional_conv_and_keeps_first_layers(speech_ckpt, tmp_path, capsys):
    out = tmp_path / "ported.pt"
    run_port(capsys, speech_ckpt, out, "--target", "demucs_hubert", "--config", TINY,
             "--conv-pos", 8, "--num-layers", 1, "--quiet")
    speech = load_checkpoint(speech_ckpt)["model"]
    ported = load_checkpoint(out)
    assert sorted(ported["port"]["reshaped"]) == ["encoder.transformer.pos_conv.0.weight_g",
                                                  "encoder.transformer.pos_conv.0.weight_v"]
    v = ported["model"]["encoder.transformer.pos_conv.0.weight_v"]
    assert v.shape[-1] == 8 and torch.equal(v, speech["encoder.pos_conv.0.weight_v"][..., 4:12])
    assert not any("transformer.layers.1." in k for k in ported["model"])
    assert ported["cfg"]["model"]["encoder_layers"] == 1


def test_port_into_pahubert_copies_exactly(speech_ckpt, tmp_path, capsys):
    out = tmp_path / "ported_pahubert.pt"
    run_port(capsys, speech_ckpt, out, "--target", "pahubert", "--config", PRETRAIN_CONF / "tiny.yaml", "--quiet")
    speech = load_checkpoint(speech_ckpt)["model"]
    ported = load_checkpoint(out)
    assert ported["cfg"]["model"]["_name"] == "pahubert" and len(ported["port"]["copied"]) == 38
    for name in ported["port"]["copied"]:
        src = "mask_emb" if name.endswith("mask_emb") else "encoder." + name.split(".transformer.", 1)[1]
        assert torch.equal(ported["model"][name], speech[src]), name
    # the pretraining engineer's encoder rebuilds from the ported cfg and takes every tensor
    from pahubert_plugin.models.pahubert import PahubertEncoder, encoder_config

    encoder = PahubertEncoder(encoder_config(ported["cfg"]))
    encoder.load_state_dict({k[len("encoder."):]: v for k, v in ported["model"].items()}, strict=True)


def test_tensors_the_port_created_start_from_each_run_seed(speech_ckpt, tmp_path, capsys):
    """Fine-tuning a ported checkpoint copies the speech tensors; the Demucs the port built around them
    (``port.new``) is drawn from each run's own seed, as in the scratch arm, not fixed when the port ran."""
    out = tmp_path / "ported.pt"
    run_port(capsys, speech_ckpt, out, "--target", "demucs_hubert", "--config", TINY, "--quiet")
    state = load_checkpoint(out)
    port = state["port"]
    runs = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        holder = torch.nn.Module()
        holder.encoder, _ = port_hubert.build_encoder("demucs_hubert", state["cfg"]["model"], state["cfg"]["task"])
        init = {k: v.clone() for k, v in holder.encoder.state_dict().items()}
        assert load_encoder_weights(holder, state, str(out)) == len(port["copied"]) + len(port["reshaped"])
        runs.append((holder.encoder.state_dict(), init))
    (one, init_one), (two, _) = runs
    for name in port["copied"]:
        key = name[len("encoder."):]
        assert torch.equal(one[key], state["model"][name]) and torch.equal(two[key], state["model"][name]), key
    new = [name[len("encoder."):] for name in port["new"]]
    assert all(torch.equal(one[k], init_one[k]) for k in new)
    demucs = [k for k in new if k.startswith("front_end.demucs.") and k.endswith(".weight")]
    assert demucs and not any(torch.equal(one[k], two[k]) for k in demucs)


def test_not_a_hubert_checkpoint_is_refused(tmp_path):
    path = tmp_path / "other.pt"
    torch.save({"cfg": {"model": {"_name": "wav2vec"}}, "model": {"w": torch.zeros(2)}}, path)
    with pytest.raises(ValueError, match="expected a fairseq speech HuBERT checkpoint"):
        port_hubert.port(str(path), "demucs_hubert")


def test_config_for_another_model_is_refused(speech_ckpt, tmp_path):
    with pytest.raises(ValueError, match="configures model 'pahubert', not the --target demucs_hubert"):
        port_hubert.port(str(speech_ckpt), "demucs_hubert", str(PRETRAIN_CONF / "tiny.yaml"))


def finetune_ported(corpora, ported, tmp_path):
    """Two fine-tuning updates of demucs_v2_hubert_tiny from ``ported`` (lr ~0: weights stay put);
    -> the fine-tuned checkpoint's (cfg, weights)."""
    data = corpora.write_musdb(tmp_path / "musdb")
    save = tmp_path / "ft"
    log = run_fairseq(finetune_args("demucs_v2_hubert_tiny.yaml", data, save, 2, *SPEECH_SHAPE,
                                    f"model.pretrained_checkpoint={ported}", "optimization.lr=[1e-12]"),
                      cwd=tmp_path)
    assert updates_done(log) == 2
    assert re.search(r"loaded \d+ encoder tensors from .*ported\.pt", log)
    return separation_weights(save)


@pytest.mark.slow
def test_ported_model_finetunes(speech_ckpt, tmp_path, capsys, corpora):
    ported = tmp_path / "ported.pt"
    run_port(capsys, speech_ckpt, ported, "--target", "demucs_hubert", "--config", TINY, "--quiet")
    cfg, weights = finetune_ported(corpora, ported, tmp_path)
    source = load_checkpoint(ported)["model"]
    for key in ("encoder.transformer.layers.0.fc1.weight", "encoder.mask_emb"):
        assert torch.allclose(weights[key].float(), source[key], atol=1e-5), key


# ---------------------------------------------------------------------------------------------
# Hugging Face transformers folders (HubertModel, Wav2Vec2Model, MERT), built here at random

HF_SHAPE = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=4,
                conv_dim=(32, 32), conv_stride=(5, 2), conv_kernel=(10, 3))  # the stock test model's transformer


def hf_folder(path, kind="hubert", binary=False, **config):
    """save_pretrained of a tiny random transformers model; ``binary`` writes pytorch_model.bin instead."""
    transformers = pytest.importorskip("transformers")
    cfg_cls, model_cls = {"hubert": (transformers.HubertConfig, transformers.HubertModel),
                          "wav2vec2": (transformers.Wav2Vec2Config, transformers.Wav2Vec2Model)}[kind]
    torch.manual_seed(0)
    model = model_cls(cfg_cls(**{**HF_SHAPE, **config}))
    if binary:
        path.mkdir(parents=True)
        model.config.to_json_file(str(path / "config.json"))
        torch.save(model.state_dict(), path / "pytorch_model.bin")
    else:
        model.save_pretrained(str(path))
    return path, {k: v.detach().clone() for k, v in model.state_dict().items()}


def _hf_name(fairseq_name):
    """The transformers name a ported encoder.transformer.* / encoder.mask_emb tensor came from."""
    if fairseq_name == "encoder.mask_emb":
        return "masked_spec_embed"
    name = fairseq_name[len("encoder.transformer."):]
    for fs, hf in (("self_attn_layer_norm", "layer_norm"), ("self_attn.", "attention."),
                   ("fc1", "feed_forward.intermediate_dense"), ("fc2", "feed_forward.output_dense"),
                   ("pos_conv.0.weight_g", "pos_conv_embed.conv.parametrizations.weight.original0"),
                   ("pos_conv.0.weight_v", "pos_conv_embed.conv.parametrizations.weight.original1"),
                   ("pos_conv.0.bias", "pos_conv_embed.conv.bias")):
        name = name.replace(fs, hf)
    return "encoder." + name


@pytest.mark.parametrize("kind,binary,target", [("hubert", False, "demucs_hubert"),
                                                 ("wav2vec2", False, "pahubert"),
                                                 ("hubert", True, "pahubert")])
def test_port_hf_folder_copies_exactly(tmp_path, capsys, kind, binary, target):
    folder, hf = hf_folder(tmp_path / kind, kind, binary)
    out = tmp_path / "ported.pt"
    config = TINY if target == "demucs_hubert" else PRETRAIN_CONF / "tiny.yaml"
    text = run_port(capsys, folder, out, "--target", target, "--config", config)
    ported = load_checkpoint(out)
    copied = ported["port"]["copied"]
    assert len(copied) == 2 * 16 + 3 + 2 + 1 and not ported["port"]["reshaped"]
    for name in copied:
        assert torch.equal(ported["model"][name], hf[_hf_name(name)]), name
    assert not any(".transformer." in n for n in ported["port"]["new"])
    # the table names the sources, and the rates of both sides are reported
    assert "encoder.layers.0.self_attn.q_proj.weight" in text and "feature_extractor" in text
    assert re.search(r"source: 16000 Hz audio, 1600 Hz frames", text)  # tiny strides 5 x 2
    assert re.search(r"target: \d+ Hz audio, [\d.]+ Hz frames", text)
    assert ported["port"]["source_rates"]["sample_rate"] == 16000
    if target == "pahubert":  # the encoder rebuilds from the ported cfg and takes every tensor
        from pahubert_plugin.models.pahubert import PahubertEncoder, encoder_config

        encoder = PahubertEncoder(encoder_config(ported["cfg"]))
        encoder.load_state_dict({k[len("encoder."):]: v for k, v in ported["model"].items()}, strict=True)


def test_port_mert_folder_reports_its_rates(tmp_path, capsys):
    """MERT-v1 configs: model_type mert_model, 24 kHz, CQT input features, HuBERT's parameter names."""
    import json

    folder, hf = hf_folder(tmp_path / "mert", "hubert", conv_dim=(32,) * 7, conv_kernel=(10, 3, 3, 3, 3, 2, 2),
                           conv_stride=(5, 2, 2, 2, 2, 2, 2))
    cfg = json.loads((folder / "config.json").read_text())
    cfg.update(model_type="mert_model", architectures=["MERTModel"], sample_rate=24000,
               feature_extractor_cqt=True, feature_extractor_cqt_bins=336, deepnorm=False, attention_relax=-1.0)
    (folder / "config.json").write_text(json.dumps(cfg))
    out = tmp_path / "ported.pt"
    text = run_port(capsys, folder, out, "--target", "demucs_hubert", "--config", TINY, "--quiet")
    assert "source: 24000 Hz audio, 75 Hz frames" in text and "target: 16000 Hz audio" in text
    ported = load_checkpoint(out)
    assert ported["port"]["source_kind"] == "MERT" and len(ported["port"]["copied"]) == 38
    cfg["deepnorm"] = True
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="deepnorm"):
        port_hubert.port(str(folder), "demucs_hubert", str(TINY))


def test_not_a_transformers_folder_is_refused(tmp_path, caplog):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no config.json"):
        port_hubert.port(str(tmp_path / "empty"), "pahubert")
    (tmp_path / "bert").mkdir()
    (tmp_path / "bert" / "config.json").write_text('{"model_type": "bert"}')
    with caplog.at_level("ERROR"):
        assert port_hubert.main([str(tmp_path / "bert"), str(tmp_path / "o.pt"), "--target", "pahubert"]) == 2
    assert "model_type 'bert' is not one of hubert, wav2vec2, mert_model" in caplog.text


@pytest.mark.slow
def test_ported_hf_model_finetunes(tmp_path, capsys, corpora):
    folder, hf = hf_folder(tmp_path / "hf")
    ported = tmp_path / "ported.pt"
    run_port(capsys, folder, ported, "--target", "demucs_hubert", "--config", TINY, "--quiet")
    _, weights = finetune_ported(corpora, ported, tmp_path)
    for key, src in (("encoder.transformer.layers.0.fc1.weight", "encoder.layers.0.feed_forward.intermediate_dense.weight"),
                     ("encoder.mask_emb", "masked_spec_embed")):
        assert torch.allclose(weights[key].float(), hf[src], atol=1e-5), key


def test_a_new_front_end_is_one_file_and_a_port_target(speech_ckpt, tmp_path):
    """docs/ARCHITECTURE.md's promise: a front end written against models/hubert_encoder.py (here a
    framed-waveform projection, in this file only) pretrains with HuBERT's head and is a port target
    without any change to port_hubert."""
    from dataclasses import dataclass

    from fairseq.models import register_model
    from fairseq.models.hubert.hubert import HubertConfig
    from omegaconf import OmegaConf
    from torch import nn

    from pahubert_plugin.models.hubert_encoder import (FrontEnd, FrontEndOutput, HubertPretrainingModel,
                                                       HubertTokenEncoder, MaskedPredictionHead)

    class FramedWaveform(FrontEnd):
        hop_samples = 160

        def __init__(self, cfg):
            super().__init__()
            self.out_dim = 24
            self.proj = nn.Linear(self.hop_samples * cfg.audio_channels, self.out_dim)

        @property
        def hop(self):
            return float(self.hop_samples)

        def token_padding_mask(self, padding_mask, num_tokens):
            return None

        def forward(self, source):
            b, c, n = source.shape
            frames = source[..., : n // self.hop_samples * self.hop_samples].reshape(b, c, -1, self.hop_samples)
            return FrontEndOutput(self.proj(frames.permute(0, 2, 1, 3).flatten(2)), [])

    @dataclass
    class FramedConfig(HubertConfig):
        sample_rate: int = 16000
        audio_channels: int = 1

    if "test_framed_hubert" not in __import__("fairseq").models.MODEL_REGISTRY:
        @register_model("test_framed_hubert", dataclass=FramedConfig)
        class FramedHubert(HubertPretrainingModel):
            def __init__(self, cfg, num_classes):
                super().__init__()
                self.encoder = HubertTokenEncoder(FramedWaveform(cfg), cfg)
                self.head = MaskedPredictionHead.from_config(
                    cfg, num_classes, cfg.label_rate * self.encoder.hop / cfg.sample_rate)


            @classmethod
            def build_encoder(cls, model_cfg, task_cfg):
                cfg = OmegaConf.merge(OmegaConf.structured(FramedConfig), model_cfg,
                                      {"sample_rate": task_cfg["sample_rate"], "audio_channels": task_cfg["audio_channels"],
                                       "label_rate": task_cfg["label_rate"]})
                return HubertTokenEncoder(FramedWaveform(cfg), cfg), OmegaConf.to_container(cfg, resolve=True)

    ckpt, rows, _ = port_hubert.port(str(speech_ckpt), "test_framed_hubert", sample_rate=16000, channels=1)
    copied = [r.name for r in rows if r.status == "copied"]
    assert len(copied) == 2 * 16 + 3 + 2 + 1  # the same transformer tensors as for the shipped targets
    speech = load_checkpoint(speech_ckpt)["model"]
    assert torch.equal(ckpt["model"]["encoder.transformer.layers.1.fc2.weight"], speech["encoder.layers.1.fc2.weight"])
    from fairseq.models import MODEL_REGISTRY

    cls = MODEL_REGISTRY["test_framed_hubert"]
    cfg = OmegaConf.merge(OmegaConf.structured(FramedConfig), ckpt["cfg"]["model"])
    model = cls(cfg, [10])
    model.encoder.load_state_dict({k[len("encoder."):]: v for k, v in ckpt["model"].items()})
    torch.manual_seed(0)
    out = model(torch.randn(2, 1, 16000), target_list=[torch.randint(0, 10, (2, 100))])
    assert out["logit_m_list"][0].shape[1] == 11 and out["features_pen"] > 0
