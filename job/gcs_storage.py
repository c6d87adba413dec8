"""The Cloud Storage backend: originals from gs:// URIs, stems in gs://BUCKET/stems/RELEASE/TRACK/.

Same calls as LocalStorage (see storage.py), so the pipeline does not know which backend it has.
Every call to GCS goes through `_call`: transient faults (429, 5xx, timeouts, dropped
connections) are retried with exponential backoff and jitter for a bounded time, then become
`storage_unavailable` (retryable); everything else becomes a JobError that is not worth a retry.
The client's own retries are switched off (retry=None) so that this is the only retry layer and
the bound holds.

The manifest records the generation of each stem it vouches for (`objectGenerations`); `read_manifest` returns it only
while the stems still carry those generations, so a set that a racing job overwrote in part never
passes for complete. Two jobs can write one track at once (a redelivery after a stalled job's lease
ran out), and the last manifest written may then name stems the other job has replaced since: so
`write_manifest` reads the set back and, until a consistent set is in place, writes its own stems
and manifest again. It refuses to vouch for an original that has been replaced meanwhile.
"""

import base64
import concurrent.futures
import json
import logging
import re
from pathlib import Path

import google_crc32c
from google.api_core import exceptions
from google.cloud import storage

from .errors import JobError
from .faults import storage_fault
from .messages import check_id
from .retry import bounded, is_transient
from .storage import CONTENT_TYPES, MANIFEST, LocalStorage, Original, check_size

log = logging.getLogger(__name__)
PUBLIC_URL = "https://storage.googleapis.com"
COMMIT_ROUNDS = 5           # rewrites of a set that racing jobs keep overwriting, then retryable
# Stems keep their URL when a changed original is separated again, so caches must not keep
# them for long; the manifest is the completeness marker and must never be served stale.
STEM_CACHE_CONTROL = "public, max-age=3600"
MANIFEST_CACHE_CONTROL = "no-cache"
BUCKET_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]{1,220}[a-z0-9]$")
CONTROL_CHARS = re.compile(r"[\x00-\x1f\x7f]")


