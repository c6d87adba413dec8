"""Forward passes on the device: how many windows each takes, and how one runs.

A pass is sized for the precision that runs (fp32 takes more device memory per window than
bf16/fp16): from SEGMENT_BATCH, or, when that is auto, from the device's free memory
(`auto_batch`) the first time that precision runs. A pass that still runs out of device
memory (`torch.cuda.OutOfMemoryError`: the free memory was less than measured, or a window needs
more than `WINDOW_MB`) is redone in halves, and the halved size is kept for the rest of
the process; the same windows go through the same computation, so the output is the same. Only
one window that does not fit fails the track: no smaller pass exists.

On CUDA a pass is copied in from a pinned buffer and its output copied back into another
asynchronously, so the caller can queue the next batch before it adds up this one. On the CPU,
bf16 runs a bf16 copy of the network's blocks (job/separation/precision.py); other reduced
precision runs under autocast.
"""

import logging
from contextlib import nullcontext
from dataclasses import dataclass

import torch

from job.errors import JobError
from job.separation.precision import bf16_copy

REDUCED = {"bf16": torch.bfloat16, "fp16": torch.float16}
OutOfMemory = torch.cuda.OutOfMemoryError  # what torch's CUDA allocator raises (a RuntimeError)
log = logging.getLogger(__name__)
# device memory per window in a pass, per precision (hack/gpu-check measures and prints them)
WINDOW_MB = {"fp32": 1536, "bf16": 1024, "fp16": 1024}
HEADROOM_MB = 1024  # left free for cuDNN workspaces etc.
MAX_BATCH = 16


