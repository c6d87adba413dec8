"""`stem-job serve` against real uvicorn servers on loopback ports: the original API and JSON,
every kind of bad request, the bounded queue, and clients that disconnect mid-upload.

Five servers, started side by side once for the module (each start costs seconds):
`main` with the default limits and HTTP_QUEUE=1 on loopback, `small` with tight limits and
HTTP_QUEUE=0 on every interface without a token (so it must warn), `guarded` with HTTP_TOKEN,
`four` and `bag` with a four-source model and a bag of two; one more in STORAGE_MODE=gcs
against the storage emulator.
"""

import hashlib
import json
import os
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests
from conftest import job_env, run_job
from ni_reader import check_ni_stems, decode
from stand_ins import PROJECT
from synthetic import FOUR, music, write_audio

from job.errors import CODES
from job.messages import STEMS

SMALL_LIMIT = 200_000  # MAX_INPUT_BYTES of the `small` server
BOUNDARY = "stemjobtestboundary"
JUNK = b'{"not": "audio"}\n' * 6000  # FFmpeg sniffs some texts as audio (e.g. AMR); not this
TOKEN = "test-token-0123456789abcdef"  # HTTP_TOKEN of the `guarded` server
UNAUTHENTICATED = "UNAUTHENTICATED"  # the start-up warning without HTTP_TOKEN


