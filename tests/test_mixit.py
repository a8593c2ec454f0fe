"""Mixture invariant training beside the labelled examples (``task.mixit_data``, ``model.slots_per_source``):
mixtures of two unlabelled mixtures, the model's outputs assigned to whichever mixture they rebuild best."""
import numpy as np
import pytest
import soundfile as sf
import torch

import pahubert_plugin  # noqa: F401  (registration)
from helpers import MUSDB_CONF, fairseq_compose, finetune_args, run_fairseq, updates_done
from pahubert_plugin.criterions.separation import SeparationCriterion, mixit_assignments
from pahubert_plugin.data.stems_dataset import Augment, StemsChunkDataset, collate, list_mixtures, list_pseudo_tracks
from pahubert_plugin.models.pahubert_resunet import PahubertResUNetModel
from test_fused_features import pretrained  # noqa: F401  (fixture)
from test_separation import pahubert_resunet_cfg
from test_source_sets import TWO, write_dataset

SR = 16000
PLAIN = Augment(random_mix=True, gain_min=1.0, gain_max=1.0, channel_swap=False, sign_flip=False)


class _Task:
    sources = TWO


def criterion(**kw):
    return SeparationCriterion(_Task(), sources=TWO, **kw)


def test_every_assignment_gives_each_output_to_one_mixture():
    a = mixit_assignments(4)
    assert a.shape == (16, 2, 4) and torch.equal(a.sum(1), torch.ones(16, 4))
    assert len({tuple(row[0].tolist()) for row in a}) == 16


def test_mixit_loss_is_zero_for_any_split_that_rebuilds_both_mixtures_and_not_otherwise():
    g = torch.Generator().manual_seed(0)
    x1, x2 = torch.randn(2, 1, 1, 800, generator=g)
    part = torch.randn(1, 1, 800, generator=g)
    refs = torch.stack([x1, x2], dim=1)  # (batch 1, 2, channels, samples)
    exact = torch.stack([x1 - part, x2, part, torch.zeros_like(part)], dim=1)  # outputs 0 and 2 rebuild x1
    crit = criterion()
    assert float(crit.mixit_loss(exact, refs)) == pytest.approx(0.0, abs=1e-7)
    assert float(crit.mixit_loss(exact[:, [3, 2, 1, 0]], refs)) == pytest.approx(0.0, abs=1e-7)  # any order
    wrong = exact.clone()
    wrong[:, 1] = -x2
    assert float(crit.mixit_loss(wrong, refs)) > 0.1


