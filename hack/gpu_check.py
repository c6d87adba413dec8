"""hack/gpu-check: everything a first GPU machine should tell us, as one JSON object.

1. `cuda_tests`: the CUDA tests (hack/gpu_tests) under pytest;
2. `windows`: on the full-size architecture (hack/synthetic.py "full", seeded), per precision (fp32,
   bf16, fp16) and windows per pass (1, 2, 4), the engine's own peak device memory on a first
   track and a second one, the time per window, and each precision's agreement with fp32; from
   the peaks, the device memory one more window in a pass costs, and the `passes.WINDOW_MB` and
   `HEADROOM_MB` figures that follow (with the batch they give on an L4's free memory);
3. `bench`: `stem-job run` end to end on the device (full-size model, local storage), a
   1-minute and a 5-minute track: wall time, the job's timings and its manifest's `engine`.
A step that fails is recorded with its error; the others still run. With `--out DIR` the JSON
(figures.json) and the CUDA tests' log are written there too. `--cpu-smoke` runs steps 2 and 3
on the CPU with the small model, fewer passes and no fp16: the same code, no device figures
(how the recipe is dry-run).
"""

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

HACK = Path(__file__).resolve().parent
REPO = HACK.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

PRECISIONS = ("fp32", "bf16", "fp16")
BATCHES = (1, 2, 4)
L4_FREE_MB = 22 * 1024  # an L4's 24 GB less the CUDA context and the model's weights
STEP_TIMEOUT_S = 240  # no step may hold the machine longer than this


def step(figures, name, function, out: Path | None):
    """Run one step into `figures`; what has been measured so far is written to `out` after
    each step, so a run stopped by its time limit still leaves its figures."""
    started = time.perf_counter()
    try:
        figures[name] = function()
    except Exception:  # recorded, not fatal: the other figures are still worth having
        figures[name] = {"error": traceback.format_exc()[-2000:]}
    figures.setdefault("step_seconds", {})[name] = round(time.perf_counter() - started, 1)
    print(
        f"gpu-check: {name} done in {figures['step_seconds'][name]} s", file=sys.stderr, flush=True
    )
    if out is not None:
        (out / "figures.json").write_text(json.dumps(figures, indent=1))


def python_env() -> dict:
    """This process's environment, with the repository importable by child processes."""
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    return dict(os.environ, PYTHONPATH=path, PYTHONUNBUFFERED="1")


def cuda_tests(out: Path | None):
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(HACK / "gpu_tests")],
        cwd=REPO,
        capture_output=True,
        text=True,
        env=python_env(),
        timeout=STEP_TIMEOUT_S,
    )
    if out is not None:
        (out / "cuda-tests.log").write_text(proc.stdout + proc.stderr)
    return {
        "exit_code": proc.returncode,
        "summary": proc.stdout.strip().splitlines()[-1:],
        "failures": proc.stdout[-3000:] if proc.returncode else "",
    }


def suggested(per_window_mb: float, fixed_mb: float) -> dict:
    """WINDOW_MB and HEADROOM_MB from measured figures: 10% over, rounded up to 64 MB."""

    def up(mb):
        return int(math.ceil(max(mb, 0) * 1.1 / 64) * 64)

    return {"WINDOW_MB": up(per_window_mb), "HEADROOM_MB": max(up(fixed_mb), 256)}


