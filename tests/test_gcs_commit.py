"""Writing a track's set on the GCS stand-in while other writers write the same track: each
interleaving that the fencing in job/storage/commit.py must survive, step by step."""

import threading

import pytest
from commit_race import body  # the manifest the writers in the race build
from gcs_proxy import GcsProxy
from google.auth.credentials import AnonymousCredentials
from google.cloud import storage

from job.errors import JobError
from job.messages import STEMS
from job.storage.base import CLAIM, MANIFEST
from job.storage.gcs import GcsStorage

ORIGINAL = "uploads/rel/song.flac"
MANIFEST_NAME = "stems/rel/trk/" + MANIFEST
CLAIM_NAME = "stems/rel/trk/" + CLAIM


@pytest.fixture
def proxy(gcs_emulator):
    """hack/gcs_proxy.py in front of the stand-in: every writer goes through it, so a delete's
    and a resumable upload's `ifGenerationMatch` hold as on Cloud Storage (fake-gcs-server
    ignores both), and a test can aim a fault at one write."""
    proxy = GcsProxy(gcs_emulator.port)
    yield proxy
    proxy.close()


@pytest.fixture
def client(proxy):
    return storage.Client(
        project="stem-test",
        credentials=AnonymousCredentials(),
        client_options={"api_endpoint": proxy.url},
    )


@pytest.fixture
def objects(client, bucket):
    return client.bucket(bucket)


@pytest.fixture
def writers(client, bucket):
    """writers() -> a new GcsStorage: one per job, as two workers would have."""
    return lambda **kw: GcsStorage(
        bucket, (bucket,), 1_000_000, client=client, retry_deadline_s=5, **kw
    )


@pytest.fixture
def identity(objects, writers, bucket):
    objects.blob(ORIGINAL).upload_from_string(b"an original")
    return writers().describe_original(f"gs://{bucket}/{ORIGINAL}").identity


def files_of(tmp_path, job: str, outputs=STEMS) -> dict:
    """{output: local file} whose bytes say which job wrote them."""
    folder = tmp_path / job
    folder.mkdir()
    files = {}
    for name in outputs:
        files[name] = folder / f"{name}.mp3"
        files[name].write_bytes(f"{job}:{name}".encode() * 100)
    return files


def written_by(objects, found: dict) -> set:
    """The jobs whose bytes the objects a manifest names hold right now."""
    return {
        objects.blob(name).download_as_bytes().split(b":")[0].decode()
        for name in found["objectGenerations"]
    }


def test_a_set_round_trips_with_private_objects_by_default(writers, objects, identity, tmp_path):
    store = writers()
    with store.commit("rel", "trk") as commit:
        urls = commit.write_stems(files_of(tmp_path, "a"))
        assert store.read_manifest("rel", "trk") is None, "no manifest until written last"
        standing = commit.write_manifest(body("a", identity))
    assert (
        urls["vocals"] == f"https://storage.googleapis.com/{objects.name}/stems/rel/trk/vocals.mp3"
    )
    assert standing["jobId"] == "a"
    found = store.read_manifest("rel", "trk")
    assert found["jobId"] == "a" and written_by(objects, found) == {"a"}
    assert set(found["objectGenerations"]) == {f"stems/rel/trk/{s}.mp3" for s in STEMS}
    stem = objects.get_blob("stems/rel/trk/vocals.mp3")
    assert stem.content_type == "audio/mpeg" and stem.cache_control == "private, max-age=3600"
    manifest = objects.get_blob("stems/rel/trk/manifest.json")
    assert manifest.content_type == "application/json"
    assert manifest.cache_control == "private, no-cache"


def test_a_public_bucket_gets_the_public_cache_headers(writers, objects, identity, tmp_path):
    with writers(public=True).commit("rel", "trk") as commit:
        commit.write_stems(files_of(tmp_path, "a"))
        commit.write_manifest(body("a", identity))
    assert objects.get_blob("stems/rel/trk/drums.mp3").cache_control == "public, max-age=3600"
    assert objects.get_blob("stems/rel/trk/manifest.json").cache_control == "no-cache"


def test_claiming_a_track_stops_its_old_set_being_vouched_for(writers, objects, identity, tmp_path):
    store = writers()
    with store.commit("rel", "trk") as commit:
        commit.write_stems(files_of(tmp_path, "a"))
        commit.write_manifest(body("a", identity))
    with writers().commit("rel", "trk"):
        assert store.read_manifest("rel", "trk") is None
        assert objects.get_blob(MANIFEST_NAME) is None, "the old set's manifest is gone"
    assert store.read_manifest("rel", "trk") is None
    assert objects.get_blob(MANIFEST_NAME) is None, "no manifest.json but a whole set's"
    with writers().commit("rel", "trk") as commit:  # and the next writer takes it over
        commit.write_stems(files_of(tmp_path, "c"))
        commit.write_manifest(body("c", identity))
    assert store.read_manifest("rel", "trk")["jobId"] == "c"


