"""Pytest fixtures that run the real local stand-ins for Pub/Sub and Cloud Storage.

The emulators start once per session on free loopback ports (a few seconds) and stop at the end;
each test gets its own uniquely named topics, subscriptions and bucket, so tests never see each
other's messages or objects. The process handling lives in hack/emulators.py, shared with the
`hack/stand-ins` script. Clients from these fixtures are bound to the emulators explicitly;
os.environ is left alone, and subprocesses get `emulator.env`.
"""

import re
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "hack"))
from emulators import GcsEmulator, PubSubEmulator, ensure_bucket, ensure_subscription, ensure_topic  # noqa: E402

__all__ = [
    "pubsub_emulator",
    "gcs_emulator",
    "unique_name",
    "make_topic",
    "make_subscription",
    "bucket",
    "Subscription",
]

PROJECT = "stem-test"


@pytest.fixture(scope="session")
def pubsub_emulator(tmp_path_factory):
    """Google's Pub/Sub emulator: .host, .project, .env, .publisher, .subscriber."""
    with PubSubEmulator(tmp_path_factory.mktemp("pubsub-emulator"), PROJECT).start() as emulator:
        yield emulator


@pytest.fixture(scope="session")
def gcs_emulator(tmp_path_factory):
    """fake-gcs-server: .url, .env, .client(), .kill(), .restart() (same port, data kept)."""
    with GcsEmulator(tmp_path_factory.mktemp("gcs-emulator")).start() as emulator:
        yield emulator


@pytest.fixture
def unique_name(request):
    """unique_name("topic") -> "topic-<test name>-<random>": valid for topics, subscriptions
    and buckets (lowercase, 3 to 63 characters)."""
    test = re.sub(r"[^a-z0-9]+", "-", request.node.name.lower()).strip("-")[:30]

    def make(prefix: str) -> str:
        return f"{prefix}-{test}-{uuid.uuid4().hex[:8]}".strip("-")[:63]

    return make


@dataclass(frozen=True)
class Subscription:
    topic: str  # full topic path
    path: str  # full subscription path
    dead_letter_topic: str | None = None


@pytest.fixture
def make_topic(pubsub_emulator, unique_name):
    def make(prefix: str = "topic") -> str:
        return ensure_topic(pubsub_emulator.publisher, PROJECT, unique_name(prefix))

    return make


@pytest.fixture
def make_subscription(pubsub_emulator, unique_name, make_topic):
    """make_subscription(topic=None, ack_deadline_s=10, dead_letter=False, max_delivery_attempts=5)
    -> Subscription on a new topic (or the given one), with a dead-letter topic when asked."""

    def make(
        topic: str | None = None,
        ack_deadline_s: int = 10,
        dead_letter: bool = False,
        max_delivery_attempts: int = 5,
    ) -> Subscription:
        topic = topic or make_topic()
        dead = make_topic("dead") if dead_letter else None
        path = ensure_subscription(
            pubsub_emulator.subscriber,
            PROJECT,
            unique_name("sub"),
            topic,
            ack_deadline_s,
            dead,
            max_delivery_attempts,
        )
        return Subscription(topic, path, dead)

    return make


@pytest.fixture
def bucket(gcs_emulator, unique_name) -> str:
    """The name of a new, empty bucket in the storage emulator."""
    name = unique_name("b")
    ensure_bucket(gcs_emulator.client(PROJECT), name)
    return name
