"""The Cloud Storage backend: originals from gs:// URIs, stems in gs://BUCKET/stems/RELEASE/TRACK/.

Same calls as LocalStorage (the Storage protocol in base.py): the pipeline does not know which
backend it has.
Every call to GCS goes through `_call`: transient faults (429, 5xx, timeouts, dropped
connections) are retried with exponential backoff and jitter for a bounded time, then become
`storage_unavailable` (retryable); everything else becomes a JobError that is not worth a retry.
The client's own retries are switched off (retry=None) so that this is the only retry layer and
the bound holds.

Writing a track's set, while another job may write the same track, is commit.py's: every write
is fenced by a generation precondition, the manifest names the generation of each object it
vouches for (`objectGenerations`), and `read_manifest` returns it only while the objects still
carry those generations.
"""

import base64
import concurrent.futures
import json
import logging
import re
from pathlib import Path
from urllib.parse import quote

import google_crc32c
from google.api_core import exceptions
from google.cloud import storage

from job.config import is_bucket_name
from job.errors import JobError
from job.faults import storage_fault
from job.messages import check_id
from job.retry import bounded, is_transient
from job.storage.base import CONTENT_TYPES, MANIFEST, Original, check_size, published_name
from job.storage.commit import GcsCommit

log = logging.getLogger(__name__)
PUBLIC_URL = "https://storage.googleapis.com"
# Stems keep their URL when a changed original is separated again, so caches must not keep them
# for long; the manifest is the completeness marker and must never be served stale. Objects of a
# private bucket are for their reader only (GCS_PUBLIC=false): no shared cache may keep them.
STEM_CACHE_CONTROL = {False: "private, max-age=3600", True: "public, max-age=3600"}
MANIFEST_CACHE_CONTROL = {False: "private, no-cache", True: "no-cache"}
CONTROL_CHARS = re.compile(r"[\x00-\x1f\x7f]")


def parse_gs_uri(uri: str) -> tuple[str, str]:
    """`gs://BUCKET/OBJECT` to (bucket, object name), refusing anything odd."""
    if not isinstance(uri, str) or not uri.startswith("gs://"):
        raise JobError("invalid_uri", f"{str(uri)[:200]!r} is not a gs://BUCKET/OBJECT URI")
    bucket, _, name = uri[len("gs://") :].partition("/")
    if not is_bucket_name(bucket):
        raise JobError("invalid_uri", f"{uri[:200]!r} does not name a valid bucket")
    if not name or len(name.encode("utf-8")) > 1024 or CONTROL_CHARS.search(name):
        raise JobError(
            "invalid_uri",
            f"{uri[:200]!r} does not name a valid object (1 to 1024 bytes, no control characters)",
        )
    if any(part in (".", "..") for part in name.split("/")):
        raise JobError("invalid_uri", f"{uri[:200]!r} has a '.' or '..' path segment")
    return bucket, name


def crc32c_b64(checksum) -> str:
    """GCS's form of a CRC32C: base64 of the big-endian 4 bytes."""
    return base64.b64encode(checksum.digest()).decode("ascii")


class _ChecksummedFile:
    """A file being written that counts and checksums what passes through it,
    so a download is verified in the same pass and can resume where it stopped."""

    def __init__(self, path: Path):
        self.handle = open(path, "wb")
        self.size = 0
        self.crc32c = google_crc32c.Checksum()

    def write(self, data: bytes) -> int:
        self.handle.write(data)
        self.crc32c.update(data)
        self.size += len(data)
        return len(data)

    def close(self) -> None:
        self.handle.close()


