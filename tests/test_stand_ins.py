"""The GCS stand-in itself: its state survives the kills the soak inflicts on it, and it enforces
the generation precondition that the manifest's compare-and-swap rests on."""

import threading

import pytest
from emulators import GcsEmulator, ensure_bucket
from google.api_core import exceptions


def test_a_kill_mid_writes_loses_no_acknowledged_object_or_generation(tmp_path):
    """Killed while uploads are in flight, the stand-in restarts with every upload it answered,
    whole and at the same generation, as real Cloud Storage keeps what it acknowledged."""
    with GcsEmulator(tmp_path / "gcs").start() as emulator:
        bucket = ensure_bucket(emulator.client("stand-in"), "kill-bucket")
        acknowledged = {}

        def upload():
            for number in range(400):
                blob = bucket.blob(f"o/{number}")
                try:
                    blob.upload_from_string(b"x" * 50_000, timeout=2, retry=None)
                except Exception:  # the kill: stop at the first failed request
                    return
                acknowledged[blob.name] = blob.generation

        writer = threading.Thread(target=upload)
        writer.start()
        while len(acknowledged) < 20:
            threading.Event().wait(0.01)
        emulator.kill()
        writer.join()
        emulator.start()
        found = {blob.name: blob for blob in emulator.client("stand-in").list_blobs("kill-bucket")}
        assert set(acknowledged) <= set(found)
        assert all(
            found[name].generation == generation for name, generation in acknowledged.items()
        )
        assert all(found[name].size == 50_000 for name in acknowledged)


def test_one_of_racing_creates_wins_and_a_stale_generation_is_refused(gcs_emulator, bucket):
    """`if_generation_match`: 0 creates only where nothing is, N replaces only generation N,
    and of several writers racing for one generation exactly one wins (a 412 for the rest)."""
    target = gcs_emulator.client().bucket(bucket)
    for round_ in range(10):
        name, winners = f"race-{round_}", []
        start = threading.Barrier(6)

        def create(writer, start=start, name=name, winners=winners):
            start.wait()
            try:
                target.blob(name).upload_from_string(str(writer).encode(), if_generation_match=0)
                winners.append(writer)
            except exceptions.PreconditionFailed:
                pass

        threads = [threading.Thread(target=create, args=(writer,)) for writer in range(6)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert len(winners) == 1, winners
        assert target.blob(name).download_as_bytes() == str(winners[0]).encode()
    current = target.get_blob("race-0")
    with pytest.raises(exceptions.PreconditionFailed):
        target.blob("race-0").upload_from_string(
            b"late", if_generation_match=current.generation - 1
        )
    replaced = target.blob("race-0")
    replaced.upload_from_string(b"next", if_generation_match=current.generation)
    assert replaced.generation != current.generation
