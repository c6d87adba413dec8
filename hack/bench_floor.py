"""The CPU side of a deployment, measured end to end: `hack/bench --floor`, `--batch N`,
`--encoders`, and the host's CPU flags that every figure is quoted with.

The floor is a whole `stem-job run` (process start to exit) with a model that costs nothing
(hack/floor/floor_model.py: each source = mix/6), so what it measures is everything a GPU cannot
make faster: start-up, decode, window I/O, overlap-add, the six encoders and their analysis,
manifest, upload, result. It runs as the GPU deployments do (their STORAGE_MODE=gcs and results
topic, on the local stand-ins). The measured process gets hack/floor/sitecustomize.py, which
splits its CPU time by thread and by part.
"""

import json
import os
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from statistics import median

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE / "floor"))
from floor_model import write_floor_model  # noqa: E402

FIRST_WINDOW = '"event": "first_window"'
CPU_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile", "avx512_vnni")


def cpu_flags() -> dict:
    """The model name and the flags that decide the matrix-math paths (bf16 above all)."""
    from job.separation.model import cpu_flags as flags_of
    from job.separation.model import cpu_name, read_cpuinfo

    text = read_cpuinfo()
    flags = flags_of(text)
    return {
        "cpu_model": cpu_name(text),
        "cpus": os.cpu_count(),
        "cpu_flags": sorted(f for f in CPU_FLAGS if f in flags),
    }


