"""The sweep: one terminal result for every message whose execution ended without one.

Once an execution starts, the dispatcher has acked the push and the job owns the message. The
job reports its own failures, on its last attempt too (cli.finish_run), but a task SIGKILLed on
its last attempt (out of memory, host loss) or one that could not publish cannot. Cloud Scheduler
calls POST /sweep every few minutes (cloudrun/setup.sh). For each started marker (dedupe.py) the
sweep asks the Cloud Run Admin API whether its execution has ended and how its task's last attempt
exited, and where nothing was reported it publishes the result: `completed` when the track's set
is complete (the task died after the manifest), else `failed` with `execution_lost` (retryable:
a re-send may succeed). Exits 65, 75 and 78 and a succeeded task mean the job published itself.

Chosen over an Eventarc trigger on the execution's end: it needs no audit-log trigger, works for
both the push and the Eventarc intake, and a sweep that is missed or fails is simply redone by the
next one (the markers are the state).
"""

import json
import logging
import time
from dataclasses import dataclass

from job import manifest
from job.errors import EXIT_BAD_INPUT, EXIT_CONFIG, EXIT_RETRY, JobError
from job.messages import completed_result, failed_result, parse_message, request_ids

log = logging.getLogger("stem_job.dispatcher")

# The job's exits on a last attempt that published its result (cli.finish_run).
REPORTED = frozenset({EXIT_BAD_INPUT, EXIT_RETRY, EXIT_CONFIG})
OPEN = ("started", "sweeping")
STUCK_S = 600.0  # a `sweeping` marker this old was left by a sweep that died mid-way


@dataclass
class SweepClients:
    """The Cloud Run Admin API (executions, tasks) and Cloud Storage (the stems' manifests);
    each made on first use unless given (tests)."""

    executions: object = None
    tasks: object = None
    storage: object = None

    def fill(self) -> "SweepClients":
        """Made when the first open marker needs them: a sweep with nothing open calls no API."""
        if self.executions is None or self.tasks is None:
            from google.cloud import run_v2

            self.executions = self.executions or run_v2.ExecutionsClient()
            self.tasks = self.tasks or run_v2.TasksClient()
        return self


def ended_unreported(clients: SweepClients, name: str) -> bool | None:
    """None while the execution runs; else whether it ended without the job reporting."""
    execution = clients.executions.get_execution(name=name, timeout=20.0)
    if not execution.completion_time:
        return None
    if execution.succeeded_count >= max(1, execution.task_count):
        return False
    for task in clients.tasks.list_tasks(parent=name, timeout=20.0):
        result = task.last_attempt_result
        if result is None or result.term_signal or result.exit_code not in REPORTED:
            return True
    return False


class Sweeper:
    """One sweep over the markers of `dispatcher` (a service.Dispatcher): per marker, the
    execution's state, then the result it still owes. Short methods over one sweep's clients
    and counts."""

    def __init__(self, dispatcher, clients: SweepClients):
        self.dispatcher = dispatcher
        self.clients = clients
        self.markers = dispatcher.claims.markers

    def sweep(self) -> dict:
        counts = {"open": 0, "running": 0, "reported": 0, "published": 0, "errors": 0}
        for key, doc, generation in self.markers.list(OPEN):
            if doc.get("state") == "sweeping" and time.time() - doc.get("sweptAt", 0) < STUCK_S:
                continue
            counts["open"] += 1
            try:
                outcome = self._one(key, doc, generation)
            except Exception as exc:  # the next sweep tries again
                log.warning("sweep of message %s failed: %s", key, exc)
                outcome = "errors"
            counts[outcome] += 1
        log.info("sweep: %s", counts)
        return counts

    def _one(self, key, doc, generation) -> str:
        unreported = ended_unreported(self.clients.fill(), doc["execution"])
        if unreported is None:
            return "running"
        if not unreported:
            self.markers.replace(key, {**doc, "state": "ended"}, generation)
            return "reported"
        # ours to report: hold the marker first, so two sweeps never both publish
        held = self.markers.replace(
            key, {**doc, "state": "sweeping", "sweptAt": time.time()}, generation
        )
        if held is None:
            return "running"
        try:
            result = self.result_for(doc)
            self.dispatcher.results.publish_result(result)
        except BaseException:
            self.markers.replace(key, doc, held)  # open again for the next sweep
            raise
        self.markers.replace(
            key,
            {**doc, "state": "ended", "sweptAt": time.time(), "outcome": result["status"]},
            held,
        )
        log.warning(
            "execution %s ended without a result: published %s for job %s",
            doc["execution"],
            result["status"],
            doc.get("jobId"),
        )
        return "published"

    def result_for(self, doc: dict) -> dict:
        """`completed` from the manifest when the set is complete, else `execution_lost`."""
        message = doc.get("message")
        request = parse_message(json.dumps(message)) if isinstance(message, dict) else None
        lost = JobError(
            "execution_lost",
            f"the Cloud Run execution {doc['execution']} ended "
            "without reporting a result (its task was killed: out of memory, host "
            "loss?); send the message again to retry",
        )
        if request is None:
            return failed_result({"jobId": doc.get("jobId")}, lost)
        found = self._manifest(request)
        if found is not None and found.get("stems"):
            return completed_result(
                request,
                manifest.urls(found),
                outputs=manifest.summary(found),
                durationS=found.get("durationS"),
                reused=True,
            )
        return failed_result(request_ids(request), lost)

    def _manifest(self, request):
        bucket = self.dispatcher.settings.stems_bucket
        if not bucket:
            return None
        from job.storage.gcs import GcsStorage

        storage = GcsStorage(
            bucket,
            client=self.clients.storage,
            retry_deadline_s=self.dispatcher.settings.api_deadline_s,
        )
        return storage.read_manifest(request.release_id, request.track_id)
