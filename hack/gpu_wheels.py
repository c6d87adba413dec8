"""hack/gpu-wheels: the wheels a lent GPU machine lacks, for hack/gpu-run to install there.

Such a machine has its own python3 (3.12) with a CUDA build of torch and many packages, and
reaches no registry, so what stem-job needs beyond them travels with the working tree, which
may be 64 MiB in all. This downloads into .whl/ (git-ignored) the cp312 manylinux wheels of
stem-job's runtime dependencies that the machine does not hold, at the versions this checkout's
.venv runs (the GPU then runs what the tests here ran), and fails when they do not fit.
torch, its own dependencies and numpy stay the machine's: its torch is built against them.
`--python-version 3.11` fetches the same set for this machine's python (the dry run).
"""

import argparse
import importlib.metadata as metadata
import re
import shutil
import subprocess
import sys
from pathlib import Path

from packaging.requirements import Requirement

REPO = Path(__file__).resolve().parents[1]
BUDGET_MIB = 64
# the GPU machine's python3 holds these (its image's package list, read 2026-11-17): used as is
PRESENT = """absl-py accelerate aiofiles anyio attrs certifi charset-normalizer click cloudpickle
filelock fsspec h11 hf-xet httpcore httpx huggingface-hub idna jinja2 markupsafe mpmath networkx
numpy packaging pluggy psutil pytest pyyaml requests safetensors setuptools six sympy tqdm einops
typing-extensions urllib3 torch triton""".split()
# serving HTTP (`stem-job serve`) and demucs' own file API (demucs.api, sphn) are not part of
# what hack/gpu_check.py runs
UNUSED = """fastapi starlette uvicorn pydantic pydantic-core python-multipart annotated-doc
annotated-types typing-inspection sphn""".split()
PLATFORMS = [
    "manylinux_2_28_x86_64",
    "manylinux_2_27_x86_64",
    "manylinux_2_17_x86_64",
    "manylinux2014_x86_64",
    "manylinux1_x86_64",
]


def normal(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def closure(root: str, skip: set) -> dict:
    """{name: version} of `root`'s runtime dependencies as installed here (no extras), leaving
    out `skip` and what only they need (the machine's own copies bring their own needs)."""
    found = {}

    def walk(name):
        key = normal(name)
        if key in found or key in skip:
            return
        try:
            found[key] = metadata.distribution(name).version
        except metadata.PackageNotFoundError:
            found[key] = None
            return
        for text in metadata.distribution(name).requires or []:
            requirement = Requirement(text)
            if requirement.marker is None or requirement.marker.evaluate({"extra": ""}):
                walk(requirement.name)

    walk(root)
    found.pop(normal(root))
    return found


def tree_bytes() -> int:
    """What travels besides the wheels: tracked and untracked-not-ignored files."""
    names = subprocess.run(
        ["git", "ls-files", "-z", "-co", "--exclude-standard"],
        cwd=REPO,
        capture_output=True,
        check=True,
    ).stdout.split(b"\0")
    paths = [REPO / name.decode() for name in names if name]
    return sum(path.stat().st_size for path in paths if path.is_file())


def main():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--python-version", default="3.12")
    parser.add_argument("--dest", type=Path, default=REPO / ".whl")
    args = parser.parse_args()
    skip = {normal(n) for n in PRESENT + UNUSED}
    wanted = closure("stem-job", skip)
    missing = sorted(n for n, v in wanted.items() if v is None)
    if missing:
        sys.exit(f"not installed in this environment: {', '.join(missing)} (run hack/install)")
    shutil.rmtree(args.dest, ignore_errors=True)
    args.dest.mkdir(parents=True)
    platforms = [arg for p in PLATFORMS for arg in ("--platform", p)]
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "download",
            "-q",
            "--no-deps",
            "--only-binary=:all:",
            "--python-version",
            args.python_version,
            "--implementation",
            "cp",
            *platforms,
            "-d",
            str(args.dest),
            *[f"{n}=={v}" for n, v in sorted(wanted.items())],
        ],
        check=True,
    )
    wheels = sorted(args.dest.glob("*.whl"))
    size = sum(w.stat().st_size for w in wheels)
    total = size + tree_bytes()
    for wheel in wheels:
        print(f"{wheel.stat().st_size / 2**20:7.2f} MiB  {wheel.name}")
    print(
        f"{len(wheels)} wheels, {size / 2**20:.1f} MiB; with the working tree "
        f"{total / 2**20:.1f} MiB of {BUDGET_MIB}"
    )
    if total > BUDGET_MIB * 2**20:
        sys.exit("over the budget of what may travel")


if __name__ == "__main__":
    main()
