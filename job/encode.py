"""Stem encoders: one writer per stem, fed block by block, running concurrently.

Stems can exceed full scale (the model does not bound them). Integer formats (MP3 via
16-bit PCM, FLAC 24-bit) pass through `soft_limit`: samples below -0.9 dBFS are untouched,
louder ones are bent smoothly towards full scale (tanh knee) instead of being hard-clipped,
so there is no square-wave distortion; the manifest counts how many samples were limited.
WAV output is 32-bit float and keeps every sample as the model produced it.
"""

import queue
import threading
from pathlib import Path

import numpy as np
import soundfile

from .mp3 import Mp3Writer

KNEE = 0.9


def soft_limit(block: np.ndarray) -> tuple[np.ndarray, int]:
    """Bend samples above KNEE smoothly under 1.0; return the block and how many were bent."""
    over = np.abs(block) > KNEE
    count = int(over.sum())
    if count:
        block = block.copy()
        loud = block[over]
        block[over] = np.sign(loud) * (KNEE + (1 - KNEE) * np.tanh((np.abs(loud) - KNEE) / (1 - KNEE)))
    return block, count


class SoundfileWriter:
    def __init__(self, path, fmt: str):
        subtype = "FLOAT" if fmt == "wav" else "PCM_24"
        self.file = soundfile.SoundFile(path, "w", 44100, 2, subtype=subtype,
                                        format=fmt.upper())

    def write(self, block: np.ndarray) -> None:
        self.file.write(block.T)

    def close(self) -> None:
        self.file.close()


class StemEncoder:
    """Encodes one stem in its own thread (LAME and libsndfile release the GIL)."""

    def __init__(self, path: Path, fmt: str = "mp3", bitrate_kbps: int = 320, quality: int = 3):
        self.path = Path(path)
        self.limit = fmt != "wav"
        self.writer = Mp3Writer(path, bitrate_kbps, quality) if fmt == "mp3" \
            else SoundfileWriter(path, fmt)
        self.limited = 0
        self.peak = 0.0
        self.samples = 0
        self.error = None
        self.queue = queue.Queue(maxsize=8)
        self.thread = threading.Thread(target=self._run, name=f"encode-{self.path.stem}",
                                       daemon=True)
        self.thread.start()

    def _run(self):
        drained = False
        try:
            while (block := self.queue.get()) is not None:
                self.peak = max(self.peak, float(np.abs(block).max(initial=0.0)))
                self.samples += block.shape[-1]
                if self.limit:
                    block, count = soft_limit(block)
                    self.limited += count
                self.writer.write(block)
            drained = True
            self.writer.close()
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
        return {"peak": round(self.peak, 4), "limitedSamples": self.limited,
                "samples": self.samples}


def open_encoders(folder: Path, stems, fmt: str, bitrate_kbps: int, quality: int) -> dict:
    return {stem: StemEncoder(Path(folder) / f"{stem}.{fmt}", fmt, bitrate_kbps, quality)
            for stem in stems}
