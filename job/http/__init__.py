"""`stem-job serve`: the original worker's HTTP API, on the same pipeline as `run` and `drain`.

    POST /separate/{release_id}/{track_id}[?outputs=vocals,instrumental,drums%2Bbass]
                                             multipart/form-data, the audio in field `file`
                                             (or in any one part that has a filename)
         -> 200 {"status": "success", "release_id", "track_id", "stems": {...}, + extras
                 (`outputs`: per output its url, peaks, loudness, silent flag)}
    GET  /health -> {"status": "ok", "processing_mode", "storage_mode", "device", "model", ...}

Every error is JSON: {"status": "failed", "error": {"code", "message", "retryable"}}, with
400 (no file, empty file, broken or unfinished upload), 413 (over MAX_INPUT_BYTES),
415 (not an audio type, or not multipart), 422 (bad IDs, not audio, corrupt, truncated,
longer than MAX_DURATION_S), 503 + Retry-After (busy, or a fault a retry may fix), 500.
One module per idea, each importing only those below it:

  server      `serve`: who may call, the model loaded, uvicorn until SIGTERM
  app         the FastAPI app: routes, the token guard, 404/405
  routes      what each route does, and the one error shape
  gate        one separation at a time, HTTP_QUEUE behind it, room on disk per upload
  multipart   the upload streamed to a temp file; what the headers alone refuse
"""
