"""The `stem-job` command line: run one track, drain a subscription, serve HTTP."""

import json
import os
import sys
import traceback

import click

from job import messages, runtime
from job.config import ConfigError, load_settings, parse
from job.errors import (
    EXIT_CONFIG,
    EXIT_OK,
    EXIT_RETRY,
    EXIT_UNPUBLISHED,
    Cancel,
    Interrupted,
    JobError,
    exit_code_for,
)
from job.logs import setup_logging


def settings_or_exit(**overrides):
    try:
        return load_settings(**overrides)
    except ConfigError as exc:
        runtime.fail_config(str(exc))


def checked(variable: str):
    """A click callback validating a flag exactly as its env variable (config.parse); a bad
    value is a usage error (exit 2) naming the flag."""

    def callback(ctx, param, value):
        if value is None:
            return None
        try:
            return parse(variable, value)
        except ConfigError as exc:
            raise click.BadParameter(f"{exc} (flag for {variable})") from None

    return callback


@click.group(invoke_without_command=True)
@click.pass_context
def cli(ctx):
    """Separate music tracks into six stems with Demucs (see README)."""
    if ctx.invoked_subcommand is None:
        mode = settings_or_exit().processing_mode
        ctx.invoke({"job": run, "pubsub": drain, "http": serve}[mode])


def request_from(input_, release_id, track_id, artist_id, job_id, mime_type, message):
    """(request, trusted) from flags, else from env; JobError if malformed."""
    env = os.environ
    if message is not None:
        return messages.parse_message(message), False
    if input_ is not None or release_id or track_id:
        if not (input_ and release_id and track_id):
            raise click.UsageError("--input, --release-id and --track-id go together")
        return messages.make_request(
            release_id, track_id, input_, job_id, artist_id, mime_type
        ), True
    if env.get("JOB_MESSAGE"):
        return messages.parse_message(env["JOB_MESSAGE"]), False
    if env.get("ORIGINAL_STEM_URI") or env.get("RELEASE_ID") or env.get("TRACK_ID"):
        missing = [v for v in ("ORIGINAL_STEM_URI", "RELEASE_ID", "TRACK_ID") if not env.get(v)]
        if missing:
            raise JobError(
                "invalid_message",
                f"{', '.join(missing)} must be set with ORIGINAL_STEM_URI/RELEASE_ID/TRACK_ID",
            )
        return messages.make_request(
            env["RELEASE_ID"],
            env["TRACK_ID"],
            env["ORIGINAL_STEM_URI"],
            env.get("JOB_ID"),
            env.get("ARTIST_ID"),
            env.get("MIME_TYPE"),
        ), False
    raise click.UsageError(
        "nothing to do: give --input/--release-id/--track-id or --message, "
        "or set JOB_MESSAGE or ORIGINAL_STEM_URI+RELEASE_ID+TRACK_ID"
    )


def no_credentials(exc: BaseException):
    """JobError(no_credentials) when `exc` is about missing credentials, else None (imported
    here: google.auth is not for `--help` or a local run)."""
    from job.faults import no_credentials as classify

    return classify(exc)


def emit_result(result: dict) -> None:
    click.echo(json.dumps(result, separators=(",", ":")))


