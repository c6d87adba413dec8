"""The dispatcher's settings: its own variables, parsed by job.config's parsers, plus the shared
ones (GCP_PROJECT_ID, GCS_BUCKET, PUBSUB_RESULTS_TOPIC, HTTP_HOST, PORT) read through
job.config itself, so env values and flags pass one validation path."""

import os
import re
from dataclasses import dataclass, replace

from job.config import ENV as SHARED_ENV
from job.config import load_settings, parse_float, parse_int, parse_text
from job.errors import ConfigError

REGION = re.compile(r"^[a-z][a-z0-9-]{1,62}$")
JOB_NAME = re.compile(r"^[a-z]([a-z0-9-]{0,61}[a-z0-9])?$")
SERVICE_ACCOUNT = re.compile(r"^[^@\s]+@[a-z0-9.-]+\.[a-z]+$")
REQUIRED = ("CLOUD_RUN_REGION",)  # no default: the job lives in one region


@dataclass(frozen=True)
class DispatcherSettings:
    project: str
    region: str
    job: str = "stem-job"
    results_topic: str = "stem-results"
    marker_bucket: str = ""  # empty: in-memory markers (one instance only)
    marker_prefix: str = "dispatch/"
    stems_bucket: str = ""  # GCS_BUCKET: the sweep reads manifests there
    claim_ttl_s: float = 90.0  # a claim older than this with no execution is stale
    api_attempts: int = 4  # run_job tries on quota / transient errors
    api_deadline_s: float = 30.0  # keep below the push subscription's ack deadline
    sweep_limit: int = 100  # open entries one sweep call looks at
    sweep_budget_s: float = 30.0  # a sweep call stops taking entries after this
    host: str = "0.0.0.0"
    port: int = 8000  # Cloud Run sets PORT to the container port
    push_audience: str = ""  # set: every push needs a Google OIDC token for it
    push_service_accounts: tuple = ()  # set: ... minted for one of these service accounts
    log_format: str = "auto"  # LOG_FORMAT, shared with the job

    @property
    def job_name(self) -> str:
        return f"projects/{self.project}/locations/{self.region}/jobs/{self.job}"


def _matching(pattern, hint):
    def parse(name, value):
        value = value.strip()
        if not pattern.match(value):
            raise ConfigError(f"{name}={value!r} is invalid: use {hint}")
        return value

    return parse


def _emails(name, value):
    """Comma-separated service-account emails (the push's and, say, a scheduler's)."""
    check = _matching(SERVICE_ACCOUNT, "emails such as NAME@PROJECT.iam.gserviceaccount.com")
    return tuple(check(name, email) for email in value.split(",") if email.strip())


def _prefix(name, value):
    prefix = parse_text(name, value).lstrip("/")
    return prefix if not prefix or prefix.endswith("/") else prefix + "/"


# env variable -> (DispatcherSettings field, parser), read like job.config.ENV.
# DISPATCH_JOB_NAME, not CLOUD_RUN_JOB: Cloud Run sets that inside every job execution.
ENV = {
    "CLOUD_RUN_REGION": ("region", _matching(REGION, "a region such as us-central1")),
    "DISPATCH_JOB_NAME": ("job", _matching(JOB_NAME, "the Cloud Run job's name")),
    "DISPATCH_MARKER_BUCKET": ("marker_bucket", SHARED_ENV["GCS_BUCKET"][1]),
    "DISPATCH_MARKER_PREFIX": ("marker_prefix", _prefix),
    "DISPATCH_CLAIM_TTL_S": ("claim_ttl_s", lambda n, v: parse_float(n, v, 0)),
    "DISPATCH_API_ATTEMPTS": ("api_attempts", lambda n, v: parse_int(n, v, 1, 10)),
    "DISPATCH_API_DEADLINE_S": ("api_deadline_s", lambda n, v: parse_float(n, v, 0)),
    "DISPATCH_SWEEP_LIMIT": ("sweep_limit", lambda n, v: parse_int(n, v, 1, 1000)),
    "DISPATCH_SWEEP_BUDGET_S": ("sweep_budget_s", lambda n, v: parse_float(n, v, 1)),
    "PUSH_AUDIENCE": ("push_audience", parse_text),
    "PUSH_SERVICE_ACCOUNT": ("push_service_accounts", _emails),
}


def load_dispatcher_settings(environ=None, **overrides) -> DispatcherSettings:
    """Settings from `environ` (default os.environ); `overrides` are job.config fields from
    flags (http_host, http_port). ConfigError names the bad variable."""
    environ = os.environ if environ is None else environ
    shared = load_settings(environ, **overrides)
    if not shared.gcp_project_id:
        raise ConfigError("GCP_PROJECT_ID is required by the dispatcher")
    values = {
        field: parse(env, environ.get(env, ""))
        for env, (field, parse) in ENV.items()
        if environ.get(env, "").strip() or env in REQUIRED
    }
    settings = replace(
        DispatcherSettings(
            project=shared.gcp_project_id,
            region="",
            results_topic=shared.pubsub_results_topic or "stem-results",
            marker_bucket=shared.gcs_bucket,
            stems_bucket=shared.gcs_bucket,
            host=shared.http_host,
            port=shared.http_port,
            log_format=shared.log_format,
        ),
        **values,
    )
    if settings.push_audience and not settings.push_service_accounts:
        # Anyone can mint a Google-signed token for any audience from a service account in
        # their own project: the audience alone admits the world.
        raise ConfigError(
            "PUSH_AUDIENCE is set without PUSH_SERVICE_ACCOUNT: name the push subscription's "
            "service account (and the scheduler's), or any Google-signed token for the "
            "audience would pass"
        )
    if settings.push_service_accounts and not settings.push_audience:
        raise ConfigError(
            "PUSH_SERVICE_ACCOUNT is set without PUSH_AUDIENCE: set the push "
            "subscription's audience too (tokens are checked only with both)"
        )
    if settings.claim_ttl_s < settings.api_deadline_s + 20:
        # A live claim is held for at most the API budget; a shorter TTL would let a
        # redelivery take over a claim whose owner is still calling run_job.
        raise ConfigError(
            f"DISPATCH_CLAIM_TTL_S={settings.claim_ttl_s:g} is invalid: use at "
            f"least DISPATCH_API_DEADLINE_S + 20 ({settings.api_deadline_s + 20:g})"
        )
    return settings
