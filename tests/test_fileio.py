"""Atomic file writes (pahubert_plugin.fileio): complete under the final name, or not there at all."""
import json

import numpy as np
import pytest
import soundfile as sf

from pahubert_plugin import fileio
from pahubert_plugin.data.audio import write_audio


def _leftovers(folder):
    return sorted(p.name for p in folder.iterdir() if ".tmp-" in p.name)


def test_bytes_text_and_json_replace_the_file_and_create_the_folder(tmp_path):
    path = tmp_path / "new" / "folder" / "a.json"
    fileio.atomic_write_bytes(path, b"old")
    assert path.read_bytes() == b"old"
    fileio.atomic_write_json(path, {"b": 1, "a": [1, 2]})
    assert path.read_text() == '{\n "a": [\n  1,\n  2\n ],\n "b": 1\n}\n'  # indent 1, sorted keys, newline
    assert json.loads(path.read_text()) == {"a": [1, 2], "b": 1}
    fileio.atomic_write_text(path, "héllo")
    assert path.read_bytes() == "héllo".encode()
    assert _leftovers(path.parent) == []


def test_a_failed_write_keeps_the_old_file_and_removes_the_temporary_one(tmp_path):
    path = tmp_path / "stem.wav"
    path.write_bytes(b"the previous version")
    with pytest.raises(TypeError):
        fileio.atomic_write_bytes(path, "not bytes")
    with pytest.raises((ValueError, TypeError, RuntimeError, sf.LibsndfileError)):
        fileio.atomic_write_wav(path, np.zeros((10, 2), np.float32), 16000, subtype="NO_SUCH_SUBTYPE")
    with pytest.raises(TypeError):
        fileio.atomic_write_json(path, {"x": object()})
    assert path.read_bytes() == b"the previous version"
    assert _leftovers(tmp_path) == []


def test_a_write_interrupted_half_way_leaves_nothing_under_the_name(tmp_path, monkeypatch):
    real = sf.SoundFile.write

    def half_then_fail(self, data):
        real(self, data[: len(data) // 2])
        raise OSError("No space left on device")

    monkeypatch.setattr(sf.SoundFile, "write", half_then_fail)
    with pytest.raises(OSError):
        fileio.atomic_write_wav(tmp_path / "a.wav", np.zeros((1000, 2), np.float32), 16000)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("subtype", ["PCM_16", "FLOAT"])
def test_wav_bytes_equal_write_audio(tmp_path, subtype):
    """(samples, channels) in, the bytes data.audio.write_audio writes for (channels, samples): float
    files without the PEAK chunk, so equal audio gives equal files."""
    wav = (0.5 * np.sin(np.arange(3000) / 7.0)[:, None] * np.array([1.0, 0.5])).astype(np.float32)
    fileio.atomic_write_wav(tmp_path / "a.wav", wav, 16000, subtype=subtype)
    write_audio(str(tmp_path / "b.wav"), wav.T, 16000, subtype=subtype)
    assert (tmp_path / "a.wav").read_bytes() == (tmp_path / "b.wav").read_bytes()
    data, sr = sf.read(tmp_path / "a.wav", dtype="float32")
    assert sr == 16000 and data.shape == wav.shape
    fileio.atomic_write_wav(tmp_path / "mono.wav", wav[:, 0], 16000, subtype=subtype)
    assert sf.info(str(tmp_path / "mono.wav")).channels == 1


def test_write_error_names_the_file_meant_and_what_to_do(tmp_path):
    import errno

    from pahubert_plugin.fileio import write_error

    target = tmp_path / "out" / "x.npy"
    line = write_error(target, OSError(errno.ENOSPC, "No space left on device", str(tmp_path / ".x.tmp")))
    assert line == (f"cannot write {target}: No space left on device (free space in {tmp_path / 'out'}, "
                    f"or give another folder, then rerun: finished work is kept)")
    assert write_error(target, PermissionError(errno.EACCES, "Permission denied"), "copy") == \
        f"cannot copy {target}: Permission denied"
    assert write_error(target, OSError("19500 requested and 16352 written")) == \
        f"cannot write {target}: 19500 requested and 16352 written"  # a short write on a disk with room
    assert write_error(target, RuntimeError("not a system error")) is None


def test_a_command_error_is_printed_once_by_the_script_that_ends_with_it(capsys):
    """A library caller that catches a CommandError sees nothing printed; a console script's ``main`` prints
    the one line on stderr and exits with status 2."""
    with pytest.raises(SystemExit):
        raise fileio.CommandError("tool: error: caught by a library caller")
    assert capsys.readouterr().err == ""

    @fileio.prints_command_errors
    def main():
        raise fileio.CommandError("tool: error: the line")

    with pytest.raises(SystemExit) as e:
        main()
    assert e.value.code == 2
    assert capsys.readouterr().err == "tool: error: the line\n"


def test_the_corpus_scripts_print_their_error_line_once(tmp_path, capsys):
    from pahubert_plugin.corpora import speech_noise

    with pytest.raises(SystemExit, match="LOW <= HIGH"):
        speech_noise.main([str(tmp_path / "c"), "--snr-range", "5", "-5"])
    assert capsys.readouterr().err.count("LOW <= HIGH") == 1
