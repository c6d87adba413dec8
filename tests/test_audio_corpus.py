"""The generated corpus (tests/corpus.py): every case completes with all of its audio, or fails
with its stable code and a message in plain words; a smaller set runs through the real CLI,
where the exit code must be 0 or 65 whatever the model is doing at that moment."""

import json
import logging
import tempfile

import av
import numpy as np
import pytest
from conftest import last_json, run_job
from corpus import CASES, END_TO_END, MAX_DURATION_S

from job.audio.child import decode_aside
from job.audio.decode import SAMPLE_RATE, RawReader, decode_to_file
from job.errors import JobError
from job.messages import STEMS

BY_NAME = {case.name: case for case in CASES}


def make(name, tmp_path):
    folder = tmp_path / name
    folder.mkdir()
    return BY_NAME[name].make(folder)


def check_message(message: str, original) -> None:
    """Words a support person can act on: no scratch path, no errno, no FFmpeg call names."""
    rest = message.replace(str(original), "the original")
    assert tempfile.gettempdir() not in rest and "Errno" not in rest and "()" not in rest, message


@pytest.mark.parametrize("name", list(BY_NAME))
def test_decoder_on_the_corpus(name, tmp_path):
    case = BY_NAME[name]
    path = make(name, tmp_path)
    target = tmp_path / "mix.f32"
    if case.code:
        with pytest.raises(JobError) as caught:
            decode_to_file(path, target, MAX_DURATION_S)
        assert caught.value.code == case.code, caught.value.message
        check_message(caught.value.message, path)
        return
    decoded = decode_to_file(path, target, MAX_DURATION_S)
    assert abs(decoded.length - case.length) <= case.slack, (decoded.length, case.length)
    assert target.stat().st_size == decoded.length * 2 * 4
    assert decoded.source_channels == case.channels and decoded.container and decoded.codec
    data = RawReader(decoded).read(0, decoded.length)
    assert np.isfinite(data).all()
    mono = data.mean(0)
    assert decoded.mean == pytest.approx(mono.mean(), abs=1e-5)
    assert decoded.std == pytest.approx(mono.std(ddof=1), rel=1e-3, abs=1e-6)


def test_a_declared_bomb_is_refused_before_any_decoding(tmp_path):
    path = make("bomb_declared_hours", tmp_path)
    with pytest.raises(JobError, match="declares 10800 s") as caught:
        decode_to_file(path, tmp_path / "mix.f32", MAX_DURATION_S)
    assert caught.value.code == "too_long"
    assert not (tmp_path / "mix.f32").exists(), "nothing may be decoded"


def test_an_undeclared_bomb_stops_at_the_limit(tmp_path):
    path = make("bomb_silence_undeclared", tmp_path)
    assert path.stat().st_size < 100_000
    with pytest.raises(JobError) as caught:
        decode_to_file(path, tmp_path / "mix.f32", MAX_DURATION_S)
    assert caught.value.code == "too_long"
    bound = (MAX_DURATION_S + 1) * SAMPLE_RATE + 2 * 4608  # the limit plus one decoded frame
    assert (tmp_path / "mix.f32").stat().st_size <= bound * 2 * 4


@pytest.mark.parametrize(
    "name, index, channels",
    [
        ("two_streams_none_default", 0, 2),
        ("two_streams_second_default", 1, 6),
        ("music_video", 1, 2),
        ("mp3_huge_id3_cover", 0, 2),
    ],
)
def test_the_stream_decoded_is_the_default_one_and_recorded(name, index, channels, tmp_path):
    decoded = decode_to_file(make(name, tmp_path), tmp_path / "mix.f32", MAX_DURATION_S)
    assert (decoded.stream_index, decoded.source_channels) == (index, channels)
    assert decoded.audio_streams == (2 if name.startswith("two_streams") else 1)


@pytest.mark.parametrize(
    "name, container, codec",
    [
        ("flac_named_mp3", "flac", "flac"),
        ("mp3_huge_id3_cover", "mp3", "mp3float"),
        ("dsd_dsf", "dsf", "dsd_lsbf_planar"),
        ("tta", "tta", "tta"),
        ("eac3", "eac3", "eac3"),
    ],
)
def test_the_content_decides_not_the_name(name, container, codec, tmp_path):
    decoded = decode_to_file(make(name, tmp_path), tmp_path / "mix.f32", MAX_DURATION_S)
    assert (decoded.container, decoded.codec) == (container, codec)


