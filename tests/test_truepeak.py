"""The true peak against FFmpeg's 4x `aresample` (the path it replaced, kept here as the
reference), and the bound that lets it skip stretches against the values it bounds."""

import av
import av.filter
import numpy as np
import pytest
from synthetic import music

from job.analysis.truepeak import CHUNK, TAPS, TruePeak

RATE = 44100


def ffmpeg_true_peak(signal: np.ndarray) -> float:
    """The peak of FFmpeg's aresample to four times the rate (linear)."""
    graph = av.filter.Graph()
    source = graph.add_abuffer(sample_rate=RATE, format="fltp", layout="stereo", channels=2)
    upsample = graph.add("aresample", str(4 * RATE))
    sink = graph.add("abuffersink")
    source.link_to(upsample)
    upsample.link_to(sink)
    graph.configure()
    frame = av.AudioFrame.from_ndarray(
        np.ascontiguousarray(signal, np.float32), format="fltp", layout="stereo"
    )
    frame.sample_rate, frame.pts = RATE, 0
    peak = 0.0
    for pushed in (frame, None):
        source.push(pushed)
        while True:
            try:
                peak = max(peak, float(np.abs(sink.pull().to_ndarray()).max()))
            except (av.BlockingIOError, av.EOFError):
                break
    return peak


def true_peak(signal: np.ndarray, block: int, exact: bool = False) -> float:
    meter = TruePeak(exact)
    for start in range(0, signal.shape[1], block):
        meter.add(signal[:, start : start + block])
    return meter.result()


def stereo(wave: np.ndarray) -> np.ndarray:
    return np.stack([wave, wave]).astype(np.float32)


def signals() -> dict:
    rng = np.random.default_rng(7)
    t = np.arange(5 * RATE) / RATE
    n = np.arange(5 * RATE)
    return {
        "music": music(20.0, seed=2),
        "clipped music": np.clip(music(20.0, seed=5) * 8, -1, 1),
        "square 1 kHz": stereo(0.9 * np.sign(np.sin(2 * np.pi * 1000 * t))),
        "square 11 kHz": stereo(np.sign(np.sin(2 * np.pi * 11025 * t + 0.3))),
        "sine -23 dBFS": stereo(10 ** (-23 / 20) * np.sin(2 * np.pi * 1000 * t)),
        "fs/4 at 45 degrees": stereo(0.5 * np.cos(np.pi / 2 * n + np.pi / 4)),
        "noise": (0.3 * rng.standard_normal((2, 5 * RATE))).astype(np.float32),
        "one click": stereo(np.eye(1, 3 * RATE, RATE + 5)[0] * 0.7),
        "loud start and end": stereo(np.r_[np.ones(100), np.zeros(RATE), -np.ones(77)]),
        "40 samples": (0.3 * rng.standard_normal((2, 40))).astype(np.float32),
        "whole chunks": (0.3 * rng.standard_normal((2, 10 * CHUNK + TAPS - 1))).astype(np.float32),
    }


@pytest.mark.parametrize("name", list(signals()))
def test_true_peak_is_ffmpegs_4x_oversampled_peak(name):
    signal = signals()[name]
    reference = ffmpeg_true_peak(signal)
    for block in (300_000, 12345, 1000, 7):
        found = true_peak(signal, block)
        assert abs(20 * np.log10(found / reference)) <= 1e-3, (block, found, reference)
        assert found >= np.abs(signal).max()


@pytest.mark.parametrize("name", list(signals()))
def test_skipping_never_changes_the_result(name):
    signal = signals()[name]
    for block in (300_000, 4321):
        assert true_peak(signal, block) == true_peak(signal, block, exact=True)


def test_bound_is_above_every_interpolated_value():
    """Each chunk's bound against its own interpolated values, on material that makes the
    interpolator overshoot: noise, square waves and near-Nyquist tones at random levels."""
    rng = np.random.default_rng(11)
    t = np.arange(64 * CHUNK + TAPS - 1) / RATE
    for trial in range(40):
        kind = trial % 4
        if kind == 0:
            wave = rng.standard_normal((2, t.size))
        elif kind == 1:
            wave = np.sign(np.sin(2 * np.pi * rng.uniform(20, 20000) * t + rng.uniform(0, 6)))
        elif kind == 2:
            wave = np.sin(2 * np.pi * rng.uniform(15000, 22000) * t + rng.uniform(0, 6))
        else:
            wave = rng.choice([-1.0, 1.0], t.size) * rng.uniform(0, 1, t.size)
        x = np.ascontiguousarray(
            np.broadcast_to(wave * rng.uniform(0.01, 1), (2, t.size)), np.float32
        )
        meter = TruePeak()
        bound = meter._bound(x)
        for chunk in range(64):
            meter.peak = 0.0
            meter._interpolate(x, np.array([chunk]))
            assert meter.peak <= bound[chunk], (trial, chunk)
