"""The Demucs model: loaded by name or from a local folder, once per process, and kept.

`ModelCache` owns the one loaded model and the `Separator` that runs it; `run` and `drain` start
loading it in the background while the first track downloads and decodes.
"""

import logging
import os
import threading
from pathlib import Path

import torch

from .engine import Separator
from .errors import ConfigError

log = logging.getLogger(__name__)


class ModelUnavailable(ConfigError):
    """The model is neither cached nor reachable: one line telling what to do."""


def pick_device(wanted: str) -> torch.device:
    if wanted == "cuda" and not torch.cuda.is_available():
        raise ConfigError("DEVICE=cuda but no CUDA device is available (use auto or cpu)")
    if wanted == "auto":
        wanted = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(wanted)


def load_model(name: str, model_dir: str = "", device: torch.device | None = None):
    """A demucs model (usually a BagOfModels) in eval mode on `device`.

    With `model_dir`, demucs' LocalRepo reads NAME.yaml / SIG.th from that folder and nothing
    is downloaded; otherwise demucs looks in the HuggingFace hub cache (downloading when
    online and not cached), then falls back to its legacy download.
    """
    from demucs.pretrained import get_model
    from demucs.repo import ModelLoadingError

    hint = ("set MODEL_DIR to a folder holding the model, or run `stem-job prefetch-model` "
            "where the hub is reachable")
    if model_dir:
        folder = Path(model_dir)
        if not folder.is_dir():
            raise ModelUnavailable(f"MODEL_DIR={model_dir} is not a folder ({hint})")
    try:
        model = get_model(name, repo=Path(model_dir) if model_dir else None)
    except (ModelLoadingError, OSError, ValueError, KeyError, RuntimeError, ImportError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        where = f"MODEL_DIR={model_dir}" if model_dir else "the model cache (HF_HOME)"
        raise ModelUnavailable(f"model {name!r} could not be loaded from {where}: {first[:200]}; "
                               f"{hint}") from None
    except SystemExit:
        raise ModelUnavailable(f"model {name!r} could not be loaded; {hint}") from None
    model.eval()
    if device is not None:
        model.to(device)
    log.info("model %s loaded (%s)", name, "offline" if os.environ.get("HF_HUB_OFFLINE") else
             (model_dir or "hub cache"))
    return model


def auto_batch(device: torch.device) -> int:
    """Windows per forward pass: on CUDA as many as memory allows (~1.5 GB each in fp32)."""
    if device.type != "cuda":
        return 1
    free, _ = torch.cuda.mem_get_info(device)
    return int(max(1, min(16, free // (1536 * 2**20) - 1)))


class ModelCache:
    """The model of MODEL_NAME/MODEL_DIR, loaded on first use and kept for every later track."""

    def __init__(self, settings):
        self.settings = settings
        self.device = pick_device(settings.device)
        self._separator = None
        self._lock = threading.Lock()

    @property
    def loaded(self) -> bool:
        return self._separator is not None

    def warm(self) -> None:
        """Start loading in the background (overlapping download and decode).

        A failure is only logged here: `separator()` tries again and raises it where the job
        reports errors."""
        if self._separator is not None or self._lock.locked():
            return

        def load():
            try:
                self.separator()
            except Exception as exc:
                log.debug("background model load failed (retried on use): %s", exc)
        threading.Thread(target=load, name="model-load", daemon=True).start()

    def separator(self) -> Separator:
        """The loaded model's Separator; ConfigError (ModelUnavailable) if it cannot load."""
        with self._lock:
            if self._separator is None:
                s = self.settings
                model = load_model(s.model_name, s.model_dir, self.device)
                precision = s.precision
                if precision == "auto":
                    precision = "bf16" if self.device.type == "cuda" else "fp32"
                if self.device.type == "cuda":
                    torch.backends.cudnn.benchmark = True
                self._separator = Separator(model, self.device,
                                            s.segment_batch or auto_batch(self.device),
                                            precision, s.shifts, s.seed)
            return self._separator
