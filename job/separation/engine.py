"""The separation engine: a loaded model, run over a track window by window.

Numerically this is demucs' reference (normalise by the mono mix's mean/std,
`apply_model(split=True, overlap=0.25)`, de-normalise: job/separation/windows.py holds its
geometry). What differs is the shape:

- the decoded track is read from disk one window at a time, never held whole;
- several windows run in one forward pass (job/separation/passes.py sizes them);
- after each pass, the stretch no later window can touch is finished and handed to
  the caller (`emit`), so memory stays bounded whatever the track's length.

`Engine.separate()` is the one entry point: windows in, finished stem blocks out. A `TrackRun`
is one track's run; what the engine decides (the precision, the pass sizes) holds for every
later track.

In reduced precision (bf16/fp16 autocast; on the CPU, bf16 runs a bf16 copy of the network's
blocks: job/separation/precision.py) every window's output is checked: a window with NaN/Inf is
computed again in fp32 and counted (`fallback_windows`). With `probe`, the first window with
signal is computed in both precisions and the reduced one is kept only if it agrees with fp32 to
PARITY_DB; with `verdicts`, that check's outcome is recorded, and a verdict already recorded for
these weights on this kind of CPU replaces it. The probe compares one window, not a batch (fp32
takes more device memory per window), and silent lead-in windows, which run in fp32 before the
probe has decided, go through in fp32-sized passes.
"""

import logging
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from job.errors import Cancel, Interrupted
from job.separation.passes import REDUCED, Passes, Pending, Runner
from job.separation.windows import TrackWindows, bag_of, plan_streams

PARITY_DB = 35.0  # reduced precision is kept only this close to fp32 (SDR)
SILENT = 1e-3  # a window quieter than this (normalised) tells the probe nothing
log = logging.getLogger(__name__)


def agreement_db(reference: np.ndarray, estimate: np.ndarray) -> float:
    """The worst per-source SDR of `estimate` against `reference` ((batch, sources, ...))."""
    axes = (0,) + tuple(range(2, reference.ndim))
    signal = (reference.astype(np.float64) ** 2).sum(axes)
    noise = ((reference.astype(np.float64) - estimate) ** 2).sum(axes)
    return float(np.min(10 * np.log10(np.maximum(signal, 1e-30) / np.maximum(noise, 1e-30))))


class PrecisionProbe:
    """Whether the reduced precision is kept, decided once per process: one window with signal
    computed in fp32 and in the reduced precision must agree to PARITY_DB, or a verdict recorded
    for these weights on this kind of CPU decides at once."""

    def __init__(self, models, precision: str, wanted: bool, passes: Passes, verdicts, hardware):
        self.precision = precision  # what runs now: fp32, bf16 or fp16
        self.pending = wanted and precision in REDUCED  # still to be checked against fp32
        self.db = None  # the agreement with fp32, once checked
        self.recorded = False  # db was read from `verdicts`, not measured here
        self.passes = passes
        self._verdicts, self._key = verdicts, None
        if self.pending and verdicts is not None and passes.device.type == "cpu":
            path = "bf16-blocks" if any(passes.runner.copies.values()) else "autocast"
            self._key = verdicts.key(models, precision, path, hardware)
            recorded = verdicts.read(self._key)
            if recorded is not None:
                self.recorded = True
                self.decide(recorded, "recorded")

    def decide(self, db: float, how: str) -> None:
        """Keep the reduced precision if it agrees with fp32 to PARITY_DB, else run in fp32."""
        self.db, self.pending = db, False
        if db < PARITY_DB:
            log.warning(
                "%s agrees with fp32 to %.1f dB only (%s, < %.0f): running in fp32",
                self.precision,
                db,
                how,
                PARITY_DB,
            )
            self.precision, self.passes.runner.copies = "fp32", {}
        else:
            log.info("%s agrees with fp32 to %.1f dB (%s): kept", self.precision, db, how)

    def wants(self, inputs: torch.Tensor) -> bool:
        """Whether this batch decides: the probe is pending and the batch has signal."""
        return self.pending and float(inputs.abs().max()) > SILENT

    def window(self, model, window: torch.Tensor) -> tuple:
        """Run one window in fp32 and in the reduced precision, record and decide. Returns
        both outputs."""
        exact = self.passes.forward(model, window, "fp32")
        reduced = self.passes.forward(model, window, self.precision)
        finite = bool(torch.isfinite(reduced).all())
        db = agreement_db(exact.numpy(), reduced.numpy()) if finite else float("-inf")
        if self._key is not None:
            self._verdicts.write(self._key, db)
        self.decide(db, "checked")
        return exact, reduced

    def batch(self, model, inputs: torch.Tensor) -> torch.Tensor:
        """The first batch with signal: its first such window decides the precision, and the
        batch's other windows then run in the precision decided."""
        first = int(np.flatnonzero(inputs.flatten(1).abs().amax(1).numpy() > SILENT)[0])
        exact, reduced = self.window(model, inputs[first : first + 1])
        kept = exact if self.precision == "fp32" else reduced
        if len(inputs) == 1:
            return kept
        others = self.passes.forward(
            model, torch.cat([inputs[:first], inputs[first + 1 :]]), self.precision
        )
        return torch.cat([others[:first], kept, others[first:]])


