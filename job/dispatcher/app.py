"""The dispatcher over HTTP: POST / or /pubsub takes a delivery, GET /health says what it
targets; a body that is no Pub/Sub delivery at all gets 400. `serve` runs it with uvicorn on HTTP_HOST:PORT (Cloud Run sets PORT)."""

import logging

import uvicorn
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from .envelope import EnvelopeError, parse_envelope
from .service import Dispatcher
from .settings import DispatcherSettings, load_dispatcher_settings

log = logging.getLogger("stem_job.dispatcher")


def create_app(settings: DispatcherSettings | None = None, *, jobs_client=None,
               publisher_client=None, markers=None, sweep_clients=None) -> Starlette:
    """The ASGI app. Settings come from the environment unless given."""
    dispatcher = Dispatcher(settings or load_dispatcher_settings(), jobs_client,
                            publisher_client, markers, sweep_clients)

    async def receive(request: Request):
        try:
            delivery = parse_envelope(request.headers, await request.body())
        except EnvelopeError as exc:
            log.warning("refused a request that is not a Pub/Sub delivery: %s", exc)
            return JSONResponse({"status": "invalid_envelope", "error": str(exc)}, 400)
        outcome = await run_in_threadpool(dispatcher.dispatch, delivery)
        return JSONResponse(outcome.body, outcome.status)

    async def sweep(request: Request):       # Cloud Scheduler, every few minutes
        outcome = await run_in_threadpool(dispatcher.sweep)
        return JSONResponse(outcome.body, outcome.status)

    async def health(request: Request):
        return JSONResponse({"status": "ok", "job": dispatcher.settings.job_name,
                             "results_topic": dispatcher.settings.results_topic,
                             "dedupe": type(dispatcher.claims.markers).__name__})

    app = Starlette(routes=[Route("/", receive, methods=["POST"]),
                            Route("/pubsub", receive, methods=["POST"]),
                            Route("/sweep", sweep, methods=["POST"]),
                            Route("/health", health, methods=["GET"])])
    app.state.dispatcher = dispatcher
    return app


def serve(host: str | None = None, port: int | None = None, environ=None) -> None:
    """Run the dispatcher. `host`/`port` come from flags (None: HTTP_HOST/PORT) and are
    validated like those variables; a bad setting raises ConfigError."""
    settings = load_dispatcher_settings(environ, http_host=host, http_port=port)
    uvicorn.run(create_app(settings), host=settings.host, port=settings.port, log_level="info")
