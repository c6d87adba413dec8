"""`stem-job drain` and `run` against the real Pub/Sub and GCS emulators, as subprocesses."""

import base64
import json
import signal
import subprocess
import sys
import time

import pytest
from conftest import job_env, last_json, run_job
from gcs_proxy import GcsProxy
from ni_reader import check_ni_stems, decode
from stand_ins import PROJECT
from synthetic import FOUR, music, write_audio

from job.errors import EXIT_BAD_INPUT, EXIT_CONFIG, EXIT_OK, EXIT_RETRY
from job.messages import STEMS


@pytest.fixture
def cloud(
    pubsub_emulator, gcs_emulator, bucket, make_topic, make_subscription, model_dir, tmp_path
):
    """A bucket, a work subscription, a results topic with a pull subscription, and the env."""
    work = make_subscription(ack_deadline_s=10)
    results_topic = make_topic("results")
    results = make_subscription(topic=results_topic)

    class Cloud:
        pass

    cloud = Cloud()
    cloud.bucket, cloud.work, cloud.results = bucket, work, results
    cloud.storage = gcs_emulator.client(PROJECT)
    cloud.env = job_env(
        model_dir,
        tmp_path / "unused",
        STORAGE_MODE="gcs",
        GCS_BUCKET=bucket,
        PUBSUB_SUBSCRIPTION=work.path.rsplit("/", 1)[1],
        PUBSUB_RESULTS_TOPIC=results_topic.rsplit("/", 1)[1],
        IDLE_TIMEOUT_S="3",
        RETRY_DEADLINE_S="20",
        **pubsub_emulator.env,
        **gcs_emulator.env,
    )

    def upload(name, data: bytes):
        cloud.storage.bucket(bucket).blob(name).upload_from_string(data)
        return f"gs://{bucket}/{name}"

    def publish(payload):
        data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        return pubsub_emulator.publisher.publish(work.topic, data).result(timeout=10)

    def results_now(expected, timeout=30):
        got, deadline = [], time.monotonic() + timeout
        while len(got) < expected and time.monotonic() < deadline:
            response = pubsub_emulator.subscriber.pull(
                request={"subscription": results.path, "max_messages": 50}, timeout=5
            )
            for received in response.received_messages:
                got.append((json.loads(received.message.data), dict(received.message.attributes)))
            if response.received_messages:
                pubsub_emulator.subscriber.acknowledge(
                    request={
                        "subscription": results.path,
                        "ack_ids": [r.ack_id for r in response.received_messages],
                    }
                )
        return got

    def queue_is_empty():
        response = pubsub_emulator.subscriber.pull(
            request={"subscription": work.path, "max_messages": 10}, timeout=5
        )
        return not response.received_messages

    cloud.upload, cloud.publish, cloud.results_now, cloud.queue_is_empty = (
        upload,
        publish,
        results_now,
        queue_is_empty,
    )
    cloud.subscriber = pubsub_emulator.subscriber
    return cloud


def message(cloud, uri, track="trk_1", **extra):
    return {
        "jobId": f"job_{track}",
        "releaseId": "rel_1",
        "artistId": "art_1",
        "trackId": track,
        "originalStemUri": uri,
        "mimeType": "audio/mpeg",
        **extra,
    }


def stems_in_bucket(cloud, track):
    names = {b.name for b in cloud.storage.list_blobs(cloud.bucket, prefix=f"stems/rel_1/{track}/")}
    return names


