"""Processes racing to write one track on the GCS stand-in (hack/commit_race.py): different
outputs, a re-upload of the original among them, one killed between its stems and its
manifest. `manifest.json`, whenever it exists, names one whole set that matches its own
request (never a writer's claim), and a `completed` writer was answered with such a set."""

import commit_race  # hack/commit_race.py (tests/stand_ins.py puts hack/ on sys.path)
import pytest


@pytest.mark.parametrize("seed", range(8))
def test_racing_writers_leave_one_whole_set_for_its_own_request(
    gcs_emulator, bucket, seed, tmp_path
):
    objects = gcs_emulator.client().bucket(bucket)
    result = commit_race.race(gcs_emulator.port, objects, seed, writers=5, folder=tmp_path)
    assert result["problems"] == [], result
    killed = result["exit_codes"].count(9)
    assert killed <= 1 and result["exit_codes"].count(0) == 5 - killed
    assert len(result["outcomes"]) == 5 - killed, "every writer that was not killed reported"
