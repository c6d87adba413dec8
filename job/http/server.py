"""`stem-job serve`: who may call is settled before the model loads, then uvicorn serves until
SIGTERM/SIGINT, which also stops the running separation.

With HTTP_TOKEN set, every route but /health needs `Authorization: Bearer <HTTP_TOKEN>`
(job/auth.py; 401 otherwise, before the body is read). Without it anyone who reaches the port
may overwrite any release's stems, so the server refuses to start on a non-loopback address
without it (exit 78) unless HTTP_ALLOW_UNAUTHENTICATED=true says that something else decides
who reaches the port (Compose publishes it on the host's loopback only), and then says so
loudly at start. On SIGTERM the running separation stops at its next window (in `run` and
`drain` the forward pass runs in the main thread and is aborted at once; here it runs in a
worker), and the server exits well within Cloud Run's and GKE's grace periods; the set being
written is left without a manifest.
"""

import ipaddress
import logging

import uvicorn

from job import serve as serving
from job.config import Settings
from job.errors import ConfigError
from job.http.app import create_app
from job.separation.model import ModelCache

log = logging.getLogger(__name__)


def is_loopback(host: str) -> bool:
    """Whether only this machine can reach `host` (a name other than localhost counts as not)."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


class Server(uvicorn.Server):
    """Uvicorn that, when told to exit, also stops the running separation at its next window:
    its caller gets 503 `interrupted` (retry) well within the platform's grace period, and the
    set it was writing is left without a manifest, as after `run`'s SIGTERM."""

    def handle_exit(self, sig, frame):
        self.config.app.state.stopping.set()
        super().handle_exit(sig, frame)


def serve(settings: Settings) -> None:
    """Refuse an open address without a token, load the model (ConfigError before any port
    opens: the CLI exits 78), then serve on HTTP_HOST:PORT (job.serve: our logging; a port
    in use exits 75)."""
    unauthenticated = not settings.http_token and not is_loopback(settings.http_host)
    if unauthenticated and not settings.http_allow_unauthenticated:
        raise ConfigError(
            f"HTTP_HOST={settings.http_host} is reachable from other machines and HTTP_TOKEN "
            "is not set: set HTTP_TOKEN, bind HTTP_HOST=127.0.0.1, or set "
            "HTTP_ALLOW_UNAUTHENTICATED=true where something else decides who reaches the port"
        )
    model_cache = ModelCache(settings)
    model_cache.engine()
    if unauthenticated:
        log.warning(
            "UNAUTHENTICATED: serving on %s:%d without HTTP_TOKEN "
            "(HTTP_ALLOW_UNAUTHENTICATED=true), so anyone who can reach this port can start "
            "separations and overwrite any release's stems",
            settings.http_host,
            settings.http_port,
        )
    serving.run(create_app(settings, model_cache), settings.http_host, settings.http_port, Server)
