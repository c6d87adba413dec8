"""`stem-job serve` under hostile uploads, on real uvicorn servers: a multipart body of endless
headers or parts is refused, and uploads never fill more disk than the temp folder holds."""

import shutil
import subprocess
import threading
import time

import pytest
import requests
from test_http import BOUNDARY, JUNK, launch, multipart_chunks, wait_ready

from job.http.multipart import MAX_PART_HEADER_BYTES, MAX_PART_HEADERS, MAX_PARTS


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    started = launch(model_dir, tmp_path_factory.mktemp("bounds"), HTTP_QUEUE=1)
    try:
        wait_ready(started)
        yield started
    finally:
        started.proc.terminate()
        started.proc.wait(20)


def part(headers: list[str], body: bytes = b"") -> bytes:
    return (
        (f"--{BOUNDARY}\r\n" + "".join(h + "\r\n" for h in headers) + "\r\n").encode()
        + body
        + b"\r\n"
    )


def post_parts(server, *parts: bytes):
    body = b"".join(parts) + f"--{BOUNDARY}--\r\n".encode()
    return server.post(
        "/separate/rel/trk",
        data=body,
        headers={"Content-Type": f"multipart/form-data; boundary={BOUNDARY}"},
    )


FILE = 'Content-Disposition: form-data; name="file"; filename="a.mp3"'


def test_a_file_part_with_the_most_headers_allowed_reaches_the_decoder(server):
    extra = [f"X-Extra-{i}: {'v' * 100}" for i in range(MAX_PART_HEADERS - 2)]
    response = post_parts(server, part([FILE, "Content-Type: audio/mpeg", *extra], JUNK))
    assert response.status_code == 422 and response.json()["error"]["code"] == "not_audio"


@pytest.mark.parametrize(
    "headers",
    [
        [FILE] + [f"X-Extra-{i}: v" for i in range(MAX_PART_HEADERS)],  # one header too many
        [FILE, "X-Long: " + "v" * MAX_PART_HEADER_BYTES],  # one line too long
        [FILE, "X-Endless: " + "v" * (8 << 20)],  # 8 MB of one header
    ],
    ids=["count", "size", "endless"],
)
def test_part_headers_over_the_bounds_are_refused(server, headers):
    response = post_parts(server, part(headers, JUNK))
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["code"] == "bad_multipart" and "header" in error["message"], error
    assert not list(server.tmp.glob("stem-upload-*")), "nothing left on disk"


def test_more_parts_than_an_upload_needs_are_refused(server):
    fields = [
        part([f'Content-Disposition: form-data; name="f{i}"'], b"x") for i in range(MAX_PARTS)
    ]
    response = post_parts(server, *fields, part([FILE, "Content-Type: audio/mpeg"], JUNK))
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["code"] == "bad_multipart" and f"{MAX_PARTS} parts" in error["message"], error


def test_a_server_whose_temp_folder_cannot_hold_one_upload_does_not_start(model_dir, tmp_path):
    free = shutil.disk_usage(tmp_path).free
    started = launch(model_dir, tmp_path, MAX_INPUT_BYTES=2 * free)
    try:
        assert started.proc.wait(90) == 78
    finally:
        if started.proc.poll() is None:
            started.proc.kill()
    log = started.log.read_text()
    assert "MAX_INPUT_BYTES" in log and "TMPDIR" in log, log[-2000:]


def originals_on_disk(server) -> int:
    return len(list(server.tmp.glob("stem-upload-*/original")))


def test_uploads_wait_for_room_on_disk(model_dir, tmp_path):
    """Room for one upload of MAX_INPUT_BYTES, three requests allowed in flight: the second
    upload is admitted but stores nothing until the first one's folder is gone."""
    limit = int(shutil.disk_usage(tmp_path).free * 0.6)
    started = launch(model_dir, tmp_path, HTTP_QUEUE=2, MAX_INPUT_BYTES=limit)
    try:
        wait_ready(started)
        hold = threading.Event()
        headers = {"Content-Type": f"multipart/form-data; boundary={BOUNDARY}"}
        answers = {}

        def send(name, body):
            answers[name] = requests.post(
                started.url + "/separate/rel/" + name, data=body, headers=headers, timeout=120
            )

        first = threading.Thread(target=send, args=("first", multipart_chunks(JUNK, hold, 4096)))
        first.start()
        deadline = time.monotonic() + 30
        while originals_on_disk(started) < 1:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        second = threading.Thread(target=send, args=("second", multipart_chunks(JUNK)))
        second.start()
        started.wait_in_flight(2)
        seen = 0
        for _ in range(25):  # half a second with both in flight
            seen = max(seen, originals_on_disk(started))
            time.sleep(0.02)
        assert seen == 1, "the second upload must wait for room"
        assert "second" not in answers
        hold.set()
        first.join(60)
        second.join(60)
    finally:
        started.proc.terminate()
        try:
            started.proc.wait(20)
        except subprocess.TimeoutExpired:
            started.proc.kill()
    assert [answers[n].json()["error"]["code"] for n in ("first", "second")] == ["not_audio"] * 2
    assert "room for 1 upload(s)" in started.log.read_text()
