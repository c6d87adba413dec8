"""A fleet of `stem-job drain` workers against the real stand-ins, under faults, checked from
storage and the results topic: `hack/soak` runs it, tests/test_soak.py runs a small slice.

The supervisor behaves like a KEDA ScaledJob: it keeps up to `workers` drain processes running
(each `--max-messages K`) and starts another when one exits, until every message has its result
and the subscription is drained. A worker frozen by SIGSTOP does not hold a slot (KEDA sees the
redelivered message as backlog and starts a Job for it). Faults come from a seeded plan: SIGKILL
mid-separation and mid-upload, SIGTERM, SIGSTOP past the lease then SIGCONT (two workers race on
one track), the GCS stand-in killed and restarted, the Pub/Sub emulator frozen (SIGSTOP of its
process group: unreachable, state kept; a killed emulator would lose every message, which real
Pub/Sub never does). The verdict never reads a log: only objects, manifests and results.
"""

import argparse
import hashlib
import json
import os
import random
import re
import signal
import statistics
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

HACK = Path(__file__).resolve().parent
REPO = HACK.parent
sys.path[:0] = [p for p in (str(HACK), str(REPO)) if p not in sys.path]

from emulators import GcsEmulator, PubSubEmulator, ensure_bucket, ensure_subscription, ensure_topic  # noqa: E402
from synthetic import music, write_audio, write_model_folder  # noqa: E402

from job.messages import STEMS  # noqa: E402

SET_FILES = 2 * len(STEMS)  # the six stems and their waveform peaks files
LEASE_S = 60  # job/drain.py: a frozen worker's message is back after this
FAULT_KINDS = (
    "sigkill_separation",
    "sigkill_upload",
    "sigterm",
    "sigstop_race",
    "gcs_restart",
    "pubsub_outage",
)
RELEASE = "rel_soak"


@dataclass
class Config:
    workers: int = 2
    max_messages: int = 2
    tracks: int = 44
    duplicates: int = 6  # exact duplicate publishes
    second_jobs: int = 4  # the same track under a second jobId
    reuploads: int = 2  # originals replaced after their first result, then redelivered
    bad: int = 11  # bad messages (up to len(BAD_KINDS))
    faults: dict = field(
        default_factory=lambda: {
            "sigkill_separation": 2,
            "sigkill_upload": 2,
            "sigterm": 1,
            "sigstop_race": 1,
            "gcs_restart": 1,
            "pubsub_outage": 1,
        }
    )
    fault_window_s: float = 150.0  # faults are due at random moments within this
    min_track_s: float = 5.0
    max_track_s: float = 15.0
    seed: int = 0
    max_wall_s: float = 900.0
    ack_deadline_s: int = 10
    max_delivery_attempts: int = 5
    idle_timeout_s: float = 10.0  # IDLE_TIMEOUT_S, the production default
    race_at: str = "random"  # where SIGSTOP hits: separate, upload (stems, no manifest), random


# kind -> (what the message says, the error code its failed result must carry)
BAD_KINDS = [
    ("not_json", "invalid_message"),
    ("json_array", "invalid_message"),
    ("missing_uri", "invalid_message"),
    ("bad_track_id", "invalid_id"),
    ("other_bucket", "input_not_allowed"),
    ("missing_object", "input_not_found"),
    ("pdf", "not_audio"),
    ("empty", "empty_input"),
    ("pdf_mime", "unsupported_media_type"),
    ("http_uri", "invalid_uri"),
    ("too_long", "too_long"),
]
MAX_DURATION_S = 20.0  # the workers' limit; the too_long original is longer


@dataclass
class Message:
    job_id: str | None  # None: unreadable, its result carries no jobId
    payload: bytes
    expect: str  # completed / failed
    code: str | None = None
    track: str | None = None
    published: float = 0.0
    message_id: str = ""


@dataclass
class Worker:
    number: int
    process: subprocess.Popen
    started: float
    phase: str = "start"  # of `message`: start, fetch, separate, idle
    message: Message | None = None  # the message being fetched or separated
    finishing: Message | None = None  # separated, its outputs being uploaded (beside the next)
    stopped: bool = False
    signalled: tuple | None = None  # (signal name, time)
    exit_code: int | None = None
    ended: float = 0.0
    attempts: dict = field(default_factory=dict)  # message_id -> delivery attempt


