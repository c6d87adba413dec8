"""The built image, run the ways its users and platforms run it (hack/image-test builds it).

Every case starts the real image with the Docker engine: `docker run` with env vars and a
mounted folder as a Kubernetes or Cloud Run job would, the platform's hardening switches
(read-only root, an arbitrary uid, no network), `drain` against the Pub/Sub and GCS stand-ins on
the host network, `docker stop` in the middle of a separation, bad input, and Compose. Each case
prints one PASS/FAIL line; the exit status is the number of failures.

  python hack/image_test.py IMAGE [--size-budget-mb N] [--compose]
"""

import argparse
import base64
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
import urllib.request
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "hack"))
sys.path.insert(0, str(REPO))
from emulators import (  # noqa: E402
    GcsEmulator,
    PubSubEmulator,
    ensure_bucket,
    ensure_subscription,
    ensure_topic,
    free_port,
)
from synthetic import music, write_audio  # noqa: E402

DOCKER = os.environ.get("DOCKER", "/usr/bin/docker")
COMPOSE = os.environ.get("DOCKER_COMPOSE", "docker-compose")
STEMS = ("vocals", "drums", "bass", "guitar", "piano", "other")
PROJECT, BUCKET = "stem-local", "stem-local"
FIRST_WINDOW = '"event": "first_window"'


def docker(*args, timeout=300, check=False) -> subprocess.CompletedProcess:
    done = subprocess.run([DOCKER, *args], capture_output=True, text=True, timeout=timeout)
    if check and done.returncode:
        raise AssertionError(
            f"docker {' '.join(args[:3])}… exited {done.returncode}: {done.stderr[-800:]}"
        )
    return done


def env_args(env: dict) -> list:
    return [item for key, value in env.items() for item in ("-e", f"{key}={value}")]


def last_json(stdout: str) -> dict:
    lines = [line for line in stdout.splitlines() if line.strip()]
    assert lines, "nothing on stdout"
    return json.loads(lines[-1])


def expect(condition, message):
    if not condition:
        raise AssertionError(message)


