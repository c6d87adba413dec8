"""The Cloud Run dispatcher: one stem-separate Pub/Sub message in, one Cloud Run job execution out.

Why it exists: a Cloud Run job cannot subscribe to Pub/Sub, so this small HTTP service receives
each message (a direct Pub/Sub push, Google's recommended path, or an Eventarc CloudEvent in
binary or structured mode), validates it, and starts the job with `JOB_MESSAGE` in an env
override. It answers so that Pub/Sub retries only what a retry can fix:

  bad message       -> a `failed` result on PUBSUB_RESULTS_TOPIC, 200 (never retried)
  started / dup     -> 200
  transient fault   -> 503 (Cloud Run API quota or outage after bounded retries, GCS or
                       Pub/Sub unavailable); 409 while another delivery holds the claim
  job misconfigured -> 500 (not found, permission denied): redelivered until the operator
                       fixes it or the dead-letter policy takes the message
  unreadable body   -> 400 (not a Pub/Sub delivery at all)

Dedupe: Pub/Sub delivers at least once, and a redelivery keeps its messageId (Eventarc's ce-id
is the messageId too). Before starting a job the dispatcher claims a marker object named after
the messageId, created only if absent (GCS `if_generation_match=0`), and records the execution
in it afterwards; a second delivery finds the marker and starts nothing. A claim left by a
crashed dispatcher is taken over (generation match again) after DISPATCH_CLAIM_TTL_S. The job
gets PUBSUB_MESSAGE_ID too, and its own manifest.json check makes a second execution of a
finished track a no-op: that covers the one gap left, a run_job call that timed out after
Cloud Run had accepted it and is retried. Without DISPATCH_MARKER_BUCKET (or GCS_BUCKET)
markers live in process memory, which protects one instance only.

Entry points: `create_app()` (ASGI app) and `serve(host, port)`; `stem-job dispatch` calls serve.
"""

import base64
import binascii
import hashlib
import json
import logging
import os
import re
import threading
import time
from dataclasses import dataclass, field

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route
from tenacity import (Retrying, retry_if_exception, stop_after_attempt, stop_after_delay,
                      wait_random_exponential)

from .config import load_settings
from .errors import ConfigError, JobError
from .messages import failed_result, parse_message, salvage_ids

log = logging.getLogger("stem_job.dispatcher")

PUBSUB_EVENT_TYPE = "google.cloud.pubsub.topic.v1.messagePublished"
_SAFE_KEY = re.compile(r"^[A-Za-z0-9_-]{1,200}$")


# -- settings -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class DispatcherSettings:
    project: str
    region: str
    job: str = "stem-job"
    results_topic: str = "stem-results"
    marker_bucket: str = ""            # empty: in-memory markers (one instance only)
    marker_prefix: str = "dispatch/"
    claim_ttl_s: float = 90.0          # a claim older than this with no execution is stale
    api_attempts: int = 4              # run_job tries on quota / transient errors
    api_deadline_s: float = 30.0       # keep below the push subscription's ack deadline
    api_backoff_s: float = 1.0         # first wait between tries (exponential, jittered)
    publish_timeout_s: float = 30.0

    @property
    def job_name(self) -> str:
        return f"projects/{self.project}/locations/{self.region}/jobs/{self.job}"


def _number(environ, name, default, low, high, cast=float):
    raw = environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = cast(raw)
    except ValueError:
        raise ConfigError(f"{name}={raw!r} is invalid: use a number") from None
    if not low <= value <= high:
        raise ConfigError(f"{name}={raw!r} is invalid: use a number between {low} and {high}")
    return value


