"""hack/bench's CPU accounting inside a measured `stem-job` process (on its PYTHONPATH only).

With STEM_BENCH_THREAD_CPU set, every Python thread appends its name and CPU seconds to that
file when it ends, so the bench can split the process's CPU time by thread (encoders, window
reader, model load).

With STEM_BENCH_PARTS set, the CPU time spent inside the functions named in PARTS is summed by
part, whatever thread runs them (a measured call inside another is counted once, by the inner
one's part), and the process's own and its children's CPU time are taken when the engine gets
its first track: what start-up and the decoding child cost. One JSON line is written to that
file as the job leaves. The job exits through os._exit, so nothing is left to an atexit hook.
"""

import importlib.machinery
import json
import os
import resource
import sys
import threading
import time

_PATH = os.environ.get("STEM_BENCH_THREAD_CPU")
_PARTS_PATH = os.environ.get("STEM_BENCH_PARTS")

# module -> {qualified name: part}. Names of this tree and of the code before the CPU-side work
# (hack/bench --floor --compare runs both); a name a tree lacks is skipped.
PARTS = {
    "lameenc": {"Encoder": "lame"},
    "job.audio.mp3": {"Mp3Writer.write": "encoders", "Mp3Writer.close": "encoders"},
    "job.audio.encode": {
        "soft_limit": "encoders",
        "magnitude": "encoders",
        "to_pcm16": "encoders",
        "MixMeter.handle": "analysis",
        "MixMeter.close": "analysis",
    },
    "job.analysis.peaks": {"Peaks.add": "analysis", "Peaks.write": "analysis"},
    "job.analysis.loudness": {
        "LoudnessMeter.add": "analysis",
        "LoudnessMeter.result": "analysis",
    },
    "job.separation.engine": {"Engine.separate": "engine_io", "TrackRun.load": "engine_io"},
    "job.separation.passes": {"Runner.run": "model"},
    "job.pipeline": {"_store": "upload"},
    "job.storage.gcs": {"GcsStorage.upload": "upload"},  # in a pool of its own threads
    "job.cli": {"finish_run": "upload"},  # the result printed and published
}

if _PATH:
    _run = threading.Thread.run

    def _accounted(self):
        try:
            _run(self)
        finally:
            with open(_PATH, "a") as out:
                out.write(json.dumps({"name": self.name, "cpu_s": time.thread_time()}) + "\n")

    threading.Thread.run = _accounted


if _PARTS_PATH:
    _totals = {}
    _lock = threading.Lock()
    _local = threading.local()
    _first = {}

    def _add(part, seconds):
        with _lock:
            _totals[part] = _totals.get(part, 0.0) + seconds

    def _measured(function, part):
        def measured(*args, **kwargs):
            inner = getattr(_local, "inner", None)
            _local.inner = [0.0]
            start = time.thread_time()
            try:
                return function(*args, **kwargs)
            finally:
                spent = time.thread_time() - start
                _add(part, spent - _local.inner[0])
                _local.inner = inner
                if inner is not None:
                    inner[0] += spent

        measured.__wrapped__ = function
        return measured

    def _at_first_track(function):
        measured = _measured(function, "engine_io")

        def separate(*args, **kwargs):
            if not _first:
                own = resource.getrusage(resource.RUSAGE_SELF)
                children = resource.getrusage(resource.RUSAGE_CHILDREN)
                _first["start_up"] = own.ru_utime + own.ru_stime
                _first["decode"] = children.ru_utime + children.ru_stime
            return measured(*args, **kwargs)

        return separate

    class _Encoder:
        """lameenc's Encoder (a C type: it cannot be subclassed), its encoding measured."""

        real = None  # the C type, once lameenc is imported

        def __init__(self):
            self._real = _Encoder.real()

        def __getattr__(self, name):
            return getattr(self._real, name)

        def encode(self, pcm):
            return self._real.encode(pcm)

        def flush(self):
            return self._real.flush()

    def _patch(module):
        for name, part in PARTS[module.__name__].items():
            owner_name, _, attribute = name.rpartition(".")
            owner = getattr(module, owner_name, None) if owner_name else module
            if owner is None or not hasattr(owner, attribute):
                continue
            function = getattr(owner, attribute)
            if module.__name__ == "lameenc":
                _Encoder.real = function
                _Encoder.encode = _measured(_Encoder.encode, part)
                _Encoder.flush = _measured(_Encoder.flush, part)
                wrapped = _Encoder
            elif name == "Engine.separate":
                wrapped = _at_first_track(function)
            else:
                wrapped = _measured(function, part)
            setattr(owner, attribute, wrapped)

    class _Finder:
        """Patches the modules of PARTS as they are imported."""

        @staticmethod
        def find_spec(name, path=None, target=None):
            if name not in PARTS:
                return None
            spec = importlib.machinery.PathFinder.find_spec(name, path)
            if spec is None or spec.loader is None:
                return spec
            execute = spec.loader.exec_module

            def exec_module(module):
                execute(module)
                _patch(module)

            spec.loader.exec_module = exec_module
            return spec

    sys.meta_path.insert(0, _Finder)
    _exit = os._exit

    def _leave(code):
        try:
            with open(_PARTS_PATH, "w") as out:
                out.write(json.dumps({"parts": _totals, **_first}) + "\n")
        finally:
            _exit(code)

    os._exit = _leave
