#!/usr/bin/env python3
"""What the outputs of issue 14 cost, without the model: prints JSON.

- `analysis_s_per_output`: peaks + loudness (both meters) per output for AUDIO_S of music,
  fed in the engine's block size, against `encode_s_per_output` (LAME alone) on the same blocks.
- `encode_wall_s`: 2 (karaoke) vs 6 vs 7 outputs encoded concurrently, with and without
  analysis, as a job's encoder threads do it.
Usage: PYTHONPATH=. python hack/bench_outputs.py [AUDIO_S]
"""

import json
import sys
import tempfile
import time
from pathlib import Path


from job.config import Settings
from job.encode import StemEncoder, open_encoders
from job.loudness import LoudnessMeter
from job.messages import OUTPUTS, STEMS
from job.peaks import Peaks
from job.synthetic import music

BLOCK = int(7.8 * 0.75 * 44100)          # about one engine window's worth of new samples


def blocks(mix):
    return [mix[:, i:i + BLOCK] for i in range(0, mix.shape[1], BLOCK)]


def timed(fn):
    started = time.perf_counter()
    fn()
    return round(time.perf_counter() - started, 3)


def analysis_only(parts):
    peaks, meter = Peaks(), LoudnessMeter()
    for block in parts:
        peaks.add(block)
        meter.add(block)
    peaks.result()
    meter.result()


def encode(folder, parts, outputs, analysis):
    settings = Settings(output_analysis=analysis)
    encoders = open_encoders(folder, outputs, settings)
    for block in parts:
        for encoder in encoders.values():
            encoder.put(block)
    for encoder in encoders.values():
        encoder.finish()


def main():
    seconds = float(sys.argv[1]) if len(sys.argv) > 1 else 60.0
    parts = blocks(music(seconds, seed=7))
    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        lame = StemEncoder(folder / "one.mp3")
        result = {
            "audio_s": seconds,
            "analysis_s_per_output": timed(lambda: analysis_only(parts)),
            "encode_s_per_output": timed(lambda: [lame.put(b) for b in parts] and lame.finish()),
            "encode_wall_s": {
                f"{len(outputs)}_outputs_{'with' if analysis else 'without'}_analysis":
                    timed(lambda: encode(folder, parts, outputs, analysis))
                for outputs in (("vocals", "instrumental"), STEMS, OUTPUTS)
                for analysis in (False, True)},
        }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