class TrackRun:
    """One track through the engine: windows read ahead in a thread, each batch launched before
    the previous one is collected and added up, so a GPU stays busy meanwhile.

    Only the forward passes are abortable (`cancel.abortable()`): they cannot be checked mid-way
    and take seconds on a CPU. Adding up and emitting a block are not cut off half done: a set
    `cancel` stops the run before its next batch. A window whose reduced-precision output is not
    finite is computed again in fp32 before it is added up.
    """

    def __init__(self, engine: "Engine", read, length: int, mean, std, emit, progress, cancel):
        self.engine, self.read, self.emit, self.progress = engine, read, emit, progress
        self.cancel = cancel if cancel is not None else Cancel()
        streams = plan_streams(engine.models, length, engine.shifts, engine.seed)
        sources = len(engine.sources)
        self.windows = TrackWindows(streams, engine.model_weights, sources, length, mean, std)
        self.done = 0  # windows added up so far

    def run(self) -> None:
        """Every window through the model and every block emitted, or an exception."""
        engine = self.engine
        batches = self.windows.batches(lambda: engine.batch)
        batch, previous, number = next(batches), None, 0  # previous: (batch, Pending)
        with ThreadPoolExecutor(1, thread_name_prefix="read-windows") as pool:
            future = pool.submit(self.load, batch)
            while batch is not None:
                if self.cancel.is_set():
                    raise Interrupted()
                inputs = future.result()
                following = next(batches, None)
                if following is not None:
                    future = pool.submit(self.load, following)
                if number == 0:
                    log.info(
                        "first window entering the model",
                        extra={"json_fields": {"event": "first_window"}},
                    )
                model = engine.models[self.windows.model_of(batch)]
                with self.cancel.abortable():
                    pending = self.launch(model, inputs, number % 2)
                    outputs = None if previous is None else self.collect(previous[1])
                if previous is not None:
                    self.finish(previous[0], outputs)
                # the finished batch's output is not held through the next forward pass
                previous, outputs = (batch, pending), None
                batch, number = following, number + 1
        with self.cancel.abortable():
            outputs = self.collect(previous[1])
        self.finish(previous[0], outputs)

    def load(self, batch) -> torch.Tensor:
        """The batch's normalised input (in the read-ahead thread)."""
        return torch.from_numpy(self.windows.inputs(batch, self.read))

    def launch(self, model, inputs: torch.Tensor, slot: int) -> Pending:
        """Start the batch's forward pass: the probe's, or in the precision that runs (fp32
        for silence before the probe has decided)."""
        probe = self.engine.precision_probe
        if probe.wants(inputs):
            return Pending(model, inputs, probe.batch(model, inputs), probe.precision)
        precision = "fp32" if probe.pending else probe.precision
        return self.engine.passes.launch(model, inputs, slot, precision)

    def collect(self, pending: Pending) -> np.ndarray:
        """The batch's float32 output once ready; windows with NaN/Inf redone in fp32."""
        if pending.event is not None:
            pending.event.synchronize()
        out = pending.outputs.numpy()
        # a window's sum is finite when all its samples are (one read, no mask); only a window
        # whose sum is not, NaN/Inf or a sum past float32's range, is looked at sample by sample
        bad = ~np.isfinite(out.reshape(out.shape[0], -1).sum(1))
        if bad.any():
            bad[bad] = ~np.isfinite(out[bad].reshape(int(bad.sum()), -1)).all(1)
        for index in np.flatnonzero(bad):
            redo = self.engine.passes.forward(
                pending.model, pending.inputs[index : index + 1], "fp32"
            ).numpy()
            if not np.isfinite(redo).all():
                raise RuntimeError("the model's output is not finite, even in fp32")
            out[index] = redo[0]
            self.engine.fallback_windows += 1
        if bad.any():
            log.warning(
                "%d window(s) redone in fp32: %s output was not finite",
                int(bad.sum()),
                pending.precision,
            )
        return out

    def finish(self, batch, outputs: np.ndarray) -> None:
        """Add up one batch's outputs and emit what no later window can touch."""
        taken = self.windows.add(batch, outputs)
        if taken is not None:
            self.emit(*taken)
        self.done += len(batch)
        if self.progress is not None:
            self.progress(self.done / len(self.windows))


