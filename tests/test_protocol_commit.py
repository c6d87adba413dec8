"""The storage commit protocol and the drain's conclusion, checked over their state space.

Hypothesis' stateful testing drives the real writers (job/storage/commit.py's GcsCommit, with
GcsStorage's own `read_manifest` and published-records) and the real `Concluder` of
job/drain.py through random interleavings. The one fake is the bucket under them, which
answers as Cloud Storage does: every object has a generation, every write and delete may be
conditioned on one (0: must not exist) and fails with 412 otherwise.

Writers run in threads that stop before each bucket operation; a rule lets one writer make
exactly one operation, so the machine chooses the interleaving (claims, stem uploads, manifest
writes, a stale writer whose claim was taken over, a writer killed midway, failed uploads, a
re-uploaded original). After every step:

- `manifest.json`, when it exists, is never a claim; when every generation it names is the
  object's, those objects hold its own writer's bytes for exactly its outputs (a whole set);
  otherwise (the one window, job/storage/commit.py) its writer's claim has been taken over and
  `read_manifest` refuses it;
- a writer that completed was answered with a set for its own request.

Deliveries of one message, up to the dead-letter limit, go through the `Concluder` with a
publish, a published-record, an ack that may each fail: a message never gets two results (unless
the record and the ack both failed: the documented window), and once acked or dead-lettered it
has exactly one (unless the publish failed on its last delivery).

`hack/protocol-check` runs many more examples with a seed.
"""

import threading
import types

from google.api_core import exceptions
from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from job import manifest as manifests
from job.drain import Concluder
from job.errors import ConfigError, JobError
from job.messages import STEMS
from job.storage.base import CLAIM, MANIFEST
from job.storage.gcs import GcsStorage

ORIGINAL = "uploads/rel/song.flac"
PREFIX = "stems/rel/trk/"
CHOICES = (tuple(STEMS), ("vocals",), ("vocals", "drums"))


class Killed(BaseException):
    """A writer's SIGKILL: it stops where it is, no handler runs any more of its code."""


class Bucket:
    """Objects by name: (generation, data). Preconditions as Cloud Storage checks them."""

    def __init__(self):
        self.objects = {}
        self.stale = set()  # generations of manifests written while their writer's claim was lost
        self.next_generation = 1000
        self.failing = False  # the next write fails (503), once

    def get(self, name):
        return self.objects.get(name)

    def generation(self, name) -> int:
        return self.objects.get(name, (0, None))[0]

    def check(self, name, expected) -> None:
        if self.failing:
            self.failing = False
            raise JobError("storage_unavailable", f"{name}: 503", retryable=True)
        if expected is not None and self.generation(name) != expected:
            error = JobError("storage_error", f"{name}: 412")  # as job/faults.py makes it
            error.__cause__ = exceptions.PreconditionFailed("412")
            raise error

    def write(self, name, data, expected) -> int:
        self.check(name, expected)
        self.next_generation += 1
        if name.endswith(MANIFEST):
            claim = self.objects.get(name[: -len(MANIFEST)] + CLAIM, (0, {}))[1]
            if claim.get("writer") != data.get("writer"):
                self.stale.add(self.next_generation)
        self.objects[name] = (self.next_generation, data)
        return self.next_generation

    def delete(self, name, expected) -> bool:
        try:
            self.check(name, expected)
        except JobError as error:
            if error.__cause__ is None:
                raise
            return name not in self.objects
        self.objects.pop(name, None)
        return True


class Gate:
    """Where a writer thread waits before each bucket operation until the machine lets it go."""

    def __init__(self):
        self.go = threading.Semaphore(0)
        self.parked = threading.Semaphore(0)
        self.kill = self.fail = self.finished = False

    def enter(self) -> None:
        self.parked.release()
        self.go.acquire()
        if self.kill:
            raise Killed()
        if self.fail:
            self.fail = False
            raise JobError("storage_unavailable", "503 on this request", retryable=True)


GATES = threading.local()


def gate() -> None:
    if (current := getattr(GATES, "gate", None)) is not None:
        current.enter()


