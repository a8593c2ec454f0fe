"""Optimised inference computes what the checkpoint computes: folded BatchNorm, channels_last, inference mode,
bf16 autocast, tiled decoding, dropped pages (the speed itself: benchmarks/, tests/test_benchmarks.py)."""
import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from pahubert_plugin.separation.inference import Autocast, optimize_for_inference
from pahubert_plugin.separation.overlap import apply_model
from helpers import SOURCES, SR, randomise_batchnorm


def resunet():
    from pahubert_plugin.models.resunet import ResUNetConfig, ResUNetModel

    cfg = ResUNetConfig(sources=SOURCES, sample_rate=SR, audio_channels=2, n_fft=512, channels=[8, 16, 32],
                        freq_strides=[2, 2, 2], time_strides=[2, 2, 1], units=2, bottleneck_units=1)
    return ResUNetModel(cfg)


def pahubert_resunet():
    from pahubert_plugin.models.pahubert import PahubertConfig
    from pahubert_plugin.models.pahubert_resunet import PahubertResUNetConfig, PahubertResUNetModel

    enc = OmegaConf.merge(OmegaConf.structured(PahubertConfig), {
        "sample_rate": SR, "audio_channels": 2, "label_rate": 100, "n_fft": 512, "stem_channels": [8, 16],
        "stem_freq_strides": [4, 4], "stem_time_strides": [1, 1], "stem_units": 2, "encoder_layers": 2,
        "encoder_embed_dim": 32, "encoder_ffn_embed_dim": 64, "encoder_attention_heads": 2, "conv_pos": 8,
        "conv_pos_groups": 4})
    cfg = OmegaConf.merge(OmegaConf.structured(PahubertResUNetConfig),
                          {"sources": SOURCES, "sample_rate": SR, "audio_channels": 2})
    return PahubertResUNetModel(cfg, OmegaConf.to_container(enc, resolve=True))


def trained_like(model):
    """Random BatchNorm statistics and affine weights, as after training (at init a fold is trivial)."""
    return randomise_batchnorm(model).eval()


@pytest.mark.parametrize("build", [resunet, pahubert_resunet])
def test_optimized_model_computes_the_same_estimates(build):
    torch.manual_seed(0)
    model = trained_like(build())
    mix = torch.randn(2, 3 * SR) * 0.3
    ref = apply_model(model, mix, SR, overlap=0.25)
    n_bn = sum(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    fast = optimize_for_inference(model)
    assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in fast.modules()) < n_bn  # some were folded
    assert any(p.dim() == 4 and p.is_contiguous(memory_format=torch.channels_last) and not p.is_contiguous()
               for p in fast.parameters())
    got = apply_model(fast, mix, SR, overlap=0.25)
    peak = mix.abs().max()
    assert (got - ref).abs().max() <= 1e-5 * peak, float((got - ref).abs().max() / peak)


@pytest.mark.parametrize("build", [resunet, pahubert_resunet])
def test_inference_without_autograd_computes_the_training_graph_values(build):
    """Without autograd the residual units, the decoder (which pops its skips), the mask head (blocks
    of frames) and the iSTFT (one signal at a time) take a leaner path; the estimates are the ones
    the autograd path computes, longer than one mask block, stereo, two items."""
    torch.manual_seed(0)
    model = trained_like(build())
    model.mask_head.frames_per_block = 7  # several blocks and a ragged last one
    mix = torch.randn(2, 2, SR) * 0.3
    with torch.enable_grad():
        ref = model(mix)
    assert ref.requires_grad
    with torch.inference_mode():
        lean = model(mix)
    assert (lean - ref.detach()).abs().max() <= 1e-5 * mix.abs().max()


def test_decoder_consume_pops_the_skips_it_was_given():
    from pahubert_plugin.models.blocks import ResUNetDecoder, ResUNetEncoder

    enc = ResUNetEncoder(2, [4, 8], [(2, 2), (2, 1)], 1).eval()
    dec = ResUNetDecoder(8, [4, 8], [(2, 2), (2, 1)], 1, 3).eval()
    with torch.no_grad():
        x, skips = enc(torch.randn(1, 2, 16, 8))
        kept = dec(x, skips)
        assert len(skips) == 2  # not consumed by default
        popped = dec(x, skips, consume=True)
    assert skips == [] and torch.equal(kept, popped)
    with pytest.raises(ValueError, match="2 levels but got 1 skips"):
        dec(x, [torch.zeros(1)])


def test_bf16_autocast_stays_close_to_fp32():
    torch.manual_seed(0)
    model = trained_like(resunet())
    mix = torch.randn(1, 2, SR) * 0.3
    with torch.inference_mode():
        ref = model(mix)
        got = Autocast(model, "bf16")(mix)
    assert got.dtype == torch.float32 and torch.isfinite(got).all()
    err = float((got - ref).abs().max() / mix.abs().max())
    assert 0 < err < 0.1, err  # bfloat16 keeps 8 bits of mantissa: close, not equal
    with pytest.raises(ValueError, match="precision"):
        Autocast(model, "fp8")


