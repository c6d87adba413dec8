"""Failures the job reports, and the exit codes platforms act on.

A `JobError` is a failure we understand: it carries a stable `code` for dashboards, a message a
person can act on, and whether a retry may help. `CODES` is the one list of codes: what each
means for a retry, for the process's exit code and for an HTTP answer, so run, drain, serve and
the dispatcher read the same verdict (docs/errors.md's table is checked against it).
"""

import contextlib
import threading
from dataclasses import dataclass

EXIT_OK = 0
EXIT_USAGE = 2  # click's code for a bad invocation
EXIT_BAD_INPUT = 65  # reported, not worth a retry (sysexits EX_DATAERR)
EXIT_RETRY = 75  # reported, a retry may help (sysexits EX_TEMPFAIL)
EXIT_CONFIG = 78  # invalid configuration (sysexits EX_CONFIG)
EXIT_UNPUBLISHED = 69  # Cloud Run's last attempt could not publish its result (EX_UNAVAILABLE)


@dataclass(frozen=True)
class Code:
    """What one error code means. `retryable`: a redelivery of the same message may succeed
    (for configuration codes, once someone fixes the setting); `exit`: the process's exit code
    when this ends it; `http`: the status `serve` answers with."""

    retryable: bool
    exit: int
    http: int
    meaning: str


def _bad(http: int, meaning: str) -> Code:
    return Code(False, EXIT_BAD_INPUT, http, meaning)


def _retry(http: int, meaning: str) -> Code:
    return Code(True, EXIT_RETRY, http, meaning)


def _config(meaning: str) -> Code:
    return Code(True, EXIT_CONFIG, 500, meaning)


CODES = {
    # bad input: the sender named something that can never work
    "invalid_message": _bad(422, "the message is not a valid stem-separate message"),
    "invalid_id": _bad(422, "an identifier breaks ^[A-Za-z0-9_-]{1,128}$"),
    "invalid_uri": _bad(422, "originalStemUri is not a valid gs:// URI or path"),
    "invalid_outputs": _bad(422, "the message names an unknown output"),
    "input_not_allowed": _bad(500, "the original lies outside the allowed buckets or INPUT_DIR"),
    "input_not_found": _bad(500, "the original does not exist"),
    "input_forbidden": _bad(500, "the job may not read the original"),
    "input_error": _bad(500, "Cloud Storage refused the request for the original"),
    "output_not_allowed": _bad(500, "the IDs would place outputs outside OUTPUT_DIR"),
    "no_file": _bad(400, "the upload carries no file"),
    "empty_input": _bad(400, "the original is 0 bytes"),
    "bad_multipart": _bad(400, "the upload is not valid multipart/form-data"),
    "upload_incomplete": _bad(400, "the upload broke off"),
    "input_too_large": _bad(413, "the original is over MAX_INPUT_BYTES"),
    "unsupported_media_type": _bad(415, "mimeType names something that is not media"),
    "not_audio": _bad(422, "FFmpeg finds no audio in the original"),
    "corrupt_audio": _bad(422, "the original looks like audio but cannot be read"),
    "truncated_audio": _bad(422, "the original is cut off"),
    "empty_audio": _bad(422, "the original holds no samples"),
    "too_long": _bad(422, "the original is longer than MAX_DURATION_S"),
    "decode_memory_exceeded": _bad(422, "decoding the original needs more memory than allowed"),
    "decode_timeout": _bad(422, "decoding the original took longer than its budget"),
    # a retry may help: a fault of the moment, not of the input
    "interrupted": _retry(503, "SIGTERM (preemption, task timeout, shutdown)"),
    "internal_error": _retry(500, "an error the job did not foresee"),
    "execution_lost": _retry(503, "the Cloud Run execution ended without a result (killed)"),
    "decode_killed": _retry(503, "the decoding child process was killed (out of memory?)"),
    "device_out_of_memory": _retry(503, "the GPU ran out of memory at one window per pass"),
    "encode_failed": _retry(503, "encoding an output failed"),
    "input_changed": _retry(503, "the original changed while it was processed"),
    "concurrent_write": _retry(503, "another job kept overwriting the same track"),
    "busy": _retry(503, "serve: every slot is taken"),
    "storage_unavailable": _retry(503, "Cloud Storage kept failing for RETRY_DEADLINE_S"),
    "storage_error": _retry(503, "Cloud Storage refused a write of the outputs"),
    "output_unwritable": _retry(503, "a local output folder cannot be created"),
    "publish_failed": _retry(503, "the results topic kept failing for RETRY_DEADLINE_S"),
    "pubsub_unavailable": _retry(503, "Pub/Sub kept failing"),
    # configuration: no message can succeed until someone fixes a setting or a role
    "config": _config("a setting is invalid or the model cannot load"),
    "no_credentials": _config("no usable Google credentials"),
    "storage_not_found": _config("the stems bucket (GCS_BUCKET) does not exist"),
    "permission_denied": _config("the job may not write the stems or manifest in GCS_BUCKET"),
    "results_topic_not_found": _config("PUBSUB_RESULTS_TOPIC does not exist"),
    "results_topic_forbidden": _config("the job may not publish to PUBSUB_RESULTS_TOPIC"),
    "pubsub_error": _config("PUBSUB_SUBSCRIPTION is missing or may not be pulled"),
    # serve's answers to a request it refuses before any track exists (no process ends on them)
    "unauthorized": _bad(401, "serve: the request lacks Authorization: Bearer <HTTP_TOKEN>"),
    "auth_unavailable": _retry(503, "serve: the credentials could not be checked now"),
    "not_found": _bad(404, "serve: no such route"),
    "method_not_allowed": _bad(405, "serve: the route does not take this method"),
    "http_error": _bad(400, "serve: the HTTP layer refused the request (its status says why)"),
}


