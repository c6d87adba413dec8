"""Bounded retries of transient cloud faults: exponential backoff with full jitter, stopped
after a time limit (not a count), so a job's worst case stays predictable."""

import tenacity


def bounded(deadline_s: float, is_transient) -> tenacity.Retrying:
    """Retry while `is_transient(exception)`, for at most about `deadline_s` seconds, then
    re-raise the last exception."""
    return tenacity.Retrying(
        retry=tenacity.retry_if_exception(is_transient),
        wait=tenacity.wait_random_exponential(multiplier=0.25,
                                              max=max(0.5, min(10.0, deadline_s / 4))),
        stop=tenacity.stop_after_delay(deadline_s),
        reraise=True)
