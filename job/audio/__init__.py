"""The original in, the stems out: decoding (in a bounded child), file signatures, the
encoders, the MP3 writer."""