def start_drain(env: dict, *args: str, until=("first window",)) -> subprocess.Popen:
    """`stem-job drain ARGS` started, read up to the first stderr line holding one of `until`."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "job", "drain", *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    for line in proc.stderr:
        if any(marker in line for marker in until):
            break
    return proc


def test_empty_subscription_exits_zero_without_touching_the_model(cloud, tmp_path):
    # neither the model nor the device is looked at: both would fail (exit 78) if they were
    env = cloud.env | {"MODEL_DIR": str(tmp_path / "no-model"), "DEVICE": "cuda"}
    proc = run_job(["drain", "--max-messages", "1", "--idle-timeout", "2"], env)
    assert proc.returncode == EXIT_OK, proc.stderr


@pytest.mark.parametrize(
    "variable, value", [("MODEL_DIR", "/nonexistent/model"), ("DEVICE", "cuda")]
)
def test_configuration_error_exits_78_and_returns_the_message(cloud, song, variable, value):
    uri = cloud.upload("originals/cfg.mp3", song.read_bytes())
    cloud.publish(message(cloud, uri, "trk_cfg"))
    proc = run_job(["drain", "--max-messages", "1"], cloud.env | {variable: value})
    assert proc.returncode == EXIT_CONFIG, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if not line.startswith("{")]
    assert len(errors) == 1 and variable in errors[0], proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert cloud.results_now(1, timeout=3) == [], "a configuration error publishes no result"
    assert not cloud.queue_is_empty(), "the message must be back on the queue at once"


def test_batch_of_good_and_bad_messages(cloud, song):
    good = cloud.upload("originals/good.mp3", song.read_bytes())
    pdf = cloud.upload("originals/doc.mp3", b"%PDF-1.4 not audio" * 100)
    long_one = cloud.upload(
        "originals/long.flac", write_audio(song.parent / "long.flac", music(14.0)).read_bytes()
    )
    batch = [
        (message(cloud, good, "trk_good"), "completed", None),
        (b"{not json", "failed", "invalid_message"),
        (message(cloud, good, "../etc"), "failed", "invalid_id"),
        (message(cloud, "gs://someone-elses-bucket/x.mp3", "trk_b"), "failed", "input_not_allowed"),
        (
            message(cloud, f"gs://{cloud.bucket}/originals/missing.mp3", "trk_m"),
            "failed",
            "input_not_found",
        ),
        (message(cloud, pdf, "trk_pdf"), "failed", "not_audio"),
        (message(cloud, long_one, "trk_long"), "failed", "too_long"),
        ({"releaseId": "rel_1", "trackId": "t_x"}, "failed", "invalid_message"),
    ]
    for payload, _, _ in batch:
        cloud.publish(payload)
    env = cloud.env | {"MAX_DURATION_S": "11"}
    proc = run_job(["drain", "--max-messages", str(len(batch))], env)
    # every message was concluded and acked: the Job did its work, whatever the results
    assert proc.returncode == EXIT_OK, proc.stderr[-3000:]
    results = cloud.results_now(len(batch))
    assert sorted((r["status"], (r.get("error") or {}).get("code")) for r, _ in results) == sorted(
        (status, code) for _, status, code in batch
    )
    for result, attributes in results:
        assert attributes["status"] == result["status"]
        if result["jobId"]:
            assert attributes["jobId"] == result["jobId"]
    completed = next(r for r, _ in results if r["status"] == "completed")
    assert completed["stems"] == {
        s: f"https://storage.googleapis.com/{cloud.bucket}/stems/rel_1/trk_good/{s}.mp3"
        for s in STEMS
    }
    assert stems_in_bucket(cloud, "trk_good") == {
        f"stems/rel_1/trk_good/{s}{ext}" for s in STEMS for ext in (".mp3", ".peaks.json")
    } | {"stems/rel_1/trk_good/manifest.json"}
    blob = cloud.storage.bucket(cloud.bucket).get_blob("stems/rel_1/trk_good/vocals.mp3")
    assert blob.content_type == "audio/mpeg"
    peaks = cloud.storage.bucket(cloud.bucket).get_blob("stems/rel_1/trk_good/vocals.peaks.json")
    assert peaks.content_type == "application/json"
    assert (
        completed["outputs"]["vocals"]["peaks"]
        == f"https://storage.googleapis.com/{cloud.bucket}/stems/rel_1/trk_good/vocals.peaks.json"
    )
    assert cloud.queue_is_empty(), "every message, good or bad, must be acked"


@pytest.mark.parametrize("model", ["htdemucs", "htdemucs_ft"])
def test_other_models_drain_mixes_and_ni_stems(cloud, song, model, four_model_dir, bag_model_dir):
    """A four-source model and a bag of two with per-source weights: a message asking for
    mixes and the NI Stems file gets them in the bucket, named from the model's sources (a
    sum's `+` percent-encoded in its URL), and a result naming the weights."""
    folder = {"htdemucs": four_model_dir, "htdemucs_ft": bag_model_dir}[model]
    track = f"trk_{model}"
    uri = cloud.upload(f"originals/{track}.mp3", song.read_bytes())
    outputs = ["no_drums", "drums+bass", "instrumental", "ni_stems"]
    cloud.publish(message(cloud, uri, track, outputs=outputs))
    env = cloud.env | {"MODEL_DIR": str(folder), "MODEL_NAME": model}
    proc = run_job(["drain", "--max-messages", "1"], env)
    assert proc.returncode == EXIT_OK, proc.stderr[-3000:]
    ((result, _),) = cloud.results_now(1)
    assert result["status"] == "completed", result
    assert result["model"] == model and result["modelSources"] == FOUR
    assert result["modelDigest"].startswith("sha256:")
    prefix = f"https://storage.googleapis.com/{cloud.bucket}/stems/rel_1/{track}/"
    files = {
        "instrumental": "instrumental.mp3",
        "no_drums": "no_drums.mp3",
        "drums+bass": "drums%2Bbass.mp3",
        "ni_stems": "ni_stems.stem.mp4",
    }
    assert result["stems"] == {name: prefix + file for name, file in files.items()}
    names = {name.replace("%2B", "+") for name in files.values()}
    peaks = {f"{name}.peaks.json" for name in list(files)[:3]}
    assert stems_in_bucket(cloud, track) == {
        f"stems/rel_1/{track}/{name}" for name in names | peaks | {"manifest.json"}
    }
    bucket = cloud.storage.bucket(cloud.bucket)
    blob = bucket.get_blob(f"stems/rel_1/{track}/ni_stems.stem.mp4")
    assert blob.content_type == "audio/mp4"
    stem_file = song.parent / f"{track}.stem.mp4"
    blob.download_to_filename(stem_file)
    check_ni_stems(stem_file, decode(song), None)


