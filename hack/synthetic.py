"""Seeded stand-ins for what cannot be downloaded here: models and music-like audio.

`write_model_folder` saves demucs models with seeded random weights as a demucs local repo
(NAME.yaml + SIG.th), loaded by the same `get_model(name, repo=...)` path as the released ones:
by default an HTDemucs with htdemucs_6s' sources, "full" with the released architecture (same
compute), "small" the fast model the tests use (same 7.8 s windows). Any sources, a bag of
several models with per-source weights (as htdemucs_ft), and small HDemucs (v3) and Demucs (v2)
models are made the same way. Used by tests and hack/bench.
"""

from fractions import Fraction
from pathlib import Path

import numpy as np
import torch

from job.pcm import SAMPLE_RATE
from job.separation.precision import music  # noqa: F401  (one definition: the probe signal)

SOURCES = ["drums", "bass", "other", "vocals", "guitar", "piano"]
FOUR = ["drums", "bass", "other", "vocals"]  # htdemucs' and htdemucs_ft's sources
ARCHITECTURES = {
    "full": {"bottom_channels": 512, "dconv_mode": 3, "t_layers": 5},
    "small": {"channels": 8, "depth": 4, "t_layers": 1, "t_heads": 2},
    # the other architectures get_model loads (small, with short windows)
    "hdemucs": {"channels": 4, "nfft": 1024, "depth": 4, "segment": 4},
    "demucs": {"channels": 8, "depth": 4, "segment": 4},
}


def model_class(size: str):
    from demucs.demucs import Demucs
    from demucs.hdemucs import HDemucs
    from demucs.htdemucs import HTDemucs

    return {"hdemucs": HDemucs, "demucs": Demucs}.get(size, HTDemucs)


def build_model(size: str = "small", seed: int = 0, sources=SOURCES):
    torch.manual_seed(seed)
    kwargs = dict(sources=list(sources), **ARCHITECTURES[size])
    kwargs.setdefault("segment", Fraction(39, 5))
    return model_class(size)(**kwargs).eval(), kwargs


def write_model_folder(
    folder,
    name: str = "htdemucs_6s",
    size: str = "small",
    seed: int = 0,
    sources=SOURCES,
    weights=None,
) -> Path:
    """A demucs local repo holding `name`: a bag of one seeded model, or with `weights` (one
    list of per-source weights per model, as in htdemucs_ft.yaml) of as many models, seeded
    seed, seed + 1, ..."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    suffix = "" if list(sources) == SOURCES else "_" + "".join(s[0] for s in sources)
    signatures = []
    for member in range(len(weights) if weights else 1):
        model, kwargs = build_model(size, seed + member, sources)
        signature = f"synthetic{size}{seed + member}{suffix}"
        torch.save(
            {"klass": type(model), "args": (), "kwargs": kwargs, "state": model.state_dict()},
            folder / f"{signature}.th",
        )
        signatures.append(signature)
    bag = f"models: {signatures}\n" + (f"weights: {weights}\n" if weights else "")
    (folder / f"{name}.yaml").write_text(bag)
    return folder


def write_hub_cache(hub, name: str = "htdemucs_6s", sources=SOURCES, seed: int = 0) -> Path:
    """A HuggingFace hub cache (the folder HF_HOME/hub) holding `name` as huggingface_hub stores
    a download (models--NAMESPACE--REPO/snapshots/REV, refs/main naming REV), in demucs'
    safetensors format (tools/export_hf.py: the class and its arguments in the metadata, a
    Fraction as {"_type": "fraction", ...}), so the real `get_model(name)` reads it offline.
    Returns the snapshot folder."""
    import json

    from safetensors.torch import save_file

    from job.separation.weights import hf_repo

    repo, name = hf_repo(name)
    revision = "0" * 40
    root = Path(hub) / f"models--{repo.replace('/', '--')}"
    snapshot = root / "snapshots" / revision
    snapshot.mkdir(parents=True)
    (root / "refs").mkdir()
    (root / "refs" / "main").write_text(revision)
    model, kwargs = build_model("small", seed, sources)
    segment = Fraction(kwargs["segment"])
    fraction = {"_type": "fraction", "numerator": segment.numerator}
    encoded = dict(kwargs, segment=dict(fraction, denominator=segment.denominator))
    save_file(
        {key: value.contiguous() for key, value in model.state_dict().items()},
        str(snapshot / "synthetic.safetensors"),
        metadata={
            "klass": f"{type(model).__module__}.{type(model).__name__}",
            "args": "[]",
            "kwargs": json.dumps(encoded),
        },
    )
    (snapshot / f"{name}.yaml").write_text("models: ['synthetic']\n")
    return snapshot


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