def test_separator_precision_option_is_checked(tmp_path):
    from pahubert_plugin.separation import Separator

    with pytest.raises(ValueError, match="precision must be one of fp32, bf16"):
        Separator.from_checkpoint(str(tmp_path / "missing.pt"), precision="half")
    sep = Separator(trained_like(resunet()), 1.0, precision="bf16")
    stems = sep.separate(np.random.default_rng(0).standard_normal((2, SR // 2)).astype("float32") * 0.1, SR)
    assert set(stems) == set(SOURCES) and all(np.isfinite(np.asarray(v)).all() for v in stems.values())


def test_bf16_on_a_cpu_without_bfloat16_units_warns_that_it_is_emulated(monkeypatch, caplog):
    """oneDNN emulates bfloat16 without AVX512-BF16 or AMX (a convolution 10x slower than fp32 on an AVX2
    CPU): --precision bf16 says so instead of silently running several times slower."""
    import logging

    from pahubert_plugin.separation import inference as apply
    from pahubert_plugin.separation import Separator

    assert isinstance(apply.cpu_has_native_bf16(), bool)
    monkeypatch.setattr(apply, "cpu_has_native_bf16", lambda: False)
    with caplog.at_level(logging.WARNING, logger="pahubert_plugin.separation.inference"):
        Separator(trained_like(resunet()), 1.0, precision="bf16")
    assert "no bfloat16 units" in caplog.text and "SLOWER than fp32" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="pahubert_plugin.separation.inference"):
        Separator(trained_like(resunet()), 1.0, precision="fp32")
        assert not apply.warn_if_emulated("bf16", "cuda")  # CUDA has its own bfloat16 units
    assert "bfloat16" not in caplog.text
    monkeypatch.setattr(apply, "cpu_has_native_bf16", lambda: True)
    assert not apply.warn_if_emulated("bf16", "cpu")


def pahubert_resunet_strided(time_strides, decoder_skips=-1, stem_norm="batch"):
    """A three-level pahubert_resunet with the shipped stem's input normalisation and the given time pooling."""
    from pahubert_plugin.models.pahubert import PahubertConfig
    from pahubert_plugin.models.pahubert_resunet import PahubertResUNetConfig, PahubertResUNetModel

    enc = OmegaConf.merge(OmegaConf.structured(PahubertConfig), {
        "sample_rate": SR, "audio_channels": 2, "label_rate": 100, "n_fft": 512, "stem_channels": [8, 16, 16],
        "stem_freq_strides": [2, 2, 2], "stem_time_strides": time_strides, "stem_units": 2, "stem_norm": stem_norm,
        "input_norm": "freq", "encoder_layers": 2, "encoder_embed_dim": 32, "encoder_ffn_embed_dim": 64,
        "encoder_attention_heads": 2, "conv_pos": 8, "conv_pos_groups": 4})
    cfg = OmegaConf.merge(OmegaConf.structured(PahubertResUNetConfig), {
        "sources": SOURCES, "sample_rate": SR, "audio_channels": 2, "decoder_skips": decoder_skips,
        "decoder_units": 2})
    return PahubertResUNetModel(cfg, OmegaConf.to_container(enc, resolve=True))


@pytest.mark.parametrize("time_strides,skips,margin,levels", [
    ([1, 1, 1], -1, 16, [(12, 1), (8, 1), (4, 1)]), ([1, 1, 1], 1, 12, [(12, 1), (8, 1), (4, 1)]),
    ([1, 2, 2], -1, 16, [(16, 2), (8, 1), (4, 1)]), ([2, 1, 2], 1, 20, [(20, 2), (12, 2), (4, 1)])])
def test_tiled_decoding_computes_the_same_estimates(time_strides, skips, margin, levels):
    """pahubert-separate --tile: the stem tile by tile, the transformer on the whole chunk, the stem (but its
    deepest block, whose output the first pass keeps) again and
    the decoder per tile with tile_margin() frames of context: the estimates of whole chunks, for tiles
    shorter than the margin, tiles that do not divide the chunk and one tile longer than it. The margin is
    the hand count (3x3 convolutions: each unit reaches 2 frames at its level; 2 units per block, 3 stem
    blocks, 3 decoder levels; with one skip the decoder's deep levels need no stem context), and a decoder
    without it gets the tile edges wrong. Each decoder level decodes its tile with only the context its own
    and the later levels' convolutions reach (decoder_margins(), the hand count at each level's scale); a
    decoder cut tighter than that gets the edges wrong too."""
    torch.manual_seed(0)
    model = optimize_for_inference(trained_like(pahubert_resunet_strided(time_strides, skips)))
    assert model.tile_margin() == margin
    assert model.decoder_margins() == levels
    mix = torch.randn(2, 2, int(2.3 * SR)) * 0.3  # 230 frames, two items
    peak = mix.abs().max()
    with torch.inference_mode():
        ref = model(mix)
        for seconds in (0.05, 0.13, 0.5, 5.0):
            model.set_decode_tile(seconds)
            assert model.decode_tile_frames % model.encoder.front_end.time_stride == 0
            got = model(mix)
            assert (got - ref).abs().max() <= 1e-5 * peak, (seconds, float((got - ref).abs().max() / peak))
        model.set_decode_tile(0.5)
        model.tile_margin = lambda: 0
        assert (model(mix) - ref).abs().max() > 1e-3 * peak
        del model.tile_margin
        model.decoder_margins = lambda: [(0, scale) for _, scale in levels]
        assert (model(mix) - ref).abs().max() > 1e-3 * peak
        del model.decoder_margins
        model.set_decode_tile(0)
        assert model.decode_tile_frames == 0 and torch.equal(model(mix), ref)
    with torch.enable_grad():  # training and autograd never tile
        model.set_decode_tile(0.05)
        assert torch.allclose(model(mix), ref, atol=1e-5 * float(peak))


def test_decoder_windows_cut_each_level_and_must_nest():
    """ResUNetDecoder(windows=...): each level keeps its window of frames; the unwindowed decoder's frames
    inside the windows' reach are reproduced, and windows that do not nest or do not match the levels are
    refused by name."""
    from pahubert_plugin.models.blocks import ResUNetDecoder, ResUNetEncoder

    torch.manual_seed(0)
    enc = ResUNetEncoder(2, [4, 8], [(2, 1), (2, 2)], units=1).eval()
    dec = ResUNetDecoder(8, [4, 8], [(2, 1), (2, 2)], units=1, out_channels=3).eval()
    x = torch.randn(1, 2, 8, 40)
    with torch.inference_mode():
        bottleneck, skips = enc(x)
        ref = dec(bottleneck, skips)
        # the bottleneck has 20 frames, both levels 40 (the shallow block pools frequency only); level 0 keeps
        # [8, 36), level 1 [12, 32): one unit reaches 2 frames per level, so frames 14..29 are exact
        got = dec(bottleneck, skips, windows=[(8, 36), (12, 32)])
        assert got.shape[-1] == 20
        torch.testing.assert_close(got[..., 2:18], ref[..., 14:30], rtol=1e-5, atol=1e-6)
        assert (got[..., 0] - ref[..., 12]).abs().max() > 1e-4  # the cut at 12 reaches in: not exact there
        with pytest.raises(ValueError, match="window \\(2, 30\\) of level 1 is not inside the frames \\[8, 36\\)"):
            dec(bottleneck, skips, windows=[(8, 36), (2, 30)])
        with pytest.raises(ValueError, match="2 levels but got 1 windows"):
            dec(bottleneck, skips, windows=[(4, 16)])


def test_tiled_decoding_is_refused_where_it_would_change_the_estimates(tmp_path):
    from pahubert_plugin.separation.api import Separator, check_options
    from pahubert_plugin.separation.inference import set_decode_tile

    with pytest.raises(ValueError, match="GroupNorm"):
        pahubert_resunet_strided([1, 1, 1], stem_norm="group").set_decode_tile(1.0)
    with pytest.raises(ValueError, match="tiled decoding .* is for pahubert_resunet models; ResUNetModel"):
        set_decode_tile(resunet(), 1.0)
    with pytest.raises(ValueError, match="tile must be >= 0 seconds"):
        check_options(tile=-1.0)
    with pytest.raises(ValueError, match="tile must be >= 0 seconds"):
        Separator.from_checkpoint(str(tmp_path / "missing.pt"), tile=float("nan"))
    torch.manual_seed(0)
    model = trained_like(pahubert_resunet_strided([1, 1, 1]))
    wav = np.random.default_rng(0).standard_normal((2, 2 * SR)).astype("float32") * 0.1
    whole = Separator(model, 1.0).separate(wav, SR)
    tiled_sep = Separator(model, 1.0, tile=0.2)
    assert model.decode_tile_frames == 20 and tiled_sep.tile == 0.2
    tiled = tiled_sep.separate(wav, SR)
    for name in SOURCES:
        assert np.abs(np.asarray(tiled[name]) - np.asarray(whole[name])).max() <= 1e-5 * np.abs(wav).max()


def test_dropping_gpu_library_pages_frees_resident_memory_and_changes_no_result():
    """separation.memory.drop_gpu_library_pages in a fresh process: with PyPI's CUDA build of torch the CUDA libraries'
    clean pages leave the resident set (about 270 MiB here), and CPU results are bitwise the same after."""
    import subprocess
    import sys

    code = r"""
import json, torch
from pahubert_plugin.separation.memory import drop_gpu_library_pages
from pahubert_plugin.models.blocks import ResUnit
def rss(): return int(open('/proc/self/status').read().split('VmRSS:')[1].split()[0]) / 1024
torch.manual_seed(0)
unit, x = ResUnit(4, 8).eval(), torch.randn(1, 4, 16, 32)
with torch.inference_mode():
    before = unit(x)
r0 = rss(); dropped = drop_gpu_library_pages(); r1 = rss()
with torch.inference_mode():
    after = unit(x)
print(json.dumps({"cuda_build": torch.version.cuda is not None, "dropped": dropped, "rss_drop": r0 - r1,
                  "same": bool(torch.equal(before, after)), "again": drop_gpu_library_pages()}))
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    r = __import__("json").loads(proc.stdout.splitlines()[-1])
    assert r["same"]
    if not r["cuda_build"]:
        pytest.skip("a CPU build of torch maps no CUDA library")
    assert r["dropped"] > 50 and r["rss_drop"] > 0.8 * r["dropped"], r  # the resident set fell by what it said
    assert r["again"] < 0.2 * r["dropped"], r  # what the CPU run touched since is all that comes back


@pytest.mark.parametrize("kernel", [1, 3])
def test_demucs_conv_glu_in_time_slices_is_the_whole_convolution(kernel):
    """The lean path's stride-1 convolution + GLU over time slices with kernel // 2 steps of context: the
    whole-signal values, ragged last slice and slices shorter than the signal's ends included."""
    from pahubert_plugin.models.demucs import _conv_glu_sliced, _sliceable

    torch.manual_seed(0)
    conv, glu = torch.nn.Conv1d(6, 10, kernel, padding=kernel // 2), torch.nn.GLU(dim=1)
    assert _sliceable(conv) and not _sliceable(torch.nn.Conv1d(6, 10, 3, padding=0))
    x = torch.randn(2, 6, 1000)
    with torch.no_grad():
        ref = glu(conv(x))
        for step in (1, 97, 999, 1000):
            assert (_conv_glu_sliced(conv, glu, x, step=step) - ref).abs().max() < 1e-6


def test_demucs_without_autograd_computes_the_training_graph_values(monkeypatch):
    """Demucs V2 without autograd: ReLUs in place, convolution + GLU pairs in time slices, each skip added
    into the decoder's own output and let go once used (the list is emptied), the LSTM on torch's native
    kernels; the estimates are the autograd path's, and a tuple of skips works."""
    from pahubert_plugin.models import demucs
    from pahubert_plugin.models.demucs import DEMUCS_PRESETS, DemucsV2

    monkeypatch.setattr(demucs, "LEAN_SLICE", 300)  # several slices per layer at this size
    torch.manual_seed(0)
    model = DemucsV2(SOURCES, **DEMUCS_PRESETS["tiny"]).eval()
    mix = torch.randn(2, 2, SR) * 0.3
    with torch.enable_grad():
        ref = model(mix)
    assert ref.requires_grad
    with torch.inference_mode():
        lean = model(mix)
        x, skips, ctx = model.encoder(mix)
        n = len(skips)
        from_tuple = model.decoder(model.bottleneck(x), tuple(skips), ctx)
        assert len(skips) == n  # a tuple is not the caller's list: nothing emptied
        from_list = model.decoder(model.bottleneck(x), skips, ctx)
    assert skips == []
    assert torch.backends.mkldnn.enabled  # the LSTM's switch is restored
    assert (lean - ref.detach()).abs().max() <= 1e-6 * mix.abs().max()
    assert torch.equal(from_tuple, lean) and torch.equal(from_list, lean)


def test_dropping_a_mapped_checkpoints_pages_changes_no_value(tmp_path):
    """drop_file_pages lets go of the resident pages of a mapped file (a checkpoint whose weights
    optimize_for_inference replaced): the tensors still read the same values, read back from the file; a
    mapping with a page written in place (copy-on-write) is left alone, so the write survives."""
    from pahubert_plugin.separation.memory import drop_file_pages

    path = tmp_path / "w.pt"
    torch.save({"w": torch.arange(16 * 2 ** 20, dtype=torch.float32)}, path)  # 64 MiB
    w = torch.load(path, mmap=True, weights_only=True)["w"]
    expected = float(w.double().sum())  # touches every page
    assert drop_file_pages(str(path)) > 48
    assert drop_file_pages(str(path)) < 1  # nothing left resident
    assert float(w.double().sum()) == expected and w[12345] == 12345
    w[7] = -1.0  # a private page: the mapping is not dropped again
    float(w.double().sum())
    assert drop_file_pages(str(path)) == 0
    assert w[7] == -1.0 and w[8] == 8

