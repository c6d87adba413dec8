"""Waveform peaks for web players, in BBC audiowaveform's JSON format (version 2), computed
from the blocks as they are encoded so that no output is decoded a second time.

peaks.js and wavesurfer.js load this file directly and draw a waveform without fetching the
audio. The computation follows audiowaveform itself: 16-bit samples, one min/max pair per
`samples_per_pixel` samples (the last pair covers what is left), channels averaged into one
(its default) or kept apart and interleaved per pixel (its --split-channels), and 8-bit values
as the 16-bit ones divided by 256, truncated towards zero.

The blocks come as the 16-bit samples the MP3 is encoded from (job.pcm.to_pcm16, made once for
both). The channel average only ever grows with its inputs, so it commutes with min and max:
each pixel's pair is reduced from the summed samples and only then halved.
"""

import json

import numpy as np

from job.pcm import SAMPLE_RATE


class Peaks:
    """Min/max pairs of a stereo stream fed as (n, 2) int16 blocks."""

    def __init__(self, samples_per_pixel: int = 256, bits: int = 8, split_channels: bool = False):
        self.samples_per_pixel = samples_per_pixel
        self.bits = bits
        self.channels = 2 if split_channels else 1
        self.partial = None  # (low, high, count) of the pixel still being filled
        self.pairs = []  # (pixels, channels, 2) integer arrays

    def add(self, pcm: np.ndarray) -> None:
        """`pcm`: (n, 2) int16, interleaved."""
        if self.channels == 1:  # audiowaveform sums the 16-bit pair (halved at the end)
            values = np.add(pcm[:, 0], pcm[:, 1], dtype=np.int32)[None]
        else:
            values = pcm.T
        if not values.shape[1]:
            return
        if self.partial is not None:
            low, high, count = self.partial
            head = values[:, : self.samples_per_pixel - count]
            low, high = np.minimum(low, head.min(1)), np.maximum(high, head.max(1))
            count += head.shape[1]
            values = values[:, head.shape[1] :]
            self.partial = None
            if count < self.samples_per_pixel:
                self.partial = (low, high, count)
                return
            self.pairs.append(np.stack([low, high], -1)[None])
        if not values.shape[1]:
            return
        starts = np.arange(0, values.shape[1], self.samples_per_pixel)
        low, high = np.minimum.reduceat(values, starts, 1), np.maximum.reduceat(values, starts, 1)
        count = values.shape[1] - starts[-1]
        if count < self.samples_per_pixel:
            self.partial = (low[:, -1], high[:, -1], count)
            low, high = low[:, :-1], high[:, :-1]
        self.pairs.append(np.stack([low, high], -1).transpose(1, 0, 2))

    def result(self) -> dict:
        """The audiowaveform JSON object (the pending tail becomes the last pair)."""
        if self.partial is not None:
            low, high, _ = self.partial
            self.pairs.append(np.stack([low, high], -1)[None])
            self.partial = None
        data = np.concatenate(self.pairs) if self.pairs else np.zeros((0, self.channels, 2))
        data = (np.trunc(data / 2) if self.channels == 1 else data).astype(np.int32)  # C division
        if self.bits == 8:
            data = np.sign(data) * (np.abs(data) // 256)
        return {
            "version": 2,
            "channels": self.channels,
            "sample_rate": SAMPLE_RATE,
            "samples_per_pixel": self.samples_per_pixel,
            "bits": self.bits,
            "length": int(data.shape[0]),
            "data": data.reshape(-1).tolist(),
        }

    def write(self, path) -> None:
        # dumps, not dump: json.dump encodes item by item in Python, ~4x slower on long lists
        with open(path, "w") as handle:
            handle.write(json.dumps(self.result(), separators=(",", ":")))
