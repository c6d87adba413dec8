"""GcsStorage over the wire against the GCS stand-in (fake-gcs-server): originals, manifests read
back, faults. Writing a set under racing writers is tests/test_gcs_commit.py's."""

import re
import socket
import threading
import time

import pytest
from google.auth.credentials import AnonymousCredentials
from google.cloud import storage

from job.errors import JobError
from job.messages import STEMS
from job.storage.gcs import GcsStorage, parse_gs_uri

AUDIO = bytes(range(256)) * 400  # 100 KiB standing in for an original


@pytest.fixture
def client(gcs_emulator):
    return gcs_emulator.client()


@pytest.fixture
def store(client, bucket):
    return GcsStorage(bucket, (bucket,), max_bytes=1_000_000, client=client, retry_deadline_s=5)


@pytest.fixture
def original_uri(client, bucket):
    client.bucket(bucket).blob("uploads/rel/track one.mp3").upload_from_string(AUDIO)
    return f"gs://{bucket}/uploads/rel/track one.mp3"


@pytest.fixture
def stem_files(tmp_path):
    files = {}
    for stem in STEMS:
        files[stem] = tmp_path / f"{stem}.mp3"
        files[stem].write_bytes(stem.encode() * 1000)
    return files


def test_describe_reads_metadata_and_fetch_downloads_that_generation(store, original_uri, tmp_path):
    original = store.describe_original(original_uri)
    assert original.size == len(AUDIO)
    assert set(original.identity) == {"uri", "generation", "crc32c", "md5", "size"}
    assert original.identity["generation"] and original.identity["crc32c"]
    path = store.fetch_original(original, tmp_path)
    # saved without its suffix, like an upload: the content decides how FFmpeg reads it
    assert path == tmp_path / "original"
    assert path.read_bytes() == AUDIO


@pytest.mark.parametrize(
    "uri",
    [
        "gs://",
        "gs://{b}",
        "gs://{b}/",
        "/local/file.mp3",
        "http://{b}/x.mp3",
        "gs://UPPER/x.mp3",
        "gs://{b}/a\x00b.mp3",
        "gs://{b}/line\nbreak.mp3",
        "gs://{b}/../x.mp3",
        "gs://{b}/a/./x.mp3",
        "gs://{b}/" + "x" * 1025,
    ],
)
def test_malformed_uris_are_refused(store, bucket, uri):
    with pytest.raises(JobError) as caught:
        store.describe_original(uri.format(b=bucket))
    assert caught.value.code == "invalid_uri" and not caught.value.retryable


def test_a_bucket_not_allowed_is_refused_unless_trusted(client, bucket, original_uri):
    store = GcsStorage("outputs-bucket", ("other-bucket",), 1_000_000, client=client)
    with pytest.raises(JobError) as caught:
        store.describe_original(original_uri)
    assert caught.value.code == "input_not_allowed" and not caught.value.retryable
    assert store.describe_original(original_uri, trusted=True).size == len(AUDIO)


def test_default_allowed_bucket_is_the_output_bucket(client, bucket, original_uri):
    assert GcsStorage(bucket, (), 1_000_000, client=client).describe_original(original_uri)


@pytest.mark.parametrize("name", ["nothing-here.mp3", "uploads/rel/missing.wav"])
def test_a_missing_object_is_input_not_found(store, bucket, name):
    with pytest.raises(JobError) as caught:
        store.describe_original(f"gs://{bucket}/{name}")
    assert caught.value.code == "input_not_found" and not caught.value.retryable


def test_too_large_is_refused_from_metadata(client, bucket, original_uri):
    store = GcsStorage(bucket, (bucket,), max_bytes=len(AUDIO) - 1, client=client)
    with pytest.raises(JobError) as caught:
        store.describe_original(original_uri)
    assert caught.value.code == "input_too_large" and not caught.value.retryable


def test_an_original_replaced_after_describe_is_not_taken_for_it(
    store, client, bucket, original_uri, tmp_path
):
    original = store.describe_original(original_uri)
    client.bucket(bucket).blob("uploads/rel/track one.mp3").upload_from_string(AUDIO[::-1])
    with pytest.raises(JobError) as caught:
        store.fetch_original(original, tmp_path)
    assert caught.value.code == "input_changed" and caught.value.retryable


def test_parse_gs_uri_keeps_the_object_name_verbatim():
    assert parse_gs_uri("gs://my-bucket/a b/ü.flac") == ("my-bucket", "a b/ü.flac")