class ImageTest:
    def __init__(self, image: str, work: Path):
        self.image = image
        self.work = work
        self.inputs = work / "in"
        self.inputs.mkdir(parents=True)
        write_audio(self.inputs / "track.flac", music(5.0, seed=1))
        write_audio(self.inputs / "long.flac", music(60.0, seed=2))
        (self.inputs / "bad.mp3").write_bytes(b"this is not audio " * 200)
        self.results = []
        self.first_window_s = None

    # -- running cases ------------------------------------------------------------------------
    def case(self, name, function, *args):
        start = time.monotonic()
        try:
            detail = function(*args) or ""
            ok = True
        except Exception as exc:  # a failed case reports and the others still run
            detail = f"{type(exc).__name__}: {exc}"
            if not isinstance(exc, AssertionError):
                detail += "\n" + traceback.format_exc(limit=3)
            ok = False
        seconds = time.monotonic() - start
        self.results.append((name, ok))
        print(
            f"{'PASS' if ok else 'FAIL'}  {name}  ({seconds:.1f} s)"
            + (f"  {detail}" if detail else ""),
            flush=True,
        )

    def outputs(self) -> Path:
        """A fresh output folder any uid may write (the container's user is not ours)."""
        folder = self.work / f"out-{uuid.uuid4().hex[:8]}"
        folder.mkdir()
        folder.chmod(0o777)
        return folder

    def run_job(
        self,
        options=(),
        env=None,
        command=(),
        source="track.flac",
        release="r1",
        track="t1",
        expect_code=0,
    ):
        """`docker run` of one track in local storage mode; returns (result, output folder)."""
        out = self.outputs()
        env = (
            env
            if env is not None
            else {
                "PROCESSING_MODE": "job",
                "ORIGINAL_STEM_URI": f"/in/{source}",
                "RELEASE_ID": release,
                "TRACK_ID": track,
            }
        )
        argv = [
            "run",
            "--rm",
            "-v",
            f"{self.inputs}:/in:ro",
            "-v",
            f"{out}:/outputs",
            "-e",
            "INPUT_DIR=/in",
            *env_args(env),
            *options,
            self.image,
            *command,
        ]
        done = docker(*argv)
        expect(
            done.returncode == expect_code,
            f"exit {done.returncode}, expected {expect_code}; stderr: {done.stderr[-1500:]}",
        )
        return last_json(done.stdout), out

    def check_stems(self, result, out, release="r1", track="t1"):
        expect(result["status"] == "completed", f"result: {result}")
        expect(sorted(result["stems"]) == sorted(STEMS), f"stems: {result['stems']}")
        folder = out / release / track
        for stem in STEMS:
            expect((folder / f"{stem}.mp3").stat().st_size > 1000, f"{stem}.mp3 missing or empty")
        manifest = json.loads((folder / "manifest.json").read_text())
        expect(manifest, "empty manifest")
        return f"6 stems + manifest, rtf {result.get('rtf')}"

    # -- the cases ----------------------------------------------------------------------------
    def env_vars_and_mounted_folder(self):
        """One track from env vars, timed from `docker run` to the first window in the model."""
        out = self.outputs()
        argv = [
            DOCKER,
            "run",
            "--rm",
            "-v",
            f"{self.inputs}:/in:ro",
            "-v",
            f"{out}:/outputs",
            *env_args(
                {
                    "PROCESSING_MODE": "job",
                    "ORIGINAL_STEM_URI": "/in/track.flac",
                    "RELEASE_ID": "r1",
                    "TRACK_ID": "t1",
                    "INPUT_DIR": "/in",
                    "LOG_FORMAT": "json",
                }
            ),
            self.image,
        ]
        start = time.monotonic()
        process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        stderr = []
        for line in process.stderr:
            stderr.append(line)
            if self.first_window_s is None and FIRST_WINDOW in line:
                self.first_window_s = time.monotonic() - start
        stdout = process.stdout.read()
        code = process.wait(timeout=300)
        expect(code == 0, f"exit {code}; stderr: {''.join(stderr)[-1500:]}")
        expect(self.first_window_s is not None, "no first_window event in the log")
        return (
            self.check_stems(last_json(stdout), out)
            + f"; start-to-first-window {self.first_window_s:.1f} s"
        )

    def job_message_base64(self):
        message = {
            "jobId": "job-b64",
            "releaseId": "r2",
            "trackId": "t2",
            "artistId": "a2",
            "originalStemUri": "/in/track.flac",
            "mimeType": "audio/flac",
        }
        encoded = base64.b64encode(json.dumps(message).encode()).decode()
        result, out = self.run_job(env={"PROCESSING_MODE": "job", "JOB_MESSAGE": encoded})
        expect(result["jobId"] == "job-b64", f"jobId: {result['jobId']}")
        return self.check_stems(result, out, "r2", "t2")

    def read_only_root(self):
        result, out = self.run_job(options=["--read-only", "--tmpfs", "/tmp"])
        return self.check_stems(result, out)

    def arbitrary_user(self):
        result, out = self.run_job(options=["--user", "4242:4242"])
        return self.check_stems(result, out)

    def no_network(self):
        result, out = self.run_job(options=["--network", "none"])
        return self.check_stems(result, out)

    def bad_input(self):
        result, out = self.run_job(source="bad.mp3", expect_code=65)
        expect(
            result["status"] == "failed" and result["error"]["retryable"] is False,
            f"result: {result}",
        )
        expect((self.inputs / "bad.mp3").exists(), "the bad input was lost")
        expect(not (out / "r1" / "t1" / "manifest.json").exists(), "a manifest for bad input")
        return f"exit 65, error {result['error']['code']}"

    def help_and_prefetch(self):
        user = docker("image", "inspect", "-f", "{{.Config.User}}", self.image, check=True)
        expect(user.stdout.strip() == "10001:10001", f"image user {user.stdout.strip()!r}")
        helped = docker("run", "--rm", self.image, "--help", check=True)
        expect("Usage:" in helped.stdout and "drain" in helped.stdout, helped.stdout[:300])
        fetched = docker(
            "run",
            "--rm",
            "--network",
            "none",
            "--read-only",
            self.image,
            "prefetch-model",
            check=True,
        )
        expect("ready" in fetched.stdout, fetched.stdout + fetched.stderr[-500:])
        return fetched.stdout.strip().splitlines()[-1]

    # -- Pub/Sub and GCS -------------------------------------------------------------------------
    def with_standins(self, cases):
        """Start the stand-ins on the host once for the cases that need them."""
        with (
            PubSubEmulator(self.work / "pubsub", PROJECT) as pubsub,
            GcsEmulator(self.work / "gcs", in_memory=True) as gcs,
        ):
            for name, function in cases:
                if not self.start_standins(pubsub, gcs, name):
                    continue
                self.case(name, function, pubsub, gcs)

    def start_standins(self, pubsub, gcs, name):
        try:
            if pubsub.process is None:
                pubsub.start()
                gcs.start()
            return True
        except Exception as exc:
            self.results.append((name, False))
            print(f"FAIL  {name}  the stand-ins did not start: {exc}", flush=True)
            return False

    def publish(self, pubsub, gcs, source: str, release: str, track: str):
        """Topic, subscription and bucket as production has them; the track uploaded; its
        message published. Returns (subscription path, results subscription path, env)."""
        suffix = uuid.uuid4().hex[:6]
        requests = ensure_topic(pubsub.publisher, PROJECT, f"stem-separate-{suffix}")
        results = ensure_topic(pubsub.publisher, PROJECT, f"stem-results-{suffix}")
        subscription = ensure_subscription(
            pubsub.subscriber, PROJECT, f"worker-{suffix}", requests, ack_deadline_s=60
        )
        tail = ensure_subscription(pubsub.subscriber, PROJECT, f"tail-{suffix}", results)
        bucket = ensure_bucket(gcs.client(PROJECT), BUCKET)
        name = f"uploads/{release}/{track}/{source}"
        bucket.blob(name).upload_from_filename(str(self.inputs / source))
        message = {
            "jobId": f"job-{track}",
            "releaseId": release,
            "trackId": track,
            "artistId": "a1",
            "originalStemUri": f"gs://{BUCKET}/{name}",
            "mimeType": "audio/flac",
        }
        pubsub.publisher.publish(requests, json.dumps(message).encode()).result(timeout=30)
        env = {
            **pubsub.env,
            **gcs.env,
            "PROCESSING_MODE": "pubsub",
            "STORAGE_MODE": "gcs",
            "GCS_BUCKET": BUCKET,
            "PUBSUB_SUBSCRIPTION": f"worker-{suffix}",
            "PUBSUB_RESULTS_TOPIC": f"stem-results-{suffix}",
            "IDLE_TIMEOUT_S": "20",
        }
        return subscription, tail, env

    @staticmethod
    def pull_one(pubsub, subscription, within_s=30.0):
        deadline = time.monotonic() + within_s
        while time.monotonic() < deadline:
            response = pubsub.subscriber.pull(subscription=subscription, max_messages=1, timeout=10)
            if response.received_messages:
                received = response.received_messages[0]
                pubsub.subscriber.acknowledge(subscription=subscription, ack_ids=[received.ack_id])
                return received.message
            time.sleep(0.5)
        return None

    def drain_in_container(self, pubsub, gcs):
        subscription, tail, env = self.publish(pubsub, gcs, "track.flac", "r3", "t3")
        done = docker(
            "run",
            "--rm",
            "--network",
            "host",
            *env_args(env),
            self.image,
            "drain",
            "--max-messages",
            "1",
        )
        expect(done.returncode == 0, f"exit {done.returncode}; stderr: {done.stderr[-1500:]}")
        names = {
            blob.name for blob in gcs.client(PROJECT).list_blobs(BUCKET, prefix="stems/r3/t3/")
        }
        expected = {f"stems/r3/t3/{stem}.mp3" for stem in STEMS} | {"stems/r3/t3/manifest.json"}
        expect(expected <= names, f"objects: {sorted(names)}")
        result = self.pull_one(pubsub, tail)
        expect(result is not None, "no result on the results topic")
        body = json.loads(result.data)
        expect(body["status"] == "completed" and result.attributes["status"] == "completed", body)
        expect(self.pull_one(pubsub, subscription, within_s=3) is None, "the message was not acked")
        return "6 stems + manifest in GCS, result published, message acked"

    def stop_during_separation(self, pubsub, gcs):
        subscription, _, env = self.publish(pubsub, gcs, "long.flac", "r4", "t4")
        name = f"stem-image-test-{uuid.uuid4().hex[:8]}"
        docker(
            "run",
            "-d",
            "--name",
            name,
            "--network",
            "host",
            *env_args(env),
            self.image,
            "drain",
            "--max-messages",
            "1",
            check=True,
        )
        try:
            logs = subprocess.Popen(
                [DOCKER, "logs", "-f", name],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                text=True,
            )
            seen = any(FIRST_WINDOW in line for line in logs.stderr)
            logs.kill()
            expect(seen, "the separation never started")
            start = time.monotonic()
            docker("stop", "-t", "10", name, check=True)
            stop_s = time.monotonic() - start
            code = int(docker("inspect", "-f", "{{.State.ExitCode}}", name, check=True).stdout)
            tail = docker("logs", name).stderr[-1500:]
        finally:
            docker("rm", "-f", name)
        expect(code == 75, f"exit {code}, expected 75; log: {tail}")
        expect(stop_s < 10, f"took {stop_s:.1f} s: the engine had to SIGKILL it")
        blobs = [b.name for b in gcs.client(PROJECT).list_blobs(BUCKET, prefix="stems/r4/t4/")]
        expect("stems/r4/t4/manifest.json" not in blobs, f"a manifest after SIGTERM: {blobs}")
        again = self.pull_one(pubsub, subscription, within_s=20)
        expect(
            again is not None and json.loads(again.data)["trackId"] == "t4",
            "the message was not nacked (no redelivery)",
        )
        return f"exit 75 in {stop_s:.1f} s, no manifest, message redelivered"

    # -- Compose ------------------------------------------------------------------------------
    def compose_serve(self):
        port = free_port()
        project = f"stemtest{uuid.uuid4().hex[:6]}"
        env = {**os.environ, "STEM_JOB_IMAGE": self.image, "STEM_JOB_PORT": str(port)}
        compose = [COMPOSE, "-p", project, "-f", str(REPO / "compose.yaml")]

        def run(*args, timeout=180):
            return subprocess.run(
                [*compose, *args], capture_output=True, text=True, env=env, timeout=timeout
            )

        try:
            up = run("up", "-d", "--no-build")
            expect(up.returncode == 0, f"up: {up.stderr[-1500:]}")
            url = f"http://127.0.0.1:{port}"
            deadline = time.monotonic() + 90
            while True:
                try:
                    with urllib.request.urlopen(url + "/health", timeout=2) as response:
                        health = json.loads(response.read())
                        break
                except OSError:
                    expect(
                        time.monotonic() < deadline,
                        "serve never answered /health: " + run("logs", "--no-color").stdout[-1500:],
                    )
                    time.sleep(1)
            response = post_file(f"{url}/separate/r5/t5", self.inputs / "track.flac")
            expect(
                response["status"] == "success" and sorted(response["stems"]) == sorted(STEMS),
                response,
            )
            listed = run("exec", "-T", "serve", "ls", "/outputs/r5/t5")
            expect(
                {f"{s}.mp3" for s in STEMS} <= set(listed.stdout.split()),
                f"in the volume: {listed.stdout} {listed.stderr[-300:]}",
            )
            return f"health {health.get('processing_mode', health)}; POST → 6 stems in the volume"
        finally:
            down = run("down", "-v", "--remove-orphans")
            if down.returncode:
                print(f"      compose down failed: {down.stderr[-500:]}", flush=True)


