"""Any model demucs loads: a four-source HTDemucs (htdemucs' sources), a bag of two with
per-source weights (htdemucs_ft's shape), HDemucs (v3) and Demucs (v2) through the streaming
engine at parity with `apply_model`; which weights made a set (the digest of their files, the
sources, the declared licence), and the skip check that follows them, through `stem-job run`."""

import json
import shutil

import numpy as np
import pytest
import torch
from conftest import BAG_WEIGHTS, last_json, run_job
from ni_reader import check_ni_stems, decode
from synthetic import FOUR, music, write_hub_cache, write_model_folder
from test_engine_parity import ours, reference, sdr

from job.config import Settings
from job.errors import ConfigError
from job.separation import weights
from job.separation.model import ModelCache, load_model

MODELS = {  # kind: (name, write_model_folder's arguments, seconds of audio)
    "four sources": ("htdemucs", {"sources": FOUR}, 9.3),
    "bag, per-source weights": ("htdemucs_ft", {"sources": FOUR, "weights": BAG_WEIGHTS}, 9.3),
    "HDemucs": ("hdemucs_mmi", {"sources": FOUR, "size": "hdemucs"}, 5.3),
    "Demucs v2": ("demucs", {"sources": FOUR, "size": "demucs"}, 5.3),
}


@pytest.mark.parametrize("kind", MODELS)
def test_the_streaming_engine_matches_apply_model(kind, tmp_path):
    """Two windows or more, the last one partial: HTDemucs pads every window to its training
    length, HDemucs takes the partial window as it is, Demucs pads to its convolutions' valid
    length from the neighbouring audio; a bag weighs each model's sources."""
    name, arguments, seconds = MODELS[kind]
    model = load_model(name, str(write_model_folder(tmp_path, name, **arguments)))
    if kind.startswith("bag"):
        assert len(model.models) == 2 and model.weights == BAG_WEIGHTS
    mix = music(seconds, seed=4)
    expected = reference(model, mix)
    got = ours(model, mix, batch=2)
    for index, source in enumerate(model.sources):
        assert sdr(expected[index], got[index]) >= 60, source


def test_hub_repository_names_are_demucs_own():
    from demucs.hf import hf_repo_name

    for name in ("htdemucs", "htdemucs_ft", "htdemucs_6s", "mdx_extra", "hdemucs_mmi"):
        assert weights.hf_repo(name) == (f"adefossez/{hf_repo_name(name)}", name)
    assert weights.hf_repo("hf://label/htdemucs_ft") == ("label/HTDemucs-ft", "htdemucs_ft")


def test_the_files_found_are_the_ones_get_model_reads(bag_model_dir, tmp_path):
    files = weights.find("htdemucs_ft", str(bag_model_dir))
    assert [f.name for f in files] == [
        "htdemucs_ft.yaml",
        "syntheticsmall0_dbov.th",
        "syntheticsmall1_dbov.th",
    ]
    # a model by its signature, its file named with demucs' checksum suffix
    folder = tmp_path / "single"
    folder.mkdir()
    [source] = bag_model_dir.glob("syntheticsmall1_dbov.th")
    checksum = weights.sha256_of(source)[:8]
    shutil.copy(source, folder / f"sig1-{checksum}.th")
    assert weights.find("sig1", str(folder)) == [folder / f"sig1-{checksum}.th"]
    assert load_model("sig1", str(folder)).sources == FOUR
    assert weights.find("htdemucs", str(folder)) is None


def test_a_hub_model_is_named_by_its_cached_files_without_loading(tmp_path, monkeypatch):
    """MODEL_DIR unset: the files are found in the hub cache (what the image's prefetch leaves),
    the digest is known before the model loads, and demucs loads the same files offline."""
    from huggingface_hub import constants

    snapshot = write_hub_cache(tmp_path, "htdemucs", FOUR)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    cache = ModelCache(Settings(model_name="htdemucs", device="cpu", model_license="MIT"))
    identity = cache.identity()
    assert not cache.loaded
    assert [f["file"] for f in identity["files"]] == ["htdemucs.yaml", "synthetic.safetensors"]
    assert identity["files"][1]["sha256"] == weights.sha256_of(snapshot / "synthetic.safetensors")
    assert identity["digest"].startswith("sha256:") and identity["license"] == "MIT"
    assert cache.engine().sources == FOUR
    assert cache.identity() is identity


