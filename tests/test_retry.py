"""job.retry: the one transient-error classifier (GCS, Pub/Sub, Cloud Run API) and the bounded
retry policy, on the exceptions the real client libraries raise."""

import json

import pytest
import requests
import urllib3
from google.api_core import exceptions
from google.auth.exceptions import TransportError
from google.cloud.storage.exceptions import DataCorruption

from job.retry import bounded, is_transient


@pytest.mark.parametrize(
    "exc",
    [
        *(exceptions.from_http_status(code, "busy") for code in (408, 429, 500, 502, 503, 504)),
        exceptions.Aborted("gRPC ABORTED"),
        exceptions.Unknown("gRPC UNKNOWN"),
        exceptions.DeadlineExceeded("gRPC DEADLINE_EXCEEDED"),
        exceptions.ResourceExhausted("quota"),
        requests.ConnectionError("reset"),
        requests.Timeout("read timeout"),
        requests.exceptions.ChunkedEncodingError("cut"),
        urllib3.exceptions.ProtocolError("cut"),
        TransportError("token endpoint unreachable"),
        ConnectionResetError(),
        TimeoutError(),
        DataCorruption(None, "crc32c mismatch"),
        # a reply body cut or damaged: the client fails to parse it (issue 30, case 9)
        json.JSONDecodeError("Unterminated string", '{"kind": "storage#obj', 20),
        requests.exceptions.JSONDecodeError("Expecting value", "{", 1),
    ],
    ids=repr,
)
def test_transient_faults(exc):
    assert is_transient(exc)


@pytest.mark.parametrize(
    "exc",
    [
        *(exceptions.from_http_status(code, "no") for code in (400, 401, 403, 404, 409, 412)),
        exceptions.InvalidArgument("bad"),
        exceptions.PermissionDenied("denied"),
        ValueError("a bug"),
        KeyError("a bug"),
    ],
    ids=repr,
)
def test_faults_a_retry_cannot_fix(exc):
    assert not is_transient(exc)


def test_bounded_retries_transient_faults_up_to_max_attempts():
    calls = []

    def busy_then_ok():
        calls.append(1)
        if len(calls) < 3:
            raise exceptions.ServiceUnavailable("busy")
        return "done"

    assert bounded(30)(busy_then_ok) == "done" and len(calls) == 3
    calls.clear()
    with pytest.raises(exceptions.ServiceUnavailable):
        bounded(30, max_attempts=2)(busy_then_ok)
    assert len(calls) == 2


def test_bounded_gives_up_at_once_on_a_fault_a_retry_cannot_fix():
    calls = []

    def missing():
        calls.append(1)
        raise exceptions.NotFound("no such job")

    with pytest.raises(exceptions.NotFound):
        bounded(30)(missing)
    assert len(calls) == 1
