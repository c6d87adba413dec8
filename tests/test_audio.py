"""Decoding every input format to 44.1 kHz stereo, and the encoders' output."""

import signal

import av
import numpy as np
import pytest
import soundfile

from job.audio import RawReader, decode_aside, decode_to_file
from job.errors import Cancel, Interrupted, JobError
from job.encode import StemEncoder, soft_limit
from job.synthetic import music, write_audio


@pytest.mark.parametrize("suffix, rate, channels", [
    ("mp3", 44100, 2), ("wav", 22050, 2), ("flac", 48000, 1), ("ogg", 24000, 2),
    ("opus", 48000, 2), ("m4a", 44100, 2), ("flac", 44100, 6), ("wav", 96000, 1),
])
def test_decodes_to_44k1_stereo_float32(tmp_path, suffix, rate, channels):
    seconds = 3.0
    original = music(seconds, seed=4, rate=rate)
    path = write_audio(tmp_path / f"in.{suffix}", original, rate=rate, channels=channels)
    decoded = decode_to_file(path, tmp_path / "mix.f32", max_duration_s=60)
    # encoders add priming/padding (AAC, Opus): allow 50 ms
    assert abs(decoded.length - seconds * 44100) < 0.05 * 44100
    assert (decoded.source_rate, decoded.source_channels) == (48000 if suffix in ("opus", "ogg") else rate, channels)
    data = RawReader(decoded).read(0, decoded.length)
    assert data.shape == (2, decoded.length) and data.dtype == np.float32
    assert 0.02 < np.sqrt((data ** 2).mean()) < 0.5
    mono = data.mean(0)
    assert decoded.mean == pytest.approx(mono.mean(), abs=1e-6)
    assert decoded.std == pytest.approx(mono.std(ddof=1), rel=1e-4)
    if channels == 1:
        assert np.array_equal(data[0], data[1]), "mono must be duplicated"


def test_reader_pads_with_zeros_outside_the_track(tmp_path):
    path = write_audio(tmp_path / "a.wav", music(1.0))
    decoded = decode_to_file(path, tmp_path / "mix.f32", 60)
    reader = RawReader(decoded)
    block = reader.read(-100, 200)
    assert not block[:, :100].any() and block[:, 100:].any()
    tail = reader.read(decoded.length - 10, decoded.length + 10)
    assert not tail[:, 10:].any()


def test_mp3_stem_is_gapless_and_aligned(tmp_path):
    source = music(4.0, seed=5) * 2          # peaks near 0.5
    encoder = StemEncoder(tmp_path / "vocals.mp3", "mp3", 320)
    for start in range(0, source.shape[1], 10_000):
        encoder.put(source[:, start:start + 10_000])
    stats = encoder.finish()
    with av.open(str(tmp_path / "vocals.mp3")) as container:
        decoded = np.concatenate([f.to_ndarray() for f in container.decode(audio=0)], 1)
        assert container.streams.audio[0].bit_rate == 320_000
    assert decoded.shape == source.shape, "exact length: encoder delay and padding trimmed"
    error = ((decoded - source) ** 2).sum() / (source ** 2).sum()
    assert 10 * np.log10(1 / error) > 20, "stem must be sample-aligned with its source"
    assert stats["samples"] == source.shape[1] and stats["limitedSamples"] == 0


def test_soft_limit_bends_only_overs_and_stays_under_full_scale():
    block = np.array([[0.1, -0.5, 0.89, 0.95, 1.5, -3.0]], np.float32)
    limited, count = soft_limit(block)
    assert count == 3
    assert np.array_equal(limited[0, :3], block[0, :3])
    assert (np.abs(limited) <= 1.0).all() and limited[0, 4] > limited[0, 3] > 0.9


@pytest.mark.parametrize("fmt, subtype", [("wav", "FLOAT"), ("flac", "PCM_24")])
def test_wav_and_flac_outputs(tmp_path, fmt, subtype):
    source = music(1.0, seed=6) * 5              # loud: overs only limited in FLAC
    encoder = StemEncoder(tmp_path / f"drums.{fmt}", fmt)
    encoder.put(source)
    encoder.finish()
    info = soundfile.info(tmp_path / f"drums.{fmt}")
    assert (info.samplerate, info.channels, info.frames, info.subtype) == (44100, 2, source.shape[1], subtype)
    data, _ = soundfile.read(tmp_path / f"drums.{fmt}", dtype="float32")
    assert (np.abs(data).max() > 1.0) == (fmt == "wav")


# -- the decode in a child process of its own ----------------------------------------------
def _kill_the_decoder_once_started(sig):
    """Kill the decoding child with `sig` as soon as it exists (it is spawned: a fresh
    interpreter, still starting up when this fires)."""
    import multiprocessing
    import os
    import threading
    import time

    def kill():
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            children = [c for c in multiprocessing.active_children() if c.name == "decode"]
            if children:
                os.kill(children[0].pid, sig)
                return
            time.sleep(0.001)
    thread = threading.Thread(target=kill)
    thread.start()
    return thread


def test_the_decode_aside_gives_what_the_decode_in_process_gives(tmp_path):
    path = write_audio(tmp_path / "a.mp3", music(5.0, seed=2))
    here = decode_to_file(path, tmp_path / "here.f32", 60)
    aside = decode_aside(path, tmp_path / "aside.f32", 60)
    assert aside == here.__class__(**{**here.__dict__, "path": aside.path})
    assert (tmp_path / "here.f32").read_bytes() == (tmp_path / "aside.f32").read_bytes()


def test_the_decode_aside_raises_the_childs_job_error(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("not audio at all\n" * 100)
    with pytest.raises(JobError) as error:
        decode_aside(path, tmp_path / "mix.f32", 60)
    assert error.value.code == "not_audio" and not error.value.retryable


@pytest.mark.parametrize("sig, code, retryable", [(signal.SIGSEGV, "corrupt_audio", False),
                                                   (signal.SIGKILL, "decode_killed", True)])
def test_a_decoder_that_dies_fails_the_track_not_the_worker(tmp_path, sig, code, retryable):
    path = write_audio(tmp_path / "a.flac", music(60.0, seed=3))
    killer = _kill_the_decoder_once_started(sig)
    with pytest.raises(JobError) as error:
        decode_aside(path, tmp_path / "mix.f32", 600)
    killer.join()
    assert (error.value.code, error.value.retryable) == (code, retryable), error.value.message
    if sig == signal.SIGSEGV:
        assert "SIGSEGV" in error.value.message


def test_sigterm_stops_the_decode_aside_at_once(tmp_path):
    import multiprocessing
    import threading
    import time
    path = write_audio(tmp_path / "a.flac", music(60.0, seed=3))
    cancel = Cancel()
    threading.Timer(0.05, cancel.set).start()
    started = time.monotonic()
    with pytest.raises(Interrupted):
        decode_aside(path, tmp_path / "mix.f32", 600, cancel=cancel)
    assert time.monotonic() - started < 2.0
    assert not [c for c in multiprocessing.active_children() if c.name == "decode"]
