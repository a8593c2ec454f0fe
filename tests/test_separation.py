"""Separation: task/dataset, resunet + pahubert_resunet, criterion, apply, metrics, evaluate, separate.

A tiny MUSDB18-HQ layout (toy-synthesised songs, 16 kHz stereo PCM_16 wav) is written per
module; fine-tuning runs real fairseq (fairseq_cli.hydra_train in a subprocess).
"""
import json
import math
import os
import re
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from omegaconf import OmegaConf

import pahubert_plugin  # noqa: F401  (registration)
from pahubert_plugin import metrics
from pahubert_plugin.separation.overlap import apply_model, iter_apply
from pahubert_plugin.data.audio import AudioError
from pahubert_plugin.data.stems_dataset import Augment, StemsChunkDataset, split_tracks

from helpers import PLUGIN_DIR, REPO, SOURCES, SR, run_fairseq, valid_sdrs
from pahubert_plugin.configs import load_recipe_config

CONF = REPO / "recipes" / "musdb" / "conf"


@pytest.fixture(scope="module")
def musdb_root(corpora, tmp_path_factory):
    return corpora.write_layout(tmp_path_factory.mktemp("musdb"))


# ----------------------------------------------------------------------------- pure pieces

def test_registry_holds_our_classes():
    from fairseq.criterions import CRITERION_REGISTRY
    from fairseq.models import MODEL_REGISTRY
    from fairseq.tasks import TASK_REGISTRY

    from pahubert_plugin.criterions.separation import SeparationCriterion
    from pahubert_plugin.models.pahubert_resunet import PahubertResUNetModel
    from pahubert_plugin.models.resunet import ResUNetModel
    from pahubert_plugin.tasks.music_separation import MusicSeparationTask

    assert MODEL_REGISTRY["resunet"] is ResUNetModel
    assert MODEL_REGISTRY["pahubert_resunet"] is PahubertResUNetModel
    assert TASK_REGISTRY["music_separation"] is MusicSeparationTask
    assert CRITERION_REGISTRY["separation"] is SeparationCriterion
    assert SeparationCriterion.logging_outputs_can_be_summed()


def test_mdx_sdr_matches_formula():
    rng = np.random.default_rng(0)
    ref = rng.standard_normal((3, 2, 500))
    est = ref + 0.1 * rng.standard_normal(ref.shape)
    want = [10 * np.log10(((r ** 2).sum() + 1e-7) / (((r - e) ** 2).sum() + 1e-7)) for r, e in zip(ref, est)]
    np.testing.assert_allclose(metrics.sdr(ref, est), want, rtol=1e-10)
    got = metrics.sdr(torch.from_numpy(ref).float(), torch.from_numpy(est).float())
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-5)
    with pytest.raises(ValueError):
        metrics.sdr(ref, est[:, :, :10])


class Scale(torch.nn.Module):
    """A 'separator' whose sources are fixed multiples of the mixture."""

    def __init__(self, gains=(1.0, -2.0)):
        super().__init__()
        self.register_buffer("g", torch.tensor(gains))

    def forward(self, x):
        return x[:, None] * self.g[None, :, None, None]


@pytest.mark.parametrize("segment,overlap,batch", [(1000, 0.25, 1), (999, 0.5, 3), (512, 0.0, 2), (20000, 0.25, 1)])
def test_overlap_add_is_exact_and_streams(segment, overlap, batch):
    x = torch.randn(2, 10007)
    y = apply_model(Scale(), x, segment, overlap, batch)
    torch.testing.assert_close(y, torch.stack([x, -2 * x]), atol=1e-5, rtol=1e-5)
    starts, ends = [], []
    for start, block in iter_apply(Scale(), x, segment, overlap, batch):
        starts.append(start)
        ends.append(start + block.shape[-1])
        assert block.shape[-1] <= segment  # only about one segment is held at a time
    assert starts[0] == 0 and ends[-1] == x.shape[-1] and starts[1:] == ends[:-1]


def tiny_resunet(sources=SOURCES, channels=2):
    from pahubert_plugin.models.resunet import ResUNetConfig, ResUNetModel

    return ResUNetModel(ResUNetConfig(sources=list(sources), sample_rate=SR, audio_channels=channels, n_fft=512,
                                      channels=[4, 8], freq_strides=[2, 2], time_strides=[2, 1], units=1, bottleneck_units=1))


@pytest.mark.parametrize("length", [1, 159, 16000, 12345])
def test_resunet_any_length(length):
    model = tiny_resunet().eval()
    out = model(torch.randn(2, 2, length))
    assert out.shape == (2, 4, 2, length)
    with pytest.raises(ValueError, match="2, samples"):
        model(torch.randn(1, 1, 100))


