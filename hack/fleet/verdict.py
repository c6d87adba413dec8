"""The verdict of a soak run, read from storage and the results topic only: nothing lost (every
message has its result, nothing left on the work or dead-letter subscription, every good track
has a complete set), no set mixed or stale, no stems of no track, no wrong result; then the
run's figures. `report` keeps the keys and their order: they are hack/soak's JSON output."""

import statistics
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from job.messages import STEMS
from job.storage.base import PUBLISHED

from .config import FAULT_KINDS, RELEASE
from .ledger import result_key
from .sets import check_track


@dataclass
class Outcome:
    """What the supervisor says of the run, beside what storage and the results say."""

    t0: float
    finished: float
    timed_out: bool
    not_injected: list  # fault kinds planned and never injected
    worker_starts: int
    max_delivery_attempt: int
    empty_queue_drain_s: float


@dataclass
class Tally:
    """The results against the messages."""

    wrong: int = 0
    lost: int = 0
    duplicates: int = 0
    latencies: list = field(default_factory=list)  # publish -> result, seconds


def leftover(site, subscription: str) -> int:
    """How many messages `subscription` still has (taken off it). An empty pull waits ~2 s on
    the emulator; two of them, so that a batch it returns short is counted whole."""
    return sum(len(site.take(subscription, 3)) for _ in range(2))


def read_storage(site, ledger, tracks: list) -> tuple:
    """(left on the work subscription, dead-lettered, each track's state, the problems found, in
    that order): the reads run side by side, as they mostly wait on the stand-ins."""
    with ThreadPoolExecutor(8) as pool:
        left = pool.submit(leftover, site, site.subscription)
        dead = pool.submit(leftover, site, site.dead_sub)
        checks = [pool.submit(track_problems, site, ledger, track) for track in tracks]
    left, dead, checks = left.result(), dead.result(), [c.result() for c in checks]
    problems = [f"{left} message(s) still on the work subscription"] if left else []
    problems += [f"{dead} message(s) dead-lettered"] if dead else []
    for _, found in checks:
        problems += found
    return left, dead, [state for state, _ in checks], problems


def track_problems(site, ledger, track: str) -> tuple:
    """(the state of `track`'s set, what is wrong with it)."""
    problems = []
    return check_track(site, ledger.durations, track, problems), problems


def tally_results(site, ledger, problems: list) -> Tally:
    """Match every result to its messages (by ledger.result_key) and judge each group."""
    tally, groups = Tally(), {}
    for m in ledger.messages:
        groups.setdefault(m.key(), ([], []))[0].append(m)
    for result, at in ledger.results:
        key = result_key(result)
        if key not in groups:
            tally.wrong += 1
            problems.append(f"a result for no message: {key}")
            continue
        groups[key][1].append((at, result))
    for key, (messages, results) in groups.items():
        judge(site, ledger, key, messages, sorted(results, key=lambda r: r[0]), tally, problems)
    return tally


def judge(site, ledger, key, messages: list, results: list, tally: Tally, problems: list) -> None:
    """One jobId's messages (or one unreadable kind's) against its results, oldest first."""
    example = messages[0]
    for _, result in results:
        code = (result.get("error") or {}).get("code")
        if result["status"] != example.expect or (
            example.expect == "failed" and code != example.code
        ):
            tally.wrong += 1
            problems.append(
                f"{key}: {result['status']} {code}, expected {example.expect} {example.code}"
            )
        elif example.expect == "completed" and not fits(site, ledger, example.track, result):
            tally.wrong += 1
            problems.append(f"{key}: result stems/duration do not fit {example.track}")
    track = example.track
    if track in ledger.reuploaded and not any(
        at >= ledger.reuploaded[track]
        and abs(r.get("durationS", 0) - ledger.durations[track][-1]) < 0.1
        for at, r in results
        if r["status"] == "completed"
    ):
        tally.wrong += 1
        problems.append(f"{key}: no result for the re-uploaded original")
    sent = sorted(m.published for m in messages)
    missing = len(sent) - len(results)
    if missing > 0:
        tally.lost += missing
        problems.append(f"{key}: {len(results)} result(s) for {len(sent)} message(s)")
    tally.duplicates += max(0, -missing)
    tally.latencies += [at - p for p, (at, _) in zip(sent, results, strict=False)]


