"""Run under tcmalloc when it is installed: less wall time per track on CPU.

With glibc's malloc every window's large buffers go back to the kernel when freed and are
page-faulted in again for the next window, so much of the job's CPU time is system time;
tcmalloc keeps and reuses them. An allocator can only be chosen before the process starts,
so the CLI re-executes itself once with LD_PRELOAD, before anything heavy is imported (an
exec: same PID, same arguments, tests/test_malloc.py). The image sets LD_PRELOAD itself.
STEM_JOB_MALLOC=system keeps glibc's allocator. `hack/bench` measures the effect.
"""

import ctypes.util
import os
import sys

LIBRARY = "tcmalloc_minimal"


def use_tcmalloc() -> None:
    preload = os.environ.get("LD_PRELOAD", "")
    if (
        os.environ.get("STEM_JOB_MALLOC", "tcmalloc") == "system"
        or "tcmalloc" in preload
        or os.environ.get("_STEM_JOB_REEXEC")
    ):
        return
    library = ctypes.util.find_library(LIBRARY)  # e.g. libtcmalloc_minimal.so.4 (ldconfig)
    if not library:
        return
    env = dict(
        os.environ, LD_PRELOAD=" ".join(filter(None, [library, preload])), _STEM_JOB_REEXEC="1"
    )
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, sys.orig_argv, env)
