"""Speech-in-machine-noise corpus: exact stem sums, no clipping, SNR within the range, determinism,
disjoint test speakers and noises, caching, the OpenSFX parser, clear errors without a package.

The Debian packages are required, not optional: without them these tests fail (``make setup``
installs ffmpeg, flite, espeak-ng, asterisk-core-sounds-{en,es}-g722 and openttd-opensfx)."""
import filecmp
import json
import os
import shutil
import sys

import numpy as np
import pytest
import soundfile as sf

from pahubert_plugin.corpora import speech_noise as sn

SR = 16000
SECONDS = 2.0
SNR = (0.0, 6.0)
ARGS = ["--train-clips", "2", "--valid-clips", "1", "--test-clips", "1", "--unlabelled-minutes", "0.2",
        "--clip-seconds", str(SECONDS), "--snr-range", str(SNR[0]), str(SNR[1]), "--seed", "3", "--no-progress"]
LABELLED = ("train", "valid", "test")


def test_debian_packages_installed():
    """Loud failure, not a skip, when the machine lacks a package the corpus is made from."""
    missing = [pkg for path, pkg in ((f"{sn.ASTERISK_ROOT}/en", "asterisk-core-sounds-en-g722"),
                                     (f"{sn.ASTERISK_ROOT}/es", "asterisk-core-sounds-es-g722"),
                                     (sn.OPENSFX_CAT, "openttd-opensfx")) if not os.path.exists(path)]
    missing += [tool for tool in ("ffmpeg", "flite", "espeak-ng") if shutil.which(tool) is None]
    assert not missing, f"install the Debian packages {' '.join(missing)} (make setup does)"


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    out = tmp_path_factory.mktemp("speech") / "corpus"
    assert sn.main([str(out)] + ARGS + ["--jobs", "2"]) == 0
    return out


def _meta(out):
    return json.loads((out / "corpus.json").read_text())


def _labelled(out):
    return [out / s / name for s in LABELLED for name in sorted(os.listdir(out / s))]


def _read(path):
    audio, sr = sf.read(str(path), dtype="float32")
    assert sr == SR and audio.ndim == 1, path
    return audio


def test_layout_and_format(corpus):
    meta = _meta(corpus)
    assert meta["status"] == "complete" and meta["generator"] == "pahubert-speech-corpus"
    # 0.2 min of 2 s clips = 6 unlabelled mixtures
    assert meta["clips_per_split"] == {"train": 2, "valid": 1, "test": 1, "unlabelled": 6}
    assert meta["seconds_per_split"]["unlabelled"] == 12.0
    for clip in _labelled(corpus):
        assert sorted(os.listdir(clip)) == ["mixture.wav", "noise.wav", "speech.wav"]
        for stem in sn.STEMS:
            info = sf.info(str(clip / f"{stem}.wav"))
            assert (info.samplerate, info.channels, info.frames, info.subtype) == (SR, 1, SR * SECONDS, "FLOAT")
    unlabelled = sorted(os.listdir(corpus / "unlabelled"))
    assert unlabelled == [f"unlabelled_{i:05d}.wav" for i in range(6)]  # mixtures only, flat
    for name in unlabelled:
        assert sf.info(str(corpus / "unlabelled" / name)).frames == SR * SECONDS
    assert not list(corpus.rglob("*.tmp-*"))


def test_stems_sum_exactly_without_clipping(corpus):
    for clip in _labelled(corpus):
        mix, speech, noise = (_read(clip / f"{s}.wav") for s in sn.STEMS)
        assert np.array_equal(mix, speech + noise), clip  # float32 sum, bit for bit
        for audio in (mix, speech, noise):
            assert np.isfinite(audio).all() and np.abs(audio).max() <= sn.PEAK, clip
        assert np.sqrt(np.mean(speech ** 2)) > 1e-3 and np.sqrt(np.mean(noise ** 2)) > 1e-3, clip
    for path in (corpus / "unlabelled").iterdir():
        peak = np.abs(_read(path)).max()
        assert 0.01 < peak <= sn.PEAK, path


def test_snr_within_range(corpus):
    meta = _meta(corpus)
    for clip in _labelled(corpus):
        speech, noise = _read(clip / "speech.wav").astype(np.float64), _read(clip / "noise.wav").astype(np.float64)
        snr = 10 * np.log10(np.sum(speech ** 2) / np.sum(noise ** 2))
        assert SNR[0] - 1e-3 <= snr <= SNR[1] + 1e-3, (clip, snr)
        assert abs(snr - meta["clips"][clip.parent.name][clip.name]["snr_db"]) < 0.01, clip


