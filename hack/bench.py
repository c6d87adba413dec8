"""Speed and memory of stem-job against the demucs reference, measured in one run.

Prints a short table, then one JSON object (last line). See `hack/bench --help`.
`--floor`, `--batch N` and `--encoders` measure the CPU side instead (hack/bench_floor.py).
Every part runs in a fresh process on the same synthesised input; the full-size
htdemucs_6s architecture with seeded random weights does the released model's compute.
"""

import argparse
import ctypes.util
import json
import os
import shutil
import sys
from pathlib import Path
from statistics import median

import soundfile

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))
import bench_floor  # noqa: E402
from synthetic import music, write_audio, write_model_folder  # noqa: E402

PY = sys.executable


def timed(cmd, env=None, watch_for=None):
    """(wall seconds, peak RSS MB, seconds until `watch_for` appeared on stderr, stdout)."""
    wall, usage, seen, stdout = bench_floor.run_process(cmd, env, watch_for)
    return wall, usage.ru_maxrss / 1024, seen, stdout


def long_wav(path, minutes, seed=3):
    """A long input written a minute at a time (the bench itself stays small)."""
    minute = music(60, seed=seed)
    with soundfile.SoundFile(path, "w", 44100, 2, subtype="PCM_16") as out:
        for _ in range(int(minutes)):
            out.write(minute.T)
    return path


def job_env(model_dir, device):
    env = dict(
        os.environ, MODEL_DIR=str(model_dir), DEVICE=device, LOG_FORMAT="json", STORAGE_MODE="local"
    )
    for key in ("JOB_MESSAGE", "ORIGINAL_STEM_URI", "GCP_PROJECT_ID"):
        env.pop(key, None)
    return env


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--seconds", type=float, default=60, help="speed input length")
    parser.add_argument("--long-minutes", type=int, default=30, help="long input for memory")
    parser.add_argument(
        "--repeat",
        type=int,
        default=3,
        help="alternated runs of the reference and ours (the median is kept)",
    )
    parser.add_argument("--quick", action="store_true", help="20 s and 5 min, for development")
    parser.add_argument("--work", default=str(REPO / ".bench"))
    parser.add_argument(
        "--floor",
        action="store_true",
        help="end to end with a zero-cost model (3-minute input): the CPU floor",
    )
    parser.add_argument(
        "--compare",
        metavar="TREE",
        help="with --floor: alternate with the job package of another checkout (--batch: "
        "the same batch with it too)",
    )
    parser.add_argument("--quality", type=int, default=5, help="MP3_QUALITY of the floor runs")
    parser.add_argument(
        "--batch",
        type=int,
        metavar="N",
        help="N short tracks in one drain (emulators) vs one run alone",
    )
    parser.add_argument("--batch-model", default="full", choices=["floor", "small", "full"])
    parser.add_argument(
        "--batch-seconds", type=float, help="length of each --batch track (default 12, quick 6)"
    )
    parser.add_argument(
        "--encoders", action="store_true", help="LAME speed and fidelity per quality setting"
    )
    args = parser.parse_args()
    if args.floor or args.batch or args.encoders:
        return cpu_side(args)
    if args.quick:
        args.seconds, args.long_minutes = 20, 5
    if not shutil.which("ffmpeg"):
        sys.exit(
            "hack/bench needs the ffmpeg command line for the seed-style baseline "
            "(apt-get install ffmpeg)"
        )
    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    full = write_model_folder(work / "model-full", size="full")
    small = write_model_folder(work / "model-small", size="small")
    song = write_audio(work / "song.mp3", music(args.seconds, seed=1))
    parts = [PY, str(HERE / "bench_parts.py")]
    figures = bench_floor.cpu_flags()  # every figure is quoted with the host it ran on

    # 0. what the image build does once (stem-job prefetch-model): export the CPU network
    env = job_env(full, args.device)
    figures["prefetch_s"], _, _, _ = timed([PY, "-m", "job", "prefetch-model"], env)

    # 1. parity: the reference and our engine (as `run` configures it) on the same tensors
    _, _, _, out = timed(parts + ["parity", str(full), str(song)], env)
    figures["parity_db_min"] = min(json.loads(out.strip().splitlines()[-1])["parity_db"].values())

    # 2. the original worker's way, process start to exit
    figures["seed_style_s"], _, _, _ = timed(
        parts + ["seed_style", str(full), str(song), str(work / "seed-out")]
    )

    # 3. the bare reference and ours end to end, alternated: the machine's speed drifts
    references, ours = [], []

    def run(name, path=song):  # a new track ID each time: a completed set would be reused
        return [
            PY,
            "-m",
            "job",
            "run",
            "--input",
            str(path),
            "--release-id",
            "bench",
            "--track-id",
            name,
            "--output-dir",
            str(work / "out"),
        ]

    for number in range(args.repeat):
        _, _, _, out = timed(parts + ["reference", str(full), str(song)])
        references.append(json.loads(out.strip().splitlines()[-1])["reference_s"])
        wall, rss, first, out = timed(run(f"song{number}"), env, "first window entering the model")
        result = json.loads(out.strip().splitlines()[-1])
        assert result["status"] == "completed", result
        ours.append((wall, first, result["timings"]))
        figures["rss_full_model_mb"] = max(rss, figures.get("rss_full_model_mb", 0))
    figures["ours_glibc_malloc_s"] = timed(run("glibc"), env | {"STEM_JOB_MALLOC": "system"})[0]
    wall = median(o[0] for o in ours)
    _, first, timings = min(ours, key=lambda o: abs(o[0] - wall))  # the most typical run
    figures.update(
        reference_s=median(references),
        ours_s=wall,
        cold_start_s=first,
        rtf=args.seconds / wall,
        ours_timings=timings,
        device=result["device"],
        reference_runs_s=references,
        ours_runs_s=[o[0] for o in ours],
    )

    # 4. peak RSS with the small model: 1 minute and the long input, ours and the reference
    one = long_wav(work / "one.wav", 1)
    many = long_wav(work / "long.wav", args.long_minutes)
    timed([PY, "-m", "job", "prefetch-model"], job_env(small, args.device))
    for label, path in (("1min", one), ("30min", many)):
        figures[f"rss_{label}_mb"] = timed(run(f"rss{label}", path), job_env(small, args.device))[1]
        figures[f"reference_rss_{label}_mb"] = timed(parts + ["reference", str(small), str(path)])[
            1
        ]

    if args.device == "cuda":
        import torch

        figures["device"] = torch.cuda.get_device_name(0)
    figures["ratio_ours_reference"] = figures["ours_s"] / figures["reference_s"]
    figures["ratio_ours_seed_style"] = figures["ours_s"] / figures["seed_style_s"]
    figures["rss_ratio"] = figures["rss_30min_mb"] / figures["rss_1min_mb"]
    figures["input_s"], figures["long_input_min"] = args.seconds, args.long_minutes
    figures = {k: round(v, 3) if isinstance(v, float) else v for k, v in figures.items()}
    for key in (
        "reference_s",
        "seed_style_s",
        "ours_s",
        "ratio_ours_reference",
        "ratio_ours_seed_style",
        "parity_db_min",
        "cold_start_s",
        "rtf",
        "rss_1min_mb",
        "rss_30min_mb",
        "rss_ratio",
        "rss_full_model_mb",
        "reference_rss_1min_mb",
        "reference_rss_30min_mb",
        "ours_glibc_malloc_s",
        "device",
        "cpu_model",
        "cpu_flags",
    ):
        print(f"{key:26} {figures[key]}")
    print(json.dumps(figures))