def test_nan_and_inf_in_a_float_wav_are_replaced_and_counted(tmp_path):
    decoded = decode_to_file(make("nan_inf_float_wav", tmp_path), tmp_path / "mix.f32", 60)
    data = RawReader(decoded).read(0, decoded.length)
    assert decoded.non_finite == 120
    assert (data[0, 1000:1100] == 0).all()
    assert (data[1, 2000:2010] == 1).all() and (data[0, 3000:3010] == -1).all()


def test_the_decode_aside_logs_the_childs_warnings_here(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="job.audio.decode"):
        decoded = decode_aside(make("nan_inf_float_wav", tmp_path), tmp_path / "mix.f32", 60)
    assert decoded.non_finite == 120
    assert any(
        "120 NaN/Inf samples" in r.getMessage() and r.name == "job.audio.decode"
        for r in caplog.records
    ), caplog.records


def test_surround_is_down_mixed_by_the_standard_matrix(tmp_path):
    """Centre at -3 dB into both sides, LFE left out (libswresample's default matrix)."""
    import corpus

    n = 4096
    audio = np.zeros((6, n), np.float32)
    audio[2] = 0.5  # FC
    audio[3] = 0.25  # LFE
    path = corpus.encode(tmp_path / "c.wav", "pcm_f32le", audio)
    data = RawReader(decode_to_file(path, tmp_path / "mix.f32", 60)).read(0, n)
    assert np.allclose(data, 0.5 * np.sqrt(0.5), atol=1e-4)


def stem_lengths(folder):
    lengths = {}
    for stem in STEMS:
        with av.open(str(folder / f"{stem}.mp3")) as container:
            lengths[stem] = sum(frame.samples for frame in container.decode(audio=0))
    return lengths


@pytest.mark.parametrize("name", sorted(END_TO_END))
def test_end_to_end_through_the_cli(name, job_env_for, tmp_path):
    """A real `stem-job run`, declared as audio/mpeg whatever it is (the content decides)."""
    case = BY_NAME[name]
    path = make(name, tmp_path)
    env = job_env_for(MAX_DURATION_S=MAX_DURATION_S)
    proc = run_job(
        [
            "run",
            "--input",
            str(path),
            "--release-id",
            "corpus",
            "--track-id",
            name,
            "--mime-type",
            "audio/mpeg",
        ],
        env,
        timeout=240,
    )
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    result = last_json(proc.stdout)
    if case.code:
        assert proc.returncode == 65, (proc.returncode, proc.stderr[-2000:])
        assert result["status"] == "failed" and result["error"]["code"] == case.code, result
        check_message(result["error"]["message"], path)
        assert not list((tmp_path / "outputs").rglob("*.mp3"))
        return
    assert proc.returncode == 0, (proc.returncode, proc.stderr[-2000:])
    assert result["status"] == "completed", result
    expected = decode_to_file(path, tmp_path / "mix.f32", MAX_DURATION_S).length
    folder = tmp_path / "outputs" / "corpus" / name
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["durationS"] == round(expected / SAMPLE_RATE, 3)
    assert stem_lengths(folder) == dict.fromkeys(STEMS, expected), "stems as long as the input"


@pytest.mark.parametrize(
    "name", ["wma", "wav_s16", "wav_stale_riff_size", "wav_rf64", "w64", "aiff", "rf64_soundfile"]
)
def test_a_header_cut_anywhere_is_read_without_fault(name, tmp_path):
    """The header reader meets every prefix of a real header: it answers, it never raises."""
    from job.audio.signatures import audio_end

    path = make(name, tmp_path)
    data = path.read_bytes()
    whole = audio_end(path)
    assert whole is not None and 700 < whole <= len(data), (whole, len(data))
    cut = tmp_path / "cut"
    for keep in range(min(len(data), 700)):
        cut.write_bytes(data[:keep])
        end = audio_end(cut)
        assert end is None or end > keep - 1, (keep, end)