def load_dispatcher_settings(environ=None) -> DispatcherSettings:
    """The dispatcher's own variables plus the shared ones (GCP_PROJECT_ID, GCS_BUCKET,
    PUBSUB_RESULTS_TOPIC) read through job.config; ConfigError names the bad variable."""
    environ = os.environ if environ is None else environ
    shared = load_settings(environ)
    region = environ.get("CLOUD_RUN_REGION", "").strip()
    job = environ.get("CLOUD_RUN_JOB", "stem-job").strip() or "stem-job"
    if not shared.gcp_project_id:
        raise ConfigError("GCP_PROJECT_ID is required by the dispatcher")
    if not re.match(r"^[a-z][a-z0-9-]{1,62}$", region):
        raise ConfigError(f"CLOUD_RUN_REGION={region!r} is invalid: "
                          "use a region such as us-central1")
    if not re.match(r"^[a-z]([a-z0-9-]{0,61}[a-z0-9])?$", job):
        raise ConfigError(f"CLOUD_RUN_JOB={job!r} is invalid: use the Cloud Run job's name")
    prefix = environ.get("DISPATCH_MARKER_PREFIX", "dispatch/").strip().lstrip("/")
    deadline = _number(environ, "DISPATCH_API_DEADLINE_S", 30.0, 1, 600)
    ttl = _number(environ, "DISPATCH_CLAIM_TTL_S", 90.0, 10, 3600)
    if ttl < deadline + 20:
        # A live claim is held for at most the API budget; a shorter TTL would let a
        # redelivery take over a claim whose owner is still calling run_job.
        raise ConfigError(f"DISPATCH_CLAIM_TTL_S={ttl:g} is invalid: use at least "
                          f"DISPATCH_API_DEADLINE_S + 20 ({deadline + 20:g})")
    return DispatcherSettings(
        project=shared.gcp_project_id, region=region, job=job,
        results_topic=shared.pubsub_results_topic or "stem-results",
        marker_bucket=environ.get("DISPATCH_MARKER_BUCKET", "").strip() or shared.gcs_bucket,
        marker_prefix=prefix if not prefix or prefix.endswith("/") else prefix + "/",
        claim_ttl_s=ttl,
        api_attempts=_number(environ, "DISPATCH_API_ATTEMPTS", 4, 1, 10, int),
        api_deadline_s=deadline,
    )


# -- envelopes ----------------------------------------------------------------------------------
class EnvelopeError(ValueError):
    """The request is not a Pub/Sub delivery in any form we know."""


@dataclass(frozen=True)
class Delivery:
    data: bytes                 # the Pub/Sub message payload (base64-decoded)
    message_id: str | None
    attributes: dict
    transport: str              # pubsub-push | eventarc-binary | eventarc-structured
    delivery_attempt: int | None = None


def parse_envelope(headers, body: bytes) -> Delivery:
    """Pub/Sub push `{"message": {...}, "subscription": ...}`, the same body under Eventarc's
    binary-mode ce-* headers, or a structured CloudEvent whose `data` is that body."""
    try:
        document = json.loads(body or b"null")
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise EnvelopeError("the request body is not JSON") from None
    content_type = headers.get("content-type", "").split(";")[0].strip().lower()
    event_id = event_type = None
    if content_type == "application/cloudevents+json":
        if not isinstance(document, dict) or not isinstance(document.get("data"), dict):
            raise EnvelopeError("structured CloudEvent without a JSON object in `data`")
        event_id, event_type = document.get("id"), document.get("type")
        payload, transport = document["data"], "eventarc-structured"
    elif "ce-id" in headers or "ce-type" in headers:
        event_id, event_type = headers.get("ce-id"), headers.get("ce-type")
        payload, transport = document, "eventarc-binary"
    else:
        payload, transport = document, "pubsub-push"
    if event_type is not None and event_type != PUBSUB_EVENT_TYPE:
        raise EnvelopeError(f"CloudEvent type {str(event_type)[:100]!r} is not {PUBSUB_EVENT_TYPE}")
    message = payload.get("message") if isinstance(payload, dict) else None
    if not isinstance(message, dict):
        raise EnvelopeError("no Pub/Sub `message` object in the request")
    try:
        data = base64.b64decode(message.get("data") or "", validate=True)
    except (binascii.Error, ValueError, TypeError):
        raise EnvelopeError("message.data is not base64") from None
    message_id = message.get("messageId") or message.get("message_id") or event_id
    attempt = payload.get("deliveryAttempt")
    attributes = message.get("attributes")
    return Delivery(data, str(message_id) if message_id else None,
                    attributes if isinstance(attributes, dict) else {}, transport,
                    attempt if isinstance(attempt, int) else None)