@pytest.fixture
def storage_outage(gcs_emulator):
    """Kill the storage emulator; whatever the test does, it is running again afterwards."""
    gcs_emulator.kill()
    try:
        yield gcs_emulator
    finally:
        if not gcs_emulator.ready():
            gcs_emulator.start()


def test_uploads_ride_out_an_outage(client, bucket, stem_files, storage_outage):
    store = GcsStorage(bucket, (bucket,), 1_000_000, client=client, retry_deadline_s=30)
    result = {}

    def write():
        with store.commit("rel", "trk") as commit:
            result.update(urls=commit.write_stems(stem_files))

    worker = threading.Thread(target=write)
    worker.start()
    time.sleep(2)
    assert worker.is_alive(), "the uploads gave up while storage was down"
    storage_outage.start()
    worker.join(30)
    assert len(result["urls"]) == 6
    assert (
        client.bucket(bucket).blob("stems/rel/trk/piano.mp3").download_as_bytes()
        == stem_files["piano"].read_bytes()
    )


def test_an_outage_past_the_deadline_is_retryable(
    client, bucket, original_uri, storage_outage, tmp_path
):
    store = GcsStorage(bucket, (bucket,), 1_000_000, client=client, retry_deadline_s=2)
    started = time.monotonic()
    with pytest.raises(JobError) as caught:
        store.describe_original(original_uri)
    assert caught.value.code == "storage_unavailable" and caught.value.retryable
    assert 2 <= time.monotonic() - started < 6
    with pytest.raises(JobError) as caught:
        store.commit("rel", "trk").__enter__()
    assert caught.value.code == "storage_unavailable"


def test_manifest_that_is_not_json_counts_as_absent(store, client, bucket):
    client.bucket(bucket).blob("stems/rel/trk/manifest.json").upload_from_string(b"{half")
    assert store.read_manifest("rel", "trk") is None
    client.bucket(bucket).blob("stems/rel/trk/manifest.json").upload_from_string(b"[1, 2]")
    assert store.read_manifest("rel", "trk") is None


class CuttingProxy:
    """A TCP proxy to the emulator that drops the first download after `cut_after` bytes of
    response, as a reset mid-download would; everything else passes whole."""

    def __init__(self, upstream_port: int, cut_after: int):
        self.upstream_port = upstream_port
        self.cut_after = cut_after
        self.requests = []
        self.server = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.server.getsockname()[1]}"
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                downstream, _ = self.server.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(downstream,), daemon=True).start()

    def _serve(self, downstream):
        with downstream, socket.create_connection(("127.0.0.1", self.upstream_port)) as upstream:
            # one request per connection: the stand-in would otherwise keep it open for more
            request = re.sub(
                rb"(?im)^connection:[^\r\n]*", b"Connection: close", downstream.recv(65536), count=1
            )
            self.requests.append(request.decode("latin-1"))
            budget = None
            if "alt=media" in self.requests[-1].split("\r\n")[0]:
                budget, self.cut_after = self.cut_after, None
            upstream.sendall(request)
            sent = 0
            while chunk := upstream.recv(65536):
                if budget is not None and sent + len(chunk) > budget:
                    downstream.sendall(chunk[: budget - sent])
                    return
                downstream.sendall(chunk)
                sent += len(chunk)

    def close(self):
        self.server.close()


def test_a_download_cut_short_resumes_where_it_stopped(gcs_emulator, client, bucket, tmp_path):
    payload = bytes(range(256)) * 4096  # 1 MiB
    client.bucket(bucket).blob("big.wav").upload_from_string(payload)
    proxy = CuttingProxy(gcs_emulator.port, cut_after=300_000)
    try:
        via_proxy = storage.Client(
            project="stem-test",
            credentials=AnonymousCredentials(),
            client_options={"api_endpoint": proxy.url},
        )
        store = GcsStorage(bucket, (bucket,), 2_000_000, client=via_proxy, retry_deadline_s=10)
        original = store.describe_original(f"gs://{bucket}/big.wav")
        path = store.fetch_original(original, tmp_path)
    finally:
        proxy.close()
    assert path.read_bytes() == payload
    downloads = [r for r in proxy.requests if "alt=media" in r.split("\r\n")[0]]
    assert len(downloads) == 2
    assert re.search(r"(?im)^range: bytes=(\d+)-", downloads[1]).group(1) != "0"
