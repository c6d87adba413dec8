"""Reduced precision: which one PRECISION=auto picks, the fp32 probe, its recorded verdicts,
the CPU's bf16 copy of the network, and the NaN/Inf guard.

Everything here runs for real on any x86 CPU: bf16 autocast works without bf16 instructions
(slowly), so the same code paths as on a bf16 CPU or a GPU are exercised on the small model.
The CUDA side of the same checks is hack/gpu_tests (run by hack/gpu-check on a GPU machine).
"""

import json

import numpy as np
import pytest
import torch
from conftest import last_json, run_job
from synthetic import music, write_audio, write_model_folder
from test_engine_parity import SmallDevice, Wrapped, separated

from job.errors import EXIT_OK
from job.separation import engine
from job.separation.engine import Engine, agreement_db
from job.separation.model import (
    BF16_CPU_FLAGS,
    choose_precision,
    cpu_flags,
    cpu_kind,
    load_model,
)
from job.separation.passes import MAX_BATCH, auto_batch
from job.separation.precision import Verdicts, bf16_copy
from job.separation.windows import plan_streams

CPUINFO = """processor\t: 0
vendor_id\t: AuthenticAMD
model name\t: AMD EPYC
flags\t\t: fpu vme sse sse2 avx2 avx512f avx512_bf16 avx512_vnni
processor\t: 1
flags\t\t: fpu vme sse sse2 avx2 avx512f avx512_bf16 avx512_vnni
"""


class NonFiniteWhenReduced(Wrapped):
    """A real model that overflows in reduced precision: its first window's output becomes
    Inf under autocast or as the bf16 copy (what others report from fp16 HTDemucs), and is
    exact in fp32."""

    def forward(self, mix):
        out = self.inner(mix)
        if self.reduced(mix):
            out = out.clone()
            out[0, :, :, :64] = float("inf")
        return out


@pytest.fixture(scope="module")
def small(model_dir):
    return load_model("htdemucs_6s", str(model_dir)).models[0]


@pytest.fixture(scope="module")
def mix():
    return music(12.0, seed=4)  # three windows, the last one partial


@pytest.fixture(scope="module")
def exact(small, mix):
    return separated(Engine(small, torch.device("cpu")), mix)[0]


@pytest.fixture(scope="module")
def unprobed_bf16(small, mix):
    """(stems, stats) of `mix` in bf16 from the first window, nothing checked against fp32."""
    return separated(Engine(small, torch.device("cpu"), precision="bf16"), mix)


@pytest.fixture(scope="module")
def one_window():
    """A track of one window, where only the probe's verdict is asserted (it holds for the
    weights and the CPU, whatever the track): two passes probed, where `mix` takes four."""
    return music(5.0, seed=5)  # shorter than a window's stride: one window


@pytest.fixture(scope="module")
def one_window_exact(small, one_window):
    return separated(Engine(small, torch.device("cpu")), one_window)[0]


def test_cpu_flags_are_read_from_cpuinfo():
    flags = cpu_flags(CPUINFO)
    assert {"avx512_bf16", "avx512f", "avx2"} <= flags
    assert cpu_flags("processor\t: 0\n") == set()
    assert isinstance(cpu_flags(), set)  # this host's, whatever it has


@pytest.mark.parametrize("flag", BF16_CPU_FLAGS)
def test_auto_picks_bf16_only_on_cpus_with_bf16_instructions(flag):
    assert choose_precision("auto", "cpu", {"avx2", flag}) == ("bf16", True)
    assert choose_precision("auto", "cpu", cpu_flags(CPUINFO.replace("avx512_bf16", "avx2"))) == (
        "fp32",
        False,
    )
    assert choose_precision("auto", "cpu", set()) == ("fp32", False)


def test_auto_on_cuda_and_explicit_choices():
    assert choose_precision("auto", "cuda", set(), cuda_bf16=True) == ("bf16", True)
    assert choose_precision("auto", "cuda", set(), cuda_bf16=False) == ("fp16", True)
    for wanted in ("fp32", "bf16", "fp16"):  # asked for: used as is, not probed
        assert choose_precision(wanted, "cpu", cpu_flags(CPUINFO)) == (wanted, False)


