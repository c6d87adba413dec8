"""cloudrun/: the job and dispatcher YAML, setup.sh, and the dispatcher service over real HTTP.

setup.sh runs for real, with a gcloud on PATH that records each call as bash expanded it (and
the files it names) and answers as an empty project: every call is checked against gcloud's
command tree, and the YAML it deploys goes through `gcloud run jobs replace` / `gcloud run
services replace` themselves, sent (by gcloud's proxy and endpoint-override properties) to a
local stand-in for the Cloud Run Admin API: gcloud parses it as for a deploy (unknown fields
refused) and the tests read what it would send. docs/deployment.md's commands, which only a
person runs, are checked as text against the same tree. The dispatcher runs under uvicorn
on a loopback port and talks to the real google-cloud-run client, pointed at a small local HTTP
server that records the run_job request and answers as the Cloud Run API would; refused messages
are published with the real Pub/Sub client to Google's emulator; dedupe markers are exercised
against the GCS emulator (the emulator ignores generation preconditions, so the conflict cases
run against a local endpoint answering 412 as GCS does, and against MemoryMarkers, which keeps
the same semantics).
"""

import base64
import functools
import importlib.util
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from urllib.parse import parse_qs

import pytest
import requests
import uvicorn
import yaml
from google.auth.credentials import AnonymousCredentials
from google.cloud import run_v2, storage

from job.config import ENV, load_settings
from job.dispatcher import DispatcherSettings, create_app, load_dispatcher_settings
from job.dispatcher.dedupe import GcsMarkers, MemoryMarkers, marker_key
from job.dispatcher.envelope import parse_envelope
from job.dispatcher.settings import ENV as DISPATCHER_ENV
from job.dispatcher.sweep import SweepClients

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "hack"))
from cloudrun_stand_in import JsonServer  # noqa: E402
from test_k8s_manifests import HEADROOM, TRACK_PEAK_BYTES, quantity, scratch_bytes  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
CLOUDRUN = REPO / "cloudrun"
# Fixtures pubsub_emulator, gcs_emulator and unique_name come from tests/stand_ins.py (conftest).
PROJECT = "stem-test"  # the Pub/Sub emulator's project (tests/stand_ins.py)
EXAMPLE = {"PROJECT_ID": "my-project", "REGION": "us-central1", "BUCKET_NAME": "my-stems"}
GOOD = {
    "jobId": "sep_rel_1_trk_1",
    "releaseId": "rel_1",
    "artistId": "art_1",
    "trackId": "trk_1",
    "originalStemUri": "gs://my-stems/originals/song.mp3",
    "mimeType": "audio/mpeg",
}


# -- gcloud's own view of the YAML and the commands ------------------------------------------------
@functools.cache
def gcloud_sdk() -> Path:
    gcloud = shutil.which("gcloud")
    assert gcloud, "gcloud (Google Cloud CLI) is needed: it also runs the Pub/Sub emulator"
    return Path(gcloud).resolve().parents[1]


