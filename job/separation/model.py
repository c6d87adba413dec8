"""The Demucs model: loaded by name or from a local folder, once per process, and kept.

`ModelCache` owns the one loaded model and the `Engine` that runs it; `run` and `drain` start
loading it in the background while the first track downloads and decodes. torch itself is
imported by that background load (the first use of this module that needs it): its import is
most of a process's start-up, and it then overlaps the download and the decode.

PRECISION=auto runs the model in reduced precision where the hardware does that math faster:
bf16 (fp16 where bf16 is missing) on CUDA, bf16 on CPUs with bf16 instructions (the
`avx512_bf16` / `amx_bf16` flags), exact fp32 elsewhere. Either way the first window with signal
is checked against fp32 (engine.PARITY_DB) before reduced precision is kept; on the CPU that
check's verdict is recorded in the user's cache (never in the model's folder) and reused by later
processes on the same kind of CPU (separation/precision.py); `stem-job prefetch-model` records
it.
"""

import hashlib
import logging
import os
import threading
from pathlib import Path
from typing import TYPE_CHECKING

from job import outputs
from job.errors import ConfigError, JobError
from job.separation import weights

if TYPE_CHECKING:
    from job.separation.engine import Engine

log = logging.getLogger(__name__)


class ModelUnavailable(ConfigError):
    """The model is neither cached nor reachable: one line telling what to do."""


BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")


def read_cpuinfo() -> str:
    """Linux /proc/cpuinfo ("" where it cannot be read)."""
    try:
        return Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""


def cpu_flags(cpuinfo: str | None = None) -> set:
    """The CPU's feature flags (this host's unless `cpuinfo` is given)."""
    flags = set()
    for line in (read_cpuinfo() if cpuinfo is None else cpuinfo).splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "flags":
            flags |= set(value.split())
    return flags


def cpu_name(cpuinfo: str | None = None) -> str:
    """The CPU's model name ("" where there is none)."""
    for line in (read_cpuinfo() if cpuinfo is None else cpuinfo).splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "model name":
            return value.strip()
    return ""


def cpu_kind(cpuinfo: str | None = None) -> str:
    """The CPU's model name and a digest of its flags: what a precision verdict holds for."""
    text = read_cpuinfo() if cpuinfo is None else cpuinfo
    flags = " ".join(sorted(cpu_flags(text)))
    return f"{cpu_name(text) or 'unknown'} [{hashlib.sha256(flags.encode()).hexdigest()[:16]}]"


def choose_precision(wanted: str, device_type: str, flags: set, cuda_bf16: bool = False) -> tuple:
    """(precision, probe): what to run in and whether to check it against fp32 first."""
    if wanted != "auto":
        return wanted, False
    if device_type == "cuda":
        return ("bf16" if cuda_bf16 else "fp16"), True
    if any(flag in flags for flag in BF16_CPU_FLAGS):
        return "bf16", True
    return "fp32", False


def pick_device(wanted: str):
    import torch

    if wanted == "cuda" and not torch.cuda.is_available():
        raise ConfigError("DEVICE=cuda but no CUDA device is available (use auto or cpu)")
    if wanted == "auto":
        wanted = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(wanted)


