"""The Cloud Run dispatch protocol checked over its state space, not by examples.

A Hypothesis state machine drives the real Dispatcher (its Claims over MemoryMarkers, which
honour create-only and generation preconditions as GCS does), the real Sweeper, and the job's
real last-attempt decision and publish (runtime.Attempt, cli.finish_run) through random
interleavings of: pushes, duplicates and redeliveries (after a 409, a late or a lost 200), task
attempts ending 0, 65, 69, 75, 78, at the timeout (SIGTERM) or SIGKILLed (before or after the
manifest), publish failures, marker write failures and a dispatcher or sweep dying at a write,
overlapping sweeps, the track's manifest made for another request or its original re-uploaded,
and the job's maxRetries changed between executions. What stands in for Cloud Run answers as
its Admin API does (jobs.get, jobs:run, executions.get/list, tasks.list).

After every step: no message has two terminal results, none has a second execution, every
`completed` names the set its request asks for. At the end (everything delivered, every
execution ended, the sweeps done): every message has exactly one terminal result, except one
whose sweep died inside the publish call, which its entry shows as `stuck` (the window
docs/deployment.md names).

hack/protocol-check runs the same machine with many more examples and a seed.
"""

import json
from types import SimpleNamespace

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from job import cli, manifest, messages, outputs, runtime
from job.config import load_settings
from job.dispatcher import dedupe, service, sweep
from job.dispatcher.dedupe import MemoryMarkers
from job.dispatcher.envelope import Envelope
from job.dispatcher.service import Dispatcher
from job.dispatcher.settings import DispatcherSettings
from job.dispatcher.sweep import SweepClients
from job.errors import JobError

PROJECT, BUCKET = "p", "stems"
JOB = f"projects/{PROJECT}/locations/europe-west4/jobs/stem-job"
MESSAGES = 3
EXITS = ("0", "65", "69", "75", "78", "sigterm", "sigkill", "sigkill-after-manifest")


class Crash(BaseException):
    """The process dies here: nothing after it runs, no handler cleans up."""


class Clock:
    """time.time / monotonic / sleep for the modules under test: sleeps pass at once."""

    def __init__(self):
        self.now = 1_800_000_000.0

    def time(self):
        return self.now

    monotonic = time

    def sleep(self, seconds):
        self.now += seconds


class Markers(MemoryMarkers):
    """MemoryMarkers whose next writes can fail (a transient fault), or one of which kills its
    writer."""

    def __init__(self):
        super().__init__()
        self.failing, self.crash = 0, 0

    def _fault(self):
        if self.crash:  # dies at the crash-th write from now
            self.crash -= 1
            if not self.crash:
                raise Crash()
        if self.failing:
            self.failing -= 1
            raise ConnectionError("GCS unavailable (injected)")

    def create(self, key, doc):
        self._fault()
        return super().create(key, doc)

    def replace(self, key, doc, generation):
        self._fault()
        return super().replace(key, doc, generation)

    def delete(self, key, generation):
        self._fault()
        return super().delete(key, generation)


def namespace(**fields):
    return SimpleNamespace(**fields)


class Platform:
    """Cloud Run as its Admin API shows it: a job with maxRetries, executions of one task each,
    the task retried after every non-zero exit up to the execution's maxRetries."""

    def __init__(self, clock):
        self.clock, self.max_retries, self.executions = clock, 1, {}
        self.lose_reply = False

    # jobs.get / jobs:run (google.cloud.run_v2.JobsClient)
    def get_job(self, name, timeout):
        return namespace(template=namespace(template=namespace(max_retries=self.max_retries)))

    def run_job(self, request, timeout):
        env = {e.name: e.value for e in request.overrides.container_overrides[0].env}
        name = f"{JOB}/executions/stem-job-{len(self.executions) + 1:05d}"
        self.executions[name] = {
            "env": env,
            "maxRetries": self.max_retries,
            "attempts": [],
            "ended": False,
            "created": self.clock.now,
        }
        if self.lose_reply:  # Cloud Run started it, the reply never came back
            self.lose_reply = False
            from google.api_core.exceptions import ServiceUnavailable

            raise ServiceUnavailable("reply lost (injected)")
        return namespace(metadata=namespace(name=name), operation=namespace(name="op"))

    # executions.get / executions.list / tasks.list
    def _execution(self, name):
        e = self.executions[name]
        env = [namespace(name=k, value=v) for k, v in e["env"].items()]
        return namespace(
            name=name,
            create_time=namespace(timestamp=lambda: e["created"]),
            completion_time=e["ended"] or None,
            succeeded_count=int(bool(e["attempts"]) and e["attempts"][-1] == (0, 0)),
            task_count=1,
            template=namespace(max_retries=e["maxRetries"], containers=[namespace(env=env)]),
        )

    def get_execution(self, name, timeout):
        return self._execution(name)

    def list_executions(self, request, timeout):
        listed = [self._execution(name) for name in reversed(self.executions)]
        return namespace(pages=[namespace(executions=listed)])

    def list_tasks(self, parent, timeout):
        attempts = self.executions[parent]["attempts"]
        last = attempts[-1] if attempts else None
        result = namespace(exit_code=last[0], term_signal=last[1]) if last else None
        return [namespace(retried=max(0, len(attempts) - 1), last_attempt_result=result)]


