"""`stem-job serve`: the original worker's HTTP API, on the same pipeline as `run` and `drain`.

    POST /separate/{release_id}/{track_id}[?outputs=vocals,instrumental,drums%2Bbass]
                                             multipart/form-data, the audio in field `file`
                                             (or in any one part that has a filename)
         -> 200 {"status": "success", "release_id", "track_id", "stems": {...}, + extras
                 (`outputs`: per output its url, peaks, loudness, silent flag)}
    GET  /health -> {"status": "ok", "processing_mode", "storage_mode", "device", "model", ...}

Every error is JSON: {"status": "failed", "error": {"code", "message", "retryable"}}, with
400 (no file, empty file, broken or unfinished upload), 413 (over MAX_INPUT_BYTES),
415 (not an audio type, or not multipart), 422 (bad IDs, not audio, corrupt, truncated,
longer than MAX_DURATION_S), 503 + Retry-After (busy, or a fault a retry may fix), 500.

Why it is shaped this way:
- One model, one accelerator: separations run one at a time, in a worker thread, under a
  lock (asyncio's lock wakes waiters in arrival order). The model loads once, at start-up.
- Back-pressure: besides the request being served, at most HTTP_QUEUE requests may be in
  flight (uploading or waiting for their turn). One more is refused at once, before its body
  is read, with 503 and `Retry-After` (the last separation's duration): a caller that gets
  503 retries later instead of holding a connection and a temp file for an unknown time.
- Uploads are streamed straight to a temp file (hashed as they arrive), never held in memory.
  The multipart parser bounds each part's headers (count and line size) and the number of
  parts, so a body of endless headers or parts is refused, not buffered. The disk is bounded
  too: at start, MAX_INPUT_BYTES x (1 + HTTP_QUEUE) is checked against the temp folder's free
  space; fewer uploads are then let on disk at once (the rest wait), or, when not even one
  fits, the server does not start (exit 78).
  A declared Content-Length over the limit is refused before the body is read (a client that
  sends `Expect: 100-continue` never sends it); otherwise the first byte over the limit
  stops the upload with 413. Uvicorn discards what the client still sends after an early answer.
- The uploaded file is the original in both storage modes (`UploadedOriginal`); the stems and
  the manifest go to the configured backend (OUTPUT_DIR or GCS) exactly as for `run`.
- Disconnects: a client that leaves mid-upload leaves nothing but a temp file, deleted at once.
  One that leaves while queued is skipped. One that leaves during separation does not stop it:
  the set is finished and its manifest written last, so the caller's retry finds it complete
  (same bytes, same track) and gets it back at once (`reused: true`).
- SIGTERM/SIGINT: the running separation stops at its next window (in `run` and `drain` the
  forward pass runs in the main thread and is aborted at once; here it runs in a worker), its caller
  and any still queued get 503 `interrupted`, and the server exits well within Cloud Run's and
  GKE's grace periods; the set being written is left without a manifest.
- Who may call: with HTTP_TOKEN set, every route but /health needs `Authorization: Bearer
  <HTTP_TOKEN>` (job/auth.py; 401 otherwise, before the body is read). Without it anyone who
  reaches the port may overwrite any release's stems, so the server refuses to start on a
  non-loopback address without it (exit 78) unless HTTP_ALLOW_UNAUTHENTICATED=true says that
  something else decides who reaches the port (Compose publishes it on the host's loopback
  only), and then says so loudly at start.
"""

import asyncio
import contextlib
import hashlib
import ipaddress
import logging
import math
import re
import shutil
import tempfile
from pathlib import Path

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect

from job import messages, runtime
from job import serve as serving
from job.auth import Guard, SharedToken
from job.config import Settings
from job.errors import Cancel, ConfigError, Interrupted, JobError, http_status_for
from job.outputs import check_names, plan
from job.pipeline import Job, process
from job.separation.model import ModelCache
from job.storage.base import Original

log = logging.getLogger(__name__)