def test_a_stalled_writer_finds_the_same_request_completed_and_reports_that_set(
    writers, objects, identity, tmp_path
):
    """A job stalls between its stems and its manifest; its redelivered message completes the
    set on another worker. The stalled job resumes: that set stands, untouched, and is the one
    it reports."""
    stalled, other = writers().commit("rel", "trk").__enter__(), writers()
    stalled.write_stems(files_of(tmp_path, "a"))
    with other.commit("rel", "trk") as commit:
        commit.write_stems(files_of(tmp_path, "b"))
        commit.write_manifest(body("b", identity))
    standing = stalled.write_manifest(body("a", identity))
    assert standing["jobId"] == "b"
    found = other.read_manifest("rel", "trk")
    assert found["jobId"] == "b" and written_by(objects, found) == {"b"}


def test_a_six_stem_request_is_not_completed_by_a_set_of_other_outputs(
    writers, objects, identity, tmp_path
):
    """The set that stands must be one for the same request: a vocals-only set completed
    meanwhile does not answer a six-stem request (and stays as it is)."""
    six = writers().commit("rel", "trk").__enter__()
    six.write_stems(files_of(tmp_path, "six"))
    with writers().commit("rel", "trk") as commit:
        commit.write_stems(files_of(tmp_path, "voc", ["vocals"]))
        commit.write_manifest(body("voc", identity, ["vocals"]))
    with pytest.raises(JobError) as raised:
        six.write_manifest(body("six", identity))
    assert raised.value.code == "concurrent_write" and raised.value.retryable
    found = writers().read_manifest("rel", "trk")
    assert found["outputs"] == ["vocals"] and written_by(objects, found) == {"voc"}


@pytest.mark.parametrize(
    "difference", [{"format": "flac"}, {"model": "htdemucs"}, {"bitrate": "128k"}]
)
def test_a_set_made_with_other_settings_does_not_stand_for_ours(
    writers, identity, tmp_path, difference
):
    ours = writers().commit("rel", "trk").__enter__()
    ours.write_stems(files_of(tmp_path, "a"))
    with writers().commit("rel", "trk") as commit:
        commit.write_stems(files_of(tmp_path, "b"))
        commit.write_manifest({**body("b", identity), **difference})
    with pytest.raises(JobError) as raised:
        ours.write_manifest(body("a", identity))
    assert raised.value.code == "concurrent_write"


def test_a_stale_writers_late_stem_cannot_replace_a_newer_complete_set(
    writers, objects, identity, tmp_path
):
    """The window the old list-then-compare check left: a writer that lost its claim uploads
    one more stem after the newer writer completed. Its upload is refused (412) and the
    newer set stays whole."""
    stale = writers().commit("rel", "trk").__enter__()
    stale.write_stems(files_of(tmp_path, "old", ["vocals"]))
    with writers().commit("rel", "trk") as commit:
        commit.write_stems(files_of(tmp_path, "new"))
        commit.write_manifest(body("new", identity))
    with pytest.raises(JobError) as raised:
        stale.write_stems(files_of(tmp_path, "old2", ["drums"]))
    assert raised.value.code == "concurrent_write"
    found = writers().read_manifest("rel", "trk")
    assert found["jobId"] == "new" and written_by(objects, found) == {"new"}


def test_a_stem_an_older_writer_slipped_in_is_taken_over_while_the_claim_stands(
    writers, objects, identity, tmp_path
):
    """An older writer's in-flight upload lands after the newer writer read the generations
    but before it uploaded that stem: the newer writer's upload gets a 412, reads the new
    generation, still holds the claim, and uploads over it."""
    store = writers()
    commit = store.commit("rel", "trk").__enter__()
    objects.blob("stems/rel/trk/bass.mp3").upload_from_string(b"old:bass")  # the late upload
    commit.write_stems(files_of(tmp_path, "new"))
    commit.write_manifest(body("new", identity))
    found = store.read_manifest("rel", "trk")
    assert found["jobId"] == "new" and written_by(objects, found) == {"new"}