class Engine:
    """A loaded model and how to run it, kept for every later track: `separate()` streams one
    track through it, `check()` runs the precision probe alone (the work is in PrecisionProbe,
    Passes and TrackRun).

    `batch`: windows per forward pass, the same for every precision; a dict gives it per
    precision ({"fp32": 4, "bf16": 8}); None (or a precision the dict lacks) sizes it from the
    device's free memory (`passes.auto_batch`) when that precision first runs.
    """

    precision = property(lambda self: self.precision_probe.precision, doc="fp32, bf16 or fp16")
    probe_pending = property(
        lambda self: self.precision_probe.pending, doc="reduced, not yet checked"
    )
    probe_db = property(lambda self: self.precision_probe.db, doc="the agreement with fp32")
    probe_recorded = property(lambda self: self.precision_probe.recorded, doc="db was recorded")
    halvings = property(lambda self: self.passes.halvings, doc="OOM halvings, last track")
    batch = property(lambda self: self.passes.size(self.precision), doc="windows per pass now")

    def __init__(
        self,
        model,
        device: torch.device,
        batch: int | dict | None = 1,
        precision: str = "fp32",
        shifts: int = 0,
        seed: int = 0,
        probe: bool = False,
        verdicts=None,
        hardware: str = "",
    ):
        self.models, self.model_weights = bag_of(model)
        self.sources = list(model.sources)
        self.device, self.shifts, self.seed = device, shifts, seed
        for sub in self.models:
            sub.to(device).eval()
        # PyTorch's MultiheadAttention "fast path" materialises the attention matrix on CPU;
        # the regular path uses scaled_dot_product_attention: faster per window, the same
        # result (figures: docs/benchmarks.md). Process-wide, set on purpose.
        torch.backends.mha.set_fastpath_enabled(False)
        self.passes = Passes(Runner(device, self.models, precision), batch)
        self.precision_probe = PrecisionProbe(
            self.models, precision, probe, self.passes, verdicts, hardware
        )
        self.fallback_windows = 0  # windows of the last track redone in fp32 (NaN/Inf)

    def check(self, mix: np.ndarray) -> float | None:
        """The precision probe on the first window of `mix`, outside any track (the image
        build runs it so that later processes find the verdict recorded).

        Parameters:
            mix: (2, n) float32 raw audio; a window's worth or more (a shorter one is padded
                with silence).

        Returns the agreement with fp32 in dB (recorded when the engine has `verdicts`; -inf
        when the reduced output was not finite), the recorded one when a verdict was found,
        or None when nothing is probed (fp32, or a precision asked for explicitly).
        """
        if self.probe_pending:
            model = self.models[0]
            stream = plan_streams([model], mix.shape[1], 0, 0)[0]
            size = stream.input_size(stream.segment)
            window = np.zeros((2, size), np.float32)
            window[:, : min(size, mix.shape[1])] = mix[:, :size]
            mono = window.mean(0)
            self.precision_probe.window(
                model, torch.from_numpy((window - mono.mean()) / mono.std())[None]
            )
        return self.probe_db

    def separate(
        self,
        read,
        length: int,
        mean: float,
        std: float,
        emit,
        progress=None,
        cancel: Cancel | None = None,
    ) -> dict:
        """Separate one track, streamed: windows are read as needed, stems emitted in order.

        Parameters:
            read: read(start, stop) -> (2, stop - start) float32 raw audio, zeros outside the
                track (called from a read-ahead thread).
            length: the track's length in samples (at the model's rate).
            mean, std: the mono mix's mean and standard deviation (normalisation).
            emit: emit(start, block) receives (sources, 2, n) float32 de-normalised stem
                blocks (`sources` order), in track order, covering [0, length) exactly once;
                the engine never touches a block again once emitted.
            progress: progress(fraction) after each batch, fraction of the windows done.
            cancel: set on SIGTERM: the run stops before its next batch, and a forward pass
                under way is aborted (Interrupted).

        Returns the engine's figures for the manifest: `fp32FallbackWindows` (windows redone
        in fp32), `oomHalvings` (passes halved for device memory), `batch` (windows per pass
        at the end) and `devicePeakMb` (None on the CPU).
        """
        self.fallback_windows = self.passes.halvings = 0
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        TrackRun(self, read, length, mean, std, emit, progress, cancel).run()
        peak = (
            torch.cuda.max_memory_allocated(self.device) / 2**20
            if self.device.type == "cuda"
            else None
        )
        return {
            "fp32FallbackWindows": self.fallback_windows,
            "oomHalvings": self.halvings,
            "batch": self.batch,
            "devicePeakMb": None if peak is None else round(peak),
        }
