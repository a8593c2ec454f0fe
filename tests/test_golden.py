"""Golden outputs: every model computes what it computed when these files were written.

Each case builds a small model, loads the weights stored in ``tests/golden/<case>.safetensors``
(so the check does not depend on the order in which a refactor creates parameters), runs it on the
stored input and compares with the stored output. A refactor that changes no numbers passes; one
that renames parameters must keep old checkpoints loading (these files hold the old names).

Regenerate (only when a change of numbers is intended, and say so in the commit):
    python tests/test_golden.py --write
"""
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file, save_file

from helpers import SOURCES, SR, randomise_batchnorm

GOLDEN = Path(__file__).parent / "golden"
SAMPLES = 4000  # 0.25 s
CLASSES = [12]


def _pahubert_cfg():
    from pahubert_plugin.models.pahubert import PahubertConfig

    return OmegaConf.merge(OmegaConf.structured(PahubertConfig), {
        "sample_rate": SR, "audio_channels": 2, "label_rate": 100, "n_fft": 512, "stem_channels": [4, 8],
        "stem_freq_strides": [4, 4], "stem_time_strides": [1, 2], "stem_units": 1, "encoder_layers": 2,
        "encoder_embed_dim": 16, "encoder_ffn_embed_dim": 32, "encoder_attention_heads": 2, "conv_pos": 4,
        "conv_pos_groups": 2, "final_dim": 8, "input_norm": "freq", "mask_prob": 0.5, "mask_length": 2,
        "dropout": 0.0, "attention_dropout": 0.0, "activation_dropout": 0.0, "encoder_layerdrop": 0.0})


def _demucs_hubert_cfg():
    from pahubert_plugin.models.demucs_hubert import DemucsHubertConfig

    return OmegaConf.merge(OmegaConf.structured(DemucsHubertConfig), {
        "channels": 4, "depth": 3, "growth": 2.0, "encoder_layers": 2, "encoder_embed_dim": 16,
        "encoder_ffn_embed_dim": 32, "encoder_attention_heads": 2, "conv_pos": 4, "conv_pos_groups": 2,
        "final_dim": 8, "mask_prob": 0.5, "mask_length": 2, "dropout": 0.0, "attention_dropout": 0.0,
        "activation_dropout": 0.0, "encoder_layerdrop": 0.0})


def build_pahubert():
    from pahubert_plugin.models.pahubert import PahubertModel

    return PahubertModel(_pahubert_cfg(), CLASSES)


def build_pahubert_resunet():
    from pahubert_plugin.models.pahubert_resunet import PahubertResUNetConfig, PahubertResUNetModel

    cfg = OmegaConf.merge(OmegaConf.structured(PahubertResUNetConfig),
                          {"sources": SOURCES, "sample_rate": SR, "audio_channels": 2, "decoder_units": 1})
    return PahubertResUNetModel(cfg, OmegaConf.to_container(_pahubert_cfg(), resolve=True))


def build_resunet():
    from pahubert_plugin.models.resunet import ResUNetConfig, ResUNetModel

    return ResUNetModel(ResUNetConfig(sources=SOURCES, sample_rate=SR, audio_channels=2, n_fft=512,
                                      channels=[4, 8], freq_strides=[4, 4], time_strides=[2, 1], units=1, bottleneck_units=1))


def build_demucs_v2():
    from pahubert_plugin.models.demucs_v2 import DemucsV2Config, DemucsV2Model

    cfg = OmegaConf.merge(OmegaConf.structured(DemucsV2Config), {"channels": 4, "depth": 3, "lstm_layers": 1})
    return DemucsV2Model(cfg, SOURCES, SR, 2)


def build_demucs_hubert():
    from pahubert_plugin.models.demucs_hubert import DemucsHubertModel

    return DemucsHubertModel(_demucs_hubert_cfg(), 2, SR, CLASSES)


def build_demucs_v2_hubert():
    from pahubert_plugin.models.demucs_v2_hubert import DemucsV2HubertModel

    return DemucsV2HubertModel(_demucs_hubert_cfg(), 2, SR, SOURCES)


def _pretraining_outputs(model, mixture, labels):
    """Masked-prediction logits (masks follow torch's seed), the feature penalty, layer-1 features."""
    torch.manual_seed(7)
    out = model(source=mixture, target_list=[labels], mask=True)
    feats, _ = model.extract_features(mixture, output_layer=1)
    return {"logit_m": out["logit_m_list"][0], "logit_u": out["logit_u_list"][0],
            "features_pen": out["features_pen"].reshape(1), "layer1": feats}


def _separation_outputs(model, mixture, labels):
    return {"estimates": model(mixture)}


CASES = {
    "pahubert": (build_pahubert, _pretraining_outputs),
    "pahubert_resunet": (build_pahubert_resunet, _separation_outputs),
    "resunet": (build_resunet, _separation_outputs),
    "demucs_v2": (build_demucs_v2, _separation_outputs),
    "demucs_hubert": (build_demucs_hubert, _pretraining_outputs),
    "demucs_v2_hubert": (build_demucs_v2_hubert, _separation_outputs),
}


def _inputs():
    gen = torch.Generator().manual_seed(123)
    mixture = torch.randn(2, 2, SAMPLES, generator=gen) * torch.linspace(0.05, 0.5, SAMPLES)
    labels = torch.randint(0, CLASSES[0], (2, SAMPLES * 100 // SR), generator=gen)
    return mixture, labels


def write(case):
    build, run = CASES[case]
    torch.manual_seed(0)
    model = randomise_batchnorm(build()).eval()
    mixture, labels = _inputs()
    with torch.no_grad():
        outputs = run(model, mixture, labels)
    tensors = {f"state.{k}": v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    tensors.update({f"out.{k}": v.detach().contiguous() for k, v in outputs.items()})
    GOLDEN.mkdir(exist_ok=True)
    save_file(tensors, str(GOLDEN / f"{case}.safetensors"))


@pytest.mark.parametrize("case", sorted(CASES))
def test_model_reproduces_its_golden_output(case):
    build, run = CASES[case]
    stored = load_file(str(GOLDEN / f"{case}.safetensors"))
    state = {k[len("state."):]: v for k, v in stored.items() if k.startswith("state.")}
    torch.manual_seed(99)  # a different init: only the stored weights may matter
    model = build()
    model.load_state_dict(state, strict=True)
    model.eval()
    mixture, labels = _inputs()
    with torch.no_grad():
        outputs = run(model, mixture, labels)
    expected = {k[len("out."):]: v for k, v in stored.items() if k.startswith("out.")}
    assert sorted(outputs) == sorted(expected)
    for name, want in expected.items():
        got = outputs[name]
        assert got.shape == want.shape, (name, got.shape, want.shape)
        assert torch.equal(torch.isinf(got), torch.isinf(want)), name
        finite = torch.isfinite(want)
        scale = float(want[finite].abs().max()) or 1.0
        err = float((got[finite] - want[finite]).abs().max()) / scale
        assert err <= 1e-5, f"{case}: {name} moved by {err:.2e} of its peak"


if __name__ == "__main__":
    if sys.argv[1:] != ["--write"]:
        sys.exit(__doc__)
    for name in CASES:
        write(name)
        print(f"wrote {GOLDEN / name}.safetensors ({(GOLDEN / f'{name}.safetensors').stat().st_size} bytes)")
