"""Every kind of bad input gets a `failed` result, a clear code, exit 65, and no manifest."""

import base64
import json
import shutil

import corpus
import numpy as np
import pytest
import soundfile
from click.testing import CliRunner
from synthetic import music, write_audio, write_long_silence

from job.cli import cli
from job.errors import EXIT_BAD_INPUT, EXIT_CONFIG


def invoke(args, env):
    runner = CliRunner()
    clean = dict.fromkeys(("JOB_MESSAGE", "ORIGINAL_STEM_URI", "RELEASE_ID", "TRACK_ID"))
    result = runner.invoke(cli, args, env=clean | env, catch_exceptions=False)
    return result.exit_code, result.stdout


def failed(args, env, tmp_path, code):
    exit_code, stdout = invoke(args, env)
    result = json.loads(stdout.strip().splitlines()[-1])
    assert exit_code == EXIT_BAD_INPUT, stdout
    assert result["status"] == "failed" and result["error"]["code"] == code, result
    assert result["error"]["retryable"] is False and result["error"]["message"]
    assert not list((tmp_path / "outputs").rglob("manifest.json"))
    assert not list((tmp_path / "outputs").rglob("*.mp3"))
    return result


@pytest.fixture
def env(model_dir, tmp_path):
    return {
        "MODEL_DIR": str(model_dir),
        "OUTPUT_DIR": str(tmp_path / "outputs"),
        "DEVICE": "cpu",
        "LOG_FORMAT": "text",
    }


def run_args(path, release="rel_1", track="trk_1"):
    return ["run", "--input", str(path), "--release-id", release, "--track-id", track]


def test_missing_file(env, tmp_path):
    failed(run_args(tmp_path / "nope.mp3"), env, tmp_path, "input_not_found")


def test_empty_file(env, tmp_path):
    (tmp_path / "empty.mp3").write_bytes(b"")
    failed(run_args(tmp_path / "empty.mp3"), env, tmp_path, "empty_input")


def test_pdf_is_not_audio(env, tmp_path):
    (tmp_path / "doc.mp3").write_bytes(b"%PDF-1.4\n1 0 obj << /Type /Catalog >> endobj\n" * 50)
    failed(run_args(tmp_path / "doc.mp3"), env, tmp_path, "not_audio")


def test_random_bytes_are_not_audio(env, tmp_path):
    (tmp_path / "noise.wav").write_bytes(np.random.default_rng(0).bytes(200_000))
    failed(run_args(tmp_path / "noise.wav"), env, tmp_path, "not_audio")