def test_decoupled_head_reconstructs_mixture():
    """Mask ~1, rotation (1, 0), residual 0 gives back the mixture; a rotation by 90 deg turns it."""
    from pahubert_plugin.models.resunet import DecoupledMaskHead

    head = DecoupledMaskHead(num_sources=2, channels=2)
    spec = torch.randn(1, 2, 5, 7, dtype=torch.complex64)
    raw = torch.zeros(1, 2, 2, 4, 5, 7)
    raw[:, :, :, 0], raw[:, :, :, 1] = 30.0, 3.0
    out = head(raw.flatten(1, 3), spec)
    torch.testing.assert_close(out, spec[:, None].expand_as(out), atol=1e-5, rtol=1e-4)
    raw[:, :, :, 1], raw[:, :, :, 2] = 0.0, 3.0  # phase rotation by +90 degrees
    raw[:, 1, :, 3] = 0.5  # residual adds magnitude beyond the mixture
    out = head(raw.flatten(1, 3), spec)
    torch.testing.assert_close(out[:, 0], 1j * spec, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(out[:, 1].abs(), spec.abs() + 0.5, atol=1e-5, rtol=1e-4)


def test_leaky_mask_magnitude_keeps_a_gradient_in_dead_bins():
    """relu: a bin with |X| sigmoid(m) + q < 0 is silent and its q gets no gradient; leaky: a tiny
    estimate (0.01 of the argument) and a gradient, so fine-tuning can revive it."""
    from pahubert_plugin.models.resunet import DecoupledMaskHead

    spec = torch.randn(1, 1, 4, 3, dtype=torch.complex64)
    grads = {}
    for kind in ("relu", "leaky"):
        raw = torch.zeros(1, 1, 1, 4, 4, 3)
        raw[:, :, :, 1] = 3.0
        raw[:, :, :, 3] = -10.0  # residual far below zero: every bin dead under relu
        raw.requires_grad_()
        out = DecoupledMaskHead(1, 1, kind)(raw.flatten(1, 3), spec)
        out.abs().sum().backward()
        grads[kind] = raw.grad[:, :, :, 3]
        if kind == "relu":
            assert out.abs().max() == 0
        else:
            torch.testing.assert_close(out.abs(), 0.01 * (10.0 - 0.5 * spec.abs()[:, None]), atol=1e-5, rtol=1e-4)
    assert grads["relu"].abs().max() == 0 and (grads["leaky"].abs() > 0).all()
    with pytest.raises(ValueError, match="mask_magnitude"):
        DecoupledMaskHead(1, 1, "softplus")


def test_criterion_wave_and_stft_losses():
    from pahubert_plugin.criterions.separation import SeparationCriterion

    class Task:
        sources = SOURCES

    crit = SeparationCriterion(Task(), wave_weight=1.0, stft_weight=1.0, stft_fft_sizes=[64, 128], sources=SOURCES)
    ref = torch.randn(2, 4, 2, 2000)
    loss, parts = crit.compute_loss(ref.clone(), ref)
    assert float(loss) < 1e-4
    est = ref.clone()
    est[:, 1] += 0.5  # only bass is wrong
    loss, parts = crit.compute_loss(est, ref)
    assert set(parts) == {f"loss_{s}" for s in SOURCES}
    assert float(parts["loss_bass"]) > 0.5 and float(parts["loss_drums"]) < 1e-4
    with pytest.raises(ValueError, match="sources"):
        crit.compute_loss(est[:, :3], ref)


def test_criterion_snr_loss_is_negative_snr_in_db_and_bounded_for_a_silent_source():
    from pahubert_plugin.criterions.separation import SeparationCriterion

    class Task:
        sources = ["speech", "noise"]

    crit = SeparationCriterion(Task(), wave_weight=0.0, snr_weight=1.0, snr_max=30.0, sources=["speech", "noise"])
    torch.manual_seed(0)
    ref = torch.randn(3, 2, 1, 4000)
    ref[:, 1] *= 0.1  # noise 20 dB under speech
    est = ref.clone()
    est[:, 0] += 0.1 * ref[:, 0]  # speech estimate at 20 dB SNR, noise exact
    _, parts = crit.compute_loss(est, ref)
    mix = ref.sum(1).pow(2).mean(dim=(-2, -1))
    floor = 1e-3 * mix
    speech_power = ref[:, 0].pow(2).mean(dim=(-2, -1))
    expected = 10 * torch.log10((0.01 * speech_power + floor) / (speech_power + floor))
    torch.testing.assert_close(parts["loss_speech"], expected.sum(), rtol=1e-4, atol=1e-4)
    assert -20.5 < float(parts["loss_speech"]) / 3 < -19.0  # about -20 dB, the 30 dB floor barely counts
    # the noise estimate is exact: its error is the floor, 30 dB under the mixture, about 10 dB under the noise
    assert float(parts["loss_noise"]) / 3 == pytest.approx(-10 * math.log10(1 + 0.01 / 1.01e-3), abs=0.2)
    # a silent source: finite, 0 when its estimate is silent too, and it grows with leakage
    ref[:, 1] = 0
    est = ref.clone()
    _, parts = crit.compute_loss(est, ref)
    assert float(parts["loss_noise"]) == pytest.approx(0.0, abs=1e-6)
    est[:, 1] = 0.1 * ref[:, 0]
    loss, parts = crit.compute_loss(est, ref)
    assert torch.isfinite(loss) and float(parts["loss_noise"]) / 3 == pytest.approx(10 * math.log10(1 + 10), abs=0.1)
    # a silent mixture (both sources silent): loss 0 and finite gradients, even for an estimate of exactly 0
    ref[0] = 0
    for value in (0.0, 1e-20, 1e-3):
        est = torch.full_like(ref, value)
        est[1:] = ref[1:]
        est.requires_grad_(True)
        loss, _ = crit.compute_loss(est, ref)
        loss.backward()
        assert torch.isfinite(loss) and torch.isfinite(est.grad).all(), value
        silent_row = crit.per_source_loss(est.detach(), ref)[0]  # 10 log10(1 + value^2 / 1e-10), each source
        torch.testing.assert_close(silent_row, torch.full((2,), 10 * math.log10(1 + value ** 2 / 1e-10)),
                                   rtol=1e-4, atol=1e-4)
    from pahubert_plugin.criterions.separation import thresholded_snr_loss
    zeros = torch.zeros(1, 1, 1, 100)
    est = zeros.clone().requires_grad_(True)
    (10 * thresholded_snr_loss(est, zeros, 30.0).sum()).backward()  # one source, weight 10: no overflow either
    assert torch.isfinite(est.grad).all()
    # a gradient step on the SNR loss lowers it, and it keeps the estimate's level (no scale invariance)
    ref = torch.randn(3, 2, 1, 4000)
    est = (0.5 * ref).requires_grad_(True)
    crit.compute_loss(est, ref)[0].backward()
    assert float((est.grad[:, 0] * ref[:, 0]).sum()) < 0  # pushes the half-level speech estimate up
    with pytest.raises(ValueError, match="all 0"):
        SeparationCriterion(Task(), wave_weight=0.0, sources=["speech", "noise"])
    with pytest.raises(ValueError, match="snr_weight must be >= 0"):
        SeparationCriterion(Task(), snr_weight=-1.0, sources=["speech", "noise"])
    with pytest.raises(ValueError, match="snr_max"):
        SeparationCriterion(Task(), snr_weight=1.0, snr_max=0.0, sources=["speech", "noise"])


# ----------------------------------------------------------------------------- data

def test_splits_and_train_tracks(musdb_root):
    valid = split_tracks(str(musdb_root), "valid", SOURCES, SR, num_valid_tracks=1)
    train = split_tracks(str(musdb_root), "train", SOURCES, SR, num_valid_tracks=1)
    assert [t.name for t in valid] == ["train_02"] and [t.name for t in train] == ["train_00", "train_01"]
    first = split_tracks(str(musdb_root), "train", SOURCES, SR, num_valid_tracks=1, train_tracks=1)
    assert [t.name for t in first] == ["train_00"]
    with pytest.raises(ValueError, match="num_valid_tracks"):
        split_tracks(str(musdb_root), "valid", SOURCES, SR)
    test = split_tracks(str(musdb_root), "test", SOURCES, 44100)  # any rate: lengths follow it
    assert len(test) == 2 and test[0].num_samples == 3 * 44100


def test_training_crops_mix_and_augment(musdb_root):
    tracks = split_tracks(str(musdb_root), "train", SOURCES, SR, num_valid_tracks=1)
    ds = StemsChunkDataset(tracks, SOURCES, SR, 2, 4000, 4, Augment(), seed=3)
    a, b = ds[5], ds[5]
    assert a["target"].shape == (4, 2, 4000)
    torch.testing.assert_close(a["mixture"], a["target"].sum(0))
    torch.testing.assert_close(a["target"], b["target"])  # reproducible within an epoch
    ds.set_epoch(2)
    assert not torch.equal(ds[5]["target"], a["target"])  # fresh crops next epoch
    plain = StemsChunkDataset(tracks, SOURCES, SR, 2, 4000, 4, Augment(False, 1.0, 1.0, False, False), seed=3)
    item = plain[0]  # no augmentation: same offset of track 0 for every source, sums to its mixture
    mix = tracks[0].read("mixture", SR, 2)
    found = [o for o in range(0, mix.shape[-1] - 4000 + 1) if torch.allclose(mix[:, o:o + 4000], item["mixture"], atol=1e-3)]
    assert found, "unaugmented crop is not a crop of the track's mixture"
    batch = ds.collater([ds[0], ds[1]])
    assert batch["net_input"]["mixture"].shape == (2, 2, 4000) and batch["target"].shape == (2, 4, 2, 4000)


def test_bad_tracks_stop_with_the_track_name(corpora, tmp_path):
    root = corpora.write_layout(tmp_path / "m", train=2, test=0, seconds=1.0)
    os.remove(root / "train" / "train_01" / "bass.wav")
    with pytest.raises(ValueError, match="train_01.*bass.wav"):
        split_tracks(str(root), "train", SOURCES, SR, num_valid_tracks=1)
    root2 = corpora.write_layout(tmp_path / "n", train=2, test=0, seconds=1.0)
    (root2 / "train" / "train_00" / "vocals.wav").write_bytes(b"RIFF\x00\x00\x00\x00WAVEjunk")
    with pytest.raises(AudioError, match="train_00"):
        split_tracks(str(root2), "train", SOURCES, SR, num_valid_tracks=1)


# ----------------------------------------------------------------------------- fairseq runs

def lr_overrides(config, lr, warmup):
    """Learning rate and warm-up overrides for a recipe config (pahubert_* use a composite optimizer)."""
    if load_recipe_config(CONF / f"{config}.yaml").optimizer._name == "composite":
        group = "optimizer.groups.default"
        return [f"{group}.lr_float={lr}", f"{group}.lr_scheduler.warmup_updates={warmup}"]
    return [f"optimization.lr=[{lr}]", f"lr_scheduler.warmup_updates={warmup}"]


def finetune(config, data, save_dir, extra=(), max_update=20):
    args = [
        "fairseq_cli.hydra_train", "--config-dir", CONF, "--config-name", config,
        f"task.data={data}", f"common.user_dir={PLUGIN_DIR}", f"checkpoint.save_dir={save_dir}",
        "common.log_interval=5", "task.segment=0.5", "task.samples_per_track=10", "dataset.batch_size=2",
        "task.valid_seconds=3.0", "task.valid_segment=1.0", "dataset.validate_interval=100",
        "dataset.validate_interval_updates=10", f"optimization.max_update={max_update}",
        *lr_overrides(config, 0.003, 2), f"hydra.run.dir={save_dir}/hydra", *extra,
    ]
    log = run_fairseq(args, cwd=save_dir.parent, timeout=900)
    losses = [float(x) for x in re.findall(r"train_inner.* loss=([0-9.]+)", log)]
    sdrs = valid_sdrs(log)
    return log, losses, sdrs


@pytest.fixture(scope="module")
def resunet_ckpt(musdb_root, tmp_path_factory):
    save = tmp_path_factory.mktemp("resunet") / "ckpt"
    log, losses, sdrs = finetune("tiny", musdb_root, save)
    return save / "checkpoint_best.pt", log, losses, sdrs


@pytest.mark.slow
def test_resunet_finetunes_and_logs_sdr(resunet_ckpt):
    ckpt, log, losses, sdrs = resunet_ckpt
    assert len(losses) >= 4, log[-3000:]
    assert losses[-1] < losses[0], f"train loss did not fall: {losses}"
    assert len(sdrs) >= 2 and all(np.isfinite(sdrs)), log[-3000:]
    for src in SOURCES:
        assert f"sdr_{src} " in log
    assert "best_sdr" in log and ckpt.is_file()


@pytest.mark.slow
def test_separate_formats_rates_and_corrupt_file(resunet_ckpt, musdb_root, tmp_path):
    from pahubert_plugin.separate import main
    from pahubert_plugin.separation import Separator

    mix, _ = sf.read(musdb_root / "test" / "test_00" / "mixture.wav", dtype="float32")
    inputs = {
        "stereo44": (tmp_path / "stereo44.wav", mix[:30001], 44100, {}),
        "mono22": (tmp_path / "mono22.flac", mix[:20011, 0], 22050, {}),
        "song": (tmp_path / "song.mp3", mix, 16000, {}),
    }
    for path, data, sr, kw in inputs.values():
        sf.write(path, data, sr, **kw)
    bad = tmp_path / "broken.wav"
    bad.write_bytes(b"RIFF\x10\x00\x00\x00WAVEnot audio at all")
    out = tmp_path / "out"
    paths = [str(inputs["stereo44"][0]), str(bad), str(inputs["mono22"][0]), str(inputs["song"][0])]
    rc = main([str(resunet_ckpt[0]), *paths, "-o", str(out), "--segment", "1.0"])
    assert rc == 1  # one file failed, the others were separated
    assert not (out / "broken").exists()
    for name, (path, _, _, _) in inputs.items():
        info = sf.info(str(path))
        for src in SOURCES:
            got = sf.info(str(out / name / f"{src}.wav"))
            assert (got.frames, got.samplerate, got.channels) == (info.frames, info.samplerate, info.channels), name
    # the Python API: the input's shape back for every source, and the estimates are the model's own
    # chunked overlap-add output (the input is at the model's rate, so nothing is resampled)
    sep = Separator.from_checkpoint(str(resunet_ckpt[0]), segment=1.0)
    x = np.ascontiguousarray(mix.T[:, :12345], dtype=np.float32)
    stems = sep.separate(x, 16000)
    assert set(stems) == set(SOURCES) and all(v.shape == (2, 12345) for v in stems.values())
    ref = apply_model(sep.model, torch.from_numpy(x), 16000, overlap=sep.overlap)
    for i, src in enumerate(sep.sources):
        got = torch.as_tensor(stems[src])
        assert (got - ref[i]).abs().max() <= 1e-5 * float(np.abs(x).max()), src


@pytest.mark.slow
def test_separate_names_the_corrupt_file(resunet_ckpt, tmp_path, caplog):
    from pahubert_plugin.separate import main

    bad = tmp_path / "corrupt.flac"
    bad.write_bytes(b"fLaC garbage")
    with caplog.at_level("ERROR"):
        assert main([str(resunet_ckpt[0]), str(bad), "-o", str(tmp_path / "o")]) == 1
    assert "corrupt.flac" in caplog.text


@pytest.mark.slow
def test_evaluate_matches_museval_eval_mus_track(resunet_ckpt, musdb_root, tmp_path):
    import musdb
    import museval

    from pahubert_plugin.evaluate import main

    out = tmp_path / "eval"
    args = [str(resunet_ckpt[0]), "--musdb-root", str(musdb_root), "--is-wav", "--out", str(out),
            "--segment", "1.0", "--save-estimates"]
    assert main(args) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["num_tracks"] == 2 and set(summary["sources"]) == set(SOURCES)
    assert "| SDR |" in (out / "summary.md").read_text()
    db = musdb.DB(root=str(musdb_root), is_wav=True, subsets="test")
    for track in db.tracks[:1]:  # museval's own scoring of one track (it is the slow part)
        est = {s: sf.read(out / "estimates" / "test" / track.name / f"{s}.wav", dtype="float32")[0] for s in SOURCES}
        theirs = json.loads(museval.eval_mus_track(track, est).json)
        ours = json.loads((out / "test" / f"{track.name}.json").read_text())
        for a in theirs["targets"]:
            b = next(t for t in ours["targets"] if t["name"] == a["name"])
            for m in ("SDR", "SIR", "ISR", "SAR"):
                np.testing.assert_allclose([f["metrics"][m] for f in b["frames"]],
                                           [f["metrics"][m] for f in a["frames"]], atol=2e-4, err_msg=m)
    # re-run: every track is already scored and is skipped (the JSON is not rewritten)
    stamp = (out / "test" / "test_00.json").stat().st_mtime_ns
    assert main(args) == 0
    assert (out / "test" / "test_00.json").stat().st_mtime_ns == stamp
    # scores of another checkpoint (here: the same file, retrained = touched) are not mixed in
    os.utime(resunet_ckpt[0])
    assert main(args) == 2
    assert main(args + ["--force"]) == 0
    assert (out / "test" / "test_00.json").stat().st_mtime_ns != stamp


def test_evaluate_scores_whole_tracks_at_another_rate(corpora, resunet_ckpt, tmp_path):
    """Tracks stored at 44.1 kHz, a model at 16 kHz: every sample of the track is scored."""
    from pahubert_plugin.evaluate import main

    root = tmp_path / "hq"
    corpora.write_layout(root, train=1, test=1, seconds=2.5, sr=44100)
    out = tmp_path / "eval"
    assert main([str(resunet_ckpt[0]), "--musdb-root", str(root), "--is-wav", "--out", str(out),
                 "--segment", "1.0", "--save-estimates"]) == 0
    est = sf.info(str(out / "estimates" / "test" / "test_00" / "vocals.wav"))
    assert (est.samplerate, est.frames) == (44100, int(2.5 * 44100))
    frames = json.loads((out / "test" / "test_00.json").read_text())["targets"][0]["frames"]
    assert len(frames) == 2  # museval scores whole 1 s windows of the 2.5 s track


# ----------------------------------------------------------------------------- pahubert_resunet

def make_pretraining_checkpoint(path: Path, **model_kw):
    """A fairseq-style `pahubert` checkpoint from PahubertModel built directly (random weights)."""
    from fairseq import checkpoint_utils

    from pahubert_plugin.models.pahubert import PahubertConfig, PahubertModel

    model_over = dict(_name="pahubert", sample_rate=SR, audio_channels=2, label_rate=100, n_fft=512,
                      encoder_layers=2, encoder_embed_dim=32, encoder_ffn_embed_dim=64, encoder_attention_heads=2,
                      conv_pos=16, conv_pos_groups=4, stem_channels=[4, 8, 16], stem_freq_strides=[2, 2, 2],
                      stem_time_strides=[1, 1, 2], stem_units=1, attention_dropout=0.0, encoder_layerdrop=0.0,
                      final_dim=16)
    model_over.update(model_kw)
    root = OmegaConf.create({"model": model_over, "task": {"_name": "pahubert_pretraining", "sample_rate": SR,
                                                           "audio_channels": 2, "label_rate": 100}})
    model = PahubertModel(OmegaConf.merge(OmegaConf.structured(PahubertConfig), root.model), [8])
    state = {"args": None, "cfg": OmegaConf.to_container(root), "model": model.state_dict()}
    checkpoint_utils.torch_persistent_save(state, str(path))
    return model


def pahubert_resunet_cfg(pretrained, **kw):
    from pahubert_plugin.models.pahubert_resunet import PahubertResUNetConfig

    return OmegaConf.merge(OmegaConf.structured(PahubertResUNetConfig), dict(
        **{"_name": "pahubert_resunet", "sources": SOURCES, "sample_rate": SR, "audio_channels": 2,
           "pretrained_checkpoint": str(pretrained), "decoder_units": 1, **kw}))


def test_pahubert_resunet_copies_encoder_exactly(tmp_path):
    from pahubert_plugin.models.pahubert_resunet import PahubertResUNetModel

    pre = make_pretraining_checkpoint(tmp_path / "pre.pt")
    model = PahubertResUNetModel.build_model(pahubert_resunet_cfg(tmp_path / "pre.pt"))
    theirs, ours = pre.encoder.state_dict(), model.encoder.state_dict()
    assert set(theirs) == set(ours)
    for k in theirs:
        assert torch.equal(theirs[k], ours[k]), k
    scratch = PahubertResUNetModel.build_model(pahubert_resunet_cfg(tmp_path / "pre.pt", no_pretrained_weights=True))
    assert not torch.equal(scratch.encoder.post_extract_proj.weight, pre.encoder.post_extract_proj.weight)
    out = model.eval()(torch.randn(1, 2, 7001))
    assert out.shape == (1, 4, 2, 7001)
    # frozen encoder: no gradient reaches it before freeze_encoder_updates
    frozen = PahubertResUNetModel.build_model(pahubert_resunet_cfg(tmp_path / "pre.pt", freeze_encoder_updates=5))
    frozen.train()(torch.randn(1, 2, 4000)).abs().mean().backward()
    assert all(p.grad is None for p in frozen.encoder.parameters())
    assert frozen.proj.weight.grad is not None


def test_pahubert_resunet_decoder_skips_route_through_the_transformer(tmp_path):
    """decoder_skips=N keeps the N shallowest stem skips; the others never reach the output."""
    from pahubert_plugin.models.pahubert_resunet import PahubertResUNetModel

    make_pretraining_checkpoint(tmp_path / "pre.pt")
    full = PahubertResUNetModel.build_model(pahubert_resunet_cfg(tmp_path / "pre.pt")).eval()
    assert full.decoder.uses_skip == [True, True, True]
    one = PahubertResUNetModel.build_model(pahubert_resunet_cfg(tmp_path / "pre.pt", decoder_skips=1)).eval()
    assert one.decoder.uses_skip == [False, False, True]  # deepest first: only block 1's skip is used
    none = PahubertResUNetModel.build_model(pahubert_resunet_cfg(tmp_path / "pre.pt", decoder_skips=0)).eval()
    with torch.no_grad():
        enc = full.encoder(torch.randn(1, 2, 3200))
    x, skips = enc.front.context.bottleneck, enc.front.skips  # shapes of a real forward pass
    other = [torch.randn_like(s) for s in skips]
    with torch.no_grad():
        assert torch.equal(none.decoder(x, skips), none.decoder(x, other))
        kept = [other[0]] + skips[1:]
        assert torch.equal(one.decoder(x, skips), one.decoder(x, [skips[0]] + other[1:]))
        assert not torch.equal(one.decoder(x, skips), one.decoder(x, kept))
        assert not torch.equal(full.decoder(x, skips), full.decoder(x, [skips[0], other[1], skips[2]]))
    for model in (one, none):
        assert model(torch.randn(1, 2, 3001)).shape == (1, 4, 2, 3001)


def test_pahubert_resunet_layer_weights_mix_every_layer(tmp_path):
    from pahubert_plugin.models.pahubert_resunet import PahubertResUNetModel

    make_pretraining_checkpoint(tmp_path / "pre.pt")
    plain = PahubertResUNetModel.build_model(pahubert_resunet_cfg(tmp_path / "pre.pt")).eval()
    mixed = PahubertResUNetModel.build_model(pahubert_resunet_cfg(tmp_path / "pre.pt", layer_weights=True)).eval()
    assert mixed.layer_weights.shape == (2,)  # one weight per transformer layer
    mixed.load_state_dict({**plain.state_dict(), "layer_weights": torch.tensor([-1e4, 1e4])})
    wav = torch.randn(1, 2, 4000, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():  # all weight on the last layer: the plain model's output exactly
        torch.testing.assert_close(mixed(wav), plain(wav), rtol=0, atol=1e-6)
        mixed.layer_weights.copy_(torch.tensor([1e4, -1e4]))  # all on layer 1: other decoder input
        feats = plain.encoder(wav).layer_results
        assert not torch.allclose(feats[0][0], feats[1][0])
        assert not torch.equal(mixed(wav), plain(wav))
    with torch.no_grad():
        mixed.layer_weights.zero_()  # a softmax saturated at +-1e4 has no gradient
    mixed.train()(wav).abs().mean().backward()
    assert mixed.layer_weights.grad is not None and mixed.layer_weights.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="encoder_layerdrop=0"):
        PahubertResUNetModel.build_model(pahubert_resunet_cfg(tmp_path / "pre.pt", layer_weights=True,
                                                              encoder_layerdrop=0.1))


def test_stem_norm_group_has_no_running_statistics(tmp_path):
    """stem_norm=group: GroupNorm in stem, bottleneck and decoder; train and eval mode agree."""
    from pahubert_plugin.models.pahubert_resunet import PahubertResUNetModel

    make_pretraining_checkpoint(tmp_path / "gn.pt", stem_norm="group", dropout=0.0, dropout_input=0.0)
    model = PahubertResUNetModel.build_model(pahubert_resunet_cfg(tmp_path / "gn.pt"))
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    assert sum(isinstance(m, torch.nn.GroupNorm) for m in model.modules()) > 10
    wav = torch.randn(2, 2, 4000)
    with torch.no_grad():
        torch.testing.assert_close(model.train()(wav), model.eval()(wav))
    # a checkpoint written before the option existed (no stem_norm key) still builds with BatchNorm
    make_pretraining_checkpoint(tmp_path / "bn.pt")
    from pahubert_plugin.checkpoint import load_checkpoint

    state = load_checkpoint(str(tmp_path / "bn.pt"))  # the allow-listed loader, as every user path
    state["cfg"]["model"].pop("stem_norm", None)
    torch.save(state, tmp_path / "old.pt")
    old = PahubertResUNetModel.build_model(pahubert_resunet_cfg(tmp_path / "old.pt"))
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in old.encoder.front_end.stem.modules())


