"""pahubert-separate streams: the files equal the in-memory path's, memory does not grow with the track."""
import logging
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
import torchaudio.functional as AF
from omegaconf import OmegaConf

from pahubert_plugin import separate
from pahubert_plugin.separation import api
from pahubert_plugin.separation.api import Separator
from pahubert_plugin.separation.overlap import (StreamResampler, average_passes, iter_apply, read_blocks,
                                                resample_stream, resampled_frames, stream_apply)
from pahubert_plugin.separation.writing import save_stems
from helpers import SOURCES, SR

SEGMENT = 0.5  # seconds: several chunks per test file


class Toy(torch.nn.Module):
    """Non-linear, position-dependent 'separator': a chunking or cross-fade mistake changes its output."""

    sources, sample_rate, audio_channels = SOURCES, SR, 2

    def __init__(self, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.conv = torch.nn.Conv1d(2, 8, 9, padding=4)
        self.out = torch.nn.Conv1d(8, 4 * 2, 1)

    def forward(self, x):  # (batch, channels, samples) -> (batch, sources, channels, samples)
        ramp = torch.linspace(0.5, 1.5, x.shape[-1])  # depends on the position in the chunk
        y = self.out(torch.tanh(self.conv(x))) * ramp
        return y.view(x.shape[0], 4, 2, -1) + 0.3 * x[:, None]


@pytest.fixture
def toy(monkeypatch):
    model = Toy().eval()
    monkeypatch.setattr(api, "load_separation_model",
                        lambda path, device="cpu": (model, OmegaConf.create({"task": {"valid_segment": SEGMENT}})))
    return model


def song(path, seconds, sr, channels=2, amp=0.5, seed=0):
    rng = np.random.default_rng(seed)
    wav = (amp * rng.uniform(-1, 1, (int(seconds * sr), channels))).astype(np.float32)
    sf.write(path, wav, sr, subtype="MPEG_LAYER_III" if str(path).endswith(".mp3") else "FLOAT")
    return Path(path)


def _read(path):
    return sf.read(str(path), dtype="float32", always_2d=True)[0]


CASES = {  # name: (seconds, file rate, channels, amp, CLI options); "mp3" in the name: an mp3 input
    "same_rate": (2.37, SR, 2, 0.5, ["--float32"]),
    "resampled_shifts_two_stems": (2.51, 44100, 2, 0.5, ["--float32", "--shifts", "2", "--two-stems", "vocals"]),
    "mono_22k_clamp_batch": (1.93, 22050, 1, 0.9, ["--float32", "--clip-mode", "clamp", "--batch-size", "3"]),
    "loud_rescale_overlap": (2.2, 48000, 2, 3.0, ["--float32", "--overlap", "0.5"]),
    "shorter_than_segment": (0.31, 44100, 2, 0.5, ["--float32", "--shifts", "1"]),
    "flac_int24_resampled": (1.7, 44100, 2, 0.5, ["--flac", "--int24"]),
    "wav16": (1.3, 8000, 2, 0.5, []),
    "mp3_input": (2.05, 44100, 2, 0.5, ["--float32"]),
}


def _options(args):
    """The CLI options as separate_file/save_stems arguments."""
    get = lambda flag, default, cast=str: cast(args[args.index(flag) + 1]) if flag in args else default  # noqa
    fmt = "flac" if "--flac" in args else "wav"
    sep_kw = dict(overlap=get("--overlap", 0.25, float), batch_size=get("--batch-size", 1, int),
                  shifts=get("--shifts", 0, int))
    save_kw = dict(fmt=fmt, bits=24 if "--int24" in args else 16, as_float="--float32" in args,
                   clip_mode=get("--clip-mode", "rescale"))
    return sep_kw, save_kw, get("--two-stems", None)


@pytest.mark.parametrize("case", list(CASES))
def test_streamed_files_equal_the_in_memory_path(toy, tmp_path, case):
    seconds, rate, channels, amp, args = CASES[case]
    path = song(tmp_path / ("song.mp3" if "mp3" in case else "song.wav"), seconds, rate, channels, amp)
    assert separate.main(["ckpt.pt", str(path), "-o", str(tmp_path / "stream"), *args]) == 0
    sep_kw, save_kw, two = _options(args)
    stems, sr = Separator(toy, SEGMENT, **sep_kw).separate_file(str(path), two_stems=two)
    paths = save_stems(stems, sr, str(tmp_path / "memory"), "song", **save_kw)
    assert len(paths) == (2 if two else 4)
    for p in map(Path, paths):
        got, want = _read(tmp_path / "stream" / "song" / p.name), _read(p)
        assert got.shape == want.shape == (sf.info(str(path)).frames, channels)
        lsb = {"FLOAT": 0, "PCM_24": 2.0 ** -23, "PCM_16": 2.0 ** -15}[sf.info(str(p)).subtype]
        np.testing.assert_allclose(got, want, atol=1e-6 + lsb, rtol=0)  # a float ulp may flip one level
        assert sf.info(str(p)).subtype == sf.info(str(tmp_path / "stream" / "song" / p.name)).subtype
    assert not list((tmp_path / "stream").rglob(".*"))  # no .part or spool file left
    if save_kw["clip_mode"] == "rescale" and amp > 1:  # the whole stem was rescaled below full scale
        assert 0.9 < np.abs(_read(tmp_path / "stream" / "song" / "vocals.wav")).max() < 1.0


@pytest.mark.parametrize("orig,new", [(44100, 16000), (16000, 44100), (22050, 48000), (48000, 8000)])
def test_stream_resampler_equals_whole_signal_resampling(orig, new):
    torch.manual_seed(0)
    x = torch.randn(3, 2, 54321)
    want = AF.resample(x, orig, new)
    cuts = np.unique(np.random.default_rng(1).integers(1, x.shape[-1], 12)).tolist()
    blocks = torch.tensor_split(x, [1, 2, *cuts], -1)  # blocks of one sample up to thousands
    got = torch.cat(list(resample_stream(blocks, orig, new, x.shape[-1])), -1)
    assert got.shape == want.shape and resampled_frames(x.shape[-1], orig, new) == want.shape[-1]
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)


