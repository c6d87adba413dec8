"""Progress of one track: how long each stage took, and how far the separation is (a bar on a
terminal, a log line every 10% otherwise, and an optional callback: progress events)."""

import contextlib
import logging
import sys
import time

from tqdm import tqdm

log = logging.getLogger(__name__)


class Progress:
    def __init__(self, label: str, callback=None, stream=sys.stderr, min_interval_s: float = 5.0):
        self.label = label
        self.callback = callback
        self.min_interval_s = min_interval_s
        self.bar = (
            tqdm(
                total=100,
                desc=label,
                unit="%",
                leave=False,
                file=stream,
                bar_format="{desc}: {percentage:3.0f}%|{bar}| ETA {remaining}",
            )
            if stream.isatty()
            else None
        )
        self.logged = 0
        self.last_callback = 0.0

    def update(self, fraction: float) -> None:
        percent = int(fraction * 100)
        if self.bar is not None:
            self.bar.update(percent - self.bar.n)
        elif percent >= self.logged + 10:
            self.logged = percent - percent % 10
            log.info("%s: separated %d%%", self.label, self.logged)
        now = time.monotonic()
        if self.callback and (now - self.last_callback >= self.min_interval_s or fraction >= 1):
            self.last_callback = now
            self.callback(fraction)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


@contextlib.contextmanager
def stage(timings: dict, name: str):
    """Add the wall time of the block to timings[name] (seconds, summed over repeats)."""
    start = time.monotonic()
    try:
        yield
    finally:
        timings[name] = round(timings.get(name, 0) + time.monotonic() - start, 3)
