"""The queue module over the wire against Google's Pub/Sub emulator."""

import json
import time

import pytest
from emulators import PubSubEmulator, free_port

from job.errors import EXIT_CONFIG, EXIT_RETRY, JobError, exit_code_for
from job.pubsub import LeaseKeeper, Publisher, delivery_attempt, pull, resource_path


@pytest.fixture
def publisher(pubsub_emulator):
    return pubsub_emulator.publisher


@pytest.fixture
def subscriber(pubsub_emulator):
    return pubsub_emulator.subscriber


def publish(publisher, topic, text="{}"):
    publisher.publish(topic, text.encode()).result(10)


def test_a_result_arrives_as_json_with_job_id_and_status(publisher, subscriber, make_subscription):
    sub = make_subscription()
    result = {
        "jobId": "job-1",
        "releaseId": "r",
        "trackId": "t",
        "status": "completed",
        "stems": {"vocals": "r/t/vocals.mp3"},
    }
    assert Publisher(publisher, sub.topic, deadline_s=5).publish_result(result)
    [received] = pull(subscriber, sub.path, max_messages=10, timeout_s=5)
    assert json.loads(received.message.data) == result
    assert dict(received.message.attributes) == {"jobId": "job-1", "status": "completed"}
    assert delivery_attempt(received) == 0, "0 without a dead-letter policy"


def test_a_result_without_job_id_omits_that_attribute(publisher, subscriber, make_subscription):
    sub = make_subscription()
    Publisher(publisher, sub.topic, deadline_s=5).publish_result(
        {"jobId": None, "status": "failed"}
    )
    [received] = pull(subscriber, sub.path, 1, 5)
    assert dict(received.message.attributes) == {"status": "failed"}


def test_an_empty_subscription_returns_nothing_by_the_idle_timeout(subscriber, make_subscription):
    sub = make_subscription()
    started = time.monotonic()
    assert pull(subscriber, sub.path, max_messages=5, timeout_s=1.5) == []
    assert time.monotonic() - started < 3


def test_pull_returns_as_soon_as_a_batch_arrives(publisher, subscriber, make_subscription):
    sub = make_subscription()
    for n in range(3):
        publish(publisher, sub.topic, json.dumps({"n": n}))
    received = []
    while len(received) < 3:
        received += pull(subscriber, sub.path, max_messages=3, timeout_s=5)
    assert sorted(json.loads(r.message.data)["n"] for r in received) == [0, 1, 2]


def test_lease_keeper_holds_a_message_past_its_ack_deadline(
    publisher, subscriber, make_subscription
):
    sub = make_subscription(ack_deadline_s=10)
    publish(publisher, sub.topic)
    [received] = pull(subscriber, sub.path, 1, 5)
    keeper = LeaseKeeper(subscriber, sub.path, deadline_s=10)
    try:
        keeper.hold([received])
        # Another puller, for 12 s: past the original deadline and past the one `hold` set, so
        # only the keeper's extensions in between keep the message away (10 s is the minimum).
        assert pull(subscriber, sub.path, 1, timeout_s=12) == []
        assert keeper.held_ack_ids() == [received.ack_id]
        keeper.ack(received)
        assert keeper.held_ack_ids() == []
    finally:
        keeper.stop()
    assert pull(subscriber, sub.path, 1, timeout_s=2) == [], "acked: never delivered again"


def test_a_nacked_message_comes_back_at_once(publisher, subscriber, make_subscription):
    sub = make_subscription(ack_deadline_s=60)
    publish(publisher, sub.topic, '{"n": 1}')
    [first] = pull(subscriber, sub.path, 1, 5)
    with LeaseKeeper(subscriber, sub.path, deadline_s=60) as keeper:
        keeper.hold([first])
        keeper.nack(first)
        started = time.monotonic()
        [again] = pull(subscriber, sub.path, 1, 5)
        assert time.monotonic() - started < 2
        assert again.message.message_id == first.message.message_id
        keeper.hold([again])
        keeper.ack(again)


def test_leaving_the_keeper_returns_unfinished_messages(publisher, subscriber, make_subscription):
    """What SIGTERM relies on: nack_all hands every held message to the next job."""
    sub = make_subscription(ack_deadline_s=60)
    for n in range(2):
        publish(publisher, sub.topic, json.dumps({"n": n}))
    batch = []
    while len(batch) < 2:
        batch += pull(subscriber, sub.path, 2, 5)
    with LeaseKeeper(subscriber, sub.path, deadline_s=60) as keeper:
        keeper.hold(batch)
        keeper.ack(batch[0])
    [back] = pull(subscriber, sub.path, 2, 5)
    assert back.message.message_id == batch[1].message.message_id


def test_delivery_attempt_counts_redeliveries_under_a_dead_letter_policy(
    publisher, subscriber, make_subscription
):
    sub = make_subscription(dead_letter=True, max_delivery_attempts=5)
    publish(publisher, sub.topic)
    with LeaseKeeper(subscriber, sub.path) as keeper:
        attempts = []
        for _ in range(3):
            [received] = pull(subscriber, sub.path, 1, 5)
            attempts.append(delivery_attempt(received))
            keeper.hold([received])
            keeper.nack(received)
    assert attempts == [1, 2, 3]


def test_a_missing_topic_is_a_configuration_error_that_keeps_the_message(
    publisher, pubsub_emulator
):
    topic = resource_path(pubsub_emulator.project, "topics", "no-such-topic")
    for call in (lambda p: p.publish({"status": "completed"}), lambda p: p.check()):
        with pytest.raises(JobError) as caught:
            call(Publisher(publisher, topic, deadline_s=2))
        error = caught.value
        assert error.code == "results_topic_not_found" and error.retryable and error.is_config
        assert exit_code_for(error) == EXIT_CONFIG and "PUBSUB_RESULTS_TOPIC" in error.message


def test_an_unreachable_service_is_not_an_empty_queue(tmp_path):
    nobody = PubSubEmulator(tmp_path, project="stem-test", port=free_port())  # never started
    started = time.monotonic()
    with pytest.raises(JobError) as caught:
        pull(nobody.subscriber, "projects/stem-test/subscriptions/stem-separate-worker", 1, 2)
    assert caught.value.code == "pubsub_unavailable" and caught.value.retryable
    assert time.monotonic() - started < 5
    with pytest.raises(JobError) as caught:
        Publisher(
            nobody.publisher,
            "projects/stem-test/topics/stem-results",
            deadline_s=2,
            attempt_timeout_s=1,
        ).publish({})
    assert caught.value.code == "publish_failed" and caught.value.retryable
    assert exit_code_for(caught.value) == EXIT_RETRY


def test_resource_path_keeps_full_paths():
    assert resource_path("p", "subscriptions", "s-1") == "projects/p/subscriptions/s-1"
    assert resource_path("p", "topics", "projects/q/topics/t") == "projects/q/topics/t"
