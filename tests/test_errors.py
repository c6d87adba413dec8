"""The error-code registry: every code the job raises is in it once, and the table in
docs/errors.md is the registry's."""

import re
from pathlib import Path

import pytest

from job.errors import (
    CODES,
    EXIT_BAD_INPUT,
    EXIT_CONFIG,
    EXIT_RETRY,
    Interrupted,
    JobError,
    exit_code_for,
    http_status_for,
)

REPO = Path(__file__).resolve().parents[1]
RAISED = re.compile(r'JobError\(\s*"([a-z_]+)"')
RAISED_BY_NAME = re.compile(r"JobError\(\s*([A-Z][A-Z_]+)\b")
CONSTANT = re.compile(r'^([A-Z][A-Z_]+) = "([a-z_]+)"', re.MULTILINE)


def codes_in_source() -> set:
    """Every code a JobError is made with: a literal, or a module constant holding one."""
    found = {"interrupted"}  # Interrupted() is JobError("interrupted")
    for path in (REPO / "job").rglob("*.py"):
        text = path.read_text()
        constants = dict(CONSTANT.findall(text))
        found |= set(RAISED.findall(text))
        found |= {constants.get(name, name) for name in RAISED_BY_NAME.findall(text)}
    return found


def test_every_code_raised_in_the_job_is_registered():
    missing = codes_in_source() - set(CODES)
    assert not missing, f"add these to job/errors.py CODES: {sorted(missing)}"
    assert Interrupted().code in CODES


def test_the_documented_table_is_the_registry():
    text = (REPO / "docs" / "errors.md").read_text()
    section = text[text.index("\n## Error codes\n") :]
    rows = re.findall(
        r"^\| `([a-z_]+)` \| (\d+) \| (yes|no) \| (\d{3}) \| (.+) \|$", section, re.MULTILINE
    )
    assert [
        (code, int(exit), retry == "yes", int(http), meaning)
        for code, exit, retry, http, meaning in rows
    ] == [(code, c.exit, c.retryable, c.http, c.meaning) for code, c in CODES.items()]


def test_a_code_decides_retry_exit_and_status():
    assert exit_code_for(JobError("not_audio", "x")) == EXIT_BAD_INPUT
    assert exit_code_for(JobError("storage_unavailable", "x")) == EXIT_RETRY
    assert exit_code_for(JobError("permission_denied", "x")) == EXIT_CONFIG
    assert JobError("permission_denied", "x").retryable, "kept for when the role is fixed"
    assert http_status_for(JobError("too_long", "x")) == 422
    # a caller may still decide (a decoder killed again and again is final)
    assert not JobError("decode_killed", "x", retryable=False).retryable
    assert all(c.exit in (EXIT_BAD_INPUT, EXIT_RETRY, EXIT_CONFIG) for c in CODES.values())
    assert all((c.exit == EXIT_BAD_INPUT) != c.retryable for c in CODES.values())


def test_an_unregistered_code_is_a_programming_error_not_a_bad_input():
    """Without the registry's word a code would pass for a final bad input (exit 65) that no
    dashboard, document or retry policy knows: it is refused where it is made."""
    with pytest.raises(ValueError, match="CODES"):
        JobError("no_such_code", "x")
