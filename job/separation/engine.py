"""The separation engine: the reference computation, streamed window by window.

Numerically this is demucs' reference (normalise by the mono mix's mean/std,
`apply_model(split=True, overlap=0.25)`, de-normalise): the same window offsets and
triangular weights, the same padding from neighbouring audio (`TensorChunk.padded`),
the same shift offsets for `shifts > 0`. What differs is the shape:

- the decoded track is read from disk one window at a time, never held whole;
- several windows run in one forward pass (`batch`);
- after each window, the stretch no later window can touch is finished and handed to
  the caller (`emit`), so memory stays bounded whatever the track's length.

`separate()` is the one entry point: windows in, finished stem blocks out.

On CUDA the device is kept busy: each batch is copied in from a pinned buffer and its output
copied back into another asynchronously, and the next batch is queued before the previous
one's overlap-add runs on the CPU. In reduced precision (bf16/fp16 autocast; on the CPU, bf16
runs a bf16 copy of the network's blocks: job/precision.py) every window's output is checked: a
window with NaN/Inf is computed again in fp32 and counted (`fallback_windows`). With `probe`,
the first window with signal is computed in both precisions and the reduced one is kept only if
it agrees with fp32 to PARITY_DB; with `verdicts`, that check's outcome is recorded, and a
verdict already recorded for these weights on this kind of CPU replaces it.

Device memory: a batch is sized for the precision that runs (fp32 takes more per window than
bf16/fp16), so the probe compares one window, not a batch, and silent lead-in windows, which run
in fp32 before the probe has decided, go through in fp32-sized passes. A pass that still runs out
of device memory (`torch.cuda.OutOfMemoryError`: the free memory was less than measured, or a
window needs more than `model.WINDOW_MB`) is redone in halves, and the halved size is kept for
the rest of the process; the same windows go through the same computation, so the output is
the same. Only one window that does not fit fails the track: no smaller pass exists.
"""

import logging
import random
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass

import numpy as np
import torch

from job.errors import Cancel, Interrupted, JobError
from job.separation.model import auto_batch
from job.separation.precision import bf16_copy

OVERLAP = 0.25
PARITY_DB = 35.0  # reduced precision is kept only this close to fp32 (SDR)
REDUCED = {"bf16": torch.bfloat16, "fp16": torch.float16}
SILENT = 1e-3  # a window quieter than this (normalised) tells the probe nothing
OutOfMemory = torch.cuda.OutOfMemoryError  # what torch's CUDA allocator raises (a RuntimeError)
log = logging.getLogger(__name__)


@dataclass
class Stream:
    """One pass of one model over the track, possibly shifted (demucs' shift trick).

    Virtual position q of this pass is original position q + offset (offset <= 0).
    """

    model_index: int
    offset: int
    length: int
    segment: int
    stride: int
    weight: np.ndarray
    skip: int = 0  # leading virtual samples that are not output (shift)

    def windows(self):
        return range(0, self.length, self.stride)


class OverlapAdd:
    """Accumulates weighted window outputs of one stream and yields finished stretches."""

    def __init__(self, stream: Stream, sources: int):
        self.stream = stream
        self.start = 0  # virtual position of buf[..., 0]
        self.out = np.zeros((sources, 2, 0), np.float32)
        self.sum = np.zeros(0, np.float32)

    def add(self, offset: int, chunk: np.ndarray) -> None:
        n = chunk.shape[-1]
        weight = self.stream.weight[:n]
        lo = offset - self.start
        have = self.out.shape[-1]
        overlap = n
        if lo + n > have:
            # grow: keep the unfinished tail, write the new stretch directly (no zeros, no temp)
            out = np.empty(self.out.shape[:2] + (lo + n,), np.float32)
            total = np.empty(lo + n, np.float32)
            out[..., :have], total[:have] = self.out, self.sum
            out[..., have:lo], total[have:lo] = 0.0, 0.0
            overlap = max(have - lo, 0)
            np.multiply(weight[overlap:], chunk[..., overlap:], out=out[..., lo + overlap :])
            total[lo + overlap :] = weight[overlap:]
            self.out, self.sum = out, total
        if overlap:
            self.out[..., lo : lo + overlap] += weight[:overlap] * chunk[..., :overlap]
            self.sum[lo : lo + overlap] += weight[:overlap]

    def finish(self, upto: int) -> tuple[int, np.ndarray]:
        """Finished output in virtual [start, upto), divided by the summed weights (in place:
        no later window touches it)."""
        n = upto - self.start
        done = self.out[..., :n]
        np.divide(done, self.sum[:n], out=done)
        self.out, self.sum = self.out[..., n:], self.sum[n:]
        start, self.start = self.start, upto
        return start, done


