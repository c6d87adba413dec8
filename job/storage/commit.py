"""Writing one track's set on Cloud Storage while another job may be writing the same track.

The public layout fixes the objects' names (stems/RELEASE/TRACK/STEM.mp3), so two jobs writing
one track (a redelivery after a stalled job's lease ran out, two requests for different outputs,
a re-uploaded original) write the same objects, and Cloud Storage has no transaction across
objects. `manifest.json` only ever holds a whole set's manifest (backends poll for it, many by
its existence alone), so the writers' compare-and-swap pointer is a claim object of its own
beside it (`.claim.json`), and every write is fenced by a generation precondition:

1. Claim: replace the claim object (or nothing) by this writer's, `if_generation_match` = the
   generation just read. Of writers racing for one generation exactly one wins.
2. Read the objects' generations, then check that the claim still stands: they were read while
   no newer writer had claimed.
3. Delete the old manifest, `if_generation_match` = the generation read in (2): from here on
   the old set is vouched for by nothing, before any of its objects is replaced.
4. Upload each object `if_generation_match` that generation (0: it must not exist). A 412 means
   another writer replaced it: while the claim still stands (checked after reading the new
   generation) the upload is redone over it; otherwise this writer has lost.
5. Check the claim, then create the manifest naming each object's generation,
   `if_generation_match` = 0. A 412 while the claim still stands is a stale writer's manifest
   (below): it is replaced. Once the claim is lost: another job's complete set for the same
   request (everything `manifest.key` compares) stands and is returned; anything else is a
   retryable `concurrent_write`, and the redelivery decides again.
6. Check the claim once more: lost since (5), this writer deletes its own manifest (fenced on
   its generation) and loses as in (5). Then the claim object is deleted (fenced: a newer
   writer's stays).

A writer conditions a write only on a generation it read while its claim was the newest, so a
newer claimer's uploads carry generations it never read and cannot be replaced by it. What GCS
cannot fence is the manifest's create in (5) against the claim object: a writer A that passed
its check in (5) just before a writer B claimed and listed may still create the manifest, naming
A's objects, while B replaces them. That is the one window: it lasts until A's check in (6)
deletes it, or B's manifest (5) replaces it; if A is killed in between and B fails too, it stays.
Such a manifest names generations that are no longer the objects' (B replaced at least one
before it could fail after uploading), and `read_manifest`, like any reader comparing
`objectGenerations` with the objects, does not take it for a set; a set whose objects B never
reached is A's whole set. A killed job leaves its claim object, never a manifest of its own;
the next writer takes the claim over like any other.
"""

import datetime
import logging
import uuid

from google.api_core import exceptions

from job import manifest as manifests
from job.errors import JobError
from job.storage.base import CLAIM, MANIFEST

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
    entering claims). Every write after the claim is conditioned on a generation read while the
    claim stood, so a writer that has lost the track cannot overwrite the one that holds it."""

    def __init__(self, storage, release_id: str, track_id: str):
        self.storage, self.release_id, self.track_id = storage, release_id, track_id
        self.prefix = storage.prefix(release_id, track_id)
        self.name = self.prefix + MANIFEST
        self.claim_name = self.prefix + CLAIM
        self.writer = uuid.uuid4().hex  # tells this writer's objects from another's
        self.claim = None  # the claim object's generation that is this claim
        self.seen = {}  # {object: generation} read while the claim stood
        self.written = {}  # {object: generation} uploaded under the claim

    def __enter__(self) -> "GcsCommit":
        body = {"writer": self.writer, "claimedAt": datetime.datetime.now(datetime.UTC).isoformat()}
        for _ in range(ROUNDS):
            if claim := self._put(self.claim_name, body, self._generation(self.claim_name)):
                self.claim = claim
                break
        else:
            raise concurrent_write(self.prefix, "its claim kept changing")
        self.seen = {
            name: generation
            for name, generation in self.storage.generations(self.prefix).items()
            if name != self.claim_name
        }
        self._hold()
        self._unvouch()
        return self

    def __exit__(self, failed, *exc) -> None:
        """A writer done drops its claim; a failed one leaves it (never a manifest) for the
        next writer to take over: a cleanup could outlast the fault that failed it."""
        if failed is None:
            try:  # the set stands either way; a claim left is taken over like any other
                self.storage.delete(self.claim_name, if_generation_match=self.claim)
            except JobError as error:
                log.warning("claim %s left behind: %s", self.claim_name, error.message)

    def _unvouch(self) -> None:
        """Delete the old manifest before any object of its set is replaced."""
        for _ in range(ROUNDS):
            if not (generation := self.seen.pop(self.name, 0)):
                return
            if self.storage.delete(self.name, if_generation_match=generation):
                return
            self.seen[self.name] = self._generation(self.name)  # a stale writer's, just made
            self._hold()
        raise concurrent_write(self.prefix, "its manifest kept changing")

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
        for _ in range(ROUNDS):
            if not self._holds():
                return self._lost(body)
            if written := self._put(self.name, full, self.seen.get(self.name, 0)):
                if self._holds():
                    return body
                self.storage.delete(self.name, if_generation_match=written)
                return self._lost(body)
            log.warning("a stale writer's manifest stands at %s; replacing it", self.name)
            self.seen[self.name] = self._generation(self.name)
        raise concurrent_write(self.prefix, "its manifest kept changing")

    def _lost(self, body: dict) -> dict:
        """A newer writer claimed the track: its set stands if it is one for this request."""
        found = self.storage.read_manifest(self.release_id, self.track_id)
        if manifests.same_request(found, body):
            log.info(
                "another job completed %s for the same request meanwhile; its set stands",
                self.prefix,
            )
            return found
        raise concurrent_write(self.prefix, "a newer writer claimed it")

    def _put(self, name: str, body: dict, generation: int) -> int:
        """Write `name` if it is still at `generation` (0: absent): its new generation, or 0
        when another writer's is there. A 412 for a write of ours whose answer was lost counts
        as written."""
        try:
            return self.storage.put_json(name, body, if_generation_match=generation)
        except JobError as error:
            if not precondition_failed(error):
                raise
        current = self.storage.download_json(name)
        if current is not None and current[0].get("writer") == self.writer:
            return current[1]
        return 0

    # -- checks -------------------------------------------------------------------------
    def _generation(self, name: str) -> int:
        return self.storage.generation(name)

    def _holds(self) -> bool:
        return self._generation(self.claim_name) == self.claim

    def _hold(self) -> None:
        """Fail unless the claim object is still this writer's claim."""
        if not self._holds():
            raise concurrent_write(self.prefix, "a newer writer claimed it")
