"""The model and how it runs: loading and caching it, the streaming engine, reduced precision."""
