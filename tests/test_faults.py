"""Which side a Cloud Storage fault is on decides its meaning: the original's 403/404 are bad
input, the stems bucket's are configuration. GCS answers are served by a loopback endpoint that
replies as GCS does (403 with its JSON error body, 404 for a missing bucket), since the storage
emulator enforces no IAM; the real google-cloud-storage client and GcsStorage talk to it."""

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from google.auth.credentials import AnonymousCredentials
from google.cloud import storage

from job import runtime
from job.config import load_settings
from job.errors import EXIT_BAD_INPUT, EXIT_CONFIG, JobError, exit_code_for
from job.gcs_storage import GcsStorage


class RefusingGcs:
    """Answers every request with `status` and GCS's error body, and records the paths."""

    def __init__(self, status: int, reason: str):
        self.paths = []
        stand_in = self

        class Handler(BaseHTTPRequestHandler):
            def _answer(self):
                self.rfile.read(int(self.headers.get("content-length", 0)))
                stand_in.paths.append((self.command, self.path))
                body = json.dumps({"error": {"code": status, "message": reason,
                                             "errors": [{"message": reason}]}}).encode()
                self.send_response(status)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            do_GET = do_POST = do_PUT = do_DELETE = _answer

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.client = storage.Client(project="p", credentials=AnonymousCredentials(),
                                     client_options={"api_endpoint":
                                                     f"http://127.0.0.1:{self.server.server_port}"})

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def denied():
    gcs = RefusingGcs(403, "stem-job@p.iam.gserviceaccount.com does not have "
                           "storage.objects.create access")
    yield gcs
    gcs.close()


def storage_for(gcs) -> GcsStorage:
    return GcsStorage("stems-b", ("in-b",), client=gcs.client, retry_deadline_s=2)


def test_a_forbidden_original_is_bad_input(denied):
    with pytest.raises(JobError) as caught:
        storage_for(denied).describe_original("gs://in-b/song.mp3")
    assert caught.value.code == "input_forbidden" and not caught.value.retryable
    assert exit_code_for(caught.value) == EXIT_BAD_INPUT


def test_a_forbidden_stems_bucket_is_configuration(denied, tmp_path):
    stem = tmp_path / "vocals.mp3"
    stem.write_bytes(b"\xff\xfb" * 100)
    with pytest.raises(JobError) as caught:
        storage_for(denied).write_stems("rel_1", "trk_1", {"vocals": stem})
    error = caught.value
    assert error.code == "permission_denied" and error.retryable and error.is_config
    assert exit_code_for(error) == EXIT_CONFIG
    assert "GCS_BUCKET=stems-b" in error.message and "\n" not in error.message
    assert any(method == "POST" and "/b/stems-b/o" in path for method, path in denied.paths)


def test_the_start_check_skips_a_bucket_it_may_not_read_and_refuses_a_missing_one():
    settings = load_settings({"STORAGE_MODE": "gcs", "GCS_BUCKET": "stems-b"})
    forbidden = RefusingGcs(403, "no storage.buckets.get")
    try:
        runtime.preflight(settings, storage_for(forbidden))      # may write, may not read: fine
        [(method, path)] = forbidden.paths                        # one metadata call
        assert method == "GET" and path.startswith("/storage/v1/b/stems-b?")
    finally:
        forbidden.close()
    missing = RefusingGcs(404, "The specified bucket does not exist.")
    try:
        with pytest.raises(JobError) as caught:
            runtime.preflight(settings, storage_for(missing))
        assert caught.value.code == "storage_not_found" and caught.value.is_config
        assert "GCS_BUCKET=stems-b" in caught.value.message
    finally:
        missing.close()
