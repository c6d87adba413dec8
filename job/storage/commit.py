"""Writing one track's set on Cloud Storage while another job may be writing the same track.

The public layout fixes the objects' names (stems/RELEASE/TRACK/STEM.mp3), so two jobs writing
one track (a redelivery after a stalled job's lease ran out, two requests for different outputs,
a re-uploaded original) write the same objects, and Cloud Storage has no transaction across
objects. The manifest is the one compare-and-swap pointer, and every write is fenced by a
generation precondition:

1. Claim: replace the manifest (or nothing) by a claim, `if_generation_match` = the generation
   just read. Of writers racing for one generation exactly one wins; from here on the old set
   is vouched for by nothing.
2. Read the objects' generations, then check that the claim still stands: they were read while
   no newer writer had claimed.
3. Upload each object `if_generation_match` that generation (0: it must not exist). A 412 means
   another writer replaced it: while the claim still stands (checked after reading the new
   generation) the upload is redone over it; otherwise this writer has lost.
4. The manifest, naming each object's generation, `if_generation_match` = the claim. A 412
   means a newer claim: another job's complete set for the same request (everything
   `manifest.key` compares) stands and is returned; anything else is a retryable
   `concurrent_write`, and the redelivery decides again.

This closes the window rather than narrowing it: a writer conditions a write only on a
generation it read while its claim was the newest; a newer claimer's uploads carry generations
it never read, so it cannot replace them; so once (4) succeeds, no older writer can replace an
object the manifest names, and a newer one must replace the manifest first. A claim never
completed (a killed job) is taken over by the next writer like any other manifest.
Stems under a per-attempt prefix, with the manifest pointing at them, would need no fencing in
(3), but the result URLs would change, and copying the objects to their public names afterwards
brings back the race on those names.
"""

import datetime
import logging
import uuid

from google.api_core import exceptions

from job import manifest as manifests
from job.errors import JobError
from job.storage.base import MANIFEST

log = logging.getLogger(__name__)
ROUNDS = 5  # takeovers of one object, or claims lost to racing writers, then retryable


def precondition_failed(error: JobError) -> bool:
    """Whether a GCS call failed on its `if_generation_match` (HTTP 412)."""
    return isinstance(error.__cause__, exceptions.PreconditionFailed)


def concurrent_write(prefix: str, what: str) -> JobError:
    return JobError(
        "concurrent_write",
        f"{prefix}: another job is writing this track ({what}); a retry decides again",
        retryable=True,
    )


class GcsCommit:
    """One writer's claim on a track, its fenced uploads, and its manifest (a context manager:
    entering claims). One class because the claim's generation fences every later write;
    each step is its own short method."""

    def __init__(self, storage, release_id: str, track_id: str):
        self.storage, self.release_id, self.track_id = storage, release_id, track_id
        self.prefix = storage.prefix(release_id, track_id)
        self.name = self.prefix + MANIFEST
        self.writer = uuid.uuid4().hex  # tells this writer's manifest from another's
        self.claim = None  # the manifest generation that is this claim
        self.seen = {}  # {object: generation} read while the claim stood
        self.written = {}  # {object: generation} uploaded under the claim

    def __enter__(self) -> "GcsCommit":
        body = {"claim": self.writer, "claimedAt": datetime.datetime.now(datetime.UTC).isoformat()}
        for _ in range(ROUNDS):
            if self._put_manifest(body, self._generation(self.name)):
                break
        else:
            raise concurrent_write(self.prefix, "its manifest kept changing")
        self.seen = {
            name: generation
            for name, generation in self.storage.generations(self.prefix).items()
            if name != self.name
        }
        self._hold()
        return self

    def __exit__(self, *exc) -> None:
        """Nothing to undo: a claim left behind is taken over by the next writer."""

    # -- the stems ----------------------------------------------------------------------
    def write_stems(self, files: dict) -> dict:
        """Upload {output: local file} under the claim; {output: url}."""
        names = {key: self.prefix + source.name for key, source in files.items()}
        generations = self.storage.upload_all(
            {
                names[key]: (lambda name=names[key], source=files[key]: self._upload(name, source))
                for key in files
            }
        )
        self.written.update(generations)
        return {
            key: self.storage.stem_url(self.release_id, self.track_id, source.name)
            for key, source in files.items()
        }

    def _upload(self, name: str, source) -> int:
        for _ in range(ROUNDS):
            try:
                return self.storage.upload(name, source, if_generation_match=self.seen.get(name, 0))
            except JobError as error:
                if not precondition_failed(error):
                    raise
            current = self._generation(name)  # read first, then check the claim
            self._hold()
            log.warning("another writer replaced %s; uploading it again", name)
            self.seen[name] = current
        raise concurrent_write(self.prefix, f"{name} kept being replaced")

    # -- the manifest -------------------------------------------------------------------
    def write_manifest(self, body: dict) -> dict:
        """The manifest, last; returns the manifest that stands: this one, or that of another
        job which completed a set for the same request meanwhile."""
        self.storage.check_input_unchanged(body.get("input"))
        full = {**body, "writer": self.writer, "objectGenerations": dict(self.written)}
        if self._put_manifest(full, self.claim):
            return body
        found = self.storage.read_manifest(self.release_id, self.track_id)
        if manifests.same_request(found, body):
            log.info(
                "another job completed %s for the same request meanwhile; its set stands",
                self.prefix,
            )
            return found
        raise concurrent_write(self.prefix, "a newer writer claimed it")

    def _put_manifest(self, body: dict, generation: int) -> bool:
        """Write the manifest if it is still at `generation` (0: absent); False when another
        writer's is there. A 412 for a write of ours whose answer was lost counts as written."""
        try:
            self.claim = self.storage.put_manifest(self.name, body, if_generation_match=generation)
            return True
        except JobError as error:
            if not precondition_failed(error):
                raise
        current = self.storage.download_json(self.name)
        if current is not None and self.writer in (
            current[0].get("writer"),
            current[0].get("claim"),
        ):
            self.claim = current[1]
            return True
        return False

    # -- checks -------------------------------------------------------------------------
    def _generation(self, name: str) -> int:
        return self.storage.generation(name)

    def _hold(self) -> None:
        """Fail unless the manifest is still this writer's claim."""
        if self._generation(self.name) != self.claim:
            raise concurrent_write(self.prefix, "a newer writer claimed it")