@cli.command()
@click.option("--input", "input_", help="Local path (or gs:// URI in gcs mode) of the original.")
@click.option(
    "--release-id", help="The release (output folder's first level); with --input, --track-id."
)
@click.option(
    "--track-id", help="The track (output folder's second level); with --input, --release-id."
)
@click.option("--artist-id", help="Echoed in the result (env: ARTIST_ID).")
@click.option("--job-id", help="The result's jobId (default sep_RELEASE_TRACK; env: JOB_ID).")
@click.option("--mime-type", help="What the caller says the original is (env: MIME_TYPE).")
@click.option("--message", help="A stem-separate message (JSON or base64 JSON).")
@click.option("--output-dir", callback=checked("OUTPUT_DIR"), help="Overrides OUTPUT_DIR.")
@click.option("--model-dir", callback=checked("MODEL_DIR"), help="Overrides MODEL_DIR.")
@click.option("--device", callback=checked("DEVICE"), help="Overrides DEVICE (auto, cpu, cuda).")
@click.option(
    "--format",
    "output_format",
    callback=checked("OUTPUT_FORMAT"),
    help="Overrides OUTPUT_FORMAT (mp3, wav, flac).",
)
@click.option(
    "--outputs",
    callback=checked("OUTPUTS"),
    help="Overrides OUTPUTS (comma-separated: the model's sources, instrumental, no_SOURCE, "
    "A+B, ni_stems; e.g. vocals,instrumental).",
)
def run(
    input_=None,
    release_id=None,
    track_id=None,
    artist_id=None,
    job_id=None,
    mime_type=None,
    message=None,
    output_dir=None,
    model_dir=None,
    device=None,
    output_format=None,
    outputs=None,
):
    """Separate one track; print the result JSON as the last line of stdout.

    The track comes from --message or JOB_MESSAGE, else from --input/--release-id/--track-id
    or their env variables. Exit 0 completed (or reused), 65 bad input, 75 retry may help
    (and interrupted), 78 configuration; see the README's exit codes and docs/errors.md.
    """
    raw = message if message is not None else os.environ.get("JOB_MESSAGE", "")
    try:
        settings = load_settings(
            output_dir=output_dir,
            model_dir=model_dir,
            device=device,
            output_format=output_format,
            outputs=None if outputs is None else ",".join(outputs),
        )
    except ConfigError as exc:  # nothing to publish with: the result is printed only
        finish_run(
            None,
            messages.failed_result(messages.salvage_ids(raw), JobError("config", str(exc))),
            runtime.Attempt.from_env(None),
        )
    setup_logging(settings.log_format)
    attempt = runtime.Attempt.from_env(settings)
    cancel = Cancel()
    runtime.on_sigterm(cancel)  # before torch's import: a task timeout may come at once
    try:
        request, trusted = request_from(
            input_, release_id, track_id, artist_id, job_id, mime_type, message
        )
    except JobError as error:
        finish_run(settings, messages.failed_result(messages.salvage_ids(raw), error), attempt)
    finish_run(settings, run_track(settings, request, trusted, cancel, attempt), attempt)


def run_track(settings, request, trusted: bool, cancel: Cancel, attempt) -> dict:
    """The track's result, whatever happens: a configuration error or a fault nobody foresaw
    becomes a failed result too, so it is printed and, where it is final, published."""
    ids = messages.request_ids(request)
    try:
        # imported once the request is valid: torch takes seconds, a bad request should not wait
        from job.pipeline import Job, process
        from job.separation.model import ModelCache

        storage = runtime.make_storage(settings)
        runtime.preflight(
            settings,
            storage,
            runtime.results_publisher(settings) if settings.gcp_project_id else None,
        )
        if cancel.is_set():
            raise Interrupted()
        job = Job(
            settings,
            storage,
            ModelCache(settings),
            cancel,
            on_progress=runtime.progress_reporter(settings, request),
            attempt=attempt.earlier,
        )
        return process(request, job, trusted=trusted)
    except ConfigError as exc:
        return messages.failed_result(ids, JobError("config", str(exc)))
    except JobError as error:
        return messages.failed_result(ids, error)
    except Exception as exc:
        fault = no_credentials(exc)
        if fault is None:
            traceback.print_exc()
            fault = JobError("internal_error", f"{type(exc).__name__}: {exc}")
        return messages.failed_result(ids, fault)


def finish_run(settings, result: dict, attempt: runtime.Attempt | None = None):
    """Print the result; publish it when it is the message's final one and a project is set;
    exit with the code platforms read.

    A retryable failure is final only on Cloud Run's last attempt (before that a retry comes).
    On Cloud Run a task whose final result was published and is not retryable exits 0: Cloud Run
    retries every other exit, and the retry would report the track a second time. A last attempt
    that could not publish exits 69, which the dispatcher's sweep reads as "no result"."""
    attempt = attempt or runtime.Attempt()
    emit_result(result)
    error = JobError(**result["error"]) if result.get("error") else None
    code = exit_code_for(error)
    if error is not None and error.is_config:
        click.echo(f"stem-job: configuration error: {error.message}", err=True)
    final = error is None or not error.retryable or attempt.last
    published = False
    if final and settings is not None and settings.gcp_project_id:
        try:
            runtime.results_publisher(settings).publish_result(result)
            published = True
        except Exception as exc:
            failure = exc if isinstance(exc, JobError) else no_credentials(exc)
            if failure is None:
                raise
            click.echo(f"stem-job: result not published: {failure.message}", err=True)
            code = exit_code_for(failure)
    if final and attempt.last and not published:
        code = EXIT_UNPUBLISHED
    elif attempt.cloud_run and published and not (error and error.retryable):
        code = EXIT_OK
    sys.exit(code)


