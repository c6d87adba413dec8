"""Decoding the original (in a bounded child), its file signatures, the stem encoders, the MP3 writer."""
