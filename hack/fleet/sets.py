"""One good track's set in storage, read against its manifest and its original: "ok",
"missing" (no manifest, or only a writer's claim), "mixed" (objects that are not the manifest's)
or "stale" (a complete set, of an older input)."""

import hashlib
import json

from job.messages import STEMS
from job.storage.base import CLAIM

from .config import RELEASE


def check_track(site, durations: dict, track: str, problems: list) -> str:
    """The state of `track`'s set; what is wrong with it goes to `problems`."""
    prefix = f"stems/{RELEASE}/{track}/"
    blobs = {  # a claim beside the set is a writer's fencing token, not part of the set
        b.name: b
        for b in site.storage.list_blobs(site.bucket, prefix=prefix)
        if b.name != prefix + CLAIM
    }
    if prefix + "manifest.json" not in blobs:
        problems.append(f"{track}: no manifest ({len(blobs)} objects)")
        return "missing"
    manifest = json.loads(blobs[prefix + "manifest.json"].download_as_bytes())
    if "claim" in manifest:
        problems.append(f"{track}: only a writer's claim, no complete set")
        return "missing"
    if problem := mixed(site, track, prefix, blobs, manifest):
        problems.append(problem)
        return "mixed"
    if problem := stale(site, track, manifest, durations[track][-1]):
        problems.append(problem)
        return "stale"
    return "ok"


def mixed(site, track: str, prefix: str, blobs: dict, manifest: dict) -> str | None:
    """Whether the objects under `prefix` are exactly the manifest's, generation and bytes."""
    generations = manifest.get("objectGenerations") or {}
    stems = manifest["stems"]
    # every output's audio and (with OUTPUT_ANALYSIS) its waveform peaks file
    names = {prefix + entry["file"] for entry in stems.values()} | {
        prefix + entry["peaks"].rsplit("/", 1)[1] for entry in stems.values() if entry.get("peaks")
    }
    if (
        set(stems) != set(STEMS)
        or set(generations) != names
        or set(blobs) != names | {prefix + "manifest.json"}
    ):
        return f"{track}: stems {sorted(stems)} / objects {sorted(blobs)}"
    if others := [name for name in names if blobs[name].generation != generations[name]]:
        return f"{track}: {others} are not the manifest's generations"
    bucket = site.storage.bucket(site.bucket)
    for stem, entry in stems.items():
        blob = blobs[prefix + entry["file"]]
        data = bucket.blob(blob.name, generation=blob.generation).download_as_bytes()
        if (
            blob.generation != generations[blob.name]
            or len(data) != entry["bytes"]
            or hashlib.sha256(data).hexdigest() != entry["sha256"]
        ):
            return (
                f"{track}: {stem} is not the manifest's (generation "
                f"{blob.generation} vs {generations[blob.name]})"
            )
    return None


def stale(site, track: str, manifest: dict, duration: float) -> str | None:
    """Whether the set is of an older input than the original now stored."""
    uri = manifest["input"]["uri"]
    original = site.storage.bucket(site.bucket).get_blob(uri.split("/", 3)[3])
    if (
        manifest["input"].get("generation") != original.generation
        or abs(manifest["durationS"] - duration) > 0.1
    ):
        return (
            f"{track}: the manifest names generation "
            f"{manifest['input'].get('generation')}, the original is at "
            f"{original.generation}"
        )
    return None