class JobError(Exception):
    """A failure with a stable code, a human message and a retry hint (by default the
    code's, from CODES). A code CODES does not hold is a programming error, raised as such:
    it would otherwise pass for a bad input that no retry, dashboard or README knows."""

    def __init__(self, code: str, message: str, retryable: bool | None = None):
        if code not in CODES:
            raise ValueError(f"unregistered error code {code!r}: add it to job/errors.py CODES")
        super().__init__(message)
        self.code = code
        self.message = message
        self.retryable = CODES[code].retryable if retryable is None else retryable

    def as_dict(self) -> dict:
        return {"code": self.code, "message": self.message, "retryable": self.retryable}

    @property
    def is_config(self) -> bool:
        """A setting or a role is wrong: stop, keep every message for when it is fixed."""
        return CODES[self.code].exit == EXIT_CONFIG


class ConfigError(Exception):
    """Invalid configuration: one line naming the variable and what is accepted."""


class Interrupted(JobError):
    """SIGTERM arrived: stop, leave nothing that looks complete, let a retry redo it."""

    def __init__(self, message: str = "interrupted by SIGTERM"):
        super().__init__("interrupted", message)


class Cancel(threading.Event):
    """Set by the SIGTERM handler. Inside `abortable()` (a forward pass, which cannot be
    checked mid-way and takes seconds on a CPU) setting it raises Interrupted at once, so the
    job stops well inside the platforms' grace period (Cloud Run 10 s, GKE spot ~15 s)."""

    def __init__(self):
        super().__init__()
        self._abortable = 0

    @contextlib.contextmanager
    def abortable(self):
        if self.is_set():
            raise Interrupted()
        self._abortable += 1
        try:
            yield
        finally:
            self._abortable -= 1

    def trip(self):
        """For the signal handler (main thread): set, and abort a running forward pass."""
        self.set()
        if self._abortable and threading.current_thread() is threading.main_thread():
            raise Interrupted()


def exit_code_for(error: JobError | None) -> int:
    if error is None:
        return EXIT_OK
    if error.is_config:
        return EXIT_CONFIG
    return EXIT_RETRY if error.retryable else EXIT_BAD_INPUT


def http_status_for(error: JobError) -> int:
    return CODES[error.code].http
