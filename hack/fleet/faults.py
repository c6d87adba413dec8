"""The faults: a seeded plan (each fault asked for, due at a random moment of the fault window)
and how each kind is applied.

- sigkill_separation, sigterm: a worker separating a track gets the signal (SIGTERM's exit code
  and how long the worker took to exit are recorded: 75 within 10 s, or the verdict says so).
- sigkill_upload: SIGKILL in the moment between a track's stems and its manifest (its manifest
  write held at the fleet's GCS proxy, hack/gcs_proxy.py, then dropped).
- sigstop_race: SIGSTOP (mid-separation, or between the stems and the manifest) past the lease,
  then SIGCONT once another worker has taken the same message and gone as far: both then write
  the same track.
- gcs_restart: the GCS stand-in killed and restarted, its data kept; pubsub_outage: the Pub/Sub
  emulator frozen (SIGSTOP of its process group: unreachable, state kept; a killed emulator
  would lose every message, which real Pub/Sub never does).

A fault due with no worker to aim at waits for one; one whose moment passed before it was aimed
(the track's manifest was written already) is planned again (up to 8 misses a run); what is
still planned when the run ends is reported, not injected.
"""

import json
import os
import signal
import threading
import time

from job.drain import LEASE_S  # a frozen or killed worker's messages are back after this
from job.storage.base import CLAIM, MANIFEST

from .config import RELEASE, Config

OUTAGES = ("gcs_restart", "pubsub_outage")  # the other kinds aim at a worker


class Plan:
    """The seeded plan: each fault asked for, due at a random moment of the fault window."""

    def __init__(self, rng, config: Config, log):
        self.due = sorted(
            (round(rng.uniform(5, config.fault_window_s), 1), kind)
            for kind, count in config.faults.items()
            for _ in range(count)
        )  # (seconds after the start, kind), soonest first
        self.log = log
        self.skipped: list[str] = []
        self.misses = 0

    def __str__(self) -> str:
        return ", ".join(f"{k}@{t}s" for t, k in self.due)

    def again(self, kind: str) -> None:
        """A fault whose moment passed unseen is due again at once (8 times a run at most)."""
        self.misses += 1
        if self.misses <= 8:
            self.due.append((0.0, kind))

    def give_up(self) -> None:
        """Every message has its result: what is still planned has no track left to aim at."""
        if self.due:
            self.log(f"  no target left for {self.due}")
            self.skipped += [k for _, k in self.due]
            self.due.clear()

    def not_injected(self) -> list:
        return self.skipped + [k for _, k in self.due]


class Faults:
    """The plan under way: fires what is due, keeps the record of what was injected."""

    def __init__(self, config: Config, rng, site, pool, plan: Plan, t0: float):
        self.config, self.rng, self.site, self.pool = config, rng, site, pool
        self.plan, self.t0 = plan, t0
        self.records: list[dict] = []  # one per fault injected (or missed)
        self.threads: list[threading.Thread] = []
        self.last_kill = 0.0

    def fire_due(self) -> None:
        for item in [(t, k) for t, k in self.plan.due if time.time() - self.t0 >= t]:
            if self.inject(item[1]):
                self.plan.due.remove(item)

    def quiet(self) -> bool:
        """No fault under way, and a lease's time since the last SIGKILL or SIGSTOP: what such a
        worker held has come back and can be counted."""
        busy = any(w.stopped for w in self.pool.workers) or any(t.is_alive() for t in self.threads)
        return not busy and (not self.last_kill or time.time() - self.last_kill > LEASE_S + 5)

    def exited(self, worker) -> None:
        """How a worker that a fault SIGTERMed exited, and how soon (the verdict checks both)."""
        if worker.signalled and worker.signalled[0] == "SIGTERM":
            fault = next(
                f
                for f in self.records
                if f.get("worker") == worker.number and f["kind"] == "sigterm"
            )
            fault["exit_code"] = worker.exit_code
            fault["exit_after_s"] = round(worker.ended - worker.signalled[1], 1)

    def inject(self, kind: str) -> bool:
        """Inject `kind` now if it has a target; True when done (or under way)."""
        t = round(time.time() - self.t0, 1)
        if kind in OUTAGES:
            fault = {"kind": kind, "t": t, "down_s": round(self.rng.uniform(4, 12), 1)}
            self.records.append(fault)
            self.in_background(outage, self.site, fault)
            return True
        at = aim(kind, self.config.race_at, self.rng)
        if not (targets := candidates(self.pool, at)):
            return False
        worker = self.rng.choice(targets)
        aimed = worker.finishing if at == "upload" else worker.message
        fault = {"kind": kind, "t": t, "worker": worker.number}
        fault.update(jobId=aimed.job_id, track=aimed.track)
        self.records.append(fault)
        if kind in ("sigkill_separation", "sigterm"):
            self.send(worker, signal.SIGKILL if kind == "sigkill_separation" else signal.SIGTERM)
            return True
        if kind == "sigstop_race":
            fault["at"] = at
        worker.signalled = ("pending", time.time())
        self.in_background(
            kill_mid_upload if kind == "sigkill_upload" else stall, self, worker, fault
        )
        return True

    def send(self, worker, sig: int) -> None:
        worker.signalled = (signal.Signals(sig).name, time.time())
        if sig in (signal.SIGKILL, signal.SIGSTOP):
            self.last_kill = time.time()
        try:
            worker.process.send_signal(sig)
        except ProcessLookupError:
            pass

    def in_background(self, target, *args) -> None:
        thread = threading.Thread(target=target, args=args, daemon=True)
        thread.start()
        self.threads.append(thread)

    def missed(self, worker, fault: dict) -> None:
        """The upload ended before the poll saw its moment: plan the fault again."""
        fault["missed"] = True
        worker.signalled = None
        self.plan.again(fault["kind"])


