"""Every setting, read from the environment once (flags override by passing `overrides`).

The original worker's variables keep their names and defaults; new ones are listed in
docs/configuration.md. A bad value raises ConfigError with one line naming the variable.
"""

import os
import re
from dataclasses import dataclass, field, replace

from job.errors import ConfigError, JobError
from job.messages import split_names
from job.outputs import check_names

_BITRATE = re.compile(r"^(\d{2,3})k$")
MP3_BITRATES = (32, 40, 48, 56, 64, 80, 96, 112, 128, 160, 192, 224, 256, 320)


@dataclass(frozen=True)
class Settings:
    processing_mode: str = "pubsub"
    storage_mode: str = "local"
    gcs_bucket: str = ""
    gcs_public: bool = False  # the stems bucket is public: shared caches may keep objects
    output_dir: str = "/outputs"
    input_dir: str = ""
    gcp_project_id: str = ""
    pubsub_subscription: str = "stem-separate-worker"
    pubsub_results_topic: str = "stem-results"
    model_name: str = "htdemucs_6s"
    model_dir: str = ""
    model_license: str = ""  # as the operator declares it, recorded; never guessed
    device: str = "auto"
    precision: str = "auto"
    segment_batch: int = 0  # 0 = auto
    shifts: int = 0
    seed: int = 0
    output_format: str = "mp3"
    mp3_bitrate: int = 320
    mp3_quality: int = 5  # LAME algorithm quality, 0 best/slowest (docs/configuration.md)
    outputs: tuple = ()  # empty: every source of the model
    peaks_samples_per_pixel: int = 256
    peaks_bits: int = 8
    peaks_split_channels: bool = False
    silent_below_lu: float = 40.0
    output_analysis: bool = True  # peaks and loudness; off only to measure their cost
    max_input_bytes: int = 2 * 1024**3
    max_duration_s: float = 3 * 3600.0
    decode_memory_mb: int = 1024  # the decoding child's RLIMIT_DATA (job.audio.child)
    decode_time_base_s: float = 30.0
    decode_time_factor: float = 0.25  # decoding seconds allowed per second of audio
    decode_kill_retries: int = 2  # tries after which a killed decoder is final
    allowed_input_buckets: tuple = ()
    max_messages: int = 1
    idle_timeout_s: float = 10.0
    # drain: the work subscription's max_delivery_attempts, used when its dead-letter policy
    # cannot be read (the subscriber role may not get the subscription)
    max_delivery_attempts: int = 5
    retry_deadline_s: float = 60.0
    max_retries: int = 3  # Cloud Run: the job's maxRetries (its default is 3)
    progress_events: bool = False
    log_format: str = "auto"
    http_host: str = "0.0.0.0"
    http_port: int = 8000
    http_queue: int = 4
    http_token: str = field(default="", repr=False)  # a secret: never in a repr or a log
    http_allow_unauthenticated: bool = False  # serve without HTTP_TOKEN beyond loopback

    def allowed_buckets(self) -> tuple:
        if self.allowed_input_buckets:
            return self.allowed_input_buckets
        return (self.gcs_bucket,) if self.gcs_bucket else ()


def parse_choice(name, value, choices):
    value = value.strip().lower()
    if value not in choices:
        raise ConfigError(f"{name}={value!r} is invalid: use one of {', '.join(choices)}")
    return value


def parse_int(name, value, low, high=None):
    try:
        number = int(value.strip())
    except ValueError:
        raise ConfigError(f"{name}={value!r} is invalid: use a whole number") from None
    if number < low or (high is not None and number > high):
        limit = f"between {low} and {high}" if high is not None else f"at least {low}"
        raise ConfigError(f"{name}={value!r} is invalid: use a number {limit}")
    return number


def parse_float(name, value, low, unit="seconds"):
    try:
        number = float(value.strip())
    except ValueError:
        raise ConfigError(f"{name}={value!r} is invalid: use a number of {unit}") from None
    if not number > low or number != number or number == float("inf"):
        raise ConfigError(f"{name}={value!r} is invalid: use a number above {low}")
    return number


def parse_bool(name, value):
    value = value.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off", ""):
        return False
    raise ConfigError(f"{name}={value!r} is invalid: use true or false")


