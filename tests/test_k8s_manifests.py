"""The k8s/ kustomizations render, are schema-valid, and say what the design needs.

No cluster here, so "right" is checked as far as offline tools allow: every kustomization
renders with `kubectl kustomize`; every core object validates strictly against the Kubernetes
OpenAPI schemas (kubernetes-validate), the ScaledJob's Job template included; every KEDA object
validates against KEDA's own CRD schemas (tests/data/keda-crds, unknown fields refused);
and the values the job's contract depends on (exit codes, command, identity, env) are checked
against the code that defines them. What an operator deploys is rendered too, as the docs have
them do it (a copy of overlays/example, their values in it, the components after them): its
ConfigMap goes through the job's own settings parser and every Google resource it names is
checked against Google's naming rules. hack/image-test runs the image with the rendered pod's
settings (securityContext, scratch volume, memory limit, ConfigMap, args).
"""

import functools
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml

from job import errors, messages
from job import pcm as audio
from job.config import ENV, load_settings
from job.intake import CANCELLED_FETCH_WAIT_S

REPO = Path(__file__).resolve().parents[1]
K8S = REPO / "k8s"
KEDA_CRDS = REPO / "tests" / "data" / "keda-crds"  # vendored: SOURCE.txt there
# podFailurePolicy is GA from 1.31: the oldest version we claim, and the newest we can check.
K8S_VERSIONS = ("1.31", kubernetes_validate.latest_version())

KUSTOMIZATIONS = sorted(
    path.parent
    for path in K8S.rglob("kustomization.yaml")
    if yaml.safe_load(path.read_text()).get("kind", "Kustomization") == "Kustomization"
)
COMPONENTS = sorted(path.parent for path in (K8S / "components").glob("*/kustomization.yaml"))
EXAMPLE = K8S / "overlays" / "example"  # what an operator copies and fills in
GPU_VARIANTS = {"base", "spot", "gcp-pubsub", "batch", "example"}