@cli.command()
@click.option("--max-messages", callback=checked("MAX_MESSAGES"), help="Overrides MAX_MESSAGES.")
@click.option(
    "--idle-timeout", callback=checked("IDLE_TIMEOUT_S"), help="Overrides IDLE_TIMEOUT_S (seconds)."
)
def drain(max_messages=None, idle_timeout=None):
    """Pull up to --max-messages from PUBSUB_SUBSCRIPTION and process them, then exit.

    Each message is acked once its result is published (a bad one too, as `failed`); an
    unfinished one is nacked for the next worker. Exits 0 when the batch is done or the
    subscription stays empty for --idle-timeout; 75 when Pub/Sub is unreachable.
    """
    settings = settings_or_exit(max_messages=max_messages, idle_timeout_s=idle_timeout)
    setup_logging(settings.log_format)
    from job.drain import drain as run_drain  # imports the Pub/Sub client: not for `run`

    try:
        code = run_drain(settings)
    except ConfigError as exc:
        runtime.fail_config(str(exc))
    sys.exit(code)


def http_options(command):
    command = click.option("--port", callback=checked("PORT"), help="Overrides PORT.")(command)
    return click.option("--host", callback=checked("HTTP_HOST"), help="Overrides HTTP_HOST.")(
        command
    )


@cli.command()
@http_options
def serve(host=None, port=None):
    """The original worker's HTTP API: POST /separate/{release_id}/{track_id}, GET /health."""
    settings = settings_or_exit(http_host=host, http_port=port)
    setup_logging(settings.log_format)
    from job.http.server import serve as run_server  # FastAPI and uvicorn: only `serve` needs them

    try:
        run_server(settings)
    except ConfigError as exc:
        runtime.fail_config(str(exc))


@cli.command()
@http_options
def dispatch(host=None, port=None):
    """The Cloud Run dispatcher: Pub/Sub push or Eventarc in, one job execution per message."""
    from job import dispatcher  # Starlette and the Cloud Run client: only `dispatch` needs them

    try:
        settings = dispatcher.load_dispatcher_settings(http_host=host, http_port=port)
    except ConfigError as exc:
        runtime.fail_config(str(exc))
    setup_logging(settings.log_format)
    dispatcher.serve(settings)


@cli.command("prefetch-model")
def prefetch_model():
    """Download and cache the model (or check MODEL_DIR loads), so later runs work offline."""
    settings = settings_or_exit()
    setup_logging(settings.log_format)
    from job.separation.model import ModelCache

    cache = ModelCache(settings)
    try:
        separator = cache.engine()
        weights = cache.identity()["digest"]
    except ConfigError as exc:
        runtime.fail_config(str(exc))
    click.echo(
        f"model {settings.model_name} ready: sources {', '.join(separator.sources)}; "
        f"weights {weights}"
    )
    # reduced precision is checked against fp32 now, once, and the verdict recorded for runs
    from job.separation.precision import music

    db = separator.check(music(10.0))
    if db is not None:
        verdict = (
            "fp32 is used" if separator.precision == "fp32" else f"{separator.precision} is kept"
        )
        how = "found recorded" if separator.probe_recorded else "measured now"
        click.echo(
            f"reduced precision agrees with fp32 to {db:.1f} dB on this "
            f"{separator.device.type} ({how}): {verdict}"
        )


def main():
    """The CLI, left through runtime.exit_now so the exit code is the documented one whatever
    is still loading (job/__main__.py chooses the allocator before this module loads)."""
    try:
        cli(prog_name="stem-job")
        code = 0
    except SystemExit as done:
        code = done.code if isinstance(done.code, int) else (0 if done.code is None else 1)
        if isinstance(done.code, str):
            sys.stderr.write(done.code + "\n")
    except Exception as exc:
        fault = no_credentials(exc)
        if fault is not None:  # one line, no traceback: someone must set up the identity
            sys.stderr.write(f"stem-job: configuration error: {fault.message}\n")
            code = EXIT_CONFIG
        else:  # a bug, not a verdict on the input: a retry may help
            traceback.print_exc()
            code = EXIT_RETRY
    runtime.exit_now(code)