class Stems:
    """The stems bucket's manifests and the originals' generations, as job.storage answers."""

    def __init__(self):
        self.manifests, self.generations = {}, {}

    def identity(self, uri):
        return {"uri": uri, "generation": self.generations[uri], "size": 1000}

    def describe_original(self, uri, trusted=False):
        return namespace(identity=self.identity(uri))

    def read_manifest(self, release_id, track_id):
        return self.manifests.get(track_id)

    def made_for(self, request, asked, identity):
        job = load_settings({})
        wanted = outputs.plan(asked or job.outputs, messages.STEMS)
        return {
            "version": manifest.VERSION,
            "input": identity,
            "model": job.model_name,
            "modelDigest": "d1",
            "format": job.output_format,
            "bitrate": manifest.bitrate(job),
            "outputs": list(wanted),
            "modelSources": list(messages.STEMS),
            "stems": {name: {"url": f"gs://{BUCKET}/{request.track_id}/{name}"} for name in wanted},
        }

    def matches(self, request) -> bool:
        job = load_settings({})
        found = self.manifests.get(request.track_id)
        asked = messages.outputs_of(request, job.outputs)
        recipe = manifest.Recipe.of(job)
        return manifest.matches(found, self.identity(request.original_uri), recipe, asked)


class Results:
    """The results topic: what was published, by jobId; the next publishes can fail."""

    def __init__(self, stems, requests):
        self.stems, self.requests = stems, requests
        self.by_job, self.failing, self.die, self.wrong = {}, 0, False, []

    def publish_result(self, result):
        if self.die:  # the process dies inside the publish: nothing is sent
            self.die = False
            raise Crash()
        if self.failing:
            self.failing -= 1
            raise JobError("publish_failed", "the results topic is unavailable (injected)")
        job_id = result["jobId"]
        if result["status"] == "completed" and not self.stems.matches(self.requests[job_id]):
            self.wrong.append(job_id)
        if result["status"] in ("completed", "failed"):
            self.by_job.setdefault(job_id, []).append(result["status"])
        return "id"


def message(number: int) -> dict:
    return {
        "jobId": f"job_{number}",
        "releaseId": "rel",
        "trackId": f"trk_{number}",
        "originalStemUri": f"gs://{BUCKET}/originals/{number}.mp3",
        **({"outputs": ["vocals", "instrumental"]} if number == 2 else {}),
    }