class Fleet:
    """One soak run: stand-ins, workload, supervisor, faults, verdict."""

    def __init__(
        self,
        config: Config,
        workdir: Path,
        pubsub: PubSubEmulator,
        gcs: GcsEmulator,
        model_dir: Path,
        log=print,
    ):
        self.c = config
        self.workdir = Path(workdir)
        self.pubsub, self.gcs, self.model_dir, self.log = pubsub, gcs, model_dir, log
        self.rng = random.Random(config.seed)
        self.project = pubsub.project
        run = uuid.uuid4().hex[:8]
        self.bucket = f"soak-{run}"
        self.storage = gcs.client(self.project)
        ensure_bucket(self.storage, self.bucket)
        publisher, subscriber = pubsub.publisher, pubsub.subscriber
        self.topic = ensure_topic(publisher, self.project, f"work-{run}")
        self.dead_topic = ensure_topic(publisher, self.project, f"dead-{run}")
        self.results_topic = ensure_topic(publisher, self.project, f"results-{run}")
        self.subscription = ensure_subscription(
            subscriber,
            self.project,
            f"work-sub-{run}",
            self.topic,
            config.ack_deadline_s,
            self.dead_topic,
            config.max_delivery_attempts,
        )
        self.results_sub = ensure_subscription(
            subscriber, self.project, f"results-sub-{run}", self.results_topic, 60
        )
        self.dead_sub = ensure_subscription(
            subscriber, self.project, f"dead-sub-{run}", self.dead_topic, 60
        )
        self.messages: list[Message] = []
        self.by_id: dict[str, Message] = {}
        self.durations: dict[str, list] = {}  # track -> durations of its versions
        self.reupload_tracks: set = set()
        self.reuploaded: dict[str, float] = {}  # track -> when its original was replaced
        self.results: list = []  # (result dict, publish time)
        self.workers: list[Worker] = []
        self.faults: list[dict] = []
        self.lock = threading.Lock()
        self.stop_event = threading.Event()
        self.last_kill = 0.0
        self.misses = 0
        self.threads = []

    # -- workload ------------------------------------------------------------------------
    def upload(self, name: str, data: bytes) -> str:
        self.storage.bucket(self.bucket).blob(name).upload_from_string(data)
        return f"gs://{self.bucket}/{name}"

    def track_audio(self, index: int, version: int) -> tuple:
        seconds = round(self.rng.uniform(self.c.min_track_s, self.c.max_track_s), 1)
        suffix = "flac" if index % 3 == 0 else "mp3"
        path = write_audio(
            self.workdir / "audio" / f"t{index}v{version}.{suffix}",
            music(seconds, seed=self.c.seed * 1000 + index * 10 + version),
        )
        return path, seconds

    def build_workload(self) -> list:
        (self.workdir / "audio").mkdir(parents=True, exist_ok=True)
        good = []
        for index in range(self.c.tracks):
            track = f"trk_{index:03d}"
            path, seconds = self.track_audio(index, 0)
            uri = self.upload(f"originals/{track}{path.suffix}", path.read_bytes())
            self.durations[track] = [seconds]
            good.append(self.good_message(f"job_{index:03d}", track, uri))
        picks = self.rng.sample(
            range(self.c.tracks),
            min(self.c.tracks, self.c.duplicates + self.c.second_jobs + self.c.reuploads),
        )
        dups = picks[: self.c.duplicates]
        seconds = picks[self.c.duplicates : self.c.duplicates + self.c.second_jobs]
        self.reupload_tracks = {good[i].track for i in picks[len(dups) + len(seconds) :]}
        self.replacements = {
            track: self.track_audio(int(track.rsplit("_", 1)[1]), 1)
            for track in sorted(self.reupload_tracks)
        }
        extra = [
            Message(good[i].job_id, good[i].payload, "completed", track=good[i].track) for i in dups
        ]
        for i in seconds:
            payload = json.loads(good[i].payload)
            extra.append(
                self.good_message(
                    payload["jobId"] + "_b", payload["trackId"], payload["originalStemUri"]
                )
            )
        workload = good + extra + self.bad_messages()
        self.rng.shuffle(workload)
        return workload

    @staticmethod
    def good_message(job_id: str, track: str, uri: str) -> Message:
        payload = {
            "jobId": job_id,
            "releaseId": RELEASE,
            "artistId": "art_soak",
            "trackId": track,
            "originalStemUri": uri,
            "mimeType": "audio/mpeg",
        }
        return Message(job_id, json.dumps(payload).encode(), "completed", track=track)

    def bad_messages(self) -> list:
        pdf = self.upload("originals/doc.mp3", b"%PDF-1.4 not audio " * 200)
        empty = self.upload("originals/empty.mp3", b"")
        long_path = write_audio(self.workdir / "audio" / "long.flac", music(MAX_DURATION_S + 5))
        long_uri = self.upload("originals/long.flac", long_path.read_bytes())
        some = f"gs://{self.bucket}/originals/trk_000.mp3"

        def body(job_id, **fields):
            return json.dumps(
                {
                    "jobId": job_id,
                    "releaseId": RELEASE,
                    "trackId": f"t_{job_id}",
                    "originalStemUri": some,
                    **fields,
                }
            ).encode()

        payloads = {
            "not_json": (None, b"{not json"),
            "json_array": (None, b"[1, 2]"),
            "missing_uri": (
                "bad_nouri",
                json.dumps({"jobId": "bad_nouri", "releaseId": RELEASE, "trackId": "t_x"}).encode(),
            ),
            "bad_track_id": ("bad_id", body("bad_id", trackId="../etc")),
            "other_bucket": (
                "bad_bucket",
                body("bad_bucket", originalStemUri="gs://someone-else/x.mp3"),
            ),
            "missing_object": (
                "bad_missing",
                body("bad_missing", originalStemUri=f"gs://{self.bucket}/originals/nothing.mp3"),
            ),
            "pdf": ("bad_pdf", body("bad_pdf", originalStemUri=pdf)),
            "empty": ("bad_empty", body("bad_empty", originalStemUri=empty)),
            "pdf_mime": ("bad_mime", body("bad_mime", mimeType="application/pdf")),
            "http_uri": ("bad_uri", body("bad_uri", originalStemUri="https://example.com/a.mp3")),
            "too_long": ("bad_long", body("bad_long", originalStemUri=long_uri)),
        }
        return [
            Message(payloads[kind][0], payloads[kind][1], "failed", code)
            for kind, code in BAD_KINDS[: self.c.bad]
        ]

    def publish(self, message: Message) -> None:
        message.published = time.time()
        message.message_id = self.pubsub.publisher.publish(self.topic, message.payload).result(60)
        with self.lock:
            self.messages.append(message)
            self.by_id[message.message_id] = message

    def reupload(self, track: str) -> None:
        """Replace a track's original (a new generation), then deliver its message again."""
        original = next(m for m in self.messages if m.track == track and m.expect == "completed")
        uri = json.loads(original.payload)["originalStemUri"]
        path, seconds = self.replacements[track]
        while True:  # the stand-in may be down for a fault right now
            try:
                self.upload(uri.split("/", 3)[3], path.read_bytes())
                break
            except Exception:
                time.sleep(1)
        self.durations[track].append(seconds)
        self.reuploaded[track] = time.time()
        self.log(f"  re-uploaded the original of {track} ({seconds} s), publishing it again")
        while True:
            try:
                return self.publish(
                    Message(original.job_id, original.payload, "completed", track=track)
                )
            except Exception:
                time.sleep(1)

    # -- results -------------------------------------------------------------------------
    def collect_results(self) -> None:
        subscriber = self.pubsub.subscriber
        while not self.stop_event.is_set():
            try:
                response = subscriber.pull(
                    request={"subscription": self.results_sub, "max_messages": 100}, timeout=5
                )
                received = response.received_messages
                if received:
                    subscriber.acknowledge(
                        request={
                            "subscription": self.results_sub,
                            "ack_ids": [r.ack_id for r in received],
                        }
                    )
            except Exception:  # the emulator frozen or busy: try again
                time.sleep(1)
                continue
            for r in received:
                result = json.loads(r.message.data)
                if result.get("status") not in ("completed", "failed"):
                    continue
                with self.lock:
                    self.results.append((result, r.message.publish_time.timestamp()))
                track = result.get("trackId")
                if (
                    result["status"] == "completed"
                    and track in self.reupload_tracks
                    and track not in self.reuploaded
                ):
                    threading.Thread(target=self.reupload, args=(track,), daemon=True).start()
                    self.reuploaded[track] = 0.0  # claimed; set when done

    def complete(self) -> bool:
        """Every message has its result (counted per jobId, unreadable ones per code)."""
        with self.lock:
            want, got = {}, {}
            for m in self.messages:
                key = (m.job_id, m.expect, m.code if m.job_id is None else None)
                want[key] = want.get(key, 0) + 1
            for result, _ in self.results:
                error = result.get("error") or {}
                key = (
                    result.get("jobId"),
                    result["status"],
                    error.get("code") if result.get("jobId") is None else None,
                )
                got[key] = got.get(key, 0) + 1
        pending_reuploads = len(self.reuploaded) < len(self.reupload_tracks) or any(
            t == 0.0 for t in self.reuploaded.values()
        )
        return not pending_reuploads and all(got.get(k, 0) >= n for k, n in want.items())

    # -- workers -------------------------------------------------------------------------
    def worker_env(self) -> dict:
        env = {k: v for k, v in os.environ.items() if k not in ("JOB_MESSAGE", "INPUT_DIR")}
        env.update(
            self.pubsub.env,
            **self.gcs.env,
            PYTHONPATH=str(REPO),
            MODEL_DIR=str(self.model_dir),
            DEVICE="cpu",
            LOG_FORMAT="json",
            PYTHONUNBUFFERED="1",
            STORAGE_MODE="gcs",
            PROCESSING_MODE="pubsub",
            GCS_BUCKET=self.bucket,
            OUTPUT_DIR=str(self.workdir / "unused"),
            PUBSUB_SUBSCRIPTION=self.subscription.rsplit("/", 1)[1],
            PUBSUB_RESULTS_TOPIC=self.results_topic.rsplit("/", 1)[1],
            IDLE_TIMEOUT_S=str(self.c.idle_timeout_s),
            RETRY_DEADLINE_S="60",
            MAX_DURATION_S=str(MAX_DURATION_S),
        )
        return env

    def start_worker(self) -> None:
        number = len(self.workers)
        process = subprocess.Popen(
            [sys.executable, "-m", "job", "drain", "--max-messages", str(self.c.max_messages)],
            env=self.env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            cwd=self.workdir,
        )
        worker = Worker(number, process, time.time())
        self.workers.append(worker)
        thread = threading.Thread(target=self.follow, args=(worker,), daemon=True)
        thread.start()

    def follow(self, worker: Worker) -> None:
        """Track what a worker is doing from its log (only to aim the faults)."""
        with open(self.workdir / "workers" / f"w{worker.number:03d}.log", "w") as out:
            for line in worker.process.stderr:
                out.write(line)
                try:
                    text = json.loads(line).get("message", "")
                except ValueError:
                    text = line
                if match := re.match(r"message (\S+) \(delivery attempt (\d+)\)", text):
                    with self.lock:
                        worker.message = self.by_id.get(match.group(1))
                    worker.attempts[match.group(1)] = int(match.group(2))
                    worker.phase = "fetch"
                elif text.startswith("first window"):
                    worker.phase = "separate"
                elif text.endswith("separated 100%"):
                    # a drain uploads a separated track while it takes the next message
                    worker.finishing, worker.phase = worker.message, "idle"
                elif match := re.match(r"job (\S+) (completed|failed)", text):
                    done = match.group(1).rstrip(":")
                    if worker.finishing is not None and worker.finishing.job_id == done:
                        worker.finishing = None
                    elif worker.message is not None and worker.message.job_id == done:
                        worker.phase = "idle"

    def reap(self) -> None:
        for worker in self.workers:
            if worker.exit_code is None and worker.process.poll() is not None:
                worker.exit_code, worker.ended = worker.process.returncode, time.time()
                if worker.signalled and worker.signalled[0] == "SIGTERM":
                    fault = next(
                        f
                        for f in self.faults
                        if f.get("worker") == worker.number and f["kind"] == "sigterm"
                    )
                    fault["exit_code"] = worker.exit_code
                    fault["exit_after_s"] = round(worker.ended - worker.signalled[1], 1)

    def active(self) -> list:
        return [w for w in self.workers if w.exit_code is None and not w.stopped]

    # -- faults --------------------------------------------------------------------------
    def plan_faults(self) -> list:
        plan = [
            (round(self.rng.uniform(5, self.c.fault_window_s), 1), kind)
            for kind, count in self.c.faults.items()
            for _ in range(count)
        ]
        return sorted(plan)

    def candidates(self, phase: str) -> list:
        if phase == "upload":
            return [w for w in self.active() if w.finishing is not None and w.signalled is None]
        return [
            w
            for w in self.active()
            if w.phase == phase and w.signalled is None and w.message is not None
        ]

    @staticmethod
    def target(worker: Worker, at: str) -> Message:
        """The message a fault at `at` aims at: the one uploading, or the one separating."""
        return worker.finishing if at == "upload" else worker.message

    def try_fault(self, kind: str) -> bool:
        """Inject `kind` now if a suitable target exists; True when done (or under way)."""
        now = time.time()
        if kind in ("gcs_restart", "pubsub_outage"):
            down = round(self.rng.uniform(4, 12), 1)
            self.faults.append({"kind": kind, "t": round(now - self.t0, 1), "down_s": down})
            thread = threading.Thread(target=self.outage, args=(kind, down), daemon=True)
            thread.start()
            self.threads.append(thread)
            return True
        at = "separate"
        if kind == "sigkill_upload" or (kind == "sigstop_race" and self.c.race_at == "upload"):
            at = "upload"
        elif kind == "sigstop_race" and self.c.race_at == "random":
            at = self.rng.choice(["separate", "upload"])
        phase = at
        targets = self.candidates(phase)
        if not targets:
            return False
        worker = self.rng.choice(targets)
        aimed = self.target(worker, at)
        fault = {
            "kind": kind,
            "t": round(now - self.t0, 1),
            "worker": worker.number,
            "jobId": aimed.job_id,
            "track": aimed.track,
        }
        self.faults.append(fault)
        if kind == "sigkill_separation":
            self.kill(worker, signal.SIGKILL)
        elif kind == "sigterm":
            self.kill(worker, signal.SIGTERM)
        elif kind == "sigkill_upload":
            worker.signalled = ("pending", now)
            thread = threading.Thread(
                target=self.kill_mid_upload, args=(worker, fault), daemon=True
            )
            thread.start()
            self.threads.append(thread)
        elif kind == "sigstop_race":
            fault["at"] = at
            worker.signalled = ("pending", now)
            thread = threading.Thread(target=self.stall_in_race, args=(worker, fault), daemon=True)
            thread.start()
            self.threads.append(thread)
        return True

    def kill(self, worker: Worker, sig: int) -> None:
        worker.signalled = (signal.Signals(sig).name, time.time())
        if sig in (signal.SIGKILL, signal.SIGSTOP):
            self.last_kill = time.time()
        try:
            worker.process.send_signal(sig)
        except ProcessLookupError:
            pass

    def listing(self, prefix: str) -> dict:
        return {
            b.name.rsplit("/", 1)[1]: b.generation
            for b in self.storage.list_blobs(self.bucket, prefix=prefix)
        }

    def between_stems_and_manifest(self, worker: Worker) -> int:
        """Wait until some stem of the worker's uploading track has been rewritten while no
        manifest is there: the moment between the stems and the manifest. The number of stems
        rewritten, or 0 when the worker got past it unseen."""
        message = worker.finishing
        prefix = f"stems/{RELEASE}/{message.track}/"
        try:
            before = self.listing(prefix)
        except Exception:
            before = {}
        deadline = time.time() + 60
        while (
            time.time() < deadline and worker.process.poll() is None and worker.finishing is message
        ):
            try:
                now = self.listing(prefix)
            except Exception:
                time.sleep(0.2)
                continue
            changed = [n for n, g in now.items() if n != "manifest.json" and before.get(n) != g]
            # every file of the set rewritten: the worker is past its uploads, and the manifest
            # is still its claim (job/gcs_commit.py), not a complete set
            if len(changed) >= SET_FILES and not self.vouched(prefix):
                return len(changed)
            time.sleep(0.02)
        return 0

    def missed(self, worker: Worker, fault: dict, kind: str) -> None:
        fault["missed"] = True  # the upload ended before the poll saw it: try again
        worker.signalled = None
        self.misses += 1
        if self.misses <= 8:
            self.plan.append((0.0, kind))

    def vouched(self, prefix: str) -> bool:
        """Whether the manifest under `prefix` vouches for a set (not absent, not a claim)."""
        blob = self.storage.bucket(self.bucket).get_blob(prefix + "manifest.json")
        return blob is not None and "claim" not in json.loads(blob.download_as_bytes())

    def kill_mid_upload(self, worker: Worker, fault: dict) -> None:
        if not (written := self.between_stems_and_manifest(worker)):
            return self.missed(worker, fault, "sigkill_upload")
        self.kill(worker, signal.SIGKILL)
        fault["stems_written"] = written
        time.sleep(0.5)
        fault["manifest_after_kill"] = self.vouched(f"stems/{RELEASE}/{fault['track']}/")

    def stall_in_race(self, worker: Worker, fault: dict) -> None:
        """SIGSTOP (mid-separation, or between the stems and the manifest), then SIGCONT once
        another worker has taken the same message (its lease ran out) and gone as far: both
        then write the same track."""
        if fault["at"] == "upload":
            if not (written := self.between_stems_and_manifest(worker)):
                return self.missed(worker, fault, "sigstop_race")
            fault["stems_written"] = written
        message = self.target(worker, fault["at"])
        worker.stopped = True
        self.kill(worker, signal.SIGSTOP)
        deadline = time.time() + LEASE_S + 90
        while time.time() < deadline:
            # another worker that took the message and has separated it (or moved on, or
            # ended); for a race at the upload, one that has uploaded it too
            others = [
                w
                for w in self.workers
                if w is not worker
                and message.message_id in w.attempts
                and (w.message is not message or w.phase == "idle" or w.exit_code is not None)
            ]
            if others and (fault["at"] == "separate" or others[0].finishing is not message):
                fault["raced_with"] = others[0].number
                break
            time.sleep(0.05)
        fault["stopped_s"] = round(time.time() - worker.signalled[1], 1)
        worker.process.send_signal(signal.SIGCONT)
        worker.stopped = False

    def outage(self, kind: str, down: float) -> None:
        try:
            if kind == "gcs_restart":
                self.gcs.kill()
                time.sleep(down)
                self.gcs.start()
            else:
                os.killpg(self.pubsub.process.pid, signal.SIGSTOP)
                time.sleep(down)
                os.killpg(self.pubsub.process.pid, signal.SIGCONT)
        except Exception as exc:  # reported; the verdict still runs
            self.faults[-1]["error"] = repr(exc)

    # -- the run -------------------------------------------------------------------------
    def run(self) -> dict:
        (self.workdir / "workers").mkdir(parents=True, exist_ok=True)
        self.env = self.worker_env()
        workload = self.build_workload()
        self.plan = plan = self.plan_faults()
        self.log(
            f"seed {self.c.seed}: {len(workload)} messages, {self.c.tracks} tracks, "
            f"{self.c.workers} workers x --max-messages {self.c.max_messages}; faults "
            + ", ".join(f"{k}@{t}s" for t, k in plan)
        )
        self.t0 = time.time()
        for message in workload:
            self.publish(message)
        collector = threading.Thread(target=self.collect_results, daemon=True)
        collector.start()
        deadline = self.t0 + self.c.max_wall_s
        done, skipped = False, []
        while time.time() < deadline:
            self.reap()
            due = [(t, k) for t, k in plan if time.time() - self.t0 >= t]
            for item in due:
                if self.try_fault(item[1]):
                    plan.remove(item)
            busy = any(w.stopped for w in self.workers) or any(t.is_alive() for t in self.threads)
            settled = time.time() - self.last_kill > LEASE_S + 5 if self.last_kill else True
            if not done and not busy and settled and self.complete():
                if plan:  # no track left to aim at: reported, not injected
                    self.log(f"  no target left for {plan}")
                    skipped += [k for _, k in plan]
                    plan.clear()
                done = True  # nothing left to hand out: let the workers run dry
            if done and not [w for w in self.workers if w.exit_code is None]:
                break
            if not done:
                for _ in range(self.c.workers - len(self.active())):
                    self.start_worker()
            time.sleep(0.2)
        self.finished = time.time()
        for worker in self.workers:  # only after the wall-clock bound
            if worker.exit_code is None:
                worker.process.send_signal(signal.SIGCONT)
                worker.process.kill()
                worker.process.wait()
        self.stop_event.set()
        collector.join(timeout=10)
        self.empty_exit_s = self.time_empty_drain()
        return self.verdict(timed_out=not done, skipped=skipped + [k for _, k in plan])

    def time_empty_drain(self) -> float:
        """What a surplus job costs: `drain` on the drained subscription, start to exit, with
        IDLE_TIMEOUT_S=1 (so the figure is the start-up cost plus one second)."""
        started = time.time()
        subprocess.run(
            [sys.executable, "-m", "job", "drain", "--max-messages", "1"],
            env={**self.env, "IDLE_TIMEOUT_S": "1"},
            capture_output=True,
            timeout=120,
        )
        return round(time.time() - started, 2)

    # -- the verdict, from storage and results only ---------------------------------------
    def leftover(self, subscription: str) -> int:
        subscriber, count = self.pubsub.subscriber, 0
        for _ in range(2):
            response = subscriber.pull(
                request={"subscription": subscription, "max_messages": 100}, timeout=3
            )
            count += len(response.received_messages)
            if response.received_messages:
                subscriber.acknowledge(
                    request={
                        "subscription": subscription,
                        "ack_ids": [r.ack_id for r in response.received_messages],
                    }
                )
        return count

    def check_track(self, track: str, problems: list) -> str:
        """'ok', 'missing' (no manifest), 'mixed' (stems not the manifest's), 'stale' (an older
        input) for one good track."""
        prefix = f"stems/{RELEASE}/{track}/"
        bucket = self.storage.bucket(self.bucket)
        blobs = {b.name: b for b in self.storage.list_blobs(self.bucket, prefix=prefix)}
        if prefix + "manifest.json" not in blobs:
            problems.append(f"{track}: no manifest ({len(blobs)} objects)")
            return "missing"
        manifest = json.loads(blobs[prefix + "manifest.json"].download_as_bytes())
        if "claim" in manifest:
            problems.append(f"{track}: only a writer's claim, no complete set")
            return "missing"
        generations = manifest.get("objectGenerations") or {}
        # every output's audio and (with OUTPUT_ANALYSIS) its waveform peaks file
        names = {prefix + entry["file"] for entry in manifest["stems"].values()} | {
            prefix + entry["peaks"].rsplit("/", 1)[1]
            for entry in manifest["stems"].values()
            if entry.get("peaks")
        }
        if (
            set(manifest["stems"]) != set(STEMS)
            or set(generations) != names
            or set(blobs) != names | {prefix + "manifest.json"}
        ):
            problems.append(f"{track}: stems {sorted(manifest['stems'])} / objects {sorted(blobs)}")
            return "mixed"
        stale = [name for name in names if blobs[name].generation != generations[name]]
        if stale:
            problems.append(f"{track}: {stale} are not the manifest's generations")
            return "mixed"
        for stem, entry in manifest["stems"].items():
            blob = blobs[prefix + entry["file"]]
            data = bucket.blob(blob.name, generation=blob.generation).download_as_bytes()
            if (
                blob.generation != generations[blob.name]
                or len(data) != entry["bytes"]
                or hashlib.sha256(data).hexdigest() != entry["sha256"]
            ):
                problems.append(
                    f"{track}: {stem} is not the manifest's (generation "
                    f"{blob.generation} vs {generations[blob.name]})"
                )
                return "mixed"
        uri = manifest["input"]["uri"]
        original = bucket.get_blob(uri.split("/", 3)[3])
        if (
            manifest["input"].get("generation") != original.generation
            or abs(manifest["durationS"] - self.durations[track][-1]) > 0.1
        ):
            problems.append(
                f"{track}: the manifest names generation "
                f"{manifest['input'].get('generation')}, the original is at "
                f"{original.generation}"
            )
            return "stale"
        return "ok"

    def verdict(self, timed_out: bool, skipped: list) -> dict:
        problems = []
        left = self.leftover(self.subscription)
        dead = self.leftover(self.dead_sub)
        if left:
            problems.append(f"{left} message(s) still on the work subscription")
        if dead:
            problems.append(f"{dead} message(s) dead-lettered")
        tracks = sorted({m.track for m in self.messages if m.track})
        states = {track: self.check_track(track, problems) for track in tracks}
        stem_prefixes = {
            b.name.rsplit("/", 1)[0] for b in self.storage.list_blobs(self.bucket, prefix="stems/")
        }
        orphans = sorted(p for p in stem_prefixes if p.rsplit("/", 1)[1] not in tracks)
        problems += [f"{p}: stems of no good track" for p in orphans]

        # results, matched to messages by jobId (unreadable messages by error code)
        wrong, duplicates, latencies, lost = 0, 0, [], 0
        groups = {}
        for m in self.messages:
            key = m.job_id if m.job_id is not None else ("?", m.code)
            groups.setdefault(key, {"messages": [], "results": []})["messages"].append(m)
        for result, at in self.results:
            error = result.get("error") or {}
            key = (
                result.get("jobId") if result.get("jobId") is not None else ("?", error.get("code"))
            )
            if key not in groups:
                wrong += 1
                problems.append(f"a result for no message: {key}")
                continue
            groups[key]["results"].append((at, result))
        for key, group in groups.items():
            sent = sorted(m.published for m in group["messages"])
            example = group["messages"][0]
            results = sorted(group["results"], key=lambda r: r[0])
            for _, result in results:
                if result["status"] != example.expect or (
                    example.expect == "failed"
                    and (result.get("error") or {}).get("code") != example.code
                ):
                    wrong += 1
                    problems.append(
                        f"{key}: {result['status']} "
                        f"{(result.get('error') or {}).get('code')}, expected "
                        f"{example.expect} {example.code}"
                    )
                elif example.expect == "completed" and not self.result_fits(example.track, result):
                    wrong += 1
                    problems.append(f"{key}: result stems/duration do not fit {example.track}")
            if example.track in self.reuploaded and not any(
                at >= self.reuploaded[example.track]
                and abs(r.get("durationS", 0) - self.durations[example.track][-1]) < 0.1
                for at, r in results
                if r["status"] == "completed"
            ):
                wrong += 1
                problems.append(f"{key}: no result for the re-uploaded original")
            missing = len(sent) - len(results)
            if missing > 0:
                lost += missing
                problems.append(f"{key}: {len(results)} result(s) for {len(sent)} message(s)")
            duplicates += max(0, -missing)
            latencies += [at - p for p, (at, _) in zip(sent, results, strict=False)]
        lost += left + dead + sum(1 for s in states.values() if s == "missing")
        separations = sum(
            1 for r, _ in self.results if r["status"] == "completed" and r.get("reused") is False
        )
        needed = len(tracks) + len(self.reupload_tracks)
        span = max((at for _, at in self.results), default=self.t0) - self.t0
        faults = {
            kind: sum(1 for f in self.faults if f["kind"] == kind and not f.get("missed"))
            for kind in FAULT_KINDS
        }
        sigterm = [f for f in self.faults if f["kind"] == "sigterm"]
        problems += [
            f"SIGTERM: worker exited {f.get('exit_code')} after {f.get('exit_after_s')} s"
            for f in sigterm
            if f.get("exit_code") != 75 or f.get("exit_after_s", 99) > 10
        ]
        if timed_out:
            problems.append(f"not finished within {self.c.max_wall_s:.0f} s")
        q = (
            statistics.quantiles(latencies, n=20, method="inclusive")
            if len(latencies) >= 2
            else latencies * 19
        )
        report = {
            "messages": len(self.messages),
            "tracks": len(tracks),
            "workers": self.c.workers,
            "max_messages": self.c.max_messages,
            "faults": faults,
            "faults_not_injected": skipped,
            "lost": lost,
            "mixed_sets": sum(1 for s in states.values() if s == "mixed"),
            "stale_sets": sum(1 for s in states.values() if s == "stale"),
            "orphan_stems": len(orphans),
            "wrong_results": wrong,
            "redundant_separations": max(0, separations - needed),
            "duplicate_results": duplicates,
            "stems_left_by_kill": sum(
                1
                for f in self.faults
                if f["kind"] == "sigkill_upload"
                and f.get("stems_written")
                and not f.get("manifest_after_kill")
            ),
            "worker_starts": len(self.workers),
            "wall_s": round(self.finished - self.t0, 1),
            "tracks_per_min": round(needed / max(span, 1e-6) * 60, 2),
            "p50_publish_to_result_s": round(statistics.median(latencies), 1)
            if latencies
            else None,
            "p95_publish_to_result_s": round(q[18], 1) if latencies else None,
            "max_publish_to_result_s": round(max(latencies), 1) if latencies else None,
            "sigterm_exit_s": [f.get("exit_after_s") for f in sigterm],
            "empty_queue_drain_s": self.empty_exit_s,
            "max_delivery_attempt": max(
                (a for w in self.workers for a in w.attempts.values()), default=0
            ),
            "seed": self.c.seed,
            "problems": problems,
        }
        report["ok"] = not problems and report["mixed_sets"] == 0
        return report

    def result_fits(self, track: str, result: dict) -> bool:
        urls = {stem: f"/{self.bucket}/stems/{RELEASE}/{track}/{stem}.mp3" for stem in STEMS}
        return (
            set(result["stems"]) == set(STEMS)
            and all(result["stems"][s].endswith(urls[s]) for s in STEMS)
            and any(abs(result.get("durationS", -1) - d) < 0.1 for d in self.durations[track])
        )