class GcsStorage:
    """Originals from allowed buckets; stems and manifests in `bucket`: the Storage protocol
    and the object primitives GcsCommit fences (upload, generation, the JSON put of the manifest
    and the claim), over one client, bucket and retry budget (`_call`)."""

    def __init__(
        self,
        bucket: str,
        allowed_buckets=(),
        max_bytes: int = 2**31,
        project: str | None = None,
        client: storage.Client | None = None,
        retry_deadline_s: float = 60.0,
        public: bool = False,
    ):
        self.client = client or storage.Client(project=project or None)
        self.bucket = self.client.bucket(bucket)
        self.allowed_buckets = tuple(allowed_buckets) or (bucket,)
        self.max_bytes = max_bytes
        self.retry_deadline_s = retry_deadline_s
        self.timeout = (min(10.0, retry_deadline_s), max(5.0, min(60.0, retry_deadline_s)))
        self.stem_cache_control = STEM_CACHE_CONTROL[public]
        self.manifest_cache_control = MANIFEST_CACHE_CONTROL[public]

    # -- the one retry layer ----------------------------------------------------------
    def _call(
        self,
        what: str,
        function,
        *args,
        not_found: JobError | None = None,
        original: bool = False,
        **kwargs,
    ):
        """Run one GCS call with bounded retries; failures become JobErrors, classified by
        side (`original`: the sender's object; otherwise ours, see job/faults.py)."""
        try:
            return bounded(self.retry_deadline_s, is_transient)(
                function, *args, timeout=self.timeout, retry=None, **kwargs
            )
        except JobError:
            raise
        except exceptions.NotFound as exc:
            if not_found is None:
                raise self._fault(exc, what, original) from exc
            raise not_found from exc
        except Exception as exc:
            if (fault := self._fault(exc, what, original)) is None:
                raise
            raise fault from exc

    def _fault(self, exc, what, original):
        return storage_fault(
            exc, what, original=original, bucket=self.bucket.name, deadline_s=self.retry_deadline_s
        )

    # -- originals ---------------------------------------------------------------------
    def describe_original(self, uri: str, trusted: bool = False) -> Original:
        """Check URI, bucket, existence and size from the object's metadata, without downloading."""
        bucket, name = parse_gs_uri(uri)
        if not trusted and bucket not in self.allowed_buckets:
            raise JobError(
                "input_not_allowed",
                f"{uri} is in bucket {bucket!r}, which is not allowed "
                f"(ALLOWED_INPUT_BUCKETS: {', '.join(self.allowed_buckets)})",
            )
        blob = self._call(
            f"reading metadata of {uri}", self.client.bucket(bucket).get_blob, name, original=True
        )
        if blob is None:
            raise JobError("input_not_found", f"{uri} does not exist")
        check_size(blob.size or 0, self.max_bytes, uri)
        return Original(
            uri,
            blob.size,
            {
                "uri": uri,
                "generation": blob.generation,
                "crc32c": blob.crc32c,
                "md5": blob.md5_hash,
                "size": blob.size,
            },
        )

    def fetch_original(self, original: Original, folder: Path) -> Path:
        """Download exactly the described generation, streamed to disk, resuming after a
        dropped connection, and verify its size and CRC32C."""
        bucket, name = parse_gs_uri(original.uri)
        generation = original.identity.get("generation")
        blob = self.client.bucket(bucket).blob(name, generation=generation)
        target = Path(folder) / "original"  # no suffix: the content decides how it is read
        changed = JobError(
            "input_changed",
            f"{original.uri} changed or vanished since it was "
            "described; a retry will take its current version",
            retryable=True,
        )
        sink = _ChecksummedFile(target)
        try:
            self._call(
                f"downloading {original.uri}",
                lambda **kw: blob.download_to_file(
                    sink, start=sink.size or None, raw_download=True, checksum=None, **kw
                ),
                not_found=changed,
                original=True,
            )
        finally:
            sink.close()
        expected = original.identity.get("crc32c")
        if sink.size != original.size or (expected and crc32c_b64(sink.crc32c) != expected):
            raise changed
        return target

    # -- outputs -----------------------------------------------------------------------
    def prefix(self, release_id: str, track_id: str) -> str:
        return f"stems/{check_id('releaseId', release_id)}/{check_id('trackId', track_id)}/"

    def stem_url(self, release_id: str, track_id: str, filename: str) -> str:
        """The object's public URL; a sum's `+` is percent-encoded (`drums%2Bbass.mp3`), which
        no reader can take for a space."""
        prefix = self.prefix(release_id, track_id)
        return f"{PUBLIC_URL}/{self.bucket.name}/{prefix}{quote(filename)}"

    def commit(self, release_id: str, track_id: str) -> GcsCommit:
        """Claim the track (the old set is vouched for by nothing from then on) to write the
        next set: `with storage.commit(r, t) as commit: commit.write_stems(...); ...`."""
        return GcsCommit(self, release_id, track_id)

    def upload(self, name: str, source: Path, if_generation_match: int | None = None) -> int:
        """One object from a local file; its new generation."""
        blob = self.bucket.blob(name)
        blob.cache_control = self.stem_cache_control
        content_type = CONTENT_TYPES.get(
            source.suffix.lstrip(".").lower(), "application/octet-stream"
        )
        self._call(
            f"uploading gs://{self.bucket.name}/{name}",
            blob.upload_from_filename,
            str(source),
            content_type=content_type,
            checksum="crc32c",
            if_generation_match=if_generation_match,
        )
        return blob.generation

    @staticmethod
    def upload_all(uploads: dict) -> dict:
        """Run {name: upload()} at once (one thread each); {name: generation}, or the first
        failure once every upload has ended."""
        with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, len(uploads))) as pool:
            futures = {name: pool.submit(upload) for name, upload in uploads.items()}
        return {name: future.result() for name, future in futures.items()}

    def put_json(self, name: str, body: dict, if_generation_match: int) -> int:
        """A manifest or claim (never cached); its new generation."""
        blob = self.bucket.blob(name)
        blob.cache_control = self.manifest_cache_control
        self._call(
            f"writing gs://{self.bucket.name}/{name}",
            blob.upload_from_string,
            json.dumps(body, indent=2),
            content_type="application/json",
            if_generation_match=if_generation_match,
        )
        return blob.generation

    def delete(self, name: str, if_generation_match: int) -> bool:
        """Delete the object if it is still at that generation: False when it is not (another
        writer's is there); True when deleted, or gone already (a retry after a lost answer)."""
        gone = JobError("storage_not_found", f"gs://{self.bucket.name}/{name} is gone")
        try:
            self._call(
                f"deleting gs://{self.bucket.name}/{name}",
                self.bucket.blob(name).delete,
                if_generation_match=if_generation_match,
                not_found=gone,
            )
        except JobError as error:
            if error is gone:
                return True
            if isinstance(error.__cause__, exceptions.PreconditionFailed):
                return False
            raise
        return True

    def download_json(self, name: str) -> tuple[dict, int] | None:
        """(the object's JSON, its generation); None when absent or not a JSON object."""
        blob = self.bucket.blob(name)
        try:
            body = json.loads(
                self._call(f"reading gs://{self.bucket.name}/{name}", blob.download_as_bytes)
            )
        except JobError as error:
            if error.code == "storage_not_found":
                return None
            raise
        except ValueError:
            return None
        return (body, blob.generation) if isinstance(body, dict) else None

    def generation(self, name: str) -> int:
        """The object's generation; 0 when it does not exist."""
        blob = self._call(
            f"reading metadata of gs://{self.bucket.name}/{name}", self.bucket.get_blob, name
        )
        return blob.generation if blob is not None else 0

    def generations(self, prefix: str) -> dict:
        """{object name: generation} of everything under `prefix`."""
        listing = self._call(
            f"listing gs://{self.bucket.name}/{prefix}",
            lambda **kw: list(self.client.list_blobs(self.bucket, prefix=prefix, **kw)),
        )
        return {blob.name: blob.generation for blob in listing}

    def published(self, message_id: str) -> dict | None:
        """Under stems/ (`stems/.published/ID.json`: no release id starts with a dot), where the
        job's role already reaches."""
        found = self.download_json("stems/" + published_name(message_id))
        return found[0] if found is not None else None

    def record_published(self, message_id: str, record: dict) -> None:
        try:
            self.put_json("stems/" + published_name(message_id), record, if_generation_match=0)
        except JobError as error:
            if not isinstance(error.__cause__, exceptions.PreconditionFailed):
                raise

    def check_input_unchanged(self, identity) -> None:
        """A set made from an original that has been replaced since must not be vouched for:
        a retry separates the new version (and the message that replaced it may be done)."""
        if not (isinstance(identity, dict) and identity.get("uri") and identity.get("generation")):
            return
        bucket, name = parse_gs_uri(identity["uri"])
        blob = self._call(
            f"reading metadata of {identity['uri']}",
            self.client.bucket(bucket).get_blob,
            name,
            original=True,
        )
        if blob is None or blob.generation != identity["generation"]:
            raise JobError(
                "input_changed",
                f"{identity['uri']} was replaced while it was "
                "separated; a retry takes its current version",
                retryable=True,
            )

    def read_manifest(self, release_id: str, track_id: str) -> dict | None:
        """The manifest of a complete set; None when absent, unreadable, a writer's claim (as
        versions before the claim object stored it), or when an object it names no longer
        carries the generation it names."""
        prefix = self.prefix(release_id, track_id)
        found = self.download_json(prefix + MANIFEST)
        if found is None or "claim" in found[0]:
            return None
        manifest = found[0]
        expected = manifest.get("objectGenerations")
        if isinstance(expected, dict) and expected:
            current = self.generations(prefix)
            if any(current.get(name) != generation for name, generation in expected.items()):
                return None
        return manifest
