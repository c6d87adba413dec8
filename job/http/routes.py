"""What POST /separate and GET /health do, and the one error shape every answer shares.

- One model, one accelerator: separations run one at a time, in a worker thread, under the
  gate's lock (asyncio's lock wakes waiters in arrival order).
- The uploaded file is the original in both storage modes (`UploadedOriginal`); the stems and
  the manifest go to the configured backend (OUTPUT_DIR or GCS) exactly as for `run`.
- Disconnects: a client that leaves mid-upload leaves nothing but a temp file, deleted at once.
  One that leaves while queued is skipped. One that leaves during separation does not stop it:
  the set is finished and its manifest written last, so the caller's retry finds it complete
  (same bytes, same track) and gets it back at once (`reused: true`).
- SIGTERM/SIGINT sets `stopping`: the running separation stops at its next window, and its
  caller and any still queued get 503 `interrupted`.
"""

import asyncio
import logging
import re
import shutil
import tempfile
from pathlib import Path

from fastapi.responses import JSONResponse
from starlette.requests import ClientDisconnect, Request

from job import messages
from job.config import Settings
from job.errors import Cancel, Interrupted, JobError, http_status_for
from job.http.gate import DEFAULT_RETRY_AFTER_S, Gate, upload_slots
from job.http.multipart import check_request_headers, receive_upload
from job.outputs import check_names, plan
from job.pipeline import Job, process
from job.separation.model import ModelCache
from job.storage.base import Original

log = logging.getLogger(__name__)

GONE = JobError("upload_incomplete", "the client disconnected")  # nobody reads this answer


def error_response(error: JobError, retry_after: int | None = None, **ids) -> JSONResponse:
    """The one error shape; 503s say when to come back."""
    status = http_status_for(error)
    headers = {"Retry-After": str(retry_after or DEFAULT_RETRY_AFTER_S)} if status == 503 else None
    body = {"status": "failed", **{k: v for k, v in ids.items() if v}, "error": error.as_dict()}
    return JSONResponse(body, status_code=status, headers=headers)


class UploadedOriginal:
    """The configured storage, except that its one original is the upload already on disk."""

    def __init__(self, storage, original: Original):
        self._storage = storage
        self._original = original

    def describe_original(self, uri: str, trusted: bool = False) -> Original:
        return self._original

    def fetch_original(self, original: Original, folder: Path) -> Path:
        return original.local_path

    def __getattr__(self, name):
        return getattr(self._storage, name)


def success_body(result: dict) -> dict:
    """The original worker's response, then our extras (added, never renamed)."""
    return {
        "status": "success",
        "release_id": result["releaseId"],
        "track_id": result["trackId"],
        "stems": result["stems"],
        "job_id": result["jobId"],
        "model": result.get("model"),
        "model_digest": result.get("modelDigest"),
        "model_sources": result.get("modelSources"),
        "model_license": result.get("modelLicense"),
        "duration_s": result.get("durationS"),
        "reused": result.get("reused"),
        "device": result.get("device"),
        "timings": result.get("timings"),
        "outputs": result.get("outputs"),
    }