def test_speakers_and_noises_of_test_unseen(corpus):
    meta = _meta(corpus)
    seen = set(meta["speakers"]["train"]) | set(meta["speakers"]["valid"]) | set(meta["speakers"]["unlabelled"])
    assert meta["speakers"]["test"] and not set(meta["speakers"]["test"]) & seen
    pools = meta["speaker_pools"]
    assert not set(pools["test"]) & set(pools["train, valid, unlabelled"])
    assert set(pools["test"]) == set(sn.TEST_SPEAKERS) and "asterisk-es" in pools["test"]
    noise = meta["noise_pools"]
    for kind in ("opensfx", "procedural"):
        assert noise["test"][kind] and noise["train, valid, unlabelled"][kind]
        assert not set(noise["test"][kind]) & set(noise["train, valid, unlabelled"][kind])
    for split, clips in meta["clips"].items():
        pool = "test" if split == "test" else "train, valid, unlabelled"
        for name, info in clips.items():
            assert info["speaker"] in pools[pool], (split, name)
            for layer in info["noise"]:
                kind, source = layer["source"].split(":", 1)
                assert source in noise[pool][kind], (split, name, source)
    # the fixed assignment holds for every clip a split can draw, not only these few
    rng = np.random.default_rng(0)
    ctx = {"noises": noise}
    for split in ("test", "train"):
        pool = "test" if split == "test" else "train, valid, unlabelled"
        for _ in range(30):
            _, layers = sn.noise_scene(rng, 4000, SR, ctx["noises"][pool], sn.opensfx_sounds(sn.OPENSFX_CAT))
            assert all(layer["source"].split(":", 1)[1] in noise[pool][layer["source"].split(":")[0]]
                       for layer in layers)


def test_deterministic_whatever_jobs_and_seed_matters(corpus, tmp_path):
    again = tmp_path / "again"
    assert sn.main([str(again)] + ARGS + ["--jobs", "1"]) == 0
    files = sorted(p.relative_to(corpus) for p in corpus.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(again) for p in again.rglob("*") if p.is_file())
    for rel in files:
        assert filecmp.cmp(corpus / rel, again / rel, shallow=False), rel
    other = tmp_path / "other"
    args = ARGS[:ARGS.index("--seed")] + ["--seed", "4", "--no-progress"]
    args[args.index("--valid-clips") + 1] = "0"
    args[args.index("--test-clips") + 1] = "0"
    args[args.index("--unlabelled-minutes") + 1] = "0"
    assert sn.main([str(other)] + args) == 0
    for name in ("train_0000", "train_0001"):
        assert not np.array_equal(_read(corpus / "train" / name / "mixture.wav"),
                                  _read(other / "train" / name / "mixture.wav")), name


