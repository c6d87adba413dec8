"""One track end to end: locate, (skip if done), fetch, decode, separate+encode, store.

`process()` never raises for a failure it understands: it returns the stem-results dict,
`failed` with an error code when something is wrong, so every caller (run, drain, HTTP)
reports and moves on the same way.
"""

import contextlib
import datetime
import logging
import resource
import threading
import time
from dataclasses import dataclass, field

import torch

from . import audio, messages
from .config import Settings
from .encode import open_encoders
from .engine import Separator, bag_of
from .errors import Cancel, ConfigError, Interrupted, JobError
from .logs import platform_labels
from .model import load_model, pick_device
from .progress import Progress
from .storage import CONTENT_TYPES, sha256_of

log = logging.getLogger(__name__)
MANIFEST_VERSION = 1
CANCELLED_FETCH_WAIT_S = 3.0


def auto_batch(device: torch.device) -> int:
    """Windows per forward pass: on CUDA as many as memory allows (~1.5 GB each in fp32)."""
    if device.type != "cuda":
        return 1
    free, _ = torch.cuda.mem_get_info(device)
    return int(max(1, min(16, free // (1536 * 2**20) - 1)))


class Engine:
    """The model, loaded on first use and kept for every later track of the process."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.device = pick_device(settings.device)
        self._separator = None
        self._lock = threading.Lock()

    @property
    def loaded(self) -> bool:
        return self._separator is not None

    def warm(self) -> None:
        """Start loading the model in the background (overlapping download and decode).

        A failure is only logged here: `separator()` tries again and raises it where the job
        reports errors."""
        if self._separator is not None or self._lock.locked():
            return

        def load():
            try:
                self.separator()
            except Exception as exc:
                log.debug("background model load failed (retried on use): %s", exc)
        threading.Thread(target=load, name="model-load", daemon=True).start()

    def separator(self) -> Separator:
        with self._lock:
            if self._separator is None:
                s = self.settings
                model = load_model(s.model_name, s.model_dir, self.device)
                precision = s.precision
                if precision == "auto":
                    precision = "bf16" if self.device.type == "cuda" else "fp32"
                if self.device.type == "cuda":
                    torch.backends.cudnn.benchmark = True
                self._separator = Separator(model, self.device,
                                            s.segment_batch or auto_batch(self.device),
                                            precision, s.shifts, s.seed,
                                            cpu_runners(model, self.device, s))
            return self._separator


def cpu_runners(model, device: torch.device, settings: Settings):
    """With CPU_BACKEND=onnx on CPU: ONNX Runtime for each HTDemucs of the model, else None."""
    if device.type != "cpu" or settings.cpu_backend != "onnx":
        return None
    from .onnx_network import OnnxHTDemucs, is_htdemucs
    models, _ = bag_of(model)
    if not all(is_htdemucs(m) for m in models):
        raise ConfigError("CPU_BACKEND=onnx needs an HTDemucs model; use CPU_BACKEND=torch")
    try:
        return [OnnxHTDemucs(m, settings.onnx_cache_dir) for m in models]
    except ImportError as exc:
        raise ConfigError(f"CPU_BACKEND=onnx but onnxruntime is not importable: {exc}") from None


@dataclass
class Job:
    """What one call of `process` needs besides the request."""

    settings: Settings
    storage: object
    engine: Engine
    cancel: threading.Event = field(default_factory=Cancel)
    on_progress: object = None        # callable(fraction) for progress events


def manifest_matches(manifest: dict | None, identity: dict, settings: Settings) -> bool:
    return bool(manifest) and manifest.get("input") == identity \
        and manifest.get("model") == settings.model_name \
        and manifest.get("format") == settings.output_format \
        and manifest.get("version") == MANIFEST_VERSION \
        and set(manifest.get("stems", {})) == set(messages.STEMS)


def process(request: messages.JobRequest, job: Job, trusted: bool = False,
            fetch: "Fetch | None" = None) -> dict:
    """Separate one track; the stem-results dict, completed or failed.

    `fetch` is a Fetch started earlier (drain fetches the next track while this one
    separates); without it the track is fetched here. timings["total"] is this call's wall
    time: a fetch done ahead, in the shadow of the previous track, shows only in its stages.
    """
    started = time.monotonic()
    fetch = fetch or Fetch(request, job, trusted)
    timings = fetch.timings
    result = None
    try:
        result = _process(request, job, fetch, timings)
    except JobError as error:
        log.warning("job %s failed: %s (%s)", request.job_id, error.message, error.code,
                    extra={"labels": labels(request)})
        result = messages.failed_result(messages.request_ids(request), error,
                                        model=job.settings.model_name, timings=timings)
    except ConfigError:
        raise
    except Exception as exc:  # a fault we did not foresee: report it, a retry may help
        log.exception("job %s failed unexpectedly", request.job_id,
                      extra={"labels": labels(request)})
        error = JobError("internal_error", f"{type(exc).__name__}: {exc}", retryable=True)
        result = messages.failed_result(messages.request_ids(request), error,
                                        model=job.settings.model_name, timings=timings)
    finally:
        fetch.close()
        timings["total"] = round(time.monotonic() - started, 3)
        if result is not None:
            log_summary(request, result, job)
    return result


@dataclass
class Fetched:
    """A track located and, unless its stems are already complete, downloaded and decoded."""

    original: object                      # storage.Original
    manifest: dict | None                 # the manifest found when locating
    decoded: audio.DecodedAudio | None = None  # None: the set is complete, nothing to separate
    scratch: object = None                # the job's temp folder (Path)


class Fetch:
    """Everything a track needs before the model: locate, skip check, download, decode.

    Runs at once in the caller's thread, or with `ahead=True` in a thread of its own so that a
    drain's next track downloads and decodes while the current one separates. A failure is
    kept and raised by `wait()`, in the caller's thread, so it is reported like any other.
    The scratch folder lives until `close()`.
    """

    def __init__(self, request, job: Job, trusted: bool = False, ahead: bool = False):
        self.request, self.job, self.trusted, self.ahead = request, job, trusted, ahead
        self.timings: dict = {}
        self._scratch = contextlib.ExitStack()
        self._outcome = None
        self._thread = None
        if ahead:
            self._thread = threading.Thread(target=self._run, daemon=True,
                                            name=f"fetch-{request.job_id}")
            self._thread.start()
        else:
            self._run()

    def _run(self):
        try:
            self._outcome = (self._fetch(), None)
        except BaseException as exc:   # re-raised by wait() in the caller's thread
            self._outcome = (None, exc)

    def _fetch(self) -> Fetched:
        request, job, storage = self.request, self.job, self.job.storage
        with _stage(self.timings, "locate"):
            original = storage.describe_original(request.original_uri, trusted=self.trusted)
            manifest = storage.read_manifest(request.release_id, request.track_id)
        if manifest_matches(manifest, original.identity, job.settings):
            return Fetched(original, manifest)
        job.engine.warm()              # the model loads while the audio downloads and decodes
        scratch = self._scratch.enter_context(storage.scratch())
        with _stage(self.timings, "download"):
            local = storage.fetch_original(original, scratch)
        with _stage(self.timings, "decode"):
            decoded = audio.decode_to_file(local, scratch / "mix.f32", job.settings.max_duration_s,
                                           cancel=job.cancel)
        log.info("job %s: %s decoded (%.1f s of audio)%s", request.job_id, request.original_uri,
                 decoded.duration_s, ", ahead of its turn" if self.ahead else "")
        return Fetched(original, manifest, decoded, scratch)

    def wait(self) -> Fetched:
        if self._thread is not None:
            self._thread.join()
        fetched, error = self._outcome
        if error is not None:
            raise error
        return fetched

    def close(self) -> None:
        """Wait for the fetch and remove its scratch folder.

        After SIGTERM a download still running ahead is not waited for beyond a few seconds:
        the platform's grace period matters more than a temp folder in a dying container."""
        if self._thread is not None:
            self._thread.join(CANCELLED_FETCH_WAIT_S if self.job.cancel.is_set() else None)
            if self._thread.is_alive():
                log.warning("job %s: fetch still running at shutdown, left behind",
                            self.request.job_id)
                return
        self._scratch.close()


def labels(request: messages.JobRequest) -> dict:
    return {"jobId": request.job_id, "releaseId": request.release_id,
            "trackId": request.track_id, **platform_labels()}


def peak_memory_mb(device) -> dict:
    peak = {"peakRssMb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}
    if device is not None and device.type == "cuda":
        peak["peakGpuMemoryMb"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    return peak


def log_summary(request, result: dict, job: Job) -> None:
    """One line per job with the figures of the result: log-based metrics chart these."""
    timings = result.get("timings", {})
    error = result.get("error") or {}
    fields = {"event": "job_summary", "outcome": result["status"], "jobId": request.job_id,
              "model": job.settings.model_name, "device": str(job.engine.device),
              "durationS": result.get("durationS"), "rtf": result.get("rtf"),
              "reused": result.get("reused", False), "timings": timings,
              "errorCode": error.get("code"), "retryable": error.get("retryable"),
              **peak_memory_mb(job.engine.device)}
    stages = " ".join(f"{k}={v}s" for k, v in timings.items())
    log.info("job %s %s%s: %s, audio %s s, rtf %s", request.job_id, result["status"],
             f" ({error.get('code')})" if error else "", stages, fields["durationS"],
             fields["rtf"], extra={"labels": labels(request), "fields": fields})


def _stage(timings, name):
    class Timer:
        def __enter__(self):
            self.start = time.monotonic()

        def __exit__(self, *exc):
            timings[name] = round(timings.get(name, 0) + time.monotonic() - self.start, 3)
    return Timer()


def _process(request, job: Job, fetch: Fetch, timings: dict) -> dict:
    s, storage = job.settings, job.storage
    fetched = fetch.wait()
    manifest = fetched.manifest
    if fetched.decoded is not None and fetch.ahead:
        # fetched while an earlier message ran: that one may have completed this very set
        with _stage(timings, "locate"):
            manifest = storage.read_manifest(request.release_id, request.track_id)
    if manifest_matches(manifest, fetched.original.identity, s):
        log.info("job %s: stems already complete for this input, not separating again",
                 request.job_id)
        stems = {stem: entry["url"] for stem, entry in manifest["stems"].items()}
        return messages.completed_result(request, stems, model=s.model_name, reused=True,
                                         durationS=manifest.get("durationS"), timings=timings)

    decoded, scratch = fetched.decoded, fetched.scratch
    progress = Progress(request.job_id, job.on_progress)
    separator = job.engine.separator()
    stems, stats = _separate(decoded, separator, scratch, s, job, progress, timings)
    if job.cancel.is_set():
        raise Interrupted()
    with _stage(timings, "upload"):
        storage.remove_manifest(request.release_id, request.track_id)
        urls = storage.write_stems(request.release_id, request.track_id, stems)
        storage.write_manifest(request.release_id, request.track_id, {
            "version": MANIFEST_VERSION, "jobId": request.job_id,
            "releaseId": request.release_id, "trackId": request.track_id,
            "artistId": request.artist_id, "model": s.model_name,
            "format": s.output_format,
            "bitrate": f"{s.mp3_bitrate}k" if s.output_format == "mp3" else None,
            "input": fetched.original.identity, "durationS": round(decoded.duration_s, 3),
            "createdAt": datetime.datetime.now(datetime.timezone.utc).isoformat(),
            "stems": {stem: {"url": urls[stem], "file": path.name,
                             "bytes": path.stat().st_size, "sha256": sha256_of(path),
                             **stats[stem]} for stem, path in stems.items()},
        })
    duration = decoded.duration_s
    return messages.completed_result(
        request, urls, model=s.model_name, durationS=round(duration, 3), reused=False,
        device=str(separator.device), timings=timings,
        rtf=round(duration / max(timings.get("separate", 0) + timings.get("decode", 0), 1e-6), 2))


def _separate(decoded, separator: Separator, scratch, s: Settings, job: Job, progress, timings):
    """Run the engine, feeding each finished block to the six concurrent encoders."""
    encoders = open_encoders(scratch, messages.STEMS, s.output_format, s.mp3_bitrate, 3)
    order = [separator.sources.index(stem) for stem in messages.STEMS]
    reader = audio.RawReader(decoded)
    finished = False
    try:
        def emit(start, block):
            for stem, index in zip(messages.STEMS, order):
                encoders[stem].put(block[index])

        with _stage(timings, "separate"):
            separator.separate(reader.read, decoded.length, decoded.mean, decoded.std, emit,
                               progress=progress.update, cancel=job.cancel)
        finished = True
    finally:
        reader.close()
        progress.close()
        with _stage(timings, "encode"):
            stats = {}
            errors = []
            for stem, encoder in encoders.items():
                try:
                    stats[stem] = encoder.finish()
                except Exception as exc:
                    errors.append(exc)
        if finished and errors:
            raise JobError("encode_failed", f"encoding a stem failed: {errors[0]}", retryable=True)
    return {stem: encoders[stem].path for stem in messages.STEMS}, stats


def content_type(settings: Settings) -> str:
    return CONTENT_TYPES[settings.output_format]
