"""The CLI's re-exec under tcmalloc (job/malloc.py), in real subprocesses."""

import ctypes.util
import json
import os
import subprocess
import sys

# Prints one line per process image that runs it: before use_tcmalloc (twice when it re-executes:
# the first image, then the re-executed one) and after it (once).
PROBE = """
import json, os, sys
from job.malloc import use_tcmalloc
def say(stage, **extra):
    print(json.dumps(dict(stage=stage, pid=os.getpid(), argv=sys.argv[1:], **extra)), flush=True)
say("before", reexecuted=bool(os.environ.get("_STEM_JOB_REEXEC")))
use_tcmalloc()
say("after", tcmalloc=any("tcmalloc" in line for line in open("/proc/self/maps")))
"""
ARGS = ["--input", "a song.mp3", ""]  # a space and an empty argument must survive


def probe(**env):
    environ = {
        k: v
        for k, v in os.environ.items()
        if k not in ("LD_PRELOAD", "STEM_JOB_MALLOC", "_STEM_JOB_REEXEC")
    }
    proc = subprocess.Popen(
        [sys.executable, "-c", PROBE, *ARGS],
        env=environ | env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    lines = [json.loads(line) for line in out.splitlines()]
    return proc.pid, lines


def test_reexecs_under_tcmalloc_when_installed_keeping_pid_and_arguments():
    installed = ctypes.util.find_library("tcmalloc_minimal") is not None
    pid, lines = probe()
    *before, after = lines
    assert [line["stage"] for line in before] == ["before"] * (2 if installed else 1)
    assert after["stage"] == "after"
    assert after["tcmalloc"] == installed, "hack/install installs libtcmalloc-minimal4 where it can"
    # one process throughout: the parent's child PID, in the first image and the re-executed one
    assert {line["pid"] for line in lines} == {pid}
    assert all(line["argv"] == ARGS for line in lines)
    assert [line["reexecuted"] for line in before] == [False, True][: len(before)]


def test_system_malloc_on_request():
    pid, lines = probe(STEM_JOB_MALLOC="system")
    assert [line["stage"] for line in lines] == ["before", "after"], "no re-exec"
    assert not lines[-1]["tcmalloc"]