class RunAdminStandIn:
    """Where `gcloud run ... replace` sends its requests in these tests: gcloud's documented
    proxy and endpoint-override properties route the Cloud Run Admin API (v1) here. GETs answer
    404 (nothing deployed yet), so gcloud creates the resource; creates echo their body and are
    recorded, so a test sees exactly what gcloud would send to Cloud Run."""

    def __init__(self):
        self.created = []
        self.http = JsonServer(self._answer)

    def _answer(self, method, url, body):
        if method == "GET":
            return 404, {"error": {"code": 404, "status": "NOT_FOUND", "message": "not found"}}
        self.created.append(json.loads(body))
        return 200, self.created[-1]

    def replace(self, kind: str, text: str, folder: Path) -> tuple:
        """Run `gcloud run {kind} replace` on `text`; (exit code, stderr, bodies it created)."""
        path = folder / f"{kind}.yaml"
        path.write_text(text)
        before = len(self.created)
        env = {
            **os.environ,
            "CLOUDSDK_CONFIG": str(folder / "gcloud"),
            "CLOUDSDK_CORE_PROJECT": "my-project",
            "CLOUDSDK_CORE_DISABLE_PROMPTS": "1",
            "CLOUDSDK_AUTH_DISABLE_CREDENTIALS": "true",
            "CLOUDSDK_CORE_CHECK_GCE_METADATA": "false",
            "CLOUDSDK_COMPONENT_MANAGER_DISABLE_UPDATE_CHECK": "true",
            "CLOUDSDK_API_ENDPOINT_OVERRIDES_RUN": "http://run.test/",
            "CLOUDSDK_PROXY_TYPE": "http",
            "CLOUDSDK_PROXY_ADDRESS": "127.0.0.1",
            "CLOUDSDK_PROXY_PORT": str(self.http.port),
        }
        out = subprocess.run(
            ["gcloud", "run", kind, "replace", str(path), "--region=us-central1", "--async"],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        return out.returncode, out.stderr, self.created[before:]


@pytest.fixture(scope="module")
def run_admin():
    stand_in = RunAdminStandIn()
    yield stand_in
    stand_in.http.close()


def gcloud_creates(run_admin, kind: str, text: str, folder: Path) -> dict:
    """The one object `gcloud run {kind} replace` sends for `text`; fails on gcloud's error."""
    code, stderr, created = run_admin.replace(kind, text, folder)
    assert code == 0, stderr
    [body] = created
    return body


def gcloud_refuses(run_admin, kind: str, text: str, folder: Path) -> str:
    """gcloud's error for `text`, after checking that nothing reached the API."""
    code, stderr, created = run_admin.replace(kind, text, folder)
    assert code != 0 and created == [], stderr
    return stderr


@functools.cache
def gcloud_tree() -> dict:
    path = gcloud_sdk() / "data" / "cli" / "gcloud_completions.py"
    spec = importlib.util.spec_from_file_location("gcloud_completions", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.STATIC_COMPLETION_CLI_TREE


def gcloud_invocations(text: str) -> list:
    """Every `gcloud ...` command in shell text, as token lists (continuations joined, each
    command cut at the next shell operator)."""
    text = re.sub(r"\\\n", " ", text)
    found = []
    for line in text.splitlines():
        line = line.split(" #", 1)[0] if not line.lstrip().startswith("#") else ""
        lexer = shlex.shlex(line, posix=True, punctuation_chars="();<>|&")
        lexer.whitespace_split = True
        try:
            tokens = list(lexer)
        except ValueError:
            continue
        for i, token in enumerate(tokens):
            if token == "gcloud":
                command = []
                for word in tokens[i + 1 :]:
                    if word and set(word) <= set("();<>|&"):
                        break
                    command.append(word)
                found.append(command)
    return found


def check_gcloud_command(tokens: list) -> list:
    """Problems with one command: unknown groups/commands or flags."""
    tree, node, path = gcloud_tree(), gcloud_tree(), []
    rest = list(tokens)
    while rest and rest[0] in node.get("commands", {}):
        node = node["commands"][rest.pop(0)]
        path.append(node)
    if node.get("commands"):
        return [f"gcloud {' '.join(tokens[:3])}...: not a command"]
    problems = []
    for word in rest:
        if not word.startswith("--"):
            continue
        flag = word.split("=", 1)[0]
        known = set(node["flags"]) | set(tree["flags"])
        if flag not in known and flag.replace("--no-", "--", 1) not in known:
            problems.append(
                f"gcloud {' '.join(t for t in tokens if not t.startswith('-'))[:60]}"
                f": unknown flag {flag}"
            )
    return problems


# -- setup.sh, run against a gcloud that records ------------------------------------------------
FAKE_GCLOUD = """#!{python}
# What setup.sh calls as gcloud in these tests: records each call (its argv, and a copy of every
# file it names) and answers as a project where nothing exists yet (or, with FAKE_GCLOUD_EXISTS,
# where everything does).
import json, os, shutil, sys
from pathlib import Path

argv, keep = sys.argv[1:], Path(os.environ["FAKE_GCLOUD_FILES"])
files = {{}}
for word in argv:
    path = word.split("=", 1)[-1]
    if os.path.isfile(path):
        files[path] = str(keep / f"{{len(list(keep.iterdir()))}}-{{Path(path).name}}")
        shutil.copy(path, files[path])
with open(os.environ["FAKE_GCLOUD_LOG"], "a") as log:
    log.write(json.dumps({{"argv": argv, "files": files}}) + "\\n")
fmt = next((w.split("=", 1)[1] for w in argv if w.startswith("--format=")), None)
answers = {{
    "value(projectNumber)": "123456789012",
    "value(status.url)": "https://stem-dispatcher-abc123-uc.a.run.app",
    "value(transport.pubsub.subscription)": "projects/my-project/subscriptions/eventarc-sub",
}}
if "describe" in argv:
    if fmt:
        print(answers[fmt])
    sys.exit(0 if fmt or os.environ.get("FAKE_GCLOUD_EXISTS") else 1)
"""


@functools.cache
def setup_sh(trigger: str = "push", exists: bool = False) -> tuple:
    """The gcloud calls `cloudrun/setup.sh` makes for the EXAMPLE values, as bash expands them:
    ({"argv": [...], "files": {path named: its text at the call}}, ...)."""
    folder = Path(tempfile.mkdtemp(prefix="stem-setup-sh."))
    try:
        (folder / "bin").mkdir()
        (folder / "files").mkdir()
        gcloud = folder / "bin" / "gcloud"
        gcloud.write_text(FAKE_GCLOUD.format(python=sys.executable))
        gcloud.chmod(0o755)
        env = {
            "PATH": f"{folder / 'bin'}:/usr/bin:/bin",
            "HOME": str(folder),
            "TMPDIR": str(folder),
            "FAKE_GCLOUD_LOG": str(folder / "calls.jsonl"),
            "FAKE_GCLOUD_FILES": str(folder / "files"),
            "TRIGGER": trigger,
            **EXAMPLE,
            **({"FAKE_GCLOUD_EXISTS": "1"} if exists else {}),
        }
        done = subprocess.run(
            ["bash", str(CLOUDRUN / "setup.sh")],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert done.returncode == 0, done.stderr[-2000:]
        found = [json.loads(line) for line in (folder / "calls.jsonl").read_text().splitlines()]
        for call in found:
            call["files"] = {k: Path(v).read_text() for k, v in call["files"].items()}
        return tuple(found)
    finally:
        shutil.rmtree(folder)


def calls(trigger="push", *prefix, exists=False) -> list:
    """setup.sh's gcloud calls whose argv starts with `prefix`."""
    n = len(prefix)
    return [c for c in setup_sh(trigger, exists) if c["argv"][:n] == list(prefix)]


def deployed(kind: str, trigger: str = "push") -> str:
    """The YAML setup.sh hands to `gcloud run {kind} replace` (placeholders filled in)."""
    [call] = calls(trigger, "run", kind, "replace")
    [text] = call["files"].values()
    return text


def flag(call: dict, name: str) -> str:
    [value] = [w.split("=", 1)[1] for w in call["argv"] if w.startswith(f"--{name}=")]
    return value


def env_of(container: dict) -> dict:
    return {item["name"]: item["value"] for item in container.get("env", [])}


# -- job.yaml, dispatcher.yaml, setup.sh -----------------------------------------------------------
def test_job_yaml_is_a_gpu_cloud_run_job_gcloud_accepts(run_admin, tmp_path):
    """The job as setup.sh deploys it, through the real `gcloud run jobs replace`."""
    text = deployed("jobs")
    job = gcloud_creates(run_admin, "jobs", text, tmp_path)
    bogus = yaml.safe_load(text)
    bogus["spec"]["template"]["spec"]["bogus"] = 1
    assert "Job.spec.template.spec.bogus" in gcloud_refuses(
        run_admin, "jobs", yaml.safe_dump(bogus), tmp_path
    )
    assert job["apiVersion"] == "run.googleapis.com/v1" and job["kind"] == "Job"
    assert job["metadata"]["name"] == "stem-job"
    assert job["metadata"]["labels"]["cloud.googleapis.com/location"] == EXAMPLE["REGION"]
    execution = job["spec"]["template"]["spec"]
    assert execution["taskCount"] == 1
    task = execution["template"]["spec"]
    assert task["nodeSelector"] == {"run.googleapis.com/accelerator": "nvidia-l4"}
    # int64: a string
    assert 0 < int(task["timeoutSeconds"]) <= 3600, "GPU tasks run at most 1 hour"
    assert 0 <= task["maxRetries"] <= 10
    assert task["serviceAccountName"] == "stem-job@my-project.iam.gserviceaccount.com"
    [container] = task["containers"]
    assert container["args"] == ["run"] and "command" not in container
    limits = container["resources"]["limits"]
    assert limits["nvidia.com/gpu"] == "1"
    assert float(limits["cpu"]) >= 4
    assert int(re.match(r"(\d+)Gi$", limits["memory"]).group(1)) >= 16
    # the image setup.sh expects to be pushed (docs/deployment.md, "Build and push the images")
    assert container["image"] == "us-central1-docker.pkg.dev/my-project/stem/stem-job:gpu"
    env = env_of(container)
    assert set(env) <= set(ENV)
    settings = load_settings(env)
    assert (settings.processing_mode, settings.storage_mode, settings.device) == (
        "job",
        "gcs",
        "cuda",
    )
    assert settings.gcp_project_id == "my-project" and settings.gcs_bucket == "my-stems"
    # the job knows its retry budget: its last attempt reports a retryable failure
    assert settings.max_retries == task["maxRetries"], "MAX_RETRIES must equal maxRetries"


def test_the_cloud_run_job_holds_a_tracks_peak_and_its_scratch_in_memory():
    """Cloud Run's filesystem is in memory: the job's limit holds a track's measured peak RSS
    (the pods' figure, tests/test_k8s_manifests.py) and the scratch files of the longest track
    its settings admit."""
    task = yaml.safe_load(deployed("jobs"))["spec"]["template"]["spec"]["template"]["spec"]
    [main] = task["containers"]
    settings = load_settings(env_of(main))
    memory = quantity(main["resources"]["limits"]["memory"])
    assert memory >= HEADROOM * TRACK_PEAK_BYTES + scratch_bytes(settings)


def test_dispatcher_yaml_targets_the_job(run_admin, tmp_path):
    """The dispatcher as setup.sh deploys it: it starts the job setup.sh deploys, in its region
    (setup.sh's substitution left CLOUD_RUN_REGION, an env name, alone)."""
    text = deployed("services")
    service = gcloud_creates(run_admin, "services", text, tmp_path)
    wrong = yaml.safe_load(text)
    wrong["spec"]["template"]["spec"]["containerConcurrency"] = "many"
    assert "containerConcurrency" in gcloud_refuses(
        run_admin, "services", yaml.safe_dump(wrong), tmp_path
    )
    job = yaml.safe_load(deployed("jobs"))
    assert service["metadata"]["annotations"]["run.googleapis.com/ingress"] == "internal"
    spec = service["spec"]["template"]["spec"]
    [container] = spec["containers"]
    assert container["args"] == ["dispatch"]
    assert container["image"] == "us-central1-docker.pkg.dev/my-project/stem/stem-job:cpu"
    env = env_of(container)
    assert set(env) <= set(ENV) | set(DISPATCHER_ENV)
    settings = load_dispatcher_settings(env)
    assert settings.job_name == (
        f"projects/my-project/locations/"
        f"{job['metadata']['labels']['cloud.googleapis.com/location']}"
        f"/jobs/{job['metadata']['name']}"
    )
    assert settings.marker_bucket == "my-stems" and settings.marker_prefix == "dispatch/"
    assert settings.stems_bucket == "my-stems", "the sweep reads manifests in the stems bucket"
    # The request timeout covers the dispatcher's Cloud Run API budget.
    assert spec["timeoutSeconds"] > settings.api_deadline_s
    # ... and so does the ack deadline of whatever pushes to it (push or Eventarc).
    for trigger in ("push", "eventarc"):
        [subscription] = [
            c for c in setup_sh(trigger) if any(w.startswith("--ack-deadline=") for w in c["argv"])
        ]
        assert int(flag(subscription, "ack-deadline")) > settings.api_deadline_s


@pytest.mark.parametrize("trigger", ["push", "eventarc"])
def test_setup_sh_calls_only_real_gcloud_commands(trigger):
    """Every gcloud call setup.sh makes, as bash expanded it, is a command of gcloud's own
    command tree with flags it knows."""
    commands = [c["argv"] for c in setup_sh(trigger)]
    problems = [p for command in commands for p in check_gcloud_command(command)]
    assert not problems, "\n".join(problems)
    verbs = {" ".join(c[:3]) for c in commands}
    for needed in (
        "pubsub topics create",
        "run jobs replace",
        "run services replace",
        "run jobs add-iam-policy-binding",
        "run services add-iam-policy-binding",
        "scheduler jobs create",
    ):
        assert needed in verbs, needed
    trigger_command = (
        "pubsub subscriptions create" if trigger == "push" else "eventarc triggers create"
    )
    assert trigger_command in verbs


@pytest.mark.parametrize("trigger", ["push", "eventarc"])
def test_setup_sh_gives_the_trigger_retries_and_a_dead_letter_topic_it_creates(trigger):
    """The subscription feeding the dispatcher backs off, dead-letters after 5 deliveries to a
    topic setup.sh creates, which a subscription holds; Pub/Sub's agent may publish there."""
    [subscription] = [
        c for c in setup_sh(trigger) if any(w.startswith("--dead-letter-topic=") for w in c["argv"])
    ]
    dead = flag(subscription, "dead-letter-topic")
    assert flag(subscription, "max-delivery-attempts") == "5"
    assert (flag(subscription, "min-retry-delay"), flag(subscription, "max-retry-delay")) == (
        "10s",
        "600s",
    )
    if trigger == "push":
        assert flag(subscription, "push-endpoint").endswith("/pubsub")
        assert flag(subscription, "push-auth-service-account").startswith("stem-push@")
    created = {c["argv"][3] for c in calls(trigger, "pubsub", "topics", "create")}
    assert {"stem-separate", "stem-results", dead} <= created
    holds = [
        c
        for c in calls(trigger, "pubsub", "subscriptions", "create")
        if f"--topic={dead}" in c["argv"]
    ]
    assert holds, "no subscription holds the dead letters (they would be dropped)"
    [grant] = [
        c
        for c in calls(trigger, "pubsub", "topics", "add-iam-policy-binding")
        if c["argv"][3] == dead
    ]
    assert "--role=roles/pubsub.publisher" in grant["argv"]
    assert flag(grant, "member").endswith("@gcp-sa-pubsub.iam.gserviceaccount.com")


def test_setup_sh_creates_nothing_that_exists():
    """Re-running setup.sh is safe: where everything exists it creates nothing, it replaces the
    job and the dispatcher and (re)grants roles."""
    created = [c["argv"] for c in setup_sh("push", exists=True) if "create" in c["argv"][:4]]
    assert created == []
    assert calls("push", "run", "jobs", "replace", exists=True)


def test_setup_sh_bucket_roles_are_limited_to_their_prefix():
    """The bucket roles setup.sh grants, with the condition files it passes: the job and the
    dispatcher (whose sweep checks a set against its original's generation) read the originals
    (INPUT_BUCKET, by default the stems bucket); every other role is limited to objects
    under its prefix and listings of it. The new bucket's lifecycle rule deletes dispatcher
    markers only."""
    conditions, plain = {}, set()
    for call in calls("push", "storage", "buckets", "add-iam-policy-binding"):
        assert call["argv"][3] == "gs://my-stems"
        key = flag(call, "member"), flag(call, "role")
        named = [w.split("=", 1)[1] for w in call["argv"] if w.startswith("--condition-from-file=")]
        if not named:
            plain.add(key)
            continue
        conditions[key] = json.loads(call["files"][named[0]])
    job, dispatcher = (
        f"serviceAccount:stem-{n}@my-project.iam.gserviceaccount.com" for n in ("job", "dispatcher")
    )
    expected = {
        (job, "roles/storage.objectUser"): "stems/",
        (dispatcher, "roles/storage.objectUser"): "dispatch/",
        (dispatcher, "roles/storage.objectViewer"): "stems/",
    }
    assert set(conditions) == set(expected)
    originals = {(job, "roles/storage.objectViewer"), (dispatcher, "roles/storage.objectViewer")}
    assert plain == originals, "only the originals, unconditionally"
    for key, prefix in expected.items():
        assert conditions[key]["expression"] == (
            f'resource.name.startsWith("projects/_/buckets/my-stems/objects/{prefix}") || '
            'api.getAttribute("storage.googleapis.com/objectListPrefix", "")'
            f'.startsWith("{prefix}")'
        )
    [create] = calls("push", "storage", "buckets", "create")
    assert "--uniform-bucket-level-access" in create["argv"]
    rules = json.loads(create["files"][flag(create, "lifecycle-file")])
    assert rules == {
        "rule": [
            {"action": {"type": "Delete"}, "condition": {"age": 8, "matchesPrefix": ["dispatch/"]}}
        ]
    }


def docs_commands() -> list:
    docs = (REPO / "docs" / "deployment.md").read_text()
    return gcloud_invocations("\n".join(re.findall(r"```bash\n(.*?)```", docs, re.S)))


def test_docs_gcloud_commands_exist():
    """docs/deployment.md's commands are for a person to run, so only their text can be read
    here: each is a command of gcloud's own tree, with flags it knows."""
    commands = docs_commands()
    assert len(commands) > 20
    problems = [p for command in commands for p in check_gcloud_command(command)]
    assert not problems, "\n".join(problems)


def test_docs_work_subscription_matches_the_lease_and_setup_sh():
    """The GKE path's subscription in the docs: its ack deadline is the lease the job keeps
    extending (job/drain.py; the docs' "a SIGKILLed job's messages come back after 60 s"), and
    it dead-letters to a topic the docs create, the one setup.sh creates for Cloud Run."""
    from job.drain import LEASE_S

    commands = docs_commands()
    [work] = [
        c
        for c in commands
        if c[:4] == ["pubsub", "subscriptions", "create", "stem-separate-worker"]
    ]
    options = dict(w[2:].split("=", 1) for w in work if w.startswith("--") and "=" in w)
    assert int(options["ack-deadline"]) == LEASE_S
    created = {c[3] for c in commands if c[:3] == ["pubsub", "topics", "create"]}
    [setup_dead] = {
        flag(c, "dead-letter-topic")
        for c in setup_sh("push")
        if any(w.startswith("--dead-letter-topic=") for w in c["argv"])
    }
    assert options["dead-letter-topic"] in created and options["dead-letter-topic"] == setup_dead


EXECUTION_TYPE = "type.googleapis.com/google.cloud.run.v2.Execution"


# -- a stand-in for the Cloud Run Admin API --------------------------------------------------------
class FakeCloudRunApi:
    """Records requests; answers each with the next scripted (status, body), then 200s that
    return the long-running operation run_job returns."""

    def __init__(self):
        self.requests, self.script = [], []
        self.http = JsonServer(self._answer)

    max_retries = 1  # the job's maxRetries, as jobs.get answers it

    def _answer(self, method, url, body):
        if method == "GET":  # jobs.get and executions.list: read, not recorded
            if url.path.endswith("/executions"):
                return 200, {"executions": []}
            return 200, {"template": {"template": {"maxRetries": self.max_retries}}}
        self.requests.append({"path": url.path, "body": json.loads(body or b"{}")})
        if self.script:
            return self.script.pop(0)
        n = len(self.requests)
        job = url.path.split("/v2/")[1].split(":")[0]
        return 200, {
            "name": f"{job.rsplit('/jobs/', 1)[0]}/operations/op-{n}",
            "metadata": {"@type": EXECUTION_TYPE, "name": f"{job}/executions/stem-job-{n:05d}"},
        }

    def fail(self, status: int, code: str, times: int = 1):
        for _ in range(times):
            self.script.append(
                (
                    status,
                    {"error": {"code": status, "status": code, "message": f"{code} (scripted)"}},
                )
            )

    def client(self, kind=run_v2.JobsClient):
        return kind(
            transport="rest",
            credentials=AnonymousCredentials(),
            client_options={"api_endpoint": self.http.url},
        )

    def admin(self) -> SweepClients:
        return SweepClients(self.client(run_v2.ExecutionsClient), self.client(run_v2.TasksClient))


class Uvicorn:
    """An ASGI app served on a free loopback port from a thread."""

    def __init__(self, app):
        self.server = uvicorn.Server(
            uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", lifespan="off")
        )
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 10
        while not (self.server.started and self.server.servers):
            assert time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.02)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"

    def close(self):
        self.server.should_exit = True
        self.thread.join(timeout=10)


@pytest.fixture
def cloud_run():
    api = FakeCloudRunApi()
    yield api
    api.http.close()


@pytest.fixture
def results(pubsub_emulator, unique_name):
    """A results topic in the emulator with a subscription to read what was published."""
    publisher, subscriber = pubsub_emulator.publisher, pubsub_emulator.subscriber
    topic = publisher.create_topic(name=publisher.topic_path(PROJECT, unique_name("results"))).name
    sub = subscriber.create_subscription(
        name=subscriber.subscription_path(PROJECT, unique_name("read")), topic=topic
    ).name

    def read(expected: int = 1, timeout_s: float = 10.0) -> list:
        messages, deadline = [], time.monotonic() + timeout_s
        while len(messages) < expected and time.monotonic() < deadline:
            reply = subscriber.pull(subscription=sub, max_messages=10, timeout=5)
            if reply.received_messages:
                subscriber.acknowledge(
                    subscription=sub, ack_ids=[m.ack_id for m in reply.received_messages]
                )
            messages += [m.message for m in reply.received_messages]
        return messages

    read.topic = topic.rsplit("/", 1)[1]
    return read


def settings_for(results_topic: str, **overrides) -> DispatcherSettings:
    values = {
        "project": PROJECT,
        "region": "europe-west4",
        "job": "stem-job",
        "results_topic": results_topic,
        "api_attempts": 4,
        "api_deadline_s": 10,
    }
    values.update(overrides)
    return DispatcherSettings(**values)


@pytest.fixture
def dispatcher(cloud_run, results, pubsub_emulator):
    """dispatcher(markers=None, **settings) -> the running service's base URL."""
    servers = []

    def start(markers=None, **overrides):
        app = create_app(
            settings_for(**{"results_topic": results.topic, **overrides}),
            jobs_client=cloud_run.client(),
            publisher_client=pubsub_emulator.publisher,
            markers=markers if markers is not None else MemoryMarkers(),
            sweep_clients=cloud_run.admin(),
        )
        servers.append(Uvicorn(app))
        return servers[-1].url

    yield start
    for server in servers:
        server.close()


# -- envelopes ------------------------------------------------------------------------------------
def b64(payload) -> str:
    raw = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    return base64.b64encode(raw).decode()


def push_body(payload, message_id="1001", **message):
    return {
        "message": {
            "data": b64(payload),
            "messageId": message_id,
            "message_id": message_id,
            "attributes": {"origin": "backend"},
            "publishTime": "2026-01-01T00:00:00Z",
            **message,
        },
        "subscription": f"projects/{PROJECT}/subscriptions/stem-separate-dispatch",
        "deliveryAttempt": 1,
    }


def post_push(url, payload, message_id="1001"):
    return requests.post(url + "/pubsub", json=push_body(payload, message_id), timeout=30)


def post_eventarc_binary(url, payload, message_id="2002"):
    body = push_body(payload, message_id)
    del body["deliveryAttempt"]
    headers = {
        "ce-id": message_id,
        "ce-specversion": "1.0",
        "ce-type": "google.cloud.pubsub.topic.v1.messagePublished",
        "ce-source": f"//pubsub.googleapis.com/projects/{PROJECT}/topics/stem-separate",
        "ce-time": "2026-01-01T00:00:00Z",
        "content-type": "application/json",
    }
    return requests.post(url + "/", data=json.dumps(body), headers=headers, timeout=30)


def post_eventarc_structured(url, payload, message_id="3003"):
    body = push_body(payload, message_id)
    del body["deliveryAttempt"]
    event = {
        "specversion": "1.0",
        "id": message_id,
        "type": "google.cloud.pubsub.topic.v1.messagePublished",
        "source": f"//pubsub.googleapis.com/projects/{PROJECT}/topics/stem-separate",
        "datacontenttype": "application/json",
        "data": body,
    }
    return requests.post(
        url + "/",
        data=json.dumps(event),
        timeout=30,
        headers={"content-type": "application/cloudevents+json; charset=utf-8"},
    )


def run_request_env(request) -> dict:
    [override] = request["body"]["overrides"]["containerOverrides"]
    return {item["name"]: item["value"] for item in override["env"]}


JOB_PATH = f"/v2/projects/{PROJECT}/locations/europe-west4/jobs/stem-job:run"


# -- the dispatcher ------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "post",
    [post_push, post_eventarc_binary, post_eventarc_structured],
    ids=["pubsub-push", "eventarc-binary", "eventarc-structured"],
)
def test_a_good_message_starts_one_execution(dispatcher, cloud_run, results, post):
    url = dispatcher()
    reply = post(url, GOOD, message_id="4711")
    assert reply.status_code == 200, reply.text
    assert reply.json()["status"] == "started"
    assert reply.json()["execution"].endswith("/jobs/stem-job/executions/stem-job-00001")
    [request] = cloud_run.requests
    assert request["path"] == JOB_PATH
    env = run_request_env(request)
    # the message, the job's maxRetries as jobs.get says, the marker key a lookup matches
    assert env == {
        "JOB_MESSAGE": env["JOB_MESSAGE"],
        "MAX_RETRIES": "1",
        "DISPATCH_MESSAGE_KEY": "4711",
    }
    assert json.loads(env["JOB_MESSAGE"]) == GOOD
    # The job reads JOB_MESSAGE with the same parser.
    from job.messages import parse_message

    assert parse_message(env["JOB_MESSAGE"]).job_id == GOOD["jobId"]


def test_the_job_id_defaults_like_the_job_does(dispatcher, cloud_run):
    url = dispatcher()
    message = {k: v for k, v in GOOD.items() if k not in ("jobId", "artistId", "mimeType")}
    assert post_push(url, message).status_code == 200
    sent = json.loads(run_request_env(cloud_run.requests[0])["JOB_MESSAGE"])
    assert sent == {**message, "jobId": "sep_rel_1_trk_1"}


def test_a_redelivered_message_starts_nothing_more(dispatcher, cloud_run):
    url = dispatcher()
    first = post_push(url, GOOD, message_id="555")
    second = post_push(url, GOOD, message_id="555")
    # Eventarc carries the same Pub/Sub messageId as ce-id.
    third = post_eventarc_binary(url, GOOD, message_id="555")
    assert first.json()["status"] == "started"
    for reply in (second, third):
        assert reply.status_code == 200
        assert reply.json()["status"] == "duplicate"
        assert reply.json()["execution"] == first.json()["execution"]
    assert len(cloud_run.requests) == 1
    # A different message for the same track is a new request (the job's manifest dedupes it).
    assert post_push(url, GOOD, message_id="556").json()["status"] == "started"
    assert len(cloud_run.requests) == 2


def test_a_delivery_in_flight_is_retried_later_and_a_stale_claim_is_taken_over(
    dispatcher, cloud_run
):
    markers = MemoryMarkers()
    url = dispatcher(markers=markers, claim_ttl_s=60)
    markers.create("777", {"state": "claimed", "claimedAt": time.time()})
    reply = post_push(url, GOOD, message_id="777")
    assert reply.status_code == 409 and reply.json()["status"] == "in_progress"
    assert cloud_run.requests == []
    doc, generation = markers.read("777")
    markers.replace("777", {**doc, "claimedAt": time.time() - 600}, generation)  # crashed owner
    reply = post_push(url, GOOD, message_id="777")
    assert reply.status_code == 200 and reply.json()["status"] == "started"
    assert markers.read("777")[0]["state"] == "started"


@pytest.mark.parametrize(
    "payload, code, job_id",
    [
        ({**GOOD, "releaseId": "../etc"}, "invalid_id", "sep_rel_1_trk_1"),
        ({"jobId": "j1", "trackId": "t1"}, "invalid_message", "j1"),
        ({**GOOD, "mimeType": "application/pdf"}, "unsupported_media_type", "sep_rel_1_trk_1"),
        (b"\xff\x00not json", "invalid_message", None),
    ],
    ids=["bad-id", "missing-fields", "not-audio", "not-json"],
)
def test_a_bad_message_is_reported_failed_and_not_retried(
    dispatcher, cloud_run, results, payload, code, job_id
):
    url = dispatcher()
    reply = post_push(url, payload, message_id="888")
    assert reply.status_code == 200, "a 2xx so Pub/Sub does not redeliver it"
    assert reply.json()["status"] == "rejected" and reply.json()["error"]["code"] == code
    assert cloud_run.requests == [], "no execution for a bad message"
    [message] = results(1)
    result = json.loads(message.data)
    assert result["status"] == "failed" and result["stems"] == {}
    assert result["error"]["code"] == code and result["error"]["retryable"] is False
    assert result["jobId"] == job_id
    assert message.attributes["status"] == "failed"
    assert message.attributes.get("jobId") == job_id


def test_unreadable_requests_are_refused(dispatcher, cloud_run):
    url = dispatcher()
    assert requests.post(url + "/", data=b"not json", timeout=10).status_code == 400
    assert requests.post(url + "/", json={"subscription": "x"}, timeout=10).status_code == 400
    body = push_body(GOOD)
    body["message"]["data"] = "%%% not base64 %%%"
    assert requests.post(url + "/", json=body, timeout=10).status_code == 400
    wrong_type = requests.post(
        url + "/",
        json=push_body(GOOD),
        timeout=10,
        headers={"ce-id": "1", "ce-type": "google.cloud.storage.object.v1.finalized"},
    )
    assert wrong_type.status_code == 400
    assert cloud_run.requests == []
    assert (
        requests.get(url + "/health", timeout=10).json()["job"]
        == f"projects/{PROJECT}/locations/europe-west4/jobs/stem-job"
    )


def test_quota_and_transient_errors_are_retried(dispatcher, cloud_run):
    url = dispatcher()
    cloud_run.fail(429, "RESOURCE_EXHAUSTED")
    cloud_run.fail(503, "UNAVAILABLE")
    reply = post_push(url, GOOD)
    assert reply.status_code == 200 and reply.json()["status"] == "started"
    assert len(cloud_run.requests) == 3
    assert {r["path"] for r in cloud_run.requests} == {JOB_PATH}


def test_persistent_quota_errors_ask_pubsub_to_retry_and_release_the_claim(dispatcher, cloud_run):
    url = dispatcher(api_attempts=3)
    cloud_run.fail(429, "RESOURCE_EXHAUSTED", times=3)
    reply = post_push(url, GOOD, message_id="999")
    assert reply.status_code == 503 and reply.json()["status"] == "retry"
    assert len(cloud_run.requests) == 3, "bounded: api_attempts tries"
    # Pub/Sub redelivers later; the claim was released, so this delivery starts the job.
    reply = post_push(url, GOOD, message_id="999")
    assert reply.status_code == 200 and reply.json()["status"] == "started"


def test_a_missing_job_is_not_retried_in_the_dispatcher(dispatcher, cloud_run):
    url = dispatcher()
    cloud_run.fail(404, "NOT_FOUND")
    reply = post_push(url, GOOD)
    assert reply.status_code == 500
    assert len(cloud_run.requests) == 1


def test_results_topic_unavailable_asks_for_a_retry(dispatcher, cloud_run):
    url = dispatcher(results_topic="no-such-topic")
    reply = post_push(url, {**GOOD, "trackId": "bad track"})
    assert reply.status_code == 503, "the failure report must not be lost"


# -- settings -------------------------------------------------------------------------------------
def test_dispatcher_settings_from_env():
    env = {
        "GCP_PROJECT_ID": "p1",
        "CLOUD_RUN_REGION": "us-central1",
        "GCS_BUCKET": "stems-b",
        "CLOUD_RUN_JOB": "some-execution-of-another-job",
    }  # Cloud Run sets it in jobs
    settings = load_dispatcher_settings(env)
    assert settings.job_name == "projects/p1/locations/us-central1/jobs/stem-job"
    assert settings.marker_bucket == "stems-b" and settings.results_topic == "stem-results"
    assert load_dispatcher_settings({**env, "DISPATCH_JOB_NAME": "stems-l4"}).job == "stems-l4"
    assert load_dispatcher_settings({**env, "DISPATCH_MARKER_PREFIX": "/d"}).marker_prefix == "d/"
    # HTTP_HOST and PORT are job.config's: one default, and a flag is validated like the env.
    assert (settings.host, settings.port) == (
        load_settings(env).http_host,
        load_settings(env).http_port,
    )
    assert load_dispatcher_settings({**env, "PORT": "8080"}).port == 8080
    assert load_dispatcher_settings(env, http_port="9090").port == 9090
    from job.errors import ConfigError

    for variable, bad in (
        ("GCP_PROJECT_ID", {"CLOUD_RUN_REGION": "us-central1"}),
        ("CLOUD_RUN_REGION", {"GCP_PROJECT_ID": "p1"}),
        ("DISPATCH_JOB_NAME", {**env, "DISPATCH_JOB_NAME": "Bad_Name"}),
        ("DISPATCH_API_ATTEMPTS", {**env, "DISPATCH_API_ATTEMPTS": "0"}),
        ("DISPATCH_CLAIM_TTL_S", {**env, "DISPATCH_CLAIM_TTL_S": "soon"}),
        ("PORT", {**env, "PORT": "0"}),
        ("DISPATCH_MARKER_BUCKET", {**env, "DISPATCH_MARKER_BUCKET": "Not A Bucket"}),
        (
            "DISPATCH_CLAIM_TTL_S",
            {**env, "DISPATCH_CLAIM_TTL_S": "40", "DISPATCH_API_DEADLINE_S": "30"},
        ),
    ):
        with pytest.raises(ConfigError, match=variable):
            load_dispatcher_settings(bad)
    with pytest.raises(ConfigError, match="PORT"):
        load_dispatcher_settings(env, http_port="0")


def test_envelope_parsing_keeps_the_message_id_and_attempt():
    delivery = parse_envelope(
        {"content-type": "application/json"}, json.dumps(push_body(GOOD, "42")).encode()
    )
    assert (delivery.message_id, delivery.delivery_attempt, delivery.transport) == (
        "42",
        1,
        "pubsub-push",
    )
    assert json.loads(delivery.data) == GOOD and delivery.attributes == {"origin": "backend"}
    assert marker_key("42") == "42"
    assert re.fullmatch(r"h-[0-9a-f]{64}", marker_key("a/b"))


def test_every_job_package_is_shipped(tmp_path):
    """The wheel the images install holds every module of the package, subpackages included
    (job.dispatcher), built by the real build backend."""
    import zipfile

    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(tmp_path),
            str(REPO),
        ],
        check=True,
        capture_output=True,
        timeout=120,
    )
    (wheel,) = tmp_path.glob("stem_job-*.whl")
    shipped = {name for name in zipfile.ZipFile(wheel).namelist() if name.endswith(".py")}
    sources = {str(path.relative_to(REPO)) for path in (REPO / "job").rglob("*.py")}
    assert "job/dispatcher/app.py" in sources and shipped == sources


