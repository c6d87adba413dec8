"""The manifest: written last beside the stems, it vouches that the set is complete and says
which input, model and settings made it, so a redelivered message can be answered from it."""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
from pathlib import Path
from typing import TYPE_CHECKING

from job import messages, outputs
from job.errors import JobError

if TYPE_CHECKING:  # a type only: the manifest is below the steps that decode
    from job.audio import decode as audio

VERSION = 1


def sha256_of(path: Path) -> str:
    """The hex SHA-256 a manifest names each file by."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def key(found: dict) -> tuple:
    """What decides whether two sets are interchangeable: the input, the model and the digest of
    its weight files, the format and the bitrate (what a caller gets), which outputs were asked
    for, and which the set holds (a manifest from before outputs could be chosen holds the six
    stems).

    How a set was made is recorded, not compared: MP3_QUALITY (LAME's effort at the same
    bitrate), SHIFTS and the precision change the bytes a little but leave a set as good an
    answer as before, so a deployment that tunes them does not separate its catalogue again;
    MODEL_LICENSE is a declaration about the weights, which the digest already names."""
    return (
        found.get("version"),
        found.get("input"),
        found.get("model"),
        found.get("modelDigest"),
        found.get("format"),
        found.get("bitrate"),
        tuple(found.get("outputs", messages.STEMS)),
        frozenset(found.get("stems") or {}),
    )


@dataclasses.dataclass(frozen=True)
class Recipe:
    """What a set is made with, as its manifest records it: settings MODEL_NAME, OUTPUT_FORMAT,
    MP3_BITRATE, MP3_QUALITY, SHIFTS and SILENT_BELOW_LU (docs/configuration.md), under the
    settings' own names."""

    model_name: str
    output_format: str
    mp3_bitrate: int
    mp3_quality: int
    shifts: int
    silent_below_lu: float

    @classmethod
    def of(cls, settings) -> Recipe:
        return cls(
            **{field.name: getattr(settings, field.name) for field in dataclasses.fields(cls)}
        )


def bitrate(recipe) -> str | None:
    return f"{recipe.mp3_bitrate}k" if recipe.output_format == "mp3" else None


def matches(
    manifest: dict | None, identity: dict, recipe, asked, model: dict | None = None
) -> bool:
    """Whether `manifest` is a complete set of the outputs `asked` (names as a request or
    OUTPUTS gives them) for this exact input, model, format and bitrate (`key`).

    `model`: the weights that would run (ModelCache.identity); a set made by other weight files
    (or by unknown ones: a manifest from before they were recorded) is not a match. The names
    are resolved against the sources the manifest records: the same weights have the same
    sources. Without `model` (a process that has no model, such as the dispatcher) the digest
    is not compared."""
    if not manifest:
        return False
    digest = manifest.get("modelDigest") if model is None else model["digest"]
    try:
        wanted = outputs.plan(asked, manifest.get("modelSources") or messages.STEMS)
    except JobError:
        return False
    return key(manifest) == (
        VERSION,
        identity,
        recipe.model_name,
        digest,
        recipe.output_format,
        bitrate(recipe),
        wanted,
        frozenset(wanted),
    )


def same_request(found: dict | None, built: dict) -> bool:
    """Whether the set `found` (another job's) stands for the one `built` was made for."""
    return bool(found) and key(found) == key(built)


def urls(manifest: dict) -> dict:
    """{output: url}: the result's `stems` field."""
    return {name: entry["url"] for name, entry in manifest["stems"].items()}


def summary(manifest: dict) -> dict:
    """{output: {url, peaks, loudnessLufs, truePeakDbtp, silent}}: the result's `outputs` field
    (None where the set was made without them)."""
    return {
        name: {"url": entry["url"], **{key: entry.get(key) for key in ANALYSIS}}
        for name, entry in manifest["stems"].items()
    }


ANALYSIS = ("peaks", "loudnessLufs", "truePeakDbtp", "silent")
MODEL_FIELDS = ("model", "modelDigest", "modelSources", "modelLicense")


def model_fields(manifest: dict) -> dict:
    """Which weights made the set, for the result: model name, digest, sources, licence."""
    return {name: manifest.get(name) for name in MODEL_FIELDS}


def is_silent(loudness: float | None, mix: float | None, below_lu: float) -> bool:
    """Whether an output is far enough below the mix to hide: no block of it reaches BS.1770's
    absolute gate (-70 LUFS), or its loudness is `below_lu` LU or more under the mix's."""
    if loudness is None:
        return True
    return mix is not None and loudness <= mix - below_lu


def source(request: messages.JobRequest, decoded: audio.DecodedAudio) -> dict:
    """What the original turned out to be (the content decides, not its name or mimeType)."""
    return {
        "container": decoded.container,
        "codec": decoded.codec,
        "sampleRate": decoded.source_rate,
        "channels": decoded.source_channels,
        "streamIndex": decoded.stream_index,
        "audioStreams": decoded.audio_streams,
        "nonFiniteSamples": decoded.non_finite,
        "declaredMimeType": request.mime_type,
    }


def entry(path, url: str, figures: dict, peaks_url, mix: dict | None, recipe) -> dict:
    """One output's manifest entry: where it is, what it holds, and how loud it is."""
    found = {
        "url": url,
        "file": path.name,
        "bytes": path.stat().st_size,
        "sha256": sha256_of(path),
        **figures,
    }
    if peaks_url is not None:
        found["peaks"] = peaks_url
        found["silent"] = is_silent(
            figures.get("loudnessLufs"), (mix or {}).get("loudnessLufs"), recipe.silent_below_lu
        )
    return found


def build(
    request: messages.JobRequest,
    recipe,
    identity: dict,
    decoded: audio.DecodedAudio,
    outputs,
    files: dict,
    urls: dict,
    stats: dict,
    mix: dict | None,
    engine: dict | None = None,
    model: dict | None = None,
) -> dict:
    """The manifest of a set just written: `files` {output or "OUTPUT.peaks": local file},
    `urls` the same keys to urls, `stats` {output: encoder figures}, `mix` the input's
    loudness figures (None without analysis), `engine` how the model ran (device, precision,
    the reduced-precision probe's agreement with fp32, windows redone in fp32), `model` which
    weights ran (ModelCache.identity and the model's sources)."""
    model = model or {}
    built = {
        "version": VERSION,
        "jobId": request.job_id,
        "releaseId": request.release_id,
        "trackId": request.track_id,
        "artistId": request.artist_id,
        "model": recipe.model_name,
        "modelDigest": model.get("digest"),
        "modelFiles": model.get("files"),
        "modelSources": model.get("sources"),
        "modelLicense": model.get("license"),
        "format": recipe.output_format,
        "bitrate": bitrate(recipe),
        "mp3Quality": recipe.mp3_quality if recipe.output_format == "mp3" else None,
        "shifts": recipe.shifts,
        "input": identity,
        "source": source(request, decoded),
        "durationS": round(decoded.duration_s, 3),
        "createdAt": datetime.datetime.now(datetime.UTC).isoformat(),
        "outputs": list(outputs),
        "stems": {
            name: entry(
                files[name], urls[name], stats[name], urls.get(f"{name}.peaks"), mix, recipe
            )
            for name in outputs
        },
    }
    if engine is not None:
        built["engine"] = engine
    if mix is not None:
        built["mix"] = mix
        built["silentBelowLu"] = recipe.silent_below_lu
    return built