def test_slots_of_a_source_sum_to_its_estimate(pretrained):  # noqa: F811
    _, path = pretrained
    model = PahubertResUNetModel.build_model(pahubert_resunet_cfg(path, fuse_pretrained=True,
                                                                  slots_per_source=2)).eval()
    x = torch.randn(1, 2, 4000, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        slots, estimates = model(x, slots=True), model(x)
    assert slots.shape == (1, 4 * 2, 2, 4000) and estimates.shape == (1, 4, 2, 4000)
    torch.testing.assert_close(slots.view(1, 4, 2, 2, 4000).sum(2), estimates, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="slots_per_source must be >= 1"):
        PahubertResUNetModel.build_model(pahubert_resunet_cfg(path, slots_per_source=0))


def _mixtures(folder, values, seconds=1.0):
    folder.mkdir(parents=True)
    for k, v in enumerate(values):
        sf.write(folder / f"u{k}.wav", np.full(int(seconds * SR), v, np.float32), SR, subtype="FLOAT")
    return folder


def _labelled(root):
    for k, v in enumerate([0.01, 0.02]):
        folder = root / f"clip_{k}"
        folder.mkdir(parents=True)
        for name, x in (("speech", v), ("noise", -v)):
            sf.write(folder / f"{name}.wav", np.full(SR, x, np.float32), SR, subtype="FLOAT")
    return list_pseudo_tracks(str(root), TWO, SR)


def test_mixture_of_mixtures_examples_and_their_batches(tmp_path):
    labelled = _labelled(tmp_path / "lab")
    mixtures = list_mixtures(str(_mixtures(tmp_path / "unlabelled", [0.1, 0.2, 0.4])), SR)
    make = lambda m, p: StemsChunkDataset(labelled, TWO, SR, 1, SR // 2, 100, PLAIN, seed=3,  # noqa: E731
                                          mixit_tracks=m, mixit_prob=p)
    every = make(mixtures, 1.0)
    for i in range(30):
        ex = every[i]
        a, b = (round(float(ex["mixit_refs"][k, 0, 0]), 4) for k in (0, 1))
        assert a != b and {a, b} <= {0.1, 0.2, 0.4}  # two different unlabelled mixtures
        torch.testing.assert_close(ex["mixture"], ex["mixit_refs"].sum(0))
        assert not ex["target"].any()
    half = make(mixtures, 0.5)
    batch = collate([half[i] for i in range(40)])
    share = float(batch["mixit"].float().mean())
    assert 0.3 < share < 0.7 and batch["mixit_refs"].shape == (40, 2, 1, SR // 2)
    assert not batch["mixit_refs"][~batch["mixit"]].any() and batch["target"][~batch["mixit"]].any()
    # without mixtures the labelled stream is what it was (no extra draw from the generator)
    plain = StemsChunkDataset(labelled, TWO, SR, 1, SR // 2, 100, PLAIN, seed=3)
    for i in range(20):
        torch.testing.assert_close(make([], 1.0)[i]["target"], plain[i]["target"])
        assert "mixit_refs" not in make(None, 1.0)[i]
    assert "mixit" not in collate([plain[i] for i in range(4)])


def test_mixit_folder_errors_name_the_folder_or_file(tmp_path):
    with pytest.raises(ValueError, match=r"task.mixit_data: no folder .*missing"):
        list_mixtures(str(tmp_path / "missing"), SR)
    with pytest.raises(ValueError, match=r"task.mixit_data: .*one holds 1 audio files.*at least 2"):
        list_mixtures(str(_mixtures(tmp_path / "one", [0.1])), SR)
    folder = _mixtures(tmp_path / "bad", [0.1, 0.2])
    (folder / "u2.wav").write_bytes(b"RIFF not really a wave file")
    with pytest.raises(Exception, match=r"u2.wav"):
        list_mixtures(str(folder), SR)


def test_criterion_trains_labelled_rows_on_the_slot_sums_and_mixed_rows_on_the_best_split(pretrained):  # noqa: F811
    _, path = pretrained
    model = PahubertResUNetModel.build_model(pahubert_resunet_cfg(path, slots_per_source=2)).train()
    g = torch.Generator().manual_seed(2)
    mixture = torch.randn(3, 2, 4000, generator=g)
    sample = {"net_input": {"mixture": mixture}, "target": torch.randn(3, 4, 2, 4000, generator=g),
              "mixit": torch.tensor([False, True, True]), "mixit_refs": torch.randn(3, 2, 2, 4000, generator=g)}
    crit = SeparationCriterion(_Task(), sources=["drums", "bass", "other", "vocals"])
    loss, size, log = crit(model, sample)
    loss.backward()
    assert size == 3 and log["nmixit"] == 2 and log["loss_mixit"] > 0 and log["loss_drums"] > 0
    assert model.decoder.head.weight.grad.abs().sum() > 0
    one_slot = PahubertResUNetModel.build_model(pahubert_resunet_cfg(path)).train()
    with pytest.raises(ValueError, match="needs model.slots_per_source >= 2"):
        crit(one_slot, sample)
    with pytest.raises(ValueError, match="mixit_weight must be >= 0"):
        criterion(mixit_weight=-1.0)


def test_mixit_data_needs_several_slots_per_source(tmp_path):
    from fairseq import tasks

    data = write_dataset(tmp_path / "data", TWO)
    mixtures = _mixtures(tmp_path / "unlabelled", [0.1, 0.2])
    cfg = fairseq_compose(str(MUSDB_CONF), "tiny", [f"task.data={data}", "task.sources=[speech,noise]",
                                                   "task.audio_channels=1", "task.sample_rate=16000",
                                                   f"task.mixit_data={mixtures}"])
    task = tasks.setup_task(cfg.task)
    with pytest.raises(ValueError, match="task.mixit_data needs .*model.slots_per_source=2"):
        task.build_model(cfg.model)
    cfg.model.slots_per_source = 2
    assert task.build_model(cfg.model).slots_per_source == 2


@pytest.mark.slow
def test_mixit_fine_tuning_end_to_end(tmp_path):
    """A real fairseq fine-tuning with unlabelled mixtures mixed in; the checkpoint separates as usual."""
    from pahubert_plugin.separation.api import Separator

    data = write_dataset(tmp_path / "data", TWO)
    unlabelled = tmp_path / "unlabelled"
    unlabelled.mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        sf.write(unlabelled / f"u{i}.wav", (0.1 * rng.standard_normal(SR * 2)).astype(np.float32), SR)
    log = run_fairseq(finetune_args("tiny.yaml", data, tmp_path / "ft", 3, "task.sources=[speech,noise]",
                                    "task.audio_channels=1", "task.sample_rate=16000", "model.slots_per_source=2",
                                    f"task.mixit_data={unlabelled}", "task.mixit_prob=0.5"),
                      cwd=tmp_path, timeout=900)
    assert updates_done(log) == 3
    assert f"train: 3 unlabelled mixtures from {unlabelled} for mixture invariant training, p=0.5" in log
    assert "loss_mixit" in log, log[-3000:]
    sep = Separator.from_checkpoint(str(tmp_path / "ft" / "checkpoint_last.pt"))
    out = sep.separate(torch.randn(1, SR), SR)
    assert set(out) == {"speech", "noise"} and out["speech"].shape[-1] == SR