class Separations:
    """What the routes do, without the web framework: the settings, storage, model and gate
    that every request shares."""

    def __init__(self, settings: Settings, model_cache: ModelCache, storage):
        self.settings, self.model_cache, self.storage = settings, model_cache, storage
        folder = Path(tempfile.gettempdir())
        slots = upload_slots(folder, settings.max_input_bytes, settings.http_queue)
        self.gate = Gate(settings.http_queue, slots)
        # set on SIGTERM/SIGINT: the running separation stops at its next window (set, not
        # tripped: uvicorn's handler runs in the main thread, the separation in a worker)
        self.stopping = Cancel()

    def health(self) -> dict:
        settings, model_cache = self.settings, self.model_cache
        return {
            "status": "ok",
            "processing_mode": "http",
            "storage_mode": settings.storage_mode,
            "device": str(model_cache.device),
            "model": settings.model_name,
            "model_loaded": model_cache.loaded,
            "in_flight": self.gate.in_flight,
            "queue": settings.http_queue,
        }

    async def separate_upload(self, release_id: str, track_id: str, request: Request):
        """POST /separate/RELEASE/TRACK: checked from the path and headers, admitted by the
        gate, then received and separated; every refusal has the one error shape."""
        ids = {"release_id": release_id, "track_id": track_id}
        try:
            outputs = self.check(release_id, track_id, request)
        except JobError as error:
            return error_response(error, **ids)
        if not self.gate.admit():
            return error_response(self.busy(), self.gate.retry_after(), **ids)
        folder = Path(tempfile.mkdtemp(prefix="stem-upload-"))
        slot = self.gate.disk_slot()
        try:
            await slot.acquire()  # room on disk for one more upload, or wait for it
            result = await self.receive_and_run(release_id, track_id, outputs, request, folder)
        except ClientDisconnect:
            log.info(
                "client disconnected during the upload for %s/%s: nothing written",
                release_id,
                track_id,
                extra=upload_labels(release_id, track_id),
            )
            return error_response(GONE, **ids)
        except JobError as error:
            return error_response(error, self.gate.retry_after(), **ids)
        finally:
            shutil.rmtree(folder, ignore_errors=True)
            slot.release()
            self.gate.leave()
        if result is None:  # the client left while queued
            return error_response(GONE, **ids)
        if result["status"] != "completed":
            return error_response(messages_error(result), self.gate.retry_after(), **ids)
        return success_body(result)

    def check(self, release_id: str, track_id: str, request: Request):
        """The outputs asked for, after what the path, query and headers alone can refuse."""
        messages.check_id("release_id", release_id)
        messages.check_id("track_id", track_id)
        outputs = request.query_params.get("outputs")
        if outputs is not None:
            # a query string decodes `+` to a space, and no output name holds a space
            names = [re.sub(r"\s+", "+", name.strip()) for name in messages.split_names(outputs)]
            outputs = check_names(names)
            plan(outputs, self.model_cache.engine().sources)  # loaded before serving
        check_request_headers(request, self.settings.max_input_bytes)
        return outputs

    def busy(self) -> JobError:
        return JobError(
            "busy",
            f"a separation is running and {self.settings.http_queue} more request(s) wait "
            "(HTTP_QUEUE): retry after the number of seconds in Retry-After",
            retryable=True,
        )

    async def receive_and_run(self, release_id, track_id, outputs, request, folder) -> dict | None:
        """Receive the upload into `folder`, then separate it when its turn comes; None when
        the client has gone by then."""
        upload = await receive_upload(request, folder, self.settings.max_input_bytes)
        job_request = messages.make_request(
            release_id, track_id, str(upload.path), mime_type=upload.mime, outputs=outputs
        )
        identity = {"upload": "http", "size": upload.size, "sha256": upload.digest.hexdigest()}
        original = Original(str(upload.path), upload.size, identity, upload.path)
        async with self.gate.lock:
            if self.stopping.is_set():
                raise Interrupted("the server is shutting down: send the file again later")
            if await request.is_disconnected():
                log.info(
                    "client left %s/%s while queued: not separating",
                    release_id,
                    track_id,
                    extra=upload_labels(release_id, track_id),
                )
                return None
            storage = UploadedOriginal(self.storage, original)
            job = Job(self.settings, storage, self.model_cache, self.stopping)
            result = await asyncio.to_thread(process, job_request, job, True)
            if result["status"] == "completed" and not result.get("reused"):
                self.gate.last_seconds = result["timings"].get("total")
        return result


def upload_labels(release_id: str, track_id: str) -> dict:
    """Log labels for an upload that has no request yet (pipeline.labels once it has one)."""
    return {"labels": {"releaseId": release_id, "trackId": track_id}}


def messages_error(result: dict) -> JobError:
    error = result.get("error") or {}
    return JobError(
        error.get("code", "internal_error"),
        error.get("message", "separation failed"),
        error.get("retryable", True),
    )