def test_duplicate_message_reuses_the_completed_set(cloud, song):
    uri = cloud.upload("originals/dup.mp3", song.read_bytes())
    cloud.publish(message(cloud, uri, "trk_dup"))
    cloud.publish(message(cloud, uri, "trk_dup"))
    proc = run_job(["drain", "--max-messages", "2"], cloud.env)
    assert proc.returncode == EXIT_OK, proc.stderr[-3000:]
    (first, _), (second, _) = cloud.results_now(2)
    assert (first["reused"], second["reused"]) == (False, True)
    assert first["stems"] == second["stems"]
    assert "separate" in first["timings"] and "separate" not in second["timings"]
    assert "download" not in second["timings"], "a complete set is answered from its manifest"
    # a changed input (new generation) is separated again
    uri = cloud.upload(
        "originals/dup.mp3", write_audio(song.parent / "other.mp3", music(5, seed=9)).read_bytes()
    )
    cloud.publish(message(cloud, uri, "trk_dup"))
    assert run_job(["drain"], cloud.env).returncode == EXIT_OK
    ((third, _),) = cloud.results_now(1)
    assert third["reused"] is False and abs(third["durationS"] - 5.0) < 0.1


def test_next_track_is_fetched_and_separated_while_the_current_one_finishes(cloud, tmp_path):
    first = cloud.upload(
        "originals/a.flac", write_audio(tmp_path / "a.flac", music(20, seed=6)).read_bytes()
    )
    second = cloud.upload(
        "originals/b.mp3", write_audio(tmp_path / "b.mp3", music(6, seed=7)).read_bytes()
    )
    cloud.publish(message(cloud, first, "trk_a"))
    cloud.publish(message(cloud, second, "trk_b"))
    proc = run_job(["drain", "--max-messages", "2"], cloud.env)
    assert proc.returncode == EXIT_OK, proc.stderr[-3000:]
    events = [
        e
        for e in map(
            json.loads, filter(lambda text: text.startswith("{"), proc.stderr.splitlines())
        )
        if e.get("event") in ("job_summary", "first_window")
    ]
    summaries = {e["jobId"]: e for e in events if e["event"] == "job_summary"}
    assert summaries["job_trk_a"]["fetchedAhead"] is False
    assert summaries["job_trk_b"]["fetchedAhead"] is True, "fetched while trk_a separated"
    # trk_a's upload, manifest and result (its job_summary closes them) come after trk_b has
    # entered the model: the model does not wait for them
    order = [e["event"] if e["event"] == "first_window" else e["jobId"] for e in events]
    assert order == ["first_window", "first_window", "job_trk_a", "job_trk_b"], order
    results = [r for r, _ in cloud.results_now(2)]
    assert [r["trackId"] for r in results] == ["trk_a", "trk_b"], "results keep the messages' order"
    results = {r["trackId"]: r for r in results}
    assert {t: r["status"] for t, r in results.items()} == {
        "trk_a": "completed",
        "trk_b": "completed",
    }
    assert abs(results["trk_b"]["durationS"] - 6.0) < 0.1
    assert stems_in_bucket(cloud, "trk_b") == {
        f"stems/rel_1/trk_b/{s}{ext}" for s in STEMS for ext in (".mp3", ".peaks.json")
    } | {"stems/rel_1/trk_b/manifest.json"}
    # trk_a's summary is logged after trk_b entered the engine (which resets the device's
    # peak): its figure is still its own track's, as its manifest records it
    for track in ("trk_a", "trk_b"):
        blob = cloud.storage.bucket(cloud.bucket).blob(f"stems/rel_1/{track}/manifest.json")
        engine = json.loads(blob.download_as_bytes())["engine"]
        assert "peakGpuMemoryMb" in summaries[f"job_{track}"], summaries[f"job_{track}"]
        assert summaries[f"job_{track}"]["peakGpuMemoryMb"] == engine["devicePeakMb"]


