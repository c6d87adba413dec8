"""Who may call our HTTP servers: one ASGI guard in front of every route but the open ones.

Why a middleware rather than a dependency on each route: a route added later is covered
without anyone remembering to, unknown paths and the framework's own pages included, and a
refused request is answered from its headers alone, before any of its body is read (a stranger
cannot make us store an upload). `serve` checks a shared secret (`SharedToken`); the dispatcher
checks Google-signed OIDC tokens (`job.dispatcher.auth`). Both refuse with 401 and
`WWW-Authenticate: Bearer`.
"""

import hmac
import logging

from starlette.concurrency import run_in_threadpool
from starlette.datastructures import Headers
from starlette.responses import JSONResponse

log = logging.getLogger(__name__)

OPEN_PATHS = ("/health",)  # liveness probes carry no credentials; it reveals no data


class Refused(Exception):
    """The request's credentials are missing or wrong; the message (the caller's answer) says
    which, never the token or what was expected; `detail`, for the log only, may say more."""

    def __init__(self, message: str, detail=None):
        super().__init__(message)
        self.detail = detail


class Unavailable(Exception):
    """The credentials could not be checked now (e.g. the signing keys are out of reach)."""


def bearer_token(headers) -> str:
    """The token of an `Authorization: Bearer <token>` header."""
    scheme, _, token = headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise Refused("the request has no 'Authorization: Bearer <token>' header")
    return token.strip()


class SharedToken:
    """A secret both sides know, compared in constant time (no timing hint at its prefix)."""

    def __init__(self, token: str, variable: str = "HTTP_TOKEN"):
        self._token = token.encode()
        self._variable = variable

    def __call__(self, headers) -> None:
        if not hmac.compare_digest(bearer_token(headers).encode(), self._token):
            raise Refused(f"the bearer token is not this server's ({self._variable})")


class Guard:
    """ASGI middleware: `verify(headers)` must pass (it raises Refused or Unavailable) before
    any route but `open_paths` runs. It runs in a worker thread, since a check may fetch keys.
    `body(code, message)` shapes the error JSON like the rest of the server's errors."""

    def __init__(self, app, verify, body, open_paths=OPEN_PATHS):
        self.app, self.verify, self.body, self.open_paths = app, verify, body, open_paths

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"] not in self.open_paths:
            try:
                await run_in_threadpool(self.verify, Headers(scope=scope))
            except Refused as exc:
                log.warning(
                    "refused %s %s: %s%s",
                    scope["method"],
                    scope["path"],
                    exc,
                    f" ({exc.detail})" if exc.detail is not None else "",
                )
                response = JSONResponse(
                    self.body("unauthorized", str(exc)), 401, headers={"WWW-Authenticate": "Bearer"}
                )
                return await response(scope, receive, send)
            except Unavailable as exc:
                log.warning(
                    "could not check the credentials of %s %s: %s",
                    scope["method"],
                    scope["path"],
                    exc,
                )
                response = JSONResponse(
                    self.body("auth_unavailable", str(exc)), 503, headers={"Retry-After": "10"}
                )
                return await response(scope, receive, send)
        await self.app(scope, receive, send)
