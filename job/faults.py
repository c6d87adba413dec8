"""Which side a cloud fault is on decides what it means for the message.

Only the original is the sender's business: missing or forbidden, it is bad input (exit 65, the
message is concluded). The stems bucket, the manifest, the results topic and the credentials are
ours: missing or forbidden there, no message can succeed until someone fixes a setting or a role,
so the fault is a configuration error (exit 78) and the message is kept. Treating those as bad
input would conclude every message in the queue as failed because of one mistyped GCS_BUCKET.
"""

from google.api_core import exceptions
from google.auth.exceptions import DefaultCredentialsError, RefreshError

from job.errors import JobError
from job.retry import is_transient

DENIED = (exceptions.Forbidden, exceptions.Unauthorized, exceptions.PermissionDenied)
NO_CREDENTIALS = (DefaultCredentialsError, RefreshError)


def no_credentials(exc: BaseException) -> JobError | None:
    """JobError(no_credentials) when `exc` says the identity has no usable credentials."""
    cause = exc
    while cause is not None:
        if isinstance(cause, NO_CREDENTIALS) and not is_transient(cause):
            text = str(cause).strip()
            first = text.splitlines()[0] if text else type(cause).__name__
            return JobError(
                "no_credentials",
                "no usable Google credentials (application-default "
                "credentials, GOOGLE_APPLICATION_CREDENTIALS or the metadata server): "
                f"{first[:300]}",
            )
        cause = cause.__cause__ or cause.__context__
    return None


def storage_fault(
    exc: Exception, what: str, *, original: bool, bucket: str, deadline_s: float
) -> JobError | None:
    """The JobError for a failed Cloud Storage call, or None when `exc` is no cloud fault
    (a bug: the caller lets it propagate)."""
    if (missing := no_credentials(exc)) is not None:
        return missing
    if isinstance(exc, exceptions.NotFound):
        if original:
            return JobError("input_not_found", f"{what}: {exc.message}")
        return JobError("storage_not_found", f"{what}: {exc.message} (check GCS_BUCKET={bucket})")
    if isinstance(exc, DENIED):
        if original:
            return JobError("input_forbidden", f"{what}: access denied ({exc.code}): {exc.message}")
        return JobError(
            "permission_denied",
            f"{what}: access denied ({exc.code}): {exc.message} (GCS_BUCKET={bucket}: "
            "the job's identity needs roles/storage.objectUser on stems/)",
        )
    if is_transient(exc):
        return JobError(
            "storage_unavailable",
            f"{what}: Cloud Storage still failing after retrying for {deadline_s:g} s: {exc}",
        )
    if isinstance(exc, exceptions.GoogleAPICallError):
        return JobError(
            "input_error" if original else "storage_error", f"{what}: {exc.code} {exc.message}"
        )
    return None


def publish_fault(exc: Exception, topic: str) -> JobError:
    """The JobError for a publish to the results topic that failed (after its retries)."""
    if (missing := no_credentials(exc)) is not None:
        return missing
    if isinstance(exc, exceptions.NotFound):
        return JobError(
            "results_topic_not_found",
            f"PUBSUB_RESULTS_TOPIC: {topic} does not exist: {exc.message}",
        )
    if isinstance(exc, DENIED):
        return JobError(
            "results_topic_forbidden",
            f"PUBSUB_RESULTS_TOPIC: publishing to {topic} is denied ({exc.code}): "
            f"{exc.message} (the job's identity needs roles/pubsub.publisher)",
        )
    return JobError("publish_failed", f"publishing to {topic} failed: {exc}")