def test_sigterm_nacks_and_leaves_no_manifest(cloud, tmp_path):
    uri = cloud.upload(
        "originals/long.flac", write_audio(tmp_path / "long.flac", music(60, seed=4)).read_bytes()
    )
    cloud.publish(message(cloud, uri, "trk_term"))
    proc = start_drain(cloud.env, until=("separated", "first window"))
    sent = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=30)
    elapsed = time.monotonic() - sent
    # inside Cloud Run's 10 s grace period (the forward pass is aborted, not waited for)
    assert proc.returncode == EXIT_RETRY and elapsed < 10
    assert "stems/rel_1/trk_term/manifest.json" not in stems_in_bucket(cloud, "trk_term")
    assert cloud.results_now(1, timeout=3) == [], "an interrupted job publishes no result"
    assert not cloud.queue_is_empty(), "the message must be back on the queue at once"


def test_storage_outage_mid_run_is_survived(cloud, gcs_emulator, tmp_path):
    uri = cloud.upload(
        "originals/outage.flac", write_audio(tmp_path / "o.flac", music(25, seed=5)).read_bytes()
    )
    cloud.publish(message(cloud, uri, "trk_outage"))
    proc = start_drain(cloud.env)
    gcs_emulator.kill()
    time.sleep(8)  # down while the separation finishes and the upload starts retrying
    gcs_emulator.restart()
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == EXIT_OK, stderr[-3000:]
    ((result, _),) = cloud.results_now(1)
    assert result["status"] == "completed"
    assert "stems/rel_1/trk_outage/manifest.json" in stems_in_bucket(cloud, "trk_outage")


def test_run_publishes_its_result_and_progress_events(cloud, song):
    uri = cloud.upload("originals/run.mp3", song.read_bytes())
    env = cloud.env | {
        "JOB_MESSAGE": base64.b64encode(
            json.dumps(message(cloud, uri, "trk_run")).encode()
        ).decode(),
        "PROGRESS_EVENTS": "true",
    }
    proc = run_job(["run"], env)
    assert proc.returncode == EXIT_OK, proc.stderr[-3000:]
    printed = last_json(proc.stdout)
    published = cloud.results_now(3, timeout=10)
    finals = [r for r, a in published if a["status"] == "completed"]
    progress = [r for r, a in published if a["status"] == "processing"]
    assert finals == [printed]
    assert progress and all(
        0 <= p["progress"] <= 1 and p["jobId"] == "job_trk_run" for p in progress
    )


def test_bad_message_in_run_is_published_as_failed(cloud):
    proc = run_job(["run"], cloud.env | {"JOB_MESSAGE": "%%%"})
    assert proc.returncode == EXIT_BAD_INPUT
    ((result, attributes),) = cloud.results_now(1)
    assert result["status"] == attributes["status"] == "failed"
    assert result["error"]["code"] == "invalid_message"


# -- faults on the output side are ours, never the sender's ----------------------------------------
def config_lines(stderr: str) -> list:
    return [line for line in stderr.splitlines() if line.startswith("stem-job:")]


def test_a_missing_stems_bucket_keeps_every_message(cloud, song):
    uri = cloud.upload("originals/nob.mp3", song.read_bytes())
    cloud.publish(message(cloud, uri, "trk_nob"))
    env = cloud.env | {"GCS_BUCKET": "no-such-stems-bucket", "ALLOWED_INPUT_BUCKETS": cloud.bucket}
    proc = run_job(["drain", "--max-messages", "2"], env)
    assert proc.returncode == EXIT_CONFIG, proc.stderr[-3000:]
    [line] = config_lines(proc.stderr)
    assert "GCS_BUCKET=no-such-stems-bucket" in line and "Traceback" not in proc.stderr
    assert cloud.results_now(1, timeout=3) == [], "no failed result may blame the input"
    assert not cloud.queue_is_empty(), "the message must stay on the queue"