FILE_FIELD = "file"
MULTIPART_SLACK = 64 * 1024  # room for boundaries, part headers and small extra fields
MAX_PARTS = 16  # the file and a few form fields; more is not an upload
MAX_PART_HEADERS = 8  # Content-Disposition, Content-Type, and room for others
MAX_PART_HEADER_BYTES = 8192  # one header line: a long filename, percent-encoded
DEFAULT_RETRY_AFTER_S = 30
GONE = JobError("upload_incomplete", "the client disconnected")  # nobody reads this answer
HOW_TO_SEND = (
    f"send the audio as multipart/form-data in the field '{FILE_FIELD}', e.g. "
    f"curl -F {FILE_FIELD}=@song.mp3 http://HOST/separate/RELEASE_ID/TRACK_ID"
)


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


class FileReceiver:
    """python-multipart callbacks that keep the one file part on disk, with size and digest.

    The file is the part named `file`, or else the one part with a filename; other fields
    are ignored. Anything wrong raises JobError mid-stream, so the upload stops right there.
    The callbacks are python-multipart's interface, one short method each, over one part's
    state.
    """

    def __init__(self, folder: Path, limit: int):
        self.folder, self.limit = folder, limit
        self.path = self.handle = self.mime = None
        self.size = 0
        self.digest = hashlib.sha256()
        self.complete = self.ended = False
        self.parts = 0
        self._in_file = False
        self._headers, self._field, self._value = {}, b"", b""

    def callbacks(self) -> dict:
        return {
            "on_part_begin": self.on_part_begin,
            "on_header_field": self.on_header_field,
            "on_header_value": self.on_header_value,
            "on_header_end": self.on_header_end,
            "on_headers_finished": self.on_headers_finished,
            "on_part_data": self.on_part_data,
            "on_part_end": self.on_part_end,
            "on_end": self.on_end,
        }

    def on_part_begin(self):
        self._headers, self._in_file = {}, False
        self.parts += 1
        if self.parts > MAX_PARTS:
            raise JobError(
                "bad_multipart",
                f"the request holds more than {MAX_PARTS} parts: "
                "send one audio file (and at most a few fields)",
            )

    def on_header_field(self, data, start, end):
        self._field += data[start:end]

    def on_header_value(self, data, start, end):
        self._value += data[start:end]

    def on_header_end(self):
        self._headers[self._field.strip().lower()] = self._value.strip()
        self._field, self._value = b"", b""

    def on_headers_finished(self):
        _, options = parse_options_header(self._headers.get(b"content-disposition", b""))
        if b"filename" not in options and options.get(b"name") != FILE_FIELD.encode():
            return  # a plain form field: ignored
        if self.path is not None:
            raise JobError(
                "bad_multipart",
                "the request holds more than one file: send exactly one audio file per request",
            )
        mime = self._headers.get(b"content-type", b"").decode("latin-1")
        try:
            self.mime = messages.check_mime_type(mime)  # 415 before a byte of it is stored
        except JobError:
            raise JobError(
                "unsupported_media_type",
                f"the file is sent as {mime[:100]!r}, not an audio type we decode "
                "(mp3, wav, flac, ogg/opus, m4a/aac): send it with its audio/* "
                "type, application/octet-stream, or no type",
            ) from None
        # No suffix from the client's filename: given `.mp3`, FFmpeg takes any junk for mp3.
        self.path = self.folder / "original"
        self.handle = open(self.path, "wb")
        self._in_file = True

    def on_part_data(self, data, start, end):
        if not self._in_file:
            return
        self.size += end - start
        if self.size > self.limit:
            raise JobError(
                "input_too_large",
                f"the file is over the limit of {self.limit} bytes "
                "(MAX_INPUT_BYTES): send a smaller file",
            )
        chunk = data[start:end]
        self.handle.write(chunk)
        self.digest.update(chunk)

    def on_part_end(self):
        if self._in_file:
            self.handle.close()
            self.complete, self._in_file = True, False

    def on_end(self):
        self.ended = True

    def close(self):
        if self.handle is not None:
            self.handle.close()