class DispatchProtocol(RuleBasedStateMachine):
    def __init__(self):
        super().__init__()
        self.clock = Clock()
        self.patches = pytest.MonkeyPatch()
        for module in (dedupe, sweep, service):
            self.patches.setattr(module, "time", self.clock)
        self.platform, self.stems = Platform(self.clock), Stems()
        self.markers = Markers()
        self.messages = [message(n) for n in range(MESSAGES)]
        self.requests = {m["jobId"]: messages.parse_message(json.dumps(m)) for m in self.messages}
        for m in self.messages:
            self.stems.generations[m["originalStemUri"]] = 1
        self.results = Results(self.stems, self.requests)
        self.patches.setattr(runtime, "results_publisher", lambda *a, **k: self.results)
        self.dispatcher = Dispatcher(
            DispatcherSettings(
                project=PROJECT,
                region="europe-west4",
                stems_bucket=BUCKET,
                api_attempts=1,
                claim_ttl_s=90.0,
            ),
            jobs_client=self.platform,
            markers=self.markers,
            sweep_clients=SweepClients(self.platform, self.platform, stems=self.stems),
        )
        self.dispatcher._results = self.results
        self.answered = {}  # messageId -> the last status code the dispatcher answered
        self.paused = None  # a sweep's listing, its entries not yet looked at
        self.stuck = set()  # jobIds whose sweep died inside the publish call
        self.trace = []

    def teardown(self):
        self.patches.undo()

    def note(self, *step):
        self.trace.append(step)

    # -- Pub/Sub ------------------------------------------------------------------------------
    @rule(number=st.integers(0, MESSAGES - 1))
    def deliver(self, number):
        """A push: the first, a duplicate, or a redelivery after a 409, a late or lost 200."""
        m = self.messages[number]
        pushed = Envelope(json.dumps(m).encode(), f"m{number}", {}, "pubsub-push", 1)
        try:
            status = self.dispatcher.dispatch(pushed).status
        except Crash:
            status = None  # the dispatcher died: Pub/Sub redelivers after the ack deadline
        self.answered[f"m{number}"] = status
        self.note("deliver", number, status)

    @rule(seconds=st.sampled_from([5.0, 60.0, 120.0, 700.0]))
    def time_passes(self, seconds):
        self.clock.now += seconds

    # -- faults -----------------------------------------------------------------------------
    @rule(
        fault=st.sampled_from(
            ["marker_writes_fail", "writer_dies_at_a_marker_write", "publishes_fail"]
            + ["run_job_reply_lost"]
        ),
        count=st.integers(1, 5),
    )
    def inject(self, fault, count):
        """The next `count` marker writes fail (GCS unavailable) or the count-th kills its
        writer (a dispatcher or a sweep), the next publishes fail, run_job's reply is lost."""
        if fault == "marker_writes_fail":
            self.markers.failing = count
        elif fault == "writer_dies_at_a_marker_write":
            self.markers.crash = count
        elif fault == "publishes_fail":
            self.results.failing = count
        else:
            self.platform.lose_reply = True
        self.note(fault, count)

    @rule(value=st.integers(0, 3))
    def max_retries_changed(self, value):
        self.platform.max_retries = value
        self.note("max_retries_changed", value)

    @rule(number=st.integers(0, MESSAGES - 1), other=st.integers(0, MESSAGES - 1))
    def manifest_for_another_request(self, number, other):
        """The track holds a set made for another request: other outputs, other generation."""
        request = self.requests[f"job_{number}"]
        asked = self.requests[f"job_{other}"].outputs
        uri = request.original_uri
        identity = {**self.stems.identity(uri), "generation": self.stems.generations[uri] + 7}
        self.stems.manifests[request.track_id] = self.stems.made_for(request, asked, identity)
        self.note("manifest_for_another_request", number, other)

    @rule(number=st.integers(0, MESSAGES - 1))
    def original_reuploaded(self, number):
        self.stems.generations[self.messages[number]["originalStemUri"]] += 1
        self.note("original_reuploaded", number)

    # -- Cloud Run ------------------------------------------------------------------------
    def running(self):
        return [name for name, e in self.platform.executions.items() if not e["ended"]]

    @precondition(lambda self: self.running())
    @rule(pick=st.integers(0, 10), exit=st.sampled_from(EXITS), publish_fails=st.booleans())
    def attempt_ends(self, pick, exit, publish_fails):
        names = self.running()
        self.end_attempt(names[pick % len(names)], exit, publish_fails)

    def end_attempt(self, name, exit, publish_fails=False):
        """One task attempt of `name` ends as `exit` says; the job's own code decides whether
        this attempt is its last and whether it publishes."""
        execution = self.platform.executions[name]
        env = execution["env"]
        request = messages.parse_message(env["JOB_MESSAGE"])
        job_settings = load_settings(
            {"GCP_PROJECT_ID": PROJECT, "MAX_RETRIES": env.get("MAX_RETRIES", "3")}
        )
        number = len(execution["attempts"])
        attempt = runtime.Attempt.from_env(job_settings, {"CLOUD_RUN_TASK_ATTEMPT": str(number)})
        ids = messages.request_ids(request)
        if exit in ("0", "sigkill-after-manifest"):
            identity = self.stems.identity(request.original_uri)
            asked = messages.outputs_of(request, job_settings.outputs)
            made = self.stems.made_for(request, asked, identity)
            self.stems.manifests[request.track_id] = made
        if exit.startswith("sigkill"):
            outcome = (137, 9)
        else:
            result = {
                "0": lambda: messages.completed_result(request, manifest.urls(made)),
                "65": lambda: messages.failed_result(ids, JobError("invalid_uri", "bad")),
                "69": lambda: messages.failed_result(ids, JobError("storage_unavailable", "x")),
                "75": lambda: messages.failed_result(ids, JobError("storage_unavailable", "x")),
                "78": lambda: messages.failed_result(ids, JobError("config", "bad setting")),
                "sigterm": lambda: messages.failed_result(ids, JobError("interrupted", "term")),
            }[exit]()
            self.results.failing = int(publish_fails or exit == "69")
            try:
                cli.finish_run(job_settings, result, attempt)
            except SystemExit as leaving:
                outcome = (int(leaving.code), 0)
            except Crash:  # killed inside its publish, which did not go out
                outcome = (137, 9)
            self.results.failing = 0
        execution["attempts"].append(outcome)
        if outcome == (0, 0) or number >= execution["maxRetries"]:
            execution["ended"] = self.clock.now
        self.note("attempt_ends", name[-5:], exit, publish_fails, outcome)

    # -- the sweep ------------------------------------------------------------------------
    @rule()
    def sweep(self):
        try:
            counts = self.dispatcher.sweep().body
        except Crash:
            counts = "died"
        self.note("sweep", counts)

    @rule()
    def sweep_dies_inside_a_publish(self):
        self.results.die = True
        self.markers.crash = 1  # its handler does not run either
        self.note("sweep_dies_inside_a_publish")

    @rule()
    def sweep_lists_and_pauses(self):
        self.paused = self.markers.list_open("", 100)
        self.note("sweep_lists_and_pauses", [k for k, _, _ in self.paused])

    @precondition(lambda self: self.paused is not None)
    @rule()
    def paused_sweep_goes_on(self):
        """A sweep that listed before others ran goes on with what it listed then."""
        sweeper = sweep.Sweeper(self.dispatcher, self.dispatcher.admin)
        for key, doc, generation in self.paused:
            try:
                sweeper._one(key, doc, generation)
            except Crash:
                break
            except Exception:
                continue
        self.paused = None
        self.note("paused_sweep_goes_on")

    # -- what must hold --------------------------------------------------------------------
    def executions_of(self, job_id):
        return [
            e
            for e in self.platform.executions.values()
            if json.loads(e["env"]["JOB_MESSAGE"])["jobId"] == job_id
        ]

    @invariant()
    def at_most_one_result_and_one_execution(self):
        twice = {job: got for job, got in self.results.by_job.items() if len(got) > 1}
        assert not twice, f"two terminal results: {twice}"
        assert not self.results.wrong, f"completed for another set: {self.results.wrong}"
        for job_id in self.requests:
            assert len(self.executions_of(job_id)) <= 1, f"a second execution of {job_id}"

    def quiesce(self):
        """Faults end; every message is delivered until it is answered 200, every execution
        ends, and the sweep runs until nothing is left open."""
        self.markers.failing, self.markers.crash = 0, 0
        self.results.failing, self.results.die = 0, False
        self.platform.lose_reply = False
        self.paused = None
        for number in range(MESSAGES):
            for _ in range(3):
                if self.answered.get(f"m{number}") == 200:
                    break
                self.clock.now += 700
                self.deliver(number)
        while self.running():
            self.end_attempt(self.running()[0], "sigkill")
        for _ in range(3):
            self.clock.now += 700
            counts = self.dispatcher.sweep().body
            if not counts["open"]:
                break
        for _, doc, _ in self.markers.list_open("", 100):
            if doc.get("state") == "publishing":
                self.stuck.add(doc.get("jobId"))

    def check_quiescent(self):
        self.quiesce()
        self.at_most_one_result_and_one_execution()
        for job_id in self.requests:
            got = self.results.by_job.get(job_id, [])
            assert len(got) == 1 or (not got and job_id in self.stuck), (
                f"{job_id} ended with {got or 'no result'}"
            )


class QuiescentProtocol(DispatchProtocol):
    def teardown(self):
        try:
            self.check_quiescent()
        finally:
            super().teardown()


QuiescentProtocol.TestCase.settings = settings(
    max_examples=200,
    stateful_step_count=30,
    deadline=None,
    suppress_health_check=list(HealthCheck),
    derandomize=True,
    database=None,  # nothing written into the checkout
)
test_the_dispatch_protocol = QuiescentProtocol.TestCase
