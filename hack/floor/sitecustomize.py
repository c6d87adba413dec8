"""hack/bench's CPU accounting inside a measured `stem-job` process (on its PYTHONPATH only).

With STEM_BENCH_THREAD_CPU set, every Python thread appends its name and CPU seconds to that
file when it ends, so the bench can split the process's CPU time by thread (encoders, window
reader, model load). The job exits through os._exit, so nothing is left to an atexit hook.
"""

import json
import os
import threading
import time

_PATH = os.environ.get("STEM_BENCH_THREAD_CPU")

if _PATH:
    _run = threading.Thread.run

    def _accounted(self):
        try:
            _run(self)
        finally:
            with open(_PATH, "a") as out:
                out.write(json.dumps({"name": self.name, "cpu_s": time.thread_time()}) + "\n")

    threading.Thread.run = _accounted
