"""The code's shape, checked by the tools pyproject.toml configures: ruff (lint and format),
the import-linter layer contract, and vulture's dead code (with hack/vulture_whitelist.py)."""

import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
SOURCES = ["job", "tests", "hack"]


def tool(name: str, *args, cwd=REPO, env=None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(BIN / name), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )


def test_ruff_finds_nothing_and_the_code_is_formatted():
    lint = tool("ruff", "check", *SOURCES)
    assert lint.returncode == 0, lint.stdout + lint.stderr
    fmt = tool("ruff", "format", "--check", *SOURCES)
    assert fmt.returncode == 0, fmt.stdout + fmt.stderr


def test_nothing_imports_upward():
    checked = tool("lint-imports")
    assert checked.returncode == 0 and "0 broken" in checked.stdout, checked.stdout


def test_the_layer_contract_refuses_an_upward_import(tmp_path):
    """The contract is not vacuous: a leaf that imports an entry point breaks it."""
    shutil.copytree(REPO / "job", tmp_path / "job", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "pyproject.toml", tmp_path)
    errors = tmp_path / "job" / "errors.py"
    errors.write_text(errors.read_text() + "\nimport job.cli  # noqa\n")
    checked = tool("lint-imports", cwd=tmp_path, env={"PYTHONPATH": str(tmp_path)})
    assert checked.returncode != 0 and "BROKEN" in checked.stdout, checked.stdout
    assert "job.errors -> job.cli" in checked.stdout, checked.stdout


def test_no_dead_code():
    found = tool("vulture", "job", "hack/vulture_whitelist.py", "--min-confidence", "60")
    assert found.returncode == 0, found.stdout + found.stderr
