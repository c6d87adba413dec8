"""The built image, run the ways its users and platforms run it (hack/image-test builds it).

Every case starts the real image with the Docker engine: `docker run` with env vars and a
mounted folder as a Kubernetes or Cloud Run job would, the platform's hardening switches
(read-only root, an arbitrary uid, no network), the k8s pod's own container settings (rendered
from k8s/ by kubectl: its ConfigMap, securityContext, scratch volume, memory limit and args)
draining the Pub/Sub and GCS stand-ins, `docker stop` in the middle of a separation, bad input,
and Compose (`serve`, and the `pubsub` profile's sample and worker). Cases read what the image
holds (the packages against the locks, no build tools, the entrypoint and user), what the build
context holds (.dockerignore), and rebuild it twice: after a code change (the dependency layers
must come from the cache) and with a lock whose hash does not match (the build must fail).
The decoding child's fences are shown under Docker's default seccomp profile, a read-only root
and an arbitrary uid, and the model folder refuses the job's uid with a writable root (Cloud
Run's). Each case prints one PASS/FAIL line; the exit status is the number of failures.

  python hack/image_test.py IMAGE --size-budget-mb N [--compose] [--context DIR]
      [--ca-marker TEXT] [-- BUILD OPTIONS]

--context is the folder the image was built from and BUILD OPTIONS the options it was built
with (the rebuild cases reuse both); --ca-marker is a line only the CA bundle given to the build
as a secret holds (no layer may contain it).
"""

import argparse
import base64
import gzip
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import tomllib
import traceback
import urllib.request
import uuid
from pathlib import Path

import yaml

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
HARDENED = ["--read-only", "--tmpfs", "/tmp", "--user", "4242:0"]  # as Cloud Run/OpenShift may
# Inside the image: a loopback listener, an unfenced process that reaches it (the control), and
# a process fenced by the function the decoding child calls first (job.audio.confine), child of
# a non-dumpable parent holding a secret, trying the listener, the parent's environ, a socket
# and the model folder. Prints one JSON line.
FENCE_CHILD = r"""
import json, os, socket, sys
from job.audio import confine
found = confine.confine() if sys.argv[2] == "fenced" else {}
found.update(confine.probe(os.getppid()))
def tried(name, action):
    try:
        action()
        found[name] = "open"
    except OSError as exc:
        found[name] = f"refused ({exc.errno})"
tried("connect", lambda: socket.create_connection(("127.0.0.1", int(sys.argv[1])), 5).close())
tried("modelWrite", lambda: open(os.path.join(sys.argv[3], "x.th"), "wb"))
print(json.dumps(found))
"""
FENCE_PROGRAM = r"""
import json, os, socket, subprocess, sys, threading
from job.audio import confine
from job.audio.child import child_env
server = socket.create_server(("127.0.0.1", 0))
port, accepted = server.getsockname()[1], []
def serve():
    while True:
        connection, _ = server.accept()
        accepted.append(1)
        connection.close()
threading.Thread(target=serve, daemon=True).start()
confine.protect_parent()
os.environ["HTTP_TOKEN"] = "a-secret-the-child-must-not-read"
def run(mode):
    argv = [sys.executable, "-P", "-c", sys.argv[1], str(port), mode, os.environ["MODEL_DIR"]]
    done = subprocess.run(argv, env=child_env(), capture_output=True, text=True, timeout=60)
    return json.loads(done.stdout) if done.returncode == 0 else {"error": done.stderr[-500:]}
unfenced = run("open")
control = len(accepted)
fenced = run("fenced")
print(json.dumps({"unfenced": unfenced, "fenced": fenced, "accepted": len(accepted),
                  "acceptedBeforeFenced": control}))
"""


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


def normalized(name: str) -> str:
    """A distribution's name as pip compares them (PEP 503)."""
    return re.sub(r"[-_.]+", "-", name).lower()


def pins(lock: Path) -> dict:
    """{name: version} of a requirements file's `name==version` lines."""
    found = re.findall(r"^([A-Za-z0-9][A-Za-z0-9_.-]*)==(\S+)", lock.read_text(), re.M)
    return {normalized(name): version for name, version in found}


def inspect(image: str, template: str):
    """One field of `docker image inspect`, as JSON."""
    done = docker("image", "inspect", "-f", "{{json " + template + "}}", image, check=True)
    return json.loads(done.stdout)