# -- GCS markers ----------------------------------------------------------------------------------
def test_gcs_markers_round_trip_on_the_emulator(gcs_emulator, unique_name):
    client = gcs_emulator.client(PROJECT)
    bucket = client.create_bucket(unique_name("markers")).name
    markers = GcsMarkers(bucket, "dispatch/", client=client)
    first = markers.create("123", {"state": "claimed", "claimedAt": 1.0})
    assert first
    assert markers.read("123") == ({"state": "claimed", "claimedAt": 1.0}, first)
    second = markers.replace("123", {"state": "started", "execution": "e1"}, first)
    assert second and second != first
    assert markers.read("123")[0] == {"state": "started", "execution": "e1"}
    assert client.bucket(bucket).blob("dispatch/123.json").exists()
    assert markers.delete("123", second) is True
    assert markers.read("123") is None


class PreconditionGcs:
    """Answers object uploads and deletes with 412 Precondition Failed, as GCS does when an
    ifGenerationMatch condition fails (which the emulator never checks), and records them."""

    def __init__(self):
        self.seen = []
        self.http = JsonServer(self._answer)

    def _answer(self, method, url, body):
        if method == "GET":  # the client reads the bucket's metadata before some writes
            return 200, {"kind": "storage#bucket", "name": url.path.rsplit("/", 1)[1]}
        self.seen.append((method, url.path, parse_qs(url.query), body))
        return 412, {"error": {"code": 412, "message": "conditionNotMet"}}


