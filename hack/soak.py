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

The parts live in hack/fleet/ (its docstring names them); this module composes them.
"""

import argparse
import json
import os
import random
import sys
import threading
import time
from pathlib import Path

HACK = Path(__file__).resolve().parent
REPO = HACK.parent
sys.path[:0] = [p for p in (str(HACK), str(REPO)) if p not in sys.path]

from emulators import GcsEmulator, PubSubEmulator  # noqa: E402
from fleet import faults, supervisor, verdict, workload  # noqa: E402
from fleet.config import FAULT_KINDS, Config  # noqa: E402
from fleet.ledger import Ledger, collect  # noqa: E402
from fleet.site import Site  # noqa: E402
from synthetic import write_model_folder  # noqa: E402

__all__ = ["Config", "Fleet", "main"]


class Fleet:
    """One soak run: its place on the stand-ins, the workload, the supervisor, the faults and
    the verdict. `faults` is the record of the faults injected, once `run` has begun."""

    def __init__(
        self,
        config: Config,
        workdir: Path,
        pubsub: PubSubEmulator,
        gcs: GcsEmulator,
        model_dir: Path,
        log=print,
    ):
        self.c, self.workdir, self.model_dir, self.log = config, Path(workdir), model_dir, log
        self.rng = random.Random(config.seed)  # every seeded draw, in a fixed order
        self.site = Site.create(pubsub, gcs, config.ack_deadline_s, config.max_delivery_attempts)
        self.ledger = Ledger()
        self.faults: list[dict] = []

    def run(self) -> dict:
        c, site, ledger = self.c, self.site, self.ledger
        pool = supervisor.Pool(
            c, supervisor.worker_env(c, site, self.model_dir, self.workdir), self.workdir, ledger
        )
        messages, replacements = workload.build(c, self.rng, site, ledger, self.workdir)
        plan = faults.Plan(self.rng, c, self.log)
        self.log(
            f"seed {c.seed}: {len(messages)} messages, {c.tracks} tracks, "
            f"{c.workers} workers x --max-messages {c.max_messages}; faults {plan}"
        )
        t0 = time.time()
        for message in messages:
            workload.publish(site, ledger, message)
        stop = threading.Event()
        reuploads = workload.Reuploads(site, ledger, replacements, self.log)
        collector = threading.Thread(
            target=collect, args=(site, ledger, stop, reuploads.on_result, 5), daemon=True
        )
        collector.start()
        injector = faults.Faults(c, self.rng, site, pool, plan, t0)
        self.faults = injector.records
        done = supervisor.supervise(c, pool, injector, ledger, t0)
        finished = time.time()
        pool.end()
        stop.set()
        collector.join(timeout=10)
        outcome = verdict.Outcome(
            t0=t0,
            finished=finished,
            timed_out=not done,
            not_injected=plan.not_injected(),
            worker_starts=len(pool.workers),
            max_delivery_attempt=max(
                (a for w in pool.workers for a in w.attempts.values()), default=0
            ),
            empty_queue_drain_s=supervisor.time_empty_drain(pool.env),
        )
        try:
            return verdict.report(c, site, ledger, self.faults, outcome)
        finally:
            site.proxy.close()


def table(report: dict, fault_log: list) -> str:
    rows = [(k, v) for k, v in report.items() if k not in ("problems", "faults")]
    rows += [(f"faults.{k}", v) for k, v in report["faults"].items()]
    width = max(len(k) for k, _ in rows)
    lines = [f"{k:<{width}}  {v}" for k, v in rows]
    lines += ["", "faults injected:"] + [f"  {json.dumps(f)}" for f in fault_log]
    lines += ["", "problems:"] + [f"  {p}" for p in report["problems"] or ["none"]]
    return "\n".join(lines)


COUNTS = ("workers", "max_messages", "tracks", "duplicates", "second_jobs", "reuploads", "bad")


def main(argv=None) -> int:
    defaults = Config()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    for name in COUNTS:
        option = "--" + name.replace("_", "-")
        parser.add_argument(option, type=int, default=getattr(defaults, name))
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
    config = Config(
        **{name: getattr(args, name) for name in COUNTS},
        faults={k: int(v) for k, v in (item.split("=") for item in args.faults.split(",") if item)},
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