def test_auto_batch_follows_free_memory():
    cuda, gib = torch.device("cuda"), 2**30  # a device object needs no GPU
    assert auto_batch(torch.device("cpu")) == 1
    assert auto_batch(cuda, "fp32", free_bytes=gib) == 1
    sizes = [auto_batch(cuda, "fp32", free_bytes=n * gib) for n in (4, 8, 16, 24)]
    assert sizes == sorted(sizes) and sizes[0] < sizes[-1]
    assert auto_batch(cuda, "bf16", free_bytes=8 * gib) > auto_batch(
        cuda, "fp32", free_bytes=8 * gib
    )
    assert auto_batch(cuda, "fp32", free_bytes=1000 * gib) == MAX_BATCH


def test_bf16_autocast_on_cpu_agrees_with_fp32(exact, unprobed_bf16):
    got, stats = unprobed_bf16
    assert stats["fp32FallbackWindows"] == 0
    db = agreement_db(exact[None], got[None])
    assert engine.PARITY_DB <= db < 100, db  # close to fp32, and really not fp32


def test_probe_keeps_bf16_when_it_agrees(small, mix, exact):
    separator = Engine(small, torch.device("cpu"), precision="bf16", probe=True)
    got, _ = separated(separator, mix)
    assert separator.precision == "bf16" and separator.probe_db >= engine.PARITY_DB
    assert agreement_db(exact[None], got[None]) >= engine.PARITY_DB


def test_probe_falls_back_to_fp32_when_it_disagrees(small, mix, exact, monkeypatch):
    monkeypatch.setattr(engine, "PARITY_DB", 1000.0)  # no reduced precision can pass
    separator = Engine(small, torch.device("cpu"), precision="bf16", probe=True)
    got, _ = separated(separator, mix)
    assert separator.precision == "fp32" and separator.probe_db < 1000
    np.testing.assert_array_equal(got, exact)  # every window ran in fp32


def test_the_probe_compares_one_window_and_the_batch_runs_in_reduced_precision(small, mix, exact):
    """A device that holds two windows per pass in bf16 holds one in fp32 (twice the memory
    per window): the probe's fp32 pass is one window, and nothing runs out of memory."""
    device = SmallDevice(small, fp32=1, reduced=2)
    separator = Engine(device, torch.device("cpu"), batch=2, precision="bf16", probe=True)
    got, stats = separated(separator, mix)
    assert separator.precision == "bf16" and stats["oomHalvings"] == 0
    assert device.passes == [("fp32", 1), ("reduced", 1), ("reduced", 1), ("reduced", 1)]
    assert engine.PARITY_DB <= agreement_db(exact[None], got[None]) < 100


def test_silence_before_the_probe_runs_in_passes_sized_for_fp32(small, mix):
    """Silent lead-in windows run in fp32 before the probe has decided: with one size for all
    precisions, the fp32 pass that does not fit is halved; with sizes per precision, they go
    in fp32-sized passes and nothing runs out of memory. The output is the same."""
    # 2 silent windows, then 2 of music: the probe's (fp32) and one after it in bf16; music
    # of zero mean, so that the lead-in stays silent once the track is normalised
    tail = mix[:, : 7 * 44100] - mix[:, : 7 * 44100].mean()
    quiet = np.concatenate([np.zeros((2, 16 * 44100), np.float32), tail], 1)
    exact = separated(Engine(small, torch.device("cpu")), quiet)[0]
    device = SmallDevice(small, fp32=1, reduced=2)
    one_size = Engine(device, torch.device("cpu"), batch=2, precision="bf16", probe=True)
    halved, stats = separated(one_size, quiet)
    assert stats["oomHalvings"] == 1 and one_size.passes.size("fp32") == 1
    assert device.passes[:3] == [("fp32", 2), ("fp32", 1), ("fp32", 1)]
    assert engine.PARITY_DB <= agreement_db(exact[None], halved[None]) < 100
    device.passes.clear()
    sized = Engine(
        device, torch.device("cpu"), batch={"fp32": 1, "bf16": 2}, precision="bf16", probe=True
    )
    got, stats = separated(sized, quiet)
    assert stats["oomHalvings"] == 0 and sized.precision == "bf16"
    assert device.passes[:4] == [("fp32", 1), ("fp32", 1), ("fp32", 1), ("reduced", 1)]
    assert max(n for p, n in device.passes if p == "fp32") == 1
    np.testing.assert_array_equal(got, halved)


