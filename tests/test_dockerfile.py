"""Dockerfile.gpu, checked without a Docker engine.

What can be checked by reading: torch comes from a wheel index at requirements-torch.txt's pin
and the rest from requirements.lock, hashes checked; the ENTRYPOINT is the console script
pyproject.toml declares and the venv holding it is on PATH; the final stage inherits no build
tools; torch's CUDA build matches the base image and stays on CUDA 12 (the L4 driver is 535,
CUDA 12.2); the model is fetched at build time and the runtime is offline; the user is not root;
dependency layers come before the source; builds need no frontend image and take a proxy's CA
bundle only as a build secret; the model is baked from the hub or from a folder. Whether
`prefetch-model` caches into the folder the runtime reads is tested with the model code, against
a local hub cache; the built image itself is run by hack/image-test (CI), which needs a Docker
engine."""

import json
import re
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCKERFILE = REPO / "Dockerfile.gpu"
DOCS = REPO / "docs" / "deployment.md"


def instructions(text: str) -> list:
    """[(INSTRUCTION, arguments)] with continuation lines joined and comments dropped."""
    result, current = [], ""
    for line in text.splitlines():
        stripped = line.strip()
        if not current and (not stripped or stripped.startswith("#")):
            continue
        if current and stripped.startswith("#"):
            continue  # a comment inside a continued instruction
        if stripped.endswith("\\"):
            current += stripped[:-1] + " "
            continue
        current += stripped
        keyword, _, args = current.partition(" ")
        result.append((keyword.upper(), args.strip()))
        current = ""
    return result


def stages(text: str) -> list:
    """[{"name", "from", "steps": [(INSTRUCTION, args)]}] in order."""
    found = []
    for keyword, args in instructions(text):
        if keyword == "FROM":
            parts = args.split()
            name = parts[2] if len(parts) >= 3 and parts[1].upper() == "AS" else None
            found.append({"name": name, "from": parts[0], "steps": []})
        elif found:
            found[-1]["steps"].append((keyword, args))
    return found


def shell_commands(args: str) -> list:
    """The commands of a RUN (after --mount options), split on &&."""
    while args.startswith("--"):
        args = args.split(" ", 1)[1]
    return [command.strip() for command in args.split("&&")]


def normalize(command: str) -> str:
    """Layer-only pip options dropped, whitespace collapsed: the command a person types."""
    command = re.sub(r"\s--no-cache-dir\b", "", command)
    return re.sub(r"\s+", " ", command).strip()


def arg_defaults(text: str) -> dict:
    defaults = {}
    for keyword, args in instructions(text):
        if keyword == "ARG" and "=" in args:
            key, value = args.split("=", 1)
            defaults[key] = value
    return defaults


@pytest.fixture(scope="module")
def dockerfile() -> str:
    return DOCKERFILE.read_text()


@pytest.fixture(scope="module")
def pyproject() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())


def final(dockerfile):
    return stages(dockerfile)[-1]


def named(dockerfile, name):
    return next(s for s in stages(dockerfile) if s["name"] == name)


def global_defaults(text: str) -> dict:
    """ARG defaults declared before the first FROM (the ones FROM lines may use)."""
    return arg_defaults(text.split("\nFROM ", 1)[0])


def lineage(dockerfile, stage):
    """The stage and every stage it is built FROM (global ARGs at their defaults), nearest first."""
    by_name = {s["name"]: s for s in stages(dockerfile) if s["name"]}
    defaults = global_defaults(dockerfile)
    chain = [stage]
    while True:
        parent = re.sub(r"\$\{(\w+)\}", lambda m: defaults.get(m.group(1), ""), chain[-1]["from"])
        if parent not in by_name:
            return chain
        chain.append(by_name[parent])


def run_commands(stage) -> list:
    return [
        command
        for keyword, args in stage["steps"]
        if keyword == "RUN"
        for command in shell_commands(args)
    ]


