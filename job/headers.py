"""What an original's first bytes say, read by us where FFmpeg does not tell.

The WAV family and AIFF state their whole size in the header, and FFmpeg quietly clamps the
duration of a cut one to the bytes present: the header is the evidence of a truncation. When
FFmpeg cannot open a file at all, its leading signature still tells a damaged audio file
(worth re-exporting) from a file that was never audio (the wrong upload).
"""

import struct
from pathlib import Path

W64_RIFF = bytes.fromhex("726966662e91cf11a5d628db04c10000")
# streaming writers leave a placeholder where the size goes: 0, -1, or just under 2 or 4 GiB
PLACEHOLDER_SIZES = range(0x7FFF0000, 0x100000000)
SIGNATURES = [  # (offset, leading bytes, what a person calls it)
    (0, b"fLaC", "FLAC"), (0, b"RIFF", "WAV"), (0, b"RF64", "WAV (RF64)"), (0, b"BW64", "WAV (BW64)"),
    (0, W64_RIFF, "Wave64"), (0, b"FORM", "AIFF"), (0, b"OggS", "Ogg"), (0, b"caff", "CAF"),
    (0, b"\x1a\x45\xdf\xa3", "Matroska/WebM"), (4, b"ftyp", "MP4/M4A"), (0, b"ID3", "MP3"),
    (0, b"wvpk", "WavPack"), (0, b"TTA1", "TTA"), (0, b"DSD ", "DSF"), (0, b"FRM8", "DSDIFF"),
    (0, bytes.fromhex("3026b2758e66cf11"), "WMA/ASF"), (0, b"MAC ", "Monkey's Audio"),
    (0, b"MPCK", "Musepack"), (0, b"MP+", "Musepack"), (0, b"\x0b\x77", "AC-3"),
    *[(0, bytes([0xFF, sync]), "MP3") for sync in (0xFB, 0xFA, 0xF3, 0xF2, 0xE3, 0xE2)],
]


def declared_size(path: Path) -> int | None:
    """The file size a WAV/RF64/Wave64/AIFF header declares; None when it declares none."""
    with open(path, "rb") as handle:
        head = handle.read(64)
    size = None
    if head[:4] == b"RIFF" and head[8:12] == b"WAVE" or head[:4] == b"FORM" and head[8:11] == b"AIF":
        size = struct.unpack("<I" if head[:4] == b"RIFF" else ">I", head[4:8])[0] + 8
    elif head[:4] in (b"RF64", b"BW64") and head[12:16] == b"ds64" and len(head) >= 28:
        size = struct.unpack("<Q", head[20:28])[0] + 8
    elif head[:16] == W64_RIFF and len(head) >= 24:
        size = struct.unpack("<Q", head[16:24])[0]
    if size is None or size <= 12 or size - 8 in PLACEHOLDER_SIZES:
        return None
    return size


def looks_like(path: Path) -> str | None:
    """The audio format a file's signature names ("FLAC", "WAV", ...), or None."""
    with open(path, "rb") as handle:
        head = handle.read(16)
    for offset, signature, name in SIGNATURES:
        if head[offset:offset + len(signature)] == signature:
            return name
    return None
