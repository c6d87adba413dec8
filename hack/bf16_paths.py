"""Per-window speed and fp32 agreement of the ways to run htdemucs_6s in bf16 on a CPU.

Development measurement for the engine's CPU precision choice (not part of hack/bench):
the full-size architecture with seeded weights, one music-like 7.8 s window, every variant
alternated round by round (the machine is shared): medians of wall and process CPU seconds
(less sensitive to other processes), and the median of each round's wall ratio to fp32.
`python hack/bf16_paths.py [--rounds N] [--only a,b]`.
"""

import argparse
import sys
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path
from statistics import median

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from synthetic import music, write_model_folder  # noqa: E402

from job.separation.engine import agreement_db  # noqa: E402
from job.separation.model import cpu_flags, load_model  # noqa: E402
from job.separation.precision import bf16_copy  # noqa: E402


@contextmanager
def mkldnn_bf32():
    old = torch.backends.mkldnn.matmul.fp32_precision, torch.backends.mkldnn.conv.fp32_precision
    torch.backends.mkldnn.matmul.fp32_precision = "bf16"
    torch.backends.mkldnn.conv.fp32_precision = "bf16"
    try:
        yield
    finally:
        torch.backends.mkldnn.matmul.fp32_precision, torch.backends.mkldnn.conv.fp32_precision = old


def math_sdpa():
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel(SDPBackend.MATH)


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--only", default="")
    parser.add_argument("--model", default="/tmp/bf16-paths-model")
    args = parser.parse_args()
    folder = Path(args.model)
    if not (folder / "htdemucs_6s.yaml").exists():
        write_model_folder(folder, size="full")
    model = load_model("htdemucs_6s", str(folder)).models[0]
    torch.backends.mha.set_fastpath_enabled(False)  # as the engine
    blocks = bf16_copy(model)
    blocks_cl = bf16_copy(model).to(memory_format=torch.channels_last)
    autocast = lambda: torch.autocast("cpu", dtype=torch.bfloat16)  # noqa: E731
    variants = {
        "fp32": (model, nullcontext),
        "autocast": (model, autocast),
        "autocast+math_sdpa": (model, lambda: _both(autocast(), math_sdpa())),
        "autocast+bf16_weights": (blocks, autocast),
        "bf16_blocks": (blocks, nullcontext),
        "bf16_blocks+math_sdpa": (blocks, math_sdpa),
        "bf16_blocks+channels_last": (blocks_cl, nullcontext),
        "fp32+mkldnn_bf16_math": (model, mkldnn_bf32),
    }
    if args.only:
        variants = {k: v for k, v in variants.items() if k in args.only.split(",")}
    segment = int(model.samplerate * model.segment)
    mix = music(8.0, seed=1)[:, :segment]
    x = torch.from_numpy((mix - mix.mean()) / mix.std())[None]
    flags = sorted(f for f in cpu_flags() if "avx512" in f or "amx" in f)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, flags {' '.join(flags)}")

    def run(name):
        net, context = variants[name]
        with torch.inference_mode(), context():
            start, cpu = time.perf_counter(), time.process_time()
            out = net(x).float()
            return (time.perf_counter() - start, time.process_time() - cpu), out.numpy()

    outputs, times, cpus = {}, {name: [] for name in variants}, {name: [] for name in variants}
    for name in variants:  # warm-up, and the output for parity
        outputs[name] = run(name)[1]
    for number in range(args.rounds):
        order = list(variants) if number % 2 == 0 else list(reversed(variants))
        for name in order:
            wall, cpu = run(name)[0]
            times[name].append(wall)
            cpus[name].append(cpu)
        print(f"round {number + 1} done", flush=True)
    print(
        f"{'variant':28} {'wall ms':>8} {'cpu ms':>8} {'ratio':>6} {'cpu ratio':>9} "
        f"{'parity dB':>9}  wall runs ms"
    )
    for name in variants:
        ms, cpu = median(times[name]) * 1000, median(cpus[name]) * 1000
        ratio = cpu_ratio = "-"
        if "fp32" in variants:
            ratio = f"{median(t / f for t, f in zip(times[name], times['fp32'], strict=False)):.2f}"
            cpu_ratio = (
                f"{median(t / f for t, f in zip(cpus[name], cpus['fp32'], strict=False)):.2f}"
            )
        db = agreement_db(outputs["fp32"], outputs[name]) if "fp32" in outputs else float("nan")
        runs = " ".join(f"{t * 1000:.0f}" for t in times[name])
        print(f"{name:28} {ms:8.0f} {cpu:8.0f} {ratio:>6} {cpu_ratio:>9} {db:9.1f}  {runs}")


@contextmanager
def _both(first, second):
    with first, second:
        yield


if __name__ == "__main__":
    main()