def test_an_object_replaced_after_the_manifest_voids_it(writers, objects, identity, tmp_path):
    store = writers()
    with store.commit("rel", "trk") as commit:
        commit.write_stems(files_of(tmp_path, "a"))
        commit.write_manifest(body("a", identity))
    objects.blob("stems/rel/trk/drums.mp3").upload_from_string(b"x:unfenced")
    assert store.read_manifest("rel", "trk") is None


def test_a_set_made_from_a_replaced_original_is_not_vouched_for(
    writers, objects, identity, tmp_path
):
    store = writers()
    commit = store.commit("rel", "trk").__enter__()
    commit.write_stems(files_of(tmp_path, "a"))
    objects.blob(ORIGINAL).upload_from_string(b"a new version")
    with pytest.raises(JobError) as raised:
        commit.write_manifest(body("a", identity))
    assert raised.value.code == "input_changed" and raised.value.retryable
    assert store.read_manifest("rel", "trk") is None


@pytest.fixture
def proxied(proxy, writers):
    return proxy, writers


def test_a_stale_writers_late_large_stem_is_refused_too(proxied, objects, identity, tmp_path):
    """Stems over 8 MiB go up as resumable uploads: the fence holds for them as well."""
    proxy, writers = proxied
    stale = writers().commit("rel", "trk").__enter__()
    with writers().commit("rel", "trk") as commit:
        commit.write_stems(files_of(tmp_path, "new"))
        commit.write_manifest(body("new", identity))
    late = tmp_path / "late" / "drums.mp3"
    late.parent.mkdir()
    late.write_bytes(b"old:drums" * (1 << 20))  # 9 MiB: a resumable upload
    with pytest.raises(JobError) as raised:
        stale.write_stems({"drums": late})
    assert raised.value.code == "concurrent_write" and proxy.refused == 1
    found = writers().read_manifest("rel", "trk")
    assert found["jobId"] == "new" and written_by(objects, found) == {"new"}
    big = tmp_path / "big" / "bass.mp3"  # and a large stem of a claim that
    big.parent.mkdir()  # stands goes up as usual
    big.write_bytes(b"next:bass" * (1 << 20))
    with writers().commit("rel", "trk") as commit:
        commit.write_stems({"bass": big})
        commit.write_manifest(body("next", identity, ["bass"]))
    assert objects.blob("stems/rel/trk/bass.mp3").download_as_bytes() == big.read_bytes()


def test_a_manifest_committed_whose_answer_was_lost_counts_as_written(
    proxied, objects, identity, tmp_path
):
    """The connection drops after the manifest was stored: the retry meets its own write as a
    412, and the writer's token in the stored manifest tells it the write was its own."""
    proxy, writers = proxied
    store = writers()
    with store.commit("rel", "trk") as commit:
        commit.write_stems(files_of(tmp_path, "a"))
        proxy.drop_reply_to = commit.writer.encode()
        ours = body("a", identity)
        standing = commit.write_manifest(ours)
    assert proxy.drop_reply_to is None, "the answer was dropped"
    assert standing is ours, "reported as its own write, not as another job's set"
    assert store.read_manifest("rel", "trk")["jobId"] == "a"


def stems_only(name: str) -> bool:
    """The set's objects (audio and peaks), not the manifest or the claim beside it."""
    return name.startswith("stems/") and not name.endswith((MANIFEST, CLAIM))


def test_a_writer_that_fails_leaves_no_manifest_json(proxy, writers, objects, identity, tmp_path):
    """manifest.json is only ever a whole set's manifest: a writer's claim is an object of its
    own, and a writer whose every stem upload fails (503) leaves no manifest.json at all."""
    store = writers()
    with store.commit("rel", "trk") as commit:
        assert objects.get_blob(MANIFEST_NAME) is None, "claimed: still no manifest.json"
        commit.write_stems(files_of(tmp_path, "a"))
        assert objects.get_blob(MANIFEST_NAME) is None, "stems up: still no manifest.json"
        commit.write_manifest(body("a", identity))
    assert objects.get_blob(CLAIM_NAME) is None, "a writer done drops its claim"
    proxy.fail(stems_only)
    with pytest.raises(JobError) as raised, store.commit("rel", "trk") as commit:
        commit.write_stems(files_of(tmp_path, "b"))
    assert raised.value.code == "storage_unavailable" and proxy.failed
    assert objects.get_blob(MANIFEST_NAME) is None, "the old set is no longer vouched for"
    assert objects.get_blob(CLAIM_NAME) is not None, "the failed writer's claim stays"
    proxy.failing.clear()
    with writers().commit("rel", "trk") as commit:  # the next writer takes the claim over
        commit.write_stems(files_of(tmp_path, "c"))
        commit.write_manifest(body("c", identity))
    found = store.read_manifest("rel", "trk")
    assert found["jobId"] == "c" and written_by(objects, found) == {"c"}


