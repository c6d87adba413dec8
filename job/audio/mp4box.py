"""Adding a box to an MP4 file's `moov` (FFmpeg's muxer writes no box it does not know, such as
NI Stems' `moov/udta/stem`).

An MP4 file is a tree of boxes: a 32-bit big-endian size, a four-letter type, the body (size 1:
a 64-bit size follows the type; size 0: the box runs to the end of the file); a container's body
is more boxes. Adding a box grows every box on its path. `moov` holds the sample tables, whose
chunk offsets (stco/co64) are absolute positions in the file, so nothing before the media data
may move: `moov` is rewritten where it is when it is the file's last box (FFmpeg's default), and
otherwise its old copy becomes a `free` box (same size) and the new one is appended at the end.
Either way every offset stays valid and nothing of the media data is read or written.
"""

import struct


def header(head: bytes, at: int, end: int) -> tuple:
    """(type, header size, size) of the box whose first (up to 16) bytes are `head`, lying at
    `at` in a stretch that ends at `end`; ValueError when it runs past the end."""
    if len(head) < 8:
        raise ValueError(f"{len(head)} stray bytes at {at}")
    size, kind = struct.unpack(">I4s", head[:8])
    length = 8
    if size == 1:
        size, length = struct.unpack(">Q", head[8:16])[0], 16
    elif size == 0:
        size = end - at
    if size < length or at + size > end:
        raise ValueError(f"box {kind!r} at {at} claims {size} bytes, past the end")
    return kind, length, size


def walk(data: bytes, start: int = 0, end: int | None = None):
    """(type, offset, header size, size) of each box in data[start:end]."""
    end = len(data) if end is None else end
    at = start
    while at < end:
        kind, length, size = header(data[at : at + 16], at, end)
        yield kind, at, length, size
        at += size


def box(kind: bytes, body: bytes) -> bytes:
    """One box around `body` (a 64-bit size only where 32 bits cannot hold it)."""
    if len(body) + 8 < 2**32:
        return struct.pack(">I4s", len(body) + 8, kind) + body
    return struct.pack(">I4sQ", 1, kind, len(body) + 16) + body


def with_child(container: bytes, path: tuple, child: bytes) -> bytes:
    """`container` (a whole box) with `child` (a whole box) added at the end of the container
    `path` leads to inside it, creating the containers on the way that are missing."""
    kind, _, header, size = next(walk(container))
    body = container[header:size]
    if not path:
        return box(kind, body + child)
    for inner, at, _, length in walk(body):
        if inner == path[0]:
            grown = with_child(body[at : at + length], path[1:], child)
            return box(kind, body[:at] + grown + body[at + length :])
    return box(kind, body + with_child(box(path[0], b""), path[1:], child))


def top_level(handle) -> list:
    """(type, offset, header size, size) of the file's top-level boxes, read header by header."""
    end = handle.seek(0, 2)
    found, at = [], 0
    while at < end:
        handle.seek(at)
        kind, length, size = header(handle.read(16), at, end)
        found.append((kind, at, length, size))
        at += size
    return found


def add_to_moov(path, parents: tuple, kind: bytes, payload: bytes) -> None:
    """Add the box `kind` holding `payload` inside moov/PARENTS... of the MP4 file at `path`."""
    with open(path, "r+b") as handle:
        boxes = top_level(handle)
        moovs = [entry for entry in boxes if entry[0] == b"moov"]
        if len(moovs) != 1:
            raise ValueError(f"{path} holds {len(moovs)} moov boxes, not one")
        _, at, _, size = moovs[0]
        handle.seek(at)
        moov = with_child(handle.read(size), parents, box(kind, payload))
        if boxes[-1][1] == at:  # the last box: rewritten in place
            handle.seek(at)
            handle.truncate()
        else:  # the old one becomes free space; the new one goes at the end
            handle.seek(at + 4)
            handle.write(b"free")
            handle.seek(0, 2)
        handle.write(moov)
