"""One track end to end: fetch (locate, skip if done, download, decode), separate while the
encoders run, store the outputs and their peaks and then the manifest. `start()` stops once the
model is free (a PendingResult does the rest), so a drain's next track separates meanwhile.

`process()` never raises for a failure it understands: it returns the stem-results dict,
`failed` with an error code when something is wrong, so every caller (run, drain, HTTP)
reports and moves on the same way. Only a ConfigError (the model cannot load, no CUDA device)
escapes: no track can succeed then, and the caller exits 78.
"""

import logging
import math
import resource
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from job import manifest, messages, outputs
from job.audio import decode as audio
from job.audio.encode import Encoding, MixMeter, open_encoders
from job.config import Settings
from job.errors import Cancel, ConfigError, Interrupted, JobError
from job.intake import Intake
from job.progress import Progress, stage
from job.storage.base import Storage

if TYPE_CHECKING:  # torch comes with these: the model's background load imports it
    from job.separation.engine import Engine
    from job.separation.model import ModelCache

log = logging.getLogger(__name__)


@dataclass
class Job:
    """What one call of `process` needs besides the request."""

    settings: Settings
    storage: Storage
    model_cache: "ModelCache"
    cancel: Cancel = field(default_factory=Cancel)
    on_progress: object = None  # callable(fraction) for progress events
    attempt: int | None = None  # earlier tries of this message (0: first); None: unknown

    def fetch(
        self, request: messages.JobRequest, trusted: bool = False, ahead: bool = False
    ) -> Intake:
        return Intake(
            request,
            self.storage,
            self.settings,
            self.cancel,
            model_cache=self.model_cache,
            trusted=trusted,
            ahead=ahead,
            attempt=self.attempt,
        )


def process(
    request: messages.JobRequest, job: Job, trusted: bool = False, fetch: Intake | None = None
) -> dict:
    """Separate one track; the stem-results dict, completed or failed.

    Parameters:
        request: the validated message (messages.parse_message or make_request).
        job: settings, storage, model cache, the cancel flag and the attempt count.
        trusted: the original came from our own caller (a CLI path, an HTTP upload), not a
            message: local paths outside INPUT_DIR are allowed.
        fetch: an Intake started earlier (drain fetches the next track while this one
            separates); without it the track is fetched here.

    Returns the result message (DESIGN.md's stem-results schema): `completed` with the stems'
    URLs, timings and figures (`reused` when a complete set was found), or `failed` with the
    error's code, message and `retryable`. Raises only what is not the track's fault (a
    configuration error). timings["total"] is this call's wall time: a fetch done ahead, in
    the shadow of the previous track, shows only in its stages.
    """
    return start(request, job, trusted, fetch).result()


def start(
    request: messages.JobRequest, job: Job, trusted: bool = False, fetch: Intake | None = None
) -> "PendingResult":
    """Fetch and separate one track, and return what is left to do (the encoders' tail, the
    upload, the manifest) as a PendingResult: the model is free once this returns, so a drain
    separates its next track while this one finishes in another thread."""
    pending = PendingResult(request, job, fetch or job.fetch(request, trusted))
    pending.run(lambda: _process(request, job, pending.fetch, pending.timings, pending.engine))
    return pending


class PendingResult:
    """One track between its separation and its result; `result()` does the rest, once."""

    def __init__(self, request, job: Job, fetch: Intake):
        self.request, self.job, self.fetch = request, job, fetch
        self.timings = fetch.timings
        self.engine = {}  # the engine's figures for this track, recorded when it separated
        self.started = time.monotonic()
        self.next_step = None  # the remaining step; None once there is none
        self.outcome = None

    def run(self, work) -> None:
        """Run one step; a failure it understands becomes the failed result. Only a
        ConfigError escapes (no track can succeed: the caller exits 78)."""
        self.next_step = None
        try:
            done = work()
            if callable(done):
                self.next_step = done
            else:
                self.outcome = done
        except JobError as error:
            log.warning(
                "job %s failed: %s (%s)",
                self.request.job_id,
                error.message,
                error.code,
                extra={"labels": labels(self.request)},
            )
            self._failed(error)
        except ConfigError:
            raise
        except Exception as exc:  # a fault we did not foresee: report it, a retry may help
            log.exception(
                "job %s failed unexpectedly",
                self.request.job_id,
                extra={"labels": labels(self.request)},
            )
            self._failed(JobError("internal_error", f"{type(exc).__name__}: {exc}", retryable=True))
        finally:
            if self.next_step is None:  # the result is known, or nothing more will run
                self.close()

    def _failed(self, error: JobError) -> None:
        self.outcome = messages.failed_result(
            messages.request_ids(self.request),
            error,
            model=self.job.settings.model_name,
            timings=self.timings,
        )

    def close(self) -> None:
        if self.fetch is None:
            return
        self.fetch.close()
        self.timings["total"] = round(time.monotonic() - self.started, 3)
        if self.outcome is not None:
            log_summary(self.request, self.outcome, self.job, self.fetch, self.engine)
        self.fetch = None

    def result(self) -> dict:
        """The stem-results dict, completed or failed (doing the rest first if needed)."""
        if self.next_step is not None:
            self.run(self.next_step)
        return self.outcome