def test_after_a_failed_probe_passes_are_sized_for_fp32(small, mix, exact, monkeypatch):
    monkeypatch.setattr(engine, "PARITY_DB", 1000.0)  # no reduced precision can pass
    device = SmallDevice(small, fp32=1, reduced=2)
    separator = Engine(
        device, torch.device("cpu"), batch={"fp32": 1, "bf16": 2}, precision="bf16", probe=True
    )
    got, stats = separated(separator, mix)
    assert separator.precision == "fp32" and stats["oomHalvings"] == 0 and stats["batch"] == 1
    assert device.passes == [("fp32", 1), ("reduced", 1), ("fp32", 1), ("fp32", 1)]
    np.testing.assert_array_equal(got, exact)


def test_non_finite_windows_are_redone_in_fp32_and_counted(small, mix, exact, one_window):
    separator = Engine(NonFiniteWhenReduced(small), torch.device("cpu"), precision="bf16")
    got, stats = separated(separator, mix)
    windows = len(plan_streams([small], mix.shape[1], 0, 0)[0].windows())
    assert stats["fp32FallbackWindows"] == separator.fallback_windows == windows  # every one
    assert np.isfinite(got).all()
    np.testing.assert_allclose(got, exact, atol=1e-5)
    # in fp32 the same model is finite: nothing is redone
    assert (
        separated(Engine(NonFiniteWhenReduced(small), torch.device("cpu")), one_window)[1][
            "fp32FallbackWindows"
        ]
        == 0
    )


def test_cpu_kind_names_the_model_and_its_flags():
    kind = cpu_kind(CPUINFO)
    assert kind.startswith("AMD EPYC ") and kind == cpu_kind(CPUINFO)
    assert cpu_kind(CPUINFO.replace("avx512_bf16", "avx2")) != kind  # other flags, other kind
    assert cpu_kind("").startswith("unknown ") and cpu_kind()  # this host's, whatever it is


def test_bf16_copy_runs_the_blocks_in_bf16_and_leaves_the_model_alone(small):
    copy = bf16_copy(small)
    assert {p.dtype for p in copy.encoder.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in copy.crosstransformer.layers.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in small.parameters()} == {torch.float32}
    assert bf16_copy(torch.nn.Conv1d(2, 2, 3)) is None  # no such blocks: autocast instead


def probed(small, mix, folders, hardware="this cpu"):
    separator = Engine(
        small,
        torch.device("cpu"),
        precision="bf16",
        probe=True,
        verdicts=Verdicts(folders),
        hardware=hardware,
    )
    return separator, separated(separator, mix)[0]


def test_a_recorded_verdict_replaces_the_fp32_check(small, mix, exact, unprobed_bf16, tmp_path):
    first, _ = probed(small, mix, [tmp_path])
    assert not first.probe_recorded and first.probe_db >= engine.PARITY_DB
    files = list(tmp_path.glob("precision-check-*.json"))
    assert len(files) == 1 and json.loads(files[0].read_text())["db"] == first.probe_db

    again, got = probed(small, mix, [tmp_path])
    assert again.probe_recorded and again.probe_db == first.probe_db and not again.probe_pending
    # every window in bf16, the first one too: no fp32 window was computed
    np.testing.assert_array_equal(got, unprobed_bf16[0])
    assert engine.PARITY_DB <= agreement_db(exact[None], got[None]) < 100


