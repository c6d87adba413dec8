"""A local file's version, as a Cloud Storage object has a generation: cheap to compare.

Why: a local manifest must not vouch for a set whose files changed after it was written, and
hashing every file on each check re-reads the whole set (gigabytes for a long track) for every
duplicate message before it can answer "already done". The kernel gives every change to a
file's bytes, size or name a new ctime, which no call can set back (utime sets it to now), so a
file whose (inode, size, mtime, ctime) still equals the writer's stamp still holds the bytes
the writer hashed, just as an unchanged generation does in GCS.

One window is closed by construction: filesystem clocks tick coarsely, and a change in the same
tick as the writer's own last write would keep its ctime. So a stamp is recorded only for a
file whose ctime is older than a probe file made after it (the filesystem's own clock, right
even on a shared folder whose server stamps the changes), and the file is hashed after that
probe: a change once hashing began carries a later ctime. A stamp that does not match (a
copied folder, a restored backup, any change) means hashing the file, as before.
"""

import os
import tempfile
import time
from pathlib import Path

SETTLE_S = 1.0  # how long to wait at most for the filesystem's clock to pass the last write


def stamp(path: Path) -> list:
    """What changes with every change to the file (a list: what JSON gives back)."""
    st = os.stat(path)
    return [st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns]


def _clock(folder: Path) -> int:
    """The filesystem's time now: the ctime of a probe file made and removed in `folder`."""
    fd, name = tempfile.mkstemp(dir=folder, prefix=".clock.")
    try:
        return os.fstat(fd).st_ctime_ns
    finally:
        os.close(fd)
        os.unlink(name)


def settled(folder: Path, paths) -> int | None:
    """A filesystem time later than every change to `paths` so far; None if the clock does
    not get past them within SETTLE_S (then nothing is stamped: readers hash)."""
    latest = max(os.stat(path).st_ctime_ns for path in paths)
    deadline = time.monotonic() + SETTLE_S
    while (now := _clock(folder)) <= latest:
        if time.monotonic() > deadline:
            return None
        time.sleep(0.002)
    return now


def hashed_with_stamp(path: Path, clock: int | None, digest) -> tuple[str, list | None]:
    """`digest(path)`, and the stamp it vouches for: None when the file changed while it was
    read, or changed at or after `clock` (from `settled`, taken before this call)."""
    before = stamp(path)
    checksum = digest(path)
    held = clock is not None and before[3] < clock and stamp(path) == before
    return checksum, before if held else None