# -- dedupe markers -----------------------------------------------------------------------------
class MemoryMarkers:
    """Markers in process memory with the same create-if-absent / generation-match semantics as
    GcsMarkers: enough for one instance, and what the dedupe tests run against."""

    def __init__(self):
        self._lock = threading.Lock()
        self._items = {}
        self._generation = 0

    def create(self, key, doc):
        with self._lock:
            if key in self._items:
                return None
            return self._put(key, doc)

    def read(self, key):
        with self._lock:
            item = self._items.get(key)
            return (dict(item[0]), item[1]) if item else None

    def replace(self, key, doc, generation):
        with self._lock:
            if key not in self._items or self._items[key][1] != generation:
                return None
            return self._put(key, doc)

    def delete(self, key, generation):
        with self._lock:
            if key not in self._items or self._items[key][1] != generation:
                return False
            del self._items[key]
            return True

    def _put(self, key, doc):
        self._generation += 1
        self._items[key] = (dict(doc), self._generation)
        return self._generation


class GcsMarkers:
    """Markers as small JSON objects under gs://BUCKET/PREFIX; GCS generation preconditions make
    create/replace/delete atomic across dispatcher instances."""

    def __init__(self, bucket: str, prefix: str = "dispatch/", client=None):
        from google.cloud import storage
        self.client = client or storage.Client()
        self.bucket = self.client.bucket(bucket)
        self.prefix = prefix

    def _blob(self, key):
        return self.bucket.blob(f"{self.prefix}{key}.json")

    def _write(self, key, doc, generation):
        from google.api_core.exceptions import PreconditionFailed
        blob = self._blob(key)
        try:
            blob.upload_from_string(json.dumps(doc), content_type="application/json",
                                    if_generation_match=generation)
        except PreconditionFailed:
            return None
        return blob.generation

    def create(self, key, doc):
        return self._write(key, doc, 0)

    def replace(self, key, doc, generation):
        return self._write(key, doc, generation)

    def read(self, key):
        from google.api_core.exceptions import NotFound
        blob = self.bucket.get_blob(f"{self.prefix}{key}.json")
        if blob is None:
            return None
        generation = blob.generation      # read before the download, which resets properties
        try:
            raw = blob.download_as_bytes(if_generation_match=generation)
        except NotFound:
            return None
        try:
            doc = json.loads(raw)
        except ValueError:
            doc = {}
        return (doc if isinstance(doc, dict) else {}), generation

    def delete(self, key, generation):
        from google.api_core.exceptions import NotFound, PreconditionFailed
        try:
            self._blob(key).delete(if_generation_match=generation)
        except (NotFound, PreconditionFailed):
            return False
        return True


def marker_key(message_id: str) -> str:
    """Pub/Sub message IDs are digits; anything else is hashed into a safe object name."""
    if _SAFE_KEY.match(message_id):
        return message_id
    return "h-" + hashlib.sha256(message_id.encode()).hexdigest()


# -- the dispatcher -----------------------------------------------------------------------------
@dataclass
class Outcome:
    status: int
    body: dict = field(default_factory=dict)


def _transient(exc: BaseException) -> bool:
    """Errors where the API did not (or may not have) run the request and a retry may help."""
    from google.api_core import exceptions as api
    from google.auth.exceptions import TransportError
    if isinstance(exc, (api.TooManyRequests, api.ServiceUnavailable, api.InternalServerError,
                        api.GatewayTimeout, api.DeadlineExceeded, api.Aborted, TransportError)):
        return True
    try:
        import requests
        return isinstance(exc, (requests.ConnectionError, requests.Timeout))
    except ImportError:  # pragma: no cover - requests comes with google-auth
        return False


def _now() -> float:
    return time.time()


