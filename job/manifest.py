"""The manifest: written last beside the stems, it vouches that the set is complete and says
which input, model and settings made it, so a redelivered message can be answered from it."""

import datetime

from . import audio, messages
from .storage import sha256_of

VERSION = 1


def matches(manifest: dict | None, identity: dict, settings) -> bool:
    """Whether `manifest` is a complete set for this exact input and these settings."""
    return bool(manifest) and manifest.get("input") == identity \
        and manifest.get("model") == settings.model_name \
        and manifest.get("format") == settings.output_format \
        and manifest.get("version") == VERSION \
        and set(manifest.get("stems", {})) == set(messages.STEMS)


def source(request: messages.JobRequest, decoded: audio.DecodedAudio) -> dict:
    """What the original turned out to be (the content decides, not its name or mimeType)."""
    return {"container": decoded.container, "codec": decoded.codec,
            "sampleRate": decoded.source_rate, "channels": decoded.source_channels,
            "streamIndex": decoded.stream_index, "audioStreams": decoded.audio_streams,
            "nonFiniteSamples": decoded.non_finite, "declaredMimeType": request.mime_type}


def build(request: messages.JobRequest, settings, identity: dict, decoded: audio.DecodedAudio,
          stems: dict, urls: dict, stats: dict) -> dict:
    """The manifest of a set just written: `stems` {stem: local file}, `urls` {stem: url},
    `stats` {stem: encoder figures}."""
    return {
        "version": VERSION, "jobId": request.job_id,
        "releaseId": request.release_id, "trackId": request.track_id,
        "artistId": request.artist_id, "model": settings.model_name,
        "format": settings.output_format,
        "bitrate": f"{settings.mp3_bitrate}k" if settings.output_format == "mp3" else None,
        "input": identity, "source": source(request, decoded),
        "durationS": round(decoded.duration_s, 3),
        "createdAt": datetime.datetime.now(datetime.timezone.utc).isoformat(),
        "stems": {stem: {"url": urls[stem], "file": path.name, "bytes": path.stat().st_size,
                         "sha256": sha256_of(path), **stats[stem]}
                  for stem, path in stems.items()},
    }
