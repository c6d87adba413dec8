#!/usr/bin/env python3
"""Processes racing to write one track's set on the GCS stand-in, many seeds, one verdict.

Per seed: several writer processes (forked) each describe the original, then write their stems
in random chunks with random pauses, then their manifest, through the job's own GcsStorage;
they ask for different outputs (six stems, vocals, vocals and drums), one of them dies between
its stems and its manifest (unless it lost the track before), and the original is re-uploaded
while they run. The invariant, checked from what is stored and what each writer reported:

- `manifest.json`, when it exists, is a whole set's manifest (never a writer's claim): every
  object it names is at the named generation and holds its writer's bytes, exactly the outputs
  that writer asked for, from the input that writer read;
- a writer that reported `completed` was answered with a set for its own request, and that
  set was whole when it was checked right after (unless a newer writer had claimed the track
  by then, which is counted, not judged).

tests/test_commit_race.py runs a few seeds; `.venv/bin/python hack/commit_race.py --seeds 200`
runs more (it starts its own stand-in). The writers reach it through hack/gcs_proxy.py, which
enforces the delete and resumable-upload preconditions fake-gcs-server leaves out.
"""

import argparse
import json
import multiprocessing
import os
import queue
import random
import sys
import tempfile
import time
from pathlib import Path

from google.api_core.exceptions import NotFound

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from emulators import GcsEmulator, ensure_bucket  # noqa: E402
from gcs_proxy import GcsProxy  # noqa: E402

from job import manifest as manifests  # noqa: E402
from job.errors import JobError  # noqa: E402
from job.messages import STEMS  # noqa: E402
from job.storage.gcs import GcsStorage  # noqa: E402

ORIGINAL = "uploads/race/song.flac"
PREFIX = "stems/race/trk/"
CHOICES = (STEMS, STEMS, ("vocals",), ("vocals", "drums"))


def body(job: str, identity: dict, outputs=STEMS) -> dict:
    """A manifest as the pipeline builds it, as far as the commit looks at it."""
    return {
        "version": manifests.VERSION,
        "jobId": job,
        "input": identity,
        "model": "htdemucs_6s",
        "format": "mp3",
        "bitrate": "320k",
        "outputs": list(outputs),
        "stems": {name: {"url": f"u/{name}", "file": f"{name}.mp3"} for name in outputs},
    }


def whole(objects, found: dict) -> bool:
    """Whether every object `found` names is at its generation and holds its writer's bytes."""
    for name, generation in (found.get("objectGenerations") or {}).items():
        try:
            data = objects.blob(name, generation=generation).download_as_bytes()
        except Exception:
            return False
        if not data.startswith(f"{found['jobId']}:".encode()):
            return False
    return True


def writer(
    url: str, bucket: str, job: str, outputs, seed: int, die: bool, folder: Path, start, reports
) -> None:
    """One job's write of the track; reports (job, outcome) on `reports`."""
    from google.auth.credentials import AnonymousCredentials
    from google.cloud import storage

    client = storage.Client(
        project="race", credentials=AnonymousCredentials(), client_options={"api_endpoint": url}
    )
    store = GcsStorage(bucket, (bucket,), 1_000_000, client=client, retry_deadline_s=10)
    pause = random.Random(seed).uniform
    files = {}
    for name in outputs:
        files[name] = folder / f"{job}-{name}" / f"{name}.mp3"
        files[name].parent.mkdir(parents=True)
        files[name].write_bytes(f"{job}:{name}".encode() * 200)
    start.wait()
    time.sleep(pause(0, 0.15))
    identity = store.describe_original(f"gs://{bucket}/{ORIGINAL}").identity
    report = {"job": job, "outputs": list(outputs), "input": identity}
    try:
        with store.commit("race", "trk") as commit:
            names, sizes = list(outputs), random.Random(seed + 1)
            while names:
                size = sizes.randint(1, 3)
                chunk, names = names[:size], names[size:]
                commit.write_stems({name: files[name] for name in chunk})
                time.sleep(pause(0, 0.03))
            if die:
                os._exit(9)
            standing = commit.write_manifest(body(job, identity, outputs))
        report.update(
            outcome="completed",
            standing=standing["jobId"],
            same_request=manifests.same_request(standing, body(job, identity, outputs)),
        )
        report["whole"] = check_right_after(client.bucket(bucket), standing["jobId"])
    except JobError as error:
        report.update(outcome=error.code, retryable=error.retryable)
    reports.put(report)