class BucketStorage(GcsStorage):
    """GcsStorage over the fake bucket: its object primitives replaced, everything the commit
    protocol and the drain build on them (`read_manifest`, published-records, prefixes,
    URLs) its own."""

    def __init__(self, bucket: Bucket):
        self.fake = bucket
        self.bucket = types.SimpleNamespace(name="fake")
        self.retry_deadline_s = 0

    def generation(self, name: str) -> int:
        gate()
        return self.fake.generation(name)

    def generations(self, prefix: str) -> dict:
        gate()
        return {n: g for n, (g, _) in self.fake.objects.items() if n.startswith(prefix)}

    def upload(self, name, source, if_generation_match=None) -> int:
        gate()
        return self.fake.write(name, str(source), if_generation_match)

    @staticmethod
    def upload_all(uploads: dict) -> dict:
        return {name: upload() for name, upload in uploads.items()}

    def put_json(self, name, body, if_generation_match) -> int:
        gate()
        return self.fake.write(name, dict(body), if_generation_match)

    def download_json(self, name):
        gate()
        found = self.fake.get(name)
        return (dict(found[1]), found[0]) if found and isinstance(found[1], dict) else None

    def delete(self, name, if_generation_match) -> bool:
        gate()
        return self.fake.delete(name, if_generation_match)

    def check_input_unchanged(self, identity) -> None:
        gate()
        if self.fake.generation(ORIGINAL) != identity["generation"]:
            raise JobError("input_changed", "the original was replaced", retryable=True)


def body(job: str, generation: int, outputs) -> dict:
    return {
        "version": manifests.VERSION,
        "jobId": job,
        "input": {"uri": f"gs://fake/{ORIGINAL}", "generation": generation},
        "model": "htdemucs_6s",
        "format": "mp3",
        "bitrate": "320k",
        "outputs": list(outputs),
        "stems": {name: {"url": f"u/{name}", "file": f"{name}.mp3"} for name in outputs},
    }


class Writer:
    """One job's turn at the track, in a thread of its own, one bucket operation per step."""

    def __init__(self, bucket: Bucket, number: int, outputs):
        self.job, self.outputs, self.gate = f"job{number}", outputs, Gate()
        self.storage = BucketStorage(bucket)
        self.outcome = None  # ("completed", manifest, own body) / ("error", code) / ("killed",)
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()
        self.gate.parked.acquire()

    def run(self) -> None:
        GATES.gate = self.gate
        try:
            gate()
            ours = body(self.job, self.storage.fake.generation(ORIGINAL), self.outputs)
            with self.storage.commit("rel", "trk") as commit:
                files = {name: f"/{self.job}/{name}.mp3" for name in self.outputs}
                commit.write_stems({k: PathLike(v) for k, v in files.items()})
                standing = commit.write_manifest(ours)
            self.outcome = ("completed", standing, ours)
        except JobError as error:
            self.outcome = ("error", error.code)
        except Killed:
            self.outcome = ("killed",)
        finally:
            self.gate.finished = True
            self.gate.parked.release()

    def step(self, kill=False, fail=False) -> None:
        self.gate.kill, self.gate.fail = kill, fail
        self.gate.go.release()
        self.gate.parked.acquire()
        if self.gate.finished:
            self.thread.join(5)


class PathLike(str):
    """A stem's local path, as the writer needs it: its file name."""

    @property
    def name(self) -> str:
        return self.rsplit("/", 1)[1]


class CommitProtocol(RuleBasedStateMachine):
    def __init__(self):
        super().__init__()
        self.bucket = Bucket()
        self.bucket.write(ORIGINAL, "original one", None)
        self.writers = []
        self.reader = BucketStorage(self.bucket)

    def teardown(self):
        for writer in self.writers:
            if not writer.gate.finished:
                writer.step(kill=True)

    def running(self) -> list:
        return [w for w in self.writers if not w.gate.finished]

    @precondition(lambda self: len(self.writers) < 4)
    @rule(outputs=st.sampled_from(CHOICES))
    def start_a_writer(self, outputs):
        self.writers.append(Writer(self.bucket, len(self.writers), outputs))

    @precondition(lambda self: self.running())
    @rule(
        pick=st.integers(0, 3),
        times=st.integers(1, 8),
        then=st.sampled_from(["step"] * 6 + ["fail", "kill"]),
    )
    def step_a_writer(self, pick, times, then):
        """`times` bucket operations of one writer, the last of them failed (503) or its
        process killed when `then` says so."""
        running = self.running()
        writer = running[pick % len(running)]
        for left in range(times, 0, -1):
            if writer.gate.finished:
                break
            writer.step(kill=left == 1 and then == "kill", fail=left == 1 and then == "fail")
            self.check_completed(writer)

    @rule()
    def reupload_the_original(self):
        self.bucket.write(ORIGINAL, "original again", None)

    def check_completed(self, writer) -> None:
        if writer.gate.finished:
            kind = writer.outcome[0]
            event(f"a writer ended: {kind} {writer.outcome[1] if kind == 'error' else ''}")
        if writer.outcome and writer.outcome[0] == "completed":
            _, standing, ours = writer.outcome
            assert manifests.same_request(standing, ours), (standing, ours)
        if writer.outcome and writer.outcome[0] == "error":
            assert writer.outcome[1] in ("concurrent_write", "storage_unavailable", "input_changed")

    @invariant()
    def manifest_json_is_a_whole_set_or_the_window(self):
        """A manifest written under its writer's claim names a whole set for as long as it
        exists; one written after the claim was taken over (the window) is refused by
        `read_manifest` as soon as an object it names was replaced."""
        found = self.bucket.get(PREFIX + MANIFEST)
        if found is None:
            return
        generation, manifest = found
        event("manifest.json exists")
        assert isinstance(manifest, dict) and "claim" not in manifest, manifest
        named = manifest["objectGenerations"]
        assert set(named) == {PREFIX + f"{o}.mp3" for o in manifest["outputs"]}, manifest
        whole = all(self.bucket.generation(name) == g for name, g in named.items())
        if generation in self.bucket.stale:
            event("the window: a manifest written after its writer's claim was taken over")
        else:
            assert whole, ("a manifest written under its claim lost its set", manifest)
        if whole:
            for name in named:
                data = self.bucket.get(name)[1]
                assert data.startswith(f"/{manifest['jobId']}/"), (name, data, manifest)
            assert self.reader_sees() == manifest
        else:
            assert self.reader_sees() is None

    def reader_sees(self):
        GATES.gate = None
        return self.reader.read_manifest("rel", "trk")


