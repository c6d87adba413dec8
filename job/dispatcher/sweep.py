"""The sweep: one terminal result for every message whose execution ended without one.

Once an execution starts, the dispatcher has acked the push and the job owns the message. The
job reports its own failures, on its last attempt too (cli.finish_run), but a task SIGKILLed on
its last attempt (out of memory, host loss) or one that could not publish cannot. Cloud Scheduler
calls POST /sweep every few minutes (cloudrun/setup.sh). For each started marker (dedupe.py) the
sweep asks the Cloud Run Admin API whether its execution has ended and how its task's last attempt
exited, and where nothing was reported it publishes the result: `completed` when the track holds
the set this request asks for (manifest.matches, as the job itself checks: the original's
current generation, the outputs, model, format and bitrate of the execution's own env), else
`failed` with `execution_lost` (retryable: a re-send may succeed). A succeeded task and exit 65
mean the job published; exits 75 and 78 only on the attempt the job took for its last
(CLOUD_RUN_TASK_ATTEMPT >= the MAX_RETRIES the dispatcher passed it).

Each call is bounded: it reads one page of open entries (dedupe.OPEN) from where the previous
call stopped (a cursor object beside the markers) and stops early when its time budget is spent.
Before it publishes, the sweep records on the entry that it is about to (state `publishing`,
the result), so an entry whose sweep died is never published again: it is counted as `stuck`
for an operator rather than risk a second result.

Chosen over an Eventarc trigger on the execution's end: it needs no audit-log trigger, works for
both the push and the Eventarc intake, and a sweep that is missed or fails is simply redone by the
next one (the markers are the state).
"""

import json
import logging
import time
from dataclasses import dataclass

from job import manifest
from job.config import load_settings
from job.dispatcher.dedupe import OPEN
from job.errors import EXIT_BAD_INPUT, EXIT_CONFIG, EXIT_RETRY, ConfigError, JobError
from job.messages import completed_result, failed_result, outputs_of, parse_message, request_ids

log = logging.getLogger("stem_job.dispatcher")

PUBLISHED_ALWAYS = frozenset({EXIT_BAD_INPUT})  # not retryable: published on any attempt
PUBLISHED_LAST = frozenset({EXIT_RETRY, EXIT_CONFIG})  # published on the job's last attempt
CURSOR = "sweep/cursor"  # where a sweep leaves the key it reached (no messageId has a /)
STUCK_S = 600.0  # a `publishing` entry this old was left by a sweep that died mid-way
COUNTS = ("open", "running", "reported", "published", "stuck", "raced", "errors")


@dataclass
class SweepClients:
    """The Cloud Run Admin API (executions, tasks) and Cloud Storage (the stems' manifests);
    each made on first use unless given (tests)."""

    executions: object = None
    tasks: object = None
    storage: object = None
    stems: object = None  # a job.storage Storage over the stems bucket; else made from `storage`

    def fill(self) -> "SweepClients":
        """Made when the first open marker needs them: a sweep with nothing open calls no API."""
        if self.executions is None or self.tasks is None:
            from google.cloud import run_v2

            self.executions = self.executions or run_v2.ExecutionsClient()
            self.tasks = self.tasks or run_v2.TasksClient()
        return self


def template_env(execution) -> dict:
    """The env the execution's tasks run with (the job's env and the run's overrides)."""
    containers = execution.template.containers if execution.template else []
    return {item.name: item.value for c in containers for item in c.env if item.value}


def job_last_attempt(execution, believed) -> int:
    """The attempt the job took for its last: the MAX_RETRIES the dispatcher passed it, else
    the execution's own maxRetries (an entry from before the dispatcher passed it)."""
    if isinstance(believed, int):
        return believed
    return execution.template.max_retries if execution.template else 0


def ended_unreported(clients: SweepClients, name: str, believed=None):
    """(None, execution) while it runs; else (whether it ended without the job reporting,
    execution)."""
    execution = clients.executions.get_execution(name=name, timeout=20.0)
    if not execution.completion_time:
        return None, execution
    if execution.succeeded_count >= max(1, execution.task_count):
        return False, execution
    last = job_last_attempt(execution, believed)
    for task in clients.tasks.list_tasks(parent=name, timeout=20.0):
        result = task.last_attempt_result
        if result is None or result.term_signal:
            return True, execution
        if result.exit_code in PUBLISHED_ALWAYS:
            continue
        if result.exit_code not in PUBLISHED_LAST or task.retried < last:
            return True, execution
    return False, execution