def labels(request: messages.JobRequest) -> dict:
    """The request's ids as log labels (Cloud Logging takes strings only: no artistId=None)."""
    return {key: value for key, value in messages.request_ids(request).items() if value}


def peak_memory_mb(engine: dict) -> dict:
    """This process's peak RSS, and the device's peak during this track's separation as the
    engine recorded it (read later, the device's counter may already be the next track's)."""
    return {
        "peakRssMb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "peakGpuMemoryMb": engine.get("devicePeakMb"),
    }


def log_summary(request, result: dict, job: Job, fetch: Intake, engine: dict) -> None:
    """One line per job with the figures of the result: log-based metrics chart these."""
    timings = result.get("timings", {})
    error = result.get("error") or {}
    fields = {
        "event": "job_summary",
        "outcome": result["status"],
        "jobId": request.job_id,
        "model": job.settings.model_name,
        "device": str(job.model_cache.device) if job.model_cache.loaded else None,
        "durationS": result.get("durationS"),
        "rtf": result.get("rtf"),
        "reused": result.get("reused", False),
        "timings": timings,
        "errorCode": error.get("code"),
        "retryable": error.get("retryable"),
        "fetchedAhead": fetch.ahead,
        **peak_memory_mb(engine),
    }
    stages = " ".join(f"{k}={v}s" for k, v in timings.items())
    log.info(
        "job %s %s%s: %s, audio %s s, rtf %s",
        request.job_id,
        result["status"],
        f" ({error.get('code')})" if error else "",
        stages,
        fields["durationS"],
        fields["rtf"],
        extra={"labels": labels(request), "json_fields": fields},
    )


def _process(request, job: Job, fetch: Intake, timings: dict, record: dict) -> dict:
    s, storage = job.settings, job.storage
    asked = messages.outputs_of(request, s.outputs)
    fetched = fetch.wait()
    found = fetched.manifest
    if fetched.decoded is not None and fetch.ahead:
        # fetched while an earlier message ran: that one may have completed this very set
        with stage(timings, "locate"):
            found = storage.read_manifest(request.release_id, request.track_id)
    model = job.model_cache.identity()
    if manifest.matches(found, fetched.original.identity, manifest.Recipe.of(s), asked, model):
        log.info(
            "job %s: outputs already complete for this input, not separating again", request.job_id
        )
        return reused(request, found, timings)

    decoded, scratch = fetched.decoded, fetched.scratch
    progress = Progress(request.job_id, job.on_progress)
    separator = job.model_cache.engine()
    chosen = outputs.plan(asked, separator.sources)  # bad input: names the model cannot make
    model = dict(model, sources=list(separator.sources))
    finish_encoders, engine = _separate(
        decoded, separator, scratch, s, job, progress, timings, chosen
    )
    record.update(engine)  # this track's, whatever the engine does next
    return lambda: _store(request, job, fetched, model, finish_encoders(), timings, chosen)


def _store(request, job: Job, fetched, model, encoded, timings, chosen) -> dict:
    """The outputs uploaded, then the manifest (its presence means the set is complete). When
    another job completed a set for the same request meanwhile, that set stands and the result
    points at it."""
    s, storage, decoded = job.settings, job.storage, fetched.decoded
    files, stats, mix, engine = encoded
    if job.cancel.is_set():
        raise Interrupted()
    with stage(timings, "upload"):
        with storage.commit(request.release_id, request.track_id) as commit:
            urls = commit.write_stems(files)
            if job.cancel.is_set():  # SIGTERM during the uploads: no manifest, the claim stays
                raise Interrupted()
            built = manifest.build(
                request,
                manifest.Recipe.of(s),
                fetched.original.identity,
                decoded,
                chosen,
                files,
                urls,
                stats,
                mix,
                engine,
                model,
            )
            standing = commit.write_manifest(built)
    if standing is not built:
        return reused(request, standing, timings)
    duration = decoded.duration_s
    return messages.completed_result(
        request,
        manifest.urls(built),
        outputs=manifest.summary(built),
        **manifest.model_fields(built),
        durationS=round(duration, 3),
        reused=False,
        device=engine["device"],
        timings=timings,
        rtf=round(duration / max(timings.get("separate", 0) + timings.get("decode", 0), 1e-6), 2),
    )