async def receive_upload(request: Request, folder: Path, limit: int) -> FileReceiver:
    """Stream the multipart body into `folder`; the receiver holding the complete file."""
    _, params = parse_options_header(request.headers.get("content-type", ""))
    boundary = params.get(b"boundary")
    if not boundary:
        raise JobError(
            "bad_multipart", f"the multipart Content-Type has no boundary: {HOW_TO_SEND}"
        )
    receiver = FileReceiver(folder, limit)
    parser = MultipartParser(
        boundary,
        receiver.callbacks(),
        max_header_count=MAX_PART_HEADERS,
        max_header_size=MAX_PART_HEADER_BYTES,
    )
    try:
        async for chunk in request.stream():
            parser.write(chunk)
        parser.finalize()
    except MultipartParseError as exc:
        raise JobError(
            "bad_multipart", f"the multipart body is malformed ({exc}): {HOW_TO_SEND}"
        ) from None
    finally:
        receiver.close()
    if receiver.path is None:
        raise JobError("no_file", f"the request holds no file: {HOW_TO_SEND}")
    if not (receiver.complete and receiver.ended):
        raise JobError(
            "upload_incomplete",
            "the upload ended before the multipart body did: send the whole file again",
        )
    if receiver.size == 0:
        raise JobError("empty_input", "the uploaded file is empty (0 bytes): send the audio itself")
    return receiver


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


class Gate:
    """One separation at a time, at most `queue` more requests in flight behind it, and at
    most `on_disk` of those with an upload on disk (the others wait for room)."""

    def __init__(self, queue: int, on_disk: int | None = None):
        self.limit = 1 + queue
        self.in_flight = 0
        self.lock = asyncio.Lock()
        self.last_seconds = None
        self.disk = asyncio.Semaphore(on_disk or self.limit)

    def disk_slot(self) -> "DiskSlot":
        return DiskSlot(self.disk)

    def retry_after(self) -> int:
        return max(1, math.ceil(self.last_seconds)) if self.last_seconds else DEFAULT_RETRY_AFTER_S

    def admit(self) -> bool:
        if self.in_flight >= self.limit:
            return False
        self.in_flight += 1
        return True

    def leave(self):
        self.in_flight -= 1


class DiskSlot:
    """Room on disk for one upload, held from before its first byte until its folder is gone."""

    def __init__(self, semaphore: asyncio.Semaphore):
        self.semaphore, self.held = semaphore, False

    async def acquire(self):
        await self.semaphore.acquire()
        self.held = True

    def release(self):
        if self.held:
            self.semaphore.release()
            self.held = False