def check_right_after(objects, job: str) -> bool | None:
    """Whether the set a writer was answered with is whole; None when a newer writer claimed
    the track before the check could finish (then it proves nothing either way)."""
    blob = objects.get_blob(PREFIX + "manifest.json")
    try:
        found = json.loads(objects.blob(blob.name, generation=blob.generation).download_as_bytes())
    except NotFound:  # replaced between the listing and the read: a newer writer's
        return None
    if found.get("jobId") != job:
        return None
    verdict = whole(objects, found)
    return verdict if objects.get_blob(blob.name).generation == blob.generation else None


def verdict(objects, reports: list) -> list:
    """The problems with what is stored and what was reported (empty: the invariant held)."""
    problems = []
    blob = objects.get_blob(PREFIX + "manifest.json")
    found = json.loads(blob.download_as_bytes()) if blob is not None else None
    requests = {report["job"]: report for report in reports}
    if found is not None and "claim" in found:
        problems.append(f"manifest.json holds a writer's claim: {found}")
    elif found is not None:
        asked = requests.get(found.get("jobId"))
        names = {PREFIX + f"{name}.mp3" for name in found.get("outputs", ())}
        if asked is None:
            problems.append(f"the manifest names {found.get('jobId')}, which never completed")
        elif (
            found["outputs"] != asked["outputs"]
            or set(found["stems"]) != set(asked["outputs"])
            or found["input"] != asked["input"]
            or set(found["objectGenerations"]) != names
        ):
            problems.append(f"the manifest of {found['jobId']} is not its request's: {found}")
        if not whole(objects, found):
            problems.append(f"the set of {found.get('jobId')} is not whole")
    for report in reports:
        if report["outcome"] != "completed":
            continue
        if not report["same_request"]:
            problems.append(
                f"{report['job']} completed with {report['standing']}'s set of another request"
            )
        if report["whole"] is False:
            problems.append(f"{report['job']} completed with a set that was not whole")
    return problems


def race(port: int, objects, seed: int, writers: int = 5, folder: Path | None = None) -> dict:
    """One seed: `writers` processes on one track (through a proxy in front of the stand-in on
    `port`), the original re-uploaded among them."""
    proxy = GcsProxy(port)
    try:
        return race_through(proxy.url, objects, seed, writers, folder)
    finally:
        proxy.close()


def race_through(url: str, objects, seed: int, writers: int, folder: Path | None) -> dict:
    rng = random.Random(seed)
    for old in objects.client.list_blobs(objects, prefix=PREFIX):
        old.delete()
    objects.blob(ORIGINAL).upload_from_string(b"original one")
    context = multiprocessing.get_context("fork")
    start, reports = context.Event(), context.Queue()
    dying = rng.randrange(writers)
    with tempfile.TemporaryDirectory(dir=folder) as scratch:
        processes = [
            context.Process(
                target=writer,
                args=(
                    url,
                    objects.name,
                    f"job{n}",
                    rng.choice(CHOICES),
                    seed * 100 + n,
                    n == dying,
                    Path(scratch),
                    start,
                    reports,
                ),
            )
            for n in range(writers)
        ]
        for process in processes:
            process.start()
        start.set()
        time.sleep(rng.uniform(0, 0.3))
        objects.blob(ORIGINAL).upload_from_string(b"original two")  # a re-upload
        for process in processes:
            process.join(120)
    collected = []
    while True:
        try:
            collected.append(reports.get(timeout=1))
        except queue.Empty:
            break
    outcomes = [report["outcome"] for report in collected]
    return {
        "seed": seed,
        "problems": verdict(objects, collected),
        "outcomes": outcomes,
        "exit_codes": [process.exitcode for process in processes],
        "inconclusive": sum(1 for r in collected if r.get("whole", False) is None),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=50)
    parser.add_argument("--writers", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as work, GcsEmulator(Path(work) / "gcs").start() as gcs:
        objects = ensure_bucket(gcs.client("race"), "race-bucket")
        totals, failed = {"inconclusive": 0}, 0
        for seed in range(args.seeds):
            result = race(gcs.port, objects, seed, args.writers)
            totals["inconclusive"] += result["inconclusive"]
            for outcome in result["outcomes"]:
                totals[outcome] = totals.get(outcome, 0) + 1
            if result["problems"]:
                failed += 1
                print(json.dumps(result), flush=True)
        print(json.dumps({"seeds": args.seeds, "seeds_with_problems": failed, "outcomes": totals}))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
