"""At most one job execution per Pub/Sub message, across dispatcher instances.

Pub/Sub delivers at least once, and a redelivery keeps its messageId. Before starting a job the
dispatcher claims a marker named after the messageId, created only if absent (GCS
`if_generation_match=0`), and records the execution in it afterwards; a second delivery finds
the marker and starts nothing. A claim left by a crashed dispatcher is taken over (generation
match again) once it is older than the claim TTL. Without a bucket, markers live in process
memory, which protects one instance only.

The one gap left, a run_job call that timed out after Cloud Run had accepted it and is retried,
is closed by the job: its manifest.json check makes a second
execution of a finished track a no-op.

A started marker names its execution and holds the message, so the sweep (sweep.py) can find
executions that ended without a result and report their track. Each marker's state is also
kept in the object's metadata, so the sweep lists the open ones without downloading them all.
"""

import hashlib
import json
import logging
import re
import threading
import time
from dataclasses import dataclass

from google.api_core.exceptions import NotFound, PreconditionFailed
from google.cloud import storage

log = logging.getLogger("stem_job.dispatcher")

SAFE_KEY = re.compile(r"^[A-Za-z0-9_-]{1,200}$")


def marker_key(message_id: str) -> str:
    """Pub/Sub message IDs are digits; anything else is hashed into a safe object name."""
    if SAFE_KEY.match(message_id):
        return message_id
    return "h-" + hashlib.sha256(message_id.encode()).hexdigest()


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

    def list(self, states):
        """[(key, doc, generation)] of the markers whose state is in `states`."""
        with self._lock:
            return [
                (key, dict(doc), generation)
                for key, (doc, generation) in self._items.items()
                if doc.get("state") in states
            ]

    def _put(self, key, doc):
        self._generation += 1
        self._items[key] = (dict(doc), self._generation)
        return self._generation


class GcsMarkers:
    """Markers as small JSON objects under gs://BUCKET/PREFIX; GCS generation preconditions make
    create/replace/delete atomic across dispatcher instances."""

    def __init__(self, bucket: str, prefix: str = "dispatch/", client=None):
        self.client = client or storage.Client()
        self.bucket = self.client.bucket(bucket)
        self.prefix = prefix

    def _blob(self, key):
        return self.bucket.blob(f"{self.prefix}{key}.json")

    def _write(self, key, doc, generation):
        blob = self._blob(key)
        blob.metadata = {"state": str(doc.get("state", ""))}
        try:
            blob.upload_from_string(
                json.dumps(doc), content_type="application/json", if_generation_match=generation
            )
        except PreconditionFailed:
            return None
        return blob.generation

    def create(self, key, doc):
        return self._write(key, doc, 0)

    def replace(self, key, doc, generation):
        return self._write(key, doc, generation)

    def read(self, key):
        blob = self.bucket.get_blob(f"{self.prefix}{key}.json")
        if blob is None:
            return None
        generation = blob.generation  # read before the download, which resets properties
        try:
            raw = blob.download_as_bytes(if_generation_match=generation)
        except NotFound:
            return None
        try:
            doc = json.loads(raw)
        except ValueError:
            doc = {}
        return (doc if isinstance(doc, dict) else {}), generation

    def list(self, states):
        """[(key, doc, generation)] of the markers whose state (object metadata) is in `states`."""
        found = []
        for blob in self.client.list_blobs(self.bucket, prefix=self.prefix):
            key = blob.name[len(self.prefix) :].removesuffix(".json")
            if (blob.metadata or {}).get("state") in states and (current := self.read(key)):
                found.append((key, *current))
        return found

    def delete(self, key, generation):
        try:
            self._blob(key).delete(if_generation_match=generation)
        except (NotFound, PreconditionFailed):
            return False
        return True


@dataclass(frozen=True)
class Claim:
    """What claiming a message found: `generation` when the claim is ours, `started` (the
    marker) when another delivery already started its job, neither while another holds it."""

    generation: int | None = None
    started: dict | None = None


class Claims:
    """Claim, release and record on top of a marker store (MemoryMarkers or GcsMarkers)."""

    def __init__(self, markers, ttl_s: float):
        self.markers = markers
        self.ttl_s = ttl_s

    def claim(self, key, job_id) -> Claim:
        doc = {"state": "claimed", "jobId": job_id, "claimedAt": time.time()}
        for _ in range(3):
            generation = self.markers.create(key, doc)
            if generation is not None:
                return Claim(generation)
            current = self.markers.read(key)
            if current is None:
                continue  # released meanwhile: claim again
            existing, generation = current
            if existing.get("state") == "started":
                return Claim(started=existing)
            claimed_at = existing.get("claimedAt")
            if isinstance(claimed_at, (int, float)) and time.time() - claimed_at < self.ttl_s:
                break
            generation = self.markers.replace(key, doc, generation)  # take over a stale claim
            if generation is not None:
                log.warning("took over a stale claim for message %s", key)
                return Claim(generation)
        return Claim()

    def release(self, key, generation) -> None:
        try:
            self.markers.delete(key, generation)
        except Exception as exc:  # the claim then goes stale and is taken over after the TTL
            log.warning("could not release the claim for message %s: %s", key, exc)

    def record(self, key, generation, job_id, execution, message: dict | None = None) -> None:
        doc = {
            "state": "started",
            "jobId": job_id,
            "execution": execution,
            "startedAt": time.time(),
            "message": message,
        }
        try:
            if self.markers.replace(key, doc, generation) is None:
                log.warning("claim for message %s changed while starting %s", key, execution)
        except Exception as exc:
            log.warning("could not record %s for message %s: %s", execution, key, exc)