def in_image(image: str, *argv, user=None, timeout=120) -> subprocess.CompletedProcess:
    """Run a program other than the entrypoint in the image, offline."""
    options = ["--user", user] if user else []
    return docker(
        "run",
        "--rm",
        "--network",
        "none",
        *options,
        "--entrypoint",
        argv[0],
        image,
        *argv[1:],
        timeout=timeout,
    )


def build_steps(log: str) -> list:
    """[(description, cached)] of the steps in a `docker build --progress=plain` log."""
    described, cached = {}, set()
    for line in log.splitlines():
        match = re.match(r"#(\d+) (\[.*)$", line)
        if match and match.group(1) not in described:
            described[match.group(1)] = match.group(2)
        match = re.match(r"#(\d+) CACHED$", line)
        if match:
            cached.add(match.group(1))
    return [(text, step in cached) for step, text in described.items()]


def layer_files(image: str):
    """(layer, path, content) of every regular file in every layer of `image` (docker save)."""
    with tempfile.TemporaryFile() as saved:
        subprocess.run([DOCKER, "save", image], stdout=saved, check=True, timeout=600)
        saved.seek(0)
        with tarfile.open(fileobj=saved) as outer:
            for member in outer.getmembers():
                if not member.isfile() or member.size < 512:
                    continue
                blob = outer.extractfile(member)
                head = blob.read(2)
                blob.seek(0)
                stream = gzip.GzipFile(fileobj=blob) if head == b"\x1f\x8b" else blob
                try:
                    layer = tarfile.open(fileobj=stream, mode="r|")
                    for entry in layer:
                        if entry.isfile():
                            yield member.name, entry.name, layer.extractfile(entry).read()
                except (tarfile.ReadError, OSError):
                    continue  # a config or manifest blob, not a layer


def rendered_pod(overlay: Path) -> tuple:
    """(ConfigMap data, pod spec, container) of the ScaledJob `kubectl kustomize` renders."""
    kubectl = shutil.which("kubectl")
    expect(kubectl, "kubectl (with its built-in kustomize) renders k8s/; it is not installed")
    out = subprocess.run(
        [kubectl, "kustomize", str(overlay)], capture_output=True, text=True, timeout=60
    )
    expect(out.returncode == 0, f"kubectl kustomize {overlay}: {out.stderr[-800:]}")
    objects = {obj["kind"]: obj for obj in yaml.safe_load_all(out.stdout) if obj}
    spec = objects["ScaledJob"]["spec"]["jobTargetRef"]["template"]["spec"]
    [container] = spec["containers"]
    return objects["ConfigMap"]["data"], spec, container


POD_FIELDS = {
    "restartPolicy",
    "serviceAccountName",
    "automountServiceAccountToken",
    "nodeSelector",
    "tolerations",
    "securityContext",
    "containers",
    "volumes",
    "terminationGracePeriodSeconds",
}
POD_SECURITY = {"runAsNonRoot", "runAsUser", "runAsGroup", "seccompProfile"}
CONTAINER_FIELDS = {
    "name",
    "image",
    "args",
    "envFrom",
    "resources",
    "securityContext",
    "volumeMounts",
}
CONTAINER_SECURITY = {"allowPrivilegeEscalation", "readOnlyRootFilesystem", "capabilities"}


def quantity_bytes(text: str) -> int:
    number, suffix = re.fullmatch(r"(\d+)([KMGT]i?)?", text).groups()
    scale = 1024 if (suffix or "").endswith("i") else 1000
    return int(number) * scale ** ("KMGT".index(suffix[0]) + 1 if suffix else 0)


