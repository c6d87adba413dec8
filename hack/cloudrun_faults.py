"""Seeded runs of the whole Cloud Run path under faults; prints its verdict as JSON.

Real parts throughout: messages are published to Google's Pub/Sub emulator, which pushes them to
the real dispatcher (uvicorn, `job.dispatcher.create_app`); the dispatcher dedupes with markers in
the GCS stand-in and starts executions through the real google-cloud-run client against the
Cloud Run job stand-in (hack/cloudrun_stand_in.py), which runs the real `stem-job run` as tasks
with attempts and `maxRetries`, a task timeout (SIGTERM, then SIGKILL 10 s later) and kills.
After every execution has ended, Cloud Scheduler's call of POST /sweep is made once, and then
every message is pushed again with its messageId (Pub/Sub redelivers a push whose 200 was lost or
late, even after the sweep): none may start a second execution.

Faults, drawn per attempt from the seed: SIGKILL at a random moment (out of memory, host loss),
the task timeout at a random moment, Cloud Storage unreachable for the whole attempt, or none.
Some messages name an original that is not audio (bad input); some tracks already hold a stale
manifest, made for another request (another original), when their message comes. The invariant,
read from the results topic and the bucket only: every published message has exactly one terminal
result (`completed` or `failed`), and a `completed` one names a complete set made from its own
original (its manifest exists and records that original).

  hack/cloudrun-faults [--runs 20] [--seed 0] [--messages 2]
"""

import argparse
import json
import random
import sys
import tempfile
import threading
import time
from collections import defaultdict
from pathlib import Path

HACK = Path(__file__).resolve().parent
REPO = HACK.parent
sys.path[:0] = [p for p in (str(HACK), str(REPO)) if p not in sys.path]

import uvicorn  # noqa: E402
from cloudrun_stand_in import CloudRunJobStandIn, Fault, job_env  # noqa: E402
from emulators import (  # noqa: E402
    GcsEmulator,
    PubSubEmulator,
    ensure_bucket,
    ensure_subscription,
    ensure_topic,
    free_port,
)
from google.auth.credentials import AnonymousCredentials  # noqa: E402
from google.cloud import run_v2  # noqa: E402
from synthetic import music, write_audio, write_model_folder  # noqa: E402

from job.dispatcher import DispatcherSettings, create_app  # noqa: E402
from job.dispatcher.dedupe import GcsMarkers  # noqa: E402
from job.dispatcher.sweep import SweepClients  # noqa: E402

PROJECT = "stem-faults"
REGION = "europe-west4"
JOB = f"projects/{PROJECT}/locations/{REGION}/jobs/stem-job"
FAULTS = {"none": 0.3, "kill": 0.3, "timeout": 0.2, "outage": 0.2}
TERMINAL = ("completed", "failed")


def plan(seed: int, job_id: str, attempt: int, dead_storage: str) -> tuple[str, Fault]:
    """The fault of one attempt of one message, the same for the same seed."""
    rng = random.Random(f"{seed}/{job_id}/{attempt}")
    kind = rng.choices(list(FAULTS), weights=list(FAULTS.values()))[0]
    if kind == "kill":
        return kind, Fault(kill_after_s=rng.uniform(0.3, 3.0))
    if kind == "timeout":
        return kind, Fault(timeout_s=rng.uniform(0.3, 3.0))
    if kind == "outage":
        return kind, Fault(env={"STORAGE_EMULATOR_HOST": dead_storage, "RETRY_DEADLINE_S": "2"})
    return kind, Fault()


class Served:
    """An ASGI app on a free loopback port, from a thread."""

    def __init__(self, app):
        self.server = uvicorn.Server(
            uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", lifespan="off")
        )
        threading.Thread(target=self.server.run, daemon=True).start()
        while not (self.server.started and self.server.servers):
            time.sleep(0.02)
        self.url = f"http://127.0.0.1:{self.server.servers[0].sockets[0].getsockname()[1]}"

    def close(self):
        self.server.should_exit = True


class Results:
    """Everything published to the results topic, by jobId, read in the background."""

    def __init__(self, subscriber, path):
        self.subscriber, self.path = subscriber, path
        self.by_job = defaultdict(list)
        self._stop = threading.Event()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        while not self._stop.is_set():
            reply = self.subscriber.pull(
                request={"subscription": self.path, "max_messages": 50}, timeout=5
            )
            for received in reply.received_messages:
                result = json.loads(received.message.data)
                if result.get("status") in TERMINAL:
                    self.by_job[result.get("jobId")].append(result)
            if reply.received_messages:
                self.subscriber.acknowledge(
                    request={
                        "subscription": self.path,
                        "ack_ids": [r.ack_id for r in reply.received_messages],
                    }
                )

    def close(self):
        self._stop.set()


