"""What every entry point (run, drain, serve, dispatch) shares: the storage backend, the results
topic, SIGTERM, and leaving the process with a documented exit code.

The Google clients are imported inside the functions that need them: `import google.cloud.*`
costs a few hundred milliseconds, and local-mode runs, `--help` and an empty-queue drain must not
pay for a backend or a topic they do not use.
"""

import logging
import os
import signal
import sys
from dataclasses import dataclass

from job import messages
from job.errors import EXIT_CONFIG, Cancel, JobError
from job.storage.base import Storage
from job.storage.local import LocalStorage

log = logging.getLogger(__name__)


def fail_config(message: str):
    """Invalid configuration or an unloadable model: one line naming the variable, exit 78."""
    one_line = " ".join(str(message).split())  # a cloud error's text may hold newlines
    sys.stderr.write(f"stem-job: configuration error: {one_line}\n")
    sys.exit(EXIT_CONFIG)


@dataclass(frozen=True)
class Attempt:
    """Which try of its message this process is, where the platform says so.

    Cloud Run sets CLOUD_RUN_TASK_ATTEMPT (0-based) in every task and retries any non-zero exit
    up to the job's maxRetries (MAX_RETRIES in the job's env). On the last attempt no retry
    follows, so a retryable failure is reported there as the message's final result.
    `earlier` counts the tries before this one (0 on the first), as Job.attempt and the
    decoder's kill check do; None when unknown.
    """

    earlier: int | None = None
    last: bool = False
    cloud_run: bool = False

    @classmethod
    def from_env(cls, settings, environ=None) -> "Attempt":
        """`settings` None (they did not load): on Cloud Run, taken as the last attempt, so
        that the exit code says no result was published."""
        raw = (os.environ if environ is None else environ).get("CLOUD_RUN_TASK_ATTEMPT", "")
        if not raw.strip().isdigit():
            return cls()
        attempt = int(raw)
        return cls(attempt, settings is None or attempt >= settings.max_retries, True)


def preflight(settings, storage, publisher=None) -> None:
    """What is cheap to check before any message is taken: the stems bucket and the results
    topic exist (one metadata call each). An identity not allowed to read that metadata skips
    the check; the first write or publish then says what is wrong."""
    if settings.storage_mode == "gcs":
        _check_bucket(storage.bucket)
    if publisher is not None:
        publisher.check()


def _check_bucket(bucket) -> None:
    from job.faults import DENIED, storage_fault

    try:
        bucket.reload(timeout=10.0, retry=None)
    except DENIED:
        return
    except Exception as exc:
        fault = storage_fault(
            exc, f"reading gs://{bucket.name}", original=False, bucket=bucket.name, deadline_s=0
        )
        if fault is not None and fault.is_config:
            raise fault from exc
        log.info("stems bucket not checked: %s", exc)  # a fault of the moment


def make_storage(settings, restrict_inputs: bool = False) -> Storage:
    """The STORAGE_MODE backend; `restrict_inputs` confines local originals to INPUT_DIR."""
    if settings.storage_mode == "gcs":
        from job.storage.gcs import GcsStorage

        return GcsStorage(
            settings.gcs_bucket,
            settings.allowed_buckets(),
            settings.max_input_bytes,
            project=settings.gcp_project_id or None,
            retry_deadline_s=settings.retry_deadline_s,
            public=settings.gcs_public,
        )
    return LocalStorage(
        settings.output_dir,
        settings.input_dir,
        settings.max_input_bytes,
        restrict_inputs=restrict_inputs,
    )


def results_publisher(settings, deadline_s: float | None = None):
    """A Publisher for PUBSUB_RESULTS_TOPIC in GCP_PROJECT_ID."""
    from google.cloud import pubsub_v1

    from job.pubsub import Publisher, resource_path

    deadline_s = settings.retry_deadline_s if deadline_s is None else deadline_s
    topic = resource_path(settings.gcp_project_id, "topics", settings.pubsub_results_topic)
    return Publisher(pubsub_v1.PublisherClient(), topic, deadline_s=deadline_s)


def progress_reporter(settings, request):
    """Throttled `processing` events (PROGRESS_EVENTS); a lost one is only logged."""
    if not (settings.progress_events and settings.gcp_project_id):
        return None
    publisher = results_publisher(settings, deadline_s=5.0)

    def report(fraction):
        try:
            publisher.publish(
                {
                    **messages.request_ids(request),
                    "status": "processing",
                    "progress": round(fraction, 3),
                },
                {"jobId": request.job_id, "status": "processing"},
            )
        except JobError as error:
            log.warning("progress event not published: %s", error.message)

    return report


def on_sigterm(cancel: Cancel) -> None:
    """SIGTERM (spot preemption, Cloud Run stop) trips `cancel`: the forward pass under way is
    aborted, the track is reported retryable and its set is left without a manifest."""

    def handler(signum, frame):
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        cancel.trip()

    signal.signal(signal.SIGTERM, handler)


def exit_now(code: int):
    """Leave with `code` without running interpreter teardown.

    The model may still be loading in a background thread when a bad input fails within the
    first second; tearing the interpreter down under it aborts in C++ (exit 134, which the
    platforms retry). Everything the job owns is closed by then (files, uploads, published
    results), so only the streams need flushing.
    """
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)
