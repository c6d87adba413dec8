"""One sweep over many closed markers and a few open ones on fake-gcs-server; prints JSON.

  hack/sweep-bench [--closed 10000] [--open 50]

The markers are written as the dispatcher under test lays them out (open entries under
`dispatch/open/` where it has them, else every marker under `dispatch/`), each open one naming
an execution that a loopback Admin API reports as succeeded, so the sweep closes it. Times the
one POST /sweep call's work (Dispatcher.sweep) and says how many entries it looked at.
"""

import argparse
import json
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

HACK = Path(__file__).resolve().parent
REPO = HACK.parent
sys.path[:0] = [str(HACK), str(REPO)]

from cloudrun_stand_in import JsonServer  # noqa: E402
from emulators import GcsEmulator, ensure_bucket  # noqa: E402
from google.auth.credentials import AnonymousCredentials  # noqa: E402
from google.cloud import run_v2  # noqa: E402

from job.dispatcher import DispatcherSettings  # noqa: E402
from job.dispatcher.dedupe import GcsMarkers  # noqa: E402
from job.dispatcher.service import Dispatcher  # noqa: E402
from job.dispatcher.sweep import SweepClients  # noqa: E402

PROJECT, BUCKET = "stem-bench", "markers"


def succeeded(method, url, body):
    """executions.get: ended, its one task succeeded (the job reported)."""
    return 200, {
        "name": url.path.removeprefix("/v2/"),
        "taskCount": 1,
        "succeededCount": 1,
        "completionTime": "2026-01-01T00:00:00Z",
    }


def lay_out(markers: GcsMarkers, closed: int, opened: int) -> None:
    split = hasattr(markers, "list_open")  # open entries under their own prefix
    ended = {"state": "ended", "execution": "x", "outcome": "completed"}

    def write(number):
        key = f"{number:08d}"
        if number < closed:
            markers.create(key, ended)
            return
        execution = f"projects/{PROJECT}/locations/europe-west4/jobs/stem-job/executions/e-{key}"
        doc = {"state": "started", "jobId": f"job_{key}", "execution": execution}
        markers.create(key, doc)
        if split:
            markers.create(f"open/{key}", doc)

    with ThreadPoolExecutor(16) as pool:
        list(pool.map(write, range(closed + opened)))


def bench(closed: int, opened: int) -> dict:
    workdir = Path(tempfile.mkdtemp(prefix="sweep-bench-"))
    api = JsonServer(succeeded)
    rest = {
        "transport": "rest",
        "credentials": AnonymousCredentials(),
        "client_options": {"api_endpoint": api.url},
    }
    with GcsEmulator(workdir / "gcs", in_memory=True).start() as gcs:
        client = gcs.client(PROJECT)
        ensure_bucket(client, BUCKET)
        markers = GcsMarkers(BUCKET, client=client)
        started = time.monotonic()
        lay_out(markers, closed, opened)
        laid = time.monotonic() - started
        dispatcher = Dispatcher(
            DispatcherSettings(project=PROJECT, region="europe-west4", marker_bucket=BUCKET),
            jobs_client=object(),
            markers=markers,
            sweep_clients=SweepClients(
                run_v2.ExecutionsClient(**rest), run_v2.TasksClient(**rest), client
            ),
        )
        started = time.monotonic()
        counts = dispatcher.sweep().body
        seconds = time.monotonic() - started
        listed = sum(1 for _ in client.list_blobs(BUCKET, prefix="dispatch/"))
    api.close()
    return {
        "closed": closed,
        "open": opened,
        "objects": listed,
        "sweepSeconds": round(seconds, 2),
        "sweep": counts,
        "layoutSeconds": round(laid, 1),
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    for flag, default in (("--closed", 10_000), ("--open", 50)):
        parser.add_argument(flag, type=int, default=default)
    args = parser.parse_args(argv)
    print(json.dumps(bench(args.closed, args.open), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
