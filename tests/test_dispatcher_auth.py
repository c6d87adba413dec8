"""The dispatcher's own check of the push's OIDC token (PUSH_AUDIENCE), over real HTTP.

Tokens are signed here with a local RSA key through google-auth (as Google signs Pub/Sub's),
and the key's certificate is served from a loopback endpoint in the format of Google's
certificate URL, so verification runs google-auth's whole path (fetch, cache, signature,
expiry, audience) without the network. A valid token must start one execution on the Cloud
Run API stand-in of test_cloudrun; every bad one must be refused with 401 and start nothing.
"""

import base64
import datetime
import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import requests
from conftest import run_job
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID
from google.auth import crypt, jwt
from test_cloudrun import (
    GOOD,
    Uvicorn,
    cloud_run,  # noqa: F401  (the Cloud Run API stand-in, a fixture)
    push_body,
    settings_for,
)

from job.dispatcher import create_app, load_dispatcher_settings
from job.dispatcher.auth import PushTokens
from job.dispatcher.dedupe import MemoryMarkers
from job.errors import ConfigError

AUDIENCE = "https://stem-dispatch-abc123-uc.a.run.app"
PUSHER = "stem-push@my-project.iam.gserviceaccount.com"
SCHEDULER = "stem-sweep@my-project.iam.gserviceaccount.com"  # a second caller allowed in
KEY_ID = "test-key-1"


class SigningKey:
    """An RSA key as Google holds one: signs tokens under a key id; its certificate is public."""

    def __init__(self, key_id=KEY_ID):
        self.private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        pem = self.private.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        self.signer = crypt.RSASigner.from_string(pem, key_id)
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test-signer")])
        now = datetime.datetime.now(datetime.UTC)
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(self.private.public_key())
            .serial_number(1)
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .sign(self.private, hashes.SHA256())
        )
        self.certificate = cert.public_bytes(serialization.Encoding.PEM).decode()

    def token(self, **claims) -> str:
        now = int(time.time())
        payload = {
            "iss": "https://accounts.google.com",
            "aud": AUDIENCE,
            "iat": now,
            "exp": now + 3600,
            "sub": "112233",
            "email": PUSHER,
            "email_verified": True,
            **claims,
        }
        return jwt.encode(self.signer, {k: v for k, v in payload.items() if v is not None}).decode()


class CertificateServer:
    """Serves {key id: PEM certificate} as Google's certificate URL does, with its caching
    header, and counts the fetches."""

    def __init__(self, certificates: dict, status=200):
        body = json.dumps(certificates).encode()
        self.fetches = 0
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                server.fetches += 1
                self.send_response(status)
                self.send_header("Content-Type", "application/json; charset=UTF-8")
                self.send_header("Cache-Control", "public, max-age=19800, must-revalidate")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.http = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.http.server_port}/oauth2/v1/certs"
        threading.Thread(target=self.http.serve_forever, daemon=True).start()

    def close(self):
        self.http.shutdown()
        self.http.server_close()


@pytest.fixture(scope="module")
def key():
    return SigningKey()


@pytest.fixture
def certificates(key):
    server = CertificateServer({KEY_ID: key.certificate})
    yield server
    server.close()


@pytest.fixture
def dispatcher(cloud_run):
    """dispatcher(certs_url, service_accounts=(PUSHER,)) -> the running service's base URL."""
    servers = []

    def start(certs_url, service_accounts=(PUSHER,)):
        app = create_app(
            settings_for(
                "stem-results", push_audience=AUDIENCE, push_service_accounts=service_accounts
            ),
            jobs_client=cloud_run.client(),
            markers=MemoryMarkers(),
            push_tokens=PushTokens(AUDIENCE, service_accounts, certs_url),
        )
        servers.append(Uvicorn(app))
        return servers[-1].url

    yield start
    for server in servers:
        server.close()


