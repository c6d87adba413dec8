"""Which side a Cloud Storage fault is on decides its meaning: the original's 403/404 are bad
input, the stems bucket's are configuration. GCS answers are served by a loopback endpoint that
replies as GCS does (403 with its JSON error body, 404 for a missing bucket), since the storage
emulator enforces no IAM; the real google-cloud-storage client and GcsStorage talk to it."""

import sys
from pathlib import Path

import pytest
from google.auth.credentials import AnonymousCredentials
from google.cloud import storage

from job import runtime
from job.config import load_settings
from job.errors import EXIT_BAD_INPUT, EXIT_CONFIG, JobError, exit_code_for
from job.storage.gcs import GcsStorage

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "hack"))
from cloudrun_stand_in import JsonServer  # noqa: E402


class RefusingGcs:
    """Answers every request with `status` and GCS's error body, and records the paths."""

    def __init__(self, status: int, reason: str):
        self.paths = []
        error = {"error": {"code": status, "message": reason, "errors": [{"message": reason}]}}

        def answer(method, url, body):
            self.paths.append((method, url.path + (f"?{url.query}" if url.query else "")))
            return status, error

        self.http = JsonServer(answer)
        self.client = storage.Client(
            project="p",
            credentials=AnonymousCredentials(),
            client_options={"api_endpoint": self.http.url},
        )

    def close(self):
        self.http.close()


@pytest.fixture
def denied():
    gcs = RefusingGcs(
        403, "stem-job@p.iam.gserviceaccount.com does not have storage.objects.create access"
    )
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
        storage_for(denied).upload("stems/rel_1/trk_1/vocals.mp3", stem, if_generation_match=0)
    error = caught.value
    assert error.code == "permission_denied" and error.retryable and error.is_config
    assert exit_code_for(error) == EXIT_CONFIG
    assert "GCS_BUCKET=stems-b" in error.message and "\n" not in error.message
    assert any(method == "POST" and "/b/stems-b/o" in path for method, path in denied.paths)


def test_the_start_check_skips_a_bucket_it_may_not_read_and_refuses_a_missing_one():
    settings = load_settings({"STORAGE_MODE": "gcs", "GCS_BUCKET": "stems-b"})
    forbidden = RefusingGcs(403, "no storage.buckets.get")
    try:
        runtime.preflight(settings, storage_for(forbidden))  # may write, may not read: fine
        [(method, path)] = forbidden.paths  # one metadata call
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
