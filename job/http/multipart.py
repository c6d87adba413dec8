"""The upload: a multipart/form-data body streamed to a temp file, hashed as it arrives, and the
checks that refuse a request from its headers alone.

Nothing is held in memory: each part's headers are bounded (count and line size) and so is the
number of parts, so a body of endless headers or parts is refused, not buffered. The first byte
over MAX_INPUT_BYTES stops the upload with 413; a declared Content-Length over it is refused
before the body is read (a client that sends `Expect: 100-continue` never sends it). Uvicorn
discards what the client still sends after an early answer.
"""

import hashlib
from pathlib import Path

from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.requests import Request

from job import messages
from job.errors import JobError

FILE_FIELD = "file"
MULTIPART_SLACK = 64 * 1024  # room for boundaries, part headers and small extra fields
MAX_PARTS = 16  # the file and a few form fields; more is not an upload
MAX_PART_HEADERS = 8  # Content-Disposition, Content-Type, and room for others
MAX_PART_HEADER_BYTES = 8192  # one header line: a long filename, percent-encoded
HOW_TO_SEND = (
    f"send the audio as multipart/form-data in the field '{FILE_FIELD}', e.g. "
    f"curl -F {FILE_FIELD}=@song.mp3 http://HOST/separate/RELEASE_ID/TRACK_ID"
)


class FileReceiver:
    """python-multipart callbacks that keep the one file part on disk, with size and digest.

    The file is the part named `file`, or else the one part with a filename; other fields
    are ignored. Anything wrong raises JobError mid-stream, so the upload stops right there."""

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
