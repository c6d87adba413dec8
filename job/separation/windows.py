"""Where a track's windows lie and how their outputs add back up: demucs' reference geometry.

The same window offsets and triangular weights as `apply_model(split=True, overlap=0.25)`, the
same padding from neighbouring audio (`TensorChunk.padded`) to the length the model takes
(`input_size`), the same centre trim of its output, the same shift offsets for `shifts > 0`, the
same normalisation by the mono mix's mean/std. What differs is the shape:
windows are read one at a time and their outputs finished stretch by stretch, so nothing here
holds the whole track. No model runs here (job/separation/engine.py runs it).
"""

import random
from dataclasses import dataclass

import numpy as np

OVERLAP = 0.25


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
    valid: object = None  # the model's valid_length, when it has one (input_size)

    def windows(self):
        return range(0, self.length, self.stride)

    def chunk(self, offset: int) -> int:
        """How many samples the window at `offset` outputs (fewer at the stream's end)."""
        return min(self.segment, self.length - offset)

    def input_size(self, chunk: int) -> int:
        """The length of the input of a window of `chunk` samples, as apply_model pads it:
        `valid_length` (HTDemucs: its training length; Demucs: what its convolutions fit),
        else the chunk itself (HDemucs pads inside)."""
        return int(self.valid(chunk)) if self.valid is not None else chunk


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

    def __init__(self, streams, model_weights, sources: int):
        self.streams = streams
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
        valid = getattr(model, "valid_length", None)
        if shifts == 0:
            streams.append(Stream(index, 0, length, segment, stride, weight, valid=valid))
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
                    valid=valid,
                )
            )
    return streams


def bag_of(model):
    """(sub-models, per-source weights) of a BagOfModels or a single model."""
    if hasattr(model, "models"):
        return list(model.models), [list(w) for w in model.weights]
    return [model], [[1.0] * len(model.sources)]


class TrackWindows:
    """One track's windows over its streams, in the order of the audio: the normalised input
    each reads, and the finished, de-normalised output once their outputs are added.

    A window is (position in the track, stream index, offset in the stream).
    """

    def __init__(self, streams, model_weights, sources: int, length: int, mean, std):
        self.streams, self.length = streams, length
        self.mean, self.std = mean, std if std > 1e-8 else 1.0
        self.adders = [OverlapAdd(s, sources) for s in streams]
        self.combiner = Combiner(streams, model_weights, sources)
        self.order = sorted(
            (s.offset + o, i, o) for i, s in enumerate(streams) for o in s.windows()
        )

    def __len__(self) -> int:
        return len(self.order)

    def model_of(self, batch) -> int:
        """The index of the model that computes `batch` (one model per batch)."""
        return self.streams[batch[0][1]].model_index

    def shape_of(self, window) -> tuple:
        """(model, input length): windows that share it can run in one pass."""
        stream = self.streams[window[1]]
        return stream.model_index, stream.input_size(stream.chunk(window[2]))

    def batches(self, size):
        """Consecutive windows of one model and input length, at most `size()` of them (called
        as each batch is planned: the precision that runs, and so the size, may change during
        the track)."""
        at = 0
        while at < len(self.order):
            shape = self.shape_of(self.order[at])
            end, most = at + 1, size()
            while (
                end < len(self.order)
                and end - at < most
                and self.shape_of(self.order[end]) == shape
            ):
                end += 1
            yield self.order[at:end]
            at = end

    def inputs(self, batch, read) -> np.ndarray:
        """(windows, 2, input length): the normalised, neighbour-padded input of each window
        (TensorChunk.padded); read(start, stop) gives the raw track, zeros outside it."""
        inputs = []
        for _, index, offset in batch:
            s = self.streams[index]
            chunk = s.chunk(offset)
            size = s.input_size(chunk)
            start = offset - (size - chunk) // 2
            lo, hi = max(start, 0), min(start + size, s.length)  # inside the stream
            window = np.zeros((2, size), np.float32)
            # the part of [lo, hi) inside the track (a shifted stream starts before it)
            first, last = max(lo, -s.offset), min(hi, self.length - s.offset)
            if last > first:
                raw = read(first + s.offset, last + s.offset)
                window[:, first - start : last - start] = (raw - self.mean) / self.std
            inputs.append(window)
        return np.stack(inputs)

    def add(self, batch, outputs):
        """Overlap-add one batch's outputs: (start, block) of the de-normalised stems
        (sources, 2, n) that no later window can touch, or None when there is none yet."""
        for (_, index, offset), out in zip(batch, outputs, strict=False):
            s = self.streams[index]
            chunk = s.chunk(offset)
            trim = (out.shape[-1] - chunk) // 2  # demucs' center_trim
            self.adders[index].add(offset, out[..., trim : trim + chunk])
            upto = min(offset + s.stride, s.length)
            self.combiner.add(index, *self.adders[index].finish(upto))
        taken = self.combiner.take()
        if taken is None:
            return None
        start, block = taken
        block *= self.std  # in place: the block is the engine's own, finished
        block += self.mean
        return start, block