def rest(client_class, url):
    return client_class(
        transport="rest", credentials=AnonymousCredentials(), client_options={"api_endpoint": url}
    )


def run(runs: int = 20, seed: int = 0, messages: int = 2, workdir: Path | None = None) -> dict:
    workdir = Path(workdir or tempfile.mkdtemp(prefix="cloudrun-faults-"))
    started = time.monotonic()
    with (
        PubSubEmulator(workdir / "pubsub", PROJECT).start() as pubsub,
        GcsEmulator(workdir / "gcs", in_memory=True).start() as gcs,
    ):
        client = gcs.client(PROJECT)
        bucket = "stems-faults"
        ensure_bucket(client, bucket)
        results_topic = ensure_topic(pubsub.publisher, PROJECT, "stem-results")
        results = Results(
            pubsub.subscriber,
            ensure_subscription(pubsub.subscriber, PROJECT, "stem-results-read", results_topic),
        )
        model = write_model_folder(workdir / "model")
        good = workdir / "song.mp3"
        write_audio(good, music(4.0, seed=seed))
        client.bucket(bucket).blob("originals/song.mp3").upload_from_filename(str(good))
        client.bucket(bucket).blob("originals/doc.mp3").upload_from_string(b"%PDF-1.4 " * 200)

        dead_storage = f"http://127.0.0.1:{free_port()}"
        drawn = defaultdict(int)

        def faults(execution, attempt):
            job_id = json.loads(execution.env["JOB_MESSAGE"])["jobId"]
            kind, fault = plan(seed, job_id, attempt, dead_storage)
            drawn[kind] += 1
            return fault

        env = job_env(
            {
                "PROCESSING_MODE": "job",
                "STORAGE_MODE": "gcs",
                "GCS_BUCKET": bucket,
                "PUBSUB_RESULTS_TOPIC": "stem-results",
                "MODEL_DIR": str(model),
                "DEVICE": "cpu",
                "MAX_RETRIES": "1",
                "RETRY_DEADLINE_S": "10",
                "LOG_FORMAT": "json",
                **pubsub.env,
                **gcs.env,
            }
        )
        cloud_run = CloudRunJobStandIn(
            JOB, env, max_retries=1, task_timeout_s=600, faults=faults, cwd=REPO
        )
        settings = DispatcherSettings(
            project=PROJECT,
            region=REGION,
            results_topic="stem-results",
            marker_bucket=bucket,
            stems_bucket=bucket,
            api_deadline_s=10,
            claim_ttl_s=60,
        )
        dispatcher = Served(
            create_app(
                settings,
                jobs_client=rest(run_v2.JobsClient, cloud_run.url),
                publisher_client=pubsub.publisher,
                markers=GcsMarkers(bucket, client=client),
                sweep_clients=SweepClients(
                    rest(run_v2.ExecutionsClient, cloud_run.url),
                    rest(run_v2.TasksClient, cloud_run.url),
                    client,
                ),
            )
        )
        published, swept, redelivered = {}, [], []
        try:
            for number in range(runs):
                run_seed = seed * 1000 + number
                rng = random.Random(run_seed)
                topic = ensure_topic(pubsub.publisher, PROJECT, f"stem-separate-{run_seed}")
                push = pubsub.subscriber.create_subscription(
                    request={
                        "name": pubsub.subscriber.subscription_path(
                            PROJECT, f"dispatch-{run_seed}"
                        ),
                        "topic": topic,
                        "ack_deadline_seconds": 60,
                        "push_config": {"push_endpoint": f"{dispatcher.url}/pubsub"},
                    }
                ).name
                sent = {}
                for index in range(messages):
                    bad = rng.random() < 0.25
                    job_id = f"job_{run_seed}_{index}"
                    published[job_id] = "bad" if bad else "good"
                    if rng.random() < 0.3:
                        stale_manifest(client.bucket(bucket), f"trk_{run_seed}_{index}")
                        drawn["staleManifest"] += 1
                    message = {
                        "jobId": job_id,
                        "releaseId": "rel_faults",
                        "trackId": f"trk_{run_seed}_{index}",
                        "mimeType": "audio/mpeg",
                        "originalStemUri": f"gs://{bucket}/originals/"
                        f"{'doc' if bad else 'song'}.mp3",
                    }
                    data = json.dumps(message).encode()
                    sent[pubsub.publisher.publish(topic, data).result(10)] = data
                if not cloud_run.wait(len(published), timeout_s=120 + 90 * messages):
                    raise TimeoutError(f"run {number}: executions did not end")
                swept.append(dispatcher_sweep(dispatcher.url))
                redelivered += [redeliver(dispatcher.url, mid, data) for mid, data in sent.items()]
                pubsub.subscriber.delete_subscription(request={"subscription": push})
            time.sleep(3)  # the last results reach the reading subscription
        finally:
            dispatcher.close()
            cloud_run.close()
            results.close()
        return verdict(
            redelivered,
            published,
            results.by_job,
            client.bucket(bucket),
            cloud_run,
            drawn,
            swept,
            runs,
            seed,
            time.monotonic() - started,
        )