def parse_gs_uri(uri: str) -> tuple[str, str]:
    """`gs://BUCKET/OBJECT` to (bucket, object name), refusing anything odd."""
    if not isinstance(uri, str) or not uri.startswith("gs://"):
        raise JobError("invalid_uri", f"{str(uri)[:200]!r} is not a gs://BUCKET/OBJECT URI")
    bucket, _, name = uri[len("gs://"):].partition("/")
    if not BUCKET_NAME.match(bucket) or ".." in bucket:
        raise JobError("invalid_uri", f"{uri[:200]!r} does not name a valid bucket")
    if not name or len(name.encode("utf-8")) > 1024 or CONTROL_CHARS.search(name):
        raise JobError("invalid_uri", f"{uri[:200]!r} does not name a valid object "
                       "(1 to 1024 bytes, no control characters)")
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
    """Originals from allowed buckets; stems and manifests in `bucket`."""

    def __init__(self, bucket: str, allowed_buckets=(), max_bytes: int = 2**31,
                 project: str | None = None, client: storage.Client | None = None,
                 retry_deadline_s: float = 60.0, stem_cache_control: str = STEM_CACHE_CONTROL):
        self.client = client or storage.Client(project=project or None)
        self.bucket = self.client.bucket(bucket)
        self.allowed_buckets = tuple(allowed_buckets) or (bucket,)
        self.max_bytes = max_bytes
        self.retry_deadline_s = retry_deadline_s
        self.timeout = (min(10.0, retry_deadline_s), max(5.0, min(60.0, retry_deadline_s)))
        self.stem_cache_control = stem_cache_control
        self._uploaded = {}     # (release, track) -> {object: (generation, local file)}, awaiting the manifest

    # -- the one retry layer ----------------------------------------------------------
    def _call(self, what: str, function, *args, not_found: JobError | None = None,
              original: bool = False, **kwargs):
        """Run one GCS call with bounded retries; failures become JobErrors, classified by
        side (`original`: the sender's object; otherwise ours, see job/faults.py)."""
        try:
            return bounded(self.retry_deadline_s, is_transient)(
                function, *args, timeout=self.timeout, retry=None, **kwargs)
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
        return storage_fault(exc, what, original=original, bucket=self.bucket.name,
                             deadline_s=self.retry_deadline_s)

    # -- originals ---------------------------------------------------------------------
    def describe_original(self, uri: str, trusted: bool = False) -> Original:
        """Check URI, bucket, existence and size from the object's metadata, without downloading."""
        bucket, name = parse_gs_uri(uri)
        if not trusted and bucket not in self.allowed_buckets:
            raise JobError("input_not_allowed",
                           f"{uri} is in bucket {bucket!r}, which is not allowed "
                           f"(ALLOWED_INPUT_BUCKETS: {', '.join(self.allowed_buckets)})")
        blob = self._call(f"reading metadata of {uri}", self.client.bucket(bucket).get_blob, name,
                          original=True)
        if blob is None:
            raise JobError("input_not_found", f"{uri} does not exist")
        check_size(blob.size or 0, self.max_bytes, uri)
        return Original(uri, blob.size, {"uri": uri, "generation": blob.generation,
                                         "crc32c": blob.crc32c, "md5": blob.md5_hash,
                                         "size": blob.size})

    def fetch_original(self, original: Original, folder: Path) -> Path:
        """Download exactly the described generation, streamed to disk, resuming after a
        dropped connection, and verify its size and CRC32C."""
        bucket, name = parse_gs_uri(original.uri)
        generation = original.identity.get("generation")
        blob = self.client.bucket(bucket).blob(name, generation=generation)
        suffix = re.sub(r"[^A-Za-z0-9]", "", Path(name).suffix)[:8].lower()
        target = Path(folder) / ("original." + suffix if suffix else "original")
        changed = JobError("input_changed", f"{original.uri} changed or vanished since it was "
                           "described; a retry will take its current version", retryable=True)
        sink = _ChecksummedFile(target)
        try:
            self._call(f"downloading {original.uri}", lambda **kw: blob.download_to_file(
                sink, start=sink.size or None, raw_download=True, checksum=None, **kw),
                not_found=changed, original=True)
        finally:
            sink.close()
        expected = original.identity.get("crc32c")
        if sink.size != original.size or (expected and crc32c_b64(sink.crc32c) != expected):
            raise changed
        return target

    # -- outputs -----------------------------------------------------------------------
    def _prefix(self, release_id: str, track_id: str) -> str:
        return f"stems/{check_id('releaseId', release_id)}/{check_id('trackId', track_id)}/"

    def stem_url(self, release_id: str, track_id: str, filename: str) -> str:
        return f"{PUBLIC_URL}/{self.bucket.name}/{self._prefix(release_id, track_id)}{filename}"

    def _upload(self, name: str, source: Path) -> int:
        blob = self.bucket.blob(name)
        blob.cache_control = self.stem_cache_control
        content_type = CONTENT_TYPES.get(source.suffix.lstrip(".").lower(),
                                         "application/octet-stream")
        self._call(f"uploading gs://{self.bucket.name}/{name}", blob.upload_from_filename,
                   str(source), content_type=content_type, checksum="crc32c")
        return blob.generation

    def write_stems(self, release_id: str, track_id: str, files: dict) -> dict:
        """Upload all stems at once (one thread each); fail if any upload fails."""
        prefix = self._prefix(release_id, track_id)
        names = {stem: prefix + Path(source).name for stem, source in files.items()}
        with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, len(files))) as pool:
            futures = {stem: pool.submit(self._upload, names[stem], Path(source))
                       for stem, source in files.items()}
        for future in futures.values():
            future.result()     # the first failure, after every upload has ended
        self._uploaded[(release_id, track_id)] = {
            names[stem]: (future.result(), Path(files[stem])) for stem, future in futures.items()}
        return {stem: self.stem_url(release_id, track_id, Path(source).name)
                for stem, source in files.items()}

    def write_manifest(self, release_id: str, track_id: str, manifest: dict) -> None:
        """Written last: names the stems' generations so a partly overwritten set is detectable.
        Returns once the track holds a consistent set for this manifest's input: ours, or that
        of a job which wrote the same track from the same input meanwhile."""
        uploaded = self._uploaded.pop((release_id, track_id), {})
        prefix = self._prefix(release_id, track_id)
        for _ in range(COMMIT_ROUNDS):
            self._check_input_unchanged(manifest.get("input"))
            generations = {name: generation for name, (generation, _) in uploaded.items()}
            replaced = self._replaced(prefix, generations)
            if replaced:
                found = self.read_manifest(release_id, track_id)
                if found is not None and found.get("input") == manifest.get("input"):
                    log.info("another job completed %s from the same input meanwhile; its set "
                             "stands", prefix)
                    return
                log.warning("another job wrote %s meanwhile; writing %d stem(s) again", prefix,
                            len(replaced))
                for name in replaced:
                    uploaded[name] = (self._upload(name, uploaded[name][1]), uploaded[name][1])
                continue
            body = {**manifest, "objectGenerations": generations} if generations else manifest
            written = self._put_manifest(prefix, body)
            if not generations or not self._replaced(prefix, {**generations,
                                                              prefix + MANIFEST: written}):
                return
        raise JobError("concurrent_write", f"{prefix} kept being overwritten by another job "
                       "while its manifest was written", retryable=True)

    def _replaced(self, prefix: str, generations: dict) -> list:
        """The objects of `generations` that no longer carry that generation."""
        if not generations:
            return []
        current = self._generations(prefix)
        return [name for name, generation in generations.items()
                if current.get(name) != generation]

    def _put_manifest(self, prefix: str, body: dict) -> int:
        blob = self.bucket.blob(prefix + MANIFEST)
        blob.cache_control = MANIFEST_CACHE_CONTROL
        self._call(f"writing gs://{self.bucket.name}/{blob.name}", blob.upload_from_string,
                   json.dumps(body, indent=2), content_type="application/json")
        return blob.generation

    def _generations(self, prefix: str) -> dict:
        """{object name: generation} of everything under `prefix`."""
        listing = self._call(f"listing gs://{self.bucket.name}/{prefix}",
                             lambda **kw: list(self.client.list_blobs(self.bucket, prefix=prefix,
                                                                       **kw)))
        return {blob.name: blob.generation for blob in listing}

    def _check_input_unchanged(self, identity) -> None:
        """A set made from an original that has been replaced since must not be vouched for:
        a retry separates the new version (and the message that replaced it may be done)."""
        if not (isinstance(identity, dict) and identity.get("uri") and identity.get("generation")):
            return
        bucket, name = parse_gs_uri(identity["uri"])
        blob = self._call(f"reading metadata of {identity['uri']}",
                          self.client.bucket(bucket).get_blob, name, original=True)
        if blob is None or blob.generation != identity["generation"]:
            raise JobError("input_changed", f"{identity['uri']} was replaced while it was "
                           "separated; a retry takes its current version", retryable=True)

    def read_manifest(self, release_id: str, track_id: str) -> dict | None:
        """The manifest, or None when absent, unreadable, or its stems were replaced since."""
        prefix = self._prefix(release_id, track_id)
        blob = self.bucket.blob(prefix + MANIFEST)
        try:
            manifest = json.loads(self._call(f"reading gs://{self.bucket.name}/{blob.name}",
                                             blob.download_as_bytes))
        except JobError as error:
            if error.code == "storage_not_found":
                return None
            raise
        except ValueError:
            return None
        if not isinstance(manifest, dict):
            return None
        expected = manifest.get("objectGenerations")
        if isinstance(expected, dict) and expected:
            current = self._generations(prefix)
            if any(current.get(name) != generation for name, generation in expected.items()):
                return None
        return manifest

    def remove_manifest(self, release_id: str, track_id: str) -> None:
        """A new run of a track invalidates the old set before touching its stems."""
        blob = self.bucket.blob(self._prefix(release_id, track_id) + MANIFEST)
        try:
            self._call(f"deleting gs://{self.bucket.name}/{blob.name}", blob.delete)
        except JobError as error:
            if error.code != "storage_not_found":
                raise

    scratch = LocalStorage.scratch      # a local temp folder, whichever the backend
