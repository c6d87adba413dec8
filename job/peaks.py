"""Waveform peaks for web players, in BBC audiowaveform's JSON format (version 2), computed
from the blocks as they are encoded so that no output is decoded a second time.

peaks.js and wavesurfer.js load this file directly and draw a waveform without fetching the
audio. The computation follows audiowaveform itself: 16-bit samples, one min/max pair per
`samples_per_pixel` samples (the last pair covers what is left), channels averaged into one
(its default) or kept apart and interleaved per pixel (its --split-channels), and 8-bit values
as the 16-bit ones divided by 256, truncated towards zero.
"""

import json

import numpy as np

SAMPLE_RATE = 44100


def to_int16(block: np.ndarray) -> np.ndarray:
    """Float samples to the 16-bit values an MP3 of them holds (the encoder's own rounding)."""
    return np.round(np.clip(block, -1.0, 1.0) * 32767.0).astype(np.int32)


class Peaks:
    """Min/max pairs of a stereo stream fed as (2, n) float blocks."""

    def __init__(self, samples_per_pixel: int = 256, bits: int = 8, split_channels: bool = False):
        self.samples_per_pixel = samples_per_pixel
        self.bits = bits
        self.channels = 2 if split_channels else 1
        self.pending = np.zeros((self.channels, 0), np.int32)
        self.pairs = []               # (pixels, channels, 2) int32 arrays

    def add(self, block: np.ndarray) -> None:
        samples = to_int16(block)
        if self.channels == 1:        # audiowaveform: sum, then C integer division
            total = samples.sum(0)
            samples = (np.sign(total) * (np.abs(total) // 2))[None]
        samples = np.concatenate([self.pending, samples], axis=1)
        whole = samples.shape[1] // self.samples_per_pixel * self.samples_per_pixel
        if whole:
            self._append(samples[:, :whole])
        self.pending = samples[:, whole:]

    def _append(self, samples: np.ndarray) -> None:
        pixels = samples.reshape(self.channels, -1, self.samples_per_pixel)
        pair = np.stack([pixels.min(-1), pixels.max(-1)], -1)      # (channels, pixels, 2)
        self.pairs.append(pair.transpose(1, 0, 2))

    def result(self) -> dict:
        """The audiowaveform JSON object (the pending tail becomes the last pair)."""
        if self.pending.shape[1]:
            tail = self.pending
            self.pending = np.zeros((self.channels, 0), np.int32)
            pair = np.stack([tail.min(-1), tail.max(-1)], -1)[None]
            self.pairs.append(pair)
        data = np.concatenate(self.pairs) if self.pairs else np.zeros((0, self.channels, 2), np.int32)
        if self.bits == 8:
            data = np.sign(data) * (np.abs(data) // 256)
        return {"version": 2, "channels": self.channels, "sample_rate": SAMPLE_RATE,
                "samples_per_pixel": self.samples_per_pixel, "bits": self.bits,
                "length": int(data.shape[0]), "data": data.reshape(-1).tolist()}

    def write(self, path) -> None:
        with open(path, "w") as handle:
            json.dump(self.result(), handle, separators=(",", ":"))
