"""The CLI's re-exec under tcmalloc (job/malloc.py), in real subprocesses."""

import ctypes.util
import os
import subprocess
import sys

PROBE = ("from job.malloc import use_tcmalloc; use_tcmalloc(); import os; "
         "print(any('tcmalloc' in line for line in open('/proc/self/maps')), os.getpid())")


def probe(**env):
    environ = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "STEM_JOB_MALLOC",
                                                               "_STEM_JOB_REEXEC")}
    proc = subprocess.run([sys.executable, "-c", PROBE], env=environ | env, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    loaded, pid = proc.stdout.split()
    return loaded == "True", int(pid)


def test_runs_under_tcmalloc_when_installed_and_never_otherwise():
    installed = ctypes.util.find_library("tcmalloc_minimal") is not None
    loaded, _ = probe()
    assert loaded == installed, "hack/install installs libtcmalloc-minimal4 where it can"


def test_system_malloc_on_request():
    loaded, _ = probe(STEM_JOB_MALLOC="system")
    assert not loaded
