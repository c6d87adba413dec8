"""The stem-separate request and the stem-results message (DESIGN.md schemas).

Everything here comes from the outside world, so it is validated strictly:
identifiers become object names and paths, so they match one safe pattern.
"""

import base64
import binascii
import json
import re
from dataclasses import dataclass

from job.errors import JobError
from job.outputs import check_names

# htdemucs_6s' sources, the default model's: the contract's six stems (DESIGN.md). Any other
# model writes its own sources (job/outputs.py).
STEMS = ("vocals", "drums", "bass", "guitar", "piano", "other")
ID_PATTERN = re.compile(r"^[A-Za-z0-9_-]{1,128}$")
MAX_MESSAGE_BYTES = 64 * 1024

# Types an original may be declared as, beyond any audio/* or video/* (a music video's
# audio is separated too). The content decides what it is; a declared type is refused only
# when it names something that is not media at all (a document, an image, text).
AUDIO_MIME_TYPES = frozenset(
    {
        "application/ogg",
        "application/mp4",
        "application/x-matroska",
        "application/vnd.rn-realmedia",
        "application/octet-stream",
        "binary/octet-stream",
        "application/x-binary",
    }
)
MEDIA_TYPE_PREFIXES = ("audio/", "video/")


@dataclass(frozen=True)
class JobRequest:
    """One track to separate."""

    job_id: str
    release_id: str
    track_id: str
    original_uri: str
    artist_id: str | None = None
    mime_type: str | None = None
    outputs: tuple | None = None  # None: the OUTPUTS setting decides (names as asked)


def split_names(text: str) -> list:
    """A comma-separated list (env, flag, query string) to its names."""
    return [part for part in text.split(",") if part.strip()]


def outputs_of(request: JobRequest, default: tuple) -> tuple:
    """The outputs this request asks for: its own list, else `default` (the OUTPUTS setting;
    empty: every source of the model; job/outputs.py resolves the names once the model is
    known)."""
    return request.outputs or default


def check_id(name: str, value) -> str:
    if not isinstance(value, str):
        raise JobError("invalid_message", f"{name} must be a string, got {type(value).__name__}")
    if not ID_PATTERN.match(value):
        raise JobError("invalid_id", f"{name} {value[:140]!r} must match {ID_PATTERN.pattern}")
    return value


def check_mime_type(mime_type) -> str | None:
    if mime_type in (None, ""):
        return None
    if not isinstance(mime_type, str):
        raise JobError("invalid_message", "mimeType must be a string")
    base = mime_type.split(";", 1)[0].strip().lower()
    if base not in AUDIO_MIME_TYPES and not base.startswith(MEDIA_TYPE_PREFIXES):
        raise JobError(
            "unsupported_media_type",
            f"mimeType {mime_type[:100]!r} names something that is not audio; "
            "send the audio file (any audio/* or video/* type is accepted)",
        )
    return base


def make_request(
    release_id, track_id, original_uri, job_id=None, artist_id=None, mime_type=None, outputs=None
) -> JobRequest:
    """Validate the fields of one request, whatever they came from (message, flags, env)."""
    release_id = check_id("releaseId", release_id)
    track_id = check_id("trackId", track_id)
    if job_id in (None, ""):
        job_id = f"sep_{release_id}_{track_id}"[:128]
    job_id = check_id("jobId", job_id)
    if artist_id not in (None, ""):
        artist_id = check_id("artistId", artist_id)
    else:
        artist_id = None
    if not isinstance(original_uri, str) or not original_uri.strip():
        raise JobError("invalid_message", "originalStemUri must be a non-empty string")
    if len(original_uri) > 2048 or "\x00" in original_uri:
        raise JobError("invalid_uri", "originalStemUri is too long or contains a NUL byte")
    return JobRequest(
        job_id,
        release_id,
        track_id,
        original_uri.strip(),
        artist_id,
        check_mime_type(mime_type),
        None if outputs is None else check_names(outputs),
    )


def to_message(request: JobRequest) -> dict:
    """The stem-separate JSON object for `request`, the inverse of parse_message; optional
    fields the request lacks are left out rather than sent as null."""
    message = {
        "jobId": request.job_id,
        "releaseId": request.release_id,
        "artistId": request.artist_id,
        "trackId": request.track_id,
        "originalStemUri": request.original_uri,
        "mimeType": request.mime_type,
        "outputs": None if request.outputs is None else list(request.outputs),
    }
    return {key: value for key, value in message.items() if value is not None}


def decode_payload(data: bytes | str) -> dict:
    """Plain JSON or base64-encoded JSON (Cloud Run overrides, push envelopes) to a dict."""
    if isinstance(data, str):
        data = data.encode("utf-8", "replace")
    if len(data) > MAX_MESSAGE_BYTES:
        raise JobError("invalid_message", f"message is larger than {MAX_MESSAGE_BYTES} bytes")
    text = data.strip()
    if not text:
        raise JobError("invalid_message", "message is empty")
    if not text.startswith(b"{"):
        try:
            text = base64.b64decode(text, validate=True).strip()
        except (binascii.Error, ValueError):
            raise JobError(
                "invalid_message", "message is neither JSON nor base64-encoded JSON"
            ) from None
    try:
        payload = json.loads(text)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise JobError("invalid_message", f"message is not valid JSON: {exc}") from None
    if not isinstance(payload, dict):
        raise JobError("invalid_message", "message must be a JSON object")
    return payload


def parse_message(data: bytes | str) -> JobRequest:
    """A stem-separate message (plain or base64 JSON) to a validated JobRequest."""
    payload = decode_payload(data)
    missing = [k for k in ("releaseId", "trackId", "originalStemUri") if k not in payload]
    if missing:
        raise JobError("invalid_message", f"message lacks required field(s): {', '.join(missing)}")
    return make_request(
        payload["releaseId"],
        payload["trackId"],
        payload["originalStemUri"],
        payload.get("jobId"),
        payload.get("artistId"),
        payload.get("mimeType"),
        payload.get("outputs"),
    )


def salvage_ids(data) -> dict:
    """Best-effort IDs of a message that failed validation, so its failure can be reported."""
    try:
        payload = decode_payload(data) if not isinstance(data, dict) else data
    except JobError:
        return {}
    return {
        key: payload[key]
        for key in ("jobId", "releaseId", "trackId", "artistId")
        if isinstance(payload.get(key), str) and ID_PATTERN.match(payload[key])
    }


def completed_result(request: JobRequest, stems: dict, **extra) -> dict:
    return {
        "jobId": request.job_id,
        "releaseId": request.release_id,
        "trackId": request.track_id,
        "artistId": request.artist_id,
        "status": "completed",
        "stems": stems,
        **extra,
    }


def failed_result(ids: dict, error: JobError, **extra) -> dict:
    """`ids` holds jobId/releaseId/trackId/artistId as far as they are known."""
    return {
        "jobId": ids.get("jobId"),
        "releaseId": ids.get("releaseId"),
        "trackId": ids.get("trackId"),
        "artistId": ids.get("artistId"),
        "status": "failed",
        "stems": {},
        "error": error.as_dict(),
        **extra,
    }


def request_ids(request: JobRequest) -> dict:
    return {
        "jobId": request.job_id,
        "releaseId": request.release_id,
        "trackId": request.track_id,
        "artistId": request.artist_id,
    }
