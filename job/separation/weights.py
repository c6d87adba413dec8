"""Which files hold a model's weights, and their digest: what a set records to say which weights
made it, and what the skip check compares (a changed weight file redoes a set).

The files are found the way demucs' `get_model` finds them, without loading the model (the skip
check runs before it loads, often without torch): in MODEL_DIR, `NAME.yaml` and the `SIG.th`
(or `SIG-CHECKSUM.th`) files it lists, or `NAME.th` alone (demucs' LocalRepo and BagOnlyRepo);
from the hub, `NAME.yaml` and its `SIG.safetensors` files in the HuggingFace cache (demucs/hf.py).
The digest covers the bag's definition too: its weights and segment change what a set holds.
"""

import hashlib
from pathlib import Path

from job.manifest import sha256_of

HF_NAMESPACE = "adefossez"  # demucs.hf.DEFAULT_NAMESPACE


def hf_repo(name: str) -> tuple[str, str]:
    """(repository id, model name) on the hub for a demucs model name: demucs.hf's naming rule
    (`htdemucs_ft` -> adefossez/HTDemucs-ft, `mdx_extra` -> adefossez/Demucs-mdx_extra), kept
    here so that finding the files does not import torch (tests compare it with demucs')."""
    name, namespace = name.removeprefix("hf://"), HF_NAMESPACE
    if "/" in name:
        namespace, name = name.split("/", 1)
    if name == "htdemucs":
        repo = "HTDemucs"
    elif name.startswith("htdemucs_"):
        repo = "HTDemucs-" + name[len("htdemucs_") :]
    else:
        repo = "Demucs-" + name
    return f"{namespace}/{repo}", name


def signatures(bag: Path) -> list:
    """The model signatures a bag's yaml lists."""
    import yaml

    with open(bag) as handle:
        try:
            loaded = yaml.safe_load(handle)
        except yaml.YAMLError as exc:
            raise ValueError(f"{bag.name} is not YAML: {exc}") from None
    models = loaded.get("models") if isinstance(loaded, dict) else None
    if not isinstance(models, list):
        raise ValueError(f"{bag.name} lists no models")
    return [str(sig) for sig in models]


def folder_files(name: str, folder: Path) -> list | None:
    """The files `get_model(name, repo=folder)` reads, in order; None when it would not find
    the model there."""
    if not folder.is_dir():
        return None
    models = {}
    for file in folder.iterdir():
        if file.suffix == ".th":
            models[file.stem.rsplit("-", 1)[0] if "-" in file.stem else file.stem] = file
    if name in models:
        return [models[name]]
    bag = folder / f"{name}.yaml"
    if not bag.is_file():
        return None
    sigs = signatures(bag)
    if not all(sig in models for sig in sigs):
        return None
    return [bag] + [models[sig] for sig in sigs]


def hub_files(name: str) -> list | None:
    """The files `get_model(name)` reads from the HuggingFace cache, in order; None when they
    are not all cached (the model then loads, downloading them, and they are looked up again)."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    repo, name = hf_repo(name)

    def cached(filename):
        found = try_to_load_from_cache(repo, filename)
        return Path(found) if isinstance(found, str) else None

    bag = cached(f"{name}.yaml")
    if bag is None:
        return None
    files = [bag] + [cached(f"{sig}.safetensors") for sig in signatures(bag)]
    return None if None in files else files


def find(name: str, model_dir: str = "") -> list | None:
    """The model's files: in MODEL_DIR when set, else in the hub cache; None when not found."""
    return folder_files(name, Path(model_dir)) if model_dir else hub_files(name)


def describe(files) -> dict:
    """{"digest": "sha256:HEX", "files": [{"file", "bytes", "sha256"}]}: each file by name and
    content, and one digest over that list (the order is the bag's)."""
    listed = [
        {"file": Path(file).name, "bytes": Path(file).stat().st_size, "sha256": sha256_of(file)}
        for file in files
    ]
    lines = "".join(f"{entry['file']} {entry['sha256']}\n" for entry in listed)
    return {"digest": "sha256:" + hashlib.sha256(lines.encode()).hexdigest(), "files": listed}
