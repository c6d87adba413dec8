"""The decoding child: FFmpeg meets the original in a process of its own, bounded and fenced.

Why a child, and why like this:
- FFmpeg's calls and the per-block numpy work hold the GIL, so in a thread they would take
  turns with the model's load and a drain's separation; in a child they run beside them.
- A hostile original is bounded: the child runs under a memory limit (RLIMIT_DATA: the heap and
  every private writable mapping, not the shared libraries, so the limit is about what the
  decode allocates) and a wall-clock budget the parent enforces. Until the file has declared
  its length the budget is the probe's own (DECODE_TIME_BASE_S and the file read at a slow
  disk's pace); then it grows by DECODE_TIME_FACTOR per second of audio: the declared length
  when FFmpeg read it from the file, MAX_DURATION_S when the file declares none or FFmpeg only
  estimates it from the bitrate (an estimate may be far too short, and must not fail a real
  file). Exceeding either fails the track with its own code and is final: the same bytes
  exhaust the same limit on every worker.
- A kill from outside (the kernel's OOM killer, when the container's memory is smaller than
  the limit) may be a neighbour's fault, so it is retried, but only while the platform's
  delivery count is low; after that it is final too, instead of visiting every worker.
- Should a crafted file take the child over, it is isolated from: the parent's environment
  and memory (a bare environment of a few harmless variables; the parent is not dumpable),
  the network (no sockets of any family: not the metadata server's tokens, not the
  emulators), every file but the one it writes (nothing can be opened for writing, renamed,
  removed or re-permissioned: not the model's pickles, not other tracks' stems or scratch
  files), other processes (no exec, no fork, no signals but to itself, no ptrace) and
  capabilities (job.audio.confine has the list and how; the parent logs once what held).
  It is not isolated from: reading what the uid may read (the model, other tracks' scratch
  files, a mounted key file: use Workload Identity, not key files), the CPU and memory inside
  its limits, and its stderr, which goes to the log unfiltered. Its one answer is JSON, never
  a pickle, and the parent believes little of it: a code that is not a verdict on the input
  (a retry, a setting) becomes corrupt_audio, texts are cut short, and the decoded length
  must match the file it wrote.
"""

import dataclasses
import json
import logging
import os
import resource
import signal
import subprocess
import sys
import time
from multiprocessing.connection import Connection
from pathlib import Path

from job.audio import confine
from job.audio import decode as audio
from job.errors import CODES, EXIT_BAD_INPUT, Interrupted, JobError
from job.pcm import CHANNELS

log = logging.getLogger(__name__)

# what the child may see of the parent's environment: nothing that grants access to anything
PASSED_ENV = (
    "PATH",
    "LANG",
    "LC_ALL",
    "LC_CTYPE",
    "TZ",
    "TMPDIR",
    "PYTHONPATH",
    "PYTHONHOME",
    "PYTHONDONTWRITEBYTECODE",
)
CHILD_ENV = {"OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"}  # no idle BLAS thread pools
READ_BYTES_PER_S = 20e6  # the slowest read the budget allows for: a network volume
MAX_ANSWER = 1 << 20  # a child's answer is a few hundred bytes; more is not read
MAX_TEXT = 300  # characters of a message or warning taken from the child
MAX_WARNINGS = 20
POLL_S = 0.05
PACKAGE_ROOT = str(Path(__file__).resolve().parents[2])


@dataclasses.dataclass(frozen=True)
class Limits:
    """What the child may use: settings DECODE_MEMORY_MB, DECODE_TIME_BASE_S,
    DECODE_TIME_FACTOR and DECODE_KILL_RETRIES (docs/configuration.md)."""

    memory_mb: int = 1024
    time_base_s: float = 30.0  # start-up, probing, and room for a loaded host
    time_factor: float = 0.25  # decoding seconds allowed per second of audio
    kill_retries: int = 2  # attempts after which a kill is final

    @classmethod
    def of(cls, settings) -> "Limits":
        return cls(
            settings.decode_memory_mb,
            settings.decode_time_base_s,
            settings.decode_time_factor,
            settings.decode_kill_retries,
        )

    def probe_s(self, size: int) -> float:
        """The budget until the file declares its length: start-up, probing, and the file read
        at a slow disk's pace."""
        return self.time_base_s + size / READ_BYTES_PER_S

    def budget_s(self, size: int, declared_s: float | None, max_duration_s: float) -> float:
        """The wall-clock budget for a decode: the probe's, plus the audio decoded at
        `time_factor`; the audio is what the file declares, capped by MAX_DURATION_S (all a
        decode may produce), or MAX_DURATION_S when it declares nothing exactly."""
        seconds = min(declared_s, max_duration_s) if declared_s else max_duration_s
        return self.probe_s(size) + self.time_factor * seconds


