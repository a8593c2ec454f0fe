"""Teacher-student fine-tuning on unlabelled audio (``task.pseudo_data``): a teacher's estimates on
unlabelled mixtures, written by ``pahubert-separate``, become extra training clips whose sources are
remixed across clips (RemixIT-style); the labelled stream is unchanged without them."""
import numpy as np
import pytest
import soundfile as sf

from helpers import finetune_args, run_fairseq, updates_done
from pahubert_plugin.checkpoint import load_checkpoint
from pahubert_plugin.data.stems_dataset import Augment, StemsChunkDataset, list_pseudo_tracks, split_tracks
from test_source_sets import TWO, write_dataset

SR = 16000
PLAIN = Augment(random_mix=True, gain_min=1.0, gain_max=1.0, channel_swap=False, sign_flip=False)


def _marked_clips(root, values, with_mixture=False):
    """Clip k holds constant stems: speech = values[k], noise = -values[k] (its origin is readable)."""
    for k, v in enumerate(values):
        folder = root / f"clip_{k:02d}"
        folder.mkdir(parents=True)
        for name, x in (("speech", v), ("noise", -v)):
            sf.write(folder / f"{name}.wav", np.full(SR, x, np.float32), SR, subtype="FLOAT")
        if with_mixture:
            sf.write(folder / "mixture.wav", np.zeros(SR, np.float32), SR, subtype="FLOAT")
    return root


def _origins(dataset, n=200):
    out = []
    for i in range(n):
        target = dataset[i]["target"]  # (sources, channels, samples)
        out.append((round(float(target[0, 0, 0]), 3), round(float(-target[1, 0, 0]), 3)))
    return out


def test_pseudo_examples_remix_the_teachers_estimates_across_clips(tmp_path):
    labelled = list_pseudo_tracks(str(_marked_clips(tmp_path / "lab", [0.1, 0.2])), TWO, SR)
    pseudo = list_pseudo_tracks(str(_marked_clips(tmp_path / "pseudo", [0.5, 0.6, 0.7, 0.8])), TWO, SR)
    make = lambda p, prob: StemsChunkDataset(labelled, TWO, SR, 1, SR // 2, 100, PLAIN, seed=3,  # noqa: E731
                                             pseudo_tracks=p, pseudo_prob=prob)
    every = _origins(make(pseudo, 1.0))
    assert all(s >= 0.5 and n >= 0.5 for s, n in every)  # only teacher estimates
    assert sum(s != n for s, n in every) > 100  # speech of one clip over noise of another
    assert all(s < 0.5 and n < 0.5 for s, n in _origins(make(pseudo, 0.0)))
    half = _origins(make(pseudo, 0.5))
    share = sum(s >= 0.5 for s, _ in half) / len(half)
    assert 0.35 < share < 0.65 and all((s >= 0.5) == (n >= 0.5) for s, n in half)  # never one of each
    # without pseudo-labelled clips the labelled stream is what it was (no extra draw from the generator)
    assert _origins(make(None, 0.5)) == _origins(make([], 1.0)) == _origins(StemsChunkDataset(
        labelled, TWO, SR, 1, SR // 2, 100, PLAIN, seed=3))


def test_pseudo_folder_errors_name_the_folder_or_file(tmp_path):
    with pytest.raises(ValueError, match=r"task.pseudo_data: no folder .*missing"):
        list_pseudo_tracks(str(tmp_path / "missing"), TWO, SR)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"task.pseudo_data: .*empty holds no clip folders"):
        list_pseudo_tracks(str(tmp_path / "empty"), TWO, SR)
    root = _marked_clips(tmp_path / "clips", [0.5])
    (root / "clip_00" / "noise.wav").unlink()
    with pytest.raises(ValueError, match=r"track 'clip_00' .*missing stem noise.wav; expected \['speech', 'noise'\]"):
        list_pseudo_tracks(str(root), TWO, SR)


def test_a_mixture_is_not_needed_but_labelled_tracks_still_need_theirs(tmp_path):
    root = tmp_path / "data"
    _marked_clips(root / "train", [0.1])  # no mixture.wav: refused as labelled data, fine as pseudo data
    with pytest.raises(ValueError, match="missing stem mixture.wav"):
        split_tracks(str(root), "train", TWO, SR)
    assert [t.name for t in list_pseudo_tracks(str(root / "train"), TWO, SR)] == ["clip_00"]


@pytest.mark.slow
def test_teacher_student_fine_tuning_end_to_end(tmp_path):
    """A teacher trained on the labelled clips separates unlabelled mixtures with pahubert-separate; a
    student trains on labelled + pseudo-labelled clips through fairseq (real runs, tiny model)."""
    from pahubert_plugin.separate import main as separate

    data = write_dataset(tmp_path / "data", TWO)
    common = ("task.sources=[speech,noise]", "task.audio_channels=1", "task.sample_rate=16000",
              "checkpoint.best_checkpoint_metric=si_sdr", "checkpoint.maximize_best_checkpoint_metric=true")
    run_fairseq(finetune_args("tiny.yaml", data, tmp_path / "teacher", 2, *common), cwd=tmp_path, timeout=900)
    unlabelled = tmp_path / "unlabelled"
    unlabelled.mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        sf.write(unlabelled / f"u{i}.wav", (0.1 * rng.standard_normal(SR * 2)).astype(np.float32), SR)
    pseudo = tmp_path / "pseudo"
    assert separate([str(tmp_path / "teacher" / "checkpoint_best.pt"), str(unlabelled), "-o", str(pseudo)]) == 0
    assert sorted(p.name for p in pseudo.iterdir()) == ["u0", "u1", "u2"]
    log = run_fairseq(finetune_args("tiny.yaml", data, tmp_path / "student", 2, *common,
                                    f"task.pseudo_data={pseudo}", "task.pseudo_prob=0.5"),
                      cwd=tmp_path, timeout=900)
    assert updates_done(log) == 2
    assert f"train: 3 pseudo-labelled clips from {pseudo}, p=0.5 per example" in log, log[-3000:]
    state = load_checkpoint(tmp_path / "student" / "checkpoint_last.pt")
    assert state["cfg"]["task"]["pseudo_data"] == str(pseudo)


def test_pseudo_prob_out_of_range_is_named(tmp_path):
    from helpers import MUSDB_CONF, fairseq_compose
    from fairseq import tasks

    cfg = fairseq_compose(str(MUSDB_CONF), "tiny", [f"task.data={tmp_path}", "task.pseudo_prob=1.5"])
    with pytest.raises(ValueError, match=r"task.pseudo_prob.*in \[0, 1\]"):
        tasks.setup_task(cfg.task)