def post_file(url: str, path: Path) -> dict:
    """A multipart POST with the standard library (the image test needs no extra client)."""
    boundary = uuid.uuid4().hex
    body = (
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; '
            f'filename="{path.name}"\r\nContent-Type: audio/flac\r\n\r\n'
        ).encode()
        + path.read_bytes()
        + f"\r\n--{boundary}--\r\n".encode()
    )
    request = urllib.request.Request(
        url,
        data=body,
        method="POST",
        headers={"Content-Type": f"multipart/form-data; boundary={boundary}"},
    )
    try:
        with urllib.request.urlopen(request, timeout=180) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as exc:
        raise AssertionError(f"POST {url}: {exc.code} {exc.read()[:500]!r}") from None


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("image")
    parser.add_argument("--size-budget-mb", type=float, required=True)
    parser.add_argument("--compose", action="store_true", help="also test compose.yaml")
    args = parser.parse_args()
    size_mb = (
        int(docker("image", "inspect", "-f", "{{.Size}}", args.image, check=True).stdout) / 1e6
    )
    work = Path(tempfile.mkdtemp(prefix="stem-image-test."))
    work.chmod(0o755)
    try:
        test = ImageTest(args.image, work)
        print(
            f"image {args.image}: {size_mb:.0f} MB (budget {args.size_budget_mb:.0f} MB)",
            flush=True,
        )
        test.results.append(("size budget", size_mb <= args.size_budget_mb))
        if size_mb > args.size_budget_mb:
            print(
                f"FAIL  size: {size_mb:.0f} MB is over the budget of {args.size_budget_mb:.0f} MB",
                flush=True,
            )
        test.case("docker run, env vars + mounted folder", test.env_vars_and_mounted_folder)
        test.case("docker run, JOB_MESSAGE (base64)", test.job_message_base64)
        test.case("docker run --read-only --tmpfs /tmp", test.read_only_root)
        test.case("docker run --user 4242:4242", test.arbitrary_user)
        test.case("docker run --network none", test.no_network)
        test.case("bad input: exit 65, failed result", test.bad_input)
        test.case("--help and prefetch-model as the image user", test.help_and_prefetch)
        test.with_standins(
            [
                ("drain in a container (Pub/Sub + GCS stand-ins)", test.drain_in_container),
                ("docker stop -t 10 during a separation", test.stop_during_separation),
            ]
        )
        if args.compose:
            test.case("compose: up, POST a file, stems back, down", test.compose_serve)
        failed = [name for name, ok in test.results if not ok]
        window = f"{test.first_window_s:.1f} s" if test.first_window_s is not None else "n/a"
        print(
            f"image size {size_mb:.0f} MB; container start to first window {window}; "
            f"{len(test.results) - len(failed)}/{len(test.results)} passed",
            flush=True,
        )
        return len(failed)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
