"""One run's place on the stand-ins: its bucket, topics and subscriptions (uniquely named, so
runs never see each other's), and the few reads and writes that several parts make there."""

import json
import uuid
from dataclasses import dataclass

from emulators import GcsEmulator, PubSubEmulator, ensure_bucket, ensure_subscription, ensure_topic
from gcs_proxy import GcsProxy


@dataclass
class Site:
    pubsub: PubSubEmulator
    gcs: GcsEmulator
    proxy: GcsProxy  # the workers reach the GCS stand-in through it (faults aim at its holds)
    storage: object  # google.cloud.storage.Client bound to the GCS stand-in
    bucket: str
    topic: str  # the work topic and its subscription, dead-lettered to the topic dead_sub reads
    subscription: str
    results_topic: str
    results_sub: str
    dead_sub: str

    @classmethod
    def create(cls, pubsub, gcs, ack_deadline_s: int, max_delivery_attempts: int) -> "Site":
        run = uuid.uuid4().hex[:8]
        project, publisher, subscriber = pubsub.project, pubsub.publisher, pubsub.subscriber
        storage = gcs.client(project)
        ensure_bucket(storage, f"soak-{run}")
        topic = ensure_topic(publisher, project, f"work-{run}")
        dead_topic = ensure_topic(publisher, project, f"dead-{run}")
        results_topic = ensure_topic(publisher, project, f"results-{run}")
        return cls(
            pubsub,
            gcs,
            GcsProxy(gcs.port),
            storage,
            f"soak-{run}",
            topic,
            ensure_subscription(
                subscriber,
                project,
                f"work-sub-{run}",
                topic,
                ack_deadline_s,
                dead_topic,
                max_delivery_attempts,
            ),
            results_topic,
            ensure_subscription(subscriber, project, f"results-sub-{run}", results_topic, 60),
            ensure_subscription(subscriber, project, f"dead-sub-{run}", dead_topic, 60),
        )

    def upload(self, name: str, data: bytes) -> str:
        self.storage.bucket(self.bucket).blob(name).upload_from_string(data)
        return f"gs://{self.bucket}/{name}"

    def listing(self, prefix: str) -> dict:
        """File name -> generation of the objects under `prefix`."""
        return {
            b.name.rsplit("/", 1)[1]: b.generation
            for b in self.storage.list_blobs(self.bucket, prefix=prefix)
        }

    def vouched(self, prefix: str) -> bool:
        """Whether the manifest under `prefix` vouches for a set (not absent, not a claim)."""
        blob = self.storage.bucket(self.bucket).get_blob(prefix + "manifest.json")
        return blob is not None and "claim" not in json.loads(blob.download_as_bytes())

    def take(self, subscription: str, timeout: float) -> list:
        """Pull what `subscription` has (up to 100) and ack it: the received messages."""
        subscriber = self.pubsub.subscriber
        response = subscriber.pull(
            request={"subscription": subscription, "max_messages": 100}, timeout=timeout
        )
        received = response.received_messages
        if received:
            subscriber.acknowledge(
                request={"subscription": subscription, "ack_ids": [r.ack_id for r in received]}
            )
        return received