class Dispatcher:
    """The decisions, independent of HTTP: validate, dedupe, run the job, report bad input."""

    def __init__(self, settings: DispatcherSettings, jobs_client=None, publisher=None,
                 markers=None):
        self.settings = settings
        self._jobs_client = jobs_client
        self._publisher = publisher
        self._lock = threading.Lock()
        if markers is None:
            markers = (GcsMarkers(settings.marker_bucket, settings.marker_prefix)
                       if settings.marker_bucket else MemoryMarkers())
            if isinstance(markers, MemoryMarkers):
                log.warning("no DISPATCH_MARKER_BUCKET/GCS_BUCKET: duplicate deliveries are only "
                            "caught within this instance")
        self.markers = markers

    # Clients are made on first use so the app starts (and answers /health) without credentials.
    @property
    def jobs_client(self):
        with self._lock:
            if self._jobs_client is None:
                from google.cloud import run_v2
                self._jobs_client = run_v2.JobsClient()
            return self._jobs_client

    @property
    def publisher(self):
        with self._lock:
            if self._publisher is None:
                from google.cloud import pubsub_v1
                self._publisher = pubsub_v1.PublisherClient()
            return self._publisher

    def dispatch(self, delivery: Delivery) -> Outcome:
        try:
            request = parse_message(delivery.data)
        except JobError as error:
            return self._report_bad_message(delivery, error)
        key = marker_key(delivery.message_id) if delivery.message_id else None
        ids = {"jobId": request.job_id, "messageId": delivery.message_id}
        try:
            claim = self._claim(key, request.job_id, delivery.message_id) if key else None
        except Exception as exc:  # GCS down: we cannot tell a duplicate, so let Pub/Sub retry
            log.warning("dedupe marker unavailable for message %s: %s", delivery.message_id, exc)
            return Outcome(503, {"status": "retry", "reason": "dedupe marker unavailable", **ids})
        if isinstance(claim, Outcome):
            return claim
        try:
            execution = self._run_job(request, delivery)
        except Exception as exc:
            self._release(key, claim)
            retry = _transient(exc)
            log.error("run_job for %s failed (%s): %s", request.job_id,
                      "transient" if retry else "not transient", exc)
            return Outcome(503 if retry else 500,
                           {"status": "retry", "reason": f"Cloud Run API: {exc}"[:500], **ids})
        if key:
            self._record(key, claim, request.job_id, execution)
        log.info("started %s for job %s (message %s via %s)", execution, request.job_id,
                 delivery.message_id, delivery.transport)
        return Outcome(200, {"status": "started", "execution": execution, **ids})

    # -- steps --------------------------------------------------------------------------------
    def _report_bad_message(self, delivery, error: JobError) -> Outcome:
        ids = salvage_ids(delivery.data)
        result = failed_result(ids, error)
        attributes = {"status": "failed"}
        if ids.get("jobId"):
            attributes["jobId"] = ids["jobId"]
        topic = self.publisher.topic_path(self.settings.project, self.settings.results_topic)
        try:
            self.publisher.publish(topic, json.dumps(result).encode(), **attributes).result(
                timeout=self.settings.publish_timeout_s)
        except Exception as exc:
            log.warning("could not publish the failed result for message %s: %s",
                        delivery.message_id, exc)
            return Outcome(503, {"status": "retry", "reason": "results topic unavailable"})
        log.info("refused message %s: %s", delivery.message_id, error.message)
        return Outcome(200, {"status": "rejected", "error": error.as_dict(),
                             "messageId": delivery.message_id})

    def _claim(self, key, job_id, message_id):
        """The claim's generation, or an Outcome when another delivery owns the message."""
        doc = {"state": "claimed", "jobId": job_id, "claimedAt": _now()}
        for _ in range(3):
            generation = self.markers.create(key, doc)
            if generation is not None:
                return generation
            current = self.markers.read(key)
            if current is None:
                continue                      # released meanwhile: claim again
            existing, generation = current
            if existing.get("state") == "started":
                return Outcome(200, {"status": "duplicate", "messageId": message_id,
                                     "jobId": existing.get("jobId"),
                                     "execution": existing.get("execution")})
            claimed_at = existing.get("claimedAt")
            fresh = isinstance(claimed_at, (int, float)) and \
                _now() - claimed_at < self.settings.claim_ttl_s
            if fresh:
                break
            generation = self.markers.replace(key, doc, generation)   # take over a stale claim
            if generation is not None:
                log.warning("took over a stale claim for message %s", key)
                return generation
        return Outcome(409, {"status": "in_progress", "messageId": message_id})

    def _release(self, key, generation):
        if key is None:
            return
        try:
            self.markers.delete(key, generation)
        except Exception as exc:  # the claim then goes stale and is taken over after the TTL
            log.warning("could not release the claim for message %s: %s", key, exc)

    def _record(self, key, generation, job_id, execution):
        doc = {"state": "started", "jobId": job_id, "execution": execution, "startedAt": _now()}
        try:
            if self.markers.replace(key, doc, generation) is None:
                log.warning("claim for message %s changed while starting %s", key, execution)
        except Exception as exc:
            log.warning("could not record %s for message %s: %s", execution, key, exc)

    def _run_job(self, request, delivery) -> str:
        from google.cloud import run_v2
        message = {"jobId": request.job_id, "releaseId": request.release_id,
                   "trackId": request.track_id, "originalStemUri": request.original_uri}
        if request.artist_id:
            message["artistId"] = request.artist_id
        if request.mime_type:
            message["mimeType"] = request.mime_type
        env = [run_v2.EnvVar(name="JOB_MESSAGE", value=json.dumps(message, separators=(",", ":")))]
        if delivery.message_id:
            env.append(run_v2.EnvVar(name="PUBSUB_MESSAGE_ID", value=delivery.message_id))
        run_request = run_v2.RunJobRequest(
            name=self.settings.job_name,
            overrides=run_v2.RunJobRequest.Overrides(
                container_overrides=[run_v2.RunJobRequest.Overrides.ContainerOverride(env=env)]))
        settings = self.settings
        retrying = Retrying(
            stop=(stop_after_attempt(settings.api_attempts)
                  | stop_after_delay(settings.api_deadline_s)),
            wait=wait_random_exponential(multiplier=settings.api_backoff_s, max=10),  # full jitter
            retry=retry_if_exception(_transient), reraise=True)
        for attempt in retrying:
            with attempt:
                operation = self.jobs_client.run_job(
                    request=run_request, timeout=min(20.0, settings.api_deadline_s))
        try:
            return operation.metadata.name or operation.operation.name
        except Exception:
            return operation.operation.name


