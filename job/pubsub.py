"""The queue: publish results, pull work, and keep pulled messages leased until they are done.

Python's synchronous (unary) pull never extends a message's ack deadline by itself, so a message
waiting in a batch would expire and be delivered to another job. `LeaseKeeper` extends the
deadline of every message it holds from a background thread until the message is acked or
nacked. Clients are made by the caller (PublisherClient()/SubscriberClient() honour
PUBSUB_EMULATOR_HOST); they are only used here.
"""

import json
import logging
import threading
import time

from google.api_core import exceptions

from job.errors import JobError
from job.faults import DENIED, no_credentials, publish_fault
from job.retry import bounded, is_transient

log = logging.getLogger(__name__)


def resource_path(project: str, kind: str, name: str) -> str:
    """`projects/P/topics/N` (kind "topics" or "subscriptions") unless `name` is already a path."""
    return name if name.startswith("projects/") else f"projects/{project}/{kind}/{name}"


class Publisher:
    """Publishes JSON messages to one topic, retrying transient faults for a bounded time."""

    def __init__(
        self, client, topic_path: str, deadline_s: float = 60.0, attempt_timeout_s: float = 20.0
    ):
        self.client = client
        self.topic_path = topic_path
        self.deadline_s = deadline_s
        self.attempt_timeout_s = attempt_timeout_s

    def publish(self, payload: dict, attributes: dict | None = None) -> str:
        """Publish `payload` as JSON; returns the message id. Raises a retryable JobError when
        the topic cannot be reached (publish_failed) or is missing or forbidden (a configuration
        code), so the caller keeps the message rather than acks it."""
        data = json.dumps(payload, separators=(",", ":")).encode("utf-8")
        attributes = {k: str(v) for k, v in (attributes or {}).items() if v is not None}

        def attempt():
            future = self.client.publish(
                self.topic_path, data, retry=None, timeout=self.attempt_timeout_s, **attributes
            )
            return future.result(timeout=self.attempt_timeout_s + 5)

        try:
            return bounded(self.deadline_s, is_transient)(attempt)
        except Exception as exc:
            raise publish_fault(exc, self.topic_path) from exc

    def check(self) -> None:
        """One metadata call: a missing topic fails before any work starts. An identity that
        may publish but not read the topic's metadata (roles/pubsub.publisher) skips the check;
        a publish then says what is wrong."""
        try:
            self.client.get_topic(request={"topic": self.topic_path}, timeout=10.0)
        except DENIED:
            return
        except exceptions.NotFound as exc:
            raise publish_fault(exc, self.topic_path) from exc
        except Exception as exc:
            if (missing := no_credentials(exc)) is not None:
                raise missing from exc
            log.info("results topic not checked: %s", exc)  # a fault of the moment

    def publish_result(self, result: dict) -> str:
        """A stem-results message; attributes jobId and status let consumers filter."""
        return self.publish(result, {"jobId": result.get("jobId"), "status": result.get("status")})


def pull(subscriber, subscription_path: str, max_messages: int, timeout_s: float) -> list:
    """Up to `max_messages` received messages, or [] when none arrives within `timeout_s`.

    One pull may return fewer than are waiting; call again to top a batch up. Transient faults
    are retried until the deadline; if no pull succeeded at all by then,
    JobError(pubsub_unavailable)
    says so rather than passing an unreachable service off as an empty queue.
    """
    deadline = time.monotonic() + timeout_s

    def once() -> list:
        try:
            response = subscriber.pull(
                request={"subscription": subscription_path, "max_messages": max_messages},
                timeout=max(1.0, min(deadline - time.monotonic(), 30.0)),
                retry=None,
            )
        except exceptions.DeadlineExceeded:
            return []  # the server held the pull open and nothing came
        return list(response.received_messages)

    try:
        return bounded(timeout_s, again=lambda got: not got, wait=_poll_pause)(once)
    except Exception as exc:
        if is_transient(exc):  # no pull succeeded by the deadline: not an empty queue
            raise JobError(
                "pubsub_unavailable",
                f"pulling from {subscription_path} failed for {timeout_s:g} s: {exc}",
            ) from exc
        if (missing := no_credentials(exc)) is not None:
            raise missing from exc
        if isinstance(exc, exceptions.GoogleAPICallError):
            raise JobError(
                "pubsub_error",
                f"PUBSUB_SUBSCRIPTION: pulling from {subscription_path} failed: {exc}",
            ) from exc
        raise


def _poll_pause(state) -> float:
    """An empty answer is asked again soon; a transient fault waits a second."""
    return 1.0 if state.outcome.failed else 0.2


def delivery_attempt(message) -> int:
    """1 + redeliveries when the subscription has a dead-letter policy, else 0."""
    return message.delivery_attempt