def load_model(name: str, model_dir: str = "", device=None):
    """A demucs model in eval mode, loaded by name.

    Parameters:
        name: the demucs model name (MODEL_NAME, `htdemucs_6s`).
        model_dir: a folder holding NAME.yaml and the weights it names (demucs' LocalRepo):
            read from there, nothing downloaded. Empty: the HuggingFace hub cache (HF_HOME;
            downloaded when online and not cached), then demucs' legacy download.
        device: where to put the weights; None leaves them on the CPU.

    Returns the model, usually a demucs BagOfModels (`.models`, `.weights`, `.sources`).
    Raises ModelUnavailable (a ConfigError, one line naming MODEL_DIR and prefetch-model) when
    it cannot be loaded.
    """
    from demucs.pretrained import get_model
    from demucs.repo import ModelLoadingError

    hint = (
        "set MODEL_DIR to a folder holding the model, or run `stem-job prefetch-model` "
        "where the hub is reachable"
    )
    if model_dir:
        folder = Path(model_dir)
        if not folder.is_dir():
            raise ModelUnavailable(f"MODEL_DIR={model_dir} is not a folder ({hint})")
    try:
        model = get_model(name, repo=Path(model_dir) if model_dir else None)
    except (ModelLoadingError, OSError, ValueError, KeyError, RuntimeError, ImportError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        where = f"MODEL_DIR={model_dir}" if model_dir else "the model cache (HF_HOME)"
        raise ModelUnavailable(
            f"model {name!r} could not be loaded from {where}: {first[:200]}; {hint}"
        ) from None
    except SystemExit:
        raise ModelUnavailable(f"model {name!r} could not be loaded; {hint}") from None
    try:
        outputs.check_sources(list(model.sources))
    except ValueError as exc:
        raise ModelUnavailable(f"model {name!r} cannot be used: {exc}") from None
    model.eval()
    if device is not None:
        model.to(device)
    log.info(
        "model %s loaded (%s)",
        name,
        "offline" if os.environ.get("HF_HUB_OFFLINE") else (model_dir or "hub cache"),
    )
    return model


class ModelCache:
    """The model of MODEL_NAME/MODEL_DIR, loaded on first use and kept for every later track."""

    def __init__(self, settings):
        self.settings = settings
        if settings.device == "cuda":  # checked at once: no track can succeed without it
            self._device = pick_device("cuda")
        else:
            self._device = None  # "cpu" or "auto": decided when torch is imported
        self._engine = None
        self._lock = threading.Lock()
        self._identity = None
        self._identity_lock = threading.Lock()

    @property
    def device(self):
        if self._device is None:
            self._device = pick_device(self.settings.device)
        return self._device

    @property
    def loaded(self) -> bool:
        return self._engine is not None

    def warm(self) -> None:
        """Start loading in the background (overlapping download and decode).

        A failure is only logged here: `engine()` tries again and raises it where the job
        reports errors."""
        if self._engine is not None or self._lock.locked():
            return

        def load():
            try:
                self.engine()
            except Exception as exc:
                log.debug("background model load failed (retried on use): %s", exc)

        threading.Thread(target=load, name="model-load", daemon=True).start()

    def engine(self) -> "Engine":
        """The Engine of MODEL_NAME/MODEL_DIR, loaded on the first call (in the calling thread,
        or joined when `warm()` is loading it) and the same object on every later call.

        The settings decide how it runs (`build_engine`): DEVICE, PRECISION, SEGMENT_BATCH,
        SHIFTS and SEED.

        Returns the Engine. Raises ConfigError (ModelUnavailable when the model cannot be
        loaded); a later call tries again.
        """
        with self._lock:
            if self._engine is None:
                self._engine = build_engine(self.settings, self.device)
            return self._engine

    def identity(self) -> dict:
        """Which weights this model is, as a set records them: {"name", "digest", "files",
        "license"} (job/separation/weights.py), worked out once. Read from the files without
        loading the model where they are on disk (MODEL_DIR, the hub cache); otherwise the
        model is loaded first (downloading them), and where its files still cannot be named
        (demucs' legacy download) the digest is of the loaded weights (`weights:sha256:...`).

        Raises ModelUnavailable (a ConfigError) when the model cannot be found or loaded.
        """
        with self._identity_lock:
            if self._identity is None:
                self._identity = self._describe()
            return self._identity

    def _describe(self) -> dict:
        s = self.settings
        files = self._files()
        if files is None:
            engine = self.engine()  # raises ModelUnavailable when it cannot load
            files = self._files()
        if files is not None:
            described = weights.describe(files)
        else:
            from job.separation.precision import weights_digest

            described = {"digest": "weights:sha256:" + weights_digest(engine.models), "files": []}
        return {"name": s.model_name, **described, "license": s.model_license or None}

    def _files(self):
        s = self.settings
        try:
            return weights.find(s.model_name, s.model_dir)
        except (OSError, ValueError) as exc:
            where = f"MODEL_DIR={s.model_dir}" if s.model_dir else "the model cache (HF_HOME)"
            raise ModelUnavailable(
                f"model {s.model_name!r} in {where} cannot be read: {str(exc)[:200]}"
            ) from None


def build_engine(s, device) -> "Engine":
    """The model loaded and wrapped as `s` asks: PRECISION=auto picks reduced precision where
    the hardware has it (checked against fp32 on the first window), SEGMENT_BATCH=0 sizes passes
    per precision from the free device memory."""
    import torch

    from job.separation.engine import Engine
    from job.separation.precision import Verdicts, verdict_folders

    model = load_model(s.model_name, s.model_dir, device)
    try:
        outputs.plan(s.outputs, list(model.sources))
    except JobError as exc:
        raise ConfigError(f"OUTPUTS={','.join(s.outputs)} is invalid: {exc.message}") from None
    cuda = device.type == "cuda"
    cpuinfo = read_cpuinfo()
    precision, probe = choose_precision(
        s.precision,
        device.type,
        cpu_flags(cpuinfo),
        cuda and torch.cuda.is_bf16_supported(including_emulation=False),
    )
    if cuda:
        torch.backends.cudnn.benchmark = True
    engine = Engine(
        model,
        device,
        s.segment_batch or None,  # auto (0): sized per precision from the free memory
        precision,
        s.shifts,
        s.seed,
        probe=probe,
        verdicts=Verdicts(verdict_folders()),
        hardware=cpu_kind(cpuinfo),
    )
    log.info(
        "model runs on %s in %s%s, %d window(s) per pass",
        device,
        precision,
        " (checked against fp32 on the first window)" if probe else "",
        engine.batch,
    )
    return engine
