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
"""

import logging
import random
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass

import numpy as np
import torch

from .errors import Cancel, Interrupted
from .precision import bf16_copy

OVERLAP = 0.25
PARITY_DB = 35.0              # reduced precision is kept only this close to fp32 (SDR)
REDUCED = {"bf16": torch.bfloat16, "fp16": torch.float16}
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
    skip: int = 0                 # leading virtual samples that are not output (shift)

    def windows(self):
        return range(0, self.length, self.stride)


class OverlapAdd:
    """Accumulates weighted window outputs of one stream and yields finished stretches."""

    def __init__(self, stream: Stream, sources: int):
        self.stream = stream
        self.start = 0            # virtual position of buf[..., 0]
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
            np.multiply(weight[overlap:], chunk[..., overlap:], out=out[..., lo + overlap:])
            total[lo + overlap:] = weight[overlap:]
            self.out, self.sum = out, total
        if overlap:
            self.out[..., lo:lo + overlap] += weight[:overlap] * chunk[..., :overlap]
            self.sum[lo:lo + overlap] += weight[:overlap]

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
        self.scale = [(np.asarray(model_weights[s.model_index], np.float64) / totals / shifts)
                      .astype(np.float32)[:, None, None] for s in streams]
        self.pending = [[] for _ in streams]     # finished pieces not yet combined
        self.ends = [0] * len(streams)            # original position each stream reached
        self.emitted = 0

    def add(self, index: int, start: int, block: np.ndarray):
        stream = self.streams[index]
        lo = max(start, stream.skip)
        block = block[..., lo - start:]
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
            total = total + self.scale[i] * joined[..., :n] if len(self.streams) > 1 else joined[..., :n]
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
        weight = np.concatenate([np.arange(1, segment // 2 + 1),
                                 np.arange(segment - segment // 2, 0, -1)]).astype(np.float32)
        weight = weight / weight.max()
        if shifts == 0:
            streams.append(Stream(index, 0, length, segment, stride, weight))
            continue
        max_shift = int(0.5 * model.samplerate)
        for _ in range(shifts):
            off = rng.randint(0, max_shift)
            streams.append(Stream(index, off - max_shift, length + max_shift - off, segment,
                                  stride, weight, skip=max_shift - off))
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
    inputs: torch.Tensor          # the host input, kept for an fp32 redo of a window
    outputs: torch.Tensor         # host float32 (pinned on CUDA)
    event: object = None          # torch.cuda.Event, None when already complete


class Separator:
    """A loaded model and how to run it; `separate()` streams one track through it."""

    def __init__(self, model, device: torch.device, batch: int = 1, precision: str = "fp32",
                 shifts: int = 0, seed: int = 0, probe: bool = False, verdicts=None,
                 hardware: str = ""):
        self.model = model
        self.models, self.model_weights = bag_of(model)
        self.sources = list(model.sources)
        self.device = device
        self.batch = max(1, batch)
        self.precision = precision        # what runs now: fp32, bf16 or fp16
        self.probe = probe and precision in REDUCED
        self.probe_db = None              # the first window's agreement with fp32, when probed
        self.probe_recorded = False       # probe_db was read from `verdicts`, not measured here
        self.fallback_windows = 0         # windows of the last track redone in fp32 (NaN/Inf)
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
        self._bf16 = {id(sub): bf16_copy(sub) for sub in self.models} \
            if device.type == "cpu" and precision == "bf16" else {}
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
            log.warning("%s agrees with fp32 to %.1f dB only (%s, < %.0f): running in fp32",
                        self.precision, db, how, PARITY_DB)
            self.precision, self._bf16 = "fp32", {}
        else:
            log.info("%s agrees with fp32 to %.1f dB (%s): kept", self.precision, db, how)

    def _run(self, model, inputs: torch.Tensor, precision: str) -> torch.Tensor:
        """One synchronous forward pass on the host tensor `inputs`: float32 host output."""
        copy = self._bf16.get(id(model)) if precision == "bf16" else None
        if copy is not None:
            with torch.inference_mode():
                return copy(inputs).float()
        autocast = nullcontext() if precision not in REDUCED else \
            torch.autocast(self.device.type, dtype=REDUCED[precision])
        with torch.inference_mode(), autocast:
            return model(inputs.to(self.device)).float().cpu()

    def _buffer(self, name: str, shape) -> torch.Tensor:
        """A persistent pinned host buffer, grown when a batch needs more (first batches only)."""
        buffer = self._pinned.get(name)
        if buffer is None or buffer.shape[1:] != shape[1:] or buffer.shape[0] < shape[0]:
            buffer = torch.empty(shape, dtype=torch.float32).pin_memory()
            self._pinned[name] = buffer
        return buffer[:shape[0]]

    def _launch(self, model, inputs: torch.Tensor, slot: int) -> Pending:
        """Start the forward pass of one batch; on CUDA it runs while the caller goes on."""
        if self.probe and float(inputs.abs().max()) > 1e-3:
            return Pending(model, inputs, self._probe(model, inputs))
        precision = "fp32" if self.probe else self.precision   # silence before the probe
        if self.device.type != "cuda":
            return Pending(model, inputs, self._run(model, inputs, precision))
        staged = self._buffer(f"in{slot}", tuple(inputs.shape))
        staged.copy_(inputs)
        autocast = nullcontext() if precision not in REDUCED else \
            torch.autocast("cuda", dtype=REDUCED[precision])
        with torch.inference_mode(), autocast:
            out = model(staged.to(self.device, non_blocking=True)).float()
            host = self._buffer(f"out{slot}", tuple(out.shape))
            host.copy_(out, non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        return Pending(model, inputs, host, event)

    def _probe(self, model, inputs: torch.Tensor) -> torch.Tensor:
        """Run a batch in fp32 and in the reduced precision; keep the reduced one if it agrees."""
        exact = self._run(model, inputs, "fp32")
        reduced = self._run(model, inputs, self.precision)
        finite = bool(torch.isfinite(reduced).all())
        db = agreement_db(exact.numpy(), reduced.numpy()) if finite else float("-inf")
        if self._key is not None:
            self._verdicts.write(self._key, db)
        self._decide(db, "checked")
        return exact

    def check(self, mix: np.ndarray):
        """The probe on the first window of `mix` (2, n), outside any track (image build):
        its agreement in dB, recorded when `verdicts` was given; None when nothing is probed."""
        if self.probe:
            model = self.models[0]
            segment = int(model.samplerate * model.segment)
            window = np.zeros((2, segment), np.float32)
            window[:, :min(segment, mix.shape[1])] = mix[:, :segment]
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
            redo = self._run(pending.model, pending.inputs[index:index + 1], "fp32").numpy()
            if not np.isfinite(redo).all():
                raise RuntimeError("the model's output is not finite, even in fp32")
            out[index] = redo[0]
            self.fallback_windows += 1
        if bad.any():
            log.warning("%d window(s) redone in fp32: %s output was not finite", int(bad.sum()),
                        self.precision)
        return out

    def separate(self, read, length: int, mean: float, std: float, emit,
                 progress=None, cancel: Cancel | None = None) -> dict:
        """Separate a track of `length` samples; returns {"fp32FallbackWindows": n}.

        read(start, stop) -> (2, stop-start) float32 raw audio, zeros outside the track.
        emit(start, block) receives (sources, 2, n) de-normalised stem blocks, in order,
        covering [0, length) exactly once. `cancel` (set on SIGTERM) stops between windows and
        aborts a forward pass under way.
        """
        cancel = cancel if cancel is not None else Cancel()
        self.fallback_windows = 0
        std = std if std > 1e-8 else 1.0
        streams = plan_streams(self.models, length, self.shifts, self.seed)
        adders = [OverlapAdd(s, len(self.sources)) for s in streams]
        combiner = Combiner(streams, self.model_weights, len(self.sources), length)
        # every window (position, stream, offset in the stream), in the order of the audio
        windows = sorted(((s.offset + o, i, o) for i, s in enumerate(streams) for o in s.windows()))
        batches, current = [], []
        for window in windows:
            if current and (len(current) == self.batch or
                            streams[current[0][1]].model_index != streams[window[1]].model_index):
                batches.append(current)
                current = []
            current.append(window)
        if current:
            batches.append(current)

        def load(batch):
            """The normalised, neighbour-padded input of each window (TensorChunk.padded)."""
            inputs = []
            for _, index, offset in batch:
                s = streams[index]
                chunk = min(s.segment, s.length - offset)
                start = offset - (s.segment - chunk) // 2
                lo, hi = max(start, 0), min(start + s.segment, s.length)   # inside the stream
                window = np.zeros((2, s.segment), np.float32)
                # the part of [lo, hi) inside the track (a shifted stream starts before it)
                first, last = max(lo, -s.offset), min(hi, length - s.offset)
                if last > first:
                    raw = read(first + s.offset, last + s.offset)
                    window[:, first - start:last - start] = (raw - mean) / std
                inputs.append(window)
            return torch.from_numpy(np.stack(inputs))

        done = 0

        def finish(batch, outputs):
            """Overlap-add one batch's outputs and emit what no later window can touch."""
            nonlocal done
            for (_, index, offset), out in zip(batch, outputs):
                s = streams[index]
                chunk = min(s.segment, s.length - offset)
                trim = (s.segment - chunk) // 2
                adders[index].add(offset, out[..., trim:trim + chunk])
                following = offset + s.stride
                upto = min(following, s.length)
                combiner.add(index, *adders[index].finish(upto))
            taken = combiner.take()
            if taken is not None:
                start, block = taken
                block *= std          # in place: the block is the engine's own, finished
                block += mean
                emit(start, block)
            done += len(batch)
            if progress is not None:
                progress(done / len(windows))

        previous = None                  # (batch, Pending): launched, not yet overlap-added
        with ThreadPoolExecutor(1, thread_name_prefix="read-windows") as pool:
            future = pool.submit(load, batches[0])
            for number, batch in enumerate(batches):
                if cancel.is_set():
                    raise Interrupted()
                inputs = future.result()
                if number + 1 < len(batches):
                    future = pool.submit(load, batches[number + 1])
                model = self.models[streams[batch[0][1]].model_index]
                if number == 0:
                    log.info("first window entering the model", extra={"json_fields": {"event": "first_window"}})
                with cancel.abortable():
                    pending = self._launch(model, inputs, number % 2)
                    if previous is not None:
                        finish(previous[0], self._collect(previous[1]))
                previous = (batch, pending)
            with cancel.abortable():
                finish(previous[0], self._collect(previous[1]))
        return {"fp32FallbackWindows": self.fallback_windows}