def cpu_side(args):
    """--floor / --batch / --encoders: one JSON object with the host's CPU flags."""
    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    figures = bench_floor.cpu_flags() | {
        "device": args.device,
        "host_load_1min": os.getloadavg()[0],
    }
    base = job_env(work, args.device)
    if ctypes.util.find_library("tcmalloc_minimal") and "tcmalloc" not in base.get(
        "LD_PRELOAD", ""
    ):
        # preloaded as the image does (ENV LD_PRELOAD), so the job does not re-execute itself
        base["LD_PRELOAD"] = " ".join(
            filter(None, ["libtcmalloc_minimal.so.4", base.get("LD_PRELOAD")])
        )
    if args.floor:
        # the same job without the peaks/loudness analysis, and with two outputs (karaoke)
        roots = {
            "ours": (REPO, {}),
            "ours_no_analysis": (REPO, {"OUTPUT_ANALYSIS": "false"}),
            "ours_karaoke": (REPO, {"OUTPUTS": "vocals,instrumental"}),
        }
        if args.compare:
            roots = {"compared": (Path(args.compare).resolve(), {}), **roots}
        figures.update(
            bench_floor.floor(
                work, base, roots, 20 if args.quick else 180, args.repeat, args.quality
            )
        )
        floors = figures["floor"]
        cpu = {label: found["cpu_s_by_part"].get("total") for label, found in floors.items()}
        figures["analysis_cost_cpu_s"] = round(cpu["ours"] - cpu["ours_no_analysis"], 3)
        if args.compare:
            figures["floor_ratio_ours_compared"] = round(
                floors["ours"]["floor_s"] / floors["compared"]["floor_s"], 3
            )
            figures["cpu_ratio_ours_compared"] = round(cpu["ours"] / cpu["compared"], 3)
        print(bench_floor.floor_table(figures))
    if args.encoders:
        figures.update(bench_floor.encoders(10 if args.quick else 30))
        for quality, found in figures["encoders"].items():
            rise = found.get("max_band_rise_db_vs_q5")
            print(f"{quality}: {found['x_realtime_per_core']:6.1f}x real time per core, ", end="")
            print(f"coding noise per band at most {rise:+.2f} dB against q5")
    if args.batch:
        if args.batch_model == "floor":
            model = bench_floor.write_floor_model(work / "model-floor")
        else:
            model = write_model_folder(work / f"model-{args.batch_model}", size=args.batch_model)
        seconds = args.batch_seconds or (6 if args.quick else 12)
        figures.update(bench_floor.batch(work, base, REPO, model, args.batch, seconds))
        if args.compare:  # the same with the other checkout's job package
            compared = bench_floor.batch(
                work / "compared", base, Path(args.compare).resolve(), model, args.batch, seconds
            )
            figures["batch_compared"] = compared["batch"]
    print(json.dumps(figures, indent=1))
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
