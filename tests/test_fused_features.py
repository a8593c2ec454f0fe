"""pahubert_resunet with model.fuse_pretrained: a scratch-capacity path plus the pretrained features."""
import pytest
import torch

import pahubert_plugin  # noqa: F401  (registration)
from pahubert_plugin.models.pahubert_resunet import PahubertResUNetModel

from test_separation import finetune, make_pretraining_checkpoint, musdb_root, pahubert_resunet_cfg  # noqa: F401


@pytest.fixture
def pretrained(tmp_path):
    model = make_pretraining_checkpoint(tmp_path / "pre.pt")
    return model, tmp_path / "pre.pt"


def wav(seed=0, samples=4000):
    return torch.randn(1, 2, samples, generator=torch.Generator().manual_seed(seed))


def test_fused_model_starts_as_the_scratch_model(pretrained):
    """Zero-initialised fusion: with the same random init of the own path, the output is the scratch model's."""
    pre, path = pretrained
    torch.manual_seed(3)
    scratch = PahubertResUNetModel.build_model(pahubert_resunet_cfg(path, no_pretrained_weights=True)).eval()
    fused = PahubertResUNetModel.build_model(pahubert_resunet_cfg(path, fuse_pretrained=True)).eval()
    # the side encoder holds the pretrained weights, the own encoder does not
    for k, v in pre.encoder.state_dict().items():
        assert torch.equal(fused.fused_encoder.state_dict()[k], v), k
    assert not torch.equal(fused.encoder.post_extract_proj.weight, pre.encoder.post_extract_proj.weight)
    fused.load_state_dict({**fused.state_dict(), **scratch.state_dict()})  # same own path as the scratch model
    with torch.no_grad():
        torch.testing.assert_close(fused(wav()), scratch(wav()), rtol=0, atol=0)
        fused.fuse_proj.weight.normal_()  # once the projection has learned something, the features matter
        assert not torch.allclose(fused(wav()), scratch(wav()))


def test_fused_encoder_is_frozen_and_stays_in_eval_mode(pretrained):
    _, path = pretrained
    fused = PahubertResUNetModel.build_model(pahubert_resunet_cfg(path, fuse_pretrained=True)).train()
    assert not fused.fused_encoder.training and fused.encoder.training
    before = {k: v.clone() for k, v in fused.fused_encoder.state_dict().items()}
    fused(wav()).abs().mean().backward()
    assert all(p.grad is None for p in fused.fused_encoder.parameters())
    assert fused.fuse_proj.weight.grad is not None and fused.fuse_proj.weight.grad.abs().sum() > 0
    assert fused.encoder.post_extract_proj.weight.grad is not None  # the own path trains
    for k, v in fused.fused_encoder.state_dict().items():  # BatchNorm running statistics untouched
        assert torch.equal(v, before[k]), k


def test_fused_encoder_trains_at_its_lr_scale(pretrained):
    _, path = pretrained
    fused = PahubertResUNetModel.build_model(pahubert_resunet_cfg(path, fuse_pretrained=True, fused_lr_scale=0.1))
    fused.train()
    assert fused.fused_encoder.training
    with torch.no_grad():
        fused.fuse_proj.weight.normal_()  # zero weights pass no gradient back to the side encoder
    fused(wav()).abs().mean().backward()
    p = fused.fused_encoder.post_extract_proj.weight
    assert p.grad is not None and p.optim_overrides == {"optimizer": {"lr_scale": 0.1}}


def test_fused_layer_weights_mix_the_pretrained_layers(pretrained):
    _, path = pretrained
    fused = PahubertResUNetModel.build_model(pahubert_resunet_cfg(path, fuse_pretrained=True, layer_weights=True))
    with torch.no_grad():
        fused.fuse_proj.weight.normal_()
    fused.eval()
    with torch.no_grad():
        fused.layer_weights.copy_(torch.tensor([1e4, -1e4]))
        first = fused(wav())
        fused.layer_weights.copy_(torch.tensor([-1e4, 1e4]))
        assert not torch.allclose(first, fused(wav()))
    # the mix trains while the pretrained encoder stays frozen (its forward runs without gradient, the mix not)
    with torch.no_grad():
        fused.layer_weights.zero_()
    fused.train()
    fused(wav()).abs().mean().backward()
    assert fused.layer_weights.grad is not None and fused.layer_weights.grad.abs().sum() > 0
    assert all(p.grad is None for p in fused.fused_encoder.parameters())


def test_fused_checkpoint_rebuilds_and_decodes_in_tiles(pretrained):
    """Saved config + state dict rebuild the same model without the pretraining file; tiles give the same output."""
    from omegaconf import OmegaConf

    _, path = pretrained
    fused = PahubertResUNetModel.build_model(pahubert_resunet_cfg(path, fuse_pretrained=True)).eval()
    with torch.no_grad():
        fused.fuse_proj.weight.normal_(std=0.1)
    cfg = pahubert_resunet_cfg("", fuse_pretrained=True)
    cfg.encoder_cfg = OmegaConf.create(fused.config_updates["encoder_cfg"])
    again = PahubertResUNetModel.build_model(cfg).eval()
    again.load_state_dict(fused.state_dict())
    x = wav(1, 16000)
    with torch.no_grad():
        whole = again(x)
        torch.testing.assert_close(whole, fused(x), rtol=0, atol=0)
        again.set_decode_tile(0.3)
        torch.testing.assert_close(again(x), whole, rtol=0, atol=1e-5 * float(x.abs().max()))


@pytest.mark.parametrize("bad", [dict(reinit_layers=1), dict(freeze_encoder_updates=3), dict(encoder_lr_scale=0.5),
                                 dict(fused_lr_scale=-1.0)])
def test_fused_refuses_options_that_change_the_own_path(pretrained, bad):
    _, path = pretrained
    with pytest.raises(ValueError, match="fuse|fused_lr_scale"):
        PahubertResUNetModel.build_model(pahubert_resunet_cfg(path, fuse_pretrained=True, **bad))


@pytest.mark.slow
def test_fused_model_finetunes_with_fairseq_and_separates(musdb_root, tmp_path):
    """A real fairseq fine-tuning with model.fuse_pretrained=true: the frozen side encoder gets no update,
    the checkpoint rebuilds without the pretraining file and separates."""
    import os

    import numpy as np

    from pahubert_plugin.checkpoint import load_checkpoint
    from pahubert_plugin.separation import Separator

    pre_model = make_pretraining_checkpoint(tmp_path / "pre.pt")
    save = tmp_path / "ckpt"
    log, losses, sdrs = finetune("pahubert_tiny", musdb_root, save,
                                 [f"model.pretrained_checkpoint={tmp_path / 'pre.pt'}", "model.fuse_pretrained=true"])
    assert len(sdrs) >= 2 and all(np.isfinite(sdrs))
    weights = load_checkpoint(str(save / "checkpoint_last.pt"))["model"]
    for k, v in pre_model.encoder.state_dict().items():  # frozen: still the pretrained tensors
        assert torch.equal(weights[f"fused_encoder.{k}"], v), k
    assert weights["fuse_proj.weight"].abs().sum() > 0  # the projection learned
    os.remove(tmp_path / "pre.pt")
    sep = Separator.from_checkpoint(str(save / "checkpoint_best.pt"), segment=1.0)
    assert sep.separate(torch.randn(2, 5000) * 0.1, 16000)["vocals"].shape == (2, 5000)
