"""NI Stems (`.stem.mp4`), the stems file DJ software loads (Traktor, Mixxx 2.6): one MP4 with
five stereo AAC tracks, the mix first and four stems after it in the order drums, bass, other,
vocals, and a JSON box at `moov/udta/stem` naming the stems with their colours and Traktor's
mastering DSP settings (Native Instruments' format, as its Stem Creator writes it with MP4Box).

How it is written here, without MP4Box:
- FFmpeg's AAC encoder and MP4 muxer (PyAV) write the five tracks. The mix track carries the
  `default` disposition, so FFmpeg marks it enabled in its `tkhd`; the stems are not, so they are
  disabled. All five share one alternate group: a plain player plays the mix alone.
- The encoder's priming (1024 samples) is cut by an edit list, whose duration is the track's
  exact length: the movie's timescale is the sample rate (FFmpeg's default of 1000 would round
  the length to milliseconds). Readers that honour edit lists get the original's samples; a
  reader that trims only the start gets the last AAC frame's padding too (under 1024 samples).
- FFmpeg writes no `stem` box, so it is added to `moov/udta` afterwards (job/audio/mp4box.py).

The mastering DSP is switched off: the stems are separated from the mastered mix, so there is
no mastering left for the player to redo. Stems go through the soft limiter like every lossy
output (job/audio/encode.py); the mix is the decoded original, limited the same way.
"""

import json

import av
import numpy as np

from job.audio import mp4box
from job.outputs import NI_SLOTS
from job.pcm import SAMPLE_RATE

SUFFIX = ".stem.mp4"
BITRATE = 256_000  # per track, AAC: what NI's Stem Creator writes
TITLES = ("Mix", "Drums", "Bass", "Other", "Vocals")
# NI's default colours for the four stems (Stem Creator's, and Mixxx's fallback)
COLORS = {"drums": "#009E73", "bass": "#D55E00", "other": "#CC79A7", "vocals": "#56B4E9"}


def metadata() -> dict:
    """The `stem` box's JSON: NI's schema, version 1."""
    return {
        "version": 1,
        "mastering_dsp": {
            "compressor": {
                "enabled": False,
                "input_gain": 0.5,
                "output_gain": 0.5,
                "threshold": 0.0,
                "dry_wet": 50,
                "attack": 0.003,
                "release": 0.3,
                "ratio": 3,
                "hp_cutoff": 300,
            },
            "limiter": {"enabled": False, "threshold": 0.0, "ceiling": -0.35, "release": 0.05},
        },
        "stems": [{"name": slot.capitalize(), "color": COLORS[slot]} for slot in NI_SLOTS],
    }


class NiStemsWriter:
    """Streams (5, 2, n) float blocks (the mix, then the stems in NI_SLOTS order) into one NI
    Stems file; `close()` finishes the tracks and adds the metadata box."""

    def __init__(self, path):
        self.path = path
        self.container = av.open(
            str(path), "w", format="mp4", options={"movie_timescale": str(SAMPLE_RATE)}
        )
        self.streams = []
        for index, title in enumerate(TITLES):
            stream = self.container.add_stream("aac", rate=SAMPLE_RATE, layout="stereo")
            stream.bit_rate = BITRATE
            default = av.stream.Disposition.default
            stream.disposition = default if index == 0 else av.stream.Disposition(0)
            stream.metadata["title"] = stream.metadata["handler_name"] = title
            self.streams.append(stream)
        self.samples = 0

    def write(self, tracks: np.ndarray) -> None:
        for stream, audio in zip(self.streams, tracks, strict=True):
            frame = av.AudioFrame.from_ndarray(
                np.ascontiguousarray(audio, np.float32), format="fltp", layout="stereo"
            )
            frame.sample_rate, frame.pts = SAMPLE_RATE, self.samples
            self.container.mux(stream.encode(frame))
        self.samples += tracks.shape[-1]

    def close(self) -> None:
        for stream in self.streams:
            self.container.mux(stream.encode(None))
        self.container.close()
        box = json.dumps(metadata(), separators=(",", ":")).encode()
        mp4box.add_to_moov(self.path, (b"udta",), b"stem", box)
