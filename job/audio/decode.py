"""Decoding originals: any audio FFmpeg decodes, to 44.1 kHz stereo float32.

What is accepted is decided by what FFmpeg finds in the content (an audio stream that
decodes to real frames), never by a file name, a mimeType or a list of containers: uploads
come from every tool of the last decades. The decoded track never sits in RAM: it is
streamed to a raw float32 file while the normalisation statistics (mean and std of the
mono mix) are accumulated, and the engine reads it back window by window. A file is called
truncated only on evidence (an exact declared length, or a read that breaks off); messages
speak of "the original" and never carry a local path or FFmpeg's errno text. FFmpeg's
libraries come from PyAV's wheels.

FFmpeg opens nothing but the original: it gets the file already open, under a name that is a
number (no suffix to take a hint from), with every further open refused (a playlist, a concat
list or a reference to another file or URL ends as not audio) and a protocol whitelist that
names no protocol (concat's nested inputs use FFmpeg's own opener, which consults it).

The job runs this in a bounded child process of its own (job.audio.child): a decoder that
crashes, stalls or allocates without end on a hostile file fails that track, not the worker.
"""

import logging
import math
import os
import threading
from dataclasses import dataclass
from pathlib import Path

import av
import numpy as np

from job.audio import signatures
from job.errors import JobError
from job.pcm import CHANNELS, SAMPLE_RATE

MAX_BAD_PACKETS = 8  # isolated glitches FFmpeg conceals; more means a corrupt file
FRAME = 65536  # samples per block written: numpy per block, not per codec frame
MEMORY_EXCEEDED = "decode_memory_exceeded"
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DecodedAudio:
    """A decoded track on disk (interleaved float32 stereo) and its mono statistics."""

    path: Path
    length: int  # samples per channel
    mean: float
    std: float
    source_rate: int
    source_channels: int
    codec: str  # FFmpeg's decoder name, e.g. "mp3float", "flac", "aac"
    container: str = ""  # FFmpeg's demuxer name: what the content is, whatever its name says
    stream_index: int = 0  # the audio stream decoded, when the original holds several
    audio_streams: int = 1  # how many audio streams the original holds
    non_finite: int = 0  # NaN/Inf samples of a float original, replaced (NaN 0, Inf +-1)

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
            out[lo - start : hi - start] = np.frombuffer(data, np.float32).reshape(-1, CHANNELS)
        return out.T

    def close(self):
        self.handle.close()


_LOG_LOCK = threading.Lock()
ESTIMATED = "Estimating duration from bitrate"  # FFmpeg's words when it guesses a length
MISDETECTED = "misdetection possible"  # ... and when its probe barely matched
NO_PROTOCOL = {"protocol_whitelist": "none"}  # names no protocol FFmpeg has


def _no_other_file(url, flags, options):
    """PyAV's io_open: FFmpeg asks it for every file or URL beyond the original."""
    raise PermissionError(f"the original may not open {url[:100]!r}")


def _open(path: Path, handle):
    """Open with FFmpeg, noting what its probe said about the length and its own certainty.

    FFmpeg tells only in a log line that a duration is a bitrate estimate (a VBR MP3 without
    a Xing header, a FLAC or WebM streamed without one), so its warnings are captured here.
    """
    if path.stat().st_size == 0:
        raise JobError("empty_input", "the original is empty (0 bytes)")
    with _LOG_LOCK:
        level, repeated = av.logging.get_level(), av.logging.get_skip_repeated()
        av.logging.set_level(av.logging.WARNING)
        av.logging.set_skip_repeated(False)
        try:
            with av.logging.Capture() as logs:
                container = av.open(
                    handle,
                    metadata_errors="ignore",
                    io_open=_no_other_file,
                    container_options=NO_PROTOCOL,
                )
        except (av.error.FFmpegError, OSError):
            raise _unreadable(path) from None
        finally:
            av.logging.set_level(level)
            av.logging.set_skip_repeated(repeated)
    said = " ".join(message for _, _, message in logs)
    return container, ESTIMATED in said, MISDETECTED in said


def _unreadable(path: Path) -> JobError:
    kind = signatures.looks_like(path)
    if kind:
        return JobError(
            "corrupt_audio",
            f"the original starts like a {kind} file but FFmpeg "
            "cannot read it: it is cut off or damaged",
        )
    return _not_audio()


def _not_audio() -> JobError:
    return JobError(
        "not_audio",
        "the original is not audio: FFmpeg finds no audio it can "
        "decode in it (a document, an image, an archive or text?)",
    )


