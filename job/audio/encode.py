"""Output encoders: one writer per output, fed block by block, running concurrently; each also
measures its output (waveform peaks, loudness) on the blocks it writes, in its own thread.

Stems can exceed full scale (the model does not bound them). Integer formats (MP3 via
16-bit PCM, FLAC 24-bit) pass through `soft_limit`: samples below -0.9 dBFS are untouched,
louder ones are bent smoothly towards full scale (tanh knee) instead of being hard-clipped,
so there is no square-wave distortion; the manifest counts how many samples were limited.
WAV output is 32-bit float and keeps every sample as the model produced it. Peaks and loudness
describe the file as written: after the limiter. The 16-bit samples are made once per block, for
LAME and the peaks alike, and a block that stays under the knee (most of them) is never searched
for samples to bend.
"""

import contextlib
import dataclasses
import queue
import threading
from pathlib import Path

import numpy as np
import soundfile

from job.analysis.loudness import LoudnessMeter
from job.analysis.peaks import Peaks
from job.audio.mp3 import Mp3Writer
from job.audio.nistems import SUFFIX, NiStemsWriter
from job.outputs import NI_STEMS
from job.pcm import CHANNELS, SAMPLE_RATE, to_pcm16

KNEE = 0.9


def magnitude(block: np.ndarray) -> float:
    """The largest |sample| of a block (0 when empty), without an |block| copy."""
    if not block.size:
        return 0.0
    return max(float(block.max()), -float(block.min()))


def soft_limit(block: np.ndarray) -> tuple[np.ndarray, int]:
    """Bend samples above KNEE smoothly under 1.0; return the block and how many were bent."""
    over = np.abs(block) > KNEE
    count = int(over.sum())
    if count:
        block = block.copy()
        loud = block[over]
        block[over] = np.sign(loud) * (
            KNEE + (1 - KNEE) * np.tanh((np.abs(loud) - KNEE) / (1 - KNEE))
        )
    return block, count


class SoundfileWriter:
    def __init__(self, path, fmt: str):
        subtype = "FLOAT" if fmt == "wav" else "PCM_24"
        self.file = soundfile.SoundFile(
            path, "w", SAMPLE_RATE, CHANNELS, subtype=subtype, format=fmt.upper()
        )

    def write(self, block: np.ndarray) -> None:
        self.file.write(block.T)

    def close(self) -> None:
        self.file.close()


class BlockWorker:
    """Consumes (2, n) blocks in a thread of its own (LAME, libsndfile and FFmpeg release the
    GIL); `finish()` waits for it and returns its figures or raises its error."""

    def __init__(self, name: str):
        self.error = None
        self.queue = queue.Queue(maxsize=8)
        self.thread = threading.Thread(target=self._run, name=name, daemon=True)
        self.thread.start()

    def handle(self, block: np.ndarray) -> None:
        raise NotImplementedError

    def close(self) -> dict:
        raise NotImplementedError

    def _run(self):
        drained = False
        try:
            while (block := self.queue.get()) is not None:
                self.handle(block)
            drained = True
            self.figures = self.close()
        except BaseException as exc:  # reported by finish()
            self.error = exc
            while not drained and self.queue.get() is not None:
                pass

    def put(self, block: np.ndarray) -> None:
        if self.error is None:
            self.queue.put(np.ascontiguousarray(block, dtype=np.float32))

    def finish(self) -> dict:
        self.queue.put(None)
        self.thread.join()
        if self.error is not None:
            raise self.error
        return self.figures


class MixMeter(BlockWorker):
    """The loudness of the input mix, the reference that flags silent outputs."""

    def __init__(self):
        self.meter = LoudnessMeter()
        super().__init__("meter-mix")

    def handle(self, block):
        self.meter.add(block)

    def close(self) -> dict:
        return self.meter.result()


