"""Speech metrics against reference values: SI-SDR, SI-SDRi, wide-band PESQ, STOI, and their summary.

The speech is a real prompt (Debian's asterisk-core-sounds-en-g722, decoded with ffmpeg) where the
machine has it, otherwise a voiced, amplitude-modulated harmonic signal with formants (PESQ needs
speech-like input).
"""
import math
import os
import shutil
import subprocess
import warnings

import numpy as np
import pytest

from pahubert_plugin import metrics

SR = 16000
PROMPTS = "/usr/share/asterisk/sounds/en"


def _prompt(name: str, sr: int) -> np.ndarray:
    raw = subprocess.run(["ffmpeg", "-nostdin", "-hide_banner", "-loglevel", "error", "-f", "g722", "-i",
                          os.path.join(PROMPTS, f"{name}.g722"), "-ar", str(sr), "-ac", "1", "-f", "s16le", "-"],
                         capture_output=True, check=True).stdout
    return np.frombuffer(raw, "<i2").astype(np.float64) / 32768.0


def _synthetic_speech(seconds: float, sr: int, seed: int) -> np.ndarray:
    """Voiced syllables: a harmonic source with a drifting f0, two moving formants, 4 Hz syllable envelope."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * sr)) / sr
    f0 = 120 + 30 * np.sin(2 * np.pi * 0.7 * t + rng.uniform(0, 6)) + 10 * np.sin(2 * np.pi * 5 * t)
    phase = 2 * np.pi * np.cumsum(f0) / sr
    f1 = 500 + 250 * np.sin(2 * np.pi * 2.1 * t + rng.uniform(0, 6))
    f2 = 1500 + 600 * np.sin(2 * np.pi * 1.3 * t + rng.uniform(0, 6))
    x = np.zeros_like(t)
    for k in range(1, 40):
        fk = k * f0
        gain = np.exp(-((fk - f1) / 150) ** 2) + 0.5 * np.exp(-((fk - f2) / 250) ** 2) + 0.02
        x += gain * np.sin(k * phase) * (fk < sr / 2 - 200)
    syllables = np.clip(np.sin(2 * np.pi * 4 * t + rng.uniform(0, 6)), 0, None) ** 0.7
    pauses = (np.sin(2 * np.pi * 0.45 * t + rng.uniform(0, 6)) > -0.6)
    x *= syllables * pauses
    return 0.3 * x / np.abs(x).max()


def speech_like(seconds: float = 2.0, sr: int = SR, seed: int = 0) -> np.ndarray:
    """``(samples,)`` float64 speech at ``sr``: asterisk prompts end to end where installed, else synthetic."""
    names = ["conf-getpin", "demo-congrats", "auth-thankyou", "calling", "conf-hasjoin"]
    if os.path.isdir(PROMPTS) and shutil.which("ffmpeg") and os.path.isfile(os.path.join(PROMPTS, f"{names[0]}.g722")):
        n = int(seconds * sr)
        parts, have, k = [], 0, seed
        while have < n:
            name = names[k % len(names)]
            k += 1
            if not os.path.isfile(os.path.join(PROMPTS, f"{name}.g722")):
                continue
            x = _prompt(name, sr)
            parts.append(x)
            have += x.size
        return np.concatenate(parts)[:n]
    return _synthetic_speech(seconds, sr, seed)


@pytest.fixture(scope="module")
def speech():
    return speech_like(3.0)


def _at_snr(ref, noise, snr_db):
    """``ref + noise`` with noise orthogonal to the zero-mean ref, scaled to ``snr_db``."""
    r = ref - ref.mean()
    n = noise - noise.mean()
    n = n - (n @ r) / (r @ r) * r
    n = n * np.sqrt((r @ r) / (n @ n) / 10 ** (snr_db / 10))
    return ref + n


# ----------------------------------------------------------------------------- SI-SDR

def test_si_sdr_of_a_scaled_copy_is_very_large(speech):
    ref = speech[None]  # (channels, samples)
    assert metrics.si_sdr(ref, 0.5 * ref) > 90
    assert metrics.si_sdr(ref, -3 * ref + 0.2) > 90  # any gain and DC offset: scale invariant, zero-mean


@pytest.mark.parametrize("snr", [-5.0, 0.0, 10.0, 20.0])
def test_si_sdr_of_additive_noise_is_the_snr(speech, snr):
    noise = np.random.default_rng(1).standard_normal(speech.size)
    est = _at_snr(speech, noise, snr)
    assert abs(float(metrics.si_sdr(speech[None], est[None])) - snr) < 0.1
    assert abs(float(metrics.si_sdr(speech[None], 0.3 * est[None])) - snr) < 0.1


def test_si_sdr_matches_the_paper_formula_in_a_batch():
    rng = np.random.default_rng(0)
    ref = rng.standard_normal((3, 2, 2, 400))  # (batch, sources, channels, samples)
    est = ref + 0.5 * rng.standard_normal(ref.shape)
    got = metrics.si_sdr(ref, est)
    assert got.shape == (3, 2)
    for b in range(3):
        for s in range(2):
            r = (ref[b, s] - ref[b, s].mean(-1, keepdims=True)).ravel()
            e = (est[b, s] - est[b, s].mean(-1, keepdims=True)).ravel()
            target = (e @ r) / (r @ r) * r
            want = 10 * np.log10((target @ target) / ((e - target) @ (e - target)))
            assert got[b, s] == pytest.approx(want, abs=1e-6)
    # torch tensors as well, and the mixture broadcast against the sources
    import torch

    mix = ref.sum(1)  # (batch, channels, samples)
    np.testing.assert_allclose(metrics.si_sdr(torch.from_numpy(ref), torch.from_numpy(est)), got)
    assert metrics.si_sdr(ref, mix[:, None]).shape == (3, 2)


def test_si_sdr_improvement_of_the_mixture_is_zero():
    rng = np.random.default_rng(2)
    refs = rng.standard_normal((2, 1, 8000))
    mix = refs.sum(0)
    np.testing.assert_allclose(metrics.si_sdr_improvement(refs, mix, mix), 0.0, atol=1e-12)
    np.testing.assert_allclose(metrics.si_sdr_improvement(refs, np.broadcast_to(mix, refs.shape), mix), 0.0, atol=1e-12)
    assert (metrics.si_sdr_improvement(refs, refs, mix) > 50).all()


def test_si_sdr_rejects_shapes_that_do_not_match():
    with pytest.raises(ValueError, match="same number of samples"):
        metrics.si_sdr(np.zeros((2, 100)), np.zeros((2, 99)))
    with pytest.raises(ValueError, match="do not broadcast"):
        metrics.si_sdr(np.zeros((3, 2, 100)), np.zeros((2, 2, 100)))


# ----------------------------------------------------------------------------- PESQ, STOI

def test_pesq_of_a_clean_copy_and_of_noise(speech):
    assert metrics.pesq_wb(speech, speech, SR) == pytest.approx(4.64, abs=0.01)
    noise = np.random.default_rng(3).standard_normal(speech.size) * 0.1
    assert metrics.pesq_wb(speech, noise, SR) < 1.5
    # stereo is scored as its mono mix; other rates are resampled to 16 kHz
    assert metrics.pesq_wb(np.stack([speech, speech]), np.stack([speech, speech]), SR) == pytest.approx(4.64, abs=0.01)
    from scipy.signal import resample_poly

    at44 = resample_poly(speech, 441, 160)
    assert metrics.pesq_wb(at44, at44, 44100) == pytest.approx(4.64, abs=0.01)
    assert metrics.pesq_wb(at44, at44 + 0.05 * np.random.default_rng(4).standard_normal(at44.size), 44100) < 4.0


def test_stoi_of_a_clean_copy_and_of_unrelated_noise(speech):
    assert metrics.stoi(speech, speech, SR) == pytest.approx(1.0, abs=1e-6)
    noise = np.random.default_rng(5).standard_normal(speech.size) * 0.1
    assert metrics.stoi(speech, noise, SR) < 0.5
    noisy = _at_snr(speech, noise, 0.0)
    assert 0.5 < metrics.stoi(speech, noisy, SR) < 0.99


def test_undefined_pesq_and_stoi_are_nan_with_a_warning(speech):
    silence = np.zeros(SR)
    with pytest.warns(metrics.UndefinedMetricWarning, match="PESQ undefined"):
        assert math.isnan(metrics.pesq_wb(silence, silence, SR))
    rumble = np.sin(2 * np.pi * 20 * np.arange(SR) / SR)  # nothing in the speech band: pesq's NoUtterancesError
    with pytest.warns(metrics.UndefinedMetricWarning, match="no utterances detected"):
        assert math.isnan(metrics.pesq_wb(rumble, rumble + 0.01 * np.random.default_rng(0).standard_normal(SR), SR))
    with pytest.warns(metrics.UndefinedMetricWarning, match="too short"):
        assert math.isnan(metrics.pesq_wb(speech[SR:SR + 2000], speech[SR:SR + 2000], SR))
    with pytest.warns(metrics.UndefinedMetricWarning, match="STOI undefined"):
        assert math.isnan(metrics.stoi(silence, silence, SR))
    with pytest.warns(metrics.UndefinedMetricWarning, match="too few non-silent frames"):
        assert math.isnan(metrics.stoi(speech[SR:SR + 3000], speech[SR:SR + 3000], SR))


# ----------------------------------------------------------------------------- one track, a summary

def _record(refs, ests, mix, metric_names):
    scores = metrics.track_scores(refs, ests, mix, SR, metric_names)
    return {"metrics": list(metric_names), "scores": scores["model"], "mixture": scores["mixture"]}


def test_track_scores_put_the_mixture_beside_the_model(speech):
    rng = np.random.default_rng(6)
    refs = {"speech": speech[None], "noise": 0.05 * rng.standard_normal((1, speech.size))}
    mix = refs["speech"] + refs["noise"]
    ests = {"speech": _at_snr(speech, rng.standard_normal(speech.size), 25.0)[None], "noise": refs["noise"] * 0.9}
    scores = metrics.track_scores(refs, ests, mix, SR, ["si_sdr", "pesq", "stoi"])
    model, base = scores["model"], scores["mixture"]
    assert set(model["speech"]) == {"SI-SDR", "SI-SDRi", "PESQ", "STOI"}
    assert set(model["noise"]) == {"SI-SDR", "SI-SDRi"}  # PESQ/STOI: the speech source only
    assert set(base["speech"]) == {"SI-SDR", "PESQ", "STOI"}
    assert model["speech"]["SI-SDR"] == pytest.approx(25.0, abs=0.1)
    assert model["speech"]["SI-SDRi"] == pytest.approx(model["speech"]["SI-SDR"] - base["speech"]["SI-SDR"])
    assert model["speech"]["PESQ"] > base["speech"]["PESQ"] and model["speech"]["STOI"] > base["speech"]["STOI"]
    # the mixture as its own estimate improves nothing
    same = metrics.track_scores(refs, {"speech": mix, "noise": mix}, mix, SR, ["si_sdr"])["model"]
    assert same["speech"]["SI-SDRi"] == pytest.approx(0.0, abs=1e-9) and same["noise"]["SI-SDRi"] == pytest.approx(0.0, abs=1e-9)


def test_summary_says_when_the_model_is_worse_than_the_mixture(speech):
    rng = np.random.default_rng(7)
    tracks = {}
    for i in range(3):
        s = speech_like(1.5, seed=i)[None]
        n = 0.1 * rng.standard_normal(s.shape)
        mix = s + n
        # speech estimate: the mixture with more noise added (worse than the mixture); noise: perfect
        ests = {"speech": mix + 0.2 * rng.standard_normal(s.shape), "noise": n}
        tracks[f"clip{i}"] = _record({"speech": s, "noise": n}, ests, mix, ["si_sdr", "pesq", "stoi"])
    silent = np.zeros((1, SR))  # a clip without speech: SI-SDR, PESQ and STOI of speech are undefined
    n = 0.1 * rng.standard_normal(silent.shape)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tracks["silent"] = _record({"speech": silent, "noise": n}, {"speech": 0 * n, "noise": n}, n,
                                   ["si_sdr", "pesq", "stoi"])
    assert sum(issubclass(w.category, metrics.UndefinedMetricWarning) for w in caught) == 5  # SI-SDR once, 2 x 2
    summary = metrics.summarize_tracks(tracks, ["speech", "noise"], ["si_sdr", "pesq", "stoi"])
    per = summary["sources"]
    assert per["speech"]["SI-SDRi"] < 0 < per["noise"]["SI-SDRi"]
    assert np.isfinite(per["speech"]["PESQ"]) and np.isfinite(summary["mixture"]["sources"]["speech"]["PESQ"])
    assert summary["undefined"] == {k: {"speech": 1} for k in ("SI-SDR", "PESQ", "STOI")}
    assert list(summary["worse_than_mixture"]) == ["speech"]
    lines = metrics.verdict_lines(summary)
    want = f"speech: the model is worse than returning the mixture (SI-SDRi {per['speech']['SI-SDRi']:.1f} dB)"
    assert lines[0] == want
    assert "speech: PESQ undefined on 1 of 4 tracks (silent or too short reference): NaN there, left out of the means" in lines
    table = metrics.markdown_table(summary, ["speech", "noise"])
    assert "| SI-SDRi |" in table and "| mixture SI-SDR |" in table and "| mixture PESQ |" in table
    pesq_row = next(r for r in table.splitlines() if r.startswith("| PESQ |"))
    assert pesq_row.split("|")[3].strip() == "-"  # no PESQ for the noise
    assert "SDR |" not in table.replace("SI-SDR |", "")  # museval's SDR was not asked for