def test_dependencies_come_from_the_lock_and_torch_from_its_index(dockerfile):
    """The image installs what hack/install installs: torch at requirements-torch.txt's pin
    from a wheel index, everything else from requirements.lock with hashes and no resolution
    (tests/test_lock.py checks the lock itself; hack/image-test builds and runs the image)."""
    builder = named(dockerfile, "builder")
    commands = [normalize(c) for c in run_commands(builder)]
    torch_step = next(c for c in commands if "--index-url" in c)
    assert "requirements-torch.txt" in " ".join(commands) and '"$spec"' in torch_step
    assert "pip install --require-hashes --no-deps -r requirements.lock" in commands
    assert any(c.startswith("pip wheel --no-deps") and c.endswith(" .") for c in commands)
    assert any(
        c.startswith("pip install --no-deps /wheels/")
        for c in map(normalize, run_commands(named(dockerfile, "runtime")))
    )
    assert any(
        c.startswith("stem-job prefetch-model")
        for stage in stages(dockerfile)
        for c in run_commands(stage)
    )
    docs = normalize(DOCS.read_text())
    # Both image variants' build commands are documented.
    defaults = arg_defaults(dockerfile)
    assert "docker build -f Dockerfile.gpu" in docs
    assert "--build-arg BASE_IMAGE=ubuntu:24.04" in docs
    assert "--build-arg TORCH_INDEX=https://download.pytorch.org/whl/cpu" in docs
    assert f"TORCH_INDEX={defaults['TORCH_INDEX']}" in docs


def test_entrypoint_is_the_console_script_on_path(dockerfile, pyproject):
    last = final(dockerfile)
    entry = [args for keyword, args in last["steps"] if keyword == "ENTRYPOINT"]
    assert len(entry) == 1
    argv = json.loads(entry[0])  # exec form: a JSON list
    assert argv == ["stem-job"] and argv[0] in pyproject["project"]["scripts"]
    venv = [
        c.split()[-1]
        for s in stages(dockerfile)
        for c in run_commands(s)
        if c.startswith("python3 -m venv")
    ]
    assert venv == ["/opt/venv"]
    envs = " ".join(args for s in lineage(dockerfile, last) for k, args in s["steps"] if k == "ENV")
    assert re.search(r"PATH=/opt/venv/bin:", envs), "the venv's bin must lead PATH"
    copies = [
        args for s in lineage(dockerfile, last) for keyword, args in s["steps"] if keyword == "COPY"
    ]
    assert any(re.match(r"--from=builder /opt/venv /opt/venv$", c) for c in copies)


def test_final_stage_has_no_build_tools(dockerfile):
    chain = lineage(dockerfile, final(dockerfile))
    assert [s["name"] for s in chain][1:] == ["model-hub", "runtime", "base"]
    runtime = set()
    for stage in chain:
        for keyword, args in stage["steps"]:
            if keyword != "RUN":
                continue
            # the package name chosen in the step itself (tcmalloc was renamed in Ubuntu 24.04)
            chosen = set(re.findall(r"\w+=(libtcmalloc-minimal4(?:t64)?)\b", args))
            for command in shell_commands(args):
                if re.search(r"apt-get \S* ?install", command):
                    words = command.split(" install ", 1)[1].split()
                    runtime |= {w for w in words if not w.startswith("-") and "$" not in w}
                    runtime |= chosen if any("$" in w for w in words) else set()
    assert runtime == {
        "python3",
        "ca-certificates",
        "libtcmalloc-minimal4",
        "libtcmalloc-minimal4t64",
    }, f"runtime packages: {runtime}"
    envs = " ".join(args for s in chain for k, args in s["steps"] if k == "ENV")
    assert "LD_PRELOAD=libtcmalloc_minimal.so.4" in envs, "the job runs under tcmalloc"
    for stage in chain[:-1]:
        for command in run_commands(stage):
            assert not re.search(r"\b(gcc|g\+\+|make|build-essential|python3-dev|git)\b", command)


