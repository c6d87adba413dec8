"""Shared fixtures: a generated small model, synthesised audio, and a way to run stem-job."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "hack"))  # synthetic, stand-ins
from synthetic import FOUR, music, write_audio, write_model_folder  # noqa: E402

try:  # the real Pub/Sub and GCS stand-ins (emulators), started on demand
    from stand_ins import *  # noqa: F401,F403
except ImportError:  # pragma: no cover - written alongside
    pass

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory) -> Path:
    """A small HTDemucs with htdemucs_6s' six sources, seeded, as a demucs local repo."""
    return write_model_folder(tmp_path_factory.mktemp("model"))


# htdemucs_ft's shape: per-source weights, here drums from the first model only, bass from the
# second only, other averaged, vocals mostly from the second
BAG_WEIGHTS = [[1.0, 0.0, 1.0, 0.25], [0.0, 1.0, 1.0, 0.75]]


@pytest.fixture(scope="session")
def four_model_dir(tmp_path_factory) -> Path:
    """A small HTDemucs with htdemucs' four sources, as the model `htdemucs`."""
    return write_model_folder(tmp_path_factory.mktemp("model4"), "htdemucs", sources=FOUR)


@pytest.fixture(scope="session")
def bag_model_dir(tmp_path_factory) -> Path:
    """Two small four-source HTDemucs with per-source weights, as the model `htdemucs_ft`."""
    folder = tmp_path_factory.mktemp("bag")
    return write_model_folder(folder, "htdemucs_ft", sources=FOUR, weights=BAG_WEIGHTS)


@pytest.fixture(scope="session")
def mix():
    return music(9.0, seed=1)


@pytest.fixture(scope="session")
def song(tmp_path_factory, mix) -> Path:
    return write_audio(tmp_path_factory.mktemp("audio") / "song.mp3", mix)


def job_env(model_dir, output_dir, **extra) -> dict:
    env = {
        k: v
        for k, v in os.environ.items()
        if k
        not in (
            "JOB_MESSAGE",
            "ORIGINAL_STEM_URI",
            "RELEASE_ID",
            "TRACK_ID",
            "INPUT_DIR",
            "STORAGE_MODE",
            "PROCESSING_MODE",
        )
    }
    env.update(
        MODEL_DIR=str(model_dir),
        OUTPUT_DIR=str(output_dir),
        DEVICE="cpu",
        LOG_FORMAT="json",
        PYTHONUNBUFFERED="1",
    )
    env.update({k: str(v) for k, v in extra.items()})
    return env


def run_job(args, env, timeout=300, **kwargs) -> subprocess.CompletedProcess:
    """`stem-job ARGS` as a subprocess (python -m job, so no PATH assumptions)."""
    return subprocess.run(
        [sys.executable, "-m", "job", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        **kwargs,
    )


def last_json(stdout: str) -> dict:
    return json.loads(stdout.strip().splitlines()[-1])


@pytest.fixture
def job_env_for(model_dir, tmp_path):
    out = tmp_path / "outputs"
    return lambda **extra: job_env(model_dir, out, **extra)
