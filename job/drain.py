"""`stem-job drain`: pull a batch from the subscription, process it message by message, exit.

A message is acked only after its result is published; a bad message gets a `failed` result
and an ack (it will never get better); a fault where a retry may help is nacked at once so
another job takes it. The exit code says what happened to the messages, not to the tracks: 0
when every message taken was concluded and acked (failed results included: the Job did its
work), 75 when one went back to the queue. Nothing heavy (torch, the model) is loaded before a
message arrives:
KEDA's lagging metric starts jobs that find the queue empty, and those must cost seconds.
A configuration error (the model cannot load, no CUDA device, the stems bucket or results
topic missing or forbidden) nacks everything held and exits 78: no message can succeed on this
worker, and none may be concluded as failed for it.

Exactly one result per message: on its last delivery before the dead-letter topic (the
subscription's dead-letter policy, or MAX_DELIVERY_ATTEMPTS) a retryable failure is published
as `failed` and acked rather than dead-lettered unheard. The policy is read when a delivery
first fails, not at start: an empty queue's job exits at once. An ack that fails after
the publish is logged, not raised: the message may come back, and each delivery first looks for
the record the drain keeps of every result it published (`Storage.published`), so a redelivery
is acked without a second result or a second separation.
"""

import functools
import logging
import threading
from dataclasses import dataclass

from google.cloud import pubsub_v1

from job import messages, runtime
from job.errors import EXIT_OK, EXIT_RETRY, Cancel, ConfigError, Interrupted, JobError
from job.pubsub import (
    LeaseKeeper,
    dead_letter_limit,
    delivery_attempt,
    earlier_deliveries,
    pull,
    resource_path,
)

log = logging.getLogger(__name__)
LEASE_S = 60


@dataclass
class Delivery:
    """A pulled message and what it asks for: a valid request, or the failed result of a
    message that is not one."""

    received: object  # pubsub ReceivedMessage
    request: messages.JobRequest | None = None
    refusal: dict | None = None  # the failed result of an invalid message

    @classmethod
    def parse(cls, received) -> "Delivery":
        data = received.message.data
        try:
            return cls(received, request=messages.parse_message(data))
        except JobError as error:
            return cls(received, refusal=messages.failed_result(messages.salvage_ids(data), error))


class Concluder:
    """How a delivery ends: its result published and the message acked, or the message given
    back for a retry, so that each message gets one result. Its own unit, apart from the
    clients and the model, so that tests/test_protocol_commit.py drives it over many
    deliveries."""

    def __init__(self, publisher, storage, last_delivery):
        self.publisher, self.storage = publisher, storage
        # () -> the delivery attempt that is a message's last (0: none is), asked only when a
        # delivery fails: an empty queue or a batch that succeeds never reads the policy
        self.last_delivery = last_delivery
        self.outcomes = []  # an exit code per message concluded or given back

    def conclude(self, received, result: dict, keeper: LeaseKeeper) -> None:
        """Publish the result and ack, or nack where a retry may help, unless this is the
        message's last delivery: then its failure is published too. A fault of ours
        (configuration, a role) stops the drain: raises ConfigError."""
        error = result.get("error")
        failure = JobError(**error) if error and error["retryable"] else None
        if failure is not None and self.is_last(received):
            log.warning(
                "job %s: delivery %d is the message's last before the dead-letter topic: "
                "its failure (%s) is its result",
                result.get("jobId"),
                delivery_attempt(received),
                failure.code,
            )
        elif failure is not None:
            return self.give_back(received, failure, keeper)
        try:
            self.publisher.publish_result(result)
        except JobError as publish_error:
            log.error(
                "result of %s not published, returning the message: %s",
                result.get("jobId"),
                publish_error.message,
            )
            return self.give_back(received, publish_error, keeper)
        self.record(received, result)
        self.acknowledge(received, keeper)
        self.outcomes.append(EXIT_OK)
        if failure is not None and failure.is_config:
            raise ConfigError(failure.message)

    def give_back(self, received, failure: JobError, keeper: LeaseKeeper) -> None:
        keeper.nack(received)  # not finished: another job takes it at once
        self.outcomes.append(EXIT_RETRY)
        if failure.is_config:
            raise ConfigError(failure.message)

    def is_last(self, received) -> bool:
        attempt = delivery_attempt(received)  # 0 without a dead-letter policy
        return bool(attempt) and 0 < self.last_delivery() <= attempt

    def record(self, received, result: dict) -> None:
        """Keep the record that this message's result is published (before the ack, which
        may fail or be lost). Without it a redelivery would publish again; a failure here is
        logged: the ack usually holds, and nothing is lost either way."""
        try:
            self.storage.record_published(
                received.message.message_id,
                {"jobId": result.get("jobId"), "status": result.get("status")},
            )
        except JobError as error:
            log.warning(
                "the record that %s's result is published was not kept: %s",
                received.message.message_id,
                error.message,
            )

    @staticmethod
    def acknowledge(received, keeper: LeaseKeeper) -> None:
        """Ack; one that fails is logged, not raised: the result is out, and a redelivery
        finds the record of it (`published_before`)."""
        try:
            keeper.ack(received)
        except JobError as error:
            log.warning(
                "ack of %s failed after its result was published (it may be delivered again "
                "and will then be acked without a second result): %s",
                received.message.message_id,
                error.message,
            )

    def published_before(self, received, keeper: LeaseKeeper) -> bool:
        """Whether an earlier delivery of this message published its result (then acked
        here, with nothing published or separated again)."""
        try:
            found = self.storage.published(received.message.message_id)
        except JobError as error:  # not known: the message is handled (never lost)
            log.warning("published-record of %s not read: %s", received.message.message_id, error)
            return False
        if found is None:
            return False
        log.info(
            "message %s: its result (job %s %s) was published by an earlier delivery; acked",
            received.message.message_id,
            found.get("jobId"),
            found.get("status"),
        )
        self.acknowledge(received, keeper)
        self.outcomes.append(EXIT_OK)
        return True


