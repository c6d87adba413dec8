"""What a soak run publishes: one message per track, exact duplicates, the same track under a
second jobId, bad messages of each kind, and originals re-uploaded after their first result.

Every draw comes from the run's one seeded `random.Random`, in a fixed order (track lengths,
the picks, the replacements' lengths, the shuffle), so a seed names one workload.
"""

import json
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from synthetic import music, write_audio

from .config import MAX_DURATION_S, RELEASE, Config

# kind -> (what the message says, the error code its failed result must carry)
BAD_KINDS = [
    ("not_json", "invalid_message"),
    ("json_array", "invalid_message"),
    ("missing_uri", "invalid_message"),
    ("bad_track_id", "invalid_id"),
    ("other_bucket", "input_not_allowed"),
    ("missing_object", "input_not_found"),
    ("pdf", "not_audio"),
    ("empty", "empty_input"),
    ("pdf_mime", "unsupported_media_type"),
    ("http_uri", "invalid_uri"),
    ("too_long", "too_long"),
]


@dataclass
class Message:
    job_id: str | None  # None: unreadable, its result carries no jobId
    payload: bytes
    expect: str  # completed / failed
    code: str | None = None
    track: str | None = None
    published: float = 0.0
    message_id: str = ""

    def key(self):
        """What its results carry to match it: ledger.result_key."""
        return self.job_id if self.job_id is not None else ("?", self.code)

    def again(self) -> "Message":
        """The same good message, to publish once more (a duplicate, a redelivery)."""
        return Message(self.job_id, self.payload, "completed", track=self.track)


def good_message(job_id: str, track: str, uri: str) -> Message:
    payload = {
        "jobId": job_id,
        "releaseId": RELEASE,
        "artistId": "art_soak",
        "trackId": track,
        "originalStemUri": uri,
        "mimeType": "audio/mpeg",
    }
    return Message(job_id, json.dumps(payload).encode(), "completed", track=track)


def track_audio(config: Config, rng, workdir: Path, index: int, version: int) -> tuple:
    """A track's original (version 0) or its replacement (1): (path, seconds)."""
    seconds = round(rng.uniform(config.min_track_s, config.max_track_s), 1)
    suffix = "flac" if index % 3 == 0 else "mp3"
    path = write_audio(
        workdir / "audio" / f"t{index}v{version}.{suffix}",
        music(seconds, seed=config.seed * 1000 + index * 10 + version),
    )
    return path, seconds


def build(config: Config, rng, site, ledger, workdir: Path) -> tuple:
    """Upload the originals and make the messages, shuffled: (messages, replacements), where
    replacements maps each track to re-upload to its new (path, seconds)."""
    (workdir / "audio").mkdir(parents=True, exist_ok=True)
    good = []
    for index in range(config.tracks):
        track = f"trk_{index:03d}"
        path, seconds = track_audio(config, rng, workdir, index, 0)
        uri = site.upload(f"originals/{track}{path.suffix}", path.read_bytes())
        ledger.durations[track] = [seconds]
        good.append(good_message(f"job_{index:03d}", track, uri))
    ndup, nsecond = config.duplicates, config.second_jobs
    picks = rng.sample(range(config.tracks), min(config.tracks, ndup + nsecond + config.reuploads))
    ledger.reupload_tracks = {good[i].track for i in picks[ndup + nsecond :]}
    replacements = {
        track: track_audio(config, rng, workdir, int(track.rsplit("_", 1)[1]), 1)
        for track in sorted(ledger.reupload_tracks)
    }
    extra = [good[i].again() for i in picks[:ndup]]
    for i in picks[ndup : ndup + nsecond]:
        payload = json.loads(good[i].payload)
        extra.append(
            good_message(payload["jobId"] + "_b", payload["trackId"], payload["originalStemUri"])
        )
    workload = good + extra + bad_messages(config, site, workdir)
    rng.shuffle(workload)
    return workload, replacements


def bad_messages(config: Config, site, workdir: Path) -> list:
    """The first `config.bad` kinds of BAD_KINDS, each with the failed result it must get."""
    pdf = site.upload("originals/doc.mp3", b"%PDF-1.4 not audio " * 200)
    empty = site.upload("originals/empty.mp3", b"")
    long_path = write_audio(workdir / "audio" / "long.flac", music(MAX_DURATION_S + 5))
    long_uri = site.upload("originals/long.flac", long_path.read_bytes())
    some = f"gs://{site.bucket}/originals/trk_000.mp3"

    def body(job_id, **fields):
        request = {"jobId": job_id, "releaseId": RELEASE, "trackId": f"t_{job_id}"}
        return json.dumps({**request, "originalStemUri": some, **fields}).encode()

    nouri = {"jobId": "bad_nouri", "releaseId": RELEASE, "trackId": "t_x"}
    payloads = {
        "not_json": (None, b"{not json"),
        "json_array": (None, b"[1, 2]"),
        "missing_uri": ("bad_nouri", json.dumps(nouri).encode()),
        "bad_track_id": ("bad_id", body("bad_id", trackId="../etc")),
        "other_bucket": (
            "bad_bucket",
            body("bad_bucket", originalStemUri="gs://someone-else/x.mp3"),
        ),
        "missing_object": (
            "bad_missing",
            body("bad_missing", originalStemUri=f"gs://{site.bucket}/originals/nothing.mp3"),
        ),
        "pdf": ("bad_pdf", body("bad_pdf", originalStemUri=pdf)),
        "empty": ("bad_empty", body("bad_empty", originalStemUri=empty)),
        "pdf_mime": ("bad_mime", body("bad_mime", mimeType="application/pdf")),
        "http_uri": ("bad_uri", body("bad_uri", originalStemUri="https://example.com/a.mp3")),
        "too_long": ("bad_long", body("bad_long", originalStemUri=long_uri)),
    }
    return [
        Message(payloads[kind][0], payloads[kind][1], "failed", code)
        for kind, code in BAD_KINDS[: config.bad]
    ]


def publish(site, ledger, message: Message) -> None:
    message.published = time.time()
    message.message_id = site.pubsub.publisher.publish(site.topic, message.payload).result(60)
    ledger.record(message)


def patiently(action):
    """Run `action` until it does not raise: a stand-in may be down for a fault right now."""
    while True:
        try:
            return action()
        except Exception:
            time.sleep(1)


class Reuploads:
    """Replaces a re-upload track's original (a new generation) after its first completed
    result, then publishes its message again: the next result must be of the new input."""

    def __init__(self, site, ledger, replacements: dict, log):
        self.site, self.ledger, self.replacements, self.log = site, ledger, replacements, log

    def on_result(self, result: dict) -> None:
        track = result.get("trackId")
        ledger = self.ledger
        if (
            result["status"] == "completed"
            and track in ledger.reupload_tracks
            and track not in ledger.reuploaded
        ):
            ledger.reuploaded[track] = 0.0  # claimed; set when done
            threading.Thread(target=self.reupload, args=(track,), daemon=True).start()

    def reupload(self, track: str) -> None:
        ledger = self.ledger
        original = next(m for m in ledger.messages if m.track == track and m.expect == "completed")
        uri = json.loads(original.payload)["originalStemUri"]
        path, seconds = self.replacements[track]
        patiently(lambda: self.site.upload(uri.split("/", 3)[3], path.read_bytes()))
        ledger.durations[track].append(seconds)
        ledger.reuploaded[track] = time.time()
        self.log(f"  re-uploaded the original of {track} ({seconds} s), publishing it again")
        patiently(lambda: publish(self.site, ledger, original.again()))
