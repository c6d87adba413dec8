"""The hashed locks against pyproject.toml (their one source) and against this very venv, which
hack/install built from them: a dependency added to pyproject.toml without `hack/lock`, a lock
edited by hand, or an install that resolved instead of taking the lock fails here."""

import subprocess
import sys
import tomllib
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

REPO = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())


def locked(name: str) -> dict:
    """{package: (version, hashes)} from a pip requirements file written by hack/lock."""
    pins, current = {}, None
    for line in (REPO / name).read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("--hash="):
            pins[current][1].append(line.split("=", 1)[1].rstrip(" \\"))
            continue
        requirement = Requirement(line.rstrip(" \\"))
        (spec,) = requirement.specifier
        assert spec.operator == "==", f"{name}: {line} is not an exact pin"
        current = canonicalize_name(requirement.name)
        pins[current] = (Version(spec.version), [])
    return pins


RUNTIME, TEST = locked("requirements.lock"), locked("requirements-test.lock")
TORCH_PIN = Requirement(
    next(
        line
        for line in (REPO / "requirements-torch.txt").read_text().splitlines()
        if line.startswith("torch")
    )
)


def declared(extra: str | None = None) -> list:
    found = PYPROJECT["project"]["dependencies"]
    if extra:
        found = found + PYPROJECT["project"]["optional-dependencies"][extra]
    return [Requirement(r) for r in found]


@pytest.mark.parametrize(
    "lock, extra",
    [(RUNTIME, None), (TEST, "test")],
    ids=["requirements.lock", "requirements-test.lock"],
)
def test_every_declared_dependency_is_locked_at_a_version_it_admits(lock, extra):
    for requirement in declared(extra):
        name = canonicalize_name(requirement.name)
        if name == "torch":
            continue
        assert name in lock, f"{requirement} is not locked: run hack/lock"
        assert requirement.specifier.contains(lock[name][0], prereleases=True), (
            f"{requirement}: the lock has {lock[name][0]} (run hack/lock)"
        )
    assert all(hashes for _, hashes in lock.values()), "every pin carries its hashes"


def test_torch_is_pinned_once_outside_the_locks_at_a_version_pyproject_admits():
    assert "torch" not in RUNTIME and "torch" not in TEST
    (floor,) = [r for r in declared() if r.name == "torch"]
    (pin,) = TORCH_PIN.specifier
    assert pin.operator == "==" and floor.specifier.contains(pin.version)


def test_the_test_lock_pins_the_job_exactly_as_the_job_lock():
    for name, (version, hashes) in RUNTIME.items():
        assert TEST[name] == (version, hashes), name


def test_this_venv_holds_exactly_the_locked_versions():
    for name, (version, _) in TEST.items():
        assert Version(metadata.version(name)) == version, name
    torch = Version(metadata.version("torch"))
    assert Version(torch.base_version) == Version(next(iter(TORCH_PIN.specifier)).version)
    check = subprocess.run([sys.executable, "-m", "pip", "check"], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
