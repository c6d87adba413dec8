"""Names vulture (dead-code finder, run by tests/test_structure.py) takes for unused, and why
they are not: each is read by something vulture cannot see."""

# click calls a parameter callback as callback(ctx, param, value)
param  # noqa: B018, F821
# signal handlers, forward hooks: the caller's signature (signum, frame) / (module, args, output)
signum  # noqa: B018, F821
module  # noqa: B018, F821
# attributes third-party code reads: PyAV's frame timestamps, the logging library's
# once-only flag, torch.backends.cudnn.benchmark, blob.cache_control sent with an upload,
# the AAC encoder's bitrate PyAV passes to FFmpeg
_.pts  # noqa: B018, F821
_.bit_rate  # noqa: B018, F821
_._instrumentation_emitted  # noqa: B018, F821
_.benchmark  # noqa: B018, F821
_.cache_control  # noqa: B018, F821
# a click command, registered by its decorator
prefetch_model  # noqa: B018, F821
# a FastAPI route, registered by its decorator
post_separate  # noqa: B018, F821
# the exit-code table (click's usage error is 2; the k8s podFailurePolicy names it)
EXIT_USAGE  # noqa: B018, F821
# the Storage protocol's Commit: the interface both backends' commits implement
Commit  # noqa: B018, F821
