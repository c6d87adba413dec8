"""Failures the job reports, and the exit codes platforms act on.

A `JobError` is a failure we understand: it carries a stable `code` for
dashboards, a message a person can act on, and whether a retry may help.
"""

import contextlib
import threading

EXIT_OK = 0
EXIT_USAGE = 2          # click's code for a bad invocation
EXIT_BAD_INPUT = 65     # reported, not worth a retry (sysexits EX_DATAERR)
EXIT_RETRY = 75         # reported, a retry may help (sysexits EX_TEMPFAIL)
EXIT_CONFIG = 78        # invalid configuration (sysexits EX_CONFIG)


class JobError(Exception):
    """A failure with a stable code, a human message and a retry hint."""

    def __init__(self, code: str, message: str, retryable: bool = False):
        super().__init__(message)
        self.code = code
        self.message = message
        self.retryable = retryable

    def as_dict(self) -> dict:
        return {"code": self.code, "message": self.message, "retryable": self.retryable}


class ConfigError(Exception):
    """Invalid configuration: one line naming the variable and what is accepted."""


class Interrupted(JobError):
    """SIGTERM arrived: stop, leave nothing that looks complete, let a retry redo it."""

    def __init__(self, message: str = "interrupted by SIGTERM"):
        super().__init__("interrupted", message, retryable=True)


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
    return EXIT_RETRY if error.retryable else EXIT_BAD_INPUT
