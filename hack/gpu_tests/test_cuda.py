"""The CUDA side of the engine, run by hack/gpu-check on a machine with a GPU.

Not in the normal suite (testpaths is tests/): without a GPU this module fails at import
instead of skipping, so a run that claims to have checked CUDA cannot pass vacuously.
"""

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

if not torch.cuda.is_available():
    raise RuntimeError("hack/gpu_tests need a CUDA device (torch.cuda.is_available() is False)")

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from synthetic import build_model, music  # noqa: E402
from test_precision import NonFiniteWhenReduced, separated  # noqa: E402

from job.errors import JobError  # noqa: E402
from job.separation import engine  # noqa: E402
from job.separation.engine import Engine, agreement_db  # noqa: E402
from job.separation.passes import WINDOW_MB, auto_batch  # noqa: E402
from job.separation.windows import plan_streams  # noqa: E402

CUDA = torch.device("cuda")


@pytest.fixture(scope="module")
def small():
    return build_model("small")[0]


@pytest.fixture(scope="module")
def mix():
    return music(30.0, seed=4)  # six windows: several batches, a partial last one


@pytest.fixture(scope="module")
def cpu_exact(small, mix):
    return separated(Engine(build_model("small")[0], torch.device("cpu")), mix)[0]


@pytest.mark.parametrize("batch", [1, 2, 4])
def test_fp32_on_cuda_matches_cpu(small, mix, cpu_exact, batch):
    got, stats = separated(Engine(small, CUDA, batch=batch), mix)
    assert (stats["fp32FallbackWindows"], stats["oomHalvings"]) == (0, 0)
    assert stats["devicePeakMb"] > 0
    assert agreement_db(cpu_exact[None], got[None]) >= 60


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_reduced_precision_on_cuda_holds_parity(small, mix, cpu_exact, precision):
    separator = Engine(small, CUDA, batch=3, precision=precision, probe=True)
    got, _ = separated(separator, mix)
    assert separator.probe_db is not None
    assert agreement_db(cpu_exact[None], got[None]) >= engine.PARITY_DB


def test_pipelined_batches_equal_one_by_one(small, mix):
    """The asynchronous path (pinned buffers reused across batches) loses or mixes nothing."""
    one = separated(Engine(small, CUDA, batch=1), mix)[0]
    many = separated(Engine(small, CUDA, batch=2), mix)[0]
    assert agreement_db(one[None], many[None]) >= 60


def test_non_finite_windows_fall_back_on_cuda(small, mix, cpu_exact):
    separator = Engine(NonFiniteWhenReduced(small), CUDA, batch=2, precision="fp16")
    got, stats = separated(separator, mix)
    windows = len(plan_streams([small], mix.shape[1], 0, 0)[0].windows())
    assert stats["fp32FallbackWindows"] == windows
    assert np.isfinite(got).all() and agreement_db(cpu_exact[None], got[None]) >= 60


def test_auto_batch_fits_the_free_memory():
    free, _ = torch.cuda.mem_get_info(CUDA)
    for precision in ("fp32", "bf16"):
        batch = auto_batch(CUDA, precision)
        assert batch >= 1 and (batch == 1 or batch * WINDOW_MB[precision] * 2**20 < free)


@pytest.fixture(scope="module")
def full():
    return build_model("full")[0]


def test_peak_memory_is_measured_per_track(full, mix):
    """Each track reports its own peak: a batch-1 track after a batch-4 one reports less."""
    separator = Engine(full, CUDA, batch=4)
    four = separated(separator, mix)[1]["devicePeakMb"]
    one = separated(Engine(full, CUDA, batch=1), mix)[1]["devicePeakMb"]
    assert 0 < one < four


def test_the_allocators_own_out_of_memory_halves_the_pass(full, mix):
    """A device limited (by the caching allocator itself) to the memory of a 2-window pass:
    the 4-window pass raises torch.cuda.OutOfMemoryError for real, is redone in halves, and the
    output is what batch 1 gives."""
    one, stats = separated(Engine(full, CUDA, batch=1), mix)
    peak_one = stats["devicePeakMb"]
    peak_four = separated(Engine(full, CUDA, batch=4), mix)[1]["devicePeakMb"]
    per_window = (peak_four - peak_one) / 3
    limit_mb = peak_one + 1.5 * per_window
    torch.cuda.empty_cache()
    total = torch.cuda.get_device_properties(0).total_memory
    torch.cuda.set_per_process_memory_fraction(limit_mb * 2**20 / total)
    try:
        got, stats = separated(Engine(full, CUDA, batch=4), mix)
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)
        torch.cuda.empty_cache()
    assert stats["oomHalvings"] >= 1 and stats["batch"] <= 2, stats
    assert stats["devicePeakMb"] <= limit_mb
    assert agreement_db(one[None], got[None]) >= 60


def test_a_window_that_cannot_fit_fails_the_track(small, mix):
    torch.cuda.empty_cache()
    total = torch.cuda.get_device_properties(0).total_memory
    # the weights and 1 MB more
    torch.cuda.set_per_process_memory_fraction((torch.cuda.memory_allocated() + 2**20) / total)
    try:
        with pytest.raises(JobError) as failed:
            separated(Engine(small, CUDA, batch=2), mix)
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)
        torch.cuda.empty_cache()
    assert failed.value.code == "device_out_of_memory"