def test_pahubert_resunet_fine_tuning_masks_and_stem_override(tmp_path):
    """mask_prob > 0 masks transformer input spans in training only, reproducibly for a seed;
    encoder_feature_grad_mult overrides the pretrained encoder's (a frozen-stem pretraining can
    fine-tune its stem)."""
    from pahubert_plugin.models.pahubert_resunet import PahubertResUNetModel

    make_pretraining_checkpoint(tmp_path / "pre.pt", dropout=0.0, dropout_input=0.0, feature_grad_mult=0.0)
    plain = PahubertResUNetModel.build_model(pahubert_resunet_cfg(tmp_path / "pre.pt"))
    masked = PahubertResUNetModel.build_model(pahubert_resunet_cfg(tmp_path / "pre.pt", mask_prob=0.9,
                                                                   mask_length=3))
    masked.load_state_dict(plain.state_dict())
    assert (plain.encoder.mask_prob, masked.encoder.mask_prob, masked.encoder.mask_length) == (0.0, 0.9, 3)
    wav = torch.randn(2, 2, 8000, generator=torch.Generator().manual_seed(0))
    runs = []
    for _ in range(2):
        torch.manual_seed(3)
        runs.append(masked.train()(wav))
    torch.testing.assert_close(runs[0], runs[1], rtol=0, atol=0)  # same seed, same masks
    torch.manual_seed(3)
    assert not torch.allclose(runs[0], plain.train()(wav))  # masking changed the training forward
    masked.load_state_dict(plain.state_dict())  # the same BatchNorm statistics
    with torch.no_grad():
        torch.testing.assert_close(masked.eval()(wav), plain.eval()(wav), rtol=0, atol=0)  # never at test time
    # the stem: frozen as pretrained (feature_grad_mult 0) unless the fine-tuning config overrides it
    for model, trains in ((plain, False), (PahubertResUNetModel.build_model(pahubert_resunet_cfg(
            tmp_path / "pre.pt", encoder_feature_grad_mult=1.0)), True)):
        model.zero_grad()
        model.train()(wav).abs().mean().backward()
        grads = [p.grad for p in model.encoder.front_end.stem.parameters()]
        assert any(g is not None and g.abs().sum() > 0 for g in grads) == trains


