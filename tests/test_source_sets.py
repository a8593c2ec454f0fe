"""Any source set end to end: speech/noise (two sources) and speech/noise/hum (three), no music names.

The task's datasets, every separation model type, a tiny fairseq fine-tuning of each with validation
selecting on SI-SDR, ``pahubert-evaluate --metrics si_sdr,pesq,stoi`` on the result (a clip without
speech included: its PESQ/STOI are NaN and counted, not a crash), the layout detection of
``pahubert-evaluate``, ``pahubert-label-quality --sources`` and the demo report.
"""
import json
import os
import re
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

import pahubert_plugin  # noqa: F401  (registration)

from helpers import MUSDB_CONF, REPO, fairseq_compose, finetune_args, run_fairseq, updates_done
from test_speech_metrics import speech_like

SR = 16000
TWO = ["speech", "noise"]
THREE = ["speech", "noise", "hum"]


def _stems(seconds, seed, silent_speech=False):
    rng = np.random.default_rng(seed)
    n = int(seconds * SR)
    t = np.arange(n) / SR
    speech = np.zeros(n) if silent_speech else 0.5 * speech_like(seconds, SR, seed)
    white = rng.standard_normal(n + 8)
    noise = 0.05 * np.convolve(white, np.ones(8) / 8, "valid")[:n]  # low-passed noise, a machine's hiss
    hum = 0.05 * sum(np.sin(2 * np.pi * 50 * k * t + k) / k for k in (1, 2, 3))
    return {"speech": speech, "noise": noise, "hum": hum}


def write_dataset(root, sources=TWO, splits=(("train", 2), ("valid", 1), ("test", 2)), seconds=2.0,
                  silent_test_clip=False, flat=False):
    """``root/<split>/<clip>/{mixture,<source>}.wav`` mono 16 kHz (``flat``: ``root/<clip>/`` for one split)."""
    root = Path(root)
    seed = 0
    for split, count in splits:
        for i in range(count + (1 if silent_test_clip and split == "test" else 0)):
            seed += 1
            stems = _stems(seconds, seed, silent_speech=(i == count))
            folder = root / f"{split}_{i:02d}" if flat else root / split / f"{split}_{i:02d}"
            folder.mkdir(parents=True, exist_ok=True)
            for name in sources:
                sf.write(folder / f"{name}.wav", stems[name].astype(np.float32), SR, subtype="FLOAT")
            sf.write(folder / "mixture.wav", sum(stems[s] for s in sources).astype(np.float32), SR, subtype="FLOAT")
    return root


# ----------------------------------------------------------------------------- task and models