class Sweeper:
    """One bounded sweep over the open entries of `dispatcher` (a service.Dispatcher): per
    entry, the execution's state, then the result it still owes; `sweep()` returns what it
    found and did, with the cursor the next call resumes from."""

    def __init__(self, dispatcher, clients: SweepClients, limit: int = 100, budget_s=30.0):
        self.dispatcher = dispatcher
        self.clients = clients
        self.claims = dispatcher.claims
        self.markers = dispatcher.claims.markers
        self.limit, self.budget_s = limit, budget_s

    def sweep(self) -> dict:
        counts = dict.fromkeys(COUNTS, 0)
        deadline = time.monotonic() + self.budget_s
        cursor = self.markers.read(CURSOR)
        after = str(cursor[0].get("after", "")) if cursor else ""
        entries = self.markers.list_open(after, self.limit)
        reached = after
        for key, doc, generation in entries:
            if time.monotonic() > deadline:
                break
            reached = key
            counts["open"] += 1
            try:
                outcome = self._one(key, doc, generation)
            except Exception as exc:  # the next sweep tries again
                log.warning("sweep of message %s failed: %s", key, exc)
                outcome = "errors"
            counts[outcome] += 1
        if reached == (entries[-1][0] if entries else after) and len(entries) < self.limit:
            reached = ""  # the end of the open entries: the next sweep starts over
        self._leave_cursor(cursor, reached)
        counts["next"] = reached
        log.info("sweep: %s", counts)
        return counts

    def _leave_cursor(self, cursor, reached: str) -> None:
        try:
            if cursor is None:
                self.markers.create(CURSOR, {"after": reached})
            else:
                self.markers.replace(CURSOR, {"after": reached}, cursor[1])
        except Exception as exc:  # the next sweep redoes this page
            log.warning("sweep cursor not saved: %s", exc)

    def _one(self, key, doc, generation) -> str:
        if doc.get("state") == "publishing":
            if time.time() - doc.get("sweptAt", 0) < STUCK_S:
                return "running"  # another sweep is publishing it now
            log.error("message %s: a sweep died while publishing its result; not sent again", key)
            return "stuck"
        unreported, execution = ended_unreported(
            self.clients.fill(), doc["execution"], doc.get("maxRetries")
        )
        if unreported is None:
            return "running"
        if not unreported:
            self.claims.close(key, generation, doc, "reported")
            return "reported"
        result = self.result_for(doc, template_env(execution))
        # ours to report: say so on the entry first, so that no sweep ever publishes it again
        held = self.markers.replace(
            OPEN + key,
            {**doc, "state": "publishing", "sweptAt": time.time(), "result": result},
            generation,
        )
        if held is None:
            return "raced"
        try:
            self.dispatcher.results.publish_result(result)
        except BaseException:
            self.markers.replace(OPEN + key, doc, held)  # open again for the next sweep
            raise
        self.claims.close(key, held, doc, result["status"])
        log.warning(
            "execution %s ended without a result: published %s for job %s",
            doc["execution"],
            result["status"],
            doc.get("jobId"),
        )
        return "published"

    def result_for(self, doc: dict, env: dict) -> dict:
        """`completed` when the track holds the set this request asks for, else
        `execution_lost`."""
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
        found = self._matching(request, env)
        if found is not None:
            return completed_result(
                request,
                manifest.urls(found),
                outputs=manifest.summary(found),
                durationS=found.get("durationS"),
                reused=True,
            )
        return failed_result(request_ids(request), lost)

    def _matching(self, request, env: dict):
        """The track's manifest when it is what the job would accept for `request`: made from
        the original as it is now, with the outputs, model, format and bitrate of `env`."""
        bucket = self.dispatcher.settings.stems_bucket
        if not bucket:
            return None
        from job.storage.gcs import GcsStorage

        try:
            settings = load_settings({**env, "STORAGE_MODE": "gcs", "GCS_BUCKET": bucket})
        except ConfigError as exc:
            log.warning("the execution's settings do not load (%s): no set is vouched", exc)
            return None
        storage = self.clients.stems or GcsStorage(
            bucket,
            client=self.clients.storage,
            retry_deadline_s=self.dispatcher.settings.api_deadline_s,
        )
        found = storage.read_manifest(request.release_id, request.track_id)
        if found is None:
            return None
        try:
            original = storage.describe_original(request.original_uri, trusted=True)
        except JobError:  # gone or unreadable: nothing to vouch for
            return None
        asked = outputs_of(request, settings.outputs)
        recipe = manifest.Recipe.of(settings)
        return found if manifest.matches(found, original.identity, recipe, asked) else None