def _pick_stream(container):
    """The first audio stream marked default, else the first audio stream: what players play.
    Streams FFmpeg could not make sense of (no channels or rate) are never picked."""
    usable = [
        s
        for s in container.streams.audio
        if s.codec_context.channels and s.codec_context.sample_rate
    ]
    if not usable:
        kind = "no audio stream" if not container.streams.audio else "no decodable audio stream"
        raise JobError("not_audio", f"the original holds {kind}: it is not audio FFmpeg decodes")
    default = [s for s in usable if s.disposition & av.stream.Disposition.default]
    return (default or usable)[0]


def declared_duration(container, stream) -> float | None:
    """The stream's own declared length; the container's only when it holds nothing else
    (a music video's picture or a second audio stream may last longer than this stream)."""
    if stream.duration and stream.time_base:
        return float(stream.duration * stream.time_base)
    others = [
        s
        for s in container.streams
        if s is not stream and not s.disposition & av.stream.Disposition.attached_pic
    ]
    if container.duration and not others:
        return container.duration / av.time_base
    return None


def check_declared_size(path: Path) -> None:
    """A WAV/RF64/Wave64/AIFF/ASF header states where its audio data ends; FFmpeg clamps a
    cut file to what is there, or conceals its partial last packet as a glitch."""
    declared = signatures.audio_end(path)
    actual = path.stat().st_size
    if declared and actual < declared - 1:  # a missing pad byte is not a missing part
        raise JobError(
            "truncated_audio",
            f"the original is cut off: its header says its "
            f"audio runs to byte {declared} but the file ends "
            f"at byte {actual}",
        )


def _packets(container, stream):
    """Demuxed packets; a read error ends the stream (what follows it is unreachable)."""
    packets = container.demux(stream)
    while True:
        try:
            packet = next(packets)
        except StopIteration:
            return
        except av.error.FFmpegError:
            yield None
            return
        yield packet


class _Sink:
    """Interleaved float32 stereo to a file, with the mono mix's running sums."""

    def __init__(self, handle, max_samples: int, max_duration_s: float):
        self.handle, self.max_samples, self.max_duration_s = handle, max_samples, max_duration_s
        self.total = 0
        self.heard = 0.0  # seconds of audio handed to the resampler
        self.acc = self.acc2 = 0.0
        self.non_finite = 0
        self.resampler = None
        self.source = None

    def put(self, frame):
        source = (frame.format.name, frame.layout.name, frame.sample_rate)
        if source != self.source:  # a stream may change layout or rate mid-way (broadcast AC-3)
            self.flush()
            self.source = source
            layout = "mono" if frame.layout.nb_channels == 1 else "stereo"
            self.resampler = av.AudioResampler(
                format="flt", layout=layout, rate=SAMPLE_RATE, frame_size=FRAME
            )
        self.heard += frame.samples / frame.sample_rate
        self.write(self.resampler.resample(frame))

    def flush(self):
        if self.resampler is not None:
            self.write(self.resampler.resample(None))

    def check_kept(self):
        """FFmpeg's resampler, short of memory, drops what it cannot convert and says nothing
        (a frame at 1 Hz becomes 44,100 samples a sample): what came out must be what went in."""
        if self.total < (self.heard - 0.05) * SAMPLE_RATE:
            raise MemoryError

    def write(self, frames):
        for frame in frames:
            data = frame.to_ndarray().reshape(-1, frame.layout.nb_channels)
            if data.shape[1] == 1:
                data = np.repeat(data, 2, axis=1)
            data = np.ascontiguousarray(data, dtype=np.float32)
            mono = (data[:, 0].astype(np.float64) + data[:, 1]) * 0.5
            total = mono.sum()
            if not math.isfinite(total):  # NaN or Inf somewhere: count, replace, redo
                self.non_finite += int(data.size - np.isfinite(data).sum())
                data = np.nan_to_num(data, nan=0.0, posinf=1.0, neginf=-1.0)
                mono = (data[:, 0].astype(np.float64) + data[:, 1]) * 0.5
                total = mono.sum()
            self.acc += total
            self.acc2 += np.dot(mono, mono)
            self.total += len(data)
            self.handle.write(data)
        if self.total > self.max_samples:
            raise JobError(
                "too_long",
                "the original is longer than the limit of "
                f"{self.max_duration_s:.0f} s (MAX_DURATION_S)",
            )