def test_cuda_build_matches_the_base_and_the_l4_driver(dockerfile):
    defaults = arg_defaults(dockerfile)
    base = re.match(r"nvidia/cuda:(\d+)\.(\d+)\.\d+-base-ubuntu(\d+\.\d+)$", defaults["BASE_IMAGE"])
    assert base, defaults["BASE_IMAGE"]
    index = re.match(r"https://download\.pytorch\.org/whl/cu(\d\d)(\d)$", defaults["TORCH_INDEX"])
    assert index, defaults["TORCH_INDEX"]
    assert base.group(1) == index.group(1) == "12", "driver 535 runs CUDA 12.x, not 13"
    assert base.group(2) == index.group(2)
    # The CPU variant swaps in the same Ubuntu release, so the venv's python3 is the same.
    docs = DOCS.read_text()
    assert f"BASE_IMAGE=ubuntu:{base.group(3)}" in docs
    envs = " ".join(args for k, args in named(dockerfile, "runtime")["steps"] if k == "ENV")
    assert "NVIDIA_DISABLE_REQUIRE=1" in envs, "12.8 image on a 12.2 driver"


def test_model_is_baked_at_build_time_and_runs_offline(dockerfile):
    """From the hub by default, or from a model folder in the build context (MODEL_SOURCE)."""
    assert global_defaults(dockerfile)["MODEL_SOURCE"] == "hub"
    last = final(dockerfile)
    assert last["from"] == "model-${MODEL_SOURCE}"
    assert [k for k, _ in last["steps"]] == ["ENV", "ENTRYPOINT"]
    assert last["steps"][0][1] == "HF_HUB_OFFLINE=1"
    runtime = named(dockerfile, "runtime")
    keywords = [k for k, _ in runtime["steps"]]
    user = next(args for k, args in runtime["steps"] if k == "USER")
    # Non-root, numeric (so Kubernetes' runAsNonRoot can verify it), before the model is baked
    # so the cache belongs to the user that reads it.
    assert re.match(r"^[1-9]\d*:[1-9]\d*$", user) and keywords[-2:] == ["USER", "WORKDIR"]
    hf_home = re.search(
        r"HF_HOME=(\S+)", " ".join(a for k, a in runtime["steps"] if k == "ENV")
    ).group(1)
    created = " ".join(run_commands(runtime))
    assert f"mkdir -p {hf_home}" in created and "chown stem:stem " + hf_home in created
    for source in ("hub", "folder"):
        stage = named(dockerfile, f"model-{source}")
        assert stage["from"] == "runtime"
        assert run_commands(stage)[-1] == "stem-job prefetch-model", "the build checks it loads"
    folder = named(dockerfile, "model-folder")["steps"]
    copy = next(args for k, args in folder if k == "COPY")
    assert re.match(r"--chown=10001:10001 \$\{MODEL_FOLDER\}/ (\S+)/$", copy)
    assert ("ENV", "MODEL_DIR=" + copy.split()[-1].rstrip("/")) in folder


def test_builds_need_no_registry_but_the_base_and_keep_the_ca_out(dockerfile):
    """No `# syntax=` frontend to pull; the CA bundle only as a per-step secret mount."""
    assert not re.search(r"^#\s*syntax=", dockerfile, re.MULTILINE | re.IGNORECASE)
    for stage in stages(dockerfile):
        for keyword, args in stage["steps"]:
            assert not (
                keyword in ("COPY", "ADD", "ENV", "ARG") and re.search(r"ca_bundle|CERT", args)
            )
            if keyword != "RUN":
                continue
            online = re.search(
                r"apt-get \S* ?update|pip (install|wheel) --no-cache-dir (?!--no-deps)"
                r"|stem-job prefetch-model",
                args,
            )
            if online and "MODEL_DIR" not in " ".join(a for k, a in stage["steps"] if k == "ENV"):
                assert re.match(
                    r"--mount=type=secret,id=ca_bundle\S* --mount=type=bind,"
                    r"source=hack/docker-build-env,target=/build-env +\. /build-env ",
                    args,
                ), args
    helper = (REPO / "hack" / "docker-build-env").read_text()
    assert "/run/secrets/ca_bundle" in helper and "Acquire::https::CAInfo" in helper


