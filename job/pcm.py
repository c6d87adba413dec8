"""The audio every step passes on: 44.1 kHz stereo float32, htdemucs_6s' own rate and layout.

The decoder resamples to it, the model separates it, the encoders and meters read it. MP3 and
the waveform peaks take 16-bit samples (`to_pcm16`), made once per block for both."""

import numpy as np

SAMPLE_RATE = 44100
CHANNELS = 2
FULL_SCALE = 32767.0


def to_pcm16(block: np.ndarray, peak: float | None = None) -> np.ndarray:
    """(n, 2) interleaved int16 of a (2, n) float block: clipped to [-1, 1], scaled by 32767 and
    rounded half to even (what LAME is fed and audiowaveform reads). `peak`, the block's
    largest magnitude where the caller knows it, spares the clip when nothing exceeds 1."""
    if peak is None or peak > 1.0:
        block = np.clip(block, -1.0, 1.0)
    scaled = np.multiply(block, FULL_SCALE)
    np.rint(scaled, out=scaled)
    pcm = np.empty((block.shape[-1], CHANNELS), np.int16)
    np.copyto(pcm.T, scaled, casting="unsafe")  # exact: whole numbers within int16
    return pcm
