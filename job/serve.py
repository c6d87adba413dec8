"""Running an ASGI app under uvicorn, the one way both servers (`serve`, `dispatch`) need.

Our logging, not uvicorn's own (log_config=None keeps the root handler, so its lines are JSON
on Cloud Run like every other); a bounded graceful shutdown, inside the platforms' grace
periods; and exit 75 when the port cannot be bound: another instance or a retry may find it
free."""

import sys

import uvicorn

from job.errors import EXIT_RETRY

GRACE_S = 8  # after SIGTERM, responses get this long (Cloud Run kills at 10 s, GKE at 15 s)


def run(app, host: str, port: int, server_class=uvicorn.Server) -> None:
    """Serve `app` on host:port until told to exit; `server_class` may hook the exit."""
    server = server_class(
        uvicorn.Config(
            app, host=host, port=port, log_config=None, timeout_graceful_shutdown=GRACE_S
        )
    )
    server.run()
    if not server.started:
        sys.exit(EXIT_RETRY)
