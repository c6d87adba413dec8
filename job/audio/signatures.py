"""What an original's first bytes say, read by us where FFmpeg does not tell.

The WAV family, AIFF and ASF state the size of their audio data in a header, and FFmpeg
quietly clamps a cut one to the bytes present (or conceals its partial last packet): the
header is the evidence of a truncation. When
FFmpeg cannot open a file at all, its leading signature still tells a damaged audio file
(worth re-exporting) from a file that was never audio (the wrong upload).
"""

import struct
from pathlib import Path

W64_RIFF = bytes.fromhex("726966662e91cf11a5d628db04c10000")
W64_DATA = bytes.fromhex("64617461f3acd3118cd100c04f8edb8a")
ASF_HEADER = bytes.fromhex("3026b2758e66cf11a6d900aa0062ce6c")
ASF_FILE_PROPERTIES = bytes.fromhex("a1dcab8c47a9cf118ee400c00c205365")
ASF_DATA = bytes.fromhex("3626b2758e66cf11a6d900aa0062ce6c")
MAX_CHUNKS = 256  # chunks walked before the audio one: a header is not a maze
# streaming writers leave a placeholder where the size goes: 0, -1, or just under 2 or 4 GiB
PLACEHOLDER_SIZES = range(0x7FFF0000, 0x100000000)
SIGNATURES = [  # (offset, leading bytes, what a person calls it)
    (0, b"fLaC", "FLAC"),
    (0, b"RIFF", "WAV"),
    (0, b"RF64", "WAV (RF64)"),
    (0, b"BW64", "WAV (BW64)"),
    (0, W64_RIFF, "Wave64"),
    (0, b"FORM", "AIFF"),
    (0, b"OggS", "Ogg"),
    (0, b"caff", "CAF"),
    (0, b"\x1a\x45\xdf\xa3", "Matroska/WebM"),
    (4, b"ftyp", "MP4/M4A"),
    (0, b"ID3", "MP3"),
    (0, b"wvpk", "WavPack"),
    (0, b"TTA1", "TTA"),
    (0, b"DSD ", "DSF"),
    (0, b"FRM8", "DSDIFF"),
    (0, ASF_HEADER[:8], "WMA/ASF"),
    (0, b"MAC ", "Monkey's Audio"),
    (0, b"MPCK", "Musepack"),
    (0, b"MP+", "Musepack"),
    (0, b"\x0b\x77", "AC-3"),
    *[(0, bytes([0xFF, sync]), "MP3") for sync in (0xFB, 0xFA, 0xF3, 0xF2, 0xE3, 0xE2)],
]


def audio_end(path: Path) -> int | None:
    """Where the audio data ends by its own header: the end of a WAV/RF64's `data` chunk,
    Wave64's data chunk, AIFF's `SSND` or ASF's Data Object; None when nothing says.

    The audio chunk's own size is the evidence, not the container's: tag editors append or
    grow a LIST/id3 chunk and leave the RIFF size stale, while a cut transfer shortens the
    audio chunk itself. A size a streaming writer left as a placeholder says nothing.
    """
    with open(path, "rb") as handle:
        head = handle.read(64)
        if head[:4] == b"RIFF" and head[8:12] == b"WAVE":
            return _chunk_end(handle, 12, b"data", "<I")
        if head[:4] == b"FORM" and head[8:11] == b"AIF":
            return _chunk_end(handle, 12, b"SSND", ">I")
        if head[:4] in (b"RF64", b"BW64") and head[12:16] == b"ds64" and len(head) >= 36:
            data_size = struct.unpack("<Q", head[28:36])[0]
            start = _chunk_start(handle, 12, b"data", "<I")
            return None if start is None else _unless_placeholder(start + 8, data_size)
        if head[:16] == W64_RIFF:
            return _w64_data_end(handle)
        if head[:16] == ASF_HEADER and len(head) >= 30:
            return _asf_data_end(handle, head)
    return None


def _walk(handle, offset: int, size_format: str):
    """(offset, id, size) of each RIFF/IFF chunk from `offset`; pad bytes keep chunks even."""
    for _ in range(MAX_CHUNKS):
        handle.seek(offset)
        header = handle.read(8)
        if len(header) < 8:
            return
        size = struct.unpack(size_format, header[4:])[0]
        yield offset, header[:4], size
        offset += 8 + size + (size & 1)


def _chunk_start(handle, offset, chunk_id, size_format):
    return next(
        (at for at, name, _ in _walk(handle, offset, size_format) if name == chunk_id), None
    )


def _chunk_end(handle, offset, chunk_id, size_format):
    for at, name, size in _walk(handle, offset, size_format):
        if name == chunk_id:
            return _unless_placeholder(at + 8, size)
    return None


def _unless_placeholder(start: int, size: int) -> int | None:
    return None if size == 0 or size in PLACEHOLDER_SIZES else start + size


def _w64_data_end(handle) -> int | None:
    offset = 40  # riff GUID, size, wave GUID
    for _ in range(MAX_CHUNKS):
        handle.seek(offset)
        header = handle.read(24)
        if len(header) < 24:
            return None
        size = struct.unpack("<Q", header[16:])[0]  # a Wave64 size counts its own header
        if header[:16] == W64_DATA:
            return None if size <= 24 else offset + size
        if size < 24:
            return None
        offset += (size + 7) // 8 * 8
    return None


def _asf_data_end(handle, head: bytes) -> int | None:
    """ASF: the Data Object follows the Header Object and states its size, unless the File
    Properties say broadcast (a live capture: sizes unknown while writing)."""
    header_size = struct.unpack("<Q", head[16:24])[0]
    if header_size > 1 << 24:
        return None
    handle.seek(0)
    header = handle.read(header_size + 24)
    offset = 30
    while offset + 24 <= min(header_size, len(header)):
        size = struct.unpack("<Q", header[offset + 16 : offset + 24])[0]
        if header[offset : offset + 16] == ASF_FILE_PROPERTIES and len(header) >= offset + 92:
            if struct.unpack("<I", header[offset + 88 : offset + 92])[0] & 1:
                return None
        if size < 24:
            return None
        offset += size
    if header[header_size : header_size + 16] != ASF_DATA or len(header) < header_size + 24:
        return None
    size = struct.unpack("<Q", header[header_size + 16 : header_size + 24])[0]
    return None if size <= 50 else header_size + size


def looks_like(path: Path) -> str | None:
    """The audio format a file's signature names ("FLAC", "WAV", ...), or None."""
    with open(path, "rb") as handle:
        head = handle.read(16)
    for offset, signature, name in SIGNATURES:
        if head[offset : offset + len(signature)] == signature:
            return name
    return None