def run_process(cmd, env=None, watch_for=None):
    """(wall s, resource usage, s until `watch_for` appeared on stderr, stdout) of one process;
    the bench stops with its last stderr lines if it fails."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    seen, tail = None, []
    for line in proc.stderr:
        tail = (tail + [line])[-20:]
        if watch_for and seen is None and watch_for in line:
            seen = time.perf_counter() - start
    stdout = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        sys.exit(f"failed: {' '.join(map(str, cmd))}\n{''.join(tail)}")
    return wall, usage, seen, stdout


def measured_run(cmd, env, cpu_file: Path, parts_file: Path | None = None):
    """(wall s, first window s, CPU s by thread group, stdout, CPU s by part) of one job
    process; the parts (hack/floor/sitecustomize.py) only with `parts_file`."""
    cpu_file.unlink(missing_ok=True)
    env = dict(env, STEM_BENCH_THREAD_CPU=str(cpu_file))
    if parts_file is not None:
        parts_file.unlink(missing_ok=True)
        env["STEM_BENCH_PARTS"] = str(parts_file)
    wall, usage, first, stdout = run_process(cmd, env, FIRST_WINDOW)
    threads = (
        [json.loads(line) for line in cpu_file.read_text().splitlines()]
        if cpu_file.exists()
        else []
    )
    groups = {}
    for thread in threads:
        group = thread["name"].split("-")[0].split("_")[0]  # encode-drums -> encode
        groups[group] = groups.get(group, 0.0) + thread["cpu_s"]
    total = usage.ru_utime + usage.ru_stime
    groups["main_and_native"] = total - sum(groups.values())
    groups["total"] = total
    parts = None
    if parts_file is not None and parts_file.exists():
        parts = by_part(json.loads(parts_file.read_text()), total)
    return wall, first, {k: round(v, 3) for k, v in groups.items()}, stdout, parts


def by_part(found: dict, total: float) -> dict:
    """CPU seconds by part of one run: start-up (the process until the engine gets the track:
    imports, settings, logging, the model's load), the decoding child, engine I/O (windows read,
    added up, handed on), the encoders (the limiter, 16-bit samples, LAME; LAME alone as
    `lame`), the analysis (peaks, loudness, true peak), the model's forward passes, the upload
    and manifest, and what no part claims (`other`: the threads' hand-offs, the glue)."""
    measured = found["parts"]
    parts = {
        "start_up": found.get("start_up", 0.0),
        "decode": found.get("decode", 0.0),
        "engine_io": measured.get("engine_io", 0.0),
        "encoders": measured.get("encoders", 0.0) + measured.get("lame", 0.0),
        "lame": measured.get("lame", 0.0),
        "analysis": measured.get("analysis", 0.0),
        "model": measured.get("model", 0.0),
        "upload": measured.get("upload", 0.0),
    }
    parts["other"] = total - sum(v for k, v in parts.items() if k != "lame")
    parts["total"] = total
    return parts


def code_env(base: dict, job_root: Path) -> dict:
    """`base` running the job package found in `job_root` (this tree, or another to compare)."""
    return dict(base, PYTHONPATH=os.pathsep.join([str(job_root), str(HERE / "floor")]))


BUCKET = "bench-bucket"


@contextmanager
def stand_ins(work: Path, project: str = "stem-bench"):
    """The deployments' storage and topics, local: fake-gcs-server with the stems bucket and the
    Pub/Sub emulator with a results topic and a work subscription. Yields (the job's env for
    them, the storage client, a function publishing one stem-separate message)."""
    from emulators import (
        GcsEmulator,
        PubSubEmulator,
        ensure_bucket,
        ensure_subscription,
        ensure_topic,
    )

    with (
        PubSubEmulator(work / "pubsub", project).start() as pubsub,
        GcsEmulator(work / "gcs", in_memory=True).start() as gcs,
    ):
        storage = gcs.client(project)
        ensure_bucket(storage, BUCKET)
        topic = ensure_topic(pubsub.publisher, project, "work")
        ensure_subscription(pubsub.subscriber, project, "work-sub", topic, ack_deadline_s=60)
        ensure_topic(pubsub.publisher, project, "results")
        env = (
            pubsub.env
            | gcs.env
            | {
                "STORAGE_MODE": "gcs",
                "GCS_BUCKET": BUCKET,
                "PUBSUB_SUBSCRIPTION": "work-sub",
                "PUBSUB_RESULTS_TOPIC": "results",
            }
        )

        def publish(message: dict) -> None:
            pubsub.publisher.publish(topic, json.dumps(message).encode()).result(timeout=30)

        yield env, storage, publish


def upload(storage, path: Path) -> str:
    """`path` as an original in the stand-in bucket; its gs:// URI."""
    storage.bucket(BUCKET).blob(f"originals/{path.name}").upload_from_filename(str(path))
    return f"gs://{BUCKET}/originals/{path.name}"


def run_command(uri: str, release: str, track: str) -> list:
    return [sys.executable, "-P", "-m", "job", "run", "--input", uri] + [
        "--release-id",
        release,
        "--track-id",
        track,
    ]


def floor(work: Path, base_env: dict, roots: dict, seconds: float, repeat: int, quality: int):
    """Alternated floor runs of each variant in `roots` ({label: (code tree, extra env)}), each
    as the deployments run it: the original in the stand-in bucket, the stems uploaded there,
    the result published; the median run each."""
    from synthetic import music, write_audio

    model = write_floor_model(work / "model-floor")
    song = write_audio(work / f"floor-{int(seconds)}s.mp3", music(seconds, seed=5))
    runs = {label: [] for label in roots}
    with stand_ins(work) as (cloud_env, storage, _):
        uri = upload(storage, song)
        for number in range(repeat):
            for label, (root, extra) in roots.items():
                env = code_env(base_env | cloud_env, root) | {
                    "MODEL_DIR": str(model),
                    "MP3_QUALITY": str(quality),
                    **extra,
                }
                wall, first, cpu, out, parts = measured_run(
                    run_command(uri, "floor", f"{label}{number}"),
                    env,
                    work / "thread-cpu.jsonl",
                    work / "parts.json",
                )
                result = json.loads(out.strip().splitlines()[-1])
                assert result["status"] == "completed", result
                runs[label].append((wall, first, cpu, result["timings"], parts))
    figures = {}
    for label, found in runs.items():
        wall = median(r[0] for r in found)
        typical = min(found, key=lambda r: abs(r[0] - wall))
        extra = roots[label][1]
        outputs = len(extra["OUTPUTS"].split(",")) if "OUTPUTS" in extra else 6
        parts = [r[4] for r in found if r[4] is not None]
        cpu = {key: round(median(p[key] for p in parts), 3) for key in parts[0]} if parts else {}
        lame = cpu.get("lame")
        figures[label] = {
            "floor_s": round(wall, 3),
            "floor_rtf": round(seconds / wall, 2),
            "first_window_s": round(median(r[1] for r in found), 3),
            "floor_runs_s": [round(r[0], 3) for r in found],
            # CPU seconds of the whole process and its children, by part (medians of the runs,
            # each part's own: they need not add up to the median total exactly)
            "cpu_s_by_part": cpu,
            "cpu_s_runs": [round(r[2]["total"], 3) for r in found],
            "cpu_s_by_thread": typical[2],
            "timings": typical[3],
            "outputs": outputs,
            "lame_x_realtime_per_core": round(outputs * seconds / lame, 1) if lame else None,
        }
    return {"floor_input_s": seconds, "mp3_quality_asked": quality, "floor": figures}


def floor_table(figures: dict) -> str:
    """The floor's CPU seconds by part, one column per variant, and the first window."""
    floors = figures["floor"]
    keys = list(next(iter(floors.values()))["cpu_s_by_part"])
    lines = [f"{'CPU s by part':16}" + "".join(f"{label:>18}" for label in floors)]
    for key in keys:
        row = "".join(f"{found['cpu_s_by_part'].get(key, 0):18.2f}" for found in floors.values())
        lines.append(f"{key:16}{row}")
    row = "".join(f"{found['first_window_s']:18.2f}" for found in floors.values())
    lines.append(f"{'first window s':16}{row}")
    return "\n".join(lines)


# -- encoders: LAME's quality setting, speed against fidelity ---------------------------------
def _bark_bands(rate: int, size: int):
    """FFT bin ranges of the 24 critical bands (Zwicker), for a per-band error measure."""
    edges = [
        0,
        100,
        200,
        300,
        400,
        510,
        630,
        770,
        920,
        1080,
        1270,
        1480,
        1720,
        2000,
        2320,
        2700,
        3150,
        3700,
        4400,
        5300,
        6400,
        7700,
        9500,
        12000,
        15500,
        20000,
    ]
    freqs = np.fft.rfftfreq(size, 1 / rate)
    return [
        (int(np.searchsorted(freqs, lo)), int(np.searchsorted(freqs, hi)))
        for lo, hi in zip(edges[:-1], edges[1:], strict=False)
    ]


def band_noise_to_signal(
    reference: np.ndarray, decoded: np.ndarray, rate: int = 44100, size: int = 2048
) -> dict:
    """Coding noise against the signal per critical band, frame by frame (an NMR-style measure).

    Plain SNR is dominated by the loud low bands, where LAME at 320 kbps is nearly transparent;
    the audible differences between its quality settings are in the weak high bands. So the
    error is measured band by band, relative to that band's own energy in that frame (a crude
    mask): per band the mean over frames (`band_nsr_db`, the figure a setting must not raise),
    and over frames and bands the mean and the worst decile.
    """
    window = np.hanning(size).astype(np.float32)
    starts = np.arange(0, reference.shape[-1] - size, size // 2)
    frames = starts[:, None] + np.arange(size)
    ref = np.fft.rfft(reference[..., frames] * window, axis=-1)  # (channels, frames, bins)
    err = np.fft.rfft((decoded - reference)[..., frames] * window, axis=-1)
    per_band, everything = [], []
    for lo, hi in _bark_bands(rate, size):
        signal = (np.abs(ref[..., lo:hi]) ** 2).sum((0, 2))
        noise = (np.abs(err[..., lo:hi]) ** 2).sum((0, 2))
        heard = signal > 1e-9 * size  # skip silent bands: no mask, nothing to hear
        ratios = 10 * np.log10(np.maximum(noise[heard], 1e-20) / signal[heard])
        per_band.append(round(float(ratios.mean()), 2) if ratios.size else None)
        everything.append(ratios)
    everything = np.concatenate(everything)
    return {
        "band_nsr_mean_db": round(float(everything.mean()), 2),
        "band_nsr_worst10_db": round(float(np.percentile(everything, 90)), 2),
        "band_nsr_db": per_band,
    }


def stem_like(seconds: float, rate: int = 44100) -> dict:
    """Stem-like test material, each near -3 dBFS: the music-like mix, a drum stem (kick and
    noise bursts: transients), a bass stem (a filtered sawtooth) and a voice-like stem (a
    gliding tone with harmonics and vibrato): LAME's settings differ most on transients and
    on tonal stems."""
    from synthetic import music

    rng = np.random.default_rng(11)
    t = np.arange(int(seconds * rate)) / rate
    beat = (t * 2) % 1.0
    kick = np.sin(2 * np.pi * 50 * t * (1 + 3 * np.exp(-beat * 40))) * np.exp(-beat * 10)
    snare = rng.standard_normal(t.size) * np.exp(-((t * 2 + 0.5) % 1.0) * 25)
    saw = 2 * ((t * 55 * (1 + (t // 4 % 2) * 0.25)) % 1.0) - 1
    bass = np.convolve(saw, np.ones(8) / 8, "same")
    pitch = 220 * 2 ** ((np.floor(t * 2) % 5) / 12) * (1 + 0.01 * np.sin(2 * np.pi * 5.5 * t))
    phase = 2 * np.pi * np.cumsum(pitch) / rate
    voice = sum(np.sin(k * phase) / k for k in range(1, 8)) * (0.5 + 0.5 * np.sin(np.pi * t) ** 2)
    material = {
        "mix": music(seconds, seed=11).astype(np.float64),
        "drums": np.stack([kick + 0.4 * snare, kick + 0.5 * snare]),
        "bass": np.stack([bass, bass]),
        "vocals": np.stack([voice, 0.9 * voice]),
    }
    return {
        name: (0.7 * audio / np.abs(audio).max()).astype(np.float32)
        for name, audio in material.items()
    }


def encoders(
    seconds: float, qualities=range(10), bitrate: int = 320, repeat: int = 3, shipped: int = 5
) -> dict:
    """Speed (x real time per core, thread CPU time, on the mix) and fidelity of LAME per
    quality on stem-like material (`stem_like`), decoded back gapless. Per quality, how much
    its coding noise per critical band rises against the shipped quality (MP3_QUALITY's
    default) at most, over the bands and the materials: a setting that raises it by more
    than half a decibel anywhere makes a stem measurably worse."""
    import lameenc

    from job.audio.mp3 import Mp3Writer
    from job.pcm import to_pcm16

    material = stem_like(seconds)
    table = {}
    for quality in qualities:
        speeds = []
        pcm = to_pcm16(material["mix"])
        for _ in range(repeat):
            encoder = lameenc.Encoder()
            encoder.set_bit_rate(bitrate)
            encoder.set_in_sample_rate(44100)
            encoder.set_channels(2)
            encoder.set_quality(quality)
            started = time.thread_time()
            for block in range(0, len(pcm), 44100 * 6):
                encoder.encode(pcm[block : block + 44100 * 6].tobytes())
            encoder.flush()
            speeds.append(seconds / (time.thread_time() - started))
        table[f"q{quality}"] = {"x_realtime_per_core": round(median(speeds), 1)}
        for name, audio in material.items():
            path = Path(f"/tmp/bench-q{quality}-{os.getpid()}.mp3")
            writer = Mp3Writer(path, bitrate, quality)  # gapless: decodes to the exact length
            writer.write(to_pcm16(audio))
            writer.close()
            decoded = _decode(path)
            path.unlink()
            n = min(decoded.shape[-1], audio.shape[-1])
            table[f"q{quality}"][name] = band_noise_to_signal(audio[:, :n], decoded[:, :n])
    reference = table.get(f"q{shipped}")
    for found in table.values() if reference else ():
        rises = [
            now - then
            for name in material
            for now, then in zip(
                found[name]["band_nsr_db"], reference[name]["band_nsr_db"], strict=True
            )
            if now is not None and then is not None
        ]
        found[f"max_band_rise_db_vs_q{shipped}"] = round(max(rises), 2)
    return {
        "encoder_input_s": seconds,
        "encoder_bitrate_kbps": bitrate,
        "encoder_materials": list(material),
        "encoders": table,
    }


def _decode(path: Path) -> np.ndarray:
    """An MP3 decoded by FFmpeg (PyAV), trimmed by its Info frame like players do."""
    import av

    with av.open(str(path)) as container:
        frames = [frame.to_ndarray() for frame in container.decode(audio=0)]
    data = np.concatenate(frames, axis=-1)
    return data.reshape(2, -1) if data.shape[0] == 1 else data


# -- a drain batch against the local stand-ins ----------------------------------------------
def batch(
    work: Path, base_env: dict, job_root: Path, model_dir: Path, tracks: int, seconds: float
) -> dict:
    """N tracks in one `drain` vs one `run` alone, both against the stand-ins. The drain's
    per-track wall against the run's CPU seconds says whether both cores stay busy in a batch
    (0.5 on two cores: the CPU side of one track overlaps the next one's, nothing waits on the
    GIL)."""
    from synthetic import music, write_audio

    work.mkdir(parents=True, exist_ok=True)
    songs = [
        write_audio(work / f"batch{i}.mp3", music(seconds, seed=20 + i)) for i in range(tracks)
    ]
    env = code_env(base_env, job_root) | {"MODEL_DIR": str(model_dir)}
    # as an image build does: the model checked, and a bf16 CPU's fp32 check recorded, so that
    # neither the run alone nor the drain pays for that check (job/separation/precision.py)
    run_process([sys.executable, "-m", "job", "prefetch-model"], env)
    with stand_ins(work) as (cloud_env, storage, publish):
        env = env | cloud_env
        uris = [upload(storage, song) for song in songs]
        # alone: one track, process start to exit
        wall_alone, first_alone, cpu_alone, out, _ = measured_run(
            run_command(uris[0], "alone", "t0"), env, work / "thread-cpu.jsonl"
        )
        alone = json.loads(out.strip().splitlines()[-1])
        for i, uri in enumerate(uris):
            publish(
                {
                    "jobId": f"job{i}",
                    "releaseId": "rel",
                    "trackId": f"trk{i}",
                    "artistId": "a",
                    "originalStemUri": uri,
                    "mimeType": "audio/mpeg",
                }
            )
        drain_env = env | {"MAX_MESSAGES": str(tracks), "IDLE_TIMEOUT_S": "5"}
        wall, first, cpu, _, _ = measured_run(
            [sys.executable, "-P", "-m", "job", "drain"], drain_env, work / "thread-cpu.jsonl"
        )
        done = [
            b
            for b in storage.list_blobs(BUCKET, prefix="stems/rel/")
            if b.name.endswith("manifest.json")
        ]
        assert len(done) == tracks, f"{len(done)} of {tracks} tracks completed"
    # the drain's wall ends with an idle pull (IDLE_TIMEOUT_S) only when the queue runs dry
    # before MAX_MESSAGES; here it does not, so wall - first window is the tracks' time
    per_track = (wall - first) / tracks
    return {
        "batch": {
            "tracks": tracks,
            "track_s": seconds,
            "drain_wall_s": round(wall, 3),
            "drain_first_window_s": round(first, 3),
            "per_track_in_batch_s": round(per_track, 3),
            "alone_run_wall_s": round(wall_alone, 3),
            "alone_run_cpu_s": cpu_alone["total"],
            "alone_first_window_s": round(first_alone, 3),
            "alone_separate_s": alone["timings"]["separate"],
            "ratio_batch_per_track_to_separate": round(per_track / alone["timings"]["separate"], 3),
            "ratio_batch_per_track_to_alone_run": round(per_track / wall_alone, 3),
            "ratio_batch_per_track_to_alone_cpu": round(per_track / cpu_alone["total"], 3),
            "drain_cpu_s": cpu,
        }
    }
