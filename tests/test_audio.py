"""Decoding every input format to 44.1 kHz stereo, and the encoders' output."""

import os
import signal
import threading
import time
from pathlib import Path

import av
import corpus
import numpy as np
import pytest
import soundfile
from synthetic import music, write_audio, write_long_silence

from job.audio.child import CHILD_ENV, PASSED_ENV, Limits, decode_aside
from job.audio.decode import RawReader, decode_to_file
from job.audio.encode import StemEncoder, soft_limit
from job.config import Settings
from job.errors import Cancel, Interrupted, JobError


@pytest.mark.parametrize(
    "suffix, rate, channels",
    [
        ("mp3", 44100, 2),
        ("wav", 22050, 2),
        ("flac", 48000, 1),
        ("ogg", 24000, 2),
        ("opus", 48000, 2),
        ("m4a", 44100, 2),
        ("flac", 44100, 6),
        ("wav", 96000, 1),
    ],
)
def test_decodes_to_44k1_stereo_float32(tmp_path, suffix, rate, channels):
    seconds = 3.0
    original = music(seconds, seed=4, rate=rate)
    path = write_audio(tmp_path / f"in.{suffix}", original, rate=rate, channels=channels)
    decoded = decode_to_file(path, tmp_path / "mix.f32", max_duration_s=60)
    # encoders add priming/padding (AAC, Opus): allow 50 ms
    assert abs(decoded.length - seconds * 44100) < 0.05 * 44100
    assert (decoded.source_rate, decoded.source_channels) == (
        48000 if suffix in ("opus", "ogg") else rate,
        channels,
    )
    data = RawReader(decoded).read(0, decoded.length)
    assert data.shape == (2, decoded.length) and data.dtype == np.float32
    assert 0.02 < np.sqrt((data**2).mean()) < 0.5
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
    source = music(4.0, seed=5) * 2  # peaks near 0.5
    encoder = StemEncoder(tmp_path / "vocals.mp3", "mp3", 320, Settings().mp3_quality)
    for start in range(0, source.shape[1], 10_000):
        encoder.put(source[:, start : start + 10_000])
    stats = encoder.finish()
    with av.open(str(tmp_path / "vocals.mp3")) as container:
        decoded = np.concatenate([f.to_ndarray() for f in container.decode(audio=0)], 1)
        assert container.streams.audio[0].bit_rate == 320_000
    assert decoded.shape == source.shape, "exact length: encoder delay and padding trimmed"
    error = ((decoded - source) ** 2).sum() / (source**2).sum()
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
    source = music(1.0, seed=6) * 5  # loud: overs only limited in FLAC
    encoder = StemEncoder(tmp_path / f"drums.{fmt}", fmt)
    encoder.put(source)
    encoder.finish()
    info = soundfile.info(tmp_path / f"drums.{fmt}")
    assert (info.samplerate, info.channels, info.frames, info.subtype) == (
        44100,
        2,
        source.shape[1],
        subtype,
    )
    data, _ = soundfile.read(tmp_path / f"drums.{fmt}", dtype="float32")
    assert (np.abs(data).max() > 1.0) == (fmt == "wav")


