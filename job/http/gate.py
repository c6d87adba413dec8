"""Admission: one separation at a time, at most HTTP_QUEUE more requests in flight behind it, and
room on disk for each upload before its first byte.

A request beyond the queue is refused at once, before its body is read, with 503 and
`Retry-After` (the last separation's duration): a caller retries later instead of holding a
connection and a temp file for an unknown time. At start, MAX_INPUT_BYTES x (1 + HTTP_QUEUE) is
checked against the temp folder's free space; fewer uploads are then let on disk at once (the
rest wait), or, when not even one fits, the server does not start.
"""

import asyncio
import logging
import math
import shutil
from pathlib import Path

from job.errors import ConfigError

log = logging.getLogger(__name__)

DEFAULT_RETRY_AFTER_S = 30


class Gate:
    """One separation at a time, at most `queue` more requests in flight behind it, and at
    most `on_disk` of those with an upload on disk (the others wait for room)."""

    def __init__(self, queue: int, on_disk: int | None = None):
        self.limit = 1 + queue
        self.in_flight = 0
        self.lock = asyncio.Lock()
        self.last_seconds = None
        self.disk = asyncio.Semaphore(on_disk or self.limit)

    def disk_slot(self) -> "DiskSlot":
        return DiskSlot(self.disk)

    def retry_after(self) -> int:
        return max(1, math.ceil(self.last_seconds)) if self.last_seconds else DEFAULT_RETRY_AFTER_S

    def admit(self) -> bool:
        if self.in_flight >= self.limit:
            return False
        self.in_flight += 1
        return True

    def leave(self):
        self.in_flight -= 1


class DiskSlot:
    """Room on disk for one upload, held from before its first byte until its folder is gone."""

    def __init__(self, semaphore: asyncio.Semaphore):
        self.semaphore, self.held = semaphore, False

    async def acquire(self):
        await self.semaphore.acquire()
        self.held = True

    def release(self):
        if self.held:
            self.semaphore.release()
            self.held = False


def upload_slots(folder: Path, max_input_bytes: int, queue: int) -> int:
    """How many uploads of MAX_INPUT_BYTES the temp folder's free space holds, up to one per
    request in flight (1 + HTTP_QUEUE); ConfigError when it holds not even one."""
    wanted = 1 + queue
    free = shutil.disk_usage(folder).free
    slots = min(wanted, free // max_input_bytes)
    if slots < 1:
        raise ConfigError(
            f"MAX_INPUT_BYTES={max_input_bytes} is more than the "
            f"{free} bytes free in the upload folder {folder} (TMPDIR): lower "
            "it or give the folder more room"
        )
    if slots < wanted:
        log.warning(
            "the upload folder %s has room for %d upload(s) of MAX_INPUT_BYTES, not "
            "%d (1 + HTTP_QUEUE): the others wait",
            folder,
            slots,
            wanted,
        )
    return slots
