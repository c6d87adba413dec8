"""The dispatcher's decisions, independent of HTTP. Its answers let Pub/Sub retry only what a
retry can fix:

  bad message       -> a `failed` result on the results topic, 200 (never retried)
  started / dup     -> 200 (a redelivery after the sweep closed the marker too)
  transient fault   -> 503 (Cloud Run API quota or outage after bounded retries, GCS or
                       Pub/Sub unavailable, an execution started but not recorded); 409
                       while another delivery holds the claim
  no messageId      -> 400 (nothing to dedupe or sweep by; no Pub/Sub push lacks one)
  job misconfigured -> 500 (not found, permission denied): redelivered until the operator
                       fixes it or the dead-letter policy takes the message
"""

import logging
import threading
import time
from dataclasses import dataclass, field

from job.dispatcher.dedupe import Claims, GcsMarkers, MemoryMarkers, marker_key
from job.dispatcher.envelope import Envelope
from job.dispatcher.executions import (
    find_execution,
    job_max_retries,
    make_jobs_client,
    start_execution,
)
from job.dispatcher.settings import DispatcherSettings
from job.dispatcher.sweep import SweepClients, Sweeper
from job.errors import ConfigError, JobError
from job.messages import failed_result, parse_message, salvage_ids, to_message
from job.pubsub import Publisher, resource_path
from job.retry import is_transient

log = logging.getLogger("stem_job.dispatcher")


@dataclass
class Outcome:
    status: int
    body: dict = field(default_factory=dict)


def check_credentials() -> None:
    """At start, not at the first push: without usable credentials no execution can start."""
    import google.auth

    from job.faults import no_credentials

    try:
        google.auth.default()
    except Exception as exc:
        if (fault := no_credentials(exc)) is None:
            raise
        raise ConfigError(fault.message) from None