def test_pahubert_resunet_reinit_layers_keeps_the_scratch_init_on_top(tmp_path):
    from pahubert_plugin.models.pahubert_resunet import PahubertResUNetModel

    pre = make_pretraining_checkpoint(tmp_path / "pre.pt")
    torch.manual_seed(5)
    scratch = PahubertResUNetModel.build_model(pahubert_resunet_cfg(tmp_path / "pre.pt", no_pretrained_weights=True))
    torch.manual_seed(5)
    mixed = PahubertResUNetModel.build_model(pahubert_resunet_cfg(tmp_path / "pre.pt", reinit_layers=1))
    layers = lambda m: m.transformer.layers if hasattr(m, "transformer") else m.encoder.transformer.layers
    for k, v in layers(mixed)[1].state_dict().items():  # the top layer: exactly the scratch arm's init
        assert torch.equal(v, layers(scratch)[1].state_dict()[k]), k
    for k, v in layers(mixed)[0].state_dict().items():  # below it: the pretrained weights
        assert torch.equal(v, layers(pre.encoder)[0].state_dict()[k]), k
    for k, v in mixed.encoder.front_end.stem.state_dict().items():  # the stem: pretrained
        assert torch.equal(v, pre.encoder.front_end.stem.state_dict()[k]), k
    torch.manual_seed(5)
    pos = PahubertResUNetModel.build_model(pahubert_resunet_cfg(tmp_path / "pre.pt", reinit_pos_conv=True))
    for k, v in pos.encoder.transformer.pos_conv.state_dict().items():
        assert torch.equal(v, scratch.encoder.transformer.pos_conv.state_dict()[k]), k
    for k, v in layers(pos)[1].state_dict().items():
        assert torch.equal(v, layers(pre.encoder)[1].state_dict()[k]), k
    with pytest.raises(ValueError, match="reinit_layers=3: the encoder has 2 transformer layers"):
        PahubertResUNetModel.build_model(pahubert_resunet_cfg(tmp_path / "pre.pt", reinit_layers=3))


