"""`stem-job drain`: pull a batch from the subscription, process it message by message, exit.

A message is acked only after its result is published; a bad message gets a `failed` result
and an ack (it will never get better); a fault where a retry may help is nacked at once so
another job takes it. Nothing heavy (torch, the model) is loaded before a message arrives:
KEDA's lagging metric starts jobs that find the queue empty, and those must cost seconds.
"""

import logging
import signal

from google.cloud import pubsub_v1

from . import messages
from .errors import Cancel, EXIT_BAD_INPUT, EXIT_OK, EXIT_RETRY, JobError
from .pubsub import LeaseKeeper, Publisher, delivery_attempt, pull, resource_path

log = logging.getLogger(__name__)
LEASE_S = 60


def results_publisher(settings, deadline_s: float | None = None):
    deadline_s = settings.retry_deadline_s if deadline_s is None else deadline_s
    topic = resource_path(settings.gcp_project_id, "topics", settings.pubsub_results_topic)
    return Publisher(pubsub_v1.PublisherClient(), topic, deadline_s=deadline_s)


def progress_reporter(settings, request):
    """Throttled `processing` events (PROGRESS_EVENTS); a lost one is only logged."""
    if not settings.progress_events:
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


class Drainer:
    def __init__(self, settings):
        from .cli import make_storage
        self.settings = settings
        self.cancel = Cancel()
        self.subscriber = pubsub_v1.SubscriberClient()
        self.subscription = resource_path(settings.gcp_project_id, "subscriptions",
                                          settings.pubsub_subscription)
        self.publisher = results_publisher(settings)
        self.storage = make_storage(settings, restrict_inputs=True)
        self.engine = None
        self.outcomes = []

    def job(self, request):
        from .pipeline import Engine, Job
        if self.engine is None:
            self.engine = Engine(self.settings)
        return Job(self.settings, self.storage, self.engine, self.cancel,
                   progress_reporter(self.settings, request))

    def parse(self, received):
        """(received, request) or (received, failed result) for a message that is not valid."""
        try:
            return received, messages.parse_message(received.message.data)
        except JobError as error:
            return received, messages.failed_result(messages.salvage_ids(received.message.data),
                                                    error)

    def fetch_ahead(self, current, parsed):
        """Start downloading and decoding the next valid message's track (another track than
        `current`'s: a duplicate must find the first one's stems, not fetch again)."""
        from .pipeline import Fetch
        for _, request in parsed:
            if isinstance(request, messages.JobRequest):
                if (request.release_id, request.track_id) == (current.release_id, current.track_id):
                    return None
                return Fetch(request, self.job(request), ahead=True)
        return None

    def handle(self, received, request, keeper: LeaseKeeper, fetch=None) -> None:
        log.info("message %s (delivery attempt %s)", received.message.message_id,
                 delivery_attempt(received))
        if isinstance(request, dict):            # not a valid message: its failed result
            result = request
        else:
            from .pipeline import process
            job = fetch.job if fetch is not None else self.job(request)
            result = process(request, job, fetch=fetch)
        error = result.get("error")
        if error and error["retryable"]:
            keeper.nack(received)            # not finished: another job takes it at once
            self.outcomes.append(EXIT_RETRY)
            return
        try:
            self.publisher.publish_result(result)
        except JobError as failure:
            log.error("result of %s not published, returning the message: %s",
                      result.get("jobId"), failure.message)
            keeper.nack(received)
            self.outcomes.append(EXIT_RETRY)
            return
        keeper.ack(received)
        self.outcomes.append(EXIT_BAD_INPUT if error else EXIT_OK)

    def run_batch(self, batch, keeper: LeaseKeeper) -> None:
        parsed = [self.parse(received) for received in batch]
        ahead = None                         # the Fetch of a later message, under way
        try:
            for index, (received, request) in enumerate(parsed):
                if self.cancel.is_set():
                    break
                fetch = None
                if ahead is not None and ahead.request is request:
                    fetch, ahead = ahead, None
                if isinstance(request, messages.JobRequest) and ahead is None:
                    ahead = self.fetch_ahead(request, parsed[index + 1:])
                self.handle(received, request, keeper, fetch)
        finally:
            if ahead is not None:            # SIGTERM: drop the prefetched track's scratch
                ahead.close()

    def run(self) -> int:
        wanted = self.settings.max_messages
        with LeaseKeeper(self.subscriber, self.subscription, LEASE_S) as keeper:
            while len(self.outcomes) < wanted and not self.cancel.is_set():
                batch = pull(self.subscriber, self.subscription, wanted - len(self.outcomes),
                             self.settings.idle_timeout_s)
                if not batch:
                    break
                keeper.hold(batch)
                self.run_batch(batch, keeper)
            # leaving the keeper nacks whatever is still held (SIGTERM)
        if self.cancel.is_set():
            return EXIT_RETRY
        if not self.outcomes:
            log.info("no message within %.0f s: nothing to do", self.settings.idle_timeout_s)
        return max(self.outcomes, default=EXIT_OK, key=[EXIT_OK, EXIT_BAD_INPUT, EXIT_RETRY].index)


def drain(settings) -> int:
    if not settings.gcp_project_id:
        from .cli import fail_config
        fail_config("GCP_PROJECT_ID is required to drain a Pub/Sub subscription")
    drainer = Drainer(settings)

    def on_sigterm(signum, frame):
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        drainer.cancel.trip()
    signal.signal(signal.SIGTERM, on_sigterm)
    try:
        return drainer.run()
    except JobError as error:     # Pub/Sub itself unreachable
        log.error("drain stopped: %s (%s)", error.message, error.code)
        return EXIT_RETRY
