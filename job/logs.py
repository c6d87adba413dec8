"""Logging: JSON lines for Cloud Logging on Cloud Run/GKE, readable text on a terminal."""

import json
import logging
import os
import sys

PLATFORM_VARS = ("K_SERVICE", "CLOUD_RUN_JOB", "KUBERNETES_SERVICE_HOST")


def choose_format(wanted: str = "auto", stream=sys.stderr) -> str:
    if wanted != "auto":
        return wanted
    if any(os.environ.get(v) for v in PLATFORM_VARS) or not stream.isatty():
        return "json"
    return "text"


class JsonFormatter(logging.Formatter):
    """Cloud Logging's structured format: severity, message, labels, extra fields."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {"severity": record.levelname, "message": record.getMessage(),
                 "logger": record.name, "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S")}
        labels = getattr(record, "labels", None)
        if labels:
            entry["logging.googleapis.com/labels"] = {k: str(v) for k, v in labels.items() if v}
        fields = getattr(record, "fields", None)
        if fields:
            entry.update(fields)
        if record.exc_info:
            entry["stack_trace"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def platform_labels() -> dict:
    """Which execution/pod produced a line (Cloud Run job execution and task, k8s pod)."""
    return {key: os.environ[var] for key, var in (
        ("execution", "CLOUD_RUN_EXECUTION"), ("task", "CLOUD_RUN_TASK_INDEX"),
        ("attempt", "CLOUD_RUN_TASK_ATTEMPT"), ("pod", "POD_NAME"), ("host", "HOSTNAME"))
        if os.environ.get(var)}


def setup_logging(wanted: str = "auto", level: int = logging.INFO) -> str:
    fmt = choose_format(wanted)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else
                         logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    for noisy in ("urllib3", "google", "grpc", "httpx"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    return fmt
