"""The measured parts of hack/bench, each run in its own process.

`python hack/bench_parts.py PART ...`

Kept apart so that every figure comes from a fresh process: peak RSS (wait4) and timings do
not include what another part allocated or warmed up.
"""

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch


def decoded(path):
    """The input as a (2, n) float tensor through our decoder (the same samples every part sees)."""
    from job.audio.decode import RawReader, decode_to_file

    audio = decode_to_file(path, Path(path).with_suffix(".f32"), 1e6)
    return torch.from_numpy(RawReader(audio).read(0, audio.length).copy())


def reference_separation(model, mix):
    """DESIGN.md's reference: normalise, apply_model(split, overlap 0.25), de-normalise."""
    from demucs.apply import apply_model

    ref = mix.mean(0)
    with torch.no_grad():
        out = apply_model(
            model, ((mix - ref.mean()) / ref.std())[None], shifts=0, split=True, overlap=0.25
        )[0]
    return out * ref.std() + ref.mean()


def part_reference(model_dir, audio):
    """Bare reference separation: decoded tensor in, tensors out, no I/O."""
    from demucs.pretrained import get_model

    model = get_model("htdemucs_6s", repo=Path(model_dir))
    mix = decoded(audio)
    start = time.perf_counter()
    reference_separation(model, mix)
    print(json.dumps({"reference_s": time.perf_counter() - start}))


def part_parity(model_dir, audio):
    """SDR of our engine, configured as `stem-job run` configures it (env), vs the reference."""
    from job.config import load_settings
    from job.separation.model import ModelCache, load_model

    settings = load_settings(model_dir=str(model_dir), device="cpu")
    separator = ModelCache(settings).engine()
    model = load_model(settings.model_name, settings.model_dir)  # the same weights, for demucs
    mix = decoded(audio)
    expected = reference_separation(model, mix).numpy()
    got = np.zeros(expected.shape, np.float32)

    def emit(position, block):
        got[..., position : position + block.shape[-1]] = block

    mono = mix.mean(0)
    separator.separate(
        lambda a, b: _read(mix, a, b), mix.shape[1], float(mono.mean()), float(mono.std()), emit
    )
    print(
        json.dumps(
            {
                "parity_db": {
                    name: float(
                        10
                        * np.log10(
                            (expected[i] ** 2).sum()
                            / max(((expected[i] - got[i]) ** 2).sum(), 1e-30)
                        )
                    )
                    for i, name in enumerate(model.sources)
                }
            }
        )
    )


def _read(mix, start, stop):
    block = np.zeros((2, stop - start), np.float32)
    lo, hi = max(start, 0), min(stop, mix.shape[1])
    block[:, lo - start : hi - start] = mix[:, lo:hi].numpy()
    return block


def part_seed_style(model_dir, audio, folder):
    """The original worker's way: demucs (ffmpeg CLI decode), six WAVs, then six ffmpeg MP3s
    in turn."""
    import soundfile
    from demucs.audio import AudioFile
    from demucs.pretrained import get_model

    model = get_model("htdemucs_6s", repo=Path(model_dir))
    mix = AudioFile(audio).read(
        streams=0, samplerate=model.samplerate, channels=model.audio_channels
    )
    stems = reference_separation(model, mix)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for name, stem in zip(model.sources, stems, strict=False):
        wav = folder / f"{name}.wav"
        soundfile.write(wav, stem.clamp(-1, 1).numpy().T, model.samplerate, subtype="PCM_16")
        subprocess.run(
            [
                "ffmpeg",
                "-y",
                "-loglevel",
                "error",
                "-i",
                str(wav),
                "-b:a",
                "320k",
                str(folder / f"{name}.mp3"),
            ],
            check=True,
        )


if __name__ == "__main__":
    name, *args = sys.argv[1:]
    if name == "reference":
        part_reference(*args)
    elif name == "parity":
        part_parity(*args)
    elif name == "seed_style":
        part_seed_style(*args)
