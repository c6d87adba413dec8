"""Where originals come from and stems go: the backend interface and what both backends share.

The pipeline sees only `Storage`; `LocalStorage` (local.py) and `GcsStorage` (gcs.py) are
its two implementations. A set is written through a `Commit` (one writer's turn at a track):
the stems, then the manifest, last: its presence means the set is complete, and each backend
makes sure that a manifest only ever names the set its own writer wrote.
"""

import contextlib
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from job.errors import JobError

MANIFEST = "manifest.json"
CLAIM = ".claim.json"  # GCS: a writer's fencing token beside the manifest (commit.py)
PUBLISHED = ".published"  # the drain's records of the messages whose result it published
CONTENT_TYPES = {
    "mp3": "audio/mpeg",
    "wav": "audio/wav",
    "flac": "audio/flac",
    "mp4": "audio/mp4",  # NI Stems
    "json": "application/json",
}  # peaks files


MESSAGE_ID = re.compile(r"[A-Za-z0-9_-]{1,200}")


@dataclass(frozen=True)
class Original:
    """An input located and checked, not yet downloaded."""

    uri: str
    size: int
    # generation/checksum, names the input in manifests
    identity: dict = field(default_factory=dict)
    local_path: Path | None = None


class Commit(Protocol):
    """One writer's turn at a track, from invalidating its old set to writing its manifest."""

    def write_stems(self, files: dict) -> dict:
        """Store {output: local file}; return {output: url}."""

    def write_manifest(self, manifest: dict) -> dict:
        """Store the manifest, last. Returns the manifest that stands: `manifest` itself, or
        another job's for the same request that completed meanwhile."""


class Storage(Protocol):
    """What the pipeline asks of a backend."""

    def describe_original(self, uri: str, trusted: bool = False) -> Original:
        """Validate the URI, size and identity of an original, without downloading it.

        `trusted`: the URI came from the operator (a flag), not a message, so it may lie
        outside INPUT_DIR / ALLOWED_INPUT_BUCKETS. Raises JobError (input_not_found,
        input_too_large, invalid_uri, permission_denied, ...)."""

    def fetch_original(self, original: Original, folder: Path) -> Path:
        """A local file holding the original, downloaded into `folder` (the track's scratch
        folder) when it is not local already; JobError when it changed since described."""

    def read_manifest(self, release_id: str, track_id: str) -> dict | None:
        """The track's manifest when its set is complete (every file it names present and
        unchanged), else None."""

    def commit(self, release_id: str, track_id: str) -> contextlib.AbstractContextManager:
        """A `Commit` (entered: the old set is no longer vouched for) to write the next set."""

    def published(self, message_id: str) -> dict | None:
        """The record that this message's result was published (by an earlier delivery whose
        ack failed or was lost), or None."""

    def record_published(self, message_id: str, record: dict) -> None:
        """Keep that record (create-only: the first delivery's stands)."""


def published_name(message_id: str) -> str:
    """Where a message's published-record lives, relative to the stems root."""
    if not isinstance(message_id, str) or not MESSAGE_ID.fullmatch(message_id):
        raise JobError("invalid_message", f"message id {str(message_id)[:80]!r} is not one")
    return f"{PUBLISHED}/{message_id}.json"


def check_size(size: int, max_bytes: int, uri: str) -> None:
    if size == 0:
        raise JobError("empty_input", f"{uri} is empty (0 bytes)")
    if size > max_bytes:
        raise JobError(
            "input_too_large",
            f"{uri} is {size} bytes, over the limit of {max_bytes} (MAX_INPUT_BYTES)",
        )


def atomic_write(target: Path, data: bytes | None = None, source: Path | None = None) -> None:
    """Write to a temp name beside `target`, then rename: readers never see half a file."""
    fd, temp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".part", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as out:
            if source is not None:
                with open(source, "rb") as src:
                    shutil.copyfileobj(src, out, 1 << 20)
            else:
                out.write(data)
            out.flush()
            os.fsync(out.fileno())
        os.chmod(temp, 0o644)
        os.replace(temp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temp)
        raise


@contextlib.contextmanager
def scratch_folder():
    """A local temp folder for one track (download, decoded audio, encoders), any backend."""
    with tempfile.TemporaryDirectory(prefix="stem-job-") as folder:
        yield Path(folder)