def test_a_stale_manifest_racing_a_newer_claim_is_deleted_by_its_writer(
    proxy, writers, objects, identity, tmp_path
):
    """The one window GCS cannot fence: A checks its claim, B claims and replaces A's stems,
    then A's manifest lands. A checks again after writing, finds the claim lost and deletes
    its own manifest; B's set then completes."""
    stale, result = window(proxy, writers, identity, tmp_path)
    assert isinstance(result, JobError) and result.code == "concurrent_write", result
    assert objects.get_blob(MANIFEST_NAME) is None
    stale.write_manifest(body("b", identity))
    found = writers().read_manifest("rel", "trk")
    assert found["jobId"] == "b" and written_by(objects, found) == {"b"}


def test_a_stale_manifest_left_by_a_dead_writer_is_detectable_and_replaced(
    proxy, writers, objects, identity, tmp_path
):
    """As above, but A dies before it can delete its manifest (its delete fails): manifest.json
    then names generations that are no longer the objects' (B replaced them), which the
    manifest's `objectGenerations` show any reader; B's manifest replaces it."""
    proxy.fail(lambda name: name == MANIFEST_NAME, methods=("DELETE",))
    newer, result = window(proxy, writers, identity, tmp_path)
    assert isinstance(result, JobError) and result.code == "storage_unavailable", result
    left = writers().download_json(MANIFEST_NAME)[0]
    assert left["jobId"] == "a"
    current = {b.name: b.generation for b in objects.client.list_blobs(objects, prefix="stems/")}
    assert all(current[n] != g for n, g in left["objectGenerations"].items()), "detectable"
    assert writers().read_manifest("rel", "trk") is None, "and read_manifest detects it"
    proxy.failing.clear()
    assert newer.write_manifest(body("b", identity))["jobId"] == "b"
    found = writers().read_manifest("rel", "trk")
    assert found["jobId"] == "b" and written_by(objects, found) == {"b"}


def window(proxy, writers, identity, tmp_path):
    """A's manifest write held at the proxy while B claims and uploads; then let through.
    (B's open commit, what A's write_manifest returned or raised)."""
    a = writers().commit("rel", "trk").__enter__()
    a.write_stems(files_of(tmp_path, "a"))
    hold = proxy.hold(lambda name, _: name == MANIFEST_NAME)
    outcome = []

    def finish():
        try:
            outcome.append(a.write_manifest(body("a", identity)))
        except JobError as error:
            outcome.append(error)

    thread = threading.Thread(target=finish)
    thread.start()
    assert hold.arrived.wait(10), "A checked its claim and sent its manifest"
    b = writers().commit("rel", "trk").__enter__()
    b.write_stems(files_of(tmp_path, "b"))
    hold.release()
    thread.join(30)
    return b, outcome[0]


def test_a_damaged_reply_to_a_committed_large_stem_is_retried(proxy, writers, identity, tmp_path):
    """The final chunk of a resumable upload is committed, its reply cut to 64 bytes (the
    client fails to parse it): transient. The retry meets a 412 (the object exists now) and
    the writer, whose claim stands, uploads it again."""
    big = tmp_path / "big" / "bass.mp3"
    big.parent.mkdir()
    big.write_bytes(b"a:bass" * (1 << 20) * 2)  # 12 MiB: a resumable upload
    store = writers()
    proxy.damage(lambda name: name.endswith("bass.mp3"), after=64)
    with store.commit("rel", "trk") as commit:
        commit.write_stems({"bass": big})
        commit.write_manifest(body("a", identity, ["bass"]))
    assert proxy.damaged == 1 and proxy.refused == 1
    found = store.read_manifest("rel", "trk")
    assert found["jobId"] == "a"
    assert store.bucket.blob("stems/rel/trk/bass.mp3").download_as_bytes() == big.read_bytes()


def test_a_damaged_reply_to_a_committed_manifest_counts_as_written(
    proxy, writers, identity, tmp_path
):
    """The manifest's reply cut after 64 bytes: the retry meets a 412 and the writer's token in
    the stored manifest tells it the write was its own."""
    store = writers()
    proxy.damage(lambda name: name == MANIFEST_NAME, after=64)
    with store.commit("rel", "trk") as commit:
        commit.write_stems(files_of(tmp_path, "a"))
        ours = body("a", identity)
        assert commit.write_manifest(ours) is ours
    assert proxy.damaged == 1
    assert store.read_manifest("rel", "trk")["jobId"] == "a"
