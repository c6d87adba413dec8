"""True peak (ITU-R BS.1770 Annex 2): the sample peak of the signal oversampled four times.

The interpolator is FFmpeg's own (libswresample's default Kaiser-windowed sinc, as its
`aresample` filter builds it for a 4x rate), so the figures are those FFmpeg gives. Computing
every interpolated sample costs more than the rest of the analysis, and almost none of them can
set the peak: each stretch of the stream is first given an upper bound from its sample peak and
its first and second differences (the interpolator is linear interpolation plus a filter of the
differences, summed by parts), and only stretches whose bound reaches the peak found so far are
interpolated. The bound is exact, so skipping never changes the result.
"""

import numpy as np

TAPS = 32  # libswresample's default filter_size; the window is x[m-15 .. m+16]
BEFORE = (TAPS - 1) // 2
AFTER = TAPS - BEFORE - 1
PHASES = 4
KAISER_BETA = 9.0
CHUNK = 64  # outputs per bounded stretch (>= TAPS - 1, so a window spans 2 chunks)
ROW = 16  # samples per row of the interpolating products (>= AFTER)
STACK = 128  # rows per BLAS call: few enough that BLAS stays on the calling thread
SLICE = 4096  # rows interpolated at a time, so the products stay small in memory
FIRST = 4  # chunks interpolated before the others are bounded again
SLACK = 1e-4  # relative margin on the bound, for float32 rounding


def interpolator() -> np.ndarray:
    """(PHASES - 1, TAPS) float32: the taps of phases 1..3, as libswresample's build_filter
    makes them for FLTP (each divided by the sum of phase 0, whose only tap is 1)."""
    i = np.arange(TAPS)
    phases = []
    for phase in range(PHASES):
        x = np.pi * ((i - BEFORE) - phase / PHASES)
        sign = (1.0 if BEFORE & 1 else -1.0) * (-1.0) ** i
        with np.errstate(divide="ignore", invalid="ignore"):
            sinc = np.where(x == 0, 1.0, np.sin(np.pi * phase / PHASES) * sign / x)
        w = 2.0 * x / (TAPS * np.pi)
        phases.append(sinc * np.i0(KAISER_BETA * np.sqrt(np.maximum(1 - w * w, 0))))
    return (np.array(phases[1:]) / phases[0].sum()).astype(np.float32)


def difference_bounds(taps: np.ndarray) -> tuple[float, float, float]:
    """(k0, k1, k2) such that each phase's output is at most
    (1 + k0) * max|x| + k1 * max|x[i] - x[i+1]| + k2 * max|x[i] - 2 x[i+1] + x[i+2]|
    over its window: the taps minus linear interpolation, summed by parts twice."""
    k0 = k1 = k2 = 0.0
    for phase, h in enumerate(taps.astype(np.float64), 1):
        rest = h.copy()
        rest[BEFORE] -= 1 - phase / PHASES
        rest[BEFORE + 1] -= phase / PHASES
        first = np.cumsum(rest)  # rest . x = first[:-1] . d1 + first[-1] x[-1]
        second = np.cumsum(first[:-1])  # first[:-1] . d1 = second[:-1] . d2 + second[-1] d1[-1]
        k0 = max(k0, abs(first[-1]))
        k1 = max(k1, abs(second[-1]))
        k2 = max(k2, np.abs(second[:-1]).sum())
    return k0, k1, k2


