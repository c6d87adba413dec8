"""At most one job execution per Pub/Sub message, across dispatcher instances.

Pub/Sub delivers at least once, and a redelivery keeps its messageId. Before starting a job the
dispatcher claims a marker named after the messageId, created only if absent (GCS
`if_generation_match=0`), and records the execution in it afterwards. A marker that is no longer
a bare claim (started, or closed by the sweep) is terminal for that messageId: a redelivery,
however late, starts nothing. Only a claim left by a crashed dispatcher, with no execution, is
taken over (generation match again) once it is older than the claim TTL. Without a bucket,
markers live in process memory, which protects one instance only.

A started execution also gets an open entry under `open/`, holding the message, which the sweep
(sweep.py) lists and deletes once the message has its result: the sweep's listing is bounded by
the executions still open, not by every message the dispatcher ever saw.
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
OPEN = "open/"  # the key prefix of the open entries
TRIES = 3  # marker writes per step before the step gives up


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

    def list_open(self, after: str = "", limit: int = 100):
        """[(key, doc, generation)] of up to `limit` open entries whose key sorts after `after`."""
        with self._lock:
            keys = sorted(k[len(OPEN) :] for k in self._items if k.startswith(OPEN))
            chosen = [k for k in keys if k > after][:limit]
            return [(k, dict(self._items[OPEN + k][0]), self._items[OPEN + k][1]) for k in chosen]

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
        return self._download(blob)

    @staticmethod
    def _download(blob):
        """(doc, generation) of the generation listed or read; None once it is gone or
        rewritten (a 412: another writer got there first, the next listing sees its version)."""
        generation = blob.generation  # read before the download, which resets properties
        try:
            raw = blob.download_as_bytes(if_generation_match=generation)
        except (NotFound, PreconditionFailed):
            return None
        try:
            doc = json.loads(raw)
        except ValueError:
            doc = {}
        return (doc if isinstance(doc, dict) else {}), generation

    def list_open(self, after: str = "", limit: int = 100):
        """[(key, doc, generation)] of up to `limit` open entries whose key sorts after `after`:
        one listing page of the open prefix, resumable from the last key a sweep reached."""
        prefix = f"{self.prefix}{OPEN}"
        blobs = self.client.list_blobs(
            self.bucket,
            prefix=prefix,
            start_offset=f"{prefix}{after}.json\x00" if after else None,
            max_results=limit,
        )
        found = []
        for blob in blobs:
            key = blob.name[len(prefix) :].removesuffix(".json")
            if key > after and (current := self._download(blob)):
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


def persistently(step, what: str):
    """`step()` tried TRIES times over transient faults; the last fault is raised."""
    for attempt in range(TRIES):
        try:
            return step()
        except Exception as exc:
            if attempt == TRIES - 1:
                raise
            log.warning("%s failed (try %d), trying again: %s", what, attempt + 1, exc)
            time.sleep(0.2 * (attempt + 1))
    return None


class Claims:
    """Claim, release, record and close on top of a marker store (MemoryMarkers, GcsMarkers)."""

    def __init__(self, markers, ttl_s: float):
        self.markers = markers
        self.ttl_s = ttl_s

    def claim(self, key, job_id, message=None, find=None) -> Claim:
        """Claim `key` for a new execution. A stale claim is taken over only once `find(key,
        claimed_at)` (the Admin API's executions) says its dispatcher started nothing."""
        doc = {"state": "claimed", "jobId": job_id, "claimedAt": time.time(), "message": message}
        for _ in range(3):
            generation = self.markers.create(key, doc)
            if generation is not None:
                return Claim(generation)
            current = self.markers.read(key)
            if current is None:
                continue  # released meanwhile: claim again
            existing, generation = current
            if existing.get("state") != "claimed":
                return Claim(started=existing)  # started or closed: terminal for this message
            claimed_at = existing.get("claimedAt")
            if isinstance(claimed_at, (int, float)) and time.time() - claimed_at < self.ttl_s:
                break
            opened = self.markers.read(OPEN + key)
            if opened is not None:  # started, though the marker missed its record
                return Claim(started=opened[0])
            found = find(key, claimed_at or 0.0) if find else None
            if found is not None:  # its dispatcher died after run_job: record what it started
                execution, max_retries = found
                job = existing.get("jobId")
                if not self.record(
                    key, generation, job, execution, existing.get("message"), max_retries
                ):
                    raise RuntimeError(f"could not record {execution} for message {key}")
                return Claim(started={"jobId": job, "execution": execution})
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

    def record(self, key, generation, job_id, execution, message=None, max_retries=None) -> bool:
        """The open entry (what the sweep lists), then the marker; each write tried again over
        transient faults. False when the entry could not be written: the marker is then left a
        claim, which a redelivery resolves once it is stale (claim's `find`)."""
        doc = {
            "state": "started",
            "jobId": job_id,
            "execution": execution,
            "startedAt": time.time(),
            "message": message,
            "maxRetries": max_retries,
        }
        try:
            persistently(lambda: self.markers.create(OPEN + key, doc), f"opening {key}")
        except Exception as exc:
            log.error("could not open the entry of %s for %s: %s", execution, key, exc)
            return False
        try:
            if persistently(lambda: self.markers.replace(key, doc, generation), key) is None:
                log.warning("claim for message %s changed while starting %s", key, execution)
        except Exception as exc:  # the open entry stands for it (claim reads it)
            log.warning("could not record %s for message %s: %s", execution, key, exc)
        return True

    def close(self, key, generation, doc, outcome: str) -> bool:
        """The message has its result: the marker says so, the open entry goes. False when the
        entry changed since it was read (another sweep has it)."""
        marker = self.markers.read(key)
        closed = {**doc, "state": "ended", "outcome": outcome, "endedAt": time.time()}
        if marker is None:
            self.markers.create(key, closed)  # the record never reached it
        elif marker[0].get("state") != "ended":
            self.markers.replace(key, closed, marker[1])
        return self.markers.delete(OPEN + key, generation)
