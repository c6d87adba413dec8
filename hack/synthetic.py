"""Seeded stand-ins for what cannot be downloaded here: models and music-like audio.

`write_model_folder` saves an HTDemucs with htdemucs_6s' sources and seeded random
weights as a demucs local repo (NAME.yaml + SIG.th), loaded by the same `get_model(name,
repo=...)` path as the released model. "full" has the released architecture (same compute),
"small" is the fast model the tests use (same 7.8 s windows). Used by tests and hack/bench.
"""

from fractions import Fraction
from pathlib import Path

import numpy as np
import torch

from job.pcm import SAMPLE_RATE
from job.separation.precision import music  # noqa: F401  (one definition: the probe signal)

SOURCES = ["drums", "bass", "other", "vocals", "guitar", "piano"]
ARCHITECTURES = {
    "full": {"bottom_channels": 512, "dconv_mode": 3, "t_layers": 5},
    "small": {"channels": 8, "depth": 4, "t_layers": 1, "t_heads": 2},
}


def build_model(size: str = "small", seed: int = 0):
    from demucs.htdemucs import HTDemucs

    torch.manual_seed(seed)
    kwargs = dict(sources=SOURCES, segment=Fraction(39, 5), **ARCHITECTURES[size])
    return HTDemucs(**kwargs).eval(), kwargs


def write_model_folder(
    folder, name: str = "htdemucs_6s", size: str = "small", seed: int = 0
) -> Path:
    """A demucs local repo holding `name` (a bag of one seeded model)."""
    from demucs.htdemucs import HTDemucs

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model, kwargs = build_model(size, seed)
    signature = f"synthetic{size}{seed}"
    torch.save(
        {"klass": HTDemucs, "args": (), "kwargs": kwargs, "state": model.state_dict()},
        folder / f"{signature}.th",
    )
    (folder / f"{name}.yaml").write_text(f"models: ['{signature}']\n")
    return folder


def write_audio(
    path,
    audio: np.ndarray,
    rate: int = SAMPLE_RATE,
    codec: str | None = None,
    channels: int | None = None,
) -> Path:
    """Encode (2, n) float audio to `path` with PyAV; the container follows the suffix."""
    import av

    path = Path(path)
    suffix = path.suffix.lower().lstrip(".")
    codec = (
        codec
        or {
            "mp3": "libmp3lame",
            "wav": "pcm_s16le",
            "flac": "flac",
            "ogg": "libopus",
            "opus": "libopus",
            "m4a": "aac",
            "aac": "aac",
        }[suffix]
    )
    if channels == 1:
        audio = audio.mean(axis=0, keepdims=True)
    elif channels and channels > 2:
        audio = np.concatenate([audio, np.repeat(audio.mean(0, keepdims=True), channels - 2, 0)])
    layout = {1: "mono", 2: "stereo", 6: "5.1"}[audio.shape[0]]
    with av.open(str(path), "w", format="ipod" if suffix == "m4a" else None) as container:
        stream = container.add_stream(codec, rate=rate, layout=layout)
        fmt = stream.codec_context.codec.audio_formats[0]
        for start in range(0, audio.shape[1], 8192):
            block = audio[:, start : start + 8192]
            if fmt.name.startswith("s16"):
                block = (np.clip(block, -1, 1) * 32767).astype(np.int16)
            elif fmt.name.startswith("s32"):
                block = (np.clip(block, -1, 1) * 2147483392).astype(np.int32)
            else:
                block = block.astype(np.float32)
            if not fmt.is_planar:
                block = block.T.reshape(1, -1)
            frame = av.AudioFrame.from_ndarray(
                np.ascontiguousarray(block), format=fmt.name, layout=layout
            )
            frame.sample_rate = rate
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)
    return path


def write_long_silence(path, seconds: float, rate: int = 48000) -> Path:
    """A FLAC of digital silence: a few KB on disk that decode for seconds (constant subframes
    cost nothing to store; decoding and resampling every sample still takes its time), so a
    decoder's time budget, which grows with the file's size, is really exceeded."""
    import soundfile

    block = np.zeros((rate * 10, 2), dtype=np.int16)
    with soundfile.SoundFile(str(path), "w", rate, 2, "PCM_16", format="FLAC") as out:
        for _ in range(int(seconds // 10)):
            out.write(block)
    return Path(path)