def parse_bitrate(name, value):
    match = _BITRATE.match(value.strip().lower()) or re.match(r"^(\d{2,3})$", value.strip())
    if not match or int(match.group(1)) not in MP3_BITRATES:
        raise ConfigError(
            f"{name}={value!r} is invalid: use an MP3 bitrate such as 320k "
            f"({', '.join(f'{b}k' for b in MP3_BITRATES)})"
        )
    return int(match.group(1))


def parse_outputs(name, value):
    try:
        return check_names(split_names(value), name)
    except JobError as exc:
        raise ConfigError(exc.message) from None


def parse_batch(name, value):
    return 0 if value.strip().lower() == "auto" else parse_int(name, value, 1, 64)


BUCKET_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]{1,220}[a-z0-9]$")


def is_bucket_name(name: str) -> bool:
    """Cloud Storage's naming rule: 3 to 222 of a-z, 0-9, `.`, `_`, `-`, alphanumeric at both
    ends, no `..` (the one definition: settings and gs:// URIs both use it)."""
    return bool(BUCKET_NAME.match(name)) and ".." not in name


def parse_buckets(name, value):
    buckets = tuple(
        b.strip().removeprefix("gs://").strip("/") for b in value.split(",") if b.strip()
    )
    for bucket in buckets:
        if not is_bucket_name(bucket):
            raise ConfigError(f"{name} holds {bucket!r}, which is not a bucket name")
    return buckets


def parse_text(name, value):
    return value.strip()


def parse_license(name, value):
    """A declaration recorded as given: one line of printable text."""
    value = value.strip()
    if len(value) > 200 or not value.isprintable():
        raise ConfigError(
            f"{name} is invalid: use one line of printable text (up to 200 characters), "
            "e.g. an SPDX identifier or the name of your licence"
        )
    return value


_PUBSUB_NAME = re.compile(
    r"^(projects/[a-z][a-z0-9.:-]{4,61}/(topics|subscriptions)/)?"
    r"[A-Za-z][A-Za-z0-9._~+%-]{2,254}$"
)


def parse_pubsub_name(name, value):
    """A topic or subscription: its name (3-255 characters, starting with a letter) or its full
    `projects/P/topics|subscriptions/N` path; anything else fails at start, not at the first
    pull or publish."""
    value = value.strip()
    if not _PUBSUB_NAME.match(value) or value.split("/")[-1].startswith("goog"):
        raise ConfigError(
            f"{name}={value!r} is invalid: use a Pub/Sub name (3-255 letters, "
            "digits or -_.~+%, starting with a letter) or projects/P/…/NAME"
        )
    return value


_TOKEN = re.compile(r"^[A-Za-z0-9._~+/-]{16,}=*$")  # RFC 6750's token68, 16 or more


def parse_token(name, value):
    """A bearer secret: what a header can carry, and long enough not to be guessed."""
    value = value.strip()
    if not _TOKEN.match(value):
        raise ConfigError(
            f"{name} is invalid: use at least 16 letters, digits or -._~+/ "
            "(e.g. the output of `openssl rand -hex 32`)"
        )
    return value