def aim(kind: str, race_at: str, rng) -> str:
    """Where a fault of `kind` hits: "separate" (mid-separation) or "upload" (mid-upload)."""
    if kind == "sigkill_upload" or (kind == "sigstop_race" and race_at == "upload"):
        return "upload"
    if kind == "sigstop_race" and race_at == "random":
        return rng.choice(["separate", "upload"])
    return "separate"


def candidates(pool, at: str) -> list:
    """Workers not yet signalled, uploading a track (`at` upload) or separating one."""
    active = [w for w in pool.active() if w.signalled is None]
    if at == "upload":
        return [w for w in active if w.finishing is not None]
    return [w for w in active if w.phase == at and w.message is not None]


def between_stems_and_manifest(site, worker):
    """Hold the manifest write of the worker's uploading track at the fleet's GCS proxy: once
    it arrives every file of the set is up and the manifest is not. The hold (its `.written`:
    the files rewritten, read while it holds), or None when the worker got past the moment
    before the hold was set (the track ended, or the worker did).

    A writer sends its manifest only after its stems, so the held write is the moment itself,
    however loaded the machine: nothing depends on a poll catching a two-request window."""
    message = worker.finishing
    prefix = f"stems/{RELEASE}/{message.track}/"
    job = f'"jobId": {json.dumps(message.job_id)}'.encode()  # not another job's for the track
    hold = site.proxy.hold(lambda name, body: name == prefix + MANIFEST and job in body)
    deadline = time.time() + 120
    while time.time() < deadline and worker.process.poll() is None and worker.finishing is message:
        if hold.arrived.wait(0.05):
            hold.written = len(set(site.listing(prefix)) - {MANIFEST, CLAIM})
            return hold
    if hold in site.proxy.holds:
        site.proxy.holds.remove(hold)
    if hold.arrived.is_set():  # it came in as the worker was seen going on
        hold.release()
    return None


def kill_mid_upload(faults: Faults, worker, fault: dict) -> None:
    if not (hold := between_stems_and_manifest(faults.site, worker)):
        return faults.missed(worker, fault)
    faults.send(worker, signal.SIGKILL)
    hold.release(forward=False)  # the killed writer's manifest never reaches the service
    fault["stems_written"] = hold.written
    time.sleep(0.5)
    fault["manifest_after_kill"] = faults.site.vouched(f"stems/{RELEASE}/{fault['track']}/")


def stall(faults: Faults, worker, fault: dict) -> None:
    """SIGSTOP, then SIGCONT once another worker has taken the same message (its lease ran out)
    and gone as far (or after the lease and 90 s more). At the upload, the frozen writer's
    held manifest write goes on to the service just before SIGCONT: it arrives late, as a
    stale writer's would."""
    hold = None
    if fault["at"] == "upload":
        if not (hold := between_stems_and_manifest(faults.site, worker)):
            return faults.missed(worker, fault)
        fault["stems_written"] = hold.written
    message = worker.finishing if fault["at"] == "upload" else worker.message
    worker.stopped = True
    faults.send(worker, signal.SIGSTOP)
    deadline = time.time() + LEASE_S + 90
    while time.time() < deadline:
        if (other := racer(faults.pool, worker, message, fault["at"])) is not None:
            fault["raced_with"] = other.number
            break
        time.sleep(0.05)
    fault["stopped_s"] = round(time.time() - worker.signalled[1], 1)
    if hold is not None:
        hold.release()
    worker.process.send_signal(signal.SIGCONT)
    worker.stopped = False


def racer(pool, frozen, message, at: str):
    """Another worker that took `message` and has separated it (or moved on, or ended); for a
    race at the upload, one that has uploaded it too. None while there is none."""
    others = [
        w
        for w in pool.workers
        if w is not frozen
        and message.message_id in w.attempts
        and (w.message is not message or w.phase == "idle" or w.exit_code is not None)
    ]
    if others and (at == "separate" or others[0].finishing is not message):
        return others[0]
    return None


def outage(site, fault: dict) -> None:
    """Take a stand-in away for the fault's `down_s`, then bring it back."""
    try:
        if fault["kind"] == "gcs_restart":
            site.gcs.kill()
            time.sleep(fault["down_s"])
            site.gcs.start()
        else:
            os.killpg(site.pubsub.process.pid, signal.SIGSTOP)
            time.sleep(fault["down_s"])
            os.killpg(site.pubsub.process.pid, signal.SIGCONT)
    except Exception as exc:  # reported; the verdict still runs
        fault["error"] = repr(exc)