def test_a_model_whose_sources_cannot_be_output_names_is_a_configuration_error(tmp_path):
    write_model_folder(tmp_path, "odd", sources=["drums", "Lead Vocals"])
    with pytest.raises(ConfigError, match="'Lead Vocals' is not a usable output name"):
        load_model("odd", str(tmp_path))


def run_track(song, model_dir, name, track, **env):
    from conftest import job_env

    environment = job_env(model_dir, model_dir.parent / "outputs", MODEL_NAME=name, **env)
    proc = run_job(
        ["run", "--input", str(song), "--release-id", "rel_m", "--track-id", track], environment
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    folder = model_dir.parent / "outputs" / "rel_m" / track
    return last_json(proc.stdout), json.loads((folder / "manifest.json").read_text()), folder


def test_four_source_model_records_its_weights_and_a_changed_weight_file_redoes_the_set(
    song, four_model_dir, tmp_path
):
    """Mixes and NI Stems from a four-source model; the manifest and the result name the
    weights (digest of each file, sources, the declared licence); the same weights reuse the
    set, a weight file whose bytes changed redoes it."""
    model_dir = tmp_path / "model"
    shutil.copytree(four_model_dir, model_dir)
    asked = "no_drums,drums+bass,instrumental,ni_stems"
    env = {"OUTPUTS": asked, "MODEL_LICENSE": "LicenseRef-Label-Internal-1.0"}
    result, manifest, folder = run_track(song, model_dir, "htdemucs", "trk_4", **env)
    assert (
        list(result["stems"])
        == manifest["outputs"]
        == [
            "instrumental",
            "no_drums",
            "drums+bass",
            "ni_stems",
        ]
    )
    files = [entry["file"] for entry in manifest["modelFiles"]]
    assert files == ["htdemucs.yaml", "syntheticsmall0_dbov.th"]
    th = model_dir / files[1]
    assert manifest["modelFiles"][1]["sha256"] == weights.sha256_of(th)
    for record in (manifest, result):
        assert record["model"] == "htdemucs" and record["modelSources"] == FOUR
        assert record["modelLicense"] == "LicenseRef-Label-Internal-1.0"
    assert result["modelDigest"] == manifest["modelDigest"]
    assert manifest["modelDigest"].startswith("sha256:")
    ni = manifest["stems"]["ni_stems"]
    assert ni["slots"] == {source: [source] for source in FOUR}
    assert ni["url"] == "rel_m/trk_4/ni_stems.stem.mp4" and ni["file"] == "ni_stems.stem.mp4"
    check_ni_stems(folder / "ni_stems.stem.mp4", decode(song), None)
    for name in ("instrumental", "no_drums", "drums+bass"):
        assert manifest["stems"][name]["silent"] is False
        assert (folder / f"{name}.peaks.json").exists()

    again, _, _ = run_track(song, model_dir, "htdemucs", "trk_4", **env)
    assert again["reused"] is True and again["modelDigest"] == manifest["modelDigest"]

    package = torch.load(th, weights_only=False)  # the same file, other weights
    package["state"] = {key: value * 1.01 for key, value in package["state"].items()}
    torch.save(package, th)
    redone, remade, _ = run_track(song, model_dir, "htdemucs", "trk_4", **env)
    assert redone["reused"] is False and remade["modelDigest"] != manifest["modelDigest"]
    assert remade["modelFiles"][1]["sha256"] == weights.sha256_of(th)


def test_a_bag_with_per_source_weights_runs_end_to_end(song, bag_model_dir, tmp_path):
    """No OUTPUTS: a bag writes its own four sources; its digest covers the bag's yaml (the
    weights) and both models' files."""
    model_dir = tmp_path / "bag"
    shutil.copytree(bag_model_dir, model_dir)
    result, manifest, folder = run_track(song, model_dir, "htdemucs_ft", "trk_bag")
    assert list(result["stems"]) == manifest["outputs"] == FOUR and result["reused"] is False
    assert [entry["file"] for entry in manifest["modelFiles"]] == [
        "htdemucs_ft.yaml",
        "syntheticsmall0_dbov.th",
        "syntheticsmall1_dbov.th",
    ]
    assert result["modelLicense"] is None and manifest["modelLicense"] is None  # never guessed
    for source in FOUR:
        audio = decode(folder / f"{source}.mp3")
        assert abs(audio.shape[1] - manifest["stems"][source]["samples"]) <= 1152
        assert np.sqrt(np.mean(audio**2)) > 1e-4, source
