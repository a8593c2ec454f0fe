"""Pac-HuBERT pretraining: real fairseq training of the tiny config on audio made here.

The corpus is a repeating sequence of K tones (each held SEGMENT frames) whose 100 Hz labels
are the tone index: a masked frame's label is predictable from its context, so masked
accuracy must climb well above chance (1/K).
"""
import os
import re
import signal
import socket
import subprocess
import sys

import numpy as np
import pytest
import soundfile as sf
import torch

import pahubert_plugin
from pahubert_plugin import frames
from helpers import REPO, SR, overrides, run_fairseq, train_records, write_bad_label
from pahubert_plugin.configs import load_recipe_config

TONES = (262.0, 440.0, 740.0, 1245.0)  # K = 4
SEGMENT = 10  # frames per tone
UPDATES = 32  # updates of the shared tiny run
CONF = REPO / "recipes" / "pahubert" / "conf" / "pretrain"


@pytest.fixture(scope="module")
def trained(corpora, tmp_path_factory):
    """One tiny pretraining run shared by the checks below (about a minute on 2 cores)."""
    root = tmp_path_factory.mktemp("pretrain")
    data = corpora.write_corpus(root / "data")
    save = root / "ckpt"
    log = run_fairseq(["fairseq_cli.hydra_train", *overrides(data, save, UPDATES, "model.mask_prob=0.5")], cwd=root)
    return data, save, log


@pytest.mark.slow
def test_tiny_pretraining_learns_from_context(trained):
    data, save, log = trained
    inner = [r for kind, r in train_records(log) if kind == "train_inner"]
    assert inner, log[-3000:]
    assert max(_updates(log)) == UPDATES
    losses = [float(r["loss"]) for r in inner]
    assert losses[-1] < 0.7 * losses[0], losses
    # correct_m_0 is HuBERT's masked accuracy; chance is 1 / K
    acc_m = [float(r["correct_m_0"]) for r in inner]
    assert acc_m[-1] > 2.5 / len(TONES), acc_m
    assert "correct_u_0" in inner[-1]
    valid = [r for kind, r in train_records(log) if kind == "valid"]
    assert valid and float(valid[-1]["valid_correct_m_0"]) > 2.5 / len(TONES), valid[-1:]


@pytest.mark.slow
def test_checkpoint_loads_with_fairseq(corpora, trained):
    from fairseq import checkpoint_utils
    from fairseq.models import MODEL_REGISTRY
    from fairseq.tasks import TASK_REGISTRY
    from pahubert_plugin.models.pahubert import PahubertModel, encoder_config
    from pahubert_plugin.tasks.pahubert_pretraining import PahubertPretrainingTask

    data, save, _ = trained
    assert MODEL_REGISTRY["pahubert"] is PahubertModel
    assert TASK_REGISTRY["pahubert_pretraining"] is PahubertPretrainingTask
    models, cfg, task = checkpoint_utils.load_model_ensemble_and_task([str(save / "checkpoint_last.pt")])
    model = models[0].eval()
    assert isinstance(model, PahubertModel) and isinstance(task, PahubertPretrainingTask)
    assert sum(p.numel() for p in model.parameters()) <= 2_000_000
    wav = torch.from_numpy(corpora.tone_sequence(SR, channels=2)[0].T.copy())[None]  # (1, 2, samples)
    feats, pad = model.extract_features(wav, output_layer=2)
    assert feats.shape == (1, 100, 128) and pad is None
    # the saved config rebuilds the encoder alone (what the separation model does)
    ecfg = encoder_config(cfg)
    assert (ecfg.sample_rate, ecfg.audio_channels, ecfg.label_rate) == (SR, 2, 100)


