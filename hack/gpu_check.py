"""hack/gpu-check: everything a first GPU machine should tell us, as one JSON object.

1. the CUDA tests (hack/gpu_tests) under pytest;
2. bf16 and fp16 against fp32 on the full-size architecture (job.synthetic "full", seeded),
   with the time per window and the peak device memory per window at batch 1 and 2 (what
   model.WINDOW_MB should be);
3. hack/bench --device cuda --floor --batch 5 (the floor, and a drain batch with the full model).
A step that fails is recorded with its error; the others still run.
"""

import json
import os
import subprocess
import sys
import time
import traceback
from pathlib import Path

HACK = Path(__file__).resolve().parent
REPO = HACK.parent
sys.path.insert(0, str(REPO))


def step(figures, name, function):
    started = time.perf_counter()
    try:
        figures[name] = function()
    except Exception:          # recorded, not fatal: the other figures are still worth having
        figures[name] = {"error": traceback.format_exc()[-2000:]}
    figures.setdefault("step_seconds", {})[name] = round(time.perf_counter() - started, 1)
    print(f"gpu-check: {name} done", file=sys.stderr, flush=True)


def cuda_tests():
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           str(HACK / "gpu_tests")], cwd=REPO, capture_output=True, text=True,
                          env=dict(os.environ, PYTHONPATH=str(REPO)))
    return {"exit_code": proc.returncode, "summary": proc.stdout.strip().splitlines()[-1:],
            "failures": proc.stdout[-3000:] if proc.returncode else ""}


def parity_full(size="full", device="cuda"):
    import numpy as np
    import torch
    from job.engine import Separator, agreement_db
    from job.synthetic import build_model, music
    sys.path.insert(0, str(REPO / "tests"))
    from test_precision import separated
    model = build_model(size)[0]
    cuda = device == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    mix = music(7.8 * 4, seed=9)
    runs = {}
    for batch in (1, 2):
        for precision in ("fp32", "bf16", "fp16"):
            sync()
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            separator = Separator(model, torch.device(device), batch=batch, precision=precision)
            separated(separator, mix[:, :44100 * 8])          # warm-up (cuDNN, allocator)
            sync()
            started = time.perf_counter()
            out, stats = separated(separator, mix)
            sync()
            windows = len(range(0, mix.shape[1], int(0.75 * 7.8 * 44100)))
            runs[(batch, precision)] = out
            runs[f"b{batch}_{precision}"] = {
                "s_per_window": round((time.perf_counter() - started) / windows, 4),
                "peak_mb": round(torch.cuda.max_memory_allocated() / 2**20) if cuda else None,
                "fallback_windows": stats["fp32FallbackWindows"],
                "finite": bool(np.isfinite(out).all())}
    figures = {k: v for k, v in runs.items() if isinstance(k, str)}
    for precision in ("bf16", "fp16"):
        figures[f"parity_{precision}_vs_fp32_db"] = round(
            agreement_db(runs[(1, "fp32")][None], runs[(1, precision)][None]), 2)
    figures["parity_batch2_vs_batch1_fp32_db"] = round(
        agreement_db(runs[(1, "fp32")][None], runs[(2, "fp32")][None]), 2)
    if cuda:
        figures["device_name"] = torch.cuda.get_device_name(0)
        figures["device_memory_mb"] = round(torch.cuda.get_device_properties(0).total_memory / 2**20)
    return figures


def bench():
    proc = subprocess.run([str(HACK / "bench"), "--device", "cuda", "--floor", "--batch", "5",
                           "--repeat", "3"], cwd=REPO, capture_output=True, text=True)
    if proc.returncode:
        return {"exit_code": proc.returncode, "stderr": proc.stderr[-3000:]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main():
    import torch
    if sys.argv[1:] == ["--cpu-smoke"]:      # the parity step's code on the small model, on CPU
        print(json.dumps(parity_full("small", "cpu")))
        return
    figures = {"cuda_available": torch.cuda.is_available(), "torch": torch.__version__}
    if not figures["cuda_available"]:
        print(json.dumps(figures | {"error": "no CUDA device: nothing to check"}))
        sys.exit(1)
    step(figures, "cuda_tests", cuda_tests)
    step(figures, "parity_full", parity_full)
    step(figures, "bench", bench)
    print(json.dumps(figures))
    sys.exit(0 if figures["cuda_tests"].get("exit_code") == 0 else 1)


if __name__ == "__main__":
    main()