class StemEncoder(BlockWorker):
    """Encodes one output; with `peaks` (a Peaks) also measures it and writes the peaks file
    `peaks_path` beside it. `bitrate_kbps` and `quality` are MP3's (no defaults here: the
    settings hold them, MP3_BITRATE and MP3_QUALITY)."""

    def __init__(
        self,
        path: Path,
        fmt: str,
        bitrate_kbps: int | None = None,
        quality: int | None = None,
        peaks: Peaks | None = None,
    ):
        self.path = Path(path)
        self.limit = fmt != "wav"
        self.mp3 = fmt == "mp3"  # fed 16-bit samples; the others the float block
        self.writer = (
            Mp3Writer(path, bitrate_kbps, quality) if self.mp3 else SoundfileWriter(path, fmt)
        )
        self.peaks = peaks
        self.meter = LoudnessMeter() if peaks is not None else None
        self.peaks_path = self.path.with_name(f"{self.path.stem}.peaks.json") if peaks else None
        self.limited = 0
        self.peak = 0.0
        self.samples = 0
        super().__init__(f"encode-{self.path.stem}")

    def handle(self, block):
        peak = magnitude(block)
        self.peak = max(self.peak, peak)
        self.samples += block.shape[-1]
        if self.limit and peak > KNEE:
            block, count = soft_limit(block)
            self.limited += count
            peak = 1.0  # at most, once bent
        pcm = to_pcm16(block, peak) if self.mp3 or self.peaks is not None else None
        self.writer.write(pcm if self.mp3 else block)
        if self.peaks is not None:
            self.peaks.add(pcm)
            self.meter.add(block)

    def close(self) -> dict:
        self.writer.close()
        figures = {
            "peak": round(self.peak, 4),
            "limitedSamples": self.limited,
            "samples": self.samples,
        }
        if self.peaks is not None:
            self.peaks.write(self.peaks_path)
            figures.update(self.meter.result())
        return figures


class NiStemsEncoder(BlockWorker):
    """Writes the NI Stems file from (5, 2, n) blocks, the mix and its four stems, each through
    the soft limiter (AAC is lossy, and players decode it to integers). `slots` says which of
    the model's sources each stem holds; it goes into the figures for the manifest."""

    peaks_path = None  # the stems' own peaks are in their own outputs

    def __init__(self, path: Path, slots: dict):
        self.path, self.slots = Path(path), slots
        self.writer = NiStemsWriter(path)
        self.limited = self.samples = 0
        super().__init__("encode-ni-stems")

    def handle(self, block):
        block, count = soft_limit(block)
        self.limited += count
        self.samples += block.shape[-1]
        self.writer.write(block)

    def close(self) -> dict:
        self.writer.close()
        return {"limitedSamples": self.limited, "samples": self.samples, "slots": self.slots}


@dataclasses.dataclass(frozen=True)
class Encoding:
    """How the outputs are written and measured: settings OUTPUT_FORMAT, MP3_BITRATE,
    MP3_QUALITY, OUTPUT_ANALYSIS and the PEAKS_* (docs/configuration.md), under the settings'
    own names."""

    output_format: str
    mp3_bitrate: int
    mp3_quality: int
    output_analysis: bool
    peaks_samples_per_pixel: int
    peaks_bits: int
    peaks_split_channels: bool

    @classmethod
    def of(cls, settings) -> "Encoding":
        return cls(
            **{field.name: getattr(settings, field.name) for field in dataclasses.fields(cls)}
        )


def open_encoders(folder: Path, outputs, encoding: Encoding, ni_slots: dict | None = None) -> dict:
    """{output: encoder} writing FOLDER/OUTPUT.FORMAT as `encoding` says, and the NI Stems file
    FOLDER/ni_stems.stem.mp4 with the stems `ni_slots` names ({slot: [source, ...]}); when one
    cannot be opened, those opened before it are stopped before the error is raised."""

    def peaks():
        if encoding.output_analysis:
            return Peaks(
                encoding.peaks_samples_per_pixel, encoding.peaks_bits, encoding.peaks_split_channels
            )
        return None

    fmt = encoding.output_format
    encoders = {}
    try:
        for name in outputs:
            encoders[name] = (
                NiStemsEncoder(Path(folder) / f"{name}{SUFFIX}", ni_slots)
                if name == NI_STEMS
                else StemEncoder(
                    Path(folder) / f"{name}.{fmt}",
                    fmt,
                    encoding.mp3_bitrate,
                    encoding.mp3_quality,
                    peaks(),
                )
            )
    except BaseException:  # the ones already running would wait on their queues forever
        for encoder in encoders.values():
            with contextlib.suppress(Exception):  # the opening error is the one reported
                encoder.finish()
        raise
    return encoders