def render(directory: Path) -> list:
    kubectl = shutil.which("kubectl")
    assert kubectl, "kubectl (with its built-in kustomize) is needed to render k8s/"
    out = subprocess.run(
        [kubectl, "kustomize", str(directory)], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, f"kubectl kustomize {directory} failed:\n{out.stderr}"
    return [doc for doc in yaml.safe_load_all(out.stdout) if doc]


@functools.cache
def rendered(directory: Path) -> tuple:
    return tuple(render(directory))


def name_of(directory: Path) -> str:
    return directory.name


def quantity(text: str) -> int:
    """A Kubernetes memory/storage quantity in bytes (the suffixes the manifests use)."""
    number, suffix = re.fullmatch(r"(\d+)([KMGT]i?)?", text).groups()
    if not suffix:
        return int(number)
    scale = 1024 if suffix.endswith("i") else 1000
    return int(number) * scale ** ("KMGT".index(suffix[0]) + 1)


def scratch_bytes(settings) -> float:
    """Disk a job needs for the longest track its settings admit: the original, the decoded
    float32 mix and the six encoded stems (job/intake.py and job/pipeline.py write all three to
    scratch)."""
    seconds = settings.max_duration_s
    mix = seconds * audio.SAMPLE_RATE * audio.CHANNELS * 4
    per_stem = {
        "mp3": settings.mp3_bitrate * 1000 / 8,
        "wav": audio.SAMPLE_RATE * audio.CHANNELS * 4,
        "flac": audio.SAMPLE_RATE * audio.CHANNELS * 3,
    }[settings.output_format]
    return settings.max_input_bytes + mix + seconds * len(messages.STEMS) * per_stem


def copy_of_example(folder: Path, components) -> Path:
    """The operator's copy of overlays/example (docs/deployment.md), with components enabled."""
    copy = folder / "mine"
    shutil.copytree(EXAMPLE, copy)
    kustomization = yaml.safe_load((copy / "kustomization.yaml").read_text())
    kustomization["resources"] = [os.path.relpath(K8S / "base", copy)]
    kustomization["components"] = components(copy)
    (copy / "kustomization.yaml").write_text(yaml.safe_dump(kustomization))
    return copy


# The components each tracked variant stands for; "all" is every component at once.
VARIANT_COMPONENTS = {
    "base": [],
    "example": [],
    "spot": ["spot"],
    "gcp-pubsub": ["gcp-pubsub"],
    "cpu": ["cpu"],
    "batch": ["batch"],
    "all": [c.name for c in COMPONENTS],
}


@functools.cache
def deployed(variant: str) -> tuple:
    """What an operator deploys for a variant, the way docs/deployment.md has them do it: a copy
    of overlays/example with its `values` (filled in there), the variant's components after
    them, rendered."""
    folder = Path(tempfile.mkdtemp(prefix="stem-k8s-"))
    try:
        copy = copy_of_example(
            folder,
            lambda copy: (
                ["values"]
                + [
                    os.path.relpath(K8S / "components" / c, copy)
                    for c in VARIANT_COMPONENTS[variant]
                ]
            ),
        )
        return tuple(render(copy))
    finally:
        shutil.rmtree(folder)


def settings_of(directory: Path):
    """The job's settings for a tracked variant as an operator deploys it."""
    return load_settings(one(deployed(name_of(directory)), "ConfigMap")["data"])


# Google's naming rules for what the manifests name (cloud.google.com: projects, service
# accounts, Artifact Registry repositories, regions).
PROJECT_RULE = r"[a-z][a-z0-9-]{4,28}[a-z0-9]"
ACCOUNT_RULE = r"[a-z][a-z0-9-]{4,28}[a-z0-9]"
REGION_RULE = r"[a-z]+-[a-z]+[0-9]+"
REPOSITORY_RULE = r"[a-z]([a-z0-9-]*[a-z0-9])?"


def google_name_problems(objects) -> list:
    """[(where, problem)] for every string in `objects` that names a Google resource (a service
    account, an Artifact Registry image, a projects/ path) and breaks Google's rules or names
    another project than the ConfigMap's GCP_PROJECT_ID, which must be a valid project ID."""
    project = one(objects, "ConfigMap")["data"]["GCP_PROJECT_ID"]
    problems, named = [], []

    def check(where, text):
        for account, owner in re.findall(r"([\w.-]+)@([\w.-]+)\.iam\.gserviceaccount\.com", text):
            named.append(where)
            if not re.fullmatch(ACCOUNT_RULE, account) or owner != project:
                problems.append((where, f"service account {account}@{owner}"))
        for region, owner, repository in re.findall(
            r"([\w-]+)-docker\.pkg\.dev/([^/\s]+)/([^/\s]+)/", text
        ):
            named.append(where)
            if not re.fullmatch(REGION_RULE, region) or owner != project:
                problems.append((where, f"image registry {region}, project {owner}"))
            if not re.fullmatch(REPOSITORY_RULE, repository):
                problems.append((where, f"repository {repository}"))
        for owner in re.findall(r"projects/([^/\s]+)/", text):
            named.append(where)
            if owner != project:
                problems.append((where, f"projects/{owner}/"))

    def walk(node, where):
        if isinstance(node, dict):
            for key, value in node.items():
                walk(value, f"{where}.{key}")
        elif isinstance(node, list):
            for index, value in enumerate(node):
                walk(value, f"{where}[{index}]")
        elif isinstance(node, str):
            check(where, node)

    if not re.fullmatch(PROJECT_RULE, project):
        problems.append(("ConfigMap.data.GCP_PROJECT_ID", f"project {project!r}"))
    for obj in objects:
        walk(obj, obj["kind"])
    kinds = {where.split(".")[0] for where in named}
    assert {"ServiceAccount", "ScaledJob"} <= kinds, f"Google names found only in {kinds}"
    return problems


def one(objects, kind):
    found = [obj for obj in objects if obj["kind"] == kind]
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]


# -- KEDA CRD schemas -----------------------------------------------------------------------------
def strict_schema(node):
    """A CRD's OpenAPI v3 schema as a JSON schema that refuses unknown fields, as the API server
    would prune them (silently dropping a misspelt field is the failure we want to catch)."""
    if isinstance(node, list):
        return [strict_schema(item) for item in node]
    if not isinstance(node, dict):
        return node
    node = {key: strict_schema(value) for key, value in node.items()}
    if node.pop("x-kubernetes-int-or-string", False):
        node.pop("type", None)
        node.setdefault("anyOf", [{"type": "integer"}, {"type": "string"}])
    if node.pop("nullable", False) and "type" in node:
        node["type"] = [node["type"], "null"]
    preserve = node.pop("x-kubernetes-preserve-unknown-fields", False)
    if "properties" in node and "additionalProperties" not in node and not preserve:
        node["additionalProperties"] = False
    return node