def test_a_stems_bucket_gone_mid_batch_nacks_and_stops(cloud, song, gcs_emulator, unique_name):
    """The start-up check passes; the bucket then disappears: the upload's 404 is ours."""
    originals = unique_name("in")
    cloud.storage.create_bucket(originals)
    cloud.storage.bucket(originals).blob("gone.mp3").upload_from_string(song.read_bytes())
    for track in ("trk_gone1", "trk_gone2"):
        cloud.publish(message(cloud, f"gs://{originals}/gone.mp3", track))
    proc = start_drain(cloud.env | {"ALLOWED_INPUT_BUCKETS": originals}, "--max-messages", "2")
    for blob in cloud.storage.list_blobs(cloud.bucket):
        blob.delete()
    cloud.storage.bucket(cloud.bucket).delete()
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == EXIT_CONFIG, stderr[-3000:]
    assert any(f"GCS_BUCKET={cloud.bucket}" in line for line in config_lines(stderr)), stderr[
        -3000:
    ]
    assert cloud.results_now(1, timeout=3) == []
    assert not cloud.queue_is_empty(), "both messages must be back on the queue"


def test_a_missing_results_topic_keeps_the_message_and_names_the_variable(cloud, song):
    uri = cloud.upload("originals/notopic.mp3", song.read_bytes())
    cloud.publish(message(cloud, uri, "trk_notopic"))
    proc = run_job(["drain"], cloud.env | {"PUBSUB_RESULTS_TOPIC": "no-such-results"})
    assert proc.returncode == EXIT_CONFIG, proc.stderr[-3000:]
    [line] = config_lines(proc.stderr)
    assert "PUBSUB_RESULTS_TOPIC" in line and "no-such-results" in line
    assert not cloud.queue_is_empty()


def test_no_credentials_is_one_line_and_exit_78(cloud, tmp_path):
    env = {
        k: v
        for k, v in cloud.env.items()
        if k not in ("PUBSUB_EMULATOR_HOST", "STORAGE_EMULATOR_HOST")
    }
    env |= {
        "HOME": str(tmp_path),
        "NO_GCE_CHECK": "True",
        "GCE_METADATA_HOST": "127.0.0.1:9",
        "GCE_METADATA_IP": "127.0.0.1:9",
        "CLOUDSDK_CONFIG": str(tmp_path / "gcloud"),
    }
    env.pop("GOOGLE_APPLICATION_CREDENTIALS", None)
    for command in (["drain"], ["run", "--message", json.dumps(message(cloud, "gs://b/x.mp3"))]):
        proc = run_job(command, env, timeout=120)
        assert proc.returncode == EXIT_CONFIG, (command, proc.stderr[-3000:])
        assert "Traceback" not in proc.stderr
        lines = config_lines(proc.stderr)
        assert lines and "credentials" in lines[0], (command, proc.stderr[-3000:])


# -- Cloud Run: the job knows its retry budget ---------------------------------------------------
def cloud_run_task(cloud, attempt: int, **extra) -> dict:
    """The env Cloud Run gives attempt `attempt` (0-based) of a job with maxRetries 1."""
    return cloud.env | {
        "CLOUD_RUN_TASK_ATTEMPT": str(attempt),
        "CLOUD_RUN_TASK_INDEX": "0",
        "CLOUD_RUN_EXECUTION": "stem-job-abc12",
        "MAX_RETRIES": "1",
        **extra,
    }


def job_message(cloud, uri, track) -> str:
    return json.dumps(message(cloud, uri, track))


def test_a_storage_outage_is_reported_on_the_last_attempt_only(cloud, song):
    uri = cloud.upload("originals/out.mp3", song.read_bytes())
    outage = {
        "STORAGE_EMULATOR_HOST": "http://127.0.0.1:9",
        "RETRY_DEADLINE_S": "2",
        "JOB_MESSAGE": job_message(cloud, uri, "trk_out"),
    }
    first = run_job(["run"], cloud_run_task(cloud, 0, **outage))
    assert first.returncode == EXIT_RETRY, first.stderr[-3000:]
    assert last_json(first.stdout)["error"]["code"] == "storage_unavailable"
    assert cloud.results_now(1, timeout=3) == [], "a retry comes: nothing is final yet"
    last = run_job(["run"], cloud_run_task(cloud, 1, **outage))
    assert last.returncode == EXIT_RETRY, last.stderr[-3000:]
    ((published, attributes),) = cloud.results_now(1)
    assert published == last_json(last.stdout) and attributes["status"] == "failed"
    assert published["error"]["code"] == "storage_unavailable"
    assert published["error"]["retryable"] is True