def auto_batch(device, precision: str = "fp32", free_bytes: int | None = None) -> int:
    """Windows per forward pass: 1 on CPU; on CUDA as many as the free memory holds."""
    if device.type != "cuda":
        return 1
    if free_bytes is None:
        import torch

        free_bytes, _ = torch.cuda.mem_get_info(device)
    usable = free_bytes - HEADROOM_MB * 2**20
    return int(max(1, min(MAX_BATCH, usable // (WINDOW_MB[precision] * 2**20))))


@dataclass
class Pending:
    """A forward pass under way: its output lands in `outputs` once `event` has completed."""

    model: torch.nn.Module
    inputs: torch.Tensor  # the host input, kept for an fp32 redo of a window
    outputs: torch.Tensor  # host float32 (pinned on CUDA)
    precision: str  # what the pass ran in (named when its output is not finite)
    event: object = None  # torch.cuda.Event, None when already complete


def autocast(device_type: str, precision: str):
    """torch.autocast for a reduced precision; nothing for fp32."""
    if precision not in REDUCED:
        return nullcontext()
    return torch.autocast(device_type, dtype=REDUCED[precision])


class Runner:
    """One forward pass as the device runs it: synchronously (`run`), or on CUDA queued
    from a pinned buffer without waiting for it (`launch`)."""

    def __init__(self, device: torch.device, models, precision: str):
        self.device = device
        # the bf16 copies of the CPU path (None: that model runs under autocast); dropped when
        # the probe decides for fp32
        self.copies = (
            {id(sub): bf16_copy(sub) for sub in models}
            if device.type == "cpu" and precision == "bf16"
            else {}
        )
        self._pinned = {}

    def run(self, model, inputs: torch.Tensor, precision: str) -> torch.Tensor:
        """One synchronous forward pass on the host tensor `inputs`: float32 host output."""
        copy = self.copies.get(id(model)) if precision == "bf16" else None
        if copy is not None:
            with torch.inference_mode():
                return copy(inputs).float()
        with torch.inference_mode(), autocast(self.device.type, precision):
            return model(inputs.to(self.device)).float().cpu()

    def launch(self, model, inputs: torch.Tensor, slot: int, precision: str) -> Pending:
        """One pass on CUDA from a pinned buffer, its output copied back without waiting.
        `slot` alternates: the previous batch's buffers are still being read."""
        staged = self._buffer(f"in{slot}", tuple(inputs.shape))
        staged.copy_(inputs)
        with torch.inference_mode(), autocast("cuda", precision):
            out = model(staged.to(self.device, non_blocking=True)).float()
            host = self._buffer(f"out{slot}", tuple(out.shape))
            host.copy_(out, non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        return Pending(model, inputs, host, precision, event)

    def _buffer(self, name: str, shape) -> torch.Tensor:
        """A persistent pinned host buffer, grown when a batch needs more (first batches only)."""
        buffer = self._pinned.get(name)
        if buffer is None or buffer.shape[1:] != shape[1:] or buffer.shape[0] < shape[0]:
            buffer = torch.empty(shape, dtype=torch.float32).pin_memory()
            self._pinned[name] = buffer
        return buffer[: shape[0]]


class Passes:
    """Windows per forward pass in each precision, and passes run in those sizes, halved when
    the device runs out of memory. One unit on purpose: a size is known to fit only once a pass
    of that size has run, so sizing, running and halving are one loop.

    `batch`: windows per pass, the same for every precision; a dict gives it per precision
    ({"fp32": 4, "bf16": 8}); None (or a precision the dict lacks) sizes it from the device's
    free memory when that precision first runs. `halvings` counts halvings until the caller
    resets it (the engine does, per track).
    """

    def __init__(self, runner: Runner, batch: int | dict | None = 1):
        self.runner, self.device = runner, runner.device
        sizes = batch if isinstance(batch, dict) else {}
        self.fixed = max(1, batch) if batch and not sizes else None
        self.sizes = {p: max(1, n) for p, n in sizes.items()}  # halved on OOM
        self.halvings = 0

    def size(self, precision: str) -> int:
        """Windows per forward pass in `precision`."""
        if precision not in self.sizes:
            if self.fixed is None and self.device.type == "cuda":
                torch.cuda.empty_cache()  # memory cached by earlier passes is free for this
            self.sizes[precision] = self.fixed or auto_batch(self.device, precision)
        return self.sizes[precision]

    def forward(self, model, inputs: torch.Tensor, precision: str) -> torch.Tensor:
        """`inputs` through the model synchronously, in passes of at most `size(precision)`
        windows; a pass that runs out of device memory is redone in halves."""
        outputs, start = [], 0
        while start < len(inputs):
            size = min(self.size(precision), len(inputs) - start)
            try:
                outputs.append(self.runner.run(model, inputs[start : start + size], precision))
                start += size
                continue
            except OutOfMemory:
                pass
            self.halve(precision, size)
        return outputs[0] if len(outputs) == 1 else torch.cat(outputs)

    def launch(self, model, inputs: torch.Tensor, slot: int, precision: str) -> Pending:
        """Start the forward pass of one batch; on CUDA it runs while the caller goes on (a
        batch larger than one pass runs synchronously, pass by pass)."""
        if self.device.type == "cuda" and len(inputs) <= self.size(precision):
            try:
                return self.runner.launch(model, inputs, slot, precision)
            except OutOfMemory:
                pass
            self.halve(precision, len(inputs))
        return Pending(model, inputs, self.forward(model, inputs, precision), precision)

    def halve(self, precision: str, size: int) -> None:
        """A pass of `size` windows ran out of device memory: later passes take half as many.
        Called outside the `except` clause, whose traceback holds the failed pass's tensors."""
        if size <= 1:
            free = (
                f", {torch.cuda.mem_get_info(self.device)[0] / 2**20:.0f} MB free"
                if self.device.type == "cuda"
                else ""
            )
            raise JobError(
                "device_out_of_memory",
                f"one window does not fit in {self.device}'s memory in {precision}"
                f"{free}: the device is too small for the model, or shared",
                retryable=True,
            )
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        self.sizes[precision] = min(self.size(precision), (size + 1) // 2)
        self.halvings += 1
        log.warning(
            "%s ran out of memory with %d windows per pass in %s: now %d",
            self.device,
            size,
            precision,
            self.sizes[precision],
        )