def kill_is_final(attempt: int | None, limits: Limits) -> bool:
    """`attempt`: the tries of this track before this one (0 on a first delivery: Pub/Sub's
    delivery_attempt - 1, Cloud Run's CLOUD_RUN_TASK_ATTEMPT), None where the platform does
    not count (then its own retry budget bounds the retries)."""
    return attempt is not None and attempt >= limits.kill_retries


def child_env(environ=None) -> dict:
    """The few harmless variables, and the folder this `job` package is imported from: the
    child (run with -P, so neither its cwd nor a scratch file can shadow a module) imports
    the same code as the parent, installed or not."""
    environ = os.environ if environ is None else environ
    kept = {name: environ[name] for name in PASSED_ENV if name in environ}
    kept["PYTHONPATH"] = os.pathsep.join(filter(None, [PACKAGE_ROOT, kept.get("PYTHONPATH")]))
    return kept | CHILD_ENV


def decode_aside(
    path: Path,
    target: Path,
    max_duration_s: float,
    cancel=None,
    limits: Limits = Limits(),
    attempt: int | None = None,
) -> audio.DecodedAudio:
    """`audio.decode_to_file` in a bounded child; its warnings are logged here, its JobError
    raised here, and SIGTERM (`cancel`) stops it at once."""
    confine.protect_parent()  # before the child exists: it never sees a dumpable parent
    path, target = Path(path).absolute(), Path(target).absolute()
    read, write = os.pipe()
    try:
        child = subprocess.Popen(
            [
                sys.executable,
                "-P",
                "-m",
                __name__,
                str(write),
                str(path),
                str(target),
                repr(float(max_duration_s)),
                str(limits.memory_mb),
            ],
            env=child_env(),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            close_fds=True,
            pass_fds=(write,),
            cwd=target.parent,
        )
    finally:
        os.close(write)
    answer = Connection(read, writable=False)
    try:
        message = _answer(
            child, answer, path.stat().st_size, max_duration_s, cancel, limits, attempt
        )
    finally:
        answer.close()
        if child.poll() is None:
            child.kill()
        child.wait()
    return _believed(message, target, limits)


def _believed(message: dict, target: Path, limits: Limits) -> audio.DecodedAudio:
    """What the child's answer may decide: a verdict on the input, or a decode whose length
    is the file it wrote. Anything else is FFmpeg gone astray on the original."""
    _log_isolation(message.get("isolation"))
    warnings = message.get("warnings")
    for warning in warnings[:MAX_WARNINGS] if isinstance(warnings, list) else []:
        audio.log.warning("%s", _text(warning))  # under the decoder's own name, as in-process
    astray = JobError(
        "corrupt_audio",
        "the decoder gave an answer it never gives: FFmpeg went astray on the original",
    )
    if "error" in message:
        code, text = (list(message["error"]) + [None, None])[:2]
        if code not in CODES or CODES[code].exit != EXIT_BAD_INPUT:
            raise astray
        text = _text(text)
        if code == audio.MEMORY_EXCEEDED:
            text = f"{text} ({limits.memory_mb} MB, DECODE_MEMORY_MB)"
        raise JobError(code, text)
    if "crash" in message:
        raise RuntimeError(f"decoding failed: {_text(message['crash'])}")
    try:
        decoded = audio.DecodedAudio(**{**message["decoded"], "path": target})  # ours, not its word
        written = target.stat().st_size
    except (KeyError, TypeError, OSError):
        raise astray from None
    if not isinstance(decoded.length, int) or written != decoded.length * CHANNELS * 4:
        raise astray
    return decoded