def test_token_count_equals_label_count(corpora, tmp_path):
    """Random lengths: tokens per clip == labels per manifest row (== frames rule), and the
    dataset's batches line up with the model's tokens."""
    from pahubert_plugin.models.pahubert import PahubertModel, _tie_to_task, PahubertConfig
    from omegaconf import OmegaConf

    task_cfg = OmegaConf.create({"sample_rate": SR, "audio_channels": 2, "label_rate": 100.0})
    cfg = _tie_to_task(OmegaConf.structured(PahubertConfig), task_cfg)
    cfg.merge_with({"encoder_layers": 1, "encoder_embed_dim": 32, "encoder_ffn_embed_dim": 64,
                    "encoder_attention_heads": 2, "conv_pos": 8, "conv_pos_groups": 4,
                    "stem_channels": [4, 8], "stem_freq_strides": [4, 4], "stem_time_strides": [1, 1],
                    "stem_units": 1})
    model = PahubertModel(cfg, [8]).eval()
    rng = np.random.default_rng(1)
    for n in rng.integers(SR // 4, 3 * SR, size=6):
        wav = torch.zeros(1, 2, int(n))
        feats, _ = model.extract_features(wav)
        labels = len(corpora.tone_sequence(int(n))[1])
        assert feats.shape[1] == labels, (n, feats.shape, labels)  # the frame rule is exact
        assert labels == frames.num_frames(int(n), SR)

    # through the task's dataset: batch tokens vs collated label frames
    from pahubert_plugin.tasks.pahubert_pretraining import PahubertPretrainingConfig, PahubertPretrainingTask
    data = corpora.write_corpus(tmp_path / "data", n_train=5, n_valid=1, seed=3, min_s=0.6, max_s=2.0)
    tcfg = OmegaConf.structured(PahubertPretrainingConfig(
        data=str(data), label_dir=str(data), sample_rate=SR, audio_channels=2, max_sample_size=20000,
        min_sample_size=1000))
    task = PahubertPretrainingTask.setup_task(tcfg)
    task.load_dataset("train")
    ds = task.dataset("train")
    batch = ds.collater([ds[i] for i in range(len(ds))])
    src = batch["net_input"]["source"]
    assert src.dim() == 3 and src.shape[1] == 2
    tokens = model.extract_features(src, batch["net_input"]["padding_mask"])[0].shape[1]
    assert tokens == batch["target_list"][0].shape[1]
    # the mono file was duplicated to both channels
    mono = ds[0]["source"]  # (samples, channels)
    assert torch.equal(mono[:, 0], mono[:, 1])


def test_shortened_label_line_names_the_row(corpora, tmp_path):
    from omegaconf import OmegaConf
    from pahubert_plugin.tasks.pahubert_pretraining import PahubertPretrainingConfig, PahubertPretrainingTask

    data = corpora.write_corpus(tmp_path / "data", n_train=4, n_valid=1)
    lines = (data / "train.km").read_text().splitlines()
    lines[2] = " ".join(lines[2].split()[:-5])  # row 3 loses 5 frames (tolerance is 2)
    (data / "train.km").write_text("\n".join(lines) + "\n")
    cfg = OmegaConf.structured(PahubertPretrainingConfig(
        data=str(data), label_dir=str(data), sample_rate=SR, channels=2, min_sample_size=1000))
    task = PahubertPretrainingTask.setup_task(cfg)
    with pytest.raises(ValueError, match=r"line 3 has \d+ labels.*row 3 .*train2\.wav") as err:
        task.load_dataset("train")
    n = int((data / "train.tsv").read_text().splitlines()[3].split("\t")[1])
    assert f"needs {frames.num_frames(n, SR)}" in str(err.value)
    task.load_dataset("valid")  # untouched split still loads


def test_dataset_reads_only_the_crop_at_another_rate(corpora, tmp_path):
    """A 44.1 kHz file read for a 16 kHz task: resampled, frame-aligned crop, labels sliced."""
    from pahubert_plugin.data.hubert_dataset import PahubertDataset
    from fairseq.data import Dictionary
    from fairseq.tasks.hubert_pretraining import LabelEncoder

    n16 = 3 * SR
    wav16, labels = corpora.tone_sequence(n16)
    sf.write(tmp_path / "a.wav", corpora.tone_sequence(3 * 44100, sr=44100)[0], 44100)
    (tmp_path / "train.tsv").write_text(f"{tmp_path}\na.wav\t{n16}\n")
    (tmp_path / "train.km").write_text(" ".join(map(str, labels)) + "\n")
    (tmp_path / "dict.km.txt").write_text("".join(f"{k} 1\n" for k in range(len(TONES))))
    d = Dictionary.load(str(tmp_path / "dict.km.txt"))
    ds = PahubertDataset(str(tmp_path / "train.tsv"), SR, [str(tmp_path / "train.km")], 100.0,
                         [d.pad()], [d.eos()], channels=2, label_processors=[LabelEncoder(d)],
                         max_sample_size=8000, random_crop=True)
    np.random.seed(0)
    for _ in range(3):
        item = ds[0]
        assert item["source"].shape == (8000, 2)
        lab = item["label_list"][0] - d.nspecial
        assert len(lab) == 50
        # the crop's labels are a contiguous window of the clip's labels
        starts = [s for s in range(len(labels) - 49) if np.array_equal(labels[s:s + 50], lab.numpy())]
        assert starts


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _updates(log):
    """Update counts in the train_inner and end-of-epoch train records of a log."""
    return [int(r.get("num_updates", r.get("train_num_updates"))) for kind, r in train_records(log)
            if kind in ("train_inner", "train")]


@pytest.mark.slow
def test_sigkill_resumes_from_checkpoint_last(corpora, tmp_path):
    data = corpora.write_corpus(tmp_path / "data", n_train=6, n_valid=1)
    save = tmp_path / "ckpt"
    common = ("dataset.batch_size=2", "common.log_interval=1", "checkpoint.save_interval_updates=4")
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="2")
    proc = subprocess.Popen([sys.executable, "-m", "fairseq_cli.hydra_train", *map(str, overrides(data, save, 500, *common))],
                            cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    saved, seen = None, []
    try:
        # kill right after a periodic save has been written: mid-training, not mid-write
        for line in proc.stdout:
            seen.append(line)
            m = re.search(r"Saved checkpoint .*\(epoch \d+ @ (\d+) updates", line)
            if m and int(m.group(1)) >= 4:
                saved = int(m.group(1))
                break
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    assert saved is not None, "".join(seen[-40:])
    assert proc.returncode == -signal.SIGKILL
    from fairseq import checkpoint_utils
    state = checkpoint_utils.load_checkpoint_to_cpu(str(save / "checkpoint_last.pt"))
    assert state["optimizer_history"][-1]["num_updates"] == saved

    log = run_fairseq(["fairseq_cli.hydra_train", *overrides(data, save, saved + 3, *common)], cwd=tmp_path)
    assert re.search(rf"Loaded checkpoint .*checkpoint_last\.pt \(epoch \d+ @ {saved} updates\)", log), log[-3000:]
    ups = _updates(log)
    assert ups and min(ups) == saved + 1 and max(ups) == saved + 3, ups


@pytest.mark.slow
def test_two_process_data_parallel_on_cpu(corpora, tmp_path):
    """DESIGN.md's CPU recipe: one process per rank, gloo, tcp init, legacy_ddp."""
    data = corpora.write_corpus(tmp_path / "data", n_train=6, n_valid=1)
    save = tmp_path / "ckpt"
    port = _free_port()
    procs = []
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    for rank in range(2):
        args = overrides(
            data, save, 2, "dataset.batch_size=2", "common.log_interval=1", "checkpoint.save_interval_updates=2",
            "distributed_training.distributed_backend=gloo", "distributed_training.distributed_world_size=2",
            f"distributed_training.distributed_rank={rank}", "distributed_training.distributed_no_spawn=true",
            f"distributed_training.distributed_init_method=tcp://127.0.0.1:{port}",
            "distributed_training.ddp_backend=legacy_ddp", "distributed_training.device_id=0",
            f"hydra.run.dir={save}/hydra{rank}",
        )
        procs.append(subprocess.Popen([sys.executable, "-m", "fairseq_cli.hydra_train", *map(str, args)],
                                      cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True))
    logs = []
    for p in procs:
        out, _ = p.communicate(timeout=300)
        logs.append(out)
        assert p.returncode == 0, out[-4000:]
    assert "distributed init (rank 1)" in logs[0] + logs[1]
    assert re.search(r"training on 2 devices", logs[0]), logs[0][-3000:]
    assert max(_updates(logs[0])) == 2
    assert (save / "checkpoint_last.pt").is_file()


@pytest.mark.slow  # shares the trained fixture
def test_stage5_reader_dims_and_frames_on_cpu(corpora, trained):
    from pahubert_plugin.clustering.hubert_reader import HubertFeatureReader

    data, save, _ = trained
    reader = HubertFeatureReader(str(save / "checkpoint_last.pt"), layer=2, sample_rate=SR, device="cpu",
                                 max_chunk=0.5137)  # seconds: several chunks, cut to whole frames
    path, n = (data / "train.tsv").read_text().splitlines()[1].split("\t")
    feats = reader.get_feats(str(data / path), ref_len=int(n))
    assert tuple(feats.shape) == (frames.num_frames(int(n), SR), 128)
    assert torch.isfinite(torch.as_tensor(feats)).all()
    # a 44.1 kHz file for the same clip gives the same number of 100 Hz frames
    wav44, _ = corpora.tone_sequence(int(2.5 * 44100), sr=44100, channels=2)
    sf.write(data / "hq.wav", wav44, 44100)
    reader44 = HubertFeatureReader(str(save / "checkpoint_last.pt"), layer=4, sample_rate=44100, device="cpu")
    feats44 = reader44.get_feats(str(data / "hq.wav"), ref_len=len(wav44))
    assert tuple(feats44.shape) == (250, 128)
    # extract() on a waveform (what label_quality uses) equals get_feats() on the file
    from pahubert_plugin.data.audio import read_audio
    wav, _ = read_audio(data / "hq.wav", 44100)
    torch.testing.assert_close(reader44.extract(wav), feats44, atol=1e-4, rtol=1e-4)


def test_two_label_sets_each_with_its_weight(corpora, tmp_path):
    """criterion.label_weights weighs each label set's loss; logs carry both sets' accuracies."""
    from omegaconf import OmegaConf
    from pahubert_plugin.criterions.pahubert import PahubertCriterion, PahubertCriterionConfig
    from pahubert_plugin.tasks.pahubert_pretraining import PahubertPretrainingConfig, PahubertPretrainingTask

    data = corpora.write_corpus(tmp_path / "data", n_train=3, n_valid=1)
    # a second, coarser label set: high vs low tone
    coarse = [" ".join(str(int(t) // 2) for t in line.split())
              for line in (data / "train.km").read_text().splitlines()]
    (data / "train.hl").write_text("\n".join(coarse) + "\n")
    (data / "dict.hl.txt").write_text("0 1\n1 1\n")
    tcfg = OmegaConf.structured(PahubertPretrainingConfig(
        data=str(data), label_dir=str(data), labels=["km", "hl"], sample_rate=SR, channels=2,
        max_sample_size=16000, min_sample_size=1000))
    task = PahubertPretrainingTask.setup_task(tcfg)
    task.load_dataset("train")
    ds = task.dataset("train")
    batch = ds.collater([ds[i] for i in range(len(ds))])
    assert len(batch["target_list"]) == 2

    model_cfg = load_recipe_config(CONF / "tiny.yaml").model
    for key in ("label_rate", "sample_rate", "audio_channels"):
        del model_cfg[key]
    model = task.build_model(model_cfg)
    assert model.head.num_classes == [len(TONES) + 4, 2 + 4]
    crit = PahubertCriterion(task, 1.0, 0.0, [10.0], None, [1.0, 0.25])
    loss, sample_size, log = crit(model, batch)
    expected = log["loss_m_0"] + 0.25 * log["loss_m_1"] + log["loss_features_pen"]
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    assert sample_size == log["count_m_0"] == log["count_m_1"] > 0
    assert {"correct_m_0", "correct_m_1", "correct_u_0", "correct_u_1"} <= set(log)
    loss.backward()
    with pytest.raises(ValueError, match="one weight per set"):
        PahubertCriterion(task, 1.0, 0.0, None, None, [1.0])
    assert PahubertCriterion.logging_outputs_can_be_summed()
    assert PahubertCriterionConfig().label_weights is None


def test_cosine_logits_equal_fairseq_compute_nce():
    """The head's matrix-product logits are fairseq's HubertModel.compute_nce: same values, same -inf
    where a label embedding equals the target's (here two duplicated rows), same gradients."""
    from pahubert_plugin.models.hubert_encoder import MaskedPredictionHead

    torch.manual_seed(0)
    head = MaskedPredictionHead(32, [20], 1.0, final_dim=16)
    x = torch.randn(50, 16, requires_grad=True)
    emb = torch.rand(20, 16)
    emb[7] = emb[3]
    emb.requires_grad_()
    target = torch.randint(0, 20, (50,))
    target[:2] = torch.tensor([3, 7])
    fast = head.cosine_logits(x, target, emb)
    ref = head.compute_nce(x, emb[target], emb.unsqueeze(1).expand(-1, 50, -1))
    assert fast.shape == ref.shape == (50, 21)
    assert torch.equal(torch.isinf(fast), torch.isinf(ref))
    assert torch.isinf(fast[0, 1 + 7]) and torch.isinf(fast[1, 1 + 3]) and torch.isinf(fast[:, 1:]).sum() == 2 * 50 - \
        int(((target != 3) & (target != 7)).sum())
    finite = torch.isfinite(ref)
    torch.testing.assert_close(fast[finite], ref[finite], atol=1e-5, rtol=1e-5)
    grads = [torch.autograd.grad(torch.log_softmax(lg, -1)[:, 0].sum(), [x, emb]) for lg in (fast, ref)]
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_input_norm_freq_standardises_every_bin():
    """model.input_norm=freq (Kong et al.'s bn0): in training mode each frequency bin of the compressed
    spectrogram reaches the stem with mean 0 and variance 1 over batch, channels and frames, whatever
    its level; none leaves the input as it was; freq_raw hands the stem both (normalised channels first);
    anything else is refused by name."""
    from omegaconf import OmegaConf

    from pahubert_plugin.models.pahubert import PahubertConfig, PahubertEncoder
    from pahubert_plugin.models.spectral import compress

    def encoder(norm):
        cfg = OmegaConf.merge(OmegaConf.structured(PahubertConfig), {
            "sample_rate": 16000, "audio_channels": 2, "label_rate": 100, "n_fft": 320, "stem_channels": [4],
            "stem_freq_strides": [1], "stem_time_strides": [1], "stem_units": 1, "encoder_layers": 1,
            "encoder_embed_dim": 16, "encoder_ffn_embed_dim": 16, "encoder_attention_heads": 2, "conv_pos": 4,
            "conv_pos_groups": 2, "input_norm": norm})
        return PahubertEncoder(cfg).train()

    torch.manual_seed(0)
    seen = {}
    wav = torch.randn(3, 2, 8000) * torch.linspace(0.01, 1, 8000)
    for norm in ("none", "freq", "freq_raw"):
        enc = encoder(norm)
        enc.front_end.stem.register_forward_pre_hook(lambda m, args, norm=norm: seen.__setitem__(norm, args[0].detach()))
        enc(wav)
    x = seen["freq"][:, :, :161]
    mean, var = x.mean(dim=(0, 1, 3)), x.var(dim=(0, 1, 3), unbiased=False)
    assert mean.abs().max() < 1e-4 and (var - 1).abs().max() < 1e-3
    raw = compress(enc.front_end.spectrogram(wav).abs())  # (3, 2, 161, frames)
    assert torch.allclose(seen["none"][:, :, :161, : raw.shape[-1]], raw, atol=1e-6)
    assert not torch.allclose(seen["freq"][:, :, :161, : raw.shape[-1]], raw, atol=0.1)
    assert seen["freq_raw"].shape[1] == 4 and torch.equal(seen["freq_raw"][:, :2], seen["freq"])
    assert torch.equal(seen["freq_raw"][:, 2:], seen["none"])
    with pytest.raises(ValueError, match="input_norm must be one of none, freq, freq_raw"):
        encoder("layer")


def test_pretraining_checkpoints_written_before_the_rename_keep_their_channels():
    """task.channels became task.audio_channels (the separation task's name): a checkpoint that still
    says channels=1 must rebuild a mono encoder, not the default stereo one."""
    from omegaconf import OmegaConf

    from pahubert_plugin.models.pahubert import encoder_config, task_audio_channels
    from pahubert_plugin.tasks.pahubert_pretraining import PahubertPretrainingConfig, PahubertPretrainingTask

    old = {"model": {"_name": "pahubert"}, "task": {"sample_rate": 16000, "channels": 1, "label_rate": 100}}
    assert encoder_config(old).audio_channels == 1
    assert task_audio_channels(OmegaConf.create({"audio_channels": 2})) == 2
    cfg = OmegaConf.structured(PahubertPretrainingConfig)
    cfg.channels, cfg.data, cfg.label_dir = 1, "unused", "unused"
    try:
        PahubertPretrainingTask(cfg)
    except FileNotFoundError:  # no label dictionary here; the rename happens before that
        pass
    assert cfg.audio_channels == 1 and cfg.channels is None


def test_band_mask_zeroes_one_band_per_example_in_training_only():
    """freq_mask_prob=1: every example loses exactly one contiguous band of 1..max_bins frequency bins,
    on every channel and frame, and nothing else; eval mode and prob 0 leave the input alone."""
    from omegaconf import OmegaConf

    from pahubert_plugin.models.pahubert import PahubertConfig, SpectralFrontEnd

    def front(prob):
        return SpectralFrontEnd(OmegaConf.merge(OmegaConf.structured(PahubertConfig), {
            "sample_rate": 16000, "audio_channels": 2, "n_fft": 320, "stem_channels": [4], "stem_freq_strides": [1],
            "stem_time_strides": [1], "stem_units": 1, "freq_mask_prob": prob, "freq_mask_max_bins": 7}))

    torch.manual_seed(0)
    x = torch.rand(64, 2, 161, 9) + 0.5  # no zeros of its own
    out = front(1.0).train().band_mask(x)
    zero = out == 0
    assert torch.equal(out[~zero], x[~zero])
    bins = zero.all(dim=3).all(dim=1)  # (batch, freq): the bins zeroed on every channel and frame
    assert torch.equal(zero, bins[:, None, :, None].expand_as(zero))  # whole bins only
    widths = bins.sum(1)
    assert widths.min() >= 1 and widths.max() <= 7 and len(set(widths.tolist())) > 1
    for row in bins:  # one contiguous band
        idx = row.nonzero().flatten()
        assert torch.equal(idx, torch.arange(idx[0], idx[0] + len(idx)))
    assert torch.equal(front(1.0).eval().band_mask(x), x)
    assert torch.equal(front(0.0).train().band_mask(x), x)


def test_pretraining_dataset_rejects_labels_outside_the_dictionary(corpora, tmp_path):
    from omegaconf import OmegaConf

    from pahubert_plugin.tasks.pahubert_pretraining import PahubertPretrainingConfig, PahubertPretrainingTask

    data = corpora.write_corpus(tmp_path / "data", n_train=3, n_valid=1, seed=3, min_s=0.6, max_s=1.0)
    cfg = OmegaConf.structured(PahubertPretrainingConfig(data=str(data), label_dir=str(data), sample_rate=SR,
                                                         channels=2, max_sample_size=20000, min_sample_size=1000))
    task = PahubertPretrainingTask.setup_task(cfg)
    task.load_dataset("train")  # genuine labels load
    path = write_bad_label(data)
    with pytest.raises(ValueError, match=rf"{path} row 2: label '999' is not in {data / 'dict.km.txt'}"):
        task.load_dataset("train")