def test_gcs_markers_use_generation_preconditions():
    gcs = PreconditionGcs()
    try:
        client = storage.Client(
            project=PROJECT,
            credentials=AnonymousCredentials(),
            client_options={"api_endpoint": gcs.http.url},
        )
        markers = GcsMarkers("b", "dispatch/", client=client)
        assert markers.create("123", {"state": "claimed"}) is None  # exists: not ours
        assert markers.replace("123", {"state": "started"}, 17) is None
        assert markers.delete("123", 17) is False
        (create_method, create_path, create_query, create_body), replace, delete = gcs.seen
        assert create_method == "POST" and create_path == "/upload/storage/v1/b/b/o"
        assert create_query["ifGenerationMatch"] == ["0"]
        assert b'"name": "dispatch/123.json"' in create_body
        assert replace[2]["ifGenerationMatch"] == ["17"]
        assert delete[0] == "DELETE" and delete[2]["ifGenerationMatch"] == ["17"]
    finally:
        gcs.http.close()


# -- no usable credentials ----------------------------------------------------------------------
def test_dispatch_without_credentials_is_one_line_and_exit_78(tmp_path):
    env = {
        "PATH": os.environ["PATH"],
        "HOME": str(tmp_path),
        "NO_GCE_CHECK": "True",
        "GCE_METADATA_HOST": "127.0.0.1:9",
        "GCE_METADATA_IP": "127.0.0.1:9",
        "CLOUDSDK_CONFIG": str(tmp_path / "gcloud"),
        "GCP_PROJECT_ID": "p1",
        "CLOUD_RUN_REGION": "us-central1",
        "GCS_BUCKET": "stems-b",
        "PORT": "9",
        "LOG_FORMAT": "text",
    }
    proc = subprocess.run(
        [sys.executable, "-m", "job", "dispatch"],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 78, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    [line] = [x for x in proc.stderr.splitlines() if x.startswith("stem-job:")]
    assert "credentials" in line


# -- the whole Cloud Run path under faults -------------------------------------------------------
def test_every_message_ends_with_exactly_one_terminal_result_under_faults(tmp_path):
    """A slice of hack/cloudrun-faults: Pub/Sub push -> the dispatcher -> the Cloud Run job
    stand-in running `stem-job run` tasks (maxRetries 1), then the sweep and a redelivery of
    each message. Seed 33's first run SIGKILLs one message's first attempt 0.5 s in (before any
    task can finish) and sends the other a task timeout 1.0 s in; what follows depends on how
    fast the tasks run, the invariant must hold whatever it is (test_the_sweep_reports_...
    covers the sweep's cases one by one)."""
    sys.path.insert(0, str(REPO / "hack"))
    from cloudrun_faults import run

    verdict = run(runs=1, seed=33, messages=2, workdir=tmp_path)
    assert verdict["ok"], json.dumps(verdict, indent=2)
    assert (verdict["messages"], verdict["executions"]) == (2, 2)
    assert verdict["faults"]["kill"] >= 1 and verdict["attempts"] >= 3, verdict
    assert sum(verdict["outcomes"].values()) == 2, verdict


KILLED = [sys.executable, "-c", "import os, signal; os.kill(os.getpid(), signal.SIGKILL)"]


class Stand:
    """The Cloud Run path on the emulators: the job stand-in running `argv` as its tasks, the
    dispatcher (GCS markers in `bucket`) in front of it, the results topic read by `results`."""

    def __init__(self, pubsub, client, bucket, results, argv, env, max_retries, **settings):
        from cloudrun_stand_in import CloudRunJobStandIn

        job = f"projects/{PROJECT}/locations/europe-west4/jobs/stem-job"
        self.cloud_run = CloudRunJobStandIn(job, env, max_retries=max_retries, argv=argv)
        rest = {
            "transport": "rest",
            "credentials": AnonymousCredentials(),
            "client_options": {"api_endpoint": self.cloud_run.url},
        }
        self.markers = GcsMarkers(bucket, client=client)
        self.app = create_app(
            settings_for(results.topic, marker_bucket=bucket, stems_bucket=bucket, **settings),
            jobs_client=run_v2.JobsClient(**rest),
            publisher_client=pubsub.publisher,
            markers=self.markers,
            sweep_clients=SweepClients(
                run_v2.ExecutionsClient(**rest), run_v2.TasksClient(**rest), client
            ),
        )
        self.server = Uvicorn(self.app)
        self.url = self.server.url

    def push(self, message, message_id) -> dict:
        return post_push(self.url, message, message_id=message_id).json()

    def sweep(self) -> dict:
        return requests.post(self.url + "/sweep", timeout=60).json()

    def close(self):
        self.server.close()
        self.cloud_run.close()


@pytest.fixture
def stand(pubsub_emulator, gcs_emulator, results, unique_name):
    """stand(argv, env=None, max_retries=1, **settings) -> a Stand; `.bucket` and `.client`."""
    client = gcs_emulator.client(PROJECT)
    bucket = client.create_bucket(unique_name("stand")).name
    made = []

    def start(argv=KILLED, env=None, max_retries=1, **kw):
        env = env or {}
        made.append(Stand(pubsub_emulator, client, bucket, results, argv, env, max_retries, **kw))
        return made[-1]

    start.bucket, start.client = bucket, client
    yield start
    for one in made:
        one.close()


def test_the_sweep_reports_a_killed_execution_once_and_only_the_asked_set_as_completed(
    stand, gcs_emulator, results, model_dir, song, tmp_path
):
    """Executions whose task is SIGKILLed on its last attempt: one track's set was complete
    before the kill (its manifest exists), one's was not, one asks for an output its set lacks,
    and one's original was uploaded again after its set was made. The sweep publishes
    `completed` for the first only (what the job itself would accept), once: a second sweep
    finds nothing open."""
    from conftest import job_env, last_json, run_job

    bucket, client = stand.bucket, stand.client
    for name in ("song", "again"):
        client.bucket(bucket).blob(f"originals/{name}.mp3").upload_from_filename(str(song))
    done = {
        **GOOD,
        "jobId": "job_done",
        "trackId": "trk_done",
        "originalStemUri": f"gs://{bucket}/originals/song.mp3",
    }
    again = {**done, "jobId": "job_again", "trackId": "trk_again"}
    again["originalStemUri"] = f"gs://{bucket}/originals/again.mp3"
    lost = {**done, "jobId": "job_lost", "trackId": "trk_lost"}
    other = {**done, "jobId": "job_other", "outputs": ["vocals", "instrumental"]}
    env = job_env(
        model_dir, tmp_path / "unused", STORAGE_MODE="gcs", GCS_BUCKET=bucket, **gcs_emulator.env
    )
    finished = run_job(["run", "--message", json.dumps(done)], env)  # the set of trk_done
    assert finished.returncode == 0 and last_json(finished.stdout)["status"] == "completed"
    made = run_job(["run", "--message", json.dumps(again)], env)
    assert made.returncode == 0
    client.bucket(bucket).blob("originals/again.mp3").upload_from_filename(str(song))  # new master
    path = stand(KILLED, env)
    for number, message in enumerate((done, lost, other, again)):
        assert path.push(message, f"77{number}")["status"] == "started"
    assert path.cloud_run.wait(4, timeout_s=60)
    assert all(
        [a.term_signal for a in e.attempts] == [9, 9] for e in path.cloud_run.executions.values()
    ), "every attempt killed"
    reply = path.sweep()
    assert (reply["open"], reply["published"]) == (4, 4), reply
    published = {json.loads(m.data)["jobId"]: json.loads(m.data) for m in results(4)}
    assert published["job_done"]["status"] == "completed"
    assert published["job_done"]["stems"] == last_json(finished.stdout)["stems"]
    for job_id in ("job_lost", "job_other", "job_again"):
        assert published[job_id]["status"] == "failed", job_id
        assert published[job_id]["error"]["code"] == "execution_lost"
        assert published[job_id]["error"]["retryable"] is True
    again = path.sweep()
    assert again["open"] == 0 and results(1, timeout_s=3) == []


def test_a_redelivery_after_the_sweep_starts_nothing(stand, results):
    """Pub/Sub redelivers a push whose 200 was lost after the sweep reported its execution:
    the closed marker is terminal for that messageId."""
    path = stand()
    assert path.push(GOOD, "881")["status"] == "started"
    assert path.cloud_run.wait(1, timeout_s=60)
    assert path.sweep()["published"] == 1
    [result] = results(1)
    assert json.loads(result.data)["error"]["code"] == "execution_lost"
    reply = path.push(GOOD, "881")
    assert reply["status"] == "duplicate", reply
    assert len(path.cloud_run.executions) == 1
    assert path.sweep()["open"] == 0 and results(1, timeout_s=3) == []


def test_a_push_without_a_message_id_starts_nothing(stand):
    path = stand()
    body = push_body(GOOD)
    del body["message"]["messageId"], body["message"]["message_id"]
    reply = requests.post(path.url + "/pubsub", json=body, timeout=30)
    assert reply.status_code == 400 and "messageId" in reply.json()["error"]
    assert path.cloud_run.executions == {}


def test_a_stale_claim_whose_execution_started_is_recorded_not_run_again(stand, results):
    """A dispatcher died after run_job, before recording: its claim goes stale. The
    redelivery finds the execution (by the marker key it carries) instead of starting a
    second one, and the sweep then reports it."""
    path = stand()
    path.markers.create("991", {"state": "claimed", "claimedAt": time.time() - 600})
    started = {"overrides": {"containerOverrides": [{"env": [
        {"name": "JOB_MESSAGE", "value": json.dumps(GOOD)},
        {"name": "DISPATCH_MESSAGE_KEY", "value": "991"},
    ]}]}}  # fmt: skip
    path.cloud_run.start(started)
    reply = path.push(GOOD, "991")
    assert reply["status"] == "duplicate", reply
    assert len(path.cloud_run.executions) == 1
    assert path.cloud_run.wait(1, timeout_s=60)
    assert path.sweep()["published"] == 1 and len(results(1)) == 1


def test_a_sweep_lists_only_open_entries_a_page_at_a_time(stand, results):
    """Closed markers are not listed; each sweep call takes at most DISPATCH_SWEEP_LIMIT open
    entries and the next call goes on from where it stopped; one left `publishing` by a sweep
    that died is never published again."""
    path = stand(sweep_limit=2)
    for number in range(3):
        assert path.push({**GOOD, "jobId": f"job_{number}"}, f"55{number}")["status"] == "started"
    for number in range(20):
        path.markers.create(f"1{number:03d}", {"state": "ended", "outcome": "completed"})
    path.markers.create(
        "open/999",
        {"state": "publishing", "sweptAt": time.time() - 3600, "execution": "x", "jobId": "j"},
    )
    assert path.cloud_run.wait(3, timeout_s=60)
    first, second = path.sweep(), path.sweep()
    assert (first["open"], first["published"]) == (2, 2), first
    assert (second["open"], second["published"], second["stuck"]) == (2, 1, 1), second
    assert second["next"] == "999" and len(results(3)) == 3
    third = path.sweep()  # past the last entry: the next call starts over
    assert (third["open"], third["next"]) == (0, ""), third
    fourth = path.sweep()  # the three are closed (deleted); the stuck one stays, unsent
    assert (fourth["open"], fourth["stuck"], fourth["published"]) == (1, 1, 0), fourth
    assert results(1, timeout_s=3) == []


def test_the_job_learns_maxretries_from_the_dispatcher_and_reports_once(
    stand, results, pubsub_emulator, tmp_path
):
    """`gcloud run jobs update --max-retries 2` after deploying with MAX_RETRIES=1: the
    dispatcher passes the execution's real maxRetries, so only the real last attempt of a
    task whose storage is down publishes `failed`, and the sweep counts it as reported."""
    from conftest import job_env

    env = job_env(
        tmp_path / "model",
        tmp_path / "out",
        STORAGE_MODE="gcs",
        GCS_BUCKET=stand.bucket,
        STORAGE_EMULATOR_HOST="http://127.0.0.1:9",
        RETRY_DEADLINE_S="1",
        MAX_RETRIES="1",
        PUBSUB_RESULTS_TOPIC=results.topic,
        **{"GCP_PROJECT_ID": PROJECT, **pubsub_emulator.env},
    )
    path = stand([sys.executable, "-m", "job", "run"], env, max_retries=2)
    message = {**GOOD, "originalStemUri": f"gs://{stand.bucket}/originals/song.mp3"}
    assert path.push(message, "661")["status"] == "started"
    assert path.cloud_run.wait(1, timeout_s=120)
    [execution] = path.cloud_run.executions.values()
    assert [a.exit_code for a in execution.attempts] == [75, 75, 75]
    [result] = results(1)
    assert json.loads(result.data)["error"]["code"] == "storage_unavailable"
    reply = path.sweep()
    assert (reply["open"], reply["reported"], reply["published"]) == (1, 1, 0), reply
    assert results(1, timeout_s=3) == []