# -- HTTP ---------------------------------------------------------------------------------------
def create_app(settings: DispatcherSettings | None = None, *, jobs_client=None, publisher=None,
               markers=None) -> Starlette:
    """The ASGI app: POST / (or /pubsub) takes deliveries, GET /health says what it targets.
    Settings come from the environment unless given; clients may be injected (tests)."""
    dispatcher = Dispatcher(settings or load_dispatcher_settings(), jobs_client, publisher,
                            markers)

    async def receive(request: Request):
        body = await request.body()
        try:
            delivery = parse_envelope(request.headers, body)
        except EnvelopeError as exc:
            log.warning("refused a request that is not a Pub/Sub delivery: %s", exc)
            return JSONResponse({"status": "invalid_envelope", "error": str(exc)}, 400)
        outcome = await run_in_threadpool(dispatcher.dispatch, delivery)
        return JSONResponse(outcome.body, outcome.status)

    async def health(request: Request):
        return JSONResponse({"status": "ok", "job": dispatcher.settings.job_name,
                             "results_topic": dispatcher.settings.results_topic,
                             "dedupe": type(dispatcher.markers).__name__})

    app = Starlette(routes=[Route("/", receive, methods=["POST"]),
                            Route("/pubsub", receive, methods=["POST"]),
                            Route("/health", health, methods=["GET"])])
    app.state.dispatcher = dispatcher
    return app


def serve(host: str = "0.0.0.0", port: int | None = None) -> None:
    """Run the dispatcher with uvicorn on PORT (Cloud Run sets it; default 8080)."""
    import uvicorn
    port = port or int(os.environ.get("PORT", "8080"))
    uvicorn.run(create_app(), host=host, port=port, log_level="info")


def main() -> None:
    try:
        serve()
    except ConfigError as exc:
        from .errors import EXIT_CONFIG
        print(f"stem-job dispatch: configuration error: {exc}", flush=True)
        raise SystemExit(EXIT_CONFIG)


if __name__ == "__main__":
    main()
