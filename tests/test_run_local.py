"""End to end: `stem-job run` as a subprocess, a local mp3 in, six mp3 stems out."""

import base64
import json

import av
import numpy as np
from conftest import last_json, run_job

from job.messages import STEMS


def decode(path):
    with av.open(str(path)) as container:
        stream = container.streams.audio[0]
        frames = [f.to_ndarray() for f in container.decode(stream)]
        return (
            np.concatenate(frames, axis=1),
            stream.codec_context.sample_rate,
            stream.codec_context.channels,
        )


def check_stem_set(folder, result, n_samples):
    manifest = json.loads((folder / "manifest.json").read_text())
    assert result["status"] == "completed"
    assert set(result["stems"]) == set(STEMS) == set(manifest["stems"])
    for stem in STEMS:
        assert (
            result["stems"][stem]
            == manifest["stems"][stem]["url"]
            == f"{result['releaseId']}/{result['trackId']}/{stem}.mp3"
        )
        audio, rate, channels = decode(folder / f"{stem}.mp3")
        assert (rate, channels) == (44100, 2)
        assert abs(audio.shape[1] - n_samples) <= 1152, (stem, audio.shape[1], n_samples)
        assert np.sqrt(np.mean(audio**2)) > 1e-4, f"{stem} is silent"
        assert manifest["stems"][stem]["bytes"] == (folder / f"{stem}.mp3").stat().st_size
    assert manifest["durationS"] == result["durationS"]
    assert manifest["jobId"] == result["jobId"]
    return manifest


def test_run_with_flags_writes_six_mp3_and_manifest(song, mix, job_env_for, tmp_path):
    env = job_env_for()
    proc = run_job(
        ["run", "--input", str(song), "--release-id", "rel_1", "--track-id", "trk_1"], env
    )
    assert proc.returncode == 0, proc.stderr
    result = last_json(proc.stdout)
    folder = tmp_path / "outputs" / "rel_1" / "trk_1"
    manifest = check_stem_set(folder, result, mix.shape[1])
    assert manifest["input"]["sha256"]
    assert set(result["timings"]) >= {"decode", "separate", "encode", "upload"}
    assert abs(result["durationS"] - mix.shape[1] / 44100) < 0.03
    assert not list(folder.glob(".*")), "temp files left behind"
    # the decoding child tried its fences; the CLI (its parent) logged what held, once
    logged = [json.loads(line) for line in proc.stderr.splitlines() if line.startswith("{")]
    fenced = [e for e in logged if "decoding child" in e.get("message", "")]
    assert len(fenced) == 1 and fenced[0]["severity"] == "INFO", fenced
    for fence in ("network refused", "parentEnviron refused", "writes refused", "seccomp loaded"):
        assert fence in fenced[0]["message"], fenced[0]


def test_run_from_env_message_base64(song, mix, job_env_for, tmp_path):
    message = {
        "jobId": "sep_a",
        "releaseId": "rel_2",
        "artistId": "art_1",
        "trackId": "trk_2",
        "originalStemUri": str(song),
        "mimeType": "audio/mpeg",
    }
    env = job_env_for(JOB_MESSAGE=base64.b64encode(json.dumps(message).encode()).decode())
    proc = run_job([], env | {"PROCESSING_MODE": "job"})
    assert proc.returncode == 0, proc.stderr
    result = last_json(proc.stdout)
    assert (result["jobId"], result["artistId"]) == ("sep_a", "art_1")
    check_stem_set(tmp_path / "outputs" / "rel_2" / "trk_2", result, mix.shape[1])


def test_run_from_env_variables_is_idempotent(song, mix, job_env_for, tmp_path):
    env = job_env_for(ORIGINAL_STEM_URI=str(song), RELEASE_ID="rel_3", TRACK_ID="trk_3")
    first = run_job(["run"], env)
    assert first.returncode == 0, first.stderr
    folder = tmp_path / "outputs" / "rel_3" / "trk_3"
    check_stem_set(folder, last_json(first.stdout), mix.shape[1])
    second = last_json(run_job(["run"], env).stdout)
    assert second["reused"] is True and second["stems"] == last_json(first.stdout)["stems"]
    assert "separate" not in second["timings"]


def test_how_a_set_was_made_is_recorded_and_what_it_is_decides_a_redo(song, job_env_for, tmp_path):
    """The manifest records MP3_QUALITY and SHIFTS; changing them alone reuses the set,
    changing the bitrate (what a caller gets) separates again."""
    env = job_env_for(ORIGINAL_STEM_URI=str(song), RELEASE_ID="rel_4", TRACK_ID="trk_4")
    assert run_job(["run"], env).returncode == 0
    manifest = json.loads((tmp_path / "outputs" / "rel_4" / "trk_4" / "manifest.json").read_text())
    assert (manifest["mp3Quality"], manifest["shifts"], manifest["bitrate"]) == (5, 0, "320k")
    tuned = last_json(run_job(["run"], env | {"MP3_QUALITY": "2", "SHIFTS": "1"}).stdout)
    assert tuned["reused"] is True
    rebitrated = last_json(run_job(["run"], env | {"MP3_BITRATE": "192k"}).stdout)
    assert rebitrated["reused"] is False and rebitrated["status"] == "completed"