@pytest.mark.parametrize("sources", [TWO, THREE])
def test_task_loads_any_source_set(tmp_path, sources):
    from omegaconf import OmegaConf

    from pahubert_plugin.tasks.music_separation import MusicSeparationConfig, MusicSeparationTask

    root = write_dataset(tmp_path / "data", sources)
    cfg = OmegaConf.structured(MusicSeparationConfig(
        data=str(root), sources=list(sources), sample_rate=SR, audio_channels=1, segment=0.5,
        samples_per_track=3, valid_seconds=1.0, seed=1))
    task = MusicSeparationTask(cfg)
    task.load_dataset("train")
    task.load_dataset("valid")
    train, valid = task.datasets["train"], task.datasets["valid"]
    assert len(train) == 2 * 3 and len(valid) == 1
    batch = train.collater([train[i] for i in range(4)])
    assert batch["target"].shape == (4, len(sources), 1, SR // 2)
    torch.testing.assert_close(batch["net_input"]["mixture"], batch["target"].sum(1))
    vbatch = valid.collater([valid[0]])
    assert vbatch["target"].shape == (1, len(sources), 1, SR)
    # a clip without one of the named stems is named in the error
    os.remove(root / "train" / "train_01" / f"{sources[-1]}.wav")
    with pytest.raises(ValueError, match=f"train_01.*{sources[-1]}.wav"):
        task.load_dataset("train")


def _build(config, data, sources, tmp_path, *extra):
    from fairseq import tasks

    cfg = fairseq_compose(str(MUSDB_CONF), config, [
        f"task.data={data}", f"task.sources=[{','.join(sources)}]", f"checkpoint.save_dir={tmp_path}/ckpt", *extra])
    task = tasks.setup_task(cfg.task)
    return task.build_model(cfg.model)


def _pretraining_checkpoint(path):
    from test_separation import make_pretraining_checkpoint

    if not path.is_file():
        make_pretraining_checkpoint(path)
    return path


MODEL_CONFIGS = {  # config -> extra overrides a CPU-sized build or fine-tuning needs
    "tiny": lambda tmp: [],
    "demucs_v2_tiny": lambda tmp: [],
    "demucs_v2_hubert_tiny": lambda tmp: ["model.no_pretrained_weights=true"],
    "pahubert_tiny": lambda tmp: [f"model.pretrained_checkpoint={_pretraining_checkpoint(tmp / 'pre.pt')}"],
}


@pytest.mark.parametrize("config", list(MODEL_CONFIGS))
def test_every_model_type_separates_three_named_sources(tmp_path, config):
    root = write_dataset(tmp_path / "data", THREE, splits=(("train", 1),))
    model = _build(config, root, THREE, tmp_path, *MODEL_CONFIGS[config](tmp_path)).eval()
    assert list(model.sources) == THREE
    with torch.no_grad():
        out = model(mixture=torch.randn(2, 2, 12345) * 0.1)
    assert out.shape == (2, 3, 2, 12345)


# ----------------------------------------------------------------------------- fine-tune, then evaluate

@pytest.fixture(scope="module")
def speech_noise(tmp_path_factory):
    return write_dataset(tmp_path_factory.mktemp("speech_noise"), TWO, silent_test_clip=True)


@pytest.mark.slow
@pytest.mark.parametrize("config", list(MODEL_CONFIGS))
def test_fine_tune_on_speech_noise_selects_on_si_sdr_and_evaluates(speech_noise, tmp_path, config, caplog):
    from pahubert_plugin.evaluate import main

    save = tmp_path / "ckpt"
    log = run_fairseq(finetune_args(f"{config}.yaml", speech_noise, save, 2, "task.sources=[speech,noise]",
                                    "checkpoint.best_checkpoint_metric=si_sdr", *MODEL_CONFIGS[config](tmp_path)),
                      cwd=tmp_path, timeout=900)
    assert updates_done(log) == 2
    valid = re.findall(r"valid on 'valid' subset .*\| si_sdr (-?[0-9.]+) \|", log)
    assert valid and all(np.isfinite(float(v)) for v in valid), log[-3000:]
    for key in ("si_sdr_speech", "si_sdr_noise", "sdr_speech"):
        assert f"| {key} " in log, key
    assert "drums" not in log and "vocals" not in log
    best = save / "checkpoint_best.pt"
    # checkpoint_best is chosen by the validation SI-SDR (fairseq logs the score it saved with)
    saved = re.findall(r"Saved checkpoint \S*checkpoint_best\.pt .*score (-?[0-9.]+)\)", log)
    assert best.is_file() and saved and float(saved[-1]) == pytest.approx(float(valid[-1]), abs=1e-3)

    out = tmp_path / "eval"
    with caplog.at_level("WARNING"):
        # no --is-wav: the wav layout is detected
        assert main([str(best), "--root", str(speech_noise), "--out", str(out), "--segment", "1.0",
                     "--metrics", "si_sdr,pesq,stoi"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["num_tracks"] == 3 and summary["metrics"] == ["si_sdr", "pesq", "stoi"]
    speech, noise = summary["sources"]["speech"], summary["sources"]["noise"]
    assert set(speech) == {"SI-SDR", "SI-SDRi", "PESQ", "STOI"} and set(noise) == {"SI-SDR", "SI-SDRi"}
    assert all(np.isfinite(v) for v in speech.values()) and 1.0 < speech["PESQ"] < 4.7
    mixture = summary["mixture"]["sources"]
    assert set(mixture["speech"]) == {"SI-SDR", "PESQ", "STOI"} and set(mixture["noise"]) == {"SI-SDR"}
    assert speech["SI-SDRi"] == pytest.approx(speech["SI-SDR"] - mixture["speech"]["SI-SDR"], abs=1e-6)
    # the clip without speech: every speech metric is NaN there, counted (model and mixture), no crash
    assert summary["undefined"] == {k: {"speech": 1} for k in ("SI-SDR", "PESQ", "STOI")}
    assert re.search(r"track test_02: PESQ undefined.*scored as NaN", caplog.text)
    record = json.loads((out / "test" / "test_02.json").read_text())
    assert record["metrics"] == ["si_sdr", "pesq", "stoi"] and "targets" not in record  # no museval asked
    text = (out / "summary.md").read_text()
    assert "| SI-SDRi |" in text and "| mixture PESQ |" in text and "speech: PESQ undefined on 1 of 3 tracks" in text
    for src, value in summary["worse_than_mixture"].items():
        assert f"{src}: the model is worse than returning the mixture (SI-SDRi {value:.1f} dB)" in text
    # museval's SDR added later: every clip is scored again, the whole-clip figures are kept
    assert main([str(best), "--musdb-root", str(speech_noise), "--out", str(out), "--segment", "1.0",
                 "--metrics", "sdr,si_sdr", "--tracks", "1"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["sources"]["speech"]) == {"SDR", "SIR", "ISR", "SAR", "SI-SDR", "SI-SDRi"}
    if config == "tiny":  # a folder of clips without subset folders, as a new user has one
        flat = write_dataset(tmp_path / "clips", TWO, splits=(("clip", 1),), flat=True)
        assert main([str(best), "--root", str(flat), "--out", str(tmp_path / "flat"), "--segment", "1.0"]) == 0
        summary = json.loads((tmp_path / "flat" / "summary.json").read_text())
        assert summary["num_tracks"] == 1 and "SI-SDRi" in summary["sources"]["noise"]
        # pahubert-separate --two-stems speech: speech and no_speech (here the noise), nothing else
        from pahubert_plugin.separate import main as separate

        mixture = speech_noise / "test" / "test_00" / "mixture.wav"
        assert separate([str(best), str(mixture), "-o", str(tmp_path / "sep"), "--two-stems", "speech"]) == 0
        written = sorted(p.name for p in (tmp_path / "sep" / "mixture").iterdir())
        assert written == ["no_speech.wav", "speech.wav"], written
        assert sf.info(tmp_path / "sep" / "mixture" / "speech.wav").frames == sf.info(mixture).frames


# ----------------------------------------------------------------------------- evaluate's entry checks

def test_evaluate_detects_the_layout(tmp_path):
    from pahubert_plugin.evaluate import resolve_layout

    split = write_dataset(tmp_path / "split", TWO, splits=(("test", 1),))
    assert resolve_layout(str(split), "test") == (str(split), "test", True)
    flat = write_dataset(tmp_path / "flat", TWO, splits=(("clip", 2),), flat=True)
    assert resolve_layout(str(flat), "test") == (str(tmp_path), "flat", True)
    stems = tmp_path / "musdb" / "test"
    stems.mkdir(parents=True)
    (stems / "a.stem.mp4").write_bytes(b"")
    assert resolve_layout(str(tmp_path / "musdb"), "test") == (str(tmp_path / "musdb"), "test", False)
    assert resolve_layout(str(tmp_path / "musdb"), "test", is_wav=True)[2] is True  # --is-wav overrides
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"dataset root .*empty: no test/ folder and no clips"):
        resolve_layout(str(tmp_path / "empty"), "test")
    with pytest.raises(ValueError, match="no such folder"):
        resolve_layout(str(tmp_path / "missing"), "test")


def test_evaluate_metrics_option():
    from pahubert_plugin.evaluate import get_parser, parse_metrics

    assert get_parser().parse_args(["c", "--root", "r", "--out", "o"]).metrics == "sdr,si_sdr"
    assert parse_metrics("si_sdr, pesq,stoi", TWO) == ["si_sdr", "pesq", "stoi"]
    with pytest.raises(ValueError, match="sdri"):
        parse_metrics("sdr,sdri", TWO)
    with pytest.raises(ValueError, match="'speech'.*drums, bass, other, vocals"):
        parse_metrics("sdr,pesq", ["drums", "bass", "other", "vocals"])
    assert "dataset" in get_parser().format_help()


# ----------------------------------------------------------------------------- label quality, demo report

def test_label_quality_takes_the_sources_from_the_data(tmp_path, capsys):
    import joblib
    from sklearn.cluster import MiniBatchKMeans

    from pahubert_plugin.clustering import label_quality

    root = write_dataset(tmp_path / "data", TWO, splits=(("test", 2),), seconds=1.0)
    km = MiniBatchKMeans(n_clusters=4, n_init=1, random_state=0).fit(np.random.default_rng(0).standard_normal((64, 39)))
    joblib.dump(km, tmp_path / "k.km")
    args = [str(tmp_path / "k.km"), str(root), "--is-wav", "--feature", "mfcc", "--sample-rate", str(SR)]
    assert label_quality.main(args + ["--out", str(tmp_path / "q.json")]) == 0
    result = json.loads((tmp_path / "q.json").read_text())
    assert result["sources"] == ["noise", "speech"]
    assert set(result["kmeans"]["per_source"]) <= {"speech", "noise", "silence"}
    assert label_quality.main(args + ["--sources", "speech", "--out", str(tmp_path / "s.json")]) == 0
    result = json.loads((tmp_path / "s.json").read_text())
    assert result["sources"] == ["speech"] and set(result["kmeans"]["per_source"]) <= {"speech", "silence"}


def test_demo_report_reads_the_source_names_from_the_runs(tmp_path):
    import sys

    sys.path.insert(0, str(REPO / "examples" / "demo"))
    import report

    root = write_dataset(tmp_path / "data", TWO, splits=(("test", 2),), seconds=1.0)
    rng = np.random.default_rng(0)
    for arm in ("scratch", "pretrained"):
        tracks = {f"test_{i:02d}": {s: {"SDR": float(rng.normal())} for s in TWO} for i in range(2)}
        per = {s: {"SDR": float(np.median([t[s]["SDR"] for t in tracks.values()]))} for s in TWO}
        summary = {"sources": per, "mean": {"SDR": float(np.mean([per[s]["SDR"] for s in TWO]))}, "tracks": tracks}
        folder = tmp_path / "results" / "eval" / f"{arm}_n1_s1"
        folder.mkdir(parents=True)
        (folder / "summary.json").write_text(json.dumps(summary))
    assert report.main(["--results", str(tmp_path / "results"), "--musdb-root", str(root)]) == 0
    text = (tmp_path / "results" / "summary.md").read_text()
    assert "| labelled songs | system | speech | noise | mean |" in text
    assert json.loads((tmp_path / "results" / "summary.json").read_text())["sources"] == TWO


def test_demo_report_says_where_a_validation_curve_peaked_and_whether_it_converged():
    import sys

    sys.path.insert(0, str(REPO / "examples" / "demo"))
    import report

    rising = [(100, 1.0), (200, 2.0), (300, 2.5), (400, 3.0)]  # the last quarter (300 -> 400) adds 0.5 dB
    flat = [(100, 1.0), (200, 2.9), (300, 3.0), (400, 3.05)]
    peaked = [(100, 1.0), (200, 3.0), (300, 2.8), (400, 2.9)]
    assert report.convergence(rising) == {"best": 3.0, "best_update": 400, "last_update": 400,
                                          "last_quarter_gain": pytest.approx(0.5), "converged": False}
    assert report.convergence(flat)["converged"] and report.convergence(flat)["last_quarter_gain"] == pytest.approx(0.05)
    c = report.convergence(peaked)
    assert (c["best_update"], c["last_quarter_gain"], c["converged"]) == (200, 0.0, True)
    assert report.convergence([]) is None
    # the summary's first lines say whether the arms were compared at their ceilings or within a budget
    runs = {"a": report.convergence(rising), "b": report.convergence(flat)}
    assert report.schedule_note({"convergence": runs}).startswith("1 of 2 runs were still gaining")
    assert report.schedule_note({"convergence": {"b": runs["b"]}}).startswith("Every run (1) had stopped gaining")
    assert "at convergence" in report.schedule_note({})


def test_demo_report_reads_the_whole_curve_of_a_resumed_run(tmp_path):
    """run.sh appends to a run's train.log, so a run stopped and resumed from its checkpoint keeps its first
    validations; those it repeats after the checkpoint count once, the later value."""
    import sys

    sys.path.insert(0, str(REPO / "examples" / "demo"))
    import report

    def valid(update, score):
        return (f'[2026-12-06 10:00:00,000][valid][INFO] - {{"epoch": 1, "valid_si_sdr": "{score}", '
                f'"valid_num_updates": "{update}"}}\n')

    run = tmp_path / "pretrained_n12_s1"
    run.mkdir()
    (run / "train.log").write_text("run.sh: fine-tuning started\n" + valid(100, 1.0) + valid(200, 2.0) + valid(300, 2.2)
                                   + "run.sh: fine-tuning started\n" + valid(300, 2.1) + valid(400, 3.0))
    assert report.valid_curves(str(tmp_path), "valid_si_sdr") == {
        ("pretrained", 12, 1): [(100, 1.0), (200, 2.0), (300, 2.1), (400, 3.0)]}


def test_demo_report_lists_the_curves_of_the_evaluated_runs_only(tmp_path):
    """A tag's fine-tuning folder is shared by every label budget run under it; a results folder that evaluated
    one budget lists that budget's curves, and its "still gaining" count is of those runs."""
    import sys

    sys.path.insert(0, str(REPO / "examples" / "demo"))
    import report

    root = write_dataset(tmp_path / "data", TWO, splits=(("test", 2),), seconds=1.0)
    logs = tmp_path / "finetune"
    for arm in ("scratch", "pretrained"):
        tracks = {f"test_{i:02d}": {s: {"SI-SDR": 1.0 + i, "SI-SDRi": 0.5} for s in TWO} for i in range(2)}
        summary = {"sources": {s: {"SI-SDR": 1.5, "SI-SDRi": 0.5} for s in TWO}, "mean": {"SI-SDR": 1.5},
                   "tracks": tracks, "mixture": {"sources": {s: {"SI-SDR": 1.0} for s in TWO}, "mean": {"SI-SDR": 1.0}}}
        folder = tmp_path / "results" / "eval" / f"{arm}_n4_s1"
        folder.mkdir(parents=True)
        (folder / "summary.json").write_text(json.dumps(summary))
        for n in (4, 12):  # the 12-clip runs were fine-tuned under the same tag, evaluated elsewhere
            run = logs / f"{arm}_n{n}_s1"
            run.mkdir(parents=True)
            (run / "train.log").write_text("".join(
                f'[valid][INFO] - {{"valid_si_sdr": "{u / 100}", "valid_num_updates": "{u}"}}\n' for u in (100, 200)))
    assert report.main(["--results", str(tmp_path / "results"), "--musdb-root", str(root), "--logs", str(logs),
                        "--metric", "SI-SDR"]) == 0
    data = json.loads((tmp_path / "results" / "summary.json").read_text())
    assert sorted(data["valid_curves"]) == ["pretrained_n4_s1", "scratch_n4_s1"]
    assert "2 of 2 runs were still gaining" in (tmp_path / "results" / "summary.md").read_text()


def test_compare_pairs_two_settings_of_a_speech_corpus_on_si_sdr(tmp_path, capsys):
    import sys

    sys.path.insert(0, str(REPO / "examples" / "demo"))
    import compare

    clips = [f"test_{i:02d}" for i in range(4)]
    for setting, shift in (("long", 1.0), ("short", 0.0)):  # "long" is 1 dB better on every clip of every source
        for seed in (1, 2):
            tracks = {c: {s: {"SI-SDR": 5.0 + i + shift, "SI-SDRi": 1.0} for s in TWO} for i, c in enumerate(clips)}
            folder = tmp_path / setting / "eval" / f"scratch_n12_s{seed}"
            folder.mkdir(parents=True)
            (folder / "summary.json").write_text(json.dumps({"tracks": tracks}))
    sides = [str(tmp_path / "long") + ":scratch", str(tmp_path / "short") + ":scratch"]
    assert compare.main([*sides, "--songs", "12", "--seeds", "1,2", "--metric", "SI-SDR"]) == 0
    out = capsys.readouterr().out
    assert "| speech | noise | mean |" in out
    assert "paired A − B (SI-SDR): +1.00 dB [+1.00, +1.00] over 8" in out and "A ahead on 2 of 2 seeds" in out
    with pytest.raises(SystemExit, match=r"scratch_n12_s1/summary.json has no SDR \(it has SI-SDR, SI-SDRi; see --metric\)"):
        compare.main([*sides, "--songs", "12"])