@functools.cache
def keda_schemas() -> dict:
    assert KEDA_CRDS.is_dir(), f"KEDA CRDs not found at {KEDA_CRDS}"
    schemas = {}
    for path in KEDA_CRDS.glob("*.yaml"):
        crd = yaml.safe_load(path.read_text())
        group, kind = crd["spec"]["group"], crd["spec"]["names"]["kind"]
        for version in crd["spec"]["versions"]:
            schema = strict_schema(version["schema"]["openAPIV3Schema"])
            schema["properties"]["metadata"] = {"type": "object"}  # ObjectMeta: checked apart
            schemas[(f"{group}/{version['name']}", kind)] = schema
    return schemas


def validate_keda(obj):
    key = (obj["apiVersion"], obj["kind"])
    assert key in keda_schemas(), f"no KEDA CRD for {key}"
    errors_ = sorted(
        jsonschema.Draft7Validator(keda_schemas()[key]).iter_errors(obj),
        key=lambda e: list(e.absolute_path),
    )
    assert not errors_, "\n".join(
        f"{obj['kind']} {'.'.join(map(str, e.absolute_path))}: {e.message}" for e in errors_
    )


def validate_core(obj):
    for version in K8S_VERSIONS:
        try:
            kubernetes_validate.validate(obj, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(
                f"{obj['kind']}/{obj['metadata'].get('name')} invalid for Kubernetes "
                f"{version}: {exc}"
            )


def scaledjob_as_job(scaled_job) -> dict:
    """The Job KEDA will create from jobTargetRef, so the Kubernetes schema checks it too."""
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": scaled_job["metadata"]["name"], "namespace": "stem-job"},
        "spec": scaled_job["spec"]["jobTargetRef"],
    }


def pod_spec(objects):
    return one(objects, "ScaledJob")["spec"]["jobTargetRef"]["template"]["spec"]


def container(objects):
    containers = pod_spec(objects)["containers"]
    assert len(containers) == 1
    return containers[0]


# -- tests ----------------------------------------------------------------------------------------
def test_the_expected_kustomizations_exist():
    names = {name_of(d) for d in KUSTOMIZATIONS}
    assert names == {"base", "spot", "gcp-pubsub", "cpu", "batch", "example"}
    assert {name_of(d) for d in COMPONENTS} == {"spot", "gcp-pubsub", "cpu", "batch"}


