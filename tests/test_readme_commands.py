"""The README's first command, as the README writes it, on a fresh copy of the repository.

A new user clones the repository and pastes the README's first command: it must install into a
new `.venv`, separate one track and leave stems and a manifest, with exit status 0. The command is
read from the README (so this test follows it) and run by bash in a copy of the checkout's files
(tracked and not ignored: what a clone of this tree holds) with no `.venv` and nothing beside it.
The hub is out of reach here, so the model comes from a generated folder through `MODEL_DIR`, the
no-download way the README names, and `song.mp3` is synthesised; the no-download demo the README
offers runs after it. The README's second command, `hack/test`, is what CI runs in a fresh clone.
"""

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from conftest import REPO, music, write_audio, write_model_folder

from job.messages import STEMS

README = (REPO / "README.md").read_text()


def readme_command(pattern: str) -> str:
    found = re.search(pattern, README, re.MULTILINE)
    assert found, f"the README no longer has a command matching {pattern!r}"
    return found.group(1)


def fresh_copy(dest: Path) -> Path:
    """The checkout's files as a clone of it would hold them: no .venv, no build outputs."""
    names = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=REPO,
        capture_output=True,
        check=True,
    ).stdout.split(b"\0")
    for name in filter(None, (n.decode() for n in names)):
        source = REPO / name
        if source.is_file():  # a tracked file deleted in the work tree is not in a clone
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, dest / name)
    return dest


def bash(line: str, cwd: Path, **env) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH")}
    return subprocess.run(
        ["bash", "-c", line],
        cwd=cwd,
        env={**clean, **env},
        capture_output=True,
        text=True,
        timeout=900,
    )


@pytest.fixture(scope="module")
def clone(tmp_path_factory) -> Path:
    return fresh_copy(tmp_path_factory.mktemp("fresh") / "stem-job")


def test_install_refuses_what_it_cannot_do_in_one_line(clone):
    bad_argument = bash("hack/install --tests", clone)
    assert bad_argument.returncode == 2
    assert bad_argument.stderr.strip().splitlines() == [
        "hack/install: unknown argument '--tests' (usage: hack/install [--test])"
    ]
    no_python = bash("hack/install", clone, PYTHON="false")
    assert no_python.returncode != 0
    assert no_python.stderr.strip().splitlines()[-1].startswith("hack/install: failed at line")
    assert not (clone / ".venv" / ".stem-job-installed").exists()


def test_readme_first_command_on_a_fresh_clone(clone, tmp_path):
    command = readme_command(r"^    (hack/install && \.venv/bin/stem-job run .+)$")
    assert not (clone / ".venv" / "bin" / "python").exists(), "the copy must start without .venv"
    write_audio(clone / "song.mp3", music(6.0, seed=3))
    model = write_model_folder(tmp_path / "model")

    done = bash(command, clone, MODEL_DIR=str(model), DEVICE="cpu", LOG_FORMAT="text")
    assert done.returncode == 0, f"{command}\nexit {done.returncode}\n{done.stderr[-3000:]}"
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["status"] == "completed", result
    output = re.search(r"--output-dir (\S+)", command).group(1)
    release = re.search(r"--release-id (\S+)", command).group(1)
    track = re.search(r"--track-id (\S+)", command).group(1)
    folder = clone / output / release / track
    for stem in STEMS:
        assert (folder / f"{stem}.mp3").stat().st_size > 0, stem
    manifest = json.loads((folder / "manifest.json").read_text())
    assert sorted(manifest["stems"]) == sorted(STEMS)

    demo = readme_command(r"`(hack/install && hack/demo)`")
    shown = bash(demo, clone)
    assert shown.returncode == 0, f"{demo}\nexit {shown.returncode}\n{shown.stderr[-3000:]}"
    assert (clone / "demo-outputs" / "demo_release" / "demo_track" / "manifest.json").is_file()