def decode_to_file(
    path: Path, target: Path, max_duration_s: float, on_declared=None, out=None
) -> DecodedAudio:
    """Decode `path` to `target` as 44.1 kHz stereo float32, streaming, with statistics.

    Parameters:
        path: the original, any container and codec FFmpeg reads.
        target: the raw float32 file to write (interleaved stereo).
        max_duration_s: MAX_DURATION_S; a longer original fails `too_long`.
        on_declared: called before any decoding with the length the file declares, in
            seconds; None when it declares none or FFmpeg only estimates it from the bitrate.
        out: `target` already open for writing (a fenced child can open no file to write).

    Returns the DecodedAudio. Mono is duplicated to both channels; more than two channels are
    down-mixed by FFmpeg's standard matrix. Raises JobError for anything that is not a whole
    audio file. Cancelling is the parent's (job.audio.child kills this process).
    """
    path = Path(path)
    # opened by number: FFmpeg sees the name "N", and no suffix chooses its demuxer
    handle = os.fdopen(os.open(path, os.O_RDONLY), "rb")
    try:
        container, estimated, misdetected = _open(path, handle)
    except BaseException:
        handle.close()
        raise
    try:
        stream = _pick_stream(container)
        check_declared_size(path)
        found = {  # read before close()
            "source_rate": stream.codec_context.sample_rate,
            "source_channels": stream.codec_context.channels,
            "codec": stream.codec_context.name,
            "container": container.format.name,
            "stream_index": stream.index,
            "audio_streams": len(container.streams.audio),
        }
        declared = declared_duration(container, stream)
        exact = None if estimated else declared  # a bitrate estimate is no evidence
        if on_declared is not None:
            on_declared(exact)
        if exact and exact > max_duration_s + 1:
            raise JobError(
                "too_long",
                f"the original declares {exact:.0f} s, over the limit of "
                f"{max_duration_s:.0f} s (MAX_DURATION_S)",
            )
        with open(target, "wb") if out is None else out as sink_file:
            sink = _Sink(sink_file, int(max_duration_s * SAMPLE_RATE) + SAMPLE_RATE, max_duration_s)
            broke_off = _decode_packets(container, stream, sink, misdetected)
            sink.flush()
            sink.check_kept()
    except MemoryError:  # FFmpeg's ENOMEM is one too: the child's limit, or the host's
        raise JobError(
            MEMORY_EXCEEDED,
            "decoding the original needs more memory than the decoder may use: the file is "
            "damaged or built to exhaust a decoder",
        ) from None
    except av.error.FFmpegError:
        raise JobError(
            "corrupt_audio", "the original is corrupt: FFmpeg cannot decode it"
        ) from None
    finally:
        container.close()
        handle.close()
    _check_whole(sink.total, exact, broke_off, misdetected)
    if sink.non_finite:
        log.warning(
            "the original holds %d NaN/Inf samples: replaced (NaN by 0, Inf by +-1)",
            sink.non_finite,
        )
    return _decoded(Path(target), sink, found)


def _decode_packets(container, stream, sink: "_Sink", misdetected: bool) -> bool:
    """Every packet's frames into `sink`, skipping up to MAX_BAD_PACKETS undecodable ones;
    True when the container broke off before its end."""
    bad = 0
    for packet in _packets(container, stream):
        if packet is None:
            return True
        try:
            frames = packet.decode()
        except MemoryError:
            raise
        except av.error.FFmpegError as exc:
            bad += 1
            log.warning("skipping an undecodable packet (%s)", type(exc).__name__)
            if bad > MAX_BAD_PACKETS:
                raise _too_many_bad_packets(misdetected, sink.total) from None
            continue
        for frame in frames:
            sink.put(frame)
    return False


def _too_many_bad_packets(misdetected: bool, decoded: int) -> JobError:
    if misdetected:
        return _not_audio()
    if not decoded:
        return JobError("corrupt_audio", "the original is corrupt: FFmpeg cannot decode its audio")
    return JobError(
        "corrupt_audio",
        f"the original is corrupt: more than {MAX_BAD_PACKETS} of its packets cannot be decoded",
    )


def _decoded(target: Path, sink: "_Sink", found: dict) -> DecodedAudio:
    total = sink.total
    mean = sink.acc / total
    var = max(sink.acc2 - total * mean * mean, 0.0) / max(total - 1, 1)
    return DecodedAudio(target, total, mean, math.sqrt(var), non_finite=sink.non_finite, **found)


def _check_whole(total: int, exact: float | None, broke_off: bool, misdetected: bool):
    """Refuse a decode that is cut short, on evidence only: an exact declared length that was
    not reached, or a read that broke off in an error. An undecodable last packet alone (a
    partial final frame) is concealed like any isolated glitch: players play such files."""
    seconds = total / SAMPLE_RATE
    if exact and seconds < exact - max(0.2, 0.005 * exact):
        raise JobError(
            "truncated_audio",
            f"the original is cut off: it declares {exact:.1f} s "
            f"but only {seconds:.1f} s are present",
        )
    if total == 0:
        if misdetected:
            raise _not_audio()
        raise JobError("empty_audio", "the original holds no audio samples")
    if broke_off:
        raise JobError(
            "truncated_audio",
            f"the original is cut off: it breaks off in damaged data after {seconds:.1f} s",
        )
