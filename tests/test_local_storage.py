"""Local storage never writes outside OUTPUT_DIR and never shows an incomplete set."""

import json
import multiprocessing
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import job_env
from synthetic import music, write_audio

from job.errors import EXIT_RETRY, JobError
from job.messages import STEMS
from job.storage.local import LocalStorage


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
        with storage.commit("rel_1", "trk_1") as commit:
            commit.write_manifest({"x": 1})
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
    with storage.commit("rel_1", "trk_1") as commit:
        commit.write_stems({"vocals": source})
    assert victim.read_text() == "keep"
    assert (folder / "vocals.mp3").read_bytes() == b"ID3 new stem"


def test_sigterm_mid_separation_leaves_no_manifest_and_exits_75(model_dir, tmp_path):
    song = write_audio(tmp_path / "long.flac", music(60.0, seed=8))
    env = job_env(model_dir, tmp_path / "out", LOG_FORMAT="json")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "job",
            "run",
            "--input",
            str(song),
            "--release-id",
            "rel_1",
            "--track-id",
            "trk_1",
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 120
    for line in proc.stderr:  # wait until separation is under way
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


def write_set(output_dir, job: str, seed: int, kill: bool = False) -> None:
    """One local writer: its stems (bytes naming the job), pauses where a scheduler might
    put them, then its manifest; `kill` dies between the stems and the manifest."""
    pause = random.Random(seed).uniform
    storage = LocalStorage(str(output_dir), lock_wait_s=30)
    scratch = Path(output_dir).parent / f"scratch-{job}"
    scratch.mkdir()
    files = {}
    for name in STEMS:
        files[name] = scratch / f"{name}.mp3"
        files[name].write_bytes(f"{job}:{name}".encode() * 2000)
    with storage.commit("rel", "trk") as commit:
        with open(Path(output_dir).parent / "turns", "a") as turns:
            turns.write(job + "\n")  # the order in which writers got their turn
        for name in STEMS:
            commit.write_stems({name: files[name]})
            time.sleep(pause(0, 0.004))
        if kill:
            os._exit(9)
        commit.write_manifest({"jobId": job, "stems": {n: {"file": f"{n}.mp3"} for n in STEMS}})


@pytest.mark.parametrize("seed", range(6))
def test_local_writers_racing_for_one_track_leave_one_whole_set(tmp_path, seed):
    """Processes write one track at once (one killed between its stems and its manifest):
    the last writer's manifest stands (none when the last one was killed), and it names that
    writer's files, every one of them."""
    output = tmp_path / "out"
    output.mkdir()
    jobs = [f"job{n}" for n in range(4)]
    context = multiprocessing.get_context("fork")
    workers = [
        context.Process(target=write_set, args=(output, job, seed * 10 + n, n == 1))
        for n, job in enumerate(jobs)
    ]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(60)
    assert [w.exitcode for w in workers] == [0, 9, 0, 0]
    found = LocalStorage(str(output)).read_manifest("rel", "trk")
    last = (tmp_path / "turns").read_text().split()[-1]
    if last == "job1":
        assert found is None
        return
    assert found is not None and found["jobId"] == last
    folder = output / "rel" / "trk"
    assert {(folder / f"{n}.mp3").read_bytes().split(b":")[0].decode() for n in STEMS} == {
        found["jobId"]
    }


def test_a_file_changed_after_the_manifest_voids_the_local_set(tmp_path):
    storage = LocalStorage(str(tmp_path / "out"))
    source = tmp_path / "vocals.mp3"
    source.write_bytes(b"ID3 one")
    with storage.commit("rel", "trk") as commit:
        commit.write_stems({"vocals": source})
        commit.write_manifest({"stems": {"vocals": {"file": "vocals.mp3"}}})
    assert storage.read_manifest("rel", "trk") is not None
    (tmp_path / "out" / "rel" / "trk" / "vocals.mp3").write_bytes(b"ID3 two")
    assert storage.read_manifest("rel", "trk") is None


def bytes_read() -> int:
    """What this process has read through read(2) so far (/proc/self/io's rchar)."""
    fields = dict(line.split(": ") for line in Path("/proc/self/io").read_text().splitlines())
    return int(fields["rchar"])


def stored_set(tmp_path, size: int) -> tuple[LocalStorage, Path]:
    storage = LocalStorage(str(tmp_path / "out"))
    files = {}
    for name in ("vocals", "drums", "bass"):
        files[name] = tmp_path / f"{name}.mp3"
        files[name].write_bytes(os.urandom(size))
    with storage.commit("rel", "trk") as commit:
        commit.write_stems(files)
        commit.write_manifest({"stems": {name: {"file": f"{name}.mp3"} for name in files}})
    return storage, tmp_path / "out" / "rel" / "trk"


def test_a_complete_set_is_vouched_for_without_reading_it_again(tmp_path):
    """A duplicate message's skip check reads the manifest, not the set: a file whose stamp
    (inode, size, mtime, ctime) is the one the writer hashed is not hashed again."""
    storage, folder = stored_set(tmp_path, 4 << 20)
    before = bytes_read()
    assert storage.read_manifest("rel", "trk") is not None
    assert bytes_read() - before < 1 << 20, "the 12 MiB set was read again"
    manifest = json.loads((folder / "manifest.json").read_text())
    assert set(manifest["fileStamps"]) == set(manifest["fileChecksums"])


def test_a_change_that_keeps_size_and_mtime_still_voids_the_set(tmp_path):
    storage, folder = stored_set(tmp_path, 1 << 16)
    path = folder / "drums.mp3"
    kept = path.stat()
    with open(path, "r+b") as handle:
        handle.write(b"X" * 16)  # same size
    os.utime(path, ns=(kept.st_atime_ns, kept.st_mtime_ns))  # mtime put back: ctime is not
    assert path.stat().st_size == kept.st_size and path.stat().st_mtime_ns == kept.st_mtime_ns
    assert storage.read_manifest("rel", "trk") is None


def test_a_set_copied_elsewhere_is_hashed_and_still_vouched_for(tmp_path):
    """New inodes and times (a copied folder, a restored backup): the stamps do not match,
    the files are hashed, and the same bytes are the same complete set."""
    storage, folder = stored_set(tmp_path, 1 << 16)
    for path in folder.glob("*.mp3"):
        data = path.read_bytes()
        path.unlink()
        path.write_bytes(data)
    before = bytes_read()
    assert storage.read_manifest("rel", "trk") is not None
    assert bytes_read() - before >= 3 << 16, "hashed again"