@pytest.mark.parametrize("suffix", ["wav", "flac", "mp3"])
def test_truncated_audio(env, tmp_path, suffix):
    whole = write_audio(tmp_path / f"whole.{suffix}", music(6.0))
    cut = tmp_path / f"cut.{suffix}"
    cut.write_bytes(whole.read_bytes()[: whole.stat().st_size // 3])
    failed(run_args(cut), env, tmp_path, "truncated_audio")


def test_corrupt_audio(env, tmp_path):
    whole = write_audio(tmp_path / "whole.flac", music(6.0)).read_bytes()
    rng = np.random.default_rng(1)
    data = bytearray(whole)
    for start in range(4000, len(data) - 2000, 2500):  # garble most of the frames
        data[start : start + 1500] = rng.bytes(1500)
    (tmp_path / "bad.flac").write_bytes(bytes(data))
    failed(run_args(tmp_path / "bad.flac"), env, tmp_path, "corrupt_audio")


def test_zero_length_audio(env, tmp_path):
    soundfile.write(tmp_path / "zero.wav", np.zeros((0, 2), np.float32), 44100)  # header only
    failed(run_args(tmp_path / "zero.wav"), env, tmp_path, "empty_audio")


def test_longer_than_max_duration(env, tmp_path):
    path = write_audio(tmp_path / "long.flac", music(5.0))
    failed(run_args(path), env | {"MAX_DURATION_S": "2"}, tmp_path, "too_long")


def test_a_decoder_bomb_fails_on_the_memory_limit_not_on_the_host(env, tmp_path):
    path = corpus.bomb_at_1_hz(tmp_path / "bomb.flac")
    result = failed(run_args(path), env, tmp_path, "decode_memory_exceeded")
    assert "DECODE_MEMORY_MB" in result["error"]["message"]


def test_a_decode_past_its_time_budget_fails(env, tmp_path):
    path = write_long_silence(tmp_path / "long.flac", 600)  # seconds of work, a few KB
    budget = {"DECODE_TIME_BASE_S": "0.1", "DECODE_TIME_FACTOR": "0.0005"}
    failed(run_args(path), env | budget, tmp_path, "decode_timeout")


def test_larger_than_max_bytes(env, tmp_path, song):
    failed(run_args(song), env | {"MAX_INPUT_BYTES": "1000"}, tmp_path, "input_too_large")


def test_unsupported_mime_type(env, tmp_path, song):
    failed(
        run_args(song) + ["--mime-type", "application/pdf"], env, tmp_path, "unsupported_media_type"
    )


@pytest.mark.parametrize("release", ["../etc", "a/b", "rel 1", "", "x" * 129, "rel_ü"])
def test_bad_ids(env, tmp_path, song, release):
    message = json.dumps({"releaseId": release, "trackId": "t1", "originalStemUri": str(song)})
    failed(["run", "--message", message], env, tmp_path, "invalid_id")


@pytest.mark.parametrize(
    "raw, why",
    [
        ("{not json", "not valid JSON"),
        ("%%%not-base64%%%", "neither JSON nor base64"),
        (base64.b64encode(b"[1, 2]").decode(), "JSON object"),
        (json.dumps({"releaseId": "r1", "trackId": "t1"}), "originalStemUri"),
        (json.dumps({"releaseId": 5, "trackId": "t1", "originalStemUri": "x"}), "must be a string"),
        (
            json.dumps({"releaseId": "r1", "trackId": "t1", "originalStemUri": ["x"]}),
            "originalStemUri",
        ),
    ],
)
def test_malformed_job_message(env, tmp_path, raw, why):
    result = failed(["run"], env | {"JOB_MESSAGE": raw}, tmp_path, "invalid_message")
    assert why in result["error"]["message"]


def test_failed_result_keeps_the_ids_it_can(env, tmp_path):
    raw = json.dumps({"jobId": "j1", "releaseId": "r1", "trackId": "t1"})
    result = failed(["run"], env | {"JOB_MESSAGE": raw}, tmp_path, "invalid_message")
    assert (result["jobId"], result["releaseId"], result["trackId"]) == ("j1", "r1", "t1")


def test_message_paths_must_lie_under_input_dir(env, tmp_path, song):
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    shutil.copy(song, inputs / "ok.mp3")
    (inputs / "escape.mp3").symlink_to(song)
    for uri in ("../song.mp3", str(song), "escape.mp3"):
        message = json.dumps({"releaseId": "r1", "trackId": "t1", "originalStemUri": uri})
        failed(
            ["run", "--message", message],
            env | {"INPUT_DIR": str(inputs)},
            tmp_path,
            "input_not_allowed",
        )


@pytest.mark.parametrize(
    "variable, value",
    [
        ("DEVICE", "tpu"),
        ("MP3_BITRATE", "999k"),
        ("OUTPUT_FORMAT", "ogg"),
        ("MAX_DURATION_S", "-1"),
        ("SEGMENT_BATCH", "lots"),
        ("STORAGE_MODE", "s3"),
        ("PUBSUB_SUBSCRIPTION", "has space"),
        ("PUBSUB_RESULTS_TOPIC", "x"),
        ("DECODE_MEMORY_MB", "16"),
        ("DECODE_TIME_FACTOR", "0"),
        ("DECODE_KILL_RETRIES", "-1"),
    ],
)
def test_invalid_configuration_is_one_line_naming_the_variable(
    env, tmp_path, song, variable, value
):
    runner = CliRunner()
    result = runner.invoke(cli, run_args(song), env=env | {variable: value})
    assert result.exit_code == EXIT_CONFIG
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and variable in lines[0], result.stderr


def test_unloadable_model_is_one_line_naming_model_dir(tmp_path, song):
    empty = tmp_path / "empty-model"
    empty.mkdir()
    runner = CliRunner()
    result = runner.invoke(
        cli,
        run_args(song),
        env={"MODEL_DIR": str(empty), "DEVICE": "cpu", "OUTPUT_DIR": str(tmp_path / "o")},
    )
    assert result.exit_code == EXIT_CONFIG
    # the model loads while the audio decodes, so progress logs may come first; one error line
    errors = [
        line
        for line in result.stderr.strip().splitlines()
        if not (line.startswith("{") and json.loads(line)["severity"] == "INFO")
    ]
    assert len(errors) == 1 and "MODEL_DIR" in errors[0] and "prefetch-model" in errors[0], (
        result.stderr
    )


@pytest.mark.parametrize(
    "args, flag",
    [
        (["drain", "--max-messages", "0"], "--max-messages"),
        (["drain", "--idle-timeout", "-1"], "--idle-timeout"),
        (["serve", "--port", "0"], "--port"),
        (
            ["run", "--device", "tpu", "--input", "x", "--release-id", "r", "--track-id", "t"],
            "--device",
        ),
    ],
)
def test_flags_are_validated_like_their_variables(args, flag):
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 2, result.output  # click's usage error
    assert flag in result.stderr and "invalid" in result.stderr, result.stderr