def dead_letter_limit(subscriber, subscription_path: str, fallback: int) -> int:
    """The delivery attempt after which the subscription dead-letters a message: its
    dead-letter policy's `max_delivery_attempts` (0: it has none, nothing is dead-lettered);
    `fallback` (MAX_DELIVERY_ATTEMPTS) when the policy cannot be read, as with the subscriber
    role alone, which may pull but not get the subscription. The drain asks once, when a
    delivery first fails."""
    try:
        subscription = subscriber.get_subscription(
            request={"subscription": subscription_path}, timeout=10.0, retry=None
        )
    except Exception as exc:  # denied, or a fault of the moment: the setting stands
        log.info(
            "dead-letter policy of %s not read (%s): MAX_DELIVERY_ATTEMPTS=%d",
            subscription_path,
            type(exc).__name__,
            fallback,
        )
        return fallback
    policy = subscription.dead_letter_policy
    if not policy.dead_letter_topic:
        return 0
    return policy.max_delivery_attempts or 5  # the API's default when the policy leaves it out


def earlier_deliveries(message) -> int | None:
    """The tries of a pulled message before this one (Job.attempt); None without a
    dead-letter policy, where Pub/Sub does not count them."""
    count = delivery_attempt(message)
    return count - 1 if count else None


class LeaseKeeper:
    """Holds pulled messages and extends their ack deadline every `deadline_s / 3` seconds until
    each is acked or nacked. Use as a context manager: leaving it nacks whatever is still held,
    so an unfinished message goes straight back to the queue."""

    def __init__(
        self, subscriber, subscription_path: str, deadline_s: int = 60, call_deadline_s: float = 5.0
    ):
        self.subscriber = subscriber
        self.subscription_path = subscription_path
        self.deadline_s = max(10, min(600, int(deadline_s)))
        self.call_deadline_s = call_deadline_s
        self._held = {}  # ack_id -> received message
        self._lock = threading.RLock()  # guards _held; re-entrant in case of a signal handler
        # A nack must not be overtaken by an extension of the same message sent just before it
        # (that would lease it again instead of returning it): the two take turns.
        self._deadlines = threading.RLock()
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._extend_loop, name="lease-keeper", daemon=True)
        self._thread.start()

    def hold(self, messages) -> None:
        """Start leasing `messages` (extending their deadline at once)."""
        with self._lock:
            self._held.update({m.ack_id: m for m in messages})
        self._modify([m.ack_id for m in messages], self.deadline_s)

    def held_ack_ids(self) -> list:
        with self._lock:
            return list(self._held)

    def ack(self, message) -> None:
        self._release([message.ack_id])
        self._send(
            f"acknowledging {message.message.message_id}",
            self.subscriber.acknowledge,
            {"subscription": self.subscription_path, "ack_ids": [message.ack_id]},
        )

    def nack(self, message) -> None:
        """Back to the queue at once (ack deadline 0), for another job to take."""
        with self._deadlines:
            self._release([message.ack_id])
            self._modify([message.ack_id], 0)

    def nack_all(self) -> None:
        """Every message still held goes back to the queue (on SIGTERM)."""
        with self._deadlines:
            with self._lock:
                ack_ids = list(self._held)
                self._held.clear()
            self._modify(ack_ids, 0)

    def stop(self) -> None:
        self._stopping.set()
        if self._thread is not threading.current_thread():
            self._thread.join(timeout=self.call_deadline_s + 1)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        try:
            self.nack_all()
        finally:
            self.stop()

    # -- inside ----------------------------------------------------------------------
    def _release(self, ack_ids) -> None:
        with self._lock:
            for ack_id in ack_ids:
                self._held.pop(ack_id, None)

    def _modify(self, ack_ids, seconds: int) -> None:
        if ack_ids:
            self._send(
                f"setting the ack deadline of {len(ack_ids)} message(s) to {seconds} s",
                self.subscriber.modify_ack_deadline,
                {
                    "subscription": self.subscription_path,
                    "ack_ids": ack_ids,
                    "ack_deadline_seconds": seconds,
                },
            )

    def _send(self, what: str, method, request: dict) -> None:
        try:
            bounded(self.call_deadline_s, is_transient)(
                method, request=request, timeout=self.call_deadline_s, retry=None
            )
        except Exception as exc:
            # At-least-once delivery makes this safe to survive: the message comes back later.
            raise JobError("pubsub_unavailable", f"{what} failed: {exc}") from exc

    def _extend_loop(self) -> None:
        while not self._stopping.wait(self.deadline_s / 3):
            try:
                with self._deadlines:
                    self._modify(self.held_ack_ids(), self.deadline_s)
            except JobError as error:
                log.warning("lease extension failed, will try again: %s", error.message)
