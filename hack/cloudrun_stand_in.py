"""A local stand-in for a Cloud Run job: the Admin API calls the dispatcher and the sweep make
(jobs.get, jobs:run, executions.list/get, tasks.list, over REST as google-cloud-run sends them)
and the tasks themselves, each the real `stem-job run` as a subprocess.

It behaves as Cloud Run documents: a task is retried after any non-zero exit (or a kill) up to
`max_retries` times, with CLOUD_RUN_TASK_ATTEMPT (0-based), CLOUD_RUN_TASK_INDEX/COUNT,
CLOUD_RUN_EXECUTION and CLOUD_RUN_JOB set; run_job's env overrides are merged into the
template's env; at the task timeout the container gets SIGTERM and, 10 s later, SIGKILL; an
execution has ended when its task succeeded or ran out of attempts, and each task reports its
last attempt's exit code and termination signal. `faults(execution, attempt)` (an Execution,
the 0-based attempt) may add, per attempt, a SIGKILL at a given moment (out of memory, host
loss), an earlier task timeout, or env overrides (a storage outage). Executions run one at a
time: the machine, not the platform, sets the pace here.
"""

import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlparse

EXECUTION_TYPE = "type.googleapis.com/google.cloud.run.v2.Execution"
KILL_GRACE_S = 10.0  # Cloud Run: SIGTERM, then SIGKILL 10 s later


@dataclass
class Fault:
    """What happens to one attempt: SIGKILL after `kill_after_s`; SIGTERM (the task timeout)
    after `timeout_s`; `env` merged over the task's env."""

    kill_after_s: float | None = None
    timeout_s: float | None = None
    env: dict = field(default_factory=dict)


@dataclass
class Attempt:
    number: int
    fault: Fault
    exit_code: int | None = None
    term_signal: int = 0
    seconds: float = 0.0
    stdout: str = ""


@dataclass
class Execution:
    name: str
    env: dict
    index: int
    max_retries: int = 1
    attempts: list = field(default_factory=list)
    created: float = field(default_factory=time.time)
    completed: float | None = None
    succeeded: bool = False

    def as_json(self) -> dict:
        execution = {
            "name": self.name,
            "taskCount": 1,
            "parallelism": 1,
            "createTime": stamp(self.created),
            "succeededCount": int(self.succeeded),
            "failedCount": int(self.completed is not None and not self.succeeded),
            "retriedCount": max(0, len(self.attempts) - 1),
            "runningCount": int(self.completed is None),
            "template": {
                "maxRetries": self.max_retries,
                "containers": [{"env": [{"name": k, "value": v} for k, v in self.env.items()]}],
            },
        }
        if self.completed is not None:
            execution["completionTime"] = stamp(self.completed)
        return execution

    def task_json(self) -> dict:
        task = {
            "name": f"{self.name}/tasks/{self.name.rsplit('/', 1)[1]}-task0",
            "index": 0,
            "retried": max(0, len(self.attempts) - 1),
        }
        if self.attempts and self.attempts[-1].exit_code is not None:
            last = self.attempts[-1]
            task["lastAttemptResult"] = {"exitCode": last.exit_code, "termSignal": last.term_signal}
        return task