def stale_manifest(bucket, track_id: str) -> None:
    """A set made for another request: another original, one stem (a manifest left from an
    earlier request for this track)."""
    other = {"uri": f"gs://{bucket.name}/originals/other.mp3", "generation": 1, "size": 1}
    found = {
        "version": 1,
        "input": other,
        "stems": {"vocals": {"url": f"gs://{bucket.name}/stale/vocals.mp3"}},
    }
    bucket.blob(f"stems/rel_faults/{track_id}/manifest.json").upload_from_string(
        json.dumps(found), content_type="application/json"
    )


def redeliver(url: str, message_id: str, data: bytes) -> str:
    """The push again with its messageId, as Pub/Sub redelivers one; the dispatcher's answer."""
    import base64

    import requests

    body = {"message": {"data": base64.b64encode(data).decode(), "messageId": message_id}}
    reply = requests.post(url + "/pubsub", json=body, timeout=60)
    return reply.json().get("status", str(reply.status_code))


def dispatcher_sweep(url: str) -> dict:
    import requests

    reply = requests.post(url + "/sweep", timeout=120)
    reply.raise_for_status()
    return reply.json()


def verdict(redelivered, published, by_job, bucket, cloud_run, drawn, swept, runs, seed, seconds):
    violations = [{"redelivery": status} for status in redelivered if status != "duplicate"]
    outcomes = defaultdict(int)
    for job_id, kind in published.items():
        got = by_job.get(job_id, [])
        if len(got) != 1:
            violations.append(
                {
                    "jobId": job_id,
                    "terminalResults": len(got),
                    "statuses": [r["status"] for r in got],
                }
            )
            continue
        result = got[0]
        code = (result.get("error") or {}).get("code")
        outcomes[f"{result['status']}:{code}" if code else result["status"]] += 1
        if result["status"] == "completed":
            prefix = f"stems/{result['releaseId']}/{result['trackId']}/manifest.json"
            blob = bucket.get_blob(prefix)
            made_from = json.loads(blob.download_as_bytes()).get("input", {}) if blob else {}
            if made_from.get("uri") != f"gs://{bucket.name}/originals/song.mp3":
                violations.append({"jobId": job_id, "completedWithoutItsSet": made_from})
        if kind == "bad" and result["status"] != "failed":
            violations.append({"jobId": job_id, "badInputNotFailed": result["status"]})
    attempts = [a for e in cloud_run.executions.values() for a in e.attempts]
    exits = defaultdict(int)
    for attempt in attempts:
        signal_ = attempt.term_signal
        exits[f"signal {signal_}" if signal_ else str(attempt.exit_code)] += 1
    return {
        "ok": not violations and len(cloud_run.executions) == len(published),
        "runs": runs,
        "seed": seed,
        "messages": len(published),
        "executions": len(cloud_run.executions),
        "attempts": len(attempts),
        "faults": dict(drawn),
        "exits": dict(exits),
        "attemptSeconds": sorted(a.seconds for a in attempts),
        "outcomes": dict(outcomes),
        "sweptPublished": sum(s.get("published", 0) for s in swept),
        "redelivered": len(redelivered),
        "violations": violations,
        "seconds": round(seconds, 1),
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--messages", type=int, default=2, help="messages per run")
    args = parser.parse_args(argv)
    result = run(args.runs, args.seed, args.messages)
    print(json.dumps(result, indent=2))
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
