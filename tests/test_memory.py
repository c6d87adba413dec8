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
    for label, repeats in (("short", 1), ("long", 12)):  # 30 s and 6 min
        paths[label] = tmp_path / f"{label}.wav"
        with soundfile.SoundFile(paths[label], "w", 44100, 2, subtype="PCM_16") as out:
            for _ in range(repeats):
                out.write(minute)
    env = job_env(model_dir, tmp_path / "out")
    peaks = {
        label: peak_rss_mb(
            ["run", "--input", str(path), "--release-id", "mem", "--track-id", label], env
        )
        for label, path in paths.items()
    }
    print(f"peak RSS: {peaks}")
    # the decoded 6-minute track alone is 127 MB as float32 and its six stems 760 MB:
    # holding either in RAM would show up far above this margin
    assert peaks["long"] < peaks["short"] * 1.15, peaks