class JsonServer:
    """A loopback HTTP server answering every request with JSON: `answer(method, url, body)`
    (url parsed) returns (status, reply). What the API stand-ins here and in the tests share."""

    def __init__(self, answer):
        class Handler(BaseHTTPRequestHandler):
            def _answer(self):
                body = self.rfile.read(int(self.headers.get("content-length", 0)))
                status, reply = answer(self.command, urlparse(self.path), body)
                data = json.dumps(reply).encode()
                self.send_response(status)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = do_PUT = do_DELETE = _answer

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_port
        self.url = f"http://127.0.0.1:{self.port}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def stamp(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class CloudRunJobStandIn:
    """`job`: projects/P/locations/L/jobs/J; `env`: the job template's env; `argv`: the
    container's command (default `python -m job run`)."""

    def __init__(
        self,
        job: str,
        env: dict,
        max_retries: int = 1,
        task_timeout_s: float = 600.0,
        faults=None,
        argv=None,
        cwd: Path | None = None,
    ):
        self.job, self.env = job, dict(env)
        self.max_retries, self.task_timeout_s = max_retries, task_timeout_s
        self.faults = faults or (lambda execution, attempt: Fault())
        self.argv = argv or [sys.executable, "-m", "job", "run"]
        self.cwd = cwd
        self.executions = {}
        self._lock = threading.Lock()
        self._queue = queue.Queue()
        self._stopping = False
        self._runner = threading.Thread(target=self._run_queue, name="cloud-run-tasks", daemon=True)
        self._runner.start()
        self.http = JsonServer(lambda method, url, body: self.answer(method, url.path, body))
        self.url = self.http.url

    # -- the Admin API ----------------------------------------------------------------
    def answer(self, method: str, path: str, body: bytes):
        name = path.removeprefix("/v2/")
        if method == "POST" and name == f"{self.job}:run":
            execution = self.start(json.loads(body or b"{}"))
            return 200, {
                "name": f"{self.job.rsplit('/jobs/', 1)[0]}/operations/{execution.index}",
                "metadata": {"@type": EXECUTION_TYPE, "name": execution.name},
            }
        with self._lock:
            if method == "GET" and name == self.job:
                return 200, {"name": self.job, "template": {"template": self.template()}}
            if method == "GET" and name == f"{self.job}/executions":  # newest first
                listed = sorted(self.executions.values(), key=lambda e: -e.index)
                return 200, {"executions": [e.as_json() for e in listed]}
            if method == "GET" and name in self.executions:
                return 200, self.executions[name].as_json()
            if method == "GET" and name.endswith("/tasks") and name[:-6] in self.executions:
                return 200, {"tasks": [self.executions[name[:-6]].task_json()]}
        return 404, {"error": {"code": 404, "status": "NOT_FOUND", "message": f"{name} not found"}}

    def template(self) -> dict:
        """The job's task template as jobs.get answers it (maxRetries may change between
        executions, as `gcloud run jobs update --max-retries` does)."""
        return {"maxRetries": self.max_retries, "timeout": f"{self.task_timeout_s:g}s"}

    def start(self, request: dict) -> Execution:
        overrides = {}
        for container in (request.get("overrides") or {}).get("containerOverrides", []):
            overrides.update(
                {item["name"]: item.get("value", "") for item in container.get("env", [])}
            )
        with self._lock:
            index = len(self.executions) + 1
            name = f"{self.job}/executions/{self.job.rsplit('/', 1)[1]}-{index:05d}"
            execution = Execution(name, {**self.env, **overrides}, index, self.max_retries)
            self.executions[name] = execution
        self._queue.put(execution)
        return execution

    # -- the tasks --------------------------------------------------------------------
    def _run_queue(self):
        while not self._stopping:
            try:
                execution = self._queue.get(timeout=0.2)
            except queue.Empty:
                continue
            self._execute(execution)

    def _execute(self, execution: Execution) -> None:
        for number in range(execution.max_retries + 1):
            attempt = Attempt(number, self.faults(execution, number))
            with self._lock:
                execution.attempts.append(attempt)
            self._attempt(execution, attempt)
            if attempt.exit_code == 0:
                break
        with self._lock:
            execution.succeeded = execution.attempts[-1].exit_code == 0
            execution.completed = time.time()

    def _attempt(self, execution: Execution, attempt: Attempt) -> None:
        env = {
            **execution.env,
            **attempt.fault.env,
            "CLOUD_RUN_JOB": self.job.rsplit("/", 1)[1],
            "CLOUD_RUN_EXECUTION": execution.name.rsplit("/", 1)[1],
            "CLOUD_RUN_TASK_INDEX": "0",
            "CLOUD_RUN_TASK_COUNT": "1",
            "CLOUD_RUN_TASK_ATTEMPT": str(attempt.number),
        }
        started = time.monotonic()
        process = subprocess.Popen(
            self.argv,
            env=env,
            cwd=self.cwd,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        timeout = min(self.task_timeout_s, attempt.fault.timeout_s or self.task_timeout_s)
        kill_at = attempt.fault.kill_after_s
        timers = [threading.Timer(timeout, self._terminate, (process,))]
        if kill_at is not None:
            timers.append(threading.Timer(kill_at, process.kill))
        for timer in timers:
            timer.daemon = True
            timer.start()
        try:
            attempt.stdout = process.communicate()[0]
        finally:
            for timer in timers:
                timer.cancel()
        attempt.seconds = round(time.monotonic() - started, 2)
        code = process.returncode
        attempt.exit_code, attempt.term_signal = (128 - code, -code) if code < 0 else (code, 0)

    @staticmethod
    def _terminate(process) -> None:
        """The task timeout: SIGTERM now, SIGKILL after the grace period."""
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            timer = threading.Timer(KILL_GRACE_S, lambda: process.poll() is None and process.kill())
            timer.daemon = True
            timer.start()

    # -- for the caller ---------------------------------------------------------------
    def ended(self) -> bool:
        with self._lock:
            return all(e.completed is not None for e in self.executions.values())

    def wait(self, count: int, timeout_s: float) -> bool:
        """True once `count` executions exist and all have ended."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            with self._lock:
                enough = len(self.executions) >= count
            if enough and self.ended():
                return True
            time.sleep(0.2)
        return False

    def close(self) -> None:
        self._stopping = True
        self.http.close()


def job_env(base: dict) -> dict:
    """The env of a task: the caller's, less what would steer `stem-job run` elsewhere."""
    drop = ("JOB_MESSAGE", "ORIGINAL_STEM_URI", "RELEASE_ID", "TRACK_ID", "CLOUD_RUN_TASK_ATTEMPT")
    return {k: v for k, v in {**os.environ, **base}.items() if k not in drop}
