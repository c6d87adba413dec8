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

from . import messages
from .errors import EXIT_CONFIG, Cancel, JobError
from .storage import LocalStorage, Storage

log = logging.getLogger(__name__)


def fail_config(message: str):
    """Invalid configuration or an unloadable model: one line naming the variable, exit 78."""
    sys.stderr.write(f"stem-job: configuration error: {message}\n")
    sys.exit(EXIT_CONFIG)


def make_storage(settings, restrict_inputs: bool = False) -> Storage:
    """The STORAGE_MODE backend; `restrict_inputs` confines local originals to INPUT_DIR."""
    if settings.storage_mode == "gcs":
        from .gcs_storage import GcsStorage
        return GcsStorage(settings.gcs_bucket, settings.allowed_buckets(), settings.max_input_bytes,
                          project=settings.gcp_project_id or None,
                          retry_deadline_s=settings.retry_deadline_s,
                          public=settings.gcs_public)
    return LocalStorage(settings.output_dir, settings.input_dir, settings.max_input_bytes,
                        restrict_inputs=restrict_inputs)


def results_publisher(settings, deadline_s: float | None = None):
    """A Publisher for PUBSUB_RESULTS_TOPIC in GCP_PROJECT_ID."""
    from google.cloud import pubsub_v1

    from .pubsub import Publisher, resource_path
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
            publisher.publish({**messages.request_ids(request), "status": "processing",
                               "progress": round(fraction, 3)},
                              {"jobId": request.job_id, "status": "processing"})
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
