"""Starting one execution of the Cloud Run job for one request: the message travels as the
JOB_MESSAGE env override (the job reads it with the same parser), and the job's maxRetries as
read from the Admin API just before as MAX_RETRIES, so the job's last-attempt decision follows
the platform's count even after `gcloud run jobs update --max-retries`. Quota and transient API
faults are retried within the dispatcher's budget. Each execution also carries its marker key
(DISPATCH_MESSAGE_KEY), so a claim whose dispatcher died after run_job can find what it
started."""

import json

from job.dispatcher.settings import DispatcherSettings
from job.messages import JobRequest, to_message
from job.retry import bounded


def make_jobs_client():
    # Imported on first use: google.cloud.run_v2 takes most of a second to import, which
    # the service's cold start (and /health) need not wait for.
    from google.cloud import run_v2

    return run_v2.JobsClient()


def job_max_retries(client, settings: DispatcherSettings) -> int:
    """The job's maxRetries now (its template), which the next execution gets."""
    job = bounded(settings.api_deadline_s, max_attempts=settings.api_attempts)(
        client.get_job, name=settings.job_name, timeout=min(20.0, settings.api_deadline_s)
    )
    return int(job.template.template.max_retries)


KEY_ENV = "DISPATCH_MESSAGE_KEY"
LOOKUP_PAGES = 10  # executions pages a lookup reads at most


def start_execution(
    client, settings: DispatcherSettings, request: JobRequest, max_retries: int, key: str = ""
) -> str:
    """Run the job with `request` as its JOB_MESSAGE, `max_retries` as its MAX_RETRIES and the
    marker `key`; returns the execution's name."""
    from google.cloud import run_v2

    message = json.dumps(to_message(request), separators=(",", ":"))
    env = [
        run_v2.EnvVar(name="JOB_MESSAGE", value=message),
        run_v2.EnvVar(name="MAX_RETRIES", value=str(max_retries)),
        run_v2.EnvVar(name=KEY_ENV, value=key),
    ]
    run_request = run_v2.RunJobRequest(
        name=settings.job_name,
        overrides=run_v2.RunJobRequest.Overrides(
            container_overrides=[run_v2.RunJobRequest.Overrides.ContainerOverride(env=env)]
        ),
    )
    operation = bounded(settings.api_deadline_s, max_attempts=settings.api_attempts)(
        client.run_job, request=run_request, timeout=min(20.0, settings.api_deadline_s)
    )
    try:
        return operation.metadata.name or operation.operation.name
    except Exception:  # metadata missing or of another type: the operation still names it
        return operation.operation.name


def find_execution(client, settings: DispatcherSettings, key: str, since: float):
    """(name, its MAX_RETRIES) of the execution started for marker `key` at or after `since`
    (epoch seconds), if any: what a claim whose dispatcher died after run_job left behind."""
    from google.cloud import run_v2

    pages = client.list_executions(
        request=run_v2.ListExecutionsRequest(parent=settings.job_name, page_size=100),
        timeout=min(20.0, settings.api_deadline_s),
    ).pages
    for number, page in enumerate(pages):
        for execution in page.executions:
            created = execution.create_time.timestamp() if execution.create_time else since
            env = {e.name: e.value for c in execution.template.containers for e in c.env}
            if created >= since - 60 and env.get(KEY_ENV) == key:
                retries = env.get("MAX_RETRIES", "")
                return execution.name, int(retries) if retries.isdigit() else None
        if number + 1 >= LOOKUP_PAGES:
            break
    return None
