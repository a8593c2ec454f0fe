"""The audio reader: formats, seek-based crops, channel policy, resampling, bad files."""
import numpy as np
import pytest
import soundfile as sf
import torch

from pahubert_plugin import frames
from pahubert_plugin.data.audio import AudioError, audio_info, read_audio
from helpers import tone


@pytest.fixture
def stereo_wav(tmp_path):
    path = tmp_path / "stereo.wav"
    sf.write(path, tone(1.5, 44100, channels=2), 44100, subtype="FLOAT")
    return path


def test_stereo_wav_full_and_offset_reads(stereo_wav):
    full, sr = read_audio(stereo_wav)
    assert sr == 44100 and full.shape == (2, int(1.5 * 44100)) and full.dtype == torch.float32
    ref = sf.read(stereo_wav, dtype="float32")[0].T
    np.testing.assert_array_equal(full.numpy(), ref)
    for offset, n in [(0, 100), (12345, 4410), (full.shape[1] - 7, 7)]:
        part, _ = read_audio(stereo_wav, offset=offset, num_samples=n)
        torch.testing.assert_close(part, full[:, offset:offset + n], rtol=0, atol=0)


def test_channel_policy(stereo_wav, tmp_path):
    mono, _ = read_audio(stereo_wav, channels=1)
    full, _ = read_audio(stereo_wav)
    torch.testing.assert_close(mono[0], full.mean(0))
    mono_path = tmp_path / "mono.wav"
    sf.write(mono_path, tone(0.5, 16000), 16000)
    dup, _ = read_audio(mono_path, channels=2)
    assert dup.shape[0] == 2 and torch.equal(dup[0], dup[1])


def test_mono_flac_resampled(tmp_path):
    path = tmp_path / "mono.flac"
    sf.write(path, tone(2.0, 22050, freq=300.0), 22050)
    info = audio_info(path)
    assert (info.sample_rate, info.channels, info.format) == (22050, 1, "FLAC")
    wav, sr = read_audio(path, sample_rate=44100, channels=2)
    assert sr == 44100 and wav.shape == (2, 88200) == (2, info.samples_at(44100))
    # the tone survives resampling: its spectral peak stays at 300 Hz
    spec = np.abs(np.fft.rfft(wav[0].numpy()))
    assert abs(np.argmax(spec) * 44100 / wav.shape[1] - 300.0) < 2.0
    # a crop at the target rate equals the same span of the full resampled read
    for offset in (30000, 30001, 7):
        part, _ = read_audio(path, sample_rate=44100, channels=2, offset=offset, num_samples=20000)
        torch.testing.assert_close(part, wav[:, offset:offset + 20000], atol=1e-5, rtol=0)


@pytest.mark.parametrize("src,out", [(48000, 44100), (44100, 16000), (16000, 44100)])
def test_resampled_crops_are_slices_of_full_reads(tmp_path, src, out):
    path = tmp_path / "x.wav"
    sf.write(path, tone(1.0, src, channels=2, freq=1000.0), src, subtype="FLOAT")
    full, _ = read_audio(path, sample_rate=out)
    for offset in (1, 100, 12345, full.shape[1] - 999):
        part, _ = read_audio(path, sample_rate=out, offset=offset, num_samples=999)
        torch.testing.assert_close(part, full[:, offset:offset + 999], atol=1e-5, rtol=0)


def test_mp3(tmp_path):
    if "MP3" not in sf.available_formats():
        pytest.skip(f"libsndfile {sf.__libsndfile_version__} here cannot read mp3")
    path = tmp_path / "song.mp3"
    sf.write(path, tone(1.0, 44100, channels=2), 44100)
    wav, sr = read_audio(path, sample_rate=16000, channels=1)
    assert sr == 16000 and wav.shape[0] == 1 and abs(wav.shape[1] - 16000) <= 2
    assert wav.abs().max() > 0.1


def test_corrupt_truncated_and_nan_files_name_the_path(tmp_path, stereo_wav):
    garbage = tmp_path / "garbage.wav"
    garbage.write_bytes(b"RIFF not really audio" * 20)
    with pytest.raises(AudioError, match="garbage.wav"):
        read_audio(garbage)
    truncated = tmp_path / "truncated.wav"
    data = stereo_wav.read_bytes()
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(AudioError, match="truncated.wav: truncated"):
        read_audio(truncated)
    nan = tmp_path / "nan.wav"
    x = tone(0.2, 16000)
    x[100] = np.nan
    sf.write(nan, x, 16000, subtype="FLOAT")
    with pytest.raises(AudioError, match="nan.wav: contains NaN"):
        read_audio(nan)
    with pytest.raises(AudioError, match="missing.wav: no such file"):
        read_audio(tmp_path / "missing.wav")
    with pytest.raises(AudioError, match="cannot read"):
        read_audio(stereo_wav, offset=66000, num_samples=1000)
    with pytest.raises(AudioError, match="cannot turn"):
        from pahubert_plugin.data.audio import apply_channel_policy
        apply_channel_policy(np.zeros((3, 10)), 2, "six.wav")


@pytest.mark.parametrize("sr", [16000, 44100, 48000])
def test_frame_rule(sr):
    hop = frames.hop_length(sr)
    assert hop * 100 == sr
    for n in [0, 1, hop - 1, hop, 10 * hop + 3, 123457]:
        assert frames.num_frames(n, sr) == n // hop
    x = torch.arange(10.0)[:, None]
    assert frames.fit_frames(x, 12).shape[0] == 12 and frames.fit_frames(x, 8).shape[0] == 8
    assert frames.fit_frames(np.arange(10), 11)[-1] == 9
    with pytest.raises(ValueError, match="off the expected"):
        frames.fit_frames(x, 20)
    with pytest.raises(ValueError, match="22050"):
        frames.hop_length(22050)