def table(report: dict, fault_log: list) -> str:
    rows = [(k, v) for k, v in report.items() if k not in ("problems", "faults")]
    rows += [(f"faults.{k}", v) for k, v in report["faults"].items()]
    width = max(len(k) for k, _ in rows)
    lines = [f"{k:<{width}}  {v}" for k, v in rows]
    lines += ["", "faults injected:"] + [f"  {json.dumps(f)}" for f in fault_log]
    lines += ["", "problems:"] + [f"  {p}" for p in report["problems"] or ["none"]]
    return "\n".join(lines)


def main(argv=None) -> int:
    defaults = Config()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, default=defaults.workers)
    parser.add_argument("--max-messages", type=int, default=defaults.max_messages)
    parser.add_argument("--tracks", type=int, default=defaults.tracks)
    parser.add_argument("--duplicates", type=int, default=defaults.duplicates)
    parser.add_argument("--second-jobs", type=int, default=defaults.second_jobs)
    parser.add_argument("--reuploads", type=int, default=defaults.reuploads)
    parser.add_argument("--bad", type=int, default=defaults.bad)
    parser.add_argument(
        "--faults",
        default=",".join(f"{k}={v}" for k, v in defaults.faults.items()),
        help="kind=count,... (kinds: {})".format(", ".join(FAULT_KINDS)),
    )
    parser.add_argument("--fault-window", type=float, default=defaults.fault_window_s)
    parser.add_argument(
        "--race-at", choices=("random", "separate", "upload"), default=defaults.race_at
    )
    parser.add_argument("--seed", type=int, default=None, help="default: random, printed")
    parser.add_argument("--max-wall", type=float, default=defaults.max_wall_s)
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args(argv)
    faults = {k: int(v) for k, v in (item.split("=") for item in args.faults.split(",") if item)}
    config = Config(
        workers=args.workers,
        max_messages=args.max_messages,
        tracks=args.tracks,
        duplicates=args.duplicates,
        second_jobs=args.second_jobs,
        reuploads=args.reuploads,
        bad=args.bad,
        faults=faults,
        fault_window_s=args.fault_window,
        race_at=args.race_at,
        seed=args.seed if args.seed is not None else random.randrange(10**6),
        max_wall_s=args.max_wall,
    )
    workdir = args.workdir or Path(f"/tmp/stem-soak-{os.getpid()}")
    print(f"hack/soak: workdir {workdir}", file=sys.stderr)
    model = write_model_folder(workdir / "model")
    with (
        PubSubEmulator(workdir / "pubsub", "stem-soak").start() as pubsub,
        GcsEmulator(workdir / "gcs").start() as gcs,
    ):
        fleet = Fleet(
            config,
            workdir,
            pubsub,
            gcs,
            model,
            log=lambda text: print(text, file=sys.stderr, flush=True),
        )
        report = fleet.run()
    print(table(report, fleet.faults))
    print(json.dumps(report))
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
