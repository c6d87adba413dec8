"""What a soak run is told, and the facts its parts share."""

from dataclasses import dataclass, field

from job.messages import STEMS

SET_FILES = 2 * len(STEMS)  # the six stems and their waveform peaks files
FAULT_KINDS = (
    "sigkill_separation",
    "sigkill_upload",
    "sigterm",
    "sigstop_race",
    "gcs_restart",
    "pubsub_outage",
)
RELEASE = "rel_soak"
MAX_DURATION_S = 20.0  # the workers' limit; the too_long original is longer


@dataclass
class Config:
    """One run's shape. hack/soak has no option for the track lengths, the subscription's ack
    deadline and delivery attempts or IDLE_TIMEOUT_S (tests/test_soak.py shortens the tracks)."""

    workers: int = 2
    max_messages: int = 2
    tracks: int = 44
    duplicates: int = 6  # exact duplicate publishes
    second_jobs: int = 4  # the same track under a second jobId
    reuploads: int = 2  # originals replaced after their first result, then redelivered
    bad: int = 11  # bad messages (up to len(workload.BAD_KINDS))
    faults: dict = field(
        default_factory=lambda: {
            "sigkill_separation": 2,
            "sigkill_upload": 2,
            "sigterm": 1,
            "sigstop_race": 1,
            "gcs_restart": 1,
            "pubsub_outage": 1,
        }
    )
    fault_window_s: float = 150.0  # faults are due at random moments within this
    min_track_s: float = 5.0
    max_track_s: float = 15.0
    seed: int = 0
    max_wall_s: float = 900.0
    ack_deadline_s: int = 10
    max_delivery_attempts: int = 5
    idle_timeout_s: float = 10.0  # IDLE_TIMEOUT_S, the production default
    race_at: str = "random"  # where SIGSTOP hits: separate, upload (stems, no manifest), random