def test_cache_resume_and_changed_options(corpus, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(corpus, copy)
    kw = dict(train_clips=2, valid_clips=1, test_clips=1, unlabelled_minutes=0.2, clip_seconds=SECONDS,
              seed=3, snr_range=SNR, progress=False)
    mtimes = {p: p.stat().st_mtime_ns for p in copy.rglob("*.wav")}
    (copy / "unlabelled" / "unlabelled_00001.wav.tmp-999").write_bytes(b"killed mid-write")
    meta = sn.generate_corpus(copy, **kw)
    assert meta["rendered"] == 0 and not meta["failed"]
    assert not list(copy.rglob("*.tmp-*"))
    assert {p: p.stat().st_mtime_ns for p in copy.rglob("*.wav")} == mtimes
    # a clip without its json (killed before the end) is rendered again, and only that one
    (copy / "clips" / "test" / "test_0000.json").unlink()
    (copy / "test" / "test_0000" / "speech.wav").write_bytes(b"half")
    (copy / "test" / "test_0000" / "noise.wav.tmp-999").write_bytes(b"half")
    assert sn.generate_corpus(copy, **kw)["rendered"] == 1
    assert sorted(os.listdir(copy / "test" / "test_0000")) == ["mixture.wav", "noise.wav", "speech.wav"]
    for stem in sn.STEMS:
        assert filecmp.cmp(corpus / "test" / "test_0000" / f"{stem}.wav",
                           copy / "test" / "test_0000" / f"{stem}.wav", shallow=False)
    # another SNR range renders the clips again; fewer clips remove the extra ones
    meta = sn.generate_corpus(copy, **{**kw, "valid_clips": 0, "test_clips": 0, "unlabelled_minutes": 0,
                                      "train_clips": 1, "snr_range": (1.0, 2.0)})
    assert meta["rendered"] == 1 and meta["removed"] == 9
    assert sorted(os.listdir(copy / "train")) == ["train_0000"] and not os.listdir(copy / "unlabelled")
    assert _meta(copy)["options"]["snr_range"] == [1.0, 2.0]
    assert not filecmp.cmp(corpus / "train" / "train_0000" / "mixture.wav",
                           copy / "train" / "train_0000" / "mixture.wav", shallow=False)
    # a folder holding something else is refused unless --overwrite
    foreign = tmp_path / "foreign"
    (foreign / "train").mkdir(parents=True)
    (foreign / "train" / "mine.wav").write_bytes(b"x")
    small = ["--train-clips", "1", "--valid-clips", "0", "--test-clips", "0", "--unlabelled-minutes", "0",
             "--clip-seconds", "1", "--no-progress"]
    with pytest.raises(SystemExit, match="no corpus.json of pahubert-speech-corpus"):
        sn.main([str(foreign)] + small)
    assert sn.main([str(foreign)] + small + ["--overwrite"]) == 0
    assert os.listdir(foreign / "train") == ["train_0000"]


def test_unlabelled_folder_feeds_the_manifest(corpus, tmp_path):
    from pahubert_plugin.data import manifest

    rc = manifest.main([str(corpus / "unlabelled"), str(tmp_path / "manifest"), "--sample-rate", str(SR),
                        "--valid-percent", "0.2", "--jobs", "1"])
    assert rc == 0
    rows = []
    for split in ("train", "valid"):
        lines = (tmp_path / "manifest" / f"{split}.tsv").read_text().splitlines()[1:]
        rows += [ln.split("\t") for ln in lines]
    assert sorted(r[0] for r in rows) == sorted(os.listdir(corpus / "unlabelled"))
    assert {int(r[1]) for r in rows} == {int(SR * SECONDS)}


def test_opensfx_parser_gives_real_recordings():
    sounds = sn.read_opensfx(sn.OPENSFX_CAT)
    assert len(sounds) == 73
    for title, riff in sounds:
        assert riff[:4] == b"RIFF" and riff[8:12] == b"WAVE", title
    info = {t: sf.info(__import__("io").BytesIO(r)) for t, r in sounds}
    assert info["Helicopter"].samplerate == 44100 and info["Helicopter"].duration > 2
    machines = sn.opensfx_sounds(sn.OPENSFX_CAT)
    assert len(machines) >= 30 and "Helicopter" in machines and "Jackhammer" in machines
    assert not {"Cow", "Sheep", "Applause", "Wind", '"Good Year'} & set(machines)
    assert not any(t.startswith("Toyland") for t in machines)
    for title, audio in machines.items():
        assert audio.ndim == 1 and np.isfinite(audio).all() and np.abs(audio).max() > 0.01, title

    # 16 kHz after resampling: the beep's pitch is where it was at 44.1 kHz
    def pitch(x, sr):
        spec = np.abs(np.fft.rfft(x * np.hanning(len(x))))
        return np.fft.rfftfreq(len(x), 1 / sr)[int(np.argmax(spec))]

    raw, sr = sf.read(__import__("io").BytesIO(dict(sounds)["Beep"]), dtype="float64")
    assert abs(pitch(machines["Beep"], SR) - pitch(raw, sr)) < 20
    assert abs(len(machines["Helicopter"]) / SR - info["Helicopter"].duration) < 0.5


def test_only_the_en_and_es_prompts_are_read(tmp_path):
    real = {lang: sorted(p for p, _ in sn.asterisk_prompts(sn.ASTERISK_ROOT)[lang])[:3] for lang in ("en", "es")}
    for lang in ("en", "es", "fr", "moh", "en_GB"):
        (tmp_path / lang / "sub").mkdir(parents=True)
        for i, src in enumerate(real["en"]):
            shutil.copy(src, tmp_path / lang / ("sub" if i == 0 else "") / os.path.basename(src))
        shutil.copy(src, tmp_path / lang / "beep.g722")
        (tmp_path / lang / "silence").mkdir()
        shutil.copy(src, tmp_path / lang / "silence" / "1.g722")
    prompts = sn.asterisk_prompts(str(tmp_path))
    assert sorted(prompts) == ["en", "es"]
    for lang, found in prompts.items():
        assert len(found) == 3
        assert all(p.startswith(str(tmp_path / lang) + os.sep) for p, _ in found)
        assert not any(os.path.basename(p) == "beep.g722" or "silence" in p for p, _ in found)
    # the real packages: hundreds of prompts, and they decode to 16 kHz speech
    assert all(len(v) > 400 for v in sn.asterisk_prompts(sn.ASTERISK_ROOT).values())
    audio = sn.decode_g722(real["en"][:2], shutil.which("ffmpeg"), str(tmp_path))
    for (path, size), a in zip(sn.asterisk_prompts(sn.ASTERISK_ROOT)["en"][:2], audio):
        assert abs(len(a) - size * 2) <= 2 and np.abs(a).max() > 0.05  # 8000 bytes per 16000 samples


def test_procedural_machines():
    for name, fn in sn.MACHINES.items():
        a = fn(np.random.default_rng(1), 8000, SR)
        b = fn(np.random.default_rng(1), 8000, SR)
        assert a.shape == (8000,) and np.isfinite(a).all() and np.array_equal(a, b), name
        assert abs(np.sqrt(np.mean(a ** 2)) - 1) < 1e-6, name
    assert set(sn.PROCEDURAL) == set(sn.MACHINES)


def test_clear_errors_without_a_package(tmp_path, capsys):
    out = str(tmp_path / "c")
    with pytest.raises(SystemExit, match="apt-get install asterisk-core-sounds-en-g722"):
        sn.main([out, "--asterisk-root", str(tmp_path / "none")])
    (tmp_path / "only_en" / "en").mkdir(parents=True)
    shutil.copy(sn.asterisk_prompts(sn.ASTERISK_ROOT)["en"][0][0], tmp_path / "only_en" / "en")
    with pytest.raises(SystemExit, match="apt-get install asterisk-core-sounds-es-g722"):
        sn.main([out, "--asterisk-root", str(tmp_path / "only_en")])
    with pytest.raises(SystemExit, match="apt-get install openttd-opensfx"):
        sn.main([out, "--opensfx", str(tmp_path / "opensfx.cat")])
    for tool in ("ffmpeg", "flite", "espeak-ng"):
        with pytest.raises(SystemExit, match=f"apt-get install {tool}"):
            sn.main([out, f"--{tool}", str(tmp_path / f"no-{tool}")])
    with pytest.raises(SystemExit, match="LOW <= HIGH") as e:
        sn.main([out, "--snr-range", "5", "-5"])
    assert e.value.code == 2  # an option mistake exits 2, as every script's
    with pytest.raises(SystemExit, match="clip-seconds"):
        sn.main([out, "--clip-seconds", "0"])
    assert not os.path.exists(out)
    with pytest.raises(SystemExit) as e:
        sn.main(["--help"])
    assert e.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    for package in ("ffmpeg", "flite", "espeak-ng", "asterisk-core-sounds-en-g722",
                    "asterisk-core-sounds-es-g722", "openttd-opensfx", "pyroomacoustics=="):
        assert package in text, package


def test_reverb_without_pyroomacoustics(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "pyroomacoustics", None)  # import fails as when not installed
    with pytest.raises(SystemExit, match=r"pip install pyroomacoustics==\d"):
        sn.main([str(tmp_path / "c"), "--reverb", "--train-clips", "1", "--no-progress"])


def test_failed_clips_are_counted_and_exit_nonzero(tmp_path, capsys):
    fake = tmp_path / "espeak-ng"  # answers --version, fails to speak
    fake.write_text('#!/bin/sh\n[ "$1" = --version ] && { echo "fake espeak version"; exit 0; }\n'
                    'echo "boom: no voice" >&2\nexit 3\n')
    fake.chmod(0o755)
    out = tmp_path / "c"
    args = [str(out), "--train-clips", "6", "--valid-clips", "0", "--test-clips", "0", "--unlabelled-minutes",
            "0", "--clip-seconds", "1", "--espeak-ng", str(fake), "--no-progress"]
    assert sn.main(args) == 1
    meta = _meta(out)
    assert meta["status"] == "failed" and meta["failed"]
    for clip, error in meta["failed"].items():
        assert "espeak-ng failed" in error and "boom: no voice" in error
        assert not (out / clip).exists() and not (out / "clips" / f"{clip}.json").exists()
    assert len(meta["clips"]["train"]) + len(meta["failed"]) == 6
    assert "clips failed" in capsys.readouterr().out


def test_reverb(tmp_path):
    pytest.importorskip("pyroomacoustics", reason=f"optional: pip install {sn.PYROOMACOUSTICS}")
    out = tmp_path / "r"
    assert sn.main([str(out), "--reverb", "--train-clips", "1", "--valid-clips", "0", "--test-clips", "0",
                    "--unlabelled-minutes", "0", "--clip-seconds", "2", "--no-progress"]) == 0
    clip = out / "train" / "train_0000"
    mix, speech, noise = (_read(clip / f"{s}.wav") for s in sn.STEMS)
    assert np.array_equal(mix, speech + noise) and np.abs(mix).max() <= sn.PEAK
    info = _meta(out)["clips"]["train"]["train_0000"]
    rt60 = info["reverb"]["rt60_s"]
    assert 0.15 <= rt60 <= 0.6 and abs(info["reverb"]["measured_rt60_s"] - rt60) < 0.1 * rt60, info["reverb"]
    dry = tmp_path / "dry"  # the same clip without the room
    assert sn.main([str(dry), "--train-clips", "1", "--valid-clips", "0", "--test-clips", "0",
                    "--unlabelled-minutes", "0", "--clip-seconds", "2", "--no-progress"]) == 0
    assert not np.array_equal(_read(dry / "train" / "train_0000" / "speech.wav"), speech)


def test_unlabelled_count():
    assert sn.unlabelled_count(60, 10) == 360
    assert sn.unlabelled_count(0.2, 2) == 6
    assert sn.unlabelled_count(0.05, 2) == 2  # 3 s of audio -> 2 clips
    assert sn.unlabelled_count(0, 10) == 0


def test_renderers_run_side_by_side_and_none_outlives_a_failure(tmp_path):
    """The corpus generators' external commands (flite, espeak-ng, ffmpeg, FluidSynth) start together; one
    that cannot start is named, and a timeout kills and reaps the others instead of leaving them running."""
    import subprocess
    import time

    from pahubert_plugin.corpora.processes import run_side_by_side

    done = run_side_by_side([["sh", "-c", "echo one"], ["sh", "-c", "echo two >&2; exit 3"]], 30,
                            sn.SpeechCorpusError, "test")
    assert done == [(0, "one\n", ""), (3, "", "two\n")]
    with pytest.raises(sn.SpeechCorpusError, match=r"could not run .*no_such_renderer \(voices\)"):
        run_side_by_side([["true"], [str(tmp_path / "no_such_renderer")]], 30, sn.SpeechCorpusError, "voices")
    pids = [tmp_path / f"pid{i}" for i in range(2)]
    start = time.monotonic()
    with pytest.raises(subprocess.TimeoutExpired):
        run_side_by_side([["sh", "-c", f"echo $$ > {p}; exec sleep 60"] for p in pids], 1, sn.SpeechCorpusError, "t")
    assert time.monotonic() - start < 20
    for p in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(int(p.read_text()), 0)


_WORKER_STATE = {"offset": 0}


def _set_offset(offset):
    _WORKER_STATE["offset"] = offset


def _slow_square(x):
    import time
    if x < 0:
        os._exit(1)  # the worker process dies, as when it is killed or out of memory
    time.sleep(0.3 if x == 0 else 0.0)  # the first job finishes last
    return x * x + _WORKER_STATE["offset"]


@pytest.mark.parametrize("workers", [1, 2])
def test_jobs_come_back_in_order_and_a_dead_worker_is_named(workers):
    """The generators' worker pool: results in job order whatever order the workers finish in, the
    initializer runs in every worker (or here), and a worker that dies raises or becomes that job's
    result."""
    from pahubert_plugin.corpora.processes import map_jobs

    _set_offset(0)
    assert map_jobs(_slow_square, [0, 1, 2, 3], workers, "t", "job", progress=False,
                    initializer=_set_offset, initargs=(10,)) == [10, 11, 14, 19]
    if workers > 1:
        with pytest.raises(Exception):
            map_jobs(_slow_square, [1, -1], workers, "t", "job", progress=False)
        got = map_jobs(_slow_square, [2, -1], workers, "t", "job", progress=False,
                       on_worker_error=lambda job, e: f"job {job} failed: {type(e).__name__}")
        # the pool breaks: the dead worker's job, and any still pending, get the error as their result
        assert got[1] == "job -1 failed: BrokenProcessPool" and got[0] in (4, "job 2 failed: BrokenProcessPool")