@dataclass
class Server:
    url: str
    outputs: Path
    tmp: Path
    log: Path
    proc: subprocess.Popen

    def post(self, path, **kwargs):
        return requests.post(self.url + path, timeout=120, **kwargs)

    def health(self):
        return requests.get(self.url + "/health", timeout=10).json()

    def wait_in_flight(self, count, timeout=20.0):
        deadline = time.monotonic() + timeout
        while self.health()["in_flight"] != count:
            assert time.monotonic() < deadline, f"in_flight never reached {count}"
            time.sleep(0.02)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch(model_dir, folder: Path, **extra) -> Server:
    port = free_port()
    (folder / "tmp").mkdir(parents=True)
    env = job_env(
        model_dir,
        folder / "outputs",
        PORT=port,
        TMPDIR=folder / "tmp",
        **{"HTTP_HOST": "127.0.0.1", **extra},
    )
    log = folder / "server.log"
    proc = subprocess.Popen(
        [sys.executable, "-m", "job", "serve", "--port", str(port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=open(log, "wb"),
    )
    return Server(f"http://127.0.0.1:{port}", folder / "outputs", folder / "tmp", log, proc)


def wait_ready(server: Server, timeout=90.0):
    deadline = time.monotonic() + timeout
    while True:
        assert server.proc.poll() is None, server.log.read_text()
        try:
            if requests.get(server.url + "/health", timeout=2).status_code == 200:
                return
        except requests.ConnectionError:
            pass
        assert time.monotonic() < deadline, server.log.read_text()
        time.sleep(0.1)


@pytest.fixture(scope="module")
def servers(model_dir, four_model_dir, bag_model_dir, tmp_path_factory):
    started = {
        "four": launch(four_model_dir, tmp_path_factory.mktemp("four"), MODEL_NAME="htdemucs"),
        "bag": launch(bag_model_dir, tmp_path_factory.mktemp("bags"), MODEL_NAME="htdemucs_ft"),
        "main": launch(model_dir, tmp_path_factory.mktemp("main"), HTTP_QUEUE=1),
        "small": launch(
            model_dir,
            tmp_path_factory.mktemp("small"),
            HTTP_QUEUE=0,
            MAX_INPUT_BYTES=SMALL_LIMIT,
            MAX_DURATION_S=2,
            HTTP_HOST="0.0.0.0",
            HTTP_ALLOW_UNAUTHENTICATED="true",
        ),
        "guarded": launch(
            model_dir,
            tmp_path_factory.mktemp("guarded"),
            HTTP_QUEUE=0,
            HTTP_TOKEN=TOKEN,
            HTTP_HOST="0.0.0.0",
        ),
    }
    try:
        for server in started.values():
            wait_ready(server)
        yield started
    finally:
        for server in started.values():
            server.proc.terminate()
        for server in started.values():
            try:
                server.proc.wait(20)
            except subprocess.TimeoutExpired:
                server.proc.kill()


@pytest.fixture(scope="module")
def main(servers):
    return servers["main"]


@pytest.fixture(scope="module")
def small(servers):
    return servers["small"]


@pytest.fixture(scope="module")
def guarded(servers):
    return servers["guarded"]


@pytest.fixture(scope="module")
def clip(tmp_path_factory) -> bytes:
    """4 s of synthetic music as mp3: one model window, so a separation stays quick."""
    path = tmp_path_factory.mktemp("clip") / "clip.mp3"
    return write_audio(path, music(4.0, seed=2)).read_bytes()


def upload(data: bytes, name="song.mp3", mime="audio/mpeg"):
    return {"file": (name, data, mime) if mime else (name, data)}


def multipart_chunks(data: bytes, hold: threading.Event | None = None, chunk=64 * 1024):
    """A multipart body as a generator (sent chunked); with `hold`, pauses halfway."""
    yield (
        f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="file"; filename="a.mp3"\r\n'
        "Content-Type: audio/mpeg\r\n\r\n"
    ).encode()
    for start in range(0, len(data), chunk):
        if hold is not None and start >= len(data) // 2:
            assert hold.wait(60)
            hold = None
        yield data[start : start + chunk]
    yield f"\r\n--{BOUNDARY}--\r\n".encode()


def read_response(sock) -> str:
    """One whole HTTP response from a raw socket (headers, then Content-Length bytes)."""
    data = b""
    while b"\r\n\r\n" not in data or len(data.split(b"\r\n\r\n", 1)[1]) < int(
        data.lower().split(b"content-length:", 1)[1].split(b"\r\n", 1)[0]
    ):
        more = sock.recv(65536)
        assert more, f"connection closed after {data!r}"
        data += more
    return data.decode()


MULTIPART = {"Content-Type": f"multipart/form-data; boundary={BOUNDARY}"}


def error_of(response, status, code):
    assert response.status_code == status, response.text
    body = response.json()
    assert body["status"] == "failed" and body["error"]["code"] == code, body
    assert code in CODES and CODES[code].http == status, f"{code} is not in job/errors.py CODES"
    assert body["error"]["message"] and isinstance(body["error"]["retryable"], bool)
    return body


def nothing_written(server: Server, release, track):
    assert not (server.outputs / release / track).exists()


# -- the original API ----------------------------------------------------------------------


def test_health(main):
    health = main.health()
    assert health["status"] == "ok" and health["processing_mode"] == "http"
    assert (health["storage_mode"], health["device"], health["model"]) == (
        "local",
        "cpu",
        "htdemucs_6s",
    )
    assert health["model_loaded"] is True


def test_good_upload_answers_the_original_json_and_writes_the_set(main, clip):
    response = main.post("/separate/rel_1/trk_1", files=upload(clip))
    assert response.status_code == 200, response.text
    body = response.json()
    assert {k: body[k] for k in ("status", "release_id", "track_id", "stems")} == {
        "status": "success",
        "release_id": "rel_1",
        "track_id": "trk_1",
        "stems": {stem: f"rel_1/trk_1/{stem}.mp3" for stem in STEMS},
    }
    folder = main.outputs / "rel_1" / "trk_1"
    manifest = json.loads((folder / "manifest.json").read_text())
    assert set(manifest["stems"]) == set(STEMS)
    assert manifest["input"]["sha256"] == hashlib.sha256(clip).hexdigest()
    for stem in STEMS:
        assert (folder / f"{stem}.mp3").stat().st_size > 1000
    assert not list(main.tmp.iterdir()), "upload or scratch files left behind"

    assert set(body["outputs"]) == set(STEMS)
    for stem in STEMS:
        assert body["outputs"][stem]["url"] == body["stems"][stem]
        assert body["outputs"][stem]["peaks"] == f"rel_1/trk_1/{stem}.peaks.json"
        assert body["outputs"][stem]["loudnessLufs"] == manifest["stems"][stem]["loudnessLufs"]
        assert body["outputs"][stem]["silent"] is False

    again = main.post("/separate/rel_1/trk_1", files=upload(clip, mime=None))
    assert again.status_code == 200 and again.json()["reused"] is True
    assert again.json()["stems"] == body["stems"]
    assert again.json()["outputs"] == body["outputs"]


def test_outputs_query_chooses_what_is_written(main, clip):
    response = main.post("/separate/rel_k/trk_k?outputs=vocals,instrumental", files=upload(clip))
    assert response.status_code == 200, response.text
    assert (
        set(response.json()["stems"])
        == set(response.json()["outputs"])
        == {"vocals", "instrumental"}
    )
    folder = main.outputs / "rel_k" / "trk_k"
    assert json.loads((folder / "manifest.json").read_text())["outputs"] == [
        "vocals",
        "instrumental",
    ]
    bad = main.post("/separate/rel_k/trk_k?outputs=vocals,kazoo", files=upload(clip))
    assert bad.status_code == 422 and bad.json()["error"]["code"] == "invalid_outputs"
    assert "'kazoo'" in bad.json()["error"]["message"]


@pytest.mark.parametrize(
    "which, query",
    [
        ("four", "no_drums,drums%2Bbass,instrumental,ni_stems"),
        ("bag", "no_drums,drums+bass,ni_stems"),
    ],
)
def test_other_models_serve_mixes_and_ni_stems(servers, clip, tmp_path, which, query):
    """A four-source model and a bag: mixes and the NI Stems file named from the model's sources
    (a `+` sent unencoded arrives as a space, and is read as the `+` it was); a name the model
    cannot make is refused before the upload is read."""
    server = servers[which]
    response = server.post(f"/separate/rel_m/trk_m?outputs={query}", files=upload(clip))
    assert response.status_code == 200, response.text
    body = response.json()
    names = query.replace("%2B", "+").split(",")
    assert set(body["stems"]) == set(names) and body["model_sources"] == FOUR
    assert body["stems"]["drums+bass"] == "rel_m/trk_m/drums+bass.mp3"
    assert body["model_digest"].startswith("sha256:") and body["model_license"] is None
    original = tmp_path / "clip.mp3"
    original.write_bytes(clip)
    check_ni_stems(server.outputs / "rel_m" / "trk_m" / "ni_stems.stem.mp4", decode(original), None)

    refused = server.post("/separate/rel_p/trk_p?outputs=vocals,piano", files=upload(clip))
    error = error_of(refused, 422, "invalid_outputs")["error"]
    assert "'piano' is not a source" in error["message"]
    nothing_written(server, "rel_p", "trk_p")


def test_gcs_mode_uploads_the_set_to_the_bucket(model_dir, gcs_emulator, bucket, tmp_path, clip):
    """STORAGE_MODE=gcs: the upload is still a local file; stems and manifest go to the bucket."""
    server = launch(model_dir, tmp_path, STORAGE_MODE="gcs", GCS_BUCKET=bucket, **gcs_emulator.env)
    try:
        wait_ready(server)
        assert server.health()["storage_mode"] == "gcs"
        response = server.post("/separate/rel_g/trk_g", files=upload(clip))
        assert response.status_code == 200, response.text
        assert response.json()["stems"] == {
            stem: f"https://storage.googleapis.com/{bucket}/stems/rel_g/trk_g/{stem}.mp3"
            for stem in STEMS
        }
        client = gcs_emulator.client(PROJECT)
        names = {blob.name for blob in client.list_blobs(bucket, prefix="stems/rel_g/trk_g/")}
        assert names == {
            f"stems/rel_g/trk_g/{stem}{ext}" for stem in STEMS for ext in (".mp3", ".peaks.json")
        } | {"stems/rel_g/trk_g/manifest.json"}
        manifest = json.loads(
            client.bucket(bucket).blob("stems/rel_g/trk_g/manifest.json").download_as_bytes()
        )
        assert manifest["input"]["sha256"] == hashlib.sha256(clip).hexdigest()
        assert not list(server.tmp.iterdir())
    finally:
        server.proc.terminate()
        server.proc.wait(20)


# -- bad requests --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "path",
    ["/separate/rel.1/trk_1", "/separate/rel_1/trk%20x", "/separate/" + "r" * 129 + "/trk_1"],
)
def test_bad_ids(main, clip, path):
    body = error_of(main.post(path, files=upload(clip)), 422, "invalid_id")
    assert "[A-Za-z0-9_-]" in body["error"]["message"]


def test_no_file(main):
    body = error_of(main.post("/separate/rel_2/trk_1"), 400, "no_file")
    assert "multipart/form-data" in body["error"]["message"]
    assert "'file'" in body["error"]["message"]
    error_of(main.post("/separate/rel_2/trk_1", files={"note": (None, "hello")}), 400, "no_file")


def test_empty_file(main):
    error_of(main.post("/separate/rel_2/trk_1", files=upload(b"")), 400, "empty_input")


def test_not_audio_and_truncated(main, tmp_path, clip):
    error_of(main.post("/separate/rel_2/trk_1", files=upload(JUNK)), 422, "not_audio")
    wav = write_audio(tmp_path / "clip.wav", music(3.0, seed=3)).read_bytes()
    error_of(
        main.post(
            "/separate/rel_2/trk_1", files=upload(wav[: len(wav) // 2], "a.wav", "audio/wav")
        ),
        422,
        "truncated_audio",
    )
    nothing_written(main, "rel_2", "trk_1")


def test_unsupported_types(main, clip):
    body = error_of(
        main.post("/separate/rel_2/trk_1", files=upload(clip, "a.txt", "text/plain")),
        415,
        "unsupported_media_type",
    )
    assert "text/plain" in body["error"]["message"]
    error_of(
        main.post("/separate/rel_2/trk_1", json={"file": "song.mp3"}), 415, "unsupported_media_type"
    )
    nothing_written(main, "rel_2", "trk_1")


def test_unknown_route_is_json(main):
    error_of(requests.get(main.url + "/separate", timeout=10), 404, "not_found")
    error_of(
        requests.get(main.url + "/separate/rel_1/trk_1", timeout=10), 405, "method_not_allowed"
    )


def answer_before_the_body(server: Server, path: str, length: int) -> str:
    """The answer to an upload's headers alone (`Expect: 100-continue`, no body sent)."""
    with socket.create_connection(("127.0.0.1", int(server.url.rsplit(":", 1)[1])), 10) as sock:
        sock.sendall(
            (
                f"POST {path} HTTP/1.1\r\nHost: x\r\n"
                f"Content-Type: multipart/form-data; boundary={BOUNDARY}\r\n"
                f"Content-Length: {length}\r\nExpect: 100-continue\r\n\r\n"
            ).encode()
        )
        return read_response(sock)


def test_too_large(small):
    # a declared size over the limit: refused from the headers, the body is never asked for
    head = answer_before_the_body(small, "/separate/rel_3/trk_1", 50 * 2**20)
    assert head.startswith("HTTP/1.1 413"), head
    assert "input_too_large" in head and "MAX_INPUT_BYTES" in head
    # a plain client that sends it all anyway still reads the 413
    error_of(
        small.post("/separate/rel_3/trk_1", files=upload(os.urandom(SMALL_LIMIT + 100_000))),
        413,
        "input_too_large",
    )
    # no declared size (chunked): the upload stops at the first byte over the limit
    body = error_of(
        small.post(
            "/separate/rel_3/trk_1",
            headers=MULTIPART,
            data=multipart_chunks(os.urandom(SMALL_LIMIT + 1)),
        ),
        413,
        "input_too_large",
    )
    assert str(SMALL_LIMIT) in body["error"]["message"]
    nothing_written(small, "rel_3", "trk_1")
    assert not list(small.tmp.iterdir())


def test_too_long(small, clip):
    body = error_of(small.post("/separate/rel_3/trk_2", files=upload(clip)), 422, "too_long")
    assert "MAX_DURATION_S" in body["error"]["message"]
    nothing_written(small, "rel_3", "trk_2")


# -- one at a time, bounded queue ----------------------------------------------------------


def post_in_thread(server, path, **kwargs):
    box = {}
    thread = threading.Thread(target=lambda: box.setdefault("r", server.post(path, **kwargs)))
    thread.start()
    return thread, box


def test_busy_with_no_queue_answers_503_with_retry_after(small):
    hold = threading.Event()
    thread, box = post_in_thread(
        small, "/separate/rel_4/trk_1", headers=MULTIPART, data=multipart_chunks(JUNK, hold)
    )
    try:
        small.wait_in_flight(1)
        busy = small.post("/separate/rel_4/trk_2", files=upload(b"x" * 1000))
        body = error_of(busy, 503, "busy")
        assert body["error"]["retryable"] is True and int(busy.headers["Retry-After"]) >= 1
    finally:
        hold.set()
        thread.join(60)
    error_of(box["r"], 422, "not_audio")  # the held request went through afterwards
    assert small.health()["in_flight"] == 0


def test_queue_waits_in_order_then_refuses(main, clip):
    hold = threading.Event()
    first, first_box = post_in_thread(
        main, "/separate/rel_5/trk_1", headers=MULTIPART, data=multipart_chunks(clip, hold)
    )
    second = second_box = None
    try:
        main.wait_in_flight(1)
        second, second_box = post_in_thread(main, "/separate/rel_5/trk_1", files=upload(clip))
        main.wait_in_flight(2)
        busy = main.post("/separate/rel_5/trk_2", files=upload(clip))
        error_of(busy, 503, "busy")
        assert "Retry-After" in busy.headers and "HTTP_QUEUE" in busy.json()["error"]["message"]
    finally:
        hold.set()
        first.join(120)
        if second is not None:
            second.join(120)
    assert first_box["r"].status_code == 200, first_box["r"].text
    assert first_box["r"].json()["reused"] is False
    # the queued request waited for the first, then found its set complete
    assert second_box["r"].status_code == 200 and second_box["r"].json()["reused"] is True
    assert main.health()["in_flight"] == 0


# -- disconnects ---------------------------------------------------------------------------


def test_client_disconnect_mid_upload_leaves_nothing(main, clip):
    head = (
        f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="file"; '
        'filename="a.mp3"\r\nContent-Type: audio/mpeg\r\n\r\n'
    ).encode()
    port = int(main.url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), 10) as sock:
        sock.sendall(
            (
                f"POST /separate/rel_6/trk_1 HTTP/1.1\r\nHost: x\r\n"
                f"Content-Type: multipart/form-data; boundary={BOUNDARY}\r\n"
                f"Content-Length: {len(head) + 10 * len(clip)}\r\n\r\n"
            ).encode()
        )
        sock.sendall(head + clip[: len(clip) // 2])
        main.wait_in_flight(1)
    main.wait_in_flight(0)
    assert not (main.outputs / "rel_6").exists()
    assert not list(main.tmp.iterdir()), "the partial upload was not deleted"
    assert main.health()["status"] == "ok"
    error_of(main.post("/separate/rel_6/trk_1", files=upload(b"")), 400, "empty_input")


def test_server_logs_are_json_lines(main):
    lines = [line for line in main.log.read_text().splitlines() if line.strip()]
    entries = [json.loads(line) for line in lines]
    assert any(
        e["logging.googleapis.com/labels"]["python_logger"] == "uvicorn.access" for e in entries
    )
    assert all("severity" in e and "message" in e for e in entries)


@pytest.fixture
def doomed(model_dir, tmp_path):
    """A server of its own for the test that stops it (HTTP_QUEUE=0, like `small`)."""
    server = launch(model_dir, tmp_path / "doomed", HTTP_QUEUE=0, MAX_INPUT_BYTES=SMALL_LIMIT)
    try:
        wait_ready(server)
        yield server
    finally:
        if server.proc.poll() is None:
            server.proc.kill()


def test_sigterm_answers_in_flight_requests_503_and_exits(doomed):
    """Stopping sets the running separation's cancel event; a request that reaches its turn
    after that is refused as `interrupted`, to be retried."""
    small = doomed
    hold = threading.Event()
    thread, box = post_in_thread(
        small, "/separate/rel_7/trk_1", headers=MULTIPART, data=multipart_chunks(JUNK, hold)
    )
    try:
        small.wait_in_flight(1)
        small.proc.terminate()
        time.sleep(0.3)
    finally:
        hold.set()
        thread.join(60)
    body = error_of(box["r"], 503, "interrupted")
    assert body["error"]["retryable"] is True and "Retry-After" in box["r"].headers
    small.proc.wait(15)
    assert not (small.outputs / "rel_7").exists()


# -- HTTP_TOKEN ----------------------------------------------------------------------------


def bearer(token):
    return {"Authorization": f"Bearer {token}"}


def test_without_the_token_nothing_but_health_answers(guarded, clip):
    assert guarded.health()["status"] == "ok", "probes need no token"
    for headers in (
        {},
        bearer("test-token-0123456789abcdeX"),
        bearer(""),
        {"Authorization": f"Basic {TOKEN}"},
        {"Authorization": TOKEN},
    ):
        body = error_of(
            guarded.post("/separate/rel_a/trk_1", files=upload(clip), headers=headers),
            401,
            "unauthorized",
        )
        assert "Authorization: Bearer" in body["error"]["message"]
        assert TOKEN not in json.dumps(body)
    for path in ("/docs", "/openapi.json", "/separate", "/nowhere"):
        response = requests.get(guarded.url + path, timeout=10)
        assert response.status_code == 401 and response.headers["WWW-Authenticate"] == "Bearer"
    nothing_written(guarded, "rel_a", "trk_1")
    assert not list(guarded.tmp.iterdir()), "a refused upload was stored"
    assert TOKEN not in guarded.log.read_text()


def test_a_refused_upload_is_never_asked_for(guarded):
    """401 comes from the headers alone: a client waiting on `Expect: 100-continue` is never
    asked to send its body."""
    head = answer_before_the_body(guarded, "/separate/rel_a/trk_2", 2**20)
    assert head.startswith("HTTP/1.1 401"), head
    assert "100 Continue" not in head and "unauthorized" in head
    # with the token, the same upload is asked for
    with socket.create_connection(("127.0.0.1", int(guarded.url.rsplit(":", 1)[1])), 10) as sock:
        sock.sendall(
            (
                f"POST /separate/rel_a/trk_2 HTTP/1.1\r\nHost: x\r\n"
                f"Authorization: Bearer {TOKEN}\r\nContent-Length: 10\r\n"
                f"Content-Type: multipart/form-data; boundary={BOUNDARY}\r\n"
                "Expect: 100-continue\r\n\r\n"
            ).encode()
        )
        assert sock.recv(64).startswith(b"HTTP/1.1 100 Continue")


def test_with_the_token_the_original_api_works(guarded, clip):
    response = guarded.post("/separate/rel_a/trk_3", files=upload(clip), headers=bearer(TOKEN))
    assert response.status_code == 200, response.text
    assert response.json()["stems"] == {stem: f"rel_a/trk_3/{stem}.mp3" for stem in STEMS}
    assert (guarded.outputs / "rel_a" / "trk_3" / "manifest.json").exists()
    error_of(
        guarded.post("/separate/rel_a/trk_3", files=upload(b""), headers=bearer(TOKEN)),
        400,
        "empty_input",
    )


def test_an_open_port_is_said_loudly_once(main, small, guarded):
    """Without HTTP_TOKEN on every interface, opted in: one warning at start; on loopback or
    with a token: none."""
    warnings = [
        json.loads(line) for line in small.log.read_text().splitlines() if UNAUTHENTICATED in line
    ]
    assert len(warnings) == 1 and warnings[0]["severity"] == "WARNING", warnings
    assert "HTTP_TOKEN" in warnings[0]["message"] and "0.0.0.0" in warnings[0]["message"]
    assert UNAUTHENTICATED not in main.log.read_text()
    assert UNAUTHENTICATED not in guarded.log.read_text()


@pytest.mark.parametrize("host", ["0.0.0.0", "stem-job.internal"])
def test_an_open_address_without_a_token_is_refused_at_start(model_dir, tmp_path, host):
    """Safe by default: beyond loopback, no HTTP_TOKEN and no explicit opt-in is a
    configuration error, one line, before the model loads or a port opens."""
    env = job_env(model_dir, tmp_path, HTTP_HOST=host, MODEL_DIR=tmp_path / "no-model")
    out = run_job(["serve"], env, timeout=60)
    assert out.returncode == 78, out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1, out.stderr
    assert "HTTP_TOKEN" in lines[0] and "HTTP_ALLOW_UNAUTHENTICATED" in lines[0]
    assert host in lines[0] and "MODEL_DIR" not in lines[0], "refused before the model loads"


def test_a_guessable_token_fails_at_start(model_dir, tmp_path):
    out = run_job(["serve"], job_env(model_dir, tmp_path, HTTP_TOKEN="secret"), timeout=60)
    assert out.returncode == 78, out.stderr
    assert "HTTP_TOKEN" in out.stderr and "secret" not in out.stderr