@pytest.mark.parametrize("directory", KUSTOMIZATIONS, ids=name_of)
def test_every_object_is_schema_valid(directory):
    objects = rendered(directory)
    kinds = sorted(obj["kind"] for obj in objects)
    assert kinds == [
        "ConfigMap",
        "Namespace",
        "ScaledJob",
        "ServiceAccount",
        "TriggerAuthentication",
    ]
    for obj in objects:
        if obj["apiVersion"].startswith("keda.sh/"):
            validate_keda(obj)
            assert re.match(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$", obj["metadata"]["name"])
        else:
            validate_core(obj)
        if obj["kind"] != "Namespace":
            assert obj["metadata"]["namespace"] == "stem-job"
    validate_core(scaledjob_as_job(one(objects, "ScaledJob")))


def test_all_components_compose(tmp_path):
    """An operator may stack components (e.g. CPU on Spot with the gcp-pubsub trigger)."""
    (tmp_path / "kustomization.yaml").write_text(
        yaml.safe_dump(
            {
                "apiVersion": "kustomize.config.k8s.io/v1beta1",
                "kind": "Kustomization",
                "resources": [os.path.relpath(K8S / "base", tmp_path)],  # kustomize wants relative
                "components": [os.path.relpath(c, tmp_path) for c in COMPONENTS],
            }
        )
    )
    objects = render(tmp_path)
    for obj in objects:
        (validate_keda if obj["apiVersion"].startswith("keda.sh/") else validate_core)(obj)
    validate_core(scaledjob_as_job(one(objects, "ScaledJob")))
    spec = pod_spec(objects)
    assert spec["nodeSelector"] == {"cloud.google.com/gke-spot": "true"}
    assert "nvidia.com/gpu" not in container(objects)["resources"]["limits"]
    [trigger] = one(objects, "ScaledJob")["spec"]["triggers"]
    batch = one(objects, "ConfigMap")["data"]["MAX_MESSAGES"]
    assert trigger["type"] == "gcp-pubsub" and trigger["metadata"]["value"] == batch != "1"
    assert container(objects)["args"] == ["drain"]


@pytest.mark.parametrize("directory", KUSTOMIZATIONS, ids=name_of)
def test_job_runs_drain_one_message_and_fails_fast_on_bad_input(directory):
    """One message per Job, the default shape; components/batch drains MAX_MESSAGES of them."""
    objects = rendered(directory)
    job = one(objects, "ScaledJob")["spec"]["jobTargetRef"]
    spec, main = pod_spec(objects), container(objects)
    assert main.get("command") is None, "the image's ENTRYPOINT is stem-job"
    if name_of(directory) == "batch":
        assert main["args"] == ["drain"], "the batch size comes from MAX_MESSAGES"
        assert settings_of(directory).max_messages > 1
    else:
        assert main["args"] == ["drain", "--max-messages", "1"]
    assert spec["restartPolicy"] == "Never", "podFailurePolicy requires restartPolicy Never"
    assert job["parallelism"] == 1 and job["completions"] == 1
    assert 0 < job["backoffLimit"] <= 3
    assert 600 <= job["activeDeadlineSeconds"] <= 6 * 3600
    # SIGTERM aborts the forward pass at once; what else it may wait for (k8s/base/scaledjob.yaml
    # lists each path): a pull for a message runs out its IDLE_TIMEOUT_S, a download running
    # ahead is waited for CANCELLED_FETCH_WAIT_S. Both end inside Spot's ~15 s; the grace period
    # outlasts them.
    waits = max(CANCELLED_FETCH_WAIT_S, settings_of(directory).idle_timeout_s)
    assert waits < 15 <= spec["terminationGracePeriodSeconds"] <= 60

    rules = job["podFailurePolicy"]["rules"]
    fail = [r for r in rules if r["action"] == "FailJob"]
    assert len(fail) == 1
    on_exit = fail[0]["onExitCodes"]
    assert on_exit["operator"] == "In" and on_exit["containerName"] == main["name"]
    assert set(on_exit["values"]) == {errors.EXIT_USAGE, errors.EXIT_BAD_INPUT, errors.EXIT_CONFIG}
    assert errors.EXIT_RETRY not in on_exit["values"] and errors.EXIT_OK not in on_exit["values"]
    ignore = [r for r in rules if r["action"] == "Ignore"]
    assert ignore == [
        {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]}
    ]
    assert job["podReplacementPolicy"] == "Failed"


@pytest.mark.parametrize("directory", KUSTOMIZATIONS, ids=name_of)
def test_identity_and_environment(directory):
    """The pod's identity and env as an operator deploys the variant: its Google service account
    (Workload Identity), a ConfigMap the job's own parser accepts, no secrets; a numeric non-root
    uid (kubelet's runAsNonRoot check needs one). hack/image-test runs the image as this pod's
    securityContext says, so that the uid, the read-only root and no capabilities work."""
    objects = deployed(name_of(directory))
    account = one(objects, "ServiceAccount")
    spec, main = pod_spec(objects), container(objects)
    assert spec["serviceAccountName"] == account["metadata"]["name"]
    project = one(objects, "ConfigMap")["data"]["GCP_PROJECT_ID"]
    assert account["metadata"]["annotations"]["iam.gke.io/gcp-service-account"].endswith(
        f"@{project}.iam.gserviceaccount.com"
    )
    assert not any("secret" in str(source).lower() for source in main.get("envFrom", []))

    config = one(objects, "ConfigMap")
    assert main["envFrom"] == [{"configMapRef": {"name": config["metadata"]["name"]}}]
    data = config["data"]
    assert set(data) <= set(ENV), f"unknown variables: {set(data) - set(ENV)}"
    settings = load_settings(data)  # raises ConfigError on any invalid value
    assert settings.processing_mode == "pubsub" and settings.storage_mode == "gcs"
    assert settings.max_messages == (5 if name_of(directory) == "batch" else 1)
    assert settings.device == ("cpu" if name_of(directory) == "cpu" else "cuda")

    context = spec["securityContext"]
    assert context["runAsNonRoot"] is True
    assert isinstance(context["runAsUser"], int) and context["runAsUser"] > 0
    assert isinstance(context["runAsGroup"], int) and context["runAsGroup"] > 0
    assert main["securityContext"]["allowPrivilegeEscalation"] is False


