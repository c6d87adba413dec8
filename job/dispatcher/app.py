"""The dispatcher over HTTP: POST / or /pubsub takes a delivery, POST /sweep reports executions
that ended without a result (Cloud Scheduler), GET /health says what it
targets; a body that is no Pub/Sub delivery at all gets 400, one over MAX_BODY_BYTES 413 before
more of it is read (Cloud Run caps bodies at 32 MiB; Compose and GKE do not, and a
stem-separate delivery is a few KB). `serve` runs it with uvicorn on HTTP_HOST:PORT (Cloud Run
sets PORT).
With PUSH_AUDIENCE set, every route but /health first needs a valid Google-signed OIDC token
(auth.py; 401 otherwise), so a route added later is covered too."""

import logging

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from job import serve as serving
from job.auth import Guard
from job.dispatcher.auth import PushTokens
from job.dispatcher.envelope import EnvelopeError, parse_envelope
from job.dispatcher.service import Dispatcher
from job.dispatcher.settings import DispatcherSettings, load_dispatcher_settings

log = logging.getLogger("stem_job.dispatcher")
MAX_BODY_BYTES = 1 << 20


class BodyTooLarge(Exception):
    pass


async def bounded_body(request: Request) -> bytes:
    """The body, refused (BodyTooLarge) from its Content-Length or at the first byte over."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        raise BodyTooLarge(f"it declares {declared} bytes")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_BODY_BYTES:
            raise BodyTooLarge(f"it runs past {MAX_BODY_BYTES} bytes")
    return bytes(body)


def create_app(
    settings: DispatcherSettings | None = None,
    *,
    jobs_client=None,
    publisher_client=None,
    markers=None,
    push_tokens=None,
    sweep_clients=None,
) -> Starlette:
    """The ASGI app. Settings come from the environment unless given; `push_tokens` (a
    PushTokens) defaults to one for the settings' PUSH_AUDIENCE, if any."""
    settings = settings or load_dispatcher_settings()
    dispatcher = Dispatcher(settings, jobs_client, publisher_client, markers, sweep_clients)
    if push_tokens is None and settings.push_audience:
        push_tokens = PushTokens(settings.push_audience, settings.push_service_accounts)
    if push_tokens is None:
        log.warning(
            "no PUSH_AUDIENCE: the dispatcher trusts every caller that reaches it "
            "(on Cloud Run, IAM's run.invoker check is then the only one)"
        )

    async def receive(request: Request):
        try:
            delivery = parse_envelope(request.headers, await bounded_body(request))
        except BodyTooLarge as exc:
            log.warning("refused a request body over %d bytes: %s", MAX_BODY_BYTES, exc)
            message = f"the body is over {MAX_BODY_BYTES} bytes ({exc}): not a stem-separate push"
            return JSONResponse({"status": "too_large", "error": message}, 413)
        except EnvelopeError as exc:
            log.warning("refused a request that is not a Pub/Sub delivery: %s", exc)
            return JSONResponse({"status": "invalid_envelope", "error": str(exc)}, 400)
        outcome = await run_in_threadpool(dispatcher.dispatch, delivery)
        return JSONResponse(outcome.body, outcome.status)

    async def sweep(request: Request):  # Cloud Scheduler, every few minutes
        outcome = await run_in_threadpool(dispatcher.sweep)
        return JSONResponse(outcome.body, outcome.status)

    async def health(request: Request):
        return JSONResponse(
            {
                "status": "ok",
                "job": dispatcher.settings.job_name,
                "results_topic": dispatcher.settings.results_topic,
                "dedupe": type(dispatcher.claims.markers).__name__,
            }
        )

    guard = [Middleware(Guard, verify=push_tokens, body=refusal)] if push_tokens else []
    app = Starlette(
        routes=[
            Route("/", receive, methods=["POST"]),
            Route("/pubsub", receive, methods=["POST"]),
            Route("/sweep", sweep, methods=["POST"]),
            Route("/health", health, methods=["GET"]),
        ],
        middleware=guard,
    )
    app.state.dispatcher = dispatcher
    return app


def refusal(status: str, message: str) -> dict:
    """A refused push's JSON, shaped like the dispatcher's other answers."""
    return {"status": status, "error": message}


def serve(settings: DispatcherSettings) -> None:
    """Run the dispatcher on its host:port (job.serve: our logging; a port in use exits 75)."""
    serving.run(create_app(settings), settings.host, settings.port)
