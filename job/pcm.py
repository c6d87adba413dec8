"""The audio every step passes on: 44.1 kHz stereo float32, htdemucs_6s' own rate and layout.

The decoder resamples to it, the model separates it, the encoders and meters read it."""

SAMPLE_RATE = 44100
CHANNELS = 2