# -- the decode in a child process of its own ----------------------------------------------
def decoder_child(timeout=20.0) -> int:
    """The pid of this process's decoding child, as soon as it exists."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for entry in Path("/proc").iterdir():
            try:
                stat = (entry / "stat").read_text()
                cmdline = (entry / "cmdline").read_bytes()
            except (OSError, ValueError):
                continue
            if (
                int(stat.rsplit(")", 1)[1].split()[1]) == os.getpid()
                and b"job.audio.child" in cmdline
            ):
                return int(entry.name)
        time.sleep(0.002)
    raise AssertionError("no decoding child appeared")


def in_background(work):
    """Run `work()` in a thread; the thread and a dict that gets its "value" or "error"."""
    outcome = {}

    def run():
        try:
            outcome["value"] = work()
        except Exception as exc:
            outcome["error"] = exc

    thread = threading.Thread(target=run)
    thread.start()
    return thread, outcome


def test_the_decode_aside_gives_what_the_decode_in_process_gives(tmp_path):
    path = write_audio(tmp_path / "a.mp3", music(5.0, seed=2))
    here = decode_to_file(path, tmp_path / "here.f32", 60)
    aside = decode_aside(path, tmp_path / "aside.f32", 60)
    # the child's BLAS runs one thread: its dot products may round in another order
    same = {**here.__dict__, "path": aside.path, "mean": aside.mean, "std": aside.std}
    assert aside == here.__class__(**same)
    assert (aside.mean, aside.std) == pytest.approx((here.mean, here.std), rel=1e-12)
    assert (tmp_path / "here.f32").read_bytes() == (tmp_path / "aside.f32").read_bytes()


def test_the_decode_aside_raises_the_childs_job_error(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("not audio at all\n" * 100)
    with pytest.raises(JobError) as error:
        decode_aside(path, tmp_path / "mix.f32", 60)
    assert error.value.code == "not_audio" and not error.value.retryable


# the budget is spent
@pytest.mark.parametrize(
    "sig, attempt, code, retryable",
    [
        (signal.SIGSEGV, None, "corrupt_audio", False),
        (signal.SIGKILL, None, "decode_killed", True),  # the platform does not count
        (signal.SIGKILL, Limits().kill_retries - 1, "decode_killed", True),
        (signal.SIGKILL, Limits().kill_retries, "decode_killed", False),
    ],
)
def test_a_decoder_that_dies_fails_the_track_not_the_worker(
    tmp_path, sig, attempt, code, retryable
):
    path = write_audio(tmp_path / "a.flac", music(60.0, seed=3))
    thread, outcome = in_background(
        lambda: decode_aside(path, tmp_path / "mix.f32", 600, attempt=attempt)
    )
    os.kill(decoder_child(), sig)
    thread.join()
    error = outcome["error"]
    assert isinstance(error, JobError), error
    assert (error.code, error.retryable) == (code, retryable), error.message
    if sig == signal.SIGSEGV:
        assert "SIGSEGV" in error.message
    if not retryable and code == "decode_killed":
        assert "DECODE_KILL_RETRIES" in error.message


def test_sigterm_stops_the_decode_aside_at_once(tmp_path):
    path = write_audio(tmp_path / "a.flac", music(60.0, seed=3))
    cancel = Cancel()
    thread, outcome = in_background(
        lambda: decode_aside(path, tmp_path / "mix.f32", 600, cancel=cancel)
    )
    child = decoder_child()
    cancel.set()
    thread.join(5.0)
    assert not thread.is_alive() and isinstance(outcome["error"], Interrupted)
    assert not Path(f"/proc/{child}").exists(), "the child is killed and reaped"


def test_a_file_that_makes_the_decoder_allocate_without_bound_fails_on_the_memory_limit(tmp_path):
    path = corpus.bomb_at_1_hz(tmp_path / "bomb.flac")
    assert path.stat().st_size < 20_000
    with pytest.raises(JobError) as caught:
        decode_aside(path, tmp_path / "mix.f32", 600)
    assert caught.value.code == "decode_memory_exceeded" and not caught.value.retryable
    assert "DECODE_MEMORY_MB" in caught.value.message
    assert (tmp_path / "mix.f32").stat().st_size == 0, "refused before a sample is written"


def test_a_decode_past_its_time_budget_is_stopped_with_its_own_code(tmp_path):
    path = write_long_silence(tmp_path / "a.flac", 600)  # seconds of work, a few KB
    limits = Limits(time_base_s=0.1, time_factor=0.0005)  # a budget of under half a second
    with pytest.raises(JobError) as caught:
        decode_aside(path, tmp_path / "mix.f32", 3600, limits=limits)
    assert caught.value.code == "decode_timeout" and not caught.value.retryable
    assert "DECODE_TIME_FACTOR" in caught.value.message
    whole = 600 * 44100 * 2 * 4
    assert not (tmp_path / "mix.f32").exists() or (tmp_path / "mix.f32").stat().st_size < whole


def test_the_time_budget_follows_the_size_and_the_declared_duration():
    limits = Limits(time_base_s=10, time_factor=0.5)
    assert limits.budget_s(0, 60.0, 3600) == 10 + 30
    assert limits.budget_s(0, None, 3600) == 10 + 1800, "nothing declared: MAX_DURATION_S"
    assert limits.budget_s(0, 7200.0, 3600) == 10 + 1800, "no more than MAX_DURATION_S decodes"
    assert limits.budget_s(40_000_000, 60.0, 3600) == 10 + 2 + 30


def test_the_decoder_sees_no_credentials_and_no_inherited_files(tmp_path, monkeypatch):
    secrets = {
        "GOOGLE_APPLICATION_CREDENTIALS": str(tmp_path / "key.json"),
        "GOOGLE_CLOUD_PROJECT": "p",
        "CLOUDSDK_AUTH_ACCESS_TOKEN": "t",
        "STORAGE_EMULATOR_HOST": "http://127.0.0.1:1",
        "HTTP_TOKEN": "t",
        "AWS_SECRET_ACCESS_KEY": "k",
    }
    for name, value in secrets.items():
        monkeypatch.setenv(name, value)
    path = write_audio(tmp_path / "a.flac", music(60.0, seed=3))
    kept = open(tmp_path / "key.json", "w")  # a file the parent holds open ...
    os.set_inheritable(kept.fileno(), True)  # ... even one marked inheritable
    cancel = Cancel()
    thread, _ = in_background(lambda: decode_aside(path, tmp_path / "mix.f32", 600, cancel=cancel))
    try:
        child = decoder_child()
        deadline = time.monotonic() + 20
        while not (tmp_path / "mix.f32").exists():  # the child is decoding: its files open
            assert time.monotonic() < deadline
            time.sleep(0.01)
        environ = Path(f"/proc/{child}/environ").read_bytes().split(b"\0")
        names = {item.split(b"=", 1)[0].decode() for item in environ if item}
        fds = {int(fd.name): os.readlink(fd) for fd in Path(f"/proc/{child}/fd").iterdir()}
        cwd = os.readlink(f"/proc/{child}/cwd")
    finally:
        cancel.set()
        thread.join()
        kept.close()
    assert not names & set(secrets) and not [n for n in names if n.startswith("GOOGLE")], names
    assert names <= set(PASSED_ENV) | set(CHILD_ENV), names
    assert fds[0] == fds[1] == "/dev/null"
    assert cwd == str(tmp_path), "it works in the scratch folder it writes to"
    files = {target for fd, target in fds.items() if fd > 2 and target.startswith("/")}
    pipes = [target for fd, target in fds.items() if fd > 2 and target.startswith("pipe:")]
    assert files <= {str(path), str(tmp_path / "mix.f32")}, fds
    assert len(pipes) == 1, f"one pipe for its answer: {fds}"