class Dispatcher:
    """What the dispatcher decides for one push: validate, dedupe, start the job, report bad
    input, and the status each answer gets. Clients may be injected (tests); otherwise they are
    made on first use, so the service starts and answers /health without credentials."""

    def __init__(
        self,
        settings: DispatcherSettings,
        jobs_client=None,
        publisher_client=None,
        markers=None,
        sweep_clients: SweepClients | None = None,
    ):
        self.settings = settings
        if jobs_client is None:
            check_credentials()
        self._jobs_client = jobs_client
        self._sweep_clients = sweep_clients
        self._publisher_client = publisher_client
        self._results = None
        self._lock = threading.Lock()
        if markers is None and settings.marker_bucket:
            markers = GcsMarkers(settings.marker_bucket, settings.marker_prefix)
        if markers is None:
            log.warning(
                "no DISPATCH_MARKER_BUCKET/GCS_BUCKET: duplicate deliveries are only "
                "caught within this instance"
            )
            markers = MemoryMarkers()
        self.claims = Claims(markers, settings.claim_ttl_s)

    @property
    def jobs(self):
        with self._lock:
            if self._jobs_client is None:
                self._jobs_client = make_jobs_client()
            return self._jobs_client

    @property
    def results(self) -> Publisher:
        with self._lock:
            if self._results is None:
                if self._publisher_client is None:
                    from google.cloud import pubsub_v1  # only a bad message needs it

                    self._publisher_client = pubsub_v1.PublisherClient()
                topic = resource_path(self.settings.project, "topics", self.settings.results_topic)
                self._results = Publisher(
                    self._publisher_client, topic, deadline_s=self.settings.api_deadline_s
                )
            return self._results

    @property
    def admin(self) -> SweepClients:
        """The Admin API's executions and tasks, and Cloud Storage: what the sweep reads."""
        with self._lock:
            self._sweep_clients = self._sweep_clients or SweepClients()
            return self._sweep_clients

    def sweep(self) -> Outcome:
        """Report the tracks of executions that ended without a result (sweep.py)."""
        sweeper = Sweeper(self, self.admin, self.settings.sweep_limit, self.settings.sweep_budget_s)
        return Outcome(200, {"status": "swept", **sweeper.sweep()})

    def dispatch(self, delivery: Envelope) -> Outcome:
        """One push: a bad message is reported and acked; a duplicate starts nothing; a new
        message claims its marker, starts one execution and records it there. A push with no
        messageId could not be deduped or swept: it is refused, as no Pub/Sub push lacks one."""
        if not delivery.message_id:
            return Outcome(
                400, {"status": "invalid_envelope", "error": "the delivery has no messageId"}
            )
        try:
            request = parse_message(delivery.data)
        except JobError as error:
            return self._refuse(delivery, error)
        ids = {"jobId": request.job_id, "messageId": delivery.message_id}
        key = marker_key(delivery.message_id)
        generation = self._claim(key, request, delivery, ids)
        if isinstance(generation, Outcome):
            return generation
        try:
            max_retries = job_max_retries(self.jobs, self.settings)
            execution = start_execution(self.jobs, self.settings, request, max_retries, key)
        except Exception as exc:
            found = self._started_anyway(key, exc)
            if found is None:
                self.claims.release(key, generation)
                return self._not_started(request, exc, ids)
            execution, max_retries = found
        message = to_message(request)
        if not self.claims.record(key, generation, request.job_id, execution, message, max_retries):
            # Pub/Sub redelivers; once the claim is stale the redelivery finds the execution
            return Outcome(
                503, {"status": "retry", "reason": "execution started, not recorded", **ids}
            )
        log.info(
            "started %s for job %s (message %s via %s)",
            execution,
            request.job_id,
            delivery.message_id,
            delivery.transport,
        )
        return Outcome(200, {"status": "started", "execution": execution, **ids})

    def _claim(self, key: str, request, delivery: Envelope, ids: dict):
        """The marker's generation, now this delivery's; or the Outcome when it is not."""
        try:
            claim = self.claims.claim(key, request.job_id, to_message(request), self._find)
        except Exception as exc:  # GCS down: we cannot tell a duplicate, so Pub/Sub retries
            log.warning("dedupe marker unavailable for message %s: %s", key, exc)
            return Outcome(503, {"status": "retry", "reason": "dedupe marker unavailable", **ids})
        if claim.started is not None:
            return Outcome(
                200,
                {
                    "status": "duplicate",
                    "messageId": delivery.message_id,
                    "jobId": claim.started.get("jobId"),
                    "execution": claim.started.get("execution"),
                },
            )
        if claim.generation is None:
            return Outcome(409, {"status": "in_progress", "messageId": delivery.message_id})
        return claim.generation

    def _find(self, key: str, since: float):
        """What a stale claim's dispatcher may have started (executions.find_execution)."""
        return find_execution(self.admin.fill().executions, self.settings, key, since)

    def _started_anyway(self, key: str, exc: Exception):
        """After a run_job that failed transiently (its reply lost, say): the execution Cloud
        Run may have started all the same, so that the claim is not released over it."""
        if not is_transient(exc):
            return None
        try:
            return self._find(key, time.time() - self.settings.claim_ttl_s)
        except Exception as lookup:  # unknown: released, as before
            log.warning("could not look for an execution of message %s: %s", key, lookup)
            return None

    def _not_started(self, request, exc: Exception, ids: dict) -> Outcome:
        """run_job failed: Pub/Sub redelivers (503 when a retry may help, else 500)."""
        retry = is_transient(exc)
        log.error(
            "run_job for %s failed (%s): %s",
            request.job_id,
            "transient" if retry else "not transient",
            exc,
        )
        return Outcome(
            503 if retry else 500,
            {"status": "retry", "reason": f"Cloud Run API: {exc}"[:500], **ids},
        )

    def _refuse(self, delivery: Envelope, error: JobError) -> Outcome:
        """A bad message is reported `failed` and acknowledged; if the report cannot be
        published, Pub/Sub must redeliver so that it is not lost."""
        try:
            self.results.publish_result(failed_result(salvage_ids(delivery.data), error))
        except JobError as publish_error:
            log.warning(
                "could not publish the failed result for message %s: %s",
                delivery.message_id,
                publish_error.message,
            )
            return Outcome(503, {"status": "retry", "reason": "results topic unavailable"})
        log.info("refused message %s: %s", delivery.message_id, error.message)
        return Outcome(
            200, {"status": "rejected", "error": error.as_dict(), "messageId": delivery.message_id}
        )
