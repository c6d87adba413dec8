"""The supervisor: keeps up to `workers` `stem-job drain --max-messages K` processes running,
as a KEDA ScaledJob would, starting another when one exits, until every message has its result;
then lets the workers run dry. A worker frozen by SIGSTOP does not hold a slot (KEDA sees its
redelivered message as backlog and starts a Job for it).

It reads each worker's log only to know what the worker is doing, so that the faults can aim;
the verdict never reads a log.
"""

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from .config import MAX_DURATION_S, Config

REPO = Path(__file__).resolve().parents[2]


@dataclass
class Worker:
    number: int
    process: subprocess.Popen
    started: float
    phase: str = "start"  # of `message`: start, fetch, separate, idle
    message: object = None  # the workload.Message being fetched or separated
    finishing: object = None  # separated, its outputs being uploaded (beside the next)
    stopped: bool = False
    signalled: tuple | None = None  # (signal name, time)
    exit_code: int | None = None
    ended: float = 0.0
    attempts: dict = field(default_factory=dict)  # message_id -> delivery attempt


def worker_env(config: Config, site, model_dir: Path, workdir: Path) -> dict:
    """A drain worker's environment: the stand-ins, this run's names, the generated model."""
    env = {k: v for k, v in os.environ.items() if k not in ("JOB_MESSAGE", "INPUT_DIR")}
    env.update(
        site.pubsub.env,
        **site.proxy.env,
        PYTHONPATH=str(REPO),
        MODEL_DIR=str(model_dir),
        DEVICE="cpu",
        LOG_FORMAT="json",
        PYTHONUNBUFFERED="1",
        STORAGE_MODE="gcs",
        PROCESSING_MODE="pubsub",
        GCS_BUCKET=site.bucket,
        OUTPUT_DIR=str(workdir / "unused"),
        PUBSUB_SUBSCRIPTION=site.subscription.rsplit("/", 1)[1],
        PUBSUB_RESULTS_TOPIC=site.results_topic.rsplit("/", 1)[1],
        IDLE_TIMEOUT_S=str(config.idle_timeout_s),
        RETRY_DEADLINE_S="60",
        MAX_DURATION_S=str(MAX_DURATION_S),
    )
    return env


def observe(worker: Worker, text: str, ledger) -> None:
    """Move `worker` on by one line of its log (the message of a JSON log record)."""
    if match := re.match(r"message (\S+) \(delivery attempt (\d+)\)", text):
        worker.message = ledger.message(match.group(1))
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


class Pool:
    """The drain processes of one run, each followed by a thread that keeps its log."""

    def __init__(self, config: Config, env: dict, workdir: Path, ledger):
        self.config, self.env, self.workdir, self.ledger = config, env, workdir, ledger
        self.workers: list[Worker] = []
        (workdir / "workers").mkdir(parents=True, exist_ok=True)

    def top_up(self) -> None:
        for _ in range(self.config.workers - len(self.active())):
            self.start()

    def start(self) -> None:
        argv = ["-m", "job", "drain", "--max-messages", str(self.config.max_messages)]
        process = subprocess.Popen(
            [sys.executable, *argv],
            env=self.env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            cwd=self.workdir,
        )
        worker = Worker(len(self.workers), process, time.time())
        self.workers.append(worker)
        threading.Thread(target=self.follow, args=(worker,), daemon=True).start()

    def follow(self, worker: Worker) -> None:
        with open(self.workdir / "workers" / f"w{worker.number:03d}.log", "w") as out:
            for line in worker.process.stderr:
                out.write(line)
                try:
                    text = json.loads(line).get("message", "")
                except ValueError:
                    text = line
                observe(worker, text, self.ledger)

    def reap(self) -> list:
        """The workers that have exited since the last call, their exit recorded."""
        exited = [w for w in self.running() if w.process.poll() is not None]
        for worker in exited:
            worker.exit_code, worker.ended = worker.process.returncode, time.time()
        return exited

    def running(self) -> list:
        return [w for w in self.workers if w.exit_code is None]

    def active(self) -> list:
        """Running and not frozen: the workers that hold a slot."""
        return [w for w in self.running() if not w.stopped]

    def end(self) -> None:
        """Kill what still runs (only after the wall-clock bound)."""
        for worker in self.running():
            worker.process.send_signal(signal.SIGCONT)
            worker.process.kill()
            worker.process.wait()


def supervise(config: Config, pool: Pool, faults, ledger, t0: float) -> bool:
    """Run the pool and the faults until every message has its result and the workers have run
    dry, or `config.max_wall_s` has passed: whether every message had its result by then."""
    done = False
    while time.time() < t0 + config.max_wall_s:
        for worker in pool.reap():
            faults.exited(worker)
        faults.fire_due()
        if not done and faults.quiet() and ledger.complete():
            faults.plan.give_up()  # nothing left to hand out: let the workers run dry
            done = True
        if done and not pool.running():
            break
        if not done:
            pool.top_up()
        time.sleep(0.2)
    return done


def time_empty_drain(env: dict) -> float:
    """What a surplus job costs: `drain` on the drained subscription, start to exit, with
    IDLE_TIMEOUT_S=1 (so the figure is the start-up cost plus one second)."""
    started = time.time()
    subprocess.run(
        [sys.executable, "-m", "job", "drain", "--max-messages", "1"],
        env={**env, "IDLE_TIMEOUT_S": "1"},
        capture_output=True,
        timeout=120,
    )
    return round(time.time() - started, 2)