def test_pahubert_resunet_rejects_wrong_checkpoints(tmp_path):
    from fairseq import checkpoint_utils

    from pahubert_plugin.models.pahubert_resunet import PahubertResUNetModel

    sep = tiny_resunet()
    cfg = {"model": {"_name": "resunet"}, "task": {"_name": "music_separation", "sample_rate": SR}}
    checkpoint_utils.torch_persistent_save({"args": None, "cfg": cfg, "model": sep.state_dict()}, str(tmp_path / "r.pt"))
    with pytest.raises(ValueError, match=r"r\.pt.*expected a 'pahubert' pretraining checkpoint, found model 'resunet'"):
        PahubertResUNetModel.build_model(pahubert_resunet_cfg(tmp_path / "r.pt"))
    torch.save({"weights": torch.zeros(3)}, tmp_path / "plain.pt")
    with pytest.raises(ValueError, match="not a fairseq checkpoint"):
        PahubertResUNetModel.build_model(pahubert_resunet_cfg(tmp_path / "plain.pt"))
    with pytest.raises(ValueError, match="pretrained_checkpoint"):
        PahubertResUNetModel.build_model(pahubert_resunet_cfg(""))
    make_pretraining_checkpoint(tmp_path / "pre.pt")
    with pytest.raises(ValueError, match="44100 Hz"):
        PahubertResUNetModel.build_model(pahubert_resunet_cfg(tmp_path / "pre.pt", sample_rate=44100))


