"""Everything a track needs before the model: locate the original, skip it if its set is already
complete, download it, decode it.

`Intake` runs at once in the caller's thread, or (`ahead=True`) in a thread of its own so that
a drain's next track downloads and decodes while the current one separates. A failure is kept and
raised by `wait()` in the caller's thread, so it is reported like any other.
"""

import contextlib
import logging
import threading
from dataclasses import dataclass
from pathlib import Path

from job import manifest
from job.audio import child as decoder
from job.audio import decode as audio
from job.errors import Cancel
from job.messages import JobRequest, outputs_of
from job.progress import stage
from job.storage.base import Original, Storage, scratch_folder

log = logging.getLogger(__name__)
CANCELLED_FETCH_WAIT_S = 3.0


@dataclass
class TrackInput:
    """A located original and, unless its stems are already complete, its decoded audio."""

    original: Original
    manifest: dict | None  # the manifest found when locating
    decoded: audio.DecodedAudio | None = None  # None: the set is complete, nothing to separate
    scratch: Path | None = None  # the track's temp folder


class Intake:
    """One track's locate, skip check, download and decode, run in the caller's thread or ahead
    in a thread of its own; `wait()` hands over the TrackInput (or raises the failure) either
    way, and the scratch folder lives until `close()`."""

    def __init__(
        self,
        request: JobRequest,
        storage: Storage,
        settings,
        cancel: Cancel,
        model_cache=None,
        trusted: bool = False,
        ahead: bool = False,
        attempt: int | None = None,
    ):
        self.request, self.storage, self.settings = request, storage, settings
        self.attempt = attempt  # earlier tries of this track (job.audio.child.kill_is_final)
        self.cancel, self.model_cache, self.trusted, self.ahead = (
            cancel,
            model_cache,
            trusted,
            ahead,
        )
        self.timings: dict = {}
        self._scratch = contextlib.ExitStack()
        self._outcome = None
        self._thread = None
        if ahead:
            self._thread = threading.Thread(
                target=self._run, daemon=True, name=f"fetch-{request.job_id}"
            )
            self._thread.start()
        else:
            self._run()

    def _run(self):
        try:
            self._outcome = (self._fetch(), None)
        except BaseException as exc:  # re-raised by wait() in the caller's thread
            self._outcome = (None, exc)

    def _fetch(self) -> TrackInput:
        request, storage = self.request, self.storage
        with stage(self.timings, "locate"):
            original = storage.describe_original(request.original_uri, trusted=self.trusted)
            found = storage.read_manifest(request.release_id, request.track_id)
        # the weights' digest (reading every model file) only where a set was found to compare
        # it with; otherwise it is worked out later, beside the model's load
        model = self.model_cache.identity() if found and self.model_cache is not None else None
        if manifest.matches(
            found,
            original.identity,
            manifest.Recipe.of(self.settings),
            outputs_of(request, self.settings.outputs),
            model,
        ):
            return TrackInput(original, found)
        if self.model_cache is not None:
            self.model_cache.warm()  # the model loads while the original downloads
        scratch = self._scratch.enter_context(scratch_folder())
        with stage(self.timings, "download"):
            local = storage.fetch_original(original, scratch)
        with stage(self.timings, "decode"):
            decoded = decoder.decode_aside(
                local,
                scratch / "mix.f32",
                self.settings.max_duration_s,
                cancel=self.cancel,
                limits=decoder.Limits.of(self.settings),
                attempt=self.attempt,
            )
        log.info(
            "job %s: %s decoded (%.1f s of audio)%s",
            request.job_id,
            request.original_uri,
            decoded.duration_s,
            ", ahead of its turn" if self.ahead else "",
        )
        return TrackInput(original, found, decoded, scratch)

    def wait(self) -> TrackInput:
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
            self._thread.join(CANCELLED_FETCH_WAIT_S if self.cancel.is_set() else None)
            if self._thread.is_alive():
                log.warning(
                    "job %s: fetch still running at shutdown, left behind", self.request.job_id
                )
                return
        self._scratch.close()
