"""A small fleet under faults: the slice of hack/soak that CI runs, with the same verdict.

Two drain workers, twelve messages (six tracks of 3-8 s, an exact duplicate, a second jobId, a
re-upload, three bad messages), one SIGKILL mid-separation, one SIGSTOP between the stems and
the manifest held past the lease (its message goes back to the queue for the other worker), one
GCS stand-in restart. The verdict reads storage and the results topic only.
"""

import soak  # hack/soak.py (tests/stand_ins.py puts hack/ on sys.path)


def test_a_small_fleet_under_faults_loses_nothing_and_mixes_nothing(
    pubsub_emulator, gcs_emulator, model_dir, tmp_path
):
    faults = {"sigkill_separation": 1, "sigstop_race": 1, "gcs_restart": 1}
    # max_wall_s only stops a fleet that hangs: on a loaded shared machine the slice has
    # needed more than 200 s; it ends as soon as every message has its result.
    config = soak.Config(
        workers=2,
        max_messages=2,
        tracks=6,
        duplicates=1,
        second_jobs=1,
        reuploads=1,
        bad=3,
        # one window of the model each, mostly: on a loaded 2-core host separation runs at ~0.3x
        # real time, and the fleet's invariants do not depend on a track's length
        min_track_s=3,
        max_track_s=8,
        faults=faults,
        fault_window_s=15,
        race_at="upload",
        seed=13,
        max_wall_s=600,
    )
    fleet = soak.Fleet(config, tmp_path, pubsub_emulator, gcs_emulator, model_dir)
    report = fleet.run()
    assert report["problems"] == [], report
    assert report["messages"] == 12 and report["tracks"] == 6
    assert {k: v for k, v in report["faults"].items() if v} == faults, fleet.faults
    assert report["faults_not_injected"] == []
    # Whether the second worker reached the frozen one's track before SIGCONT depends on timing
    # this slice cannot pin down; hack/soak reports it per fault ("raced_with"). The
    # invariants below must hold either way.
    assert (
        report["lost"],
        report["mixed_sets"],
        report["stale_sets"],
        report["wrong_results"],
        report["orphan_stems"],
    ) == (0, 0, 0, 0, 0), report
    assert report["ok"]
