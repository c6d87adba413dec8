"""Integrated loudness (ITU-R BS.1770 / EBU R128) and true peak of a stream, measured as the
blocks go by, so nothing is held in memory or decoded again.

FFmpeg's `ebur128` gives the gated integrated loudness. Its own true-peak figures are printed
with three decimals of a linear value, too coarse for quiet stems, so the true peak comes from
`truepeak`, which oversamples with FFmpeg's interpolator but only where the peak can be.
"""

import math

import av
import av.filter
import numpy as np

from job.analysis.truepeak import TruePeak
from job.pcm import SAMPLE_RATE


def _number(value) -> float | None:
    """A figure in dB; None for silence (-inf, or ebur128's -70 LUFS floor)."""
    if value is None:
        return None
    value = float(value)
    return None if not math.isfinite(value) or value <= -70.0 else round(value, 2)


class LoudnessMeter:
    """Feed (2, n) float blocks with `add`, then `result()` once."""

    def __init__(self):
        self.graph = av.filter.Graph()
        self.source = self.graph.add_abuffer(
            sample_rate=SAMPLE_RATE, format="fltp", layout="stereo", channels=2
        )
        # metadata: the running figures ride on every 100 ms frame out; framelog=quiet: no log
        # line per frame
        meter = self.graph.add("ebur128", "metadata=1:framelog=quiet")
        self.sink = self.graph.add("abuffersink")
        self.source.link_to(meter)
        meter.link_to(self.sink)
        self.graph.configure()
        self.true_peak = TruePeak()
        self.samples = 0
        self.last = {}

    def add(self, block: np.ndarray) -> None:
        block = np.ascontiguousarray(block, np.float32)
        frame = av.AudioFrame.from_ndarray(block, format="fltp", layout="stereo")
        frame.sample_rate = SAMPLE_RATE
        frame.pts = self.samples
        self.samples += block.shape[-1]
        self.source.push(frame)
        self._drain()
        self.true_peak.add(block)

    def _drain(self) -> None:
        """Pull what the meter let through; only the last frame's figures are read (they are
        running figures: the integrated loudness so far), not every 100 ms frame's."""
        last = None
        while True:
            try:
                last = self.sink.pull()
            except (av.BlockingIOError, av.EOFError):
                break
        if last is not None and last.metadata:
            self.last.update(last.metadata)

    def result(self) -> dict:
        """{"loudnessLufs", "truePeakDbtp"}: None where the stream is silent."""
        self.source.push(None)
        self._drain()
        peak = self.true_peak.result()
        return {
            "loudnessLufs": _number(self.last.get("lavfi.r128.I")),
            "truePeakDbtp": _number(20 * math.log10(peak) if peak > 0 else None),
        }