def fits(site, ledger, track: str, result: dict) -> bool:
    """A completed result names the track's six stems and the duration of one of its versions."""
    urls = {stem: f"/{site.bucket}/stems/{RELEASE}/{track}/{stem}.mp3" for stem in STEMS}
    return (
        set(result["stems"]) == set(STEMS)
        and all(result["stems"][s].endswith(urls[s]) for s in STEMS)
        and any(abs(result.get("durationS", -1) - d) < 0.1 for d in ledger.durations[track])
    )


def latency_figures(latencies: list) -> dict:
    q = (
        statistics.quantiles(latencies, n=20, method="inclusive")
        if len(latencies) >= 2
        else latencies * 19
    )
    return {
        "p50_publish_to_result_s": round(statistics.median(latencies), 1) if latencies else None,
        "p95_publish_to_result_s": round(q[18], 1) if latencies else None,
        "max_publish_to_result_s": round(max(latencies), 1) if latencies else None,
    }


def report(config, site, ledger, faults: list, outcome: Outcome) -> dict:
    """The verdict and figures of a run; `faults` is the record of what was injected."""
    tracks = sorted({m.track for m in ledger.messages if m.track})
    left, dead, states, problems = read_storage(site, ledger, tracks)
    stem_prefixes = {  # not the drain's published-records (stems/.published/), no set's
        b.name.rsplit("/", 1)[0]
        for b in site.storage.list_blobs(site.bucket, prefix="stems/")
        if not b.name.startswith(f"stems/{PUBLISHED}/")
    }
    orphans = sorted(p for p in stem_prefixes if p.rsplit("/", 1)[1] not in tracks)
    problems += [f"{p}: stems of no good track" for p in orphans]
    tally = tally_results(site, ledger, problems)
    separations = sum(
        1 for r, _ in ledger.results if r["status"] == "completed" and r.get("reused") is False
    )
    needed = len(tracks) + len(ledger.reupload_tracks)
    span = max((at for _, at in ledger.results), default=outcome.t0) - outcome.t0
    sigterm = [f for f in faults if f["kind"] == "sigterm"]
    problems += [
        f"SIGTERM: worker exited {f.get('exit_code')} after {f.get('exit_after_s')} s"
        for f in sigterm
        if f.get("exit_code") != 75 or f.get("exit_after_s", 99) > 10
    ]
    if outcome.timed_out:
        problems.append(f"not finished within {config.max_wall_s:.0f} s")
    figures = {
        "messages": len(ledger.messages),
        "tracks": len(tracks),
        "workers": config.workers,
        "max_messages": config.max_messages,
        "faults": {
            kind: sum(1 for f in faults if f["kind"] == kind and not f.get("missed"))
            for kind in FAULT_KINDS
        },
        "faults_not_injected": outcome.not_injected,
        "lost": tally.lost + left + dead + states.count("missing"),
        "mixed_sets": states.count("mixed"),
        "stale_sets": states.count("stale"),
        "orphan_stems": len(orphans),
        "wrong_results": tally.wrong,
        "redundant_separations": max(0, separations - needed),
        "duplicate_results": tally.duplicates,
        "stems_left_by_kill": sum(
            1
            for f in faults
            if f["kind"] == "sigkill_upload"
            and f.get("stems_written")
            and not f.get("manifest_after_kill")
        ),
        "worker_starts": outcome.worker_starts,
        "wall_s": round(outcome.finished - outcome.t0, 1),
        "tracks_per_min": round(needed / max(span, 1e-6) * 60, 2),
        **latency_figures(tally.latencies),
        "sigterm_exit_s": [f.get("exit_after_s") for f in sigterm],
        "empty_queue_drain_s": outcome.empty_queue_drain_s,
        "max_delivery_attempt": outcome.max_delivery_attempt,
        "seed": config.seed,
        "problems": problems,
    }
    figures["ok"] = not problems and figures["mixed_sets"] == 0
    return figures
