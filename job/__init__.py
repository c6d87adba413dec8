"""stem-job: one music track in, six Demucs stems out, as a batch job."""
