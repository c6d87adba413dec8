"""The local-folder backend: originals from local paths, stems under OUTPUT_DIR/RELEASE/TRACK/."""

import contextlib
import fcntl
import json
import os
import time
from pathlib import Path

from job.errors import JobError
from job.manifest import sha256_of
from job.messages import check_id
from job.storage import filestamps
from job.storage.base import MANIFEST, Original, atomic_write, check_size, published_name


class LocalStorage:
    """Originals from local paths; stems under OUTPUT_DIR/RELEASE/TRACK/: the Storage protocol
    on a filesystem, every name checked before it becomes a path (IDs, INPUT_DIR)."""

    def __init__(
        self,
        output_dir: str,
        input_dir: str = "",
        max_bytes: int = 2**31,
        restrict_inputs: bool = False,
        lock_wait_s: float = 60.0,
    ):
        self.output_dir = Path(output_dir)
        self.lock_wait_s = lock_wait_s
        self.input_dir = Path(input_dir).resolve() if input_dir else None
        self.max_bytes = max_bytes
        self.restrict_inputs = restrict_inputs

    # -- originals ---------------------------------------------------------------
    def describe_original(self, uri: str, trusted: bool = False) -> Original:
        if uri.startswith("gs://"):
            raise JobError("invalid_uri", f"{uri} is a Cloud Storage URI but STORAGE_MODE=local")
        path = Path(uri.removeprefix("file://")).expanduser()
        if not trusted and (self.input_dir or self.restrict_inputs):
            if self.input_dir is None:
                raise JobError(
                    "input_not_allowed",
                    "local originals named by messages need INPUT_DIR to be set",
                )
            resolved = (self.input_dir / path).resolve()
            if not resolved.is_relative_to(self.input_dir):
                raise JobError(
                    "input_not_allowed", f"{uri} is not under INPUT_DIR ({self.input_dir})"
                )
            path = resolved
        if not path.exists():
            raise JobError("input_not_found", f"{uri} does not exist")
        if not path.is_file():
            raise JobError("input_not_found", f"{uri} is not a regular file")
        size = path.stat().st_size
        check_size(size, self.max_bytes, uri)
        return Original(
            uri, size, {"path": str(path.resolve()), "size": size, "sha256": sha256_of(path)}, path
        )

    def fetch_original(self, original: Original, folder: Path) -> Path:
        return original.local_path

    # -- outputs -----------------------------------------------------------------
    def track_dir(self, release_id: str, track_id: str, create: bool = False) -> Path:
        """The track's folder, refusing any path (e.g. via symlinks) that leaves OUTPUT_DIR."""
        root = self.output_dir.resolve()
        folder = root / check_id("releaseId", release_id) / check_id("trackId", track_id)
        if create:
            try:
                folder.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise JobError(
                    "output_unwritable", f"cannot create {folder}: {exc.strerror}", retryable=True
                ) from None
        if folder.exists() and not folder.resolve().is_relative_to(root):
            raise JobError("output_not_allowed", f"{folder} resolves outside OUTPUT_DIR")
        return folder

    def stem_url(self, release_id: str, track_id: str, filename: str) -> str:
        return f"{release_id}/{track_id}/{filename}"

    def read_manifest(self, release_id: str, track_id: str) -> dict | None:
        """The manifest of a complete set; None when absent, unreadable, or when a file it
        names is missing or no longer holds the bytes it names (`fileChecksums`). A file whose
        stamp (`fileStamps`, job/storage/filestamps.py) still matches is not read again."""
        folder = self.track_dir(release_id, track_id)
        try:
            manifest = json.loads((folder / MANIFEST).read_text())
        except (FileNotFoundError, ValueError):
            return None
        if not isinstance(manifest, dict):
            return None
        stamps = manifest.get("fileStamps") or {}
        for name, checksum in (manifest.get("fileChecksums") or {}).items():
            try:
                if Path(name).name != name:
                    return None
                if stamps.get(name) != filestamps.stamp(folder / name):
                    if sha256_of(folder / name) != checksum:
                        return None
            except (OSError, AttributeError):
                return None
        return manifest

    def commit(self, release_id: str, track_id: str) -> "LocalCommit":
        return LocalCommit(self, release_id, track_id)

    def published(self, message_id: str) -> dict | None:
        try:
            return json.loads((self.output_dir / published_name(message_id)).read_text())
        except (FileNotFoundError, ValueError):
            return None

    def record_published(self, message_id: str, record: dict) -> None:
        target = self.output_dir / published_name(message_id)
        target.parent.mkdir(parents=True, exist_ok=True)
        if not target.exists():
            atomic_write(target, json.dumps(record).encode())


class LocalCommit:
    """A local writer's turn at a track: an exclusive lock on the track's folder from removing
    the old manifest to writing the new one (workers sharing OUTPUT_DIR on one host take turns;
    a killed writer's lock goes with its process). The manifest names each file's checksum, so
    a set that something else changed afterwards is not taken for complete either."""

    def __init__(self, storage: LocalStorage, release_id: str, track_id: str):
        self.storage, self.release_id, self.track_id = storage, release_id, track_id
        self.checksums, self.stamps = {}, {}
        self._lock = None

    def __enter__(self) -> "LocalCommit":
        self.folder = self.storage.track_dir(self.release_id, self.track_id, create=True)
        self._lock = os.open(self.folder, os.O_RDONLY | os.O_DIRECTORY)
        deadline = time.monotonic() + self.storage.lock_wait_s
        while True:
            try:
                fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    self.__exit__()
                    raise JobError(
                        "concurrent_write",
                        f"{self.folder}: another job kept "
                        f"writing this track for {self.storage.lock_wait_s:g} s; "
                        "a retry decides again",
                        retryable=True,
                    ) from None
                time.sleep(0.05)
        with contextlib.suppress(FileNotFoundError):
            (self.folder / MANIFEST).unlink()
        return self

    def __exit__(self, *exc) -> None:
        if self._lock is not None:
            os.close(self._lock)  # releases the lock
            self._lock = None

    def write_stems(self, files: dict) -> dict:
        urls = {}
        for key, source in files.items():
            target = self.folder / source.name
            if target.is_symlink():
                target.unlink()
            atomic_write(target, source=source)
            urls[key] = self.storage.stem_url(self.release_id, self.track_id, source.name)
        written = [self.folder / source.name for source in files.values()]
        clock = filestamps.settled(self.folder, written) if written else None
        for target in written:  # hashed as stored, after the filesystem's clock moved on
            checksum, stamp = filestamps.hashed_with_stamp(target, clock, sha256_of)
            self.checksums[target.name] = checksum
            if stamp is not None:
                self.stamps[target.name] = stamp
        return urls

    def write_manifest(self, manifest: dict) -> dict:
        body = {**manifest, "fileChecksums": dict(self.checksums), "fileStamps": self.stamps}
        atomic_write(self.folder / MANIFEST, json.dumps(body, indent=2).encode())
        return manifest
