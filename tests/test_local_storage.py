"""Local storage never writes outside OUTPUT_DIR and never shows an incomplete set."""

import json
import signal
import subprocess
import sys
import time

import pytest

from conftest import job_env
from job.errors import EXIT_RETRY, JobError
from job.storage import LocalStorage
from job.synthetic import music, write_audio


def test_ids_cannot_leave_output_dir(tmp_path):
    storage = LocalStorage(str(tmp_path / "out"))
    for bad in ("..", "../x", "a/b", ".", ""):
        with pytest.raises(JobError):
            storage.track_dir(bad, "t1", create=True)
    assert not (tmp_path / "x").exists()


def test_symlinked_release_folder_outside_is_refused(tmp_path):
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "rel_1").symlink_to(outside)
    storage = LocalStorage(str(tmp_path / "out"))
    with pytest.raises(JobError) as error:
        storage.write_manifest("rel_1", "trk_1", {"x": 1})
    assert error.value.code == "output_not_allowed"
    assert not list(outside.rglob("*.json"))


def test_symlinked_stem_file_is_replaced_not_followed(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("keep")
    storage = LocalStorage(str(tmp_path / "out"))
    folder = storage.track_dir("rel_1", "trk_1", create=True)
    (folder / "vocals.mp3").symlink_to(victim)
    source = tmp_path / "vocals.mp3"
    source.write_bytes(b"ID3 new stem")
    storage.write_stems("rel_1", "trk_1", {"vocals": source})
    assert victim.read_text() == "keep"
    assert (folder / "vocals.mp3").read_bytes() == b"ID3 new stem"


def test_sigterm_mid_separation_leaves_no_manifest_and_exits_75(model_dir, tmp_path):
    song = write_audio(tmp_path / "long.flac", music(60.0, seed=8))
    env = job_env(model_dir, tmp_path / "out", LOG_FORMAT="json")
    proc = subprocess.Popen([sys.executable, "-m", "job", "run", "--input", str(song),
                             "--release-id", "rel_1", "--track-id", "trk_1"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    for line in proc.stderr:          # wait until separation is under way
        if "separated" in line or time.monotonic() > deadline:
            break
    sent = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    stdout, _ = proc.communicate(timeout=30)
    elapsed = time.monotonic() - sent
    assert proc.returncode == EXIT_RETRY
    result = json.loads(stdout.strip().splitlines()[-1])
    assert result["status"] == "failed" and result["error"]["code"] == "interrupted"
    assert result["error"]["retryable"] is True
    assert elapsed < 10, f"took {elapsed:.1f} s to stop"
    assert not list((tmp_path / "out").rglob("manifest.json"))
    assert not list((tmp_path / "out").rglob("*.mp3"))