def push(url, token=None, message_id="5001", path="/pubsub", scheme="Bearer"):
    headers = {"Authorization": f"{scheme} {token}"} if token else {}
    return requests.post(url + path, json=push_body(GOOD, message_id), headers=headers, timeout=30)


def refused(reply, hint):
    assert reply.status_code == 401, reply.text
    assert reply.headers["WWW-Authenticate"] == "Bearer"
    assert reply.json()["status"] == "unauthorized" and hint in reply.json()["error"], reply.json()
    assert AUDIENCE not in reply.text, "a refusal must not tell a stranger the expected audience"


def test_a_valid_push_token_starts_one_execution(dispatcher, certificates, cloud_run, key):
    url = dispatcher(certificates.url, service_accounts=(PUSHER, SCHEDULER))
    reply = push(url, key.token())
    assert reply.status_code == 200, reply.text
    assert reply.json()["status"] == "started"
    [request] = cloud_run.requests
    assert request["path"].endswith("/jobs/stem-job:run")
    # Google's certificates are cached as their Cache-Control says: one fetch for two pushes.
    assert push(url, key.token(), message_id="5002").json()["status"] == "started"
    assert certificates.fetches == 1 and len(cloud_run.requests) == 2
    # any of the allowed service accounts
    reply = push(url, key.token(email=SCHEDULER), message_id="5003")
    assert reply.json()["status"] == "started" and len(cloud_run.requests) == 3


def forged(key):
    return SigningKey(KEY_ID).token()  # same key id, someone else's key


def tampered(key):
    """A genuine token whose claims were changed after signing."""
    head, body, signature = key.token().split(".")
    claims = json.loads(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))
    claims["aud"] = "https://attacker.example"
    body = base64.urlsafe_b64encode(json.dumps(claims).encode()).decode().rstrip("=")
    return ".".join([head, body, signature])


BAD_TOKENS = {
    "forged": (forged, "signature"),
    "tampered": (tampered, "signature"),
    "expired": (
        lambda key: key.token(iat=int(time.time()) - 7200, exp=int(time.time()) - 3600),
        "expired",
    ),
    "not yet valid": (lambda key: key.token(iat=int(time.time()) + 600), "early"),
    "wrong audience": (lambda key: key.token(aud="https://someone-else.example"), "audience"),
    "no audience": (lambda key: key.token(aud=None), "audience"),
    "not Google's issuer": (lambda key: key.token(iss="https://evil.example"), "issued by"),
    "another service account": (
        lambda key: key.token(email="other@p.iam.gserviceaccount.com"),
        "PUSH_SERVICE_ACCOUNT",
    ),
    "unverified email": (lambda key: key.token(email_verified=False), "PUSH_SERVICE_ACCOUNT"),
    "unknown key id": (lambda key: SigningKey("rotated-away").token(), "not found"),
    "not a JWT": (lambda key: "not-a-token", "not valid"),
}


def test_bad_push_tokens_are_refused_and_start_nothing(dispatcher, certificates, cloud_run, key):
    url = dispatcher(certificates.url)
    refused(push(url), "Authorization: Bearer")
    refused(push(url, key.token(), scheme="Basic"), "Authorization: Bearer")
    for name, (make, hint) in BAD_TOKENS.items():
        reply = push(url, make(key))
        assert reply.status_code == 401, f"{name}: {reply.text}"
        refused(reply, hint)
    assert cloud_run.requests == [], "a refused push must start nothing"


def test_every_route_but_health_is_guarded(dispatcher, certificates, cloud_run, key):
    """A route nobody declared (e.g. one added later) is refused before routing; /health is
    open for probes."""
    url = dispatcher(certificates.url)
    assert requests.get(url + "/health", timeout=10).status_code == 200
    refused(push(url, path="/"), "Authorization")
    refused(requests.post(url + "/sweep", timeout=10), "Authorization")
    refused(requests.post(url + "/added-later", timeout=10), "Authorization")
    assert (
        requests.post(
            url + "/added-later", timeout=10, headers={"Authorization": f"Bearer {key.token()}"}
        ).status_code
        == 404
    )
    assert cloud_run.requests == []