def test_layers_change_least_often_first(dockerfile, pyproject):
    builder = named(dockerfile, "builder")
    order = []
    for keyword, args in builder["steps"]:
        if keyword == "RUN" and "--index-url" in args:
            order.append("torch")
        elif keyword == "COPY" and args.split()[0] == "requirements.lock":
            order.append("lock")
        elif keyword == "RUN" and "-r requirements.lock" in args:
            order.append("dependencies")
        elif keyword == "COPY" and args.split()[0] in ("job", "pyproject.toml", "README.md"):
            order.append("source")
    assert order[:3] == ["torch", "lock", "dependencies"] and set(order[3:]) == {"source"}
    # Exactly what pyproject.toml packages goes into the image, beside the two pins.
    copied = {args.split()[0] for keyword, args in builder["steps"] if keyword == "COPY"}
    assert copied == {
        "wheel[s]",
        "requirements-torch.txt",
        "requirements.lock",
        "pyproject.toml",
        pyproject["project"]["readme"],
        *pyproject["tool"]["setuptools"]["packages"]["find"]["include"],
    } - {"job.*"}


def pattern_regex(pattern: str) -> str:
    """A .dockerignore pattern (Go filepath.Match plus **) as a regular expression."""
    out, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif pattern[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif pattern[i] == "?":
            out, i = out + "[^/]", i + 1
        else:
            out, i = out + re.escape(pattern[i]), i + 1
    return out


def ignored(path: str, patterns: list) -> bool:
    """Docker's rule: the last pattern matching the path or one of its parent folders wins;
    a leading ! re-includes."""
    parts = path.split("/")
    candidates = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
    result = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        regex = pattern_regex(pattern.lstrip("!").strip("/"))
        if any(re.fullmatch(regex, candidate) for candidate in candidates):
            result = not negate
    return result


def test_dockerignore_keeps_the_context_to_what_the_build_copies():
    lines = (REPO / ".dockerignore").read_text().splitlines()
    patterns = [line.strip() for line in lines if line.strip() and not line.startswith("#")]
    for kept in (
        "pyproject.toml",
        "requirements.lock",
        "requirements-torch.txt",
        "README.md",
        "job/cli.py",
        "job/dispatcher.py",
        "hack/docker-build-env",
        "wheels/torch-2.13.0-cp311.whl",
        "model/htdemucs_6s.yaml",
    ):
        assert not ignored(kept, patterns), kept
    for dropped in (
        ".git/HEAD",
        ".venv/bin/python",
        "tests/test_dockerfile.py",
        "k8s/base/x",
        "docs/deployment.md",
        "job/__pycache__/cli.cpython-311.pyc",
        "outputs/a.mp3",
        "hack/test",
        "compose.yaml",
    ):
        assert ignored(dropped, patterns), dropped


def test_compose_serves_by_default_and_has_the_pubsub_profile_and_gpu_overlay():
    """compose.yaml as a reader runs it (hack/image-test brings `serve` up for real)."""
    import yaml

    compose = yaml.safe_load((REPO / "compose.yaml").read_text())
    services = compose["services"]
    default = [name for name, s in services.items() if not s.get("profiles")]
    assert default == ["serve"]
    serve = services["serve"]
    assert serve["command"] == ["serve"] and serve["environment"]["STORAGE_MODE"] == "local"
    [port] = serve["ports"]  # as Compose reads it with nothing set: the defaults
    host, published, target = re.sub(r"\$\{\w+:-([^}]*)\}", r"\1", port).split(":")
    assert host == "127.0.0.1", "published on every interface of the host"
    assert (published, target) == ("8000", "8000")
    assert "outputs:/outputs" in serve["volumes"] and "outputs" in compose["volumes"]
    assert serve["build"]["dockerfile"] == "Dockerfile.gpu"
    profiled = {name for name, s in services.items() if s.get("profiles") == ["pubsub"]}
    assert profiled == {"pubsub", "gcs", "sample", "worker"}
    assert services["worker"]["command"][0] == "drain"
    assert services["sample"]["entrypoint"][-1] == "/hack/compose-sample"
    assert (REPO / "hack" / "compose-sample").exists()
    gpu = yaml.safe_load((REPO / "compose.gpu.yaml").read_text())["services"]
    for name in ("serve", "worker"):
        device = gpu[name]["deploy"]["resources"]["reservations"]["devices"][0]
        assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]