def _text(value) -> str:
    """A text from the child, as a log line or a result may carry it: short and printable."""
    text = "".join(c if c.isprintable() else " " for c in str(value))
    return text[:MAX_TEXT]


_isolation_logged = False


def _log_isolation(found) -> None:
    """Once per process: what the child's fences turned out to be (job.audio.confine)."""
    global _isolation_logged
    if _isolation_logged or not isinstance(found, dict):
        return
    _isolation_logged = True
    held, line = confine.describe({str(k): _text(v) for k, v in found.items()})
    if held:
        log.info("decoding child fenced: %s", line)
    else:
        log.warning(
            "decoding child only partly fenced (the job runs on; see job/audio/confine.py): %s",
            line,
        )


def _answer(child, answer, size, max_duration_s, cancel, limits, attempt) -> dict:
    """The child's one answer, read while the budget, SIGTERM and the child's life are watched;
    the probe's budget holds until the child says what length the file declares."""
    started = time.monotonic()
    budget = limits.probe_s(size)
    closed = False  # the child closed its end: only its exit is left to see
    while True:
        if cancel is not None and cancel.is_set():
            raise Interrupted()
        if time.monotonic() - started > budget:
            raise JobError(
                "decode_timeout",
                f"decoding the original took longer than its "
                f"budget of {budget:.0f} s (DECODE_TIME_BASE_S, "
                "DECODE_TIME_FACTOR): the file is damaged or "
                "built to stall a decoder",
            )
        if closed or not answer.poll(POLL_S):
            if child.poll() is not None and (closed or not answer.poll(0)):
                raise _died(child.returncode, attempt, limits)
            if closed:
                time.sleep(POLL_S)
            continue
        try:
            message = json.loads(answer.recv_bytes(MAX_ANSWER))
        except EOFError:
            closed = True
            continue
        except (OSError, ValueError):
            raise JobError(
                "corrupt_audio",
                "the decoder gave an answer it never gives: FFmpeg went astray on the original",
            ) from None
        if "declared" not in message:
            return message
        declared = message["declared"]
        exact = isinstance(declared, (int, float)) and 0 < declared < float("inf")
        budget = limits.budget_s(size, declared if exact else None, max_duration_s)


def _died(code, attempt, limits) -> JobError:
    """The child ended without an answer: killed from outside, or crashed on the file."""
    if code is not None and code < 0 and -code == signal.SIGKILL:
        final = kill_is_final(attempt, limits)
        return JobError(
            "decode_killed",
            "the decoder was killed (out of memory?)"
            + (f" on try {attempt + 1}: not retried again (DECODE_KILL_RETRIES)" if final else ""),
            retryable=not final,
        )
    name = signal.Signals(-code).name if code is not None and code < 0 else f"exit {code}"
    return JobError(
        "corrupt_audio",
        f"FFmpeg crashed decoding the original ({name}): the file "
        "is damaged or not audio it can handle",
    )


class _Collect(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def main(argv) -> None:
    """The child: limit and fence itself, decode, answer once in JSON on the pipe it was given."""
    fd, path, target, max_duration_s, memory_mb = argv
    confine.preload()
    answer = Connection(int(fd), readable=False)
    limit = int(memory_mb) << 20
    resource.setrlimit(resource.RLIMIT_DATA, (limit, limit))
    out = open(target, "wb")  # the one file it writes, opened before writing is fenced off
    isolation = {**confine.confine(), **confine.probe(os.getppid())}
    collected = _Collect()
    audio.log.addHandler(collected)
    audio.log.propagate = False
    try:
        decoded = audio.decode_to_file(
            Path(path),
            Path(target),
            float(max_duration_s),
            on_declared=lambda seconds: answer.send_bytes(
                json.dumps({"declared": seconds}).encode()
            ),
            out=out,
        )
        outcome = {"decoded": {**dataclasses.asdict(decoded), "path": target}}
    except JobError as error:
        outcome = {"error": [error.code, error.message]}
    except Exception as exc:
        outcome = {"crash": f"{type(exc).__name__}: {exc}"[:500]}
    finally:
        out.close()
    message = {**outcome, "warnings": collected.messages, "isolation": isolation}
    answer.send_bytes(json.dumps(message).encode())
    answer.close()


if __name__ == "__main__":
    main(sys.argv[1:])