@pytest.mark.slow
def test_pahubert_resunet_finetunes_and_loads_without_pretraining_file(musdb_root, tmp_path):
    from pahubert_plugin.separation import Separator

    pre = tmp_path / "pre.pt"
    make_pretraining_checkpoint(pre)
    save = tmp_path / "ckpt"
    log, losses, sdrs = finetune("pahubert_tiny", musdb_root, save, [f"model.pretrained_checkpoint={pre}"])
    assert "loaded" in log and "encoder tensors" in log
    assert len(losses) >= 4 and losses[-1] < losses[0], f"train loss did not fall: {losses}"
    assert len(sdrs) >= 2 and all(np.isfinite(sdrs))
    os.remove(pre)  # the fine-tuned checkpoint carries the encoder config
    sep = Separator.from_checkpoint(str(save / "checkpoint_best.pt"), segment=1.0)
    stems = sep.separate(torch.randn(2, 5000) * 0.1, SR)
    assert stems["vocals"].shape == (2, 5000)


def test_resunet_strides_as_lists_and_the_older_string_build_the_same_network():
    """freq_strides/time_strides (pahubert's naming) replaced the '[[f,t],...]' string; a checkpoint that
    still holds the string rebuilds the same network, and mismatched lengths are refused by name."""
    from pahubert_plugin.models.resunet import ResUNetConfig, ResUNetModel

    common = dict(sources=SOURCES, sample_rate=SR, audio_channels=2, n_fft=512, channels=[4, 8], units=1,
                  bottleneck_units=1)
    torch.manual_seed(0)
    new = ResUNetModel(ResUNetConfig(freq_strides=[4, 2], time_strides=[2, 1], **common)).eval()
    old = ResUNetModel(ResUNetConfig(strides="[[4,2],[2,1]]", **common)).eval()
    old.load_state_dict(new.state_dict())
    assert [p.kernel_size for p in new.net.encoder.pools] == [(4, 2), (2, 1)]
    mix = torch.randn(1, 2, 4000)
    with torch.no_grad():
        assert torch.equal(new(mix), old(mix))
    with pytest.raises(ValueError, match="must have the same length"):
        ResUNetModel(ResUNetConfig(freq_strides=[4, 2], time_strides=[2], **common))
    with pytest.raises(ValueError, match="1 strides for 2 encoder blocks"):
        ResUNetModel(ResUNetConfig(strides="[[4,2]]", **common))