def windows(size="full", device="cuda", precisions=PRECISIONS, batches=BATCHES):
    """Per precision and pass size: peak device memory (first and second track), time per
    window, agreement with fp32; the per-window memory and the WINDOW_MB it calls for."""
    import numpy as np
    import torch
    from synthetic import build_model, music
    from test_engine_parity import separated

    from job.separation.engine import Engine, agreement_db

    cuda = device == "cuda"
    torch.backends.cudnn.benchmark = True  # as the job runs (separation/model.py)
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    model = build_model(size)[0].to(device)
    resident = torch.cuda.memory_allocated() / 2**20 if cuda else None
    stride = 0.75 * 7.8
    count = 2 * max(batches)  # two passes at the largest size: pipelined
    mix = music(stride * (count - 1) + 7.8 - 0.5, seed=9)
    figures = {
        "size": size,
        "windows_per_track": count,
        "resident_model_mb": None if resident is None else round(resident),
    }
    outputs = {}
    for precision in precisions:
        runs = {}
        for batch in batches:
            print(f"gpu-check: windows {precision}, {batch} per pass", file=sys.stderr, flush=True)
            if cuda:
                torch.cuda.empty_cache()  # no earlier run's cached blocks counted
            separator = Engine(model, torch.device(device), batch=batch, precision=precision)
            first = separated(separator, mix)[1]  # cold: cuDNN picks its kernels
            reserved_first = torch.cuda.max_memory_reserved() / 2**20 if cuda else None
            sync()
            started = time.perf_counter()
            out, second = separated(separator, mix)
            sync()
            runs[batch] = {
                "s_per_window": round((time.perf_counter() - started) / count, 4),
                "peak_first_mb": first["devicePeakMb"],
                "peak_mb": second["devicePeakMb"],
                "reserved_first_mb": None if reserved_first is None else round(reserved_first),
                "reserved_mb": round(torch.cuda.max_memory_reserved() / 2**20) if cuda else None,
                "halvings": first["oomHalvings"] + second["oomHalvings"],
                "fallback_windows": second["fp32FallbackWindows"],
                "finite": bool(np.isfinite(out).all()),
            }
            if batch in (1, max(batches)):
                outputs[(precision, batch)] = out
        entry = {f"batch{b}": r for b, r in runs.items()}
        if cuda:
            # what a pass of one more window costs, and what a pass costs beyond its windows
            peak = {
                b: max(r["peak_first_mb"], r["reserved_first_mb"], r["peak_mb"], r["reserved_mb"])
                - resident
                for b, r in runs.items()
            }
            big = max(batches)
            per_window = (peak[big] - peak[1]) / (big - 1)
            entry.update(
                per_window_mb=round(per_window),
                fixed_mb=round(peak[1] - per_window),
                **suggested(per_window, peak[1] - per_window),
            )
            fits = (L4_FREE_MB - entry["HEADROOM_MB"]) // max(entry["WINDOW_MB"], 1)
            entry["batch_on_l4"] = int(max(1, min(16, fits)))
        entry["vs_fp32_db"] = round(
            agreement_db(outputs[("fp32", 1)][None], outputs[(precision, 1)][None]), 2
        )
        entry[f"batch{max(batches)}_vs_batch1_db"] = round(
            agreement_db(outputs[(precision, 1)][None], outputs[(precision, max(batches))][None]), 2
        )
        figures[precision] = entry
    if cuda:
        figures["WINDOW_MB"] = {p: figures[p]["WINDOW_MB"] for p in precisions}
        figures["HEADROOM_MB"] = max(figures[p]["HEADROOM_MB"] for p in precisions)
        figures["device_name"] = torch.cuda.get_device_name(0)
        figures["device_memory_mb"] = round(
            torch.cuda.get_device_properties(0).total_memory / 2**20
        )
    return figures


def bench(size="full", device="cuda", seconds=(60, 300)):
    """`stem-job run` end to end, one fresh process per track, local storage."""
    from synthetic import music, write_audio, write_model_folder

    figures = {"size": size, "device": device}
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as work:
        work = Path(work)
        env = python_env() | {
            "MODEL_DIR": str(write_model_folder(work / "model", size=size)),
            "DEVICE": device,
            "STORAGE_MODE": "local",
            "LOG_FORMAT": "json",
            "OUTPUT_DIR": str(work / "out"),
        }
        for key in ("JOB_MESSAGE", "ORIGINAL_STEM_URI", "GCP_PROJECT_ID"):
            env.pop(key, None)
        for length in seconds:
            song = write_audio(work / f"song{length}.wav", music(length, seed=length))
            started = time.perf_counter()
            proc = subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "job",
                    "run",
                    "--input",
                    str(song),
                    "--release-id",
                    "bench",
                    "--track-id",
                    f"t{length}",
                ],
                env=env,
                capture_output=True,
                text=True,
                timeout=STEP_TIMEOUT_S,
            )
            wall = time.perf_counter() - started
            if proc.returncode:
                figures[f"run_{length}s"] = {
                    "exit_code": proc.returncode,
                    "stderr": proc.stderr[-2000:],
                }
                continue
            result = json.loads(proc.stdout.strip().splitlines()[-1])
            manifest = json.loads(
                (work / "out" / "bench" / f"t{length}" / "manifest.json").read_text()
            )
            figures[f"run_{length}s"] = {
                "status": result["status"],
                "wall_s": round(wall, 2),
                "rtf": round(length / wall, 2),
                "timings": result.get("timings"),
                "engine": manifest.get("engine"),
            }
    return figures


def main():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, help="also write figures.json (and logs) here")
    parser.add_argument(
        "--cpu-smoke",
        action="store_true",
        help="steps 2 and 3 on the CPU with the small model (no device figures)",
    )
    args = parser.parse_args()
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
    import torch

    figures = {
        "cuda_available": torch.cuda.is_available(),
        "torch": torch.__version__,
        "python": sys.version.split()[0],
    }
    if args.cpu_smoke:
        # fp16 autocast on a CPU is far slower than on any GPU: the smoke leaves it out
        step(
            figures, "windows", lambda: windows("small", "cpu", ("fp32", "bf16"), (1, 2)), args.out
        )
        step(figures, "bench", lambda: bench("small", "cpu", seconds=(20,)), args.out)
    elif not figures["cuda_available"]:
        figures["error"] = "no CUDA device: nothing to check"
    else:
        step(figures, "cuda_tests", lambda: cuda_tests(args.out), args.out)
        step(figures, "windows", windows, args.out)
        step(figures, "bench", bench, args.out)
    text = json.dumps(figures)
    if args.out is not None:
        (args.out / "figures.json").write_text(json.dumps(figures, indent=1))
    print(text)
    failed = [
        name
        for name in ("cuda_tests", "windows", "bench")
        if "error" in figures.get(name, {}) or figures.get(name, {}).get("exit_code")
    ]
    sys.exit(1 if failed or "error" in figures else 0)


if __name__ == "__main__":
    main()
