"""Decoding originals: any container/codec FFmpeg reads, to 44.1 kHz stereo float32.

The decoded track never sits in RAM: it is streamed to a raw float32 file while the
normalisation statistics (mean and std of the mono mix) are accumulated, and the engine
reads it back window by window. FFmpeg's libraries come from PyAV's wheels, so a pip
install needs no system ffmpeg.
"""

import logging
import math
import struct
from dataclasses import dataclass
from pathlib import Path

import av
import numpy as np

from .errors import Interrupted, JobError

SAMPLE_RATE = 44100
CHANNELS = 2
# containers an original may be in; FFmpeg probes anything (text can pass as AMR or MPEG)
CONTAINERS = {"mp3", "wav", "w64", "rf64", "flac", "ogg", "mov", "mp4", "m4a", "aac", "aiff",
              "matroska", "webm", "caf", "wv", "ape", "asf"}
MAX_BAD_PACKETS = 8           # isolated glitches FFmpeg conceals; more means a corrupt file
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DecodedAudio:
    """A decoded track on disk (interleaved float32 stereo) and its mono statistics."""

    path: Path
    length: int          # samples per channel
    mean: float
    std: float
    source_rate: int
    source_channels: int
    codec: str

    @property
    def duration_s(self) -> float:
        return self.length / SAMPLE_RATE


class RawReader:
    """Random access to a DecodedAudio, zero outside the track; reads only what it is asked."""

    def __init__(self, audio: DecodedAudio):
        self.audio = audio
        self.handle = open(audio.path, "rb", buffering=0)

    def read(self, start: int, stop: int) -> np.ndarray:
        out = np.zeros((stop - start, CHANNELS), dtype=np.float32)
        lo, hi = max(start, 0), min(stop, self.audio.length)
        if hi > lo:
            self.handle.seek(lo * CHANNELS * 4)
            data = self.handle.read((hi - lo) * CHANNELS * 4)
            out[lo - start:hi - start] = np.frombuffer(data, np.float32).reshape(-1, CHANNELS)
        return out.T

    def close(self):
        self.handle.close()


def _open(path: Path):
    try:
        container = av.open(str(path), metadata_errors="ignore")
    except av.error.InvalidDataError:
        raise JobError("not_audio", "the original is not an audio file FFmpeg can read")
    except (av.error.FFmpegError, OSError) as exc:
        raise JobError("not_audio", f"the original cannot be opened as audio: {exc}")
    if not container.streams.audio or not CONTAINERS & set(container.format.name.split(",")):
        container.close()
        raise JobError("not_audio", "the original is not an audio file (mp3, wav, flac, "
                                    "ogg/opus, m4a/aac, aiff, webm)")
    return container


def declared_duration(container, stream) -> float | None:
    if stream.duration and stream.time_base:
        return float(stream.duration * stream.time_base)
    if container.duration:
        return container.duration / av.time_base
    return None


def check_riff_size(path: Path, container) -> None:
    """FFmpeg clamps a WAV's duration to the bytes present; its RIFF header tells the truth."""
    if container.format.name not in ("wav", "w64", "rf64"):
        return
    with open(path, "rb") as handle:
        head = handle.read(12)
    if head[:4] == b"RIFF" and head[8:12] == b"WAVE":
        declared = struct.unpack("<I", head[4:8])[0] + 8
        actual = path.stat().st_size
        if 8 < declared < 0xFFFFFFFF and actual < declared:
            raise JobError("truncated_audio", f"the original WAV declares {declared} bytes but "
                                              f"only {actual} are present")


def decode_to_file(path: Path, target: Path, max_duration_s: float,
                   progress=None, cancel=None) -> DecodedAudio:
    """Decode `path` to `target` as 44.1 kHz stereo float32, streaming, with statistics.

    Mono is duplicated to both channels; more than two channels are down-mixed by
    FFmpeg's standard matrix. Raises JobError for anything that is not a whole audio file.
    """
    container = _open(Path(path))
    try:
        check_riff_size(Path(path), container)
        stream = container.streams.audio[0]
        codec = stream.codec_context.name
        channels = stream.codec_context.channels or 0
        rate = stream.codec_context.sample_rate or 0
        declared = declared_duration(container, stream)
        if declared and declared > max_duration_s + 1:
            raise JobError("too_long", f"the original lasts {declared:.0f} s, over the limit of "
                                       f"{max_duration_s:.0f} s (MAX_DURATION_S)")
        layout = "mono" if channels == 1 else "stereo"
        resampler = av.AudioResampler(format="flt", layout=layout, rate=SAMPLE_RATE)
        max_samples = int(max_duration_s * SAMPLE_RATE) + SAMPLE_RATE
        total = 0
        acc = acc2 = 0.0
        bad = 0
        with open(target, "wb") as out:
            def write(frames):
                nonlocal total, acc, acc2
                for frame in frames:
                    data = frame.to_ndarray().reshape(-1, 1 if layout == "mono" else 2)
                    if layout == "mono":
                        data = np.repeat(data, 2, axis=1)
                    data = np.ascontiguousarray(data, dtype=np.float32)
                    if not np.isfinite(data).all():
                        data = np.nan_to_num(data, nan=0.0, posinf=0.0, neginf=0.0)
                    mono = data.mean(axis=1, dtype=np.float64)
                    acc += mono.sum()
                    acc2 += np.dot(mono, mono)
                    total += len(data)
                    out.write(data.tobytes())
                if total > max_samples:
                    raise JobError("too_long", "the original is longer than the limit of "
                                               f"{max_duration_s:.0f} s (MAX_DURATION_S)")

            for packet in container.demux(stream):
                if cancel is not None and cancel.is_set():
                    raise Interrupted()
                try:
                    frames = packet.decode()
                except (av.error.InvalidDataError, av.error.EOFError, av.error.PatchWelcomeError) as exc:
                    bad += 1
                    log.warning("skipping an undecodable packet (%s)", exc)
                    if bad > MAX_BAD_PACKETS:
                        raise JobError("corrupt_audio", "the original is corrupt: more than "
                                       f"{MAX_BAD_PACKETS} packets could not be decoded")
                    continue
                for frame in frames:
                    write(resampler.resample(frame))
                if progress and declared:
                    progress(min(total / (declared * SAMPLE_RATE), 1.0))
            write(resampler.resample(None))
    except av.error.FFmpegError as exc:
        raise JobError("corrupt_audio", f"the original could not be decoded: {exc}")
    finally:
        container.close()
    if total == 0:
        raise JobError("empty_audio", "the original holds no audio samples")
    if declared and codec not in ("vorbis", "opus") and total / SAMPLE_RATE < 0.95 * declared - 0.5:
        raise JobError("truncated_audio", f"the original declares {declared:.1f} s but only "
                                          f"{total / SAMPLE_RATE:.1f} s could be decoded")
    mean = acc / total
    var = max(acc2 - total * mean * mean, 0.0) / max(total - 1, 1)
    return DecodedAudio(Path(target), total, mean, math.sqrt(var), rate, channels, codec)