class Combiner:
    """Averages the streams (shifts, models of a bag) into one finished output, in order."""

    def __init__(self, streams, model_weights, sources: int, length: int):
        self.streams = streams
        self.length = length
        totals = np.zeros(sources, np.float64)
        for w in model_weights:
            totals += np.asarray(w, np.float64)
        shifts = len(streams) // len(model_weights)
        self.scale = [
            (np.asarray(model_weights[s.model_index], np.float64) / totals / shifts).astype(
                np.float32
            )[:, None, None]
            for s in streams
        ]
        self.pending = [[] for _ in streams]  # finished pieces not yet combined
        self.ends = [0] * len(streams)  # original position each stream reached
        self.emitted = 0

    def add(self, index: int, start: int, block: np.ndarray):
        stream = self.streams[index]
        lo = max(start, stream.skip)
        block = block[..., lo - start :]
        if block.shape[-1] == 0:
            return
        self.pending[index].append(block)
        self.ends[index] = lo + stream.offset + block.shape[-1]

    def take(self):
        """The combined output from the last emitted position to where every stream reached."""
        upto = min(self.ends)
        n = upto - self.emitted
        if n <= 0:
            return None
        total = 0
        for i, pieces in enumerate(self.pending):
            joined = np.concatenate(pieces, -1) if len(pieces) > 1 else pieces[0]
            total = (
                total + self.scale[i] * joined[..., :n]
                if len(self.streams) > 1
                else joined[..., :n]
            )
            self.pending[i] = [joined[..., n:]] if joined.shape[-1] > n else []
        start, self.emitted = self.emitted, upto
        return start, total


