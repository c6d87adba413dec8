"""Integrated loudness (ITU-R BS.1770 / EBU R128) and true peak of a stream, measured by
FFmpeg's filters as the blocks go by, so nothing is held in memory or decoded again.

`ebur128` gives the gated integrated loudness. Its own true-peak figures are printed with
three decimals of a linear value, too coarse for quiet stems, so the true peak is measured
the way BS.1770 defines it, by the same library: `aresample` to four times the rate, then
`astats`' peak level of the oversampled signal (in dB, six decimals).
"""

import math

import av
import av.filter
import numpy as np

SAMPLE_RATE = 44100
OVERSAMPLED = 4 * SAMPLE_RATE


def _number(text) -> float | None:
    """An FFmpeg metadata figure; None for silence (-inf, or ebur128's -70 LUFS floor)."""
    if text is None:
        return None
    value = float(text)
    return None if not math.isfinite(value) or value <= -70.0 else round(value, 2)


class LoudnessMeter:
    """Feed (2, n) float blocks with `add`, then `result()` once."""

    def __init__(self):
        self.graph = av.filter.Graph()
        self.source = self.graph.add_abuffer(sample_rate=SAMPLE_RATE, format="fltp",
                                             layout="stereo", channels=2)
        split = self.graph.add("asplit", "2")
        meter = self.graph.add("ebur128", "metadata=1")
        upsample = self.graph.add("aresample", str(OVERSAMPLED))
        stats = self.graph.add("astats", "metadata=1:measure_perchannel=none:"
                                         "measure_overall=Peak_level")
        self.sinks = (self.graph.add("abuffersink"), self.graph.add("abuffersink"))
        self.source.link_to(split)
        split.link_to(meter, 0, 0)
        split.link_to(upsample, 1, 0)
        meter.link_to(self.sinks[0])
        upsample.link_to(stats)
        stats.link_to(self.sinks[1])
        self.graph.configure()
        self.samples = 0
        self.last = {}

    def add(self, block: np.ndarray) -> None:
        frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(block, np.float32),
                                           format="fltp", layout="stereo")
        frame.sample_rate = SAMPLE_RATE
        frame.pts = self.samples
        self.samples += block.shape[-1]
        self.source.push(frame)
        self._drain()

    def _drain(self) -> None:
        for sink in self.sinks:
            while True:
                try:
                    frame = sink.pull()
                except (av.BlockingIOError, av.EOFError):
                    break
                if frame.metadata:
                    self.last.update(frame.metadata)

    def result(self) -> dict:
        """{"loudnessLufs", "truePeakDbtp"}: None where the stream is silent."""
        self.source.push(None)
        self._drain()
        return {"loudnessLufs": _number(self.last.get("lavfi.r128.I")),
                "truePeakDbtp": _number(self.last.get("lavfi.astats.Overall.Peak_level"))}