def test_resampler_flush_of_a_short_stream():
    x = torch.randn(2, 37)
    rs = StreamResampler(44100, 16000, 37)
    got = torch.cat([rs.push(x), rs.flush()], -1)
    torch.testing.assert_close(got, AF.resample(x, 44100, 16000), atol=1e-6, rtol=0)


@pytest.mark.parametrize("total,batch", [(7001, 1), (7001, 3), (1500, 2), (1999, 1)])
def test_stream_apply_equals_iter_apply_and_holds_one_batch(total, batch):
    model, segment = Toy().eval(), 2000
    x = torch.randn(2, total)
    want = torch.cat([b for _, b in iter_apply(model, x, segment, 0.25, batch)], -1)
    pulled = []

    def blocks():
        for b in torch.split(x, 333, -1):
            pulled.append(b.shape[-1])
            yield b

    out, emitted = [], 0
    for start, block in stream_apply(model, blocks(), total, segment, 0.25, batch):
        assert start == emitted
        out.append(block)
        emitted += block.shape[-1]
        assert sum(pulled) - emitted <= (batch + 1) * segment + 333  # input held: about one batch
    torch.testing.assert_close(torch.cat(out, -1), want, atol=0, rtol=0)


def test_average_passes_lockstep():
    a, b = torch.arange(10.0), 2 * torch.arange(10.0)
    got = torch.cat(list(average_passes([torch.split(a, 3), torch.split(b, 4)])))
    torch.testing.assert_close(got, (0 + a + b) / 2)


def test_read_blocks_reports_bad_samples(tmp_path):
    wav = np.zeros((5000, 2), np.float32)
    wav[4000, 1] = np.nan
    sf.write(tmp_path / "nan.wav", wav, SR, subtype="FLOAT")
    from pahubert_plugin.data.audio import AudioError, audio_info

    with pytest.raises(AudioError, match="NaN"):
        list(read_blocks(audio_info(tmp_path / "nan.wav"), block=1000))


def test_a_read_error_midway_leaves_no_stems(toy, tmp_path, caplog):
    wav = np.full((3 * SR, 2), 0.1, np.float32)
    wav[-100, 0] = np.inf  # found only after the first stem blocks were written
    sf.write(tmp_path / "bad.wav", wav, SR, subtype="FLOAT")
    good = song(tmp_path / "good.wav", 1.0, SR)
    with caplog.at_level(logging.ERROR):
        assert separate.main(["c.pt", str(tmp_path / "bad.wav"), str(good), "-o", str(tmp_path / "out")]) == 1
    assert "skipping" in caplog.text and "NaN or infinite" in caplog.text
    assert not (tmp_path / "out" / "bad").exists() or not list((tmp_path / "out" / "bad").iterdir())
    assert sorted(p.name for p in (tmp_path / "out" / "good").iterdir()) == sorted(f"{s}.wav" for s in SOURCES)


@pytest.mark.parametrize("jobs,threads,want", [(2, None, 2), (1, None, 4), (2, 3, 3), (4, None, 1)])
def test_threads_split_between_jobs(toy, tmp_path, monkeypatch, jobs, threads, want):
    before = torch.get_num_threads()
    torch.set_num_threads(4)
    seen = []
    real = Separator.separate_to_files
    monkeypatch.setattr(Separator, "separate_to_files",
                        lambda self, *a, **k: (seen.append(torch.get_num_threads()), real(self, *a, **k))[1])
    extra = [] if threads is None else ["--threads", str(threads)]
    path = song(tmp_path / "s.wav", 0.2, SR)
    try:
        assert separate.main(["c.pt", str(path), "-o", str(tmp_path / "o"), "-j", str(jobs), *extra]) == 0
        assert seen == [want] and torch.get_num_threads() == 4  # restored after main
    finally:
        torch.set_num_threads(before)


def test_bad_threads_stop_before_any_work(tmp_path, capsys):
    with pytest.raises(SystemExit):
        separate.main(["c.pt", str(tmp_path / "x.wav"), "-o", str(tmp_path / "o"), "--threads", "0"])
    assert "--threads must be >= 1" in capsys.readouterr().err


def test_resampler_holds_one_block_plus_context():
    rs = StreamResampler(44100, 16000, 100 * 4410)
    for block in torch.split(torch.randn(2, 100 * 4410), 4410, -1):
        rs.push(block)
        assert rs.buf.shape[-1] <= 4410 + 2 * (rs.ctx + 1) * rs.o  # not the whole history
