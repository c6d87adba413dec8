"""bf16 on the CPU: the bf16 copy of the network, and the remembered check against fp32.

Why a copy rather than autocast: autocast converts activations back and forth around every
convolution and matrix product; with the blocks' weights and activations in bf16 those
conversions happen only at block boundaries. A window is a little faster on an idle CPU and
clearly faster on a busy one (fewer operations, each a synchronisation of the CPU threads),
agreeing with fp32 as closely (hack/bf16_paths.py measures both). The STFT, its inverse, the
input/output normalisation and the positional embeddings stay fp32.

Why remember the check: reduced precision is kept only once it has been shown to agree with
fp32 (engine.PARITY_DB), and the check costs one extra fp32 window, most of the gain on a
short track. Its verdict depends only on the weights, the kind of CPU and torch, so it is
recorded (by `stem-job prefetch-model` at image build, or by the first run) in the user's
cache under a key made of exactly these, and a later process on the same kind of CPU reuses it
instead of checking again. The store never fails a job: an unreadable or unwritable folder only
means checking.
"""

import copy
import hashlib
import json
import logging
import os
from pathlib import Path

import numpy as np
import torch

from job.pcm import SAMPLE_RATE

log = logging.getLogger(__name__)

# HTDemucs' convolution and transformer blocks: nearly all of a window's compute
BF16_BLOCKS = (
    "encoder",
    "tencoder",
    "decoder",
    "tdecoder",
    "channel_upsampler",
    "channel_upsampler_t",
    "channel_downsampler",
    "channel_downsampler_t",
    "crosstransformer.layers",
    "crosstransformer.layers_t",
)
SCHEME = 1  # bump when what runs in bf16 changes: older verdicts no longer apply


def _cast(value, dtype):
    if torch.is_tensor(value) and value.is_floating_point():
        return value.to(dtype)
    if isinstance(value, tuple):
        return tuple(_cast(v, dtype) for v in value)
    return value


def _to_bf16(module, args):
    return _cast(args, torch.bfloat16)


def _to_fp32(module, args, output):
    return _cast(output, torch.float32)


def bf16_copy(model):
    """A copy of `model` running its blocks in bf16 (fp32 in, fp32 out of each block), or None
    when it has none of HTDemucs' blocks (autocast is used for such a model)."""
    names = [
        name
        for name, _ in model.named_modules()
        if any(name == b or name.endswith("." + b) for b in BF16_BLOCKS)
    ]
    if not names:
        return None
    model = copy.deepcopy(model)
    for name in names:
        part = model.get_submodule(name)
        for block in part if isinstance(part, torch.nn.ModuleList) else [part]:
            block.to(torch.bfloat16)
            block.register_forward_pre_hook(_to_bf16)
            block.register_forward_hook(_to_fp32)
    return model.eval()


def weights_digest(models) -> str:
    """A digest of every weight of `models`: a verdict is about these exact numbers."""
    digest = hashlib.sha256()
    for model in models:
        for name, tensor in model.state_dict().items():
            tensor = tensor.detach().cpu().contiguous()
            digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)};".encode())
            digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def verdict_folders() -> list:
    """Where verdicts are kept: the user's cache (XDG_CACHE_HOME), never the model's folder,
    which holds pickles `torch.load` runs and must stay read-only to the job (a folder the job
    may write is one a decoder subverted by a file may write too)."""
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return [Path(cache) / "stem-job"]


class Verdicts:
    """Recorded checks of reduced precision against fp32, one small JSON file per key."""

    def __init__(self, folders):
        self.folders = [Path(f) for f in folders]

    @staticmethod
    def key(models, precision: str, path: str, hardware: str) -> dict:
        return {
            "scheme": SCHEME,
            "precision": precision,
            "path": path,
            "hardware": hardware,
            "torch": torch.__version__,
            "weights": weights_digest(models),
        }

    @staticmethod
    def _name(key: dict) -> str:
        text = json.dumps(key, sort_keys=True)
        return f"precision-check-{hashlib.sha256(text.encode()).hexdigest()[:24]}.json"

    def read(self, key: dict):
        """The recorded agreement in dB for `key`, or None when it was never checked here."""
        for folder in self.folders:
            try:
                record = json.loads((folder / self._name(key)).read_text())
                if record.get("key") == key:
                    return float(record["db"])
            except (OSError, ValueError, KeyError, TypeError):
                continue
        return None

    def write(self, key: dict, db: float):
        """Record a verdict in the first folder that takes it; the folder, or None."""
        text = json.dumps({"key": key, "db": db})
        for folder in self.folders:
            target = folder / self._name(key)
            temporary = target.with_name(f".{target.name}.{os.getpid()}")
            try:
                folder.mkdir(parents=True, exist_ok=True)
                temporary.write_text(text)
                os.replace(temporary, target)
                return folder
            except OSError as exc:
                log.debug("precision verdict not recorded in %s: %s", folder, exc)
                try:
                    temporary.unlink(missing_ok=True)
                except OSError:
                    pass
        log.info(
            "precision verdict not recorded: no writable folder among %s",
            ", ".join(map(str, self.folders)),
        )
        return None


def music(seconds: float, seed: int = 0, rate: int = SAMPLE_RATE) -> np.ndarray:
    """(2, n) float32 music-like mix: bass line, chords, a melody, drums, noise; ~-12 dBFS.

    What `stem-job prefetch-model` checks the reduced precision on (and the tests' and
    benchmarks' generated tracks)."""
    rng = np.random.default_rng(seed)
    n = int(seconds * rate)
    t = np.arange(n) / rate
    beat = (t * 2) % 1.0  # 120 bpm
    kick = np.sin(2 * np.pi * 55 * t * (1 + 2 * np.exp(-beat * 30))) * np.exp(-beat * 12)
    hat = rng.standard_normal(n) * np.exp(-((t * 4) % 1.0) * 60) * 0.3
    bass = 0.5 * np.sign(np.sin(2 * np.pi * 41.2 * (1 + (t // 2 % 2) * 0.5) * t))
    chords = sum(np.sin(2 * np.pi * f * t) for f in (261.6, 329.6, 392.0)) / 3
    melody_f = 440 * 2 ** (np.floor((t * 4) % 8) / 12)
    melody = np.sin(2 * np.pi * np.cumsum(melody_f) / rate) * (
        0.6 + 0.4 * np.sin(2 * np.pi * 5 * t)
    )
    left = 0.5 * kick + 0.2 * hat + 0.3 * bass + 0.3 * chords + 0.25 * melody
    right = 0.5 * kick + 0.25 * hat + 0.3 * bass + 0.2 * chords + 0.35 * melody
    mix = np.stack([left, right]) + 0.01 * rng.standard_normal((2, n))
    return (0.25 * mix / np.abs(mix).max()).astype(np.float32)
