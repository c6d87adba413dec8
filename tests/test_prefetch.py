"""`prefetch-model` and name-based loading through demucs' HuggingFace hub cache, offline.

The image build runs `stem-job prefetch-model` into HF_HOME and the runtime sets
HF_HUB_OFFLINE=1. Here a hub cache is laid out exactly as huggingface_hub stores a download
(models--adefossez--HTDemucs-6s/snapshots/REV with refs/main), holding the generated small model
in demucs' safetensors format, so the real `get_model("htdemucs_6s")` path reads it.
"""

import json

from conftest import last_json, run_job
from synthetic import write_hub_cache

from job.errors import EXIT_CONFIG, EXIT_OK


def hub_cache(home):
    write_hub_cache(home / "hub")
    return home


def offline_env(job_env_for, home):
    env = job_env_for(HF_HOME=str(home), HF_HUB_OFFLINE="1")
    env.pop("MODEL_DIR")
    return env


def test_prefetch_then_run_offline_from_the_hub_cache(job_env_for, tmp_path, song):
    env = offline_env(job_env_for, hub_cache(tmp_path / "hf"))
    proc = run_job(["prefetch-model"], env)
    assert proc.returncode == EXIT_OK, proc.stderr
    assert "vocals" in proc.stdout and "guitar" in proc.stdout
    proc = run_job(["run", "--input", str(song), "--release-id", "r1", "--track-id", "t1"], env)
    assert proc.returncode == EXIT_OK, proc.stderr[-2000:]
    result = last_json(proc.stdout)
    assert result["status"] == "completed" and result["modelDigest"].startswith("sha256:")
    # the weights that ran are the hub cache's files
    manifest = json.loads((tmp_path / "outputs" / "r1" / "t1" / "manifest.json").read_text())
    files = [entry["file"] for entry in manifest["modelFiles"]]
    assert files == ["htdemucs_6s.yaml", "synthetic.safetensors"]


def test_uncached_model_offline_is_one_line_naming_model_dir_and_prefetch(
    job_env_for, tmp_path, song
):
    (tmp_path / "empty").mkdir()
    env = offline_env(job_env_for, tmp_path / "empty")
    for args in (
        ["prefetch-model"],
        ["run", "--input", str(song), "--release-id", "r", "--track-id", "t"],
    ):
        proc = run_job(args, env)
        assert proc.returncode == EXIT_CONFIG
        lines = [x for x in proc.stderr.strip().splitlines() if "error" in x.lower()]
        assert len(lines) == 1 and "MODEL_DIR" in lines[0] and "prefetch-model" in lines[0], (
            proc.stderr
        )
        assert "Traceback" not in proc.stderr