@pytest.mark.slow
def test_separator_maps_the_checkpoint_instead_of_reading_it(resunet_ckpt, tmp_path):
    """A fine-tuned checkpoint also holds the optimizer state (under Adam two more copies of the weights:
    1.1 GB for pahubert_resunet base). Separator.from_checkpoint maps the file, so what the model does not
    copy never becomes resident: 400 MB of extra optimizer state add almost nothing to the peak RSS of
    loading (read whole, they added 425 MB), and the model works after the file is gone."""
    import subprocess
    import sys

    from pahubert_plugin.checkpoint import load_checkpoint

    state = load_checkpoint(str(resunet_ckpt[0]))
    state["last_optimizer_state"]["unread"] = torch.ones(100 * 2 ** 20)  # 400 MB
    padded = tmp_path / "padded.pt"
    torch.save(state, padded)
    del state
    code = ("import resource, sys, numpy as np\n"
            "import pahubert_plugin; pahubert_plugin.register()\n"
            "from pahubert_plugin.separation import Separator\n"
            "import fairseq.checkpoint_utils, torch, os\n"
            "peak = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024\n"
            "before = peak()\n"
            "sep = Separator.from_checkpoint(sys.argv[1], segment=1.0)\n"
            "grew = peak() - before\n"
            "os.remove(sys.argv[1])\n"
            "stems = sep.separate(np.zeros((2, 8000), np.float32) + 0.1, 16000)\n"
            "print('grew', grew, len(stems))\n")
    proc = subprocess.run([sys.executable, "-c", code, str(padded)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    grew, n = proc.stdout.split()[-2:]
    assert float(grew) < 150 and int(n) == len(SOURCES), proc.stdout


@pytest.mark.slow
def test_separation_model_weights_are_the_mapped_checkpoint_not_a_copy(resunet_ckpt):
    """load_separation_model assigns the checkpoint's (mapped) tensors to the model instead of copying them
    into a freshly initialised one, as fairseq's loader does: the parameters lie in the file's mapping, and
    the model computes exactly what fairseq's load_model_ensemble_and_task model computes."""
    from fairseq import checkpoint_utils

    from pahubert_plugin.separation import load_separation_model

    ckpt = str(resunet_ckpt[0])
    model, cfg = load_separation_model(ckpt)
    (ref,), _, _ = checkpoint_utils.load_model_ensemble_and_task([ckpt])
    ref.eval()
    real = os.path.realpath(ckpt)
    spans = []
    with open("/proc/self/maps") as maps:
        for line in maps:
            fields = line.split()
            if len(fields) >= 6 and os.path.realpath(fields[5]) == real:
                lo, hi = (int(v, 16) for v in fields[0].split("-"))
                spans.append((lo, hi))
    params = list(model.parameters())
    inside = [p for p in params if any(lo <= p.data_ptr() < hi for lo, hi in spans)]
    assert spans and len(inside) == len(params), (len(spans), len(inside), len(params))
    assert all(p.requires_grad == q.requires_grad for p, q in zip(model.parameters(), ref.parameters()))
    mix = torch.randn(1, 2, 8000) * 0.3
    with torch.inference_mode():
        assert torch.equal(model(mix), ref(mix))


@pytest.mark.slow
def test_loading_a_checkpoint_holds_its_weights_once(tmp_path):
    """Peak RSS of loading a separation checkpoint and separating 1 s with it grows by about one copy of the
    weights: fairseq's loader copied the file's tensors into a randomly initialised model, so for a moment
    both counted (the peak of a whole 10 s demucs_v2 base separation: 3005 MiB against 1834 now)."""
    import subprocess
    import sys

    sys.path.insert(0, str(REPO / "benchmarks"))
    from bench_separate import save_checkpoint

    from pahubert_plugin.models.demucs_v2 import DemucsV2Config, DemucsV2Model

    cfg = DemucsV2Config(channels=48, depth=5, lstm_layers=2)
    model = DemucsV2Model(cfg, SOURCES, 44100, 2)
    model.bench_cfg = cfg
    weights_mb = sum(p.numel() * p.element_size() for p in model.parameters()) / 2 ** 20
    assert weights_mb > 100
    ckpt = tmp_path / "big.pt"
    save_checkpoint(model, 1.0, str(ckpt))
    del model
    code = ("import resource, sys, numpy as np\n"
            "import pahubert_plugin; pahubert_plugin.register()\n"
            "import torch, fairseq.checkpoint_utils\n"
            "from pahubert_plugin.separation import Separator\n"
            "peak = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024\n"
            "before = peak()\n"
            "sep = Separator.from_checkpoint(sys.argv[1])\n"
            "stems = sep.separate(np.zeros((2, 44100), np.float32) + 0.1, 44100)\n"
            "print('grew', peak() - before, len(stems))\n")
    proc = subprocess.run([sys.executable, "-c", code, str(ckpt)], capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    grew, n = proc.stdout.split()[-2:]
    assert int(n) == len(SOURCES)
    # measured with 142.5 MB of weights: 77 MB now, 209 MB with fairseq's copy (the import's transient
    # peak hides part of either)
    assert float(grew) < weights_mb, (float(grew), weights_mb)
