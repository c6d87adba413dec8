"""Bounded retries of transient cloud faults: exponential backoff with full jitter, stopped
after a time limit (not a count), so a job's worst case stays predictable.

`is_transient` is the one answer, for every Google API the package calls (GCS, Pub/Sub, the
Cloud Run Admin API), to "may a retry help?": the service was busy, throttled or unreachable,
or the bytes arrived damaged. Anything else (not found, denied, invalid) fails at once.
"""

import json

import requests
import tenacity
import urllib3
from google.api_core import exceptions
from google.auth.exceptions import TransportError
from google.cloud.storage.exceptions import DataCorruption

# HTTP answers that mean "not now": timeout, rate limit, server fault, gateway trouble.
TRANSIENT_STATUS = frozenset({408, 429, 500, 502, 503, 504})
# gRPC status classes of the same kind (Unknown has no HTTP code; Aborted shares 409 with
# Conflict, which is a real refusal, so classes decide here, not codes).
TRANSIENT_API_ERRORS = (
    exceptions.Aborted,
    exceptions.DeadlineExceeded,
    exceptions.ResourceExhausted,
    exceptions.ServiceUnavailable,
    exceptions.InternalServerError,
    exceptions.Unknown,
)
# The request may never have reached the service, or its answer was cut or corrupted.
TRANSIENT_TRANSPORT_ERRORS = (
    requests.ConnectionError,
    requests.Timeout,
    requests.exceptions.ChunkedEncodingError,
    urllib3.exceptions.ProtocolError,
    urllib3.exceptions.TimeoutError,
    TransportError,
    ConnectionError,
    TimeoutError,
    DataCorruption,
    # a reply cut or damaged inside a body that parsed as far as its headers: the client fails
    # to decode it (the call may have been committed; a retry meets its own write as a 412)
    json.JSONDecodeError,
)


def is_transient(exc: BaseException) -> bool:
    """True when a retry of the same call may succeed."""
    if isinstance(exc, TRANSIENT_API_ERRORS):
        return True
    if isinstance(exc, exceptions.GoogleAPICallError):
        return exc.code in TRANSIENT_STATUS
    return isinstance(exc, TRANSIENT_TRANSPORT_ERRORS)


def bounded(
    deadline_s: float,
    transient=is_transient,
    max_attempts: int | None = None,
    again=None,
    wait=None,
) -> tenacity.Retrying:
    """Retry while `transient(exception)`, for at most about `deadline_s` seconds (and at most
    `max_attempts` tries when given: a caller with a quota to respect), then re-raise the
    last exception.

    `again(result)` true also retries a call that returned (a poll that found nothing); when
    the time is up the last result is returned, or the last exception raised. `wait` replaces
    the jittered exponential backoff (a tenacity wait)."""
    stop = tenacity.stop_after_delay(deadline_s)
    if max_attempts is not None:
        stop = stop | tenacity.stop_after_attempt(max_attempts)
    retry = tenacity.retry_if_exception(transient)
    if again is not None:
        retry = retry | tenacity.retry_if_result(again)
    return tenacity.Retrying(
        retry=retry,
        wait=wait
        or tenacity.wait_random_exponential(
            multiplier=0.25, max=max(0.5, min(10.0, deadline_s / 4))
        ),
        stop=stop,
        reraise=True,
        retry_error_callback=(lambda state: state.outcome.result()) if again else None,
    )