def test_a_configuration_error_on_the_last_attempt_is_printed_and_published(cloud, song, tmp_path):
    uri = cloud.upload("originals/cfg.mp3", song.read_bytes())
    env = cloud_run_task(
        cloud,
        1,
        MODEL_DIR=str(tmp_path / "no-model"),
        JOB_MESSAGE=job_message(cloud, uri, "trk_cfgrun"),
    )
    proc = run_job(["run"], env)
    assert proc.returncode == EXIT_CONFIG, proc.stderr[-3000:]
    printed = last_json(proc.stdout)
    assert printed["status"] == "failed" and printed["error"]["code"] == "config"
    assert printed["jobId"] == "job_trk_cfgrun" and printed["error"]["retryable"] is True
    [line] = config_lines(proc.stderr)
    assert "MODEL_DIR" in line
    ((published, _),) = cloud.results_now(1)
    assert published == printed
    # docker run / GKE (no Cloud Run variables): printed, not published, exit 78 as before
    proc = run_job(
        ["run"],
        cloud.env
        | {
            "MODEL_DIR": str(tmp_path / "no-model"),
            "JOB_MESSAGE": job_message(cloud, uri, "trk_cfgrun"),
        },
    )
    assert proc.returncode == EXIT_CONFIG and last_json(proc.stdout)["error"]["code"] == "config"
    assert cloud.results_now(1, timeout=3) == []