def pod_options(spec: dict, container: dict, scratch: Path) -> list:
    """`docker run` options doing what the pod spec asks of the container runtime. A field this
    does not translate fails the case, so no setting of the pod goes untried."""
    unknown = (
        set(spec) - POD_FIELDS
        | set(spec.get("securityContext", {})) - POD_SECURITY
        | set(container) - CONTAINER_FIELDS
        | set(container.get("securityContext", {})) - CONTAINER_SECURITY
    )
    expect(not unknown, f"pod fields the image test does not apply: {sorted(unknown)}")
    pod, own = spec["securityContext"], container["securityContext"]
    expect(pod["seccompProfile"] == {"type": "RuntimeDefault"}, "Docker's default is the runtime's")
    user, group = own.get("runAsUser", pod["runAsUser"]), own.get("runAsGroup", pod["runAsGroup"])
    expect(not pod.get("runAsNonRoot") or user != 0, "runAsNonRoot with uid 0")
    options = ["--user", f"{user}:{group}"]
    if own.get("readOnlyRootFilesystem"):
        options.append("--read-only")
    if own.get("allowPrivilegeEscalation") is False:
        options += ["--security-opt", "no-new-privileges"]
    options += [f"--cap-drop={cap}" for cap in own.get("capabilities", {}).get("drop", [])]
    options += [f"--cap-add={cap}" for cap in own.get("capabilities", {}).get("add", [])]
    volumes = {volume["name"]: volume for volume in spec.get("volumes", [])}
    for mount in container.get("volumeMounts", []):
        volume = volumes[mount["name"]]
        expect(volume == {"name": mount["name"], "emptyDir": {}}, f"volume {volume}")
        folder = scratch / mount["name"]
        folder.mkdir()
        folder.chmod(0o777)  # an emptyDir is writable by the pod's uid
        options += ["-v", f"{folder}:{mount['mountPath']}"]
    options += ["--memory", str(quantity_bytes(container["resources"]["limits"]["memory"]))]
    return options


