"""Where originals come from and stems go: `base.Storage` and its local and GCS backends."""
