"""Loading the Demucs model once per process, by name or from a local folder."""

import logging
import os
from pathlib import Path

import torch

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