def upload_slots(settings: Settings, folder: Path) -> int:
    """How many uploads of MAX_INPUT_BYTES the temp folder's free space holds, up to one per
    request in flight; ConfigError when it holds not even one."""
    wanted = 1 + settings.http_queue
    free = shutil.disk_usage(folder).free
    slots = min(wanted, free // settings.max_input_bytes)
    if slots < 1:
        raise ConfigError(
            f"MAX_INPUT_BYTES={settings.max_input_bytes} is more than the "
            f"{free} bytes free in the upload folder {folder} (TMPDIR): lower "
            "it or give the folder more room"
        )
    if slots < wanted:
        log.warning(
            "the upload folder %s has room for %d upload(s) of MAX_INPUT_BYTES, not "
            "%d (1 + HTTP_QUEUE): the others wait",
            folder,
            slots,
            wanted,
        )
    return slots


class Separations:
    """What the routes do, as plain methods: the settings, storage, model and gate they share
    (each method one step of a request)."""

    def __init__(self, settings: Settings, model_cache: ModelCache, storage):
        self.settings, self.model_cache, self.storage = settings, model_cache, storage
        self.gate = Gate(settings.http_queue, upload_slots(settings, Path(tempfile.gettempdir())))
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

    async def separate(self, release_id: str, track_id: str, request: Request):
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


async def unknown_route(request, exc: HTTPException):
    """404/405 in the one error shape, naming the routes there are."""
    message = (
        f"{exc.detail}: this server offers POST /separate/{{release_id}}/{{track_id}} "
        "and GET /health"
    )
    code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
    return JSONResponse(
        {"status": "failed", "error": {"code": code, "message": message, "retryable": False}},
        status_code=exc.status_code,
        headers=getattr(exc, "headers", None),
    )


def create_app(settings: Settings, model_cache: ModelCache | None = None, storage=None) -> FastAPI:
    """The FastAPI app; `model_cache` and `storage` default to the ones `run` would build."""
    service = Separations(
        settings, model_cache or ModelCache(settings), storage or runtime.make_storage(settings)
    )

    @contextlib.asynccontextmanager
    async def lifespan(app):
        await asyncio.to_thread(service.model_cache.engine)  # the model loads before serving
        log.info(
            "serving %s on %s (storage %s, queue %d)",
            settings.model_name,
            service.model_cache.device,
            settings.storage_mode,
            settings.http_queue,
        )
        yield

    app = FastAPI(title="stem-job", lifespan=lifespan)
    if settings.http_token:
        app.add_middleware(Guard, verify=SharedToken(settings.http_token), body=auth_error)
    app.state.stopping = service.stopping
    app.add_exception_handler(HTTPException, unknown_route)

    @app.get("/health")
    async def health():
        return service.health()

    @app.post("/separate/{release_id}/{track_id}")
    async def separate(release_id: str, track_id: str, request: Request):
        return await service.separate(release_id, track_id, request)

    return app


def check_request_headers(request: Request, limit: int) -> None:
    """What can be refused from the headers alone, before any of the body is read."""
    content_type = request.headers.get("content-type", "")
    declared = request.headers.get("content-length")
    if not content_type and declared in (None, "0") and "transfer-encoding" not in request.headers:
        raise JobError("no_file", f"the request has no body: {HOW_TO_SEND}")
    if parse_options_header(content_type)[0] != b"multipart/form-data":
        raise JobError(
            "unsupported_media_type",
            f"the request is {content_type[:100] or 'without a Content-Type'}, "
            f"not multipart/form-data: {HOW_TO_SEND}",
        )
    if declared and declared.isdigit() and int(declared) > limit + MULTIPART_SLACK:
        raise JobError(
            "input_too_large",
            f"the request declares {declared} bytes, over the limit "
            f"of {limit} bytes for the file (MAX_INPUT_BYTES): "
            "send a smaller file",
        )


def auth_error(code: str, message: str) -> dict:
    """A refused request's JSON, in the shape of every other error here."""
    return {
        "status": "failed",
        "error": {
            "code": code,
            "message": f"{message}: send Authorization: Bearer <HTTP_TOKEN>",
            "retryable": False,
        },
    }


def is_loopback(host: str) -> bool:
    """Whether only this machine can reach `host` (a name other than localhost counts as not)."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def messages_error(result: dict) -> JobError:
    error = result.get("error") or {}
    return JobError(
        error.get("code", "internal_error"),
        error.get("message", "separation failed"),
        error.get("retryable", True),
    )


class Server(uvicorn.Server):
    """Uvicorn that, when told to exit, also stops the running separation at its next window:
    its caller gets 503 `interrupted` (retry) well within the platform's grace period, and the
    set it was writing is left without a manifest, as after `run`'s SIGTERM."""

    def handle_exit(self, sig, frame):
        self.config.app.state.stopping.set()
        super().handle_exit(sig, frame)


def serve(settings: Settings) -> None:
    """Refuse an open address without a token, load the model (ConfigError before any port
    opens: the CLI exits 78), then serve on HTTP_HOST:PORT (job.serve: our logging; a port
    in use exits 75)."""
    unauthenticated = not settings.http_token and not is_loopback(settings.http_host)
    if unauthenticated and not settings.http_allow_unauthenticated:
        raise ConfigError(
            f"HTTP_HOST={settings.http_host} is reachable from other machines and HTTP_TOKEN "
            "is not set: set HTTP_TOKEN, bind HTTP_HOST=127.0.0.1, or set "
            "HTTP_ALLOW_UNAUTHENTICATED=true where something else decides who reaches the port"
        )
    model_cache = ModelCache(settings)
    model_cache.engine()
    if unauthenticated:
        log.warning(
            "UNAUTHENTICATED: serving on %s:%d without HTTP_TOKEN "
            "(HTTP_ALLOW_UNAUTHENTICATED=true), so anyone who can reach this port can start "
            "separations and overwrite any release's stems",
            settings.http_host,
            settings.http_port,
        )
    serving.run(create_app(settings, model_cache), settings.http_host, settings.http_port, Server)