class FakePublisher:
    def __init__(self):
        self.published, self.failing = [], False

    def publish_result(self, result: dict) -> None:
        if self.failing:
            raise JobError("pubsub_unavailable", "results topic unreachable")
        self.published.append(result)


class FakeKeeper:
    def __init__(self):
        self.acked = self.nacked = 0
        self.failing = False

    def ack(self, received) -> None:
        if self.failing:
            raise JobError("pubsub_unavailable", "acknowledge failed")
        self.acked += 1

    def nack(self, received) -> None:
        self.nacked += 1


LAST = 5
RESULTS = {
    "completed": {"jobId": "j", "status": "completed"},
    "bad_input": {
        "jobId": "j",
        "status": "failed",
        "error": {"code": "invalid_message", "message": "bad", "retryable": False},
    },
    "retryable": {
        "jobId": "j",
        "status": "failed",
        "error": {"code": "storage_unavailable", "message": "503", "retryable": True},
    },
    "config": {
        "jobId": "j",
        "status": "failed",
        "error": {"code": "config", "message": "no model", "retryable": True},
    },
}


class Deliveries(RuleBasedStateMachine):
    """One message delivered until it is acked or dead-lettered after the LAST delivery."""

    def __init__(self):
        super().__init__()
        self.bucket = Bucket()
        self.publisher, self.keeper = FakePublisher(), FakeKeeper()
        self.concluder = Concluder(self.publisher, BucketStorage(self.bucket), lambda: LAST)
        self.attempt = 0
        self.acked = self.dead = False
        self.excused = False  # a documented window was used (record and ack both failed)
        self.last_publish_failed = False

    def open(self) -> bool:
        return not (self.acked or self.dead)

    @precondition(open)
    @rule(
        outcome=st.sampled_from(sorted(RESULTS)),
        publish_fails=st.booleans(),
        record_fails=st.booleans(),
        ack_fails=st.booleans(),
    )
    def deliver(self, outcome, publish_fails, record_fails, ack_fails):
        GATES.gate = None
        self.attempt += 1
        received = types.SimpleNamespace(
            message=types.SimpleNamespace(message_id="m1"), delivery_attempt=self.attempt
        )
        self.publisher.failing, self.keeper.failing = publish_fails, ack_fails
        before = (len(self.publisher.published), self.keeper.acked)
        try:
            if not self.concluder.published_before(received, self.keeper):
                self.bucket.failing = record_fails  # the record's write, after the publish
                self.concluder.conclude(received, dict(RESULTS[outcome]), self.keeper)
        except ConfigError:
            pass  # the drain stops; the message was concluded or given back before
        self.bucket.failing = False
        published = len(self.publisher.published) > before[0]
        if published and record_fails and ack_fails:
            self.excused = True
        self.acked = self.keeper.acked > before[1]  # a failed ack: Pub/Sub delivers it again
        if not self.acked and self.attempt >= LAST:
            self.dead = True
            self.last_publish_failed = publish_fails

    @rule()
    def time_passes(self):
        """Nothing is delivered (the message may be settled already)."""

    @invariant()
    def never_two_results(self):
        assert len(self.publisher.published) <= 1 or self.excused, self.publisher.published

    @invariant()
    def one_result_once_settled(self):
        if self.open() or self.excused:
            return
        if self.dead and self.last_publish_failed:
            return  # the results topic unreachable on the last delivery: dead-lettered
        assert len(self.publisher.published) == 1, (self.attempt, self.publisher.published)


BOUNDED = settings(
    max_examples=60,
    stateful_step_count=30,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestCommitProtocol = CommitProtocol.TestCase
TestCommitProtocol.settings = BOUNDED
TestDeliveries = Deliveries.TestCase
TestDeliveries.settings = BOUNDED