# env variable -> (Settings field, parser)
ENV = {
    "PROCESSING_MODE": (
        "processing_mode",
        lambda n, v: parse_choice(n, v, ("job", "pubsub", "http")),
    ),
    "STORAGE_MODE": ("storage_mode", lambda n, v: parse_choice(n, v, ("local", "gcs"))),
    "GCS_BUCKET": ("gcs_bucket", lambda n, v: (parse_buckets(n, v) or ("",))[0]),
    "GCS_PUBLIC": ("gcs_public", parse_bool),
    "OUTPUT_DIR": ("output_dir", parse_text),
    "INPUT_DIR": ("input_dir", parse_text),
    "GCP_PROJECT_ID": ("gcp_project_id", parse_text),
    "PUBSUB_SUBSCRIPTION": ("pubsub_subscription", parse_pubsub_name),
    "PUBSUB_RESULTS_TOPIC": ("pubsub_results_topic", parse_pubsub_name),
    "MODEL_NAME": ("model_name", parse_text),
    "MODEL_DIR": ("model_dir", parse_text),
    "MODEL_LICENSE": ("model_license", parse_license),
    "DEVICE": ("device", lambda n, v: parse_choice(n, v, ("auto", "cpu", "cuda"))),
    "PRECISION": ("precision", lambda n, v: parse_choice(n, v, ("auto", "fp32", "bf16", "fp16"))),
    "SEGMENT_BATCH": ("segment_batch", parse_batch),
    "SHIFTS": ("shifts", lambda n, v: parse_int(n, v, 0, 20)),
    "SEED": ("seed", lambda n, v: parse_int(n, v, 0)),
    "OUTPUT_FORMAT": ("output_format", lambda n, v: parse_choice(n, v, ("mp3", "wav", "flac"))),
    "MP3_BITRATE": ("mp3_bitrate", parse_bitrate),
    "MP3_QUALITY": ("mp3_quality", lambda n, v: parse_int(n, v, 0, 9)),
    "OUTPUTS": ("outputs", parse_outputs),
    "PEAKS_SAMPLES_PER_PIXEL": (
        "peaks_samples_per_pixel",
        lambda n, v: parse_int(n, v, 2, 1 << 20),
    ),
    "PEAKS_BITS": ("peaks_bits", lambda n, v: int(parse_choice(n, v, ("8", "16")))),
    "PEAKS_SPLIT_CHANNELS": ("peaks_split_channels", parse_bool),
    "SILENT_BELOW_LU": ("silent_below_lu", lambda n, v: parse_float(n, v, 0, "LU")),
    "OUTPUT_ANALYSIS": ("output_analysis", parse_bool),
    "MAX_INPUT_BYTES": ("max_input_bytes", lambda n, v: parse_int(n, v, 1)),
    "MAX_DURATION_S": ("max_duration_s", lambda n, v: parse_float(n, v, 0)),
    "DECODE_MEMORY_MB": ("decode_memory_mb", lambda n, v: parse_int(n, v, 64)),
    "DECODE_TIME_BASE_S": ("decode_time_base_s", lambda n, v: parse_float(n, v, 0)),
    "DECODE_TIME_FACTOR": (
        "decode_time_factor",
        lambda n, v: parse_float(n, v, 0, "seconds per second of audio"),
    ),
    "DECODE_KILL_RETRIES": ("decode_kill_retries", lambda n, v: parse_int(n, v, 0, 100)),
    "ALLOWED_INPUT_BUCKETS": ("allowed_input_buckets", parse_buckets),
    "MAX_MESSAGES": ("max_messages", lambda n, v: parse_int(n, v, 1, 1000)),
    "IDLE_TIMEOUT_S": ("idle_timeout_s", lambda n, v: parse_float(n, v, 0)),
    "MAX_DELIVERY_ATTEMPTS": ("max_delivery_attempts", lambda n, v: parse_int(n, v, 5, 100)),
    "RETRY_DEADLINE_S": ("retry_deadline_s", lambda n, v: parse_float(n, v, 0)),
    "MAX_RETRIES": ("max_retries", lambda n, v: parse_int(n, v, 0, 10)),
    "PROGRESS_EVENTS": ("progress_events", parse_bool),
    "LOG_FORMAT": ("log_format", lambda n, v: parse_choice(n, v, ("auto", "json", "text"))),
    "HTTP_HOST": ("http_host", parse_text),
    "PORT": ("http_port", lambda n, v: parse_int(n, v, 1, 65535)),
    "HTTP_QUEUE": ("http_queue", lambda n, v: parse_int(n, v, 0, 1000)),
    "HTTP_TOKEN": ("http_token", parse_token),
    "HTTP_ALLOW_UNAUTHENTICATED": ("http_allow_unauthenticated", parse_bool),
}
FIELD_TO_ENV = {field: env for env, (field, _) in ENV.items()}


def parse(env: str, raw) -> object:
    """The value of variable `env` from `raw` (a string, or a flag's value), validated; the one
    check for env and flags alike. ConfigError names the variable and what it accepts."""
    return ENV[env][1](env, raw if isinstance(raw, str) else str(raw))


def load_settings(environ=None, **overrides) -> Settings:
    """Settings from `environ` (default os.environ); keyword overrides (by field name, from
    flags) are validated like the env variable they stand for."""
    environ = os.environ if environ is None else environ
    values = {}
    for env, (name, _) in ENV.items():
        raw = environ.get(env)
        if raw is not None and (raw.strip() or name in ("gcs_bucket",)):
            values[name] = parse(env, raw)
    for name, raw in overrides.items():
        if raw is not None:
            values[name] = parse(FIELD_TO_ENV[name], raw)
    settings = replace(Settings(), **values)
    if settings.storage_mode == "gcs" and not settings.gcs_bucket:
        raise ConfigError("GCS_BUCKET is required when STORAGE_MODE=gcs")
    return settings
