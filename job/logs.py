"""Logging: Cloud Logging's structured JSON on Cloud Run and GKE, readable text on a terminal.

The JSON lines come from google-cloud-logging's `StructuredLogHandler` (severity, message,
`logging.googleapis.com/labels`, source location, trace), which the platforms' agents parse from
the container's output. Records add `extra={"labels": {...}}` for labels and
`extra={"json_fields": {...}}` for fields of their own (the `job_summary` line's figures).
"""

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


def platform_labels() -> dict:
    """Which execution/pod produced a line (Cloud Run job execution and task, k8s pod)."""
    return {
        key: os.environ[var]
        for key, var in (
            ("execution", "CLOUD_RUN_EXECUTION"),
            ("task", "CLOUD_RUN_TASK_INDEX"),
            ("attempt", "CLOUD_RUN_TASK_ATTEMPT"),
            ("pod", "POD_NAME"),
            ("host", "HOSTNAME"),
        )
        if os.environ.get(var)
    }


def setup_logging(wanted: str = "auto", level: int = logging.INFO) -> str:
    """Log to stderr (stdout carries the result JSON) in the chosen format; returns it."""
    fmt = choose_format(wanted)
    if fmt == "json":
        # imported here: a terminal run should not pay for google.cloud.logging's import
        import google.cloud.logging_v2
        from google.cloud.logging_v2.handlers import StructuredLogHandler

        # the library's one-off "instrumentation" line says nothing about the job (and would
        # print twice, through its own logger and the root handler)
        google.cloud.logging_v2._instrumentation_emitted = True
        handler = StructuredLogHandler(
            stream=sys.stderr,
            labels=platform_labels(),
            project_id=os.environ.get("GCP_PROJECT_ID") or None,
        )
    else:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    for noisy in ("urllib3", "google", "grpc"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    return fmt