def test_an_audience_without_a_service_account_does_not_start(tmp_path):
    """An audience alone admits any Google-signed token (anyone can mint one for any audience
    from their own project): `stem-job dispatch` refuses to start, one line, exit 78."""
    env = {
        "PATH": "/usr/bin:/bin",
        "GCP_PROJECT_ID": "p1",
        "CLOUD_RUN_REGION": "us-central1",
        "PUSH_AUDIENCE": AUDIENCE,
        "HTTP_HOST": "127.0.0.1",
        "PORT": "1",
    }
    done = run_job(["dispatch"], env, timeout=60)
    assert done.returncode == 78, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "PUSH_SERVICE_ACCOUNT" in lines[0], done.stderr


def raw_post(url: str, head: str, body: bytes = b"", timeout: float = 10.0) -> str:
    """The status line and headers a POST gets, from a socket (what a client that does not
    wait for its body to be taken sees)."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout) as sock:
        sock.sendall(head.encode() + b"\r\n" + body)
        answer = b""
        while b"\r\n\r\n" not in answer:
            chunk = sock.recv(65536)
            if not chunk:
                break
            answer += chunk
    return answer.decode("latin-1")


def test_a_body_over_the_bound_is_refused_before_it_is_read(
    dispatcher, certificates, cloud_run, key
):
    url = dispatcher(certificates.url)
    auth = f"Authorization: Bearer {key.token()}\r\nHost: x\r\n"
    # declared: refused from the headers, none of the body sent
    declared = raw_post(url, f"POST /pubsub HTTP/1.1\r\n{auth}Content-Length: {10**10}\r\n")
    assert declared.startswith("HTTP/1.1 413"), declared
    # streamed without a length: refused at the first chunk over the bound
    chunk = b"x" * 65536
    over = (2 << 20) // len(chunk)  # 2 MiB: twice the bound the README names
    body = (f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n") * over + b"0\r\n\r\n"
    streamed = raw_post(url, f"POST /pubsub HTTP/1.1\r\n{auth}Transfer-Encoding: chunked\r\n", body)
    assert streamed.startswith("HTTP/1.1 413"), streamed
    assert cloud_run.requests == []


def test_certificates_out_of_reach_ask_for_a_retry(dispatcher, cloud_run, key):
    broken = CertificateServer({}, status=500)
    try:
        reply = push(dispatcher(broken.url), key.token())
    finally:
        broken.close()
    assert reply.status_code == 503 and reply.json()["status"] == "auth_unavailable", reply.text
    assert cloud_run.requests == []


def test_push_settings_from_env():
    env = {"GCP_PROJECT_ID": "p1", "CLOUD_RUN_REGION": "us-central1"}
    assert load_dispatcher_settings(env).push_audience == ""
    settings = load_dispatcher_settings(
        {**env, "PUSH_AUDIENCE": AUDIENCE, "PUSH_SERVICE_ACCOUNT": f"{PUSHER}, {SCHEDULER}"}
    )
    assert settings.push_audience == AUDIENCE
    assert settings.push_service_accounts == (PUSHER, SCHEDULER)
    with pytest.raises(ConfigError, match="PUSH_SERVICE_ACCOUNT"):
        load_dispatcher_settings(
            {**env, "PUSH_AUDIENCE": AUDIENCE, "PUSH_SERVICE_ACCOUNT": "not an email"}
        )
    with pytest.raises(ConfigError, match="PUSH_AUDIENCE"):
        load_dispatcher_settings({**env, "PUSH_SERVICE_ACCOUNT": PUSHER})
    with pytest.raises(ConfigError, match="PUSH_SERVICE_ACCOUNT"):
        load_dispatcher_settings({**env, "PUSH_AUDIENCE": AUDIENCE})