def row_matrices(taps: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(A, B, C): with the samples in rows of ROW, led by one sample more, the three phases of
    the ROW outputs of row r are row[r][1:] @ A + row[r + 1] @ B + row[r + 2] @ C."""
    toeplitz = np.zeros((ROW + TAPS - 1, (PHASES - 1) * ROW), np.float32)
    for out in range(ROW):
        toeplitz[out : out + TAPS, (PHASES - 1) * out : (PHASES - 1) * (out + 1)] = taps.T
    return toeplitz[: ROW - 1], toeplitz[ROW - 1 : 2 * ROW - 1], toeplitz[2 * ROW - 1 :]


def product(rows: np.ndarray, matrix: np.ndarray) -> np.ndarray:
    """rows @ matrix, STACK rows per BLAS call: a single large call would spread over threads
    that spin and cost more CPU than the product."""
    out = np.empty((rows.shape[0], matrix.shape[1]), np.float32)
    whole = rows.shape[0] // STACK * STACK
    if whole:
        step, item = rows.strides
        stacks = np.lib.stride_tricks.as_strided(
            rows, (whole // STACK, STACK, rows.shape[1]), (STACK * step, step, item)
        )
        np.matmul(stacks, matrix, out=out[:whole].reshape(-1, STACK, matrix.shape[1]))
    np.matmul(rows[whole:], matrix, out=out[whole:])
    return out


def interpolated(rows: np.ndarray) -> np.ndarray:
    """(m - 2, 3 ROW) phases 1..3 of the outputs of m rows of ROW laid out as `row_matrices`
    says (the last two rows have none: their windows run past the end)."""
    flat = rows.reshape(-1, ROW)
    values = product(flat[:-2, 1:], MATRICES[0])
    values += product(flat[1:-1], MATRICES[1])
    values += product(flat[2:], MATRICES[2])
    return values


TAPS_BY_PHASE = interpolator()
K0, K1, K2 = difference_bounds(TAPS_BY_PHASE)
MATRICES = row_matrices(TAPS_BY_PHASE)


def window_max(values: np.ndarray) -> np.ndarray:
    """Per chunk of (2, n) values, the max of |values| over both channels and the chunk's
    window (which lies within the chunk and the next one)."""
    folded = np.maximum(np.abs(values[0]), np.abs(values[1]))
    per_chunk = np.maximum.reduceat(folded, np.arange(0, folded.size, CHUNK))
    return np.maximum(per_chunk[:-1], per_chunk[1:])


class TruePeak:
    """Feed (2, n) float32 blocks with `add`; `result()` is the linear true peak.

    Output position m is the interval from sample m to m + 1, interpolated from the window
    x[m-15 .. m+16] (phase 0 is the sample itself). The stream's edges are mirrored as
    libswresample mirrors them: x[-j] = x[j] before it, x[n-1+j] = x[n-j] after it. The
    samples carried between blocks make a stream's peak the same however it is cut."""

    def __init__(self, exact: bool = False):
        self.exact = exact  # interpolate everything (what the bound is tested against)
        self.peak = 0.0
        self.started = False
        self.buffer = np.zeros((2, 0), np.float32)  # x[m - 15:] for the next position m

    def add(self, block: np.ndarray) -> None:
        self.buffer = np.concatenate([self.buffer, np.asarray(block, np.float32)], axis=1)
        if not self.started:
            if self.buffer.shape[1] <= BEFORE:
                return
            self._start()
        self._process()

    def result(self) -> float:
        if not self.started:
            if not self.buffer.shape[1]:
                return 0.0
            self._start()
        mirror = self.buffer[:, ::-1][:, :AFTER]
        self.buffer = np.concatenate([self.buffer, mirror], axis=1)
        self._process()
        if self.buffer.shape[1] >= TAPS:  # the last partial chunk
            windows = np.lib.stride_tricks.sliding_window_view(self.buffer, TAPS, axis=1)
            self._raise(self.buffer[:, BEFORE:-AFTER])
            self._raise(windows.reshape(-1, TAPS) @ TAPS_BY_PHASE.T)
        return self.peak

    def _start(self) -> None:
        head = self.buffer[:, BEFORE:0:-1]
        missing = np.zeros((2, BEFORE - head.shape[1]), np.float32)  # a stream this short
        self.buffer = np.concatenate([missing, head, self.buffer], axis=1)
        self.started = True

    def _raise(self, values: np.ndarray) -> None:
        if values.size:
            self.peak = max(self.peak, float(values.max()), -float(values.min()))

    def _process(self) -> None:
        """Measure the whole chunks whose windows are in the buffer, and drop their samples."""
        chunks = (self.buffer.shape[1] - TAPS + 1) // CHUNK
        if chunks <= 0:
            return
        x = self.buffer[:, : chunks * CHUNK + TAPS - 1]
        self._raise(x[:, BEFORE : BEFORE + chunks * CHUNK])  # phase 0
        if self.exact:
            self._interpolate(x, np.arange(chunks))
        else:
            bound = self._bound(x)
            order = np.argsort(-bound)
            first, rest = order[:FIRST], order[FIRST:]
            rows = self._interpolate(x, first[bound[first] > self.peak])
            self._interpolate(x, rest[bound[rest] > self.peak], rows)  # against the new peak
        self.buffer = self.buffer[:, chunks * CHUNK :]

    def _bound(self, x: np.ndarray) -> np.ndarray:
        """Each chunk's bound on its interpolated values (a coarse one where that already
        rules all of them out)."""
        m0 = window_max(x)
        coarse = m0 * (1 + K0 + 2 * K1 + 4 * K2) * (1 + SLACK)  # |d1| <= 2 max|x|, |d2| <= 4
        if not (coarse > self.peak).any():
            return coarse
        return (m0 * (1 + K0 + 2 * K1) + K2 * window_max(np.diff(x, 2))) * (1 + SLACK)

    def _interpolate(self, x: np.ndarray, chunks: np.ndarray, rows: np.ndarray | None = None):
        """Raise the peak to the largest interpolated value of these chunks of x; returns x
        as `interpolated` takes it, for the next call on the same x."""
        if not len(chunks):
            return rows
        per_chunk = CHUNK // ROW
        total = (x.shape[1] - TAPS + 1) // CHUNK
        if rows is None:
            led = np.zeros((2, (total * per_chunk + 2) * ROW), np.float32)
            led[:, 1 : 1 + x.shape[1]] = x
            rows = led.reshape(2, -1, ROW)
        if 3 * len(chunks) > total:  # most of them: all, without gathering rows
            for channel in rows:
                for start in range(0, len(channel) - 2, SLICE):
                    self._raise(interpolated(channel[start : start + SLICE + 2]))
            return rows
        picked = chunks[:, None] * per_chunk + np.arange(per_chunk + 2)
        values = interpolated(rows[:, picked.reshape(-1)])
        values = np.concatenate([values, values[:2]])  # whole groups again
        self._raise(values.reshape(-1, per_chunk + 2, values.shape[1])[:, :per_chunk])
        return rows