def test_sigterm_on_the_last_attempt_is_reported_inside_the_grace(cloud, tmp_path):
    uri = cloud.upload(
        "originals/term.flac", write_audio(tmp_path / "term.flac", music(60, seed=4)).read_bytes()
    )
    env = cloud_run_task(cloud, 1, JOB_MESSAGE=job_message(cloud, uri, "trk_lastterm"))
    proc = subprocess.Popen(
        [sys.executable, "-m", "job", "run"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    for line in proc.stderr:
        if "first window" in line:
            break
    sent = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    stdout, _ = proc.communicate(timeout=30)
    elapsed = time.monotonic() - sent
    assert proc.returncode == EXIT_RETRY and elapsed < 10  # Cloud Run SIGKILLs at 10 s
    ((published, _),) = cloud.results_now(1)
    assert published == last_json(stdout)
    assert published["error"]["code"] == "interrupted" and published["error"]["retryable"]
    assert "stems/rel_1/trk_lastterm/manifest.json" not in stems_in_bucket(cloud, "trk_lastterm")


def test_bad_input_on_cloud_run_is_reported_once_and_not_retried(cloud):
    pdf = cloud.upload("originals/cr.mp3", b"%PDF-1.4 not audio" * 100)
    proc = run_job(
        ["run"], cloud_run_task(cloud, 0, JOB_MESSAGE=job_message(cloud, pdf, "trk_crb"))
    )
    # Cloud Run retries every non-zero exit: the retry would report the track a second time
    assert proc.returncode == EXIT_OK, proc.stderr[-3000:]
    ((published, _),) = cloud.results_now(1)
    assert published["error"]["code"] == "not_audio" and published["error"]["retryable"] is False


def test_sigterm_while_a_track_finishes_nacks_both(cloud, tmp_path):
    """SIGTERM when the next track enters the model, while the first one's encoders' tail,
    upload, manifest and result run in the finishing thread: the forward pass is aborted, the
    finishing track stops before its manifest, both messages go back to the queue at once and
    neither reports anything (docs/deployment.md has the measured time)."""
    first = cloud.upload(
        "originals/fa.flac", write_audio(tmp_path / "fa.flac", music(20, seed=6)).read_bytes()
    )
    second = cloud.upload(
        "originals/fb.flac", write_audio(tmp_path / "fb.flac", music(60, seed=7)).read_bytes()
    )
    cloud.publish(message(cloud, first, "trk_fa"))
    cloud.publish(message(cloud, second, "trk_fb"))
    proc = subprocess.Popen(
        [sys.executable, "-m", "job", "drain", "--max-messages", "2"],
        env=cloud.env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    windows = 0
    for line in proc.stderr:
        windows += "first window" in line or '"first_window"' in line
        if windows == 2:  # trk_fb entered the model: trk_fa is finishing
            break
    sent = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=60)
    print(f"SIGTERM to exit while a track finished: {time.monotonic() - sent:.2f} s")
    assert proc.returncode == EXIT_RETRY, stderr[-3000:]
    assert cloud.results_now(1, timeout=3) == [], "an interrupted track publishes no result"
    for track in ("trk_fa", "trk_fb"):
        assert f"stems/rel_1/{track}/manifest.json" not in stems_in_bucket(cloud, track)
    back, deadline = set(), time.monotonic() + 20
    while len(back) < 2 and time.monotonic() < deadline:
        response = cloud.subscriber.pull(
            request={"subscription": cloud.work.path, "max_messages": 10}, timeout=5
        )
        back |= {json.loads(r.message.data)["trackId"] for r in response.received_messages}
    assert back == {"trk_fa", "trk_fb"}, "both messages must be back on the queue"


# -- exactly one result per message: the last delivery, a failed ack, storage faults ----------
@pytest.fixture
def proxy(gcs_emulator):
    """hack/gcs_proxy.py in front of the GCS stand-in, to aim faults at single objects."""
    proxy = GcsProxy(gcs_emulator.port)
    yield proxy
    proxy.close()


def test_the_last_delivery_publishes_its_failure_instead_of_dead_lettering_it(
    cloud, proxy, pubsub_emulator, make_subscription, song
):
    """A retryable failure on every delivery (the original unreadable: 503): deliveries 1-4
    are nacked for a retry; the 5th, the subscription's last before its dead-letter topic,
    publishes the `failed` result and acks, so stem-results hears of it and nothing is
    dead-lettered unheard."""
    work = make_subscription(dead_letter=True, max_delivery_attempts=5)
    dead = make_subscription(topic=work.dead_letter_topic)
    uri = cloud.upload("originals/dl.mp3", song.read_bytes())
    proxy.fail(lambda name: name == "originals/dl.mp3", methods=("GET",))
    pubsub_emulator.publisher.publish(
        work.topic, json.dumps(message(cloud, uri, "trk_dl")).encode()
    ).result(timeout=10)
    env = cloud.env | proxy.env
    env.update(PUBSUB_SUBSCRIPTION=work.path.rsplit("/", 1)[1], RETRY_DEADLINE_S="1")
    proc = run_job(["drain", "--max-messages", "5"], env)
    assert proc.returncode == EXIT_RETRY, proc.stderr[-3000:]
    assert "delivery 5 is the message's last" in proc.stderr
    ((result, attributes),) = cloud.results_now(1)
    assert attributes["status"] == "failed" and result["jobId"] == "job_trk_dl"
    assert result["error"]["retryable"] is True, result
    assert cloud.results_now(1, timeout=3) == [], "one result, not one per delivery"
    for subscription in (work.path, dead.path):
        response = pubsub_emulator.subscriber.pull(
            request={"subscription": subscription, "max_messages": 10}, timeout=5
        )
        assert not response.received_messages, f"{subscription} still holds the message"


def test_an_ack_that_fails_after_the_publish_is_logged_and_its_redelivery_publishes_nothing(
    cloud, monkeypatch, caplog
):
    """The ack fails (here: refused by the service) after the result is out. The drain logs it
    and goes on (before: it raised in the finishing thread, exit 75, the rest of the batch
    nacked). The message comes back after its ack deadline; the next delivery finds the record
    of the published result and acks it: no second result, nothing separated again."""
    for key, value in cloud.env.items():
        monkeypatch.setenv(key, value)
    from job.config import load_settings
    from job.drain import Delivery, Drainer
    from job.pubsub import LeaseKeeper, pull

    cloud.publish(b"not json: a bad message gets one failed result")
    drainer = Drainer(load_settings())
    (received,) = pull(drainer.subscriber, drainer.subscription, 1, 10)
    with LeaseKeeper(drainer.subscriber, drainer.subscription, 10) as keeper:
        keeper.hold([received])
        keeper.subscription_path += "-gone"  # the ack goes nowhere: NotFound, not retried
        drainer.concluder.conclude(received, Delivery.parse(received).refusal, keeper)
    assert drainer.outcomes == [EXIT_OK]
    assert "failed after its result was published" in caplog.text
    ((first, attributes),) = cloud.results_now(1)
    assert attributes["status"] == "failed"
    time.sleep(11)  # the ack deadline: the message is delivered again
    proc = run_job(["drain", "--max-messages", "1"], cloud.env)
    assert proc.returncode == EXIT_OK, proc.stderr[-3000:]
    assert "was published by an earlier delivery" in proc.stderr
    assert cloud.results_now(1, timeout=3) == [], "no second result"
    assert cloud.queue_is_empty()


def test_every_stem_upload_failing_exits_75_and_leaves_no_manifest(cloud, proxy, song):
    """503 on every stem upload: retryable, the message goes back (exit 75), and manifest.json
    does not exist: before, the writer's claim was left under that name."""
    uri = cloud.upload("originals/s503.mp3", song.read_bytes())
    cloud.publish(message(cloud, uri, "trk_503"))
    proxy.fail(lambda name: name.startswith("stems/") and name.endswith((".mp3", ".peaks.json")))
    env = cloud.env | proxy.env | {"RETRY_DEADLINE_S": "2"}
    proc = run_job(["drain", "--max-messages", "1"], env)
    assert proc.returncode == EXIT_RETRY, proc.stderr[-3000:]
    assert proxy.failed and "storage_unavailable" in proc.stderr
    assert "stems/rel_1/trk_503/manifest.json" not in stems_in_bucket(cloud, "trk_503")
    assert cloud.results_now(1, timeout=3) == []
    assert not cloud.queue_is_empty(), "the message is back for a retry"


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_a_job_killed_during_its_uploads_leaves_no_manifest(cloud, proxy, song, sig):
    """SIGKILL or SIGTERM while a stem upload is in flight (held at the proxy): whatever the
    job left, manifest.json is not among it (SIGTERM: exit 75, the message back at once)."""
    uri = cloud.upload("originals/kill.mp3", song.read_bytes())
    cloud.publish(message(cloud, uri, "trk_kill"))
    hold = proxy.hold(lambda name, _: name == "stems/rel_1/trk_kill/vocals.mp3")
    proc = start_drain(cloud.env | proxy.env, "--max-messages", "1")
    assert hold.arrived.wait(120), "the upload began"
    proc.send_signal(sig)
    hold.release(forward=sig == signal.SIGTERM)  # a SIGTERMed job's upload may still land
    proc.communicate(timeout=60)
    assert proc.returncode == (-signal.SIGKILL if sig == signal.SIGKILL else EXIT_RETRY)
    assert "stems/rel_1/trk_kill/manifest.json" not in stems_in_bucket(cloud, "trk_kill")
    assert cloud.results_now(1, timeout=3) == []


def test_sigterm_on_the_last_delivery_publishes_the_interruption_for_the_whole_batch(
    cloud, pubsub_emulator, make_subscription, tmp_path
):
    """Two messages on their 5th and last delivery, pulled in one batch; SIGTERM while the
    first separates. Neither goes back to be dead-lettered unheard: each gets one `failed`
    (interrupted) result and is acked, the second one unstarted."""
    work = make_subscription(dead_letter=True, max_delivery_attempts=5)
    song = write_audio(tmp_path / "last.flac", music(40, seed=8)).read_bytes()
    for track in ("trk_l1", "trk_l2"):
        uri = cloud.upload(f"originals/{track}.flac", song)
        pubsub_emulator.publisher.publish(
            work.topic, json.dumps(message(cloud, uri, track)).encode()
        ).result(timeout=10)
    attempts, deadline = {}, time.monotonic() + 60
    while min(attempts.values(), default=0) < 4 or len(attempts) < 2:  # deliveries 1-4, nacked
        assert time.monotonic() < deadline, attempts
        response = pubsub_emulator.subscriber.pull(
            request={"subscription": work.path, "max_messages": 10}, timeout=5
        )
        for received in response.received_messages:
            attempts[received.message.message_id] = received.delivery_attempt
        if response.received_messages:
            pubsub_emulator.subscriber.modify_ack_deadline(
                request={
                    "subscription": work.path,
                    "ack_ids": [r.ack_id for r in response.received_messages],
                    "ack_deadline_seconds": 0,
                }
            )
    assert set(attempts.values()) == {4}, attempts
    env = cloud.env | {"PUBSUB_SUBSCRIPTION": work.path.rsplit("/", 1)[1]}
    proc = start_drain(env, "--max-messages", "2")
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == EXIT_RETRY, stderr[-3000:]
    results = cloud.results_now(2)
    assert sorted(r["jobId"] for r, _ in results) == ["job_trk_l1", "job_trk_l2"], results
    assert {r["error"]["code"] for r, _ in results} == {"interrupted"}, results
    assert cloud.results_now(1, timeout=3) == []
    response = pubsub_emulator.subscriber.pull(
        request={"subscription": work.path, "max_messages": 10}, timeout=5
    )
    assert not response.received_messages, "both acked"
