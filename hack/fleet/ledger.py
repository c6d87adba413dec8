"""What a soak run published and what came back on the results topic: the record the workload
writes, the collector fills and the verdict reads (never a worker's log)."""

import json
import threading
import time


class Ledger:
    def __init__(self):
        self.messages: list = []  # workload.Message, as published
        self.by_id: dict = {}  # message_id -> workload.Message
        self.results: list = []  # (result dict, publish time)
        self.durations: dict = {}  # track -> durations of its versions
        self.reupload_tracks: set = set()
        self.reuploaded: dict = {}  # track -> when its original was replaced (0.0: under way)
        self.lock = threading.Lock()

    def record(self, message) -> None:
        with self.lock:
            self.messages.append(message)
            self.by_id[message.message_id] = message

    def message(self, message_id: str):
        with self.lock:
            return self.by_id.get(message_id)

    def complete(self) -> bool:
        """Every message has a result of the status it expects (matched by Message.key and
        result_key), and every re-upload is done: the run may end."""
        with self.lock:
            want, got = {}, {}
            for m in self.messages:
                want[m.key(), m.expect] = want.get((m.key(), m.expect), 0) + 1
            for result, _ in self.results:
                k = result_key(result), result["status"]
                got[k] = got.get(k, 0) + 1
        pending_reuploads = len(self.reuploaded) < len(self.reupload_tracks) or any(
            t == 0.0 for t in self.reuploaded.values()
        )
        return not pending_reuploads and all(got.get(k, 0) >= n for k, n in want.items())


def result_key(result: dict):
    """What matches a result to its messages: the jobId, or for an unreadable message (no
    jobId) its error code, as workload.Message.key() has it."""
    if result.get("jobId") is not None:
        return result["jobId"]
    return ("?", (result.get("error") or {}).get("code"))


def collect(site, ledger: Ledger, stop: threading.Event, on_result, pull_timeout_s: float) -> None:
    """Until `stop`: take the final results (completed, failed) off the results topic into the
    ledger, and hand each to `on_result`."""
    while not stop.is_set():
        try:
            received = site.take(site.results_sub, pull_timeout_s)
        except Exception:  # the emulator frozen or busy: try again
            time.sleep(1)
            continue
        for r in received:
            result = json.loads(r.message.data)
            if result.get("status") not in ("completed", "failed"):
                continue
            with ledger.lock:
                ledger.results.append((result, r.message.publish_time.timestamp()))
            on_result(result)
