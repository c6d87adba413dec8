"""Gapless CBR MP3 files from LAME (lameenc), with the Xing/LAME "Info" frame.

lameenc is LAME itself, faster than FFmpeg's wrapped libmp3lame (docs/benchmarks.md), but it
emits bare frames: without an Info frame decoders keep LAME's 1105-sample delay and the end padding,
so stems would be late against the original. We reserve the first frame and fill it at
close with the frame count and the encoder delay/padding (LAME tag), which FFmpeg,
browsers and players use to trim to the exact input length.
"""

import struct

import lameenc
import numpy as np

from job.pcm import CHANNELS, SAMPLE_RATE

ENCODER_DELAY = 576  # LAME's encoder delay in samples; decoders add their 529
SAMPLES_PER_FRAME = 1152
BITRATES = (0, 32, 40, 48, 56, 64, 80, 96, 112, 128, 160, 192, 224, 256, 320)
XING_OFFSET = 4 + 32  # MPEG-1 stereo: header + side information


def crc16(data: bytes) -> int:
    """CRC-16/ARC, as LAME computes its tag checksum."""
    crc = 0
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ 0xA001 if crc & 1 else crc >> 1
    return crc


def frame_length(header: bytes) -> int:
    bitrate = BITRATES[header[2] >> 4] * 1000
    padding = (header[2] >> 1) & 1
    return 144 * bitrate // SAMPLE_RATE + padding


def info_frame(bitrate_kbps: int, frames: int, total_bytes: int, samples: int) -> bytes:
    """The Info (CBR Xing) frame with a LAME tag naming delay and padding."""
    header = bytes((0xFF, 0xFB, BITRATES.index(bitrate_kbps) << 4, 0x44))  # 44.1 kHz, joint stereo
    size = frame_length(header)
    padding = frames * SAMPLES_PER_FRAME - samples - ENCODER_DELAY
    toc = bytes(min(255, i * 256 // 100) for i in range(100))
    xing = b"Info" + struct.pack(">III", 0x0F, frames, total_bytes) + toc + struct.pack(">I", 0)
    lame = (
        b"LAME3.100"
        + bytes((0x01, 0))
        + bytes(8)
        + bytes((0, min(bitrate_kbps, 255)))
        + struct.pack(">I", (ENCODER_DELAY << 12 | max(padding, 0)) << 8)[:3]
        + bytes((0, 0))
        + bytes(2)
        + struct.pack(">I", total_bytes)
        + bytes(2)
    )
    frame = bytearray(size)
    frame[:4] = header
    body = xing + lame
    frame[XING_OFFSET : XING_OFFSET + len(body)] = body
    crc_at = XING_OFFSET + len(body)
    frame[crc_at : crc_at + 2] = struct.pack(">H", crc16(bytes(frame[:crc_at])))
    return bytes(frame)


def count_frames(handle, start: int) -> int:
    """Count the MPEG frames from `start` by walking their headers."""
    handle.seek(start)
    frames = 0
    while True:
        header = handle.read(4)
        if len(header) < 4 or header[0] != 0xFF or (header[1] & 0xE0) != 0xE0:
            return frames
        frames += 1
        handle.seek(frame_length(header) - 4, 1)


class Mp3Writer:
    """Streams 16-bit stereo blocks into one gapless CBR MP3 file."""

    def __init__(self, path, bitrate_kbps: int, quality: int):
        self.path = path
        self.bitrate = bitrate_kbps
        self.encoder = lameenc.Encoder()
        self.encoder.set_bit_rate(bitrate_kbps)
        self.encoder.set_in_sample_rate(SAMPLE_RATE)
        self.encoder.set_channels(CHANNELS)
        self.encoder.set_quality(quality)
        self.samples = 0
        self.handle = open(path, "w+b")
        self.reserved = len(info_frame(bitrate_kbps, 0, 0, 0))
        self.handle.write(bytes(self.reserved))

    def write(self, pcm: np.ndarray) -> None:
        """`pcm`: (n, 2) interleaved int16 (job.pcm.to_pcm16; limit before converting)."""
        self.samples += len(pcm)
        self.handle.write(self.encoder.encode(np.ascontiguousarray(pcm, "<i2")))

    def close(self) -> None:
        if self.samples:  # LAME refuses to flush an encoder that was never fed
            self.handle.write(self.encoder.flush())
        total = self.handle.tell()
        frames = count_frames(self.handle, self.reserved)
        self.handle.seek(0)
        self.handle.write(info_frame(self.bitrate, frames, total, self.samples))
        self.handle.close()