def plan_streams(models, length: int, shifts: int, seed: int):
    """The streams of the reference: per model, one unshifted pass or `shifts` shifted ones.

    Shift offsets are drawn like demucs (`random.randint(0, max_shift)`, models outer,
    shifts inner) from a generator seeded with `seed`.
    """
    rng = random.Random(seed)
    streams = []
    for index, model in enumerate(models):
        segment = int(model.samplerate * model.segment)
        stride = int((1 - OVERLAP) * segment)
        weight = np.concatenate(
            [np.arange(1, segment // 2 + 1), np.arange(segment - segment // 2, 0, -1)]
        ).astype(np.float32)
        weight = weight / weight.max()
        if shifts == 0:
            streams.append(Stream(index, 0, length, segment, stride, weight))
            continue
        max_shift = int(0.5 * model.samplerate)
        for _ in range(shifts):
            off = rng.randint(0, max_shift)
            streams.append(
                Stream(
                    index,
                    off - max_shift,
                    length + max_shift - off,
                    segment,
                    stride,
                    weight,
                    skip=max_shift - off,
                )
            )
    return streams


def bag_of(model):
    """(sub-models, per-source weights) of a BagOfModels or a single model."""
    if hasattr(model, "models"):
        return list(model.models), [list(w) for w in model.weights]
    return [model], [[1.0] * len(model.sources)]


def agreement_db(reference: np.ndarray, estimate: np.ndarray) -> float:
    """The worst per-source SDR of `estimate` against `reference` ((batch, sources, ...))."""
    axes = (0,) + tuple(range(2, reference.ndim))
    signal = (reference.astype(np.float64) ** 2).sum(axes)
    noise = ((reference.astype(np.float64) - estimate) ** 2).sum(axes)
    return float(np.min(10 * np.log10(np.maximum(signal, 1e-30) / np.maximum(noise, 1e-30))))


@dataclass
class Pending:
    """A forward pass under way: its output lands in `outputs` once `event` has completed."""

    model: torch.nn.Module
    inputs: torch.Tensor  # the host input, kept for an fp32 redo of a window
    outputs: torch.Tensor  # host float32 (pinned on CUDA)
    event: object = None  # torch.cuda.Event, None when already complete


class Engine:
    """A loaded model and how to run it; `separate()` streams one track through it.

    `batch`: windows per forward pass, the same for every precision; a dict gives it per
    precision ({"fp32": 4, "bf16": 8}); None (or a precision the dict lacks) sizes it from the
    device's free memory (`model.auto_batch`) when that precision first runs.
    """

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
        self.model = model
        self.models, self.model_weights = bag_of(model)
        self.sources = list(model.sources)
        self.device = device
        sizes = batch if isinstance(batch, dict) else {}
        self.fixed_batch = max(1, batch) if batch and not sizes else None
        self._batches = {p: max(1, n) for p, n in sizes.items()}  # halved on OOM
        self.halvings = 0  # passes of the last track halved for device memory
        self.precision = precision  # what runs now: fp32, bf16 or fp16
        self.probe = probe and precision in REDUCED
        self.probe_db = None  # the first window's agreement with fp32, when probed
        self.probe_recorded = False  # probe_db was read from `verdicts`, not measured here
        self.fallback_windows = 0  # windows of the last track redone in fp32 (NaN/Inf)
        self.shifts = shifts
        self.seed = seed
        self._pinned = {}
        for sub in self.models:
            sub.to(device).eval()
        # PyTorch's MultiheadAttention "fast path" materialises the attention matrix on CPU;
        # the regular path uses scaled_dot_product_attention: ~2x faster per window here,
        # same result to >130 dB (hack/bench measures it). Process-wide, set on purpose.
        torch.backends.mha.set_fastpath_enabled(False)
        # the bf16 copies of the CPU path (None: that model runs under autocast)
        self._bf16 = (
            {id(sub): bf16_copy(sub) for sub in self.models}
            if device.type == "cpu" and precision == "bf16"
            else {}
        )
        self._verdicts, self._key = verdicts, None
        if self.probe and verdicts is not None and device.type == "cpu":
            path = "bf16-blocks" if any(self._bf16.values()) else "autocast"
            self._key = verdicts.key(self.models, precision, path, hardware)
            recorded = verdicts.read(self._key)
            if recorded is not None:
                self.probe_recorded = True
                self._decide(recorded, "recorded")

    def _decide(self, db: float, how: str) -> None:
        """Keep the reduced precision if it agrees with fp32 to PARITY_DB, else run in fp32."""
        self.probe_db, self.probe = db, False
        if db < PARITY_DB:
            log.warning(
                "%s agrees with fp32 to %.1f dB only (%s, < %.0f): running in fp32",
                self.precision,
                db,
                how,
                PARITY_DB,
            )
            self.precision, self._bf16 = "fp32", {}
        else:
            log.info("%s agrees with fp32 to %.1f dB (%s): kept", self.precision, db, how)

    def batch_for(self, precision: str) -> int:
        """Windows per forward pass in `precision`."""
        if precision not in self._batches:
            if self.fixed_batch is None and self.device.type == "cuda":
                torch.cuda.empty_cache()  # memory cached by earlier passes is free for this
            self._batches[precision] = self.fixed_batch or auto_batch(self.device, precision)
        return self._batches[precision]

    @property
    def batch(self) -> int:
        """Windows per forward pass in the precision that runs now."""
        return self.batch_for(self.precision)

    def _halve(self, precision: str, size: int) -> None:
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
        self._batches[precision] = min(self.batch_for(precision), (size + 1) // 2)
        self.halvings += 1
        log.warning(
            "%s ran out of memory with %d windows per pass in %s: now %d",
            self.device,
            size,
            precision,
            self._batches[precision],
        )

    def _forward(self, model, inputs: torch.Tensor, precision: str) -> torch.Tensor:
        """`inputs` through the model synchronously, in passes of at most `batch_for(precision)`
        windows; a pass that runs out of device memory is redone in halves."""
        outputs, start = [], 0
        while start < len(inputs):
            size = min(self.batch_for(precision), len(inputs) - start)
            try:
                outputs.append(self._run(model, inputs[start : start + size], precision))
                start += size
                continue
            except OutOfMemory:
                pass
            self._halve(precision, size)
        return outputs[0] if len(outputs) == 1 else torch.cat(outputs)

    def _run(self, model, inputs: torch.Tensor, precision: str) -> torch.Tensor:
        """One synchronous forward pass on the host tensor `inputs`: float32 host output."""
        copy = self._bf16.get(id(model)) if precision == "bf16" else None
        if copy is not None:
            with torch.inference_mode():
                return copy(inputs).float()
        autocast = (
            nullcontext()
            if precision not in REDUCED
            else torch.autocast(self.device.type, dtype=REDUCED[precision])
        )
        with torch.inference_mode(), autocast:
            return model(inputs.to(self.device)).float().cpu()

    def _buffer(self, name: str, shape) -> torch.Tensor:
        """A persistent pinned host buffer, grown when a batch needs more (first batches only)."""
        buffer = self._pinned.get(name)
        if buffer is None or buffer.shape[1:] != shape[1:] or buffer.shape[0] < shape[0]:
            buffer = torch.empty(shape, dtype=torch.float32).pin_memory()
            self._pinned[name] = buffer
        return buffer[: shape[0]]

    def _launch(self, model, inputs: torch.Tensor, slot: int) -> Pending:
        """Start the forward pass of one batch; on CUDA it runs while the caller goes on."""
        if self.probe and float(inputs.abs().max()) > SILENT:
            return Pending(model, inputs, self._probed(model, inputs))
        precision = "fp32" if self.probe else self.precision  # silence before the probe
        if self.device.type == "cuda" and len(inputs) <= self.batch_for(precision):
            try:
                return self._launch_async(model, inputs, slot, precision)
            except OutOfMemory:
                pass
            self._halve(precision, len(inputs))
        return Pending(model, inputs, self._forward(model, inputs, precision))

    def _launch_async(self, model, inputs: torch.Tensor, slot: int, precision: str) -> Pending:
        """One pass on CUDA from a pinned buffer, its output copied back without waiting."""
        staged = self._buffer(f"in{slot}", tuple(inputs.shape))
        staged.copy_(inputs)
        autocast = (
            nullcontext()
            if precision not in REDUCED
            else torch.autocast("cuda", dtype=REDUCED[precision])
        )
        with torch.inference_mode(), autocast:
            out = model(staged.to(self.device, non_blocking=True)).float()
            host = self._buffer(f"out{slot}", tuple(out.shape))
            host.copy_(out, non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        return Pending(model, inputs, host, event)

    def _probed(self, model, inputs: torch.Tensor) -> torch.Tensor:
        """The first batch with signal: its first such window decides the precision, and the
        batch's other windows then run in the precision decided."""
        first = int(np.flatnonzero(inputs.flatten(1).abs().amax(1).numpy() > SILENT)[0])
        exact, reduced = self._probe(model, inputs[first : first + 1])
        kept = exact if self.precision == "fp32" else reduced
        if len(inputs) == 1:
            return kept
        others = self._forward(
            model, torch.cat([inputs[:first], inputs[first + 1 :]]), self.precision
        )
        return torch.cat([others[:first], kept, others[first:]])

    def _probe(self, model, window: torch.Tensor) -> tuple:
        """Run one window in fp32 and in the reduced precision; keep the reduced one if it
        agrees. Returns both outputs."""
        exact = self._forward(model, window, "fp32")
        reduced = self._forward(model, window, self.precision)
        finite = bool(torch.isfinite(reduced).all())
        db = agreement_db(exact.numpy(), reduced.numpy()) if finite else float("-inf")
        if self._key is not None:
            self._verdicts.write(self._key, db)
        self._decide(db, "checked")
        return exact, reduced

    def check(self, mix: np.ndarray):
        """The probe on the first window of `mix` (2, n), outside any track (image build):
        its agreement in dB, recorded when `verdicts` was given; None when nothing is probed."""
        if self.probe:
            model = self.models[0]
            segment = int(model.samplerate * model.segment)
            window = np.zeros((2, segment), np.float32)
            window[:, : min(segment, mix.shape[1])] = mix[:, :segment]
            mono = window.mean(0)
            self._probe(model, torch.from_numpy((window - mono.mean()) / mono.std())[None])
        return self.probe_db

    def _collect(self, pending: Pending) -> np.ndarray:
        """The batch's float32 output once ready; windows with NaN/Inf redone in fp32."""
        if pending.event is not None:
            pending.event.synchronize()
        out = pending.outputs.numpy()
        bad = ~np.isfinite(out.reshape(out.shape[0], -1)).all(1)
        for index in np.flatnonzero(bad):
            redo = self._forward(pending.model, pending.inputs[index : index + 1], "fp32").numpy()
            if not np.isfinite(redo).all():
                raise RuntimeError("the model's output is not finite, even in fp32")
            out[index] = redo[0]
            self.fallback_windows += 1
        if bad.any():
            log.warning(
                "%d window(s) redone in fp32: %s output was not finite",
                int(bad.sum()),
                self.precision,
            )
        return out

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
        """Separate a track of `length` samples; returns the engine's figures for the manifest
        (`fp32FallbackWindows`, `oomHalvings`, the `batch` it ended with, `devicePeakMb`).

        read(start, stop) -> (2, stop-start) float32 raw audio, zeros outside the track.
        emit(start, block) receives (sources, 2, n) de-normalised stem blocks, in order,
        covering [0, length) exactly once. `cancel` (set on SIGTERM) stops between windows and
        aborts a forward pass under way.
        """
        cancel = cancel if cancel is not None else Cancel()
        self.fallback_windows = self.halvings = 0
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        std = std if std > 1e-8 else 1.0
        streams = plan_streams(self.models, length, self.shifts, self.seed)
        adders = [OverlapAdd(s, len(self.sources)) for s in streams]
        combiner = Combiner(streams, self.model_weights, len(self.sources), length)
        # every window (position, stream, offset in the stream), in the order of the audio
        windows = sorted(((s.offset + o, i, o) for i, s in enumerate(streams) for o in s.windows()))

        def plan():
            """Consecutive windows of one model, as many as a pass in the precision that runs
            now takes (read when each batch is planned: the probe or an OOM may change it)."""
            at = 0
            while at < len(windows):
                model_index = streams[windows[at][1]].model_index
                end, size = at + 1, self.batch
                while (
                    end < len(windows)
                    and end - at < size
                    and streams[windows[end][1]].model_index == model_index
                ):
                    end += 1
                yield windows[at:end]
                at = end

        def load(batch):
            """The normalised, neighbour-padded input of each window (TensorChunk.padded)."""
            inputs = []
            for _, index, offset in batch:
                s = streams[index]
                chunk = min(s.segment, s.length - offset)
                start = offset - (s.segment - chunk) // 2
                lo, hi = max(start, 0), min(start + s.segment, s.length)  # inside the stream
                window = np.zeros((2, s.segment), np.float32)
                # the part of [lo, hi) inside the track (a shifted stream starts before it)
                first, last = max(lo, -s.offset), min(hi, length - s.offset)
                if last > first:
                    raw = read(first + s.offset, last + s.offset)
                    window[:, first - start : last - start] = (raw - mean) / std
                inputs.append(window)
            return torch.from_numpy(np.stack(inputs))

        done = 0

        def finish(batch, outputs):
            """Overlap-add one batch's outputs and emit what no later window can touch."""
            nonlocal done
            for (_, index, offset), out in zip(batch, outputs, strict=False):
                s = streams[index]
                chunk = min(s.segment, s.length - offset)
                trim = (s.segment - chunk) // 2
                adders[index].add(offset, out[..., trim : trim + chunk])
                following = offset + s.stride
                upto = min(following, s.length)
                combiner.add(index, *adders[index].finish(upto))
            taken = combiner.take()
            if taken is not None:
                start, block = taken
                block *= std  # in place: the block is the engine's own, finished
                block += mean
                emit(start, block)
            done += len(batch)
            if progress is not None:
                progress(done / len(windows))

        previous = None  # (batch, Pending): launched, not yet overlap-added
        batches = plan()
        batch = next(batches)
        with ThreadPoolExecutor(1, thread_name_prefix="read-windows") as pool:
            future = pool.submit(load, batch)
            number = 0
            while batch is not None:
                if cancel.is_set():
                    raise Interrupted()
                inputs = future.result()
                following = next(batches, None)
                if following is not None:
                    future = pool.submit(load, following)
                model = self.models[streams[batch[0][1]].model_index]
                if number == 0:
                    log.info(
                        "first window entering the model",
                        extra={"json_fields": {"event": "first_window"}},
                    )
                with cancel.abortable():
                    pending = self._launch(model, inputs, number % 2)
                    if previous is not None:
                        finish(previous[0], self._collect(previous[1]))
                previous = (batch, pending)
                batch, number = following, number + 1
            with cancel.abortable():
                finish(previous[0], self._collect(previous[1]))
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