@pytest.mark.parametrize("directory", KUSTOMIZATIONS, ids=name_of)
def test_gpu_or_cpu_placement(directory):
    objects = rendered(directory)
    spec, main = pod_spec(objects), container(objects)
    resources = main["resources"]
    if name_of(directory) in GPU_VARIANTS:
        assert resources["limits"]["nvidia.com/gpu"] == "1"
        assert spec["nodeSelector"]["cloud.google.com/gke-accelerator"] == "nvidia-l4"
        assert main["image"].endswith(":gpu")
    else:
        assert "nvidia.com/gpu" not in resources["limits"]
        assert "nvidia.com/gpu" not in resources["requests"]
        assert "cloud.google.com/gke-accelerator" not in spec.get("nodeSelector", {})
        assert main["image"].endswith(":cpu")
    spot = name_of(directory) == "spot"
    assert (spec.get("nodeSelector", {}).get("cloud.google.com/gke-spot") == "true") == spot
    tolerations = spec.get("tolerations", [])
    assert any(t["key"] == "cloud.google.com/gke-spot" for t in tolerations) == spot
    # Guaranteed QoS: cpu and memory requests equal limits.
    for resource in ("cpu", "memory"):
        assert resources["requests"][resource] == resources["limits"][resource]
    # The scratch files live on the node's disk: the request covers the longest track allowed.
    settings = settings_of(directory)
    assert quantity(resources["requests"]["ephemeral-storage"]) >= scratch_bytes(settings)
    assert "ephemeral-storage" not in resources["limits"], "over a limit the pod is evicted"


@pytest.mark.parametrize("directory", KUSTOMIZATIONS, ids=name_of)
def test_pods_carry_no_more_rights_than_they_need(directory):
    """No Kubernetes API token, no privilege, a read-only root: the one writable place is an
    emptyDir where Python's tempfile puts the scratch files (TMPDIR, else /tmp), on the node's
    disk (a memory-backed one would count against the memory limit)."""
    objects = rendered(directory)
    spec, main = pod_spec(objects), container(objects)
    assert spec["automountServiceAccountToken"] is False
    context = main["securityContext"]
    assert context["readOnlyRootFilesystem"] is True
    assert context["allowPrivilegeEscalation"] is False
    assert context["capabilities"]["drop"] == ["ALL"]
    scratch = one(objects, "ConfigMap")["data"].get("TMPDIR", "/tmp")
    [mount] = main["volumeMounts"]
    assert mount["mountPath"] == scratch and not mount.get("readOnly")
    [volume] = spec["volumes"]
    assert volume == {"name": mount["name"], "emptyDir": {}}


# Peak RSS of one track (docs/benchmarks.md): `stem-job run`, full-size model, CPU, 1.74 GB at
# 2 minutes, flat in the length beyond that; a long track's is taken as 1.8 GB. The limits
# must hold it with room (HEADROOM), yet not reserve a node's worth for nothing (CPU: at most
# WASTE times it; on GPU nodes CUDA's host-side libraries come on top, not measured here).
TRACK_PEAK_BYTES = 1.8e9
HEADROOM, WASTE = 1.5, 4


@pytest.mark.parametrize("directory", KUSTOMIZATIONS, ids=name_of)
def test_memory_matches_what_a_track_needs(directory):
    resources = container(rendered(directory))["resources"]
    memory = quantity(resources["limits"]["memory"])
    assert memory >= HEADROOM * TRACK_PEAK_BYTES
    if name_of(directory) not in GPU_VARIANTS:
        assert memory <= WASTE * TRACK_PEAK_BYTES, "reserves far more than a track needs"


