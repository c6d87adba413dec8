"""What the encoders measure of each stem as it passes: waveform peaks, loudness, true peak."""