class ImageTest:
    def __init__(self, image: str, work: Path, context=None, build_options=(), ca_marker=None):
        self.image = image
        self.work = work
        self.context, self.build_options, self.ca_marker = context, list(build_options), ca_marker
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

    def model_is_read_only_to_the_job(self):
        """With a writable root (Cloud Run's), neither the image's uid nor an arbitrary one in
        group 0 may add a file to the model folder or open one of its pickles for writing."""
        script = (
            'for f in "$MODEL_DIR/planted.th" "$MODEL_DIR"/*; do '
            'if ( : >> "$f" ) 2>/dev/null; then echo "WROTE $f"; else echo "refused $f"; fi; done'
        )
        seen = []
        for user in ("10001:10001", "4242:0"):
            done = in_image(self.image, "sh", "-c", script, user=user)
            refused = done.stdout.count("refused")
            expect("WROTE" not in done.stdout and refused >= 3, f"{user}: {done.stdout!r}")
            seen.append(f"{user}: {refused} of {refused} refused")
        return "; ".join(seen)

    def decoding_child_is_fenced(self):
        """Docker's default seccomp profile, read-only root, uid 4242 in group 0: a real track's
        decoding child reports its fences (the CLI logs them), and a process fenced the same
        way cannot reach a loopback listener, the parent's environ, or the model folder."""
        out = self.outputs()
        env = {
            "PROCESSING_MODE": "job",
            "ORIGINAL_STEM_URI": "/in/track.flac",
            "RELEASE_ID": "r9",
            "TRACK_ID": "t9",
            "INPUT_DIR": "/in",
            "LOG_FORMAT": "json",
            "HTTP_TOKEN": "a-secret-the-child-must-not-read",
        }
        mounts = ["-v", f"{self.inputs}:/in:ro", "-v", f"{out}:/outputs"]
        done = docker("run", "--rm", *mounts, *HARDENED, *env_args(env), self.image)
        expect(done.returncode == 0, f"exit {done.returncode}: {done.stderr[-1500:]}")
        lines = [line for line in done.stderr.splitlines() if "decoding child" in line]
        expect(len(lines) == 1, f"fence lines: {lines} {done.stderr[-800:]}")
        logged = json.loads(lines[0])["message"]
        for fence in (
            "seccomp loaded",
            "network refused",
            "parentEnviron refused",
            "writes refused",
        ):
            expect(fence in logged, f"{fence!r} not in {logged!r}")
        probe = docker(
            "run",
            "--rm",
            *HARDENED,
            "--entrypoint",
            "python",
            self.image,
            "-c",
            FENCE_PROGRAM,
            FENCE_CHILD,
        )
        expect(probe.returncode == 0, f"probe exit {probe.returncode}: {probe.stderr[-1500:]}")
        found = last_json(probe.stdout)
        expect(found["unfenced"].get("connect") == "open", f"control did not connect: {found}")
        parent = found["unfenced"].get("parentEnviron", "")
        expect(parent.startswith("refused"), f"a non-dumpable parent's environ: {found}")
        expect(found["acceptedBeforeFenced"] == found["accepted"] == 1, f"listener: {found}")
        fenced = found["fenced"]
        for name in ("connect", "network", "parentEnviron", "modelWrite", "writes"):
            expect(str(fenced.get(name, "")).startswith("refused"), f"{name}: {fenced}")
        expect(fenced.get("seccomp") == "loaded", f"seccomp: {fenced}")
        return f"logged: {logged}; fenced probe: {json.dumps(fenced)}; listener saw 1 (control)"

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

    # -- what the image holds ---------------------------------------------------------------------
    def entrypoint_user_and_env(self):
        """The console script pyproject.toml declares, from the venv on PATH, as a numeric
        non-root user (Kubernetes' runAsNonRoot can only verify a number) that does not own
        the model (root does); offline, under tcmalloc, and ready for a CUDA 12.x driver older
        than its libraries."""
        scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
        entry = inspect(self.image, ".Config.Entrypoint")
        expect(entry == ["stem-job"] and entry[0] in scripts, f"entrypoint {entry}")
        user = inspect(self.image, ".Config.User")
        expect(user == "10001:10001", f"image user {user!r}")
        env = dict(item.split("=", 1) for item in inspect(self.image, ".Config.Env"))
        expect(env["PATH"].startswith("/opt/venv/bin:"), f"PATH {env['PATH']}")
        for key, value in {
            "HF_HUB_OFFLINE": "1",
            "LD_PRELOAD": "libtcmalloc_minimal.so.4",
            "NVIDIA_DISABLE_REQUIRE": "1",
        }.items():
            expect(env.get(key) == value, f"{key}={env.get(key)!r}")
        found = in_image(self.image, "sh", "-c", "command -v stem-job; stat -c %u:%g $MODEL_DIR")
        expect(
            found.stdout.split() == ["/opt/venv/bin/stem-job", "0:0"],
            f"stem-job and the model's owner (root): {found.stdout!r} {found.stderr[-300:]}",
        )
        maps = in_image(self.image, "python", "-c", "print(open('/proc/self/maps').read())")
        expect("libtcmalloc_minimal" in maps.stdout, "tcmalloc is not loaded in the image")
        return f"entrypoint {entry}, user {user}, MODEL_DIR={env.get('MODEL_DIR')}, tcmalloc"

    def packages_are_the_locks(self):
        """Every dependency at requirements.lock's version and torch at requirements-torch.txt's
        pin, nothing else installed, and pip finds them consistent (but for sphn, which the
        build removes on purpose: demucs names it, the job never imports demucs.api)."""
        code = (
            "import importlib.metadata as m, json; "
            "print(json.dumps({d.metadata['Name']: d.version for d in m.distributions()}))"
        )
        listed = in_image(self.image, "python", "-c", code)
        expect(listed.returncode == 0, listed.stderr[-500:])
        installed = {normalized(k): v for k, v in json.loads(listed.stdout).items()}
        locked = pins(REPO / "requirements.lock")
        torch = pins(REPO / "requirements-torch.txt")["torch"]
        wrong = {
            name: (version, installed.get(name))
            for name, version in locked.items()
            if name != "sphn" and installed.get(name) != version
        }
        expect(not wrong, f"not at the lock's version (lock, image): {wrong}")
        expect("sphn" not in installed, "sphn is still installed")
        expect(
            installed.get("torch", "").split("+")[0] == torch,
            f"torch {installed.get('torch')}, requirements-torch.txt pins {torch}",
        )
        extra = set(installed) - set(locked) - {"torch", "stem-job", "pip"}
        expect(not extra, f"installed but in no lock: {sorted(extra)}")
        checked = in_image(self.image, "python", "-m", "pip", "check")
        problems = [
            line
            for line in checked.stdout.splitlines()
            if not re.match(r"demucs \S+ requires sphn, which is not installed", line)
        ]
        expect(not problems, "pip check: " + "\n".join(problems))
        return f"{len(installed)} distributions: the lock's, torch {installed['torch']}"

    def no_build_tools_or_leftovers(self):
        """The final image inherits no compiler, headers, git or pip cache from the builder,
        no source tree or wheels, no apt lists, and none of torch's C++ headers or tests."""
        script = (
            "for tool in gcc cc c++ g++ make git; do command -v $tool; done; "
            "ls -d /usr/include/python3* /opt/venv/lib/python3*/site-packages/torch/include "
            "/opt/venv/lib/python3*/site-packages/torch/test 2>/dev/null; "
            # the runtime stage's bind mount leaves /wheels behind as an empty mount point
            "find /src /wheels /tmp/local-wheels /root/.cache/pip -mindepth 1 2>/dev/null; "
            "ls /var/lib/apt/lists | grep -v '^lock$' | grep -v '^partial$'; "
            "dpkg-query -W -f '${Package}\\n' | grep -xE 'build-essential|gcc(-[0-9]+)?"
            "|g\\+\\+(-[0-9]+)?|cpp(-[0-9]+)?|(lib)?python3.*-(dev|venv)|git|make'; true"
        )
        found = in_image(self.image, "sh", "-c", script, user="0")
        expect(found.returncode == 0, found.stderr[-500:])
        expect(not found.stdout.strip(), f"in the final image: {found.stdout.split()}")
        packages = in_image(self.image, "dpkg-query", "-W", "-f", "${Package}\n")
        return f"{len(packages.stdout.split())} Debian packages, no build tools"

    def build_context_is_what_the_build_copies(self):
        """What .dockerignore lets Docker send from this checkout: the files the Dockerfile
        copies or mounts (the build of this image, from a context holding only those, shows
        they suffice), and nothing else (tests, docs, .git, .venv, caches)."""
        tag = f"stem-job-context:{uuid.uuid4().hex[:8]}"
        dockerfile = f"FROM {self.image}\nCOPY . /ctx\n"
        built = subprocess.run(
            [DOCKER, "build", "-q", "-t", tag, "-f", "-", str(REPO)],
            input=dockerfile,
            capture_output=True,
            text=True,
            timeout=300,
        )
        expect(built.returncode == 0, f"build: {built.stderr[-800:]}")
        try:
            listed = in_image(tag, "find", "/ctx", "-type", "f")
        finally:
            docker("rmi", "-f", tag)
        sent = {line.removeprefix("/ctx/") for line in listed.stdout.split()}
        roots = ["job", "model", "wheels"]
        wanted = {"pyproject.toml", "requirements.lock", "requirements-torch.txt", "README.md"}
        wanted |= {"hack/docker-build-env"}
        for root in roots:
            wanted |= {
                str(path.relative_to(REPO))
                for path in (REPO / root).rglob("*")
                if path.is_file() and "__pycache__" not in path.parts and path.suffix != ".pyc"
            }
        expect(
            sent == wanted,
            f"sent, not wanted: {sorted(sent - wanted)[:20]}; "
            f"wanted, not sent: {sorted(wanted - sent)[:20]}",
        )
        return f"{len(sent)} files in the context"

    def no_layer_holds_the_ca_bundle(self):
        """The CA bundle given as a build secret (marked with a line no other file holds) is in
        no layer of the image: it was mounted per step, never copied."""
        expect(self.ca_marker, "no --ca-marker: the build was not given a marked CA bundle")
        marker = self.ca_marker.encode()
        holding = {path for _, path, content in layer_files(self.image) if marker in content}
        expect(not holding, f"the CA bundle is in a layer: {sorted(holding)}")
        history = docker("history", "--no-trunc", self.image, check=True).stdout
        expect(self.ca_marker not in history, "the CA bundle is in the image's history")
        return "no layer or history entry holds it"

    # -- rebuilds ---------------------------------------------------------------------------------
    def rebuild(self, *extra, timeout=1200) -> subprocess.CompletedProcess:
        """`docker build` of the same context with the same options (and `extra`)."""
        expect(self.context, "no --context: the rebuild cases need the build context")
        return subprocess.run(
            [
                DOCKER,
                "build",
                "-f",
                str(Path(self.context) / "Dockerfile.gpu"),
                *self.build_options,
                *extra,
                "--progress=plain",
                str(self.context),
            ],
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def code_change_keeps_the_dependency_layers(self):
        """After a change to the package's code, torch and the locked dependencies come from
        the build cache: only the package's wheel and what follows are built again."""
        source = Path(self.context) / "job" / "__init__.py"
        original = source.read_text()
        tag = f"stem-job-rebuilt:{uuid.uuid4().hex[:8]}"
        try:
            # a change no earlier run made, so no cache holds its layers
            source.write_text(original + f"\n# a code change {uuid.uuid4().hex} (image test)\n")
            built = self.rebuild("-t", tag)
        finally:
            source.write_text(original)
            docker("rmi", "-f", tag)
        expect(built.returncode == 0, f"rebuild: {built.stderr[-1500:]}")
        steps = build_steps(built.stderr)

        def step(needle):
            found = [cached for text, cached in steps if needle in text]
            expect(len(found) == 1, f"{len(found)} build steps with {needle!r}")
            return found[0]

        expect(step("--index-url") and step("--require-hashes"), "torch or the lock rebuilt")
        expect(not step("pip wheel"), "the package's wheel came from the cache")
        return f"{sum(cached for _, cached in steps)} of {len(steps)} steps from the cache"

    def lock_hash_mismatch_fails_the_build(self):
        """A requirements.lock whose hashes for one package do not match what the index serves
        fails the build: the image installs nothing unverified from the lock."""
        lock = Path(self.context) / "requirements.lock"
        original = lock.read_text()
        first = re.search(r"^\S+==\S+ \\\n(?:\s+--hash=sha256:[0-9a-f]{64}.*\n)+", original, re.M)
        forged = re.sub(
            r"sha256:[0-9a-f]{64}",
            lambda _: "sha256:" + hashlib.sha256(uuid.uuid4().bytes).hexdigest(),
            first.group(0),
        )
        try:
            lock.write_text(original.replace(first.group(0), forged, 1))
            built = self.rebuild("--target", "builder")
        finally:
            lock.write_text(original)
        expect(built.returncode != 0, "the build installed a lock with a wrong hash")
        expect("DO NOT MATCH THE HASHES" in built.stderr, built.stderr[-1500:])
        return f"{first.group(0).split()[0]}: refused by pip"

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

    def pod_drains_in_container(self, pubsub, gcs):
        """The GKE path: the container as k8s/overlays/cpu's pod runs it (its ConfigMap with
        the operator's values filled in, its securityContext, scratch emptyDir, memory limit and
        args) drains one message: stems and manifest in GCS, the result published, the message
        acked."""
        data, spec, container = rendered_pod(REPO / "k8s" / "overlays" / "cpu")
        subscription, tail, standins = self.publish(pubsub, gcs, "track.flac", "r3", "t3")
        env = {
            **data,
            "GCP_PROJECT_ID": PROJECT,  # what the operator's values overlay puts in
            "GCS_BUCKET": BUCKET,
            "PUBSUB_SUBSCRIPTION": standins["PUBSUB_SUBSCRIPTION"],
            "PUBSUB_RESULTS_TOPIC": standins["PUBSUB_RESULTS_TOPIC"],
            **pubsub.env,  # where Workload Identity would send the clients: the stand-ins
            **gcs.env,
        }
        scratch = self.work / f"pod-{uuid.uuid4().hex[:8]}"
        scratch.mkdir()
        done = docker(
            "run",
            "--rm",
            "--network",
            "host",
            *pod_options(spec, container, scratch),
            *env_args(env),
            self.image,
            *container["args"],
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
        return f"{' '.join(container['args'])} as uid {spec['securityContext']['runAsUser']}: " + (
            "6 stems + manifest in GCS, result published, message acked"
        )

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
    def compose(self, *files, **env):
        """A function running docker-compose on compose.yaml (and `files`) as its own project."""
        project = f"stemtest{uuid.uuid4().hex[:6]}"
        env = {**os.environ, "STEM_JOB_IMAGE": self.image, **env}
        command = [COMPOSE, "-p", project, "-f", str(REPO / "compose.yaml")]
        command += [item for path in files for item in ("-f", str(path))]

        def run(*args, timeout=180):
            return subprocess.run(
                [*command, *args], capture_output=True, text=True, env=env, timeout=timeout
            )

        return run

    def compose_serve(self):
        """`docker compose up`: serve answers on the host's loopback only, stems in the volume."""
        port = free_port()
        run = self.compose(STEM_JOB_PORT=str(port))
        try:
            up = run("up", "-d", "--no-build")
            expect(up.returncode == 0, f"up: {up.stderr[-1500:]}")
            published = run("port", "serve", "8000").stdout.strip()
            expect(published == f"127.0.0.1:{port}", f"published on {published!r}")
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

    def compose_pubsub_profile(self, pubsub, gcs):
        """The `pubsub` profile's sample and worker services as compose.yaml has them, against
        this host's stand-ins (the profile's own stand-in services come from registries): sample
        creates what production has and publishes a track, worker drains it."""
        suffix = uuid.uuid4().hex[:6]
        results = ensure_topic(pubsub.publisher, PROJECT, "stem-results")
        tail = ensure_subscription(pubsub.subscriber, PROJECT, f"tail-compose-{suffix}", results)
        hosts = {"PUBSUB_EMULATOR_HOST": pubsub.host, "STORAGE_EMULATOR_HOST": gcs.url}
        override = self.work / f"compose.stand-ins-{suffix}.yaml"
        override.write_text(
            json.dumps(
                {
                    "version": "3.9",
                    "services": {
                        name: {"network_mode": "host", "environment": hosts}
                        for name in ("sample", "worker")
                    },
                }
            )
        )
        run = self.compose(override)
        try:
            sample = run("--profile", "pubsub", "run", "--rm", "--no-deps", "sample", timeout=300)
            expect(sample.returncode == 0, f"sample: {sample.stderr[-1500:]}")
            message = last_json(sample.stdout)
            up = run("--profile", "pubsub", "up", "-d", "--no-deps", "--no-build", "worker")
            expect(up.returncode == 0, f"worker: {up.stderr[-1500:]}")
            result = self.pull_one(pubsub, tail, within_s=240)
            logs = run("logs", "--no-color", "worker").stdout[-1500:]
            expect(result is not None, f"no result from the worker: {logs}")
            body = json.loads(result.data)
            expect(body["trackId"] == message["trackId"] and body["status"] == "completed", body)
            prefix = f"stems/{message['releaseId']}/{message['trackId']}/"
            names = {b.name for b in gcs.client(PROJECT).list_blobs(BUCKET, prefix=prefix)}
            expected = {f"{prefix}{stem}.mp3" for stem in STEMS} | {prefix + "manifest.json"}
            expect(expected <= names, f"objects: {sorted(names)}")
            return f"sample published {message['jobId']}; worker: 6 stems + manifest, result"
        finally:
            down = run("--profile", "pubsub", "down", "-v", "--remove-orphans")
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
    argv = sys.argv[1:]
    build_options = argv[argv.index("--") + 1 :] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("image")
    parser.add_argument("--size-budget-mb", type=float, required=True)
    parser.add_argument("--compose", action="store_true", help="also test compose.yaml")
    parser.add_argument("--context", help="the folder the image was built from")
    parser.add_argument("--ca-marker", help="a line only the build's CA bundle secret holds")
    args = parser.parse_args(argv)
    size_mb = (
        int(docker("image", "inspect", "-f", "{{.Size}}", args.image, check=True).stdout) / 1e6
    )
    work = Path(tempfile.mkdtemp(prefix="stem-image-test."))
    work.chmod(0o755)
    try:
        test = ImageTest(args.image, work, args.context, build_options, args.ca_marker)
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
        test.case("entrypoint, user, env, tcmalloc", test.entrypoint_user_and_env)
        test.case("installed packages are the locks'", test.packages_are_the_locks)
        test.case("no build tools or build leftovers", test.no_build_tools_or_leftovers)
        test.case("no layer holds the build's CA bundle", test.no_layer_holds_the_ca_bundle)
        test.case(
            ".dockerignore: the context is what the build copies",
            (test.build_context_is_what_the_build_copies),
        )
        test.case("docker run, env vars + mounted folder", test.env_vars_and_mounted_folder)
        test.case("docker run, JOB_MESSAGE (base64)", test.job_message_base64)
        test.case("docker run --read-only --tmpfs /tmp", test.read_only_root)
        test.case("docker run --user 4242:4242", test.arbitrary_user)
        test.case("docker run --network none", test.no_network)
        test.case("bad input: exit 65, failed result", test.bad_input)
        test.case(
            "the model is read-only to the job (writable root)", test.model_is_read_only_to_the_job
        )
        test.case(
            "the decoding child is fenced (default seccomp, --read-only, uid 4242:0)",
            test.decoding_child_is_fenced,
        )
        test.case("--help and prefetch-model as the image user", test.help_and_prefetch)
        standin_cases = [
            ("drain as the k8s pod runs it (stand-ins)", test.pod_drains_in_container),
            ("docker stop -t 10 during a separation", test.stop_during_separation),
        ]
        if args.compose:
            standin_cases.append(
                ("compose --profile pubsub: sample, worker", test.compose_pubsub_profile)
            )
        test.with_standins(standin_cases)
        if args.compose:
            test.case("compose: up, POST a file, stems back, down", test.compose_serve)
        test.case(
            "a code change rebuilds only the package",
            (test.code_change_keeps_the_dependency_layers),
        )
        test.case(
            "a lock hash that does not match fails the build",
            (test.lock_hash_mismatch_fails_the_build),
        )
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