@pytest.mark.parametrize("directory", KUSTOMIZATIONS, ids=name_of)
def test_scaling_trigger_reads_the_subscription_with_workload_identity(directory):
    objects = rendered(directory)
    scaled = one(objects, "ScaledJob")["spec"]
    subscription = one(objects, "ConfigMap")["data"]["PUBSUB_SUBSCRIPTION"]
    project = one(objects, "ConfigMap")["data"]["GCP_PROJECT_ID"]
    assert scaled["scalingStrategy"]["strategy"] == "default"
    assert scaled["minReplicaCount"] == 0 and scaled["maxReplicaCount"] >= 1
    assert scaled["rollout"]["strategy"] == "gradual"
    [trigger] = scaled["triggers"]
    auth = one(objects, "TriggerAuthentication")
    assert trigger["authenticationRef"] == {"name": auth["metadata"]["name"]}
    assert auth["spec"] == {"podIdentity": {"provider": "gcp"}}, "Workload Identity, no keys"
    meta = trigger["metadata"]
    # one Job per batch of undelivered messages: the Job's batch size is the trigger's target
    batch = one(objects, "ConfigMap")["data"]["MAX_MESSAGES"]
    if name_of(directory) == "gcp-pubsub":
        assert trigger["type"] == "gcp-pubsub"
        assert meta["subscriptionName"] == f"projects/{project}/subscriptions/{subscription}"
        assert meta["value"] == batch == "1"
    else:
        assert trigger["type"] == "prometheus"
        assert meta["serverAddress"] == (
            f"https://monitoring.googleapis.com/v1/projects/{project}/location/global/prometheus"
        )
        assert "pubsub_googleapis_com:subscription_num_undelivered_messages" in meta["query"]
        assert f'subscription_id="{subscription}"' in meta["query"]
        assert meta["threshold"] == batch == ("5" if name_of(directory) == "batch" else "1")
        # GCP workload identity is the only auth the scaler may use for Google's endpoint.
        assert "authModes" not in meta


@pytest.mark.parametrize("variant", sorted(VARIANT_COMPONENTS))
def test_what_an_operator_deploys_is_valid_and_names_their_project(variant):
    """docs/deployment.md's walkthrough: copy overlays/example, put the values in `values`,
    enable the components after it, render. What comes out is schema-valid, the job accepts its
    ConfigMap, and every Google resource it names (the service account, the image's registry,
    the trigger's Monitoring endpoint or subscription) is a valid name in the operator's
    project: a placeholder left anywhere there breaks Google's rules."""
    objects = deployed(variant)
    for obj in objects:
        (validate_keda if obj["apiVersion"].startswith("keda.sh/") else validate_core)(obj)
    validate_core(scaledjob_as_job(one(objects, "ScaledJob")))
    data = one(objects, "ConfigMap")["data"]
    settings = load_settings(data)
    assert google_name_problems(objects) == []
    [trigger] = one(objects, "ScaledJob")["spec"]["triggers"]
    if trigger["type"] == "gcp-pubsub":
        assert trigger["metadata"]["subscriptionName"] == (
            f"projects/{data['GCP_PROJECT_ID']}/subscriptions/{settings.pubsub_subscription}"
        )
    image = container(objects)["image"]
    cpu = "cpu" in VARIANT_COMPONENTS[variant]
    assert image.endswith(":cpu" if cpu else ":gpu"), "components/cpu picks the :cpu tag"
    assert settings.device == ("cpu" if cpu else "cuda")


def test_the_tracked_manifests_name_no_project_until_filled_in():
    """The tracked variants keep placeholders (docs/deployment.md): what they name on Google's
    side is not a valid name of any project, so nothing deploys from them by mistake, and the
    operator's values are what make it valid (above)."""
    for directory in KUSTOMIZATIONS:
        if directory != EXAMPLE:
            assert google_name_problems(rendered(directory)), directory


def fails_to_render(copy: Path) -> bool:
    """kustomize refuses `copy`, on a field a component expects and does not find."""
    out = subprocess.run(
        [shutil.which("kubectl"), "kustomize", str(copy)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    return out.returncode != 0 and "unable to find field" in out.stderr


def test_batch_listed_after_the_gcp_pubsub_trigger_fails_to_render(tmp_path):
    """Out of order, the batch size would not reach the trigger: kustomize must refuse."""
    copy = copy_of_example(
        tmp_path,
        lambda copy: (
            ["values"]
            + [os.path.relpath(K8S / "components" / c, copy) for c in ("gcp-pubsub", "batch")]
        ),
    )
    assert fails_to_render(copy)


def test_values_listed_after_a_trigger_component_fails_to_render(tmp_path):
    """Out of order, kustomize must refuse rather than deploy a trigger with a placeholder."""
    copy = copy_of_example(
        tmp_path, lambda copy: [os.path.relpath(K8S / "components" / "gcp-pubsub", copy), "values"]
    )
    assert fails_to_render(copy)
