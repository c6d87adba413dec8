"""The FastAPI app: the two routes, the bearer-token guard when HTTP_TOKEN is set, and 404/405
in the one error shape."""

import asyncio
import contextlib
import logging

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from job import runtime
from job.auth import Guard, SharedToken
from job.config import Settings
from job.http.routes import Separations
from job.separation.model import ModelCache

log = logging.getLogger(__name__)


async def unknown_route(request, exc: HTTPException):
    """404/405 in the one error shape, naming the routes there are."""
    message = (
        f"{exc.detail}: this server offers POST /separate/{{release_id}}/{{track_id}} "
        "and GET /health"
    )
    code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
    return JSONResponse(
        {"status": "failed", "error": {"code": code, "message": message, "retryable": False}},
        status_code=exc.status_code,
        headers=getattr(exc, "headers", None),
    )


def create_app(settings: Settings, model_cache: ModelCache | None = None, storage=None) -> FastAPI:
    """The FastAPI app; `model_cache` and `storage` default to the ones `run` would build."""
    service = Separations(
        settings, model_cache or ModelCache(settings), storage or runtime.make_storage(settings)
    )

    @contextlib.asynccontextmanager
    async def lifespan(app):
        await asyncio.to_thread(service.model_cache.engine)  # the model loads before serving
        log.info(
            "serving %s on %s (storage %s, queue %d)",
            settings.model_name,
            service.model_cache.device,
            settings.storage_mode,
            settings.http_queue,
        )
        yield

    app = FastAPI(title="stem-job", lifespan=lifespan)
    if settings.http_token:
        app.add_middleware(Guard, verify=SharedToken(settings.http_token), body=auth_error)
    app.state.stopping = service.stopping
    app.add_exception_handler(HTTPException, unknown_route)

    @app.get("/health")
    async def health():
        return service.health()

    @app.post("/separate/{release_id}/{track_id}")
    async def post_separate(release_id: str, track_id: str, request: Request):
        return await service.separate_upload(release_id, track_id, request)

    return app


def auth_error(code: str, message: str) -> dict:
    """A refused request's JSON, in the shape of every other error here."""
    return {
        "status": "failed",
        "error": {
            "code": code,
            "message": f"{message}: send Authorization: Bearer <HTTP_TOKEN>",
            "retryable": False,
        },
    }