class Drainer:
    """One drain process: its clients, its model cache and the track finishing in the
    background while the next separates, the state every step of a batch shares (pull, fetch
    ahead, handle, finish, conclude)."""

    def __init__(self, settings):
        self.settings = settings
        self.cancel = Cancel()
        self.subscriber = pubsub_v1.SubscriberClient()
        self.subscription = resource_path(
            settings.gcp_project_id, "subscriptions", settings.pubsub_subscription
        )
        self.publisher = runtime.results_publisher(settings)
        self.storage = runtime.make_storage(settings, restrict_inputs=True)
        self.model_cache = None
        limit = functools.cache(
            lambda: dead_letter_limit(
                self.subscriber, self.subscription, settings.max_delivery_attempts
            )
        )
        self.concluder = Concluder(self.publisher, self.storage, limit)
        self.outcomes = self.concluder.outcomes
        self.finishing = None  # ((release, track), thread) of the track finishing
        self.finish_error = None

    def job(self, request, earlier: int | None = None):
        # imported on the first message, not at start: torch costs seconds, and an
        # empty-queue job must exit in seconds
        from job.pipeline import Job
        from job.separation.model import ModelCache

        if self.model_cache is None:
            self.model_cache = ModelCache(self.settings)
        return Job(
            self.settings,
            self.storage,
            self.model_cache,
            self.cancel,
            runtime.progress_reporter(self.settings, request),
            attempt=earlier,
        )

    def fetch_ahead(self, current, later):
        """Start downloading and decoding the next valid message's track (another track than
        `current`'s: a duplicate must find the first one's stems, not fetch again)."""
        for delivery in later:
            request = delivery.request
            if request is not None:
                if (request.release_id, request.track_id) == (current.release_id, current.track_id):
                    return None
                earlier = earlier_deliveries(delivery.received)
                return self.job(request, earlier).fetch(request, ahead=True)
        return None

    def handle(self, delivery: Delivery, keeper: LeaseKeeper, fetch=None) -> None:
        """Separate this message's track, then finish it (encoders' tail, upload, result, ack)
        in a thread of its own while the next message separates: the model never waits for
        them. One track finishes at a time, so results and acks keep the messages' order."""
        received, request = delivery.received, delivery.request
        log.info(
            "message %s (delivery attempt %s)",
            received.message.message_id,
            delivery_attempt(received),
        )
        if request is None:
            self.settle()
            if not self.concluder.published_before(received, keeper):
                self.concluder.conclude(received, delivery.refusal, keeper)
            return
        if self.finishing is not None and self.finishing[0] == (
            request.release_id,
            request.track_id,
        ):
            self.settle()  # the same track: its set must be complete first
        if self.concluder.published_before(received, keeper):
            return
        from job.pipeline import start  # loaded with the model, see job()

        finishing = start(request, self.job(request, earlier_deliveries(received)), fetch=fetch)
        self.settle()
        thread = threading.Thread(
            target=self._finish,
            args=(finishing, received, keeper),
            name=f"finish-{request.job_id}",
            daemon=True,
        )
        self.finishing = ((request.release_id, request.track_id), thread)
        thread.start()

    def _finish(self, finishing, received, keeper) -> None:
        try:
            self.concluder.conclude(received, finishing.result(), keeper)
        except BaseException as exc:  # raised in the main thread by settle()
            self.finish_error = exc

    def settle(self) -> None:
        """Wait until the track finishing (if any) has its result published and acked."""
        if self.finishing is not None:
            self.finishing[1].join()
            self.finishing = None
        error, self.finish_error = self.finish_error, None
        if error is not None:
            raise error

    def run_batch(self, batch, keeper: LeaseKeeper) -> None:
        deliveries = [Delivery.parse(received) for received in batch]
        stopped = None  # why the rest of the batch goes back unstarted
        try:
            self.handle_all(deliveries, keeper)
        except ConfigError as error:
            stopped = JobError("config", str(error))
            raise
        finally:
            if stopped is None and self.cancel.is_set():
                stopped = Interrupted()
            if stopped is not None:
                self.conclude_last_deliveries(deliveries, keeper, stopped)

    def conclude_last_deliveries(self, deliveries, keeper: LeaseKeeper, stopped: JobError):
        """Messages given back unstarted (SIGTERM, a configuration error) that are on their
        last delivery: this failure is their result, or they would be dead-lettered unheard."""
        held = set(keeper.held_ack_ids())
        for delivery in deliveries:
            received = delivery.received
            if received.ack_id in held and self.concluder.is_last(received):
                ids = messages.salvage_ids(received.message.data)
                result = messages.failed_result(ids, stopped)
                try:
                    self.concluder.conclude(received, result, keeper)
                except ConfigError:
                    pass  # raised already, or about to be

    def handle_all(self, deliveries, keeper: LeaseKeeper) -> None:
        ahead = None  # the Intake of a later message, under way
        try:
            for index, delivery in enumerate(deliveries):
                if self.cancel.is_set():
                    break
                fetch = None
                if ahead is not None and ahead.request is delivery.request:
                    fetch, ahead = ahead, None
                if delivery.request is not None and ahead is None:
                    ahead = self.fetch_ahead(delivery.request, deliveries[index + 1 :])
                self.handle(delivery, keeper, fetch)
        finally:
            try:
                self.settle()  # the last track's result, before the lease ends
            finally:
                if ahead is not None:  # SIGTERM or config error: drop its scratch
                    ahead.close()

    def run(self) -> int:
        wanted = self.settings.max_messages
        runtime.preflight(self.settings, self.storage, self.publisher)
        with LeaseKeeper(self.subscriber, self.subscription, LEASE_S) as keeper:
            while len(self.outcomes) < wanted and not self.cancel.is_set():
                batch = pull(
                    self.subscriber,
                    self.subscription,
                    wanted - len(self.outcomes),
                    self.settings.idle_timeout_s,
                )
                if not batch:
                    break
                keeper.hold(batch)
                self.run_batch(batch, keeper)
            # leaving the keeper nacks whatever is still held (SIGTERM, ConfigError)
        if self.cancel.is_set():
            return EXIT_RETRY
        if not self.outcomes:
            log.info("no message within %.0f s: nothing to do", self.settings.idle_timeout_s)
        return max(self.outcomes, default=EXIT_OK)


def drain(settings) -> int:
    """Drain PUBSUB_SUBSCRIPTION; the exit code (ConfigError is left to the caller: exit 78)."""
    if not settings.gcp_project_id:
        raise ConfigError("GCP_PROJECT_ID is required to drain a Pub/Sub subscription")
    drainer = Drainer(settings)
    runtime.on_sigterm(drainer.cancel)
    try:
        return drainer.run()
    except JobError as error:  # Pub/Sub unreachable, or a setting or role of ours is wrong
        if error.is_config:
            raise ConfigError(error.message) from error
        log.error("drain stopped: %s (%s)", error.message, error.code)
        return EXIT_RETRY
