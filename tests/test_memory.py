"""Peak memory does not grow with track length (measured in subprocesses, small model)."""

import os
import subprocess
import sys

import soundfile
from conftest import job_env
from synthetic import music


def peak_rss_mb(args, env) -> float:
    proc = subprocess.Popen(
        [sys.executable, "-m", "job", *args],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    _, status, usage = os.wait4(proc.pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    return usage.ru_maxrss / 1024


def test_peak_rss_of_a_long_track_stays_near_a_short_one(model_dir, tmp_path):
    minute = music(30, seed=11).T
    paths = {}
    for label, repeats in (("short", 1), ("long", 8)):  # 30 s and 4 min
        paths[label] = tmp_path / f"{label}.wav"
        with soundfile.SoundFile(paths[label], "w", 44100, 2, subtype="PCM_16") as out:
            for _ in range(repeats):
                out.write(minute)
    env = job_env(model_dir, tmp_path / "out")

    def peak(label: str, track: str) -> float:
        args = ["run", "--input", str(paths[label]), "--release-id", "mem", "--track-id", track]
        return peak_rss_mb(args, env)

    # The same short run peaks anywhere in a ~250 MB band (allocator and thread timing), so
    # its baseline is the higher of two runs: one low sample alone failed a sound engine.
    peaks = {"short": max(peak("short", "short_a"), peak("short", "short_b"))}
    peaks["long"] = peak("long", "long")
    print(f"peak RSS: {peaks}")
    # the six stems of the 4-minute track are 510 MB as float32: holding them would show far
    # above this margin (the decoded track alone, 85 MB, is within the run-to-run noise)
    assert peaks["long"] < peaks["short"] * 1.15, peaks