def reused(request, found: dict, timings) -> dict:
    """The completed result of a set already stored, which this call did not write."""
    return messages.completed_result(
        request,
        manifest.urls(found),
        outputs=manifest.summary(found),
        **manifest.model_fields(found),
        reused=True,
        durationS=found.get("durationS"),
        timings=timings,
    )


def pickers(sources, chosen) -> dict:
    """{output: function(block, mix) -> what its encoder takes}: a source of the engine's
    (sources, 2, n) block; a mix, the float sum of its sources before any limiting (always in
    the model's order, so `instrumental` and `no_vocals` are the same samples); or, for
    ni_stems, the (5, 2, n) stack of the input's own block (`mix`) and the four NI stems."""

    def summed(indices):
        if not indices:  # an NI stem the model has no source for: silence
            return lambda block, mix: np.zeros_like(block[0])
        if len(indices) == 1:
            return lambda block, mix: block[indices[0]]
        return lambda block, mix: block[list(indices)].sum(0)

    def pick(name):
        if name != outputs.NI_STEMS:
            return summed(outputs.parts(name, sources))
        slots = [summed(indices) for indices in outputs.ni_slots(sources)]
        return lambda block, mix: np.stack([mix] + [slot(block, mix) for slot in slots])

    return {name: pick(name) for name in chosen}


def _separate(
    decoded, separator: "Engine", scratch, s: Settings, job: Job, progress, timings, chosen
):
    """Run the engine, feeding each finished block to the concurrent encoders (and the input's
    own blocks to the mix's loudness meter). Returns a function that waits for the encoders'
    tail and returns the files to upload ({output: audio, "OUTPUT.peaks": peaks}), each
    output's figures, the mix's loudness figures and the engine's; and the engine's figures."""
    sources = separator.sources
    slots = {
        slot: [sources[i] for i in indices]
        for slot, indices in zip(outputs.NI_SLOTS, outputs.ni_slots(sources), strict=True)
    }
    encoders = open_encoders(scratch, chosen, Encoding.of(s), slots)
    workers, reader, mix_reader = dict(encoders), None, None
    try:
        picks = pickers(sources, chosen)
        reader = audio.RawReader(decoded)
        if s.output_analysis or outputs.NI_STEMS in chosen:  # the meter, the NI mix track
            mix_reader = audio.RawReader(decoded)
        if s.output_analysis:
            workers["mix"] = MixMeter()

        def emit(start, block):
            mix = None if mix_reader is None else mix_reader.read(start, start + block.shape[-1])
            for name, encoder in encoders.items():
                encoder.put(picks[name](block, mix))
            if "mix" in workers:
                workers["mix"].put(mix)

        with stage(timings, "separate"):
            figures = separator.separate(
                reader.read,
                decoded.length,
                decoded.mean,
                decoded.std,
                emit,
                progress=progress.update,
                cancel=job.cancel,
            )
    except BaseException:
        _wait_for_encoders(workers, timings)  # the separation's error is the one reported
        raise
    finally:
        for opened in (reader, mix_reader):
            if opened is not None:
                opened.close()
        progress.close()
    probe = separator.probe_db  # None: not probed; -inf (not JSON): reduced was not finite
    engine = {
        "device": str(separator.device),
        "precision": separator.precision,
        "probeDb": round(probe, 2) if probe is not None and math.isfinite(probe) else None,
        **figures,
    }  # read now: the separator moves on to the next track

    def encoded():
        stats, errors = _wait_for_encoders(workers, timings)
        if errors:
            raise JobError(
                "encode_failed", f"encoding an output failed: {errors[0]}", retryable=True
            )
        files = {}
        for name, encoder in encoders.items():
            files[name] = encoder.path
            if encoder.peaks_path is not None:
                files[f"{name}.peaks"] = encoder.peaks_path
        return files, stats, stats.pop("mix", None), engine

    return encoded, engine


def _wait_for_encoders(workers: dict, timings) -> tuple[dict, list]:
    """Wait for every encoder and meter: ({name: figures}, [errors])."""
    stats, errors = {}, []
    with stage(timings, "encode"):
        for name, worker in workers.items():
            try:
                stats[name] = worker.finish()
            except Exception as exc:
                errors.append(exc)
    return stats, errors