def test_a_recorded_failure_means_fp32_from_the_start(
    small, mix, exact, one_window, tmp_path, monkeypatch
):
    monkeypatch.setattr(engine, "PARITY_DB", 1000.0)  # no reduced precision can pass
    probed(small, one_window, [tmp_path])  # recorded on one track, used on another
    again, got = probed(small, mix, [tmp_path])
    assert again.probe_recorded and again.precision == "fp32"
    np.testing.assert_array_equal(got, exact)


def test_a_verdict_for_other_weights_or_another_cpu_is_not_used(small, one_window, tmp_path):
    probed(small, one_window, [tmp_path])
    other_cpu, _ = probed(small, one_window, [tmp_path], hardware="another cpu")
    assert not other_cpu.probe_recorded and other_cpu.probe_db is not None  # checked again
    other = load_model("htdemucs_6s", str(write_model_folder(tmp_path / "seed1", seed=1))).models[0]
    other_weights, _ = probed(other, one_window, [tmp_path])
    assert not other_weights.probe_recorded
    assert len(list(tmp_path.glob("precision-check-*.json"))) == 3


def test_unwritable_folders_only_mean_checking_again(small, one_window, one_window_exact, tmp_path):
    blocked = tmp_path / "a-file"
    blocked.write_text("not a folder")
    separator, got = probed(small, one_window, [blocked / "verdicts", tmp_path / "cache"])
    assert separator.probe_db >= engine.PARITY_DB  # the track ran, checked
    assert (
        len(list((tmp_path / "cache").glob("precision-check-*.json"))) == 1
    )  # the next one took it
    alone, got = probed(small, one_window, [blocked / "verdicts"])
    assert not alone.probe_recorded and alone.probe_db >= engine.PARITY_DB
    assert agreement_db(one_window_exact[None], got[None]) >= engine.PARITY_DB


def test_prefetch_records_the_verdict_that_runs_then_use(job_env_for, tmp_path, mix):
    """On a bf16 CPU the image build's check is what later runs rely on; elsewhere, fp32 as is.
    The verdict goes to the cache (XDG_CACHE_HOME), never into the model's folder: that holds
    pickles torch.load runs, and the image keeps it read-only to the job."""
    folder = write_model_folder(tmp_path / "model")  # its own folder: nothing recorded yet
    models = sorted(path.name for path in folder.iterdir())
    song = write_audio(tmp_path / "song.wav", mix)
    env = job_env_for(MODEL_DIR=folder, XDG_CACHE_HOME=tmp_path / "cache")
    built = run_job(["prefetch-model"], env)
    assert built.returncode == EXIT_OK, built.stderr[-2000:]
    assert sorted(path.name for path in folder.iterdir()) == models, "written into the model"
    recorded = list((tmp_path / "cache" / "stem-job").glob("precision-check-*.json"))
    proc = run_job(["run", "--input", str(song), "--release-id", "r", "--track-id", "t"], env)
    assert proc.returncode == EXIT_OK, proc.stderr[-2000:]
    assert last_json(proc.stdout)["status"] == "completed"
    ran = json.loads((tmp_path / "outputs" / "r" / "t" / "manifest.json").read_text())["engine"]
    assert (ran["oomHalvings"], ran["batch"], ran["devicePeakMb"]) == (0, 1, None)  # CPU
    if choose_precision("auto", "cpu", cpu_flags())[1]:
        assert len(recorded) == 1 and "measured now" in built.stdout
        db = json.loads(recorded[0].read_text())["db"]
        assert ran["probeDb"] == round(db, 2) and "(recorded)" in proc.stderr
        assert ran["precision"] == ("bf16" if db >= engine.PARITY_DB else "fp32")
    else:
        assert recorded == [] and "reduced precision" not in built.stdout
        assert (ran["precision"], ran["probeDb"]) == ("fp32", None)
