"""What KubeRay accepts, for tests: a RayCluster or RayJob checked against the CRD schema of the KubeRay
release cluster/README.md names (vendored in tests/data/kuberay), with unknown fields refused as the API
server's strict field validation (kubectl's default) refuses them, and against the rules of KubeRay's
`ray-operator/controllers/ray/utils/validation.go` that a schema cannot express (the operator applies them
before it acts on an object: an object that breaks one is never reconciled).

Each rule below names the Go function it follows. Spec fields whose rules depend on feature gates or
subsystems these manifests do not use (GCS fault tolerance, autoscaling, deletion strategies, TLS, network
policies, the history server) are refused as unchecked, so that a manifest adopting one gets its rules
added here first.
"""

from __future__ import annotations

import gzip
import re
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema
import yaml

KUBERAY_VERSION = "v1.7.0"
CRDS = {
    "RayCluster": Path(__file__).parent / "data" / "kuberay" / "ray.io_rayclusters.yaml.gz",
    "RayJob": Path(__file__).parent / "data" / "kuberay" / "ray.io_rayjobs.yaml.gz",
}
API_VERSION = "ray.io/v1"
# ray-operator/controllers/ray/utils/constant.go
MAX_RAY_CLUSTER_NAME_LENGTH = 53
MAX_RAY_JOB_NAME_LENGTH = MAX_RAY_CLUSTER_NAME_LENGTH - 6
CLUSTER_SELECTOR_KEY = "ray.io/cluster"
FT_ENABLED_ANNOTATION = "ray.io/ft-enabled"
AUTOSCALER_V2_ENV = "RAY_enable_autoscaler_v2"
UNCHECKED_CLUSTER_FIELDS = (
    "gcsFaultToleranceOptions",
    "autoscalerOptions",
    "historyServerOptions",
    "networkPolicy",
    "tlsOptions",
)
UNCHECKED_JOB_FIELDS = ("deletionStrategy",)
INT_RANGES = {"int32": (-(2**31), 2**31 - 1), "int64": (-(2**63), 2**63 - 1)}


class Rejected(ValueError):
    """KubeRay would refuse the object; the message is the rule's and names the Go function."""


def problems(doc: dict[str, Any]) -> list[str]:
    """Everything KubeRay's CRD schema and validation rules refuse in `doc` (empty: accepted)."""
    found = schema_problems(doc)
    try:
        rules_of(doc)
    except Rejected as err:
        found.append(str(err))
    return found


def schema_problems(doc: dict[str, Any]) -> list[str]:
    kind = doc.get("kind")
    if kind not in CRDS or doc.get("apiVersion") != API_VERSION:
        return [f"not a KubeRay {API_VERSION} RayCluster or RayJob: {doc.get('apiVersion')} {kind}"]
    validator = _validator(kind)
    return [
        f"{kind} {doc.get('metadata', {}).get('name')}: {'.'.join(map(str, err.absolute_path)) or '<root>'}: "
        f"{err.message}"
        for err in sorted(validator.iter_errors(doc), key=lambda err: list(map(str, err.absolute_path)))
    ]


def rules_of(doc: dict[str, Any]) -> None:
    """Raises Rejected with the first rule `doc` breaks, in the operator's order."""
    metadata, spec = doc.get("metadata", {}), doc.get("spec", {})
    if doc["kind"] == "RayCluster":
        validate_ray_cluster_metadata(metadata)
        validate_ray_cluster_spec(spec, metadata.get("annotations", {}))
    else:
        validate_ray_job_metadata(metadata)
        validate_ray_job_spec(spec, metadata.get("annotations", {}))


# --- the CRD schema ---------------------------------------------------------------------------------------


@cache
def _validator(kind: str) -> jsonschema.protocols.Validator:
    with gzip.open(CRDS[kind], "rb") as handle:
        crd = yaml.load(handle, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    (version,) = (v for v in crd["spec"]["versions"] if v["name"] == API_VERSION.split("/")[1])
    schema = _strict(version["schema"]["openAPIV3Schema"])
    checker = jsonschema.FormatChecker()
    for name, (low, high) in INT_RANGES.items():
        checker.checks(name)(
            lambda value, low=low, high=high: not isinstance(value, int) or low <= value <= high
        )
    validator_class = jsonschema.validators.extend(
        jsonschema.Draft4Validator,  # OpenAPI 3.0's schema keywords are JSON Schema draft 4's
        {"x-kubernetes-validations": _cel_rules, "x-kubernetes-list-type": _list_type},
    )
    return validator_class(schema, format_checker=checker)


def _strict(schema: dict[str, Any]) -> dict[str, Any]:
    """OpenAPI v3 as Kubernetes reads it, in JSON Schema terms: an object's fields are the ones it lists
    (unless it preserves unknown fields), `nullable` admits null."""
    schema = dict(schema)
    for key in ("properties", "patternProperties"):
        if key in schema:
            schema[key] = {name: _strict(sub) for name, sub in schema[key].items()}
    for key in ("items", "additionalProperties", "not"):
        if isinstance(schema.get(key), dict):
            schema[key] = _strict(schema[key])
    for key in ("allOf", "anyOf", "oneOf"):
        if key in schema:
            schema[key] = [_strict(sub) for sub in schema[key]]
    if (
        "properties" in schema
        and "additionalProperties" not in schema
        and not schema.get("x-kubernetes-preserve-unknown-fields")
    ):
        schema["additionalProperties"] = False
    if schema.get("nullable") and "type" in schema:
        schema["type"] = [schema["type"], "null"]
    return schema


def _cel_rules(validator, rules, instance, schema):
    """CEL rules: `self == oldSelf` only concerns updates (immutability); any other one is not evaluated
    here, so an object that reaches it is refused rather than waved through."""
    for rule in rules:
        if rule["rule"] != "self == oldSelf":
            yield jsonschema.ValidationError(f"CEL rule not checked by tests/kuberay.py: {rule['rule']}")


def _list_type(validator, list_type, instance, schema):
    """`map` lists are keyed by x-kubernetes-list-map-keys and `set` lists hold distinct items."""
    if not isinstance(instance, list):
        return
    if list_type == "map":
        keys = [
            tuple(item.get(key) for key in schema.get("x-kubernetes-list-map-keys", [])) for item in instance
        ]
    elif list_type == "set":
        keys = [repr(item) for item in instance]
    else:
        return
    duplicates = sorted({str(key) for key in keys if keys.count(key) > 1})
    if duplicates:
        yield jsonschema.ValidationError(f"duplicate entries in a list of type {list_type}: {duplicates}")


# --- validation.go ----------------------------------------------------------------------------------------

DNS1035_LABEL = re.compile(r"[a-z]([-a-z0-9]*[a-z0-9])?")
DNS1123_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
QUALIFIED_NAME = re.compile(r"([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]")
LABEL_VALUE = re.compile(r"(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?")


def validate_ray_cluster_metadata(metadata: dict[str, Any]) -> None:
    """ValidateRayClusterMetadata."""
    _name_rule("RayCluster", metadata.get("name", ""), MAX_RAY_CLUSTER_NAME_LENGTH)


def validate_ray_job_metadata(metadata: dict[str, Any]) -> None:
    """ValidateRayJobMetadata."""
    _name_rule("RayJob", metadata.get("name", ""), MAX_RAY_JOB_NAME_LENGTH)


def _name_rule(kind: str, name: str, longest: int) -> None:
    if len(name) > longest:
        raise Rejected(f"Validate{kind}Metadata: {kind} name should be no more than {longest} characters")
    if len(name) > 63 or not DNS1035_LABEL.fullmatch(name):
        raise Rejected(f"Validate{kind}Metadata: {kind} name should be a valid DNS1035 label: {name!r}")


def validate_ray_cluster_spec(spec: dict[str, Any], annotations: dict[str, str]) -> None:
    """ValidateRayClusterSpec."""
    where = "ValidateRayClusterSpec"
    for field in UNCHECKED_CLUSTER_FIELDS:
        if field in spec:
            raise Rejected(f"{where}: spec.{field} has rules that tests/kuberay.py does not check yet")
    if spec.get("enableInTreeAutoscaling"):
        raise Rejected(f"{where}: the autoscaling rules are not checked by tests/kuberay.py yet")
    head = spec["headGroupSpec"]
    head_containers = head["template"]["spec"].get("containers", [])
    if not head_containers:
        raise Rejected(f"{where}: headGroupSpec should have at least one container")
    validate_ray_group_resources("Head", head.get("rayStartParams", {}), head.get("resources", {}))
    validate_ray_group_labels("Head", head.get("rayStartParams", {}), head.get("labels", {}))
    for group in spec.get("workerGroupSpecs", []):
        name = group["groupName"]
        if not group["template"]["spec"].get("containers"):
            raise Rejected(f"{where}: workerGroupSpec should have at least one container")
        low, high = group.get("minReplicas"), group.get("maxReplicas")
        if low is None or high is None:  # autoscaling is off (refused above otherwise)
            raise Rejected(f"{where}: worker group {name} must set both minReplicas and maxReplicas")
        if low < 0 or high < 0:
            raise Rejected(f"{where}: worker group {name} has negative minReplicas or maxReplicas")
        if low > high:
            raise Rejected(
                f"{where}: worker group {name} has minReplicas {low} greater than maxReplicas {high}"
            )
        validate_ray_group_resources(name, group.get("rayStartParams", {}), group.get("resources", {}))
        validate_ray_group_labels(name, group.get("rayStartParams", {}), group.get("labels", {}))
        if "idleTimeoutSeconds" in group:  # validateWorkerGroupIdleTimeout: autoscaler v2 only
            raise Rejected(f"{where}: worker group {name}: idleTimeoutSeconds needs autoscaler v2")
        if group.get("priority"):  # validateWorkerGroupPriority: autoscaler v2 only
            raise Rejected(f"{where}: worker group {name}: priority needs autoscaler v2")
    head_env = {env["name"]: env.get("value") for env in head_containers[0].get("env", [])}
    if annotations.get(FT_ENABLED_ANNOTATION, "").lower() != "true" and "RAY_REDIS_ADDRESS" in head_env:
        raise Rejected(f"{where}: RAY_REDIS_ADDRESS implicitly enables GCS fault tolerance")
    if head.get("rayStartParams", {}).get("redis-username") or "REDIS_USERNAME" in head_env:
        raise Rejected(f"{where}: cannot set redis username in rayStartParams or environment variables")
    if head_env.get(AUTOSCALER_V2_ENV) in ("1", "true"):
        raise Rejected(f"{where}: {AUTOSCALER_V2_ENV} cannot be set when enableInTreeAutoscaling is false")
    auth = spec.get("authOptions", {})
    if auth.get("enableK8sTokenAuth"):
        raise Rejected(f"{where}: authOptions.enableK8sTokenAuth is not checked by tests/kuberay.py yet")
    if auth.get("mode") == "token" and _version(spec.get("rayVersion", "")) < (2, 52, 0):
        raise Rejected(f"{where}: authOptions.mode is 'token' but minimum Ray version is 2.52.0")


def validate_ray_group_resources(group: str, ray_start_params: dict[str, str], resources: dict) -> None:
    """validateRayGroupResources: resources in rayStartParams or in the group's `resources`, not both."""
    in_params = any(ray_start_params.get(key) for key in ("num-cpus", "num-gpus", "memory", "resources"))
    if in_params and resources:
        raise Rejected(
            f"validateRayGroupResources: resource fields should not be set in both rayStartParams and "
            f"Resources for {group} group"
        )


def validate_ray_group_labels(group: str, ray_start_params: dict[str, str], labels: dict[str, str]) -> None:
    """validateRayGroupLabels: no rayStartParams['labels']; label keys and values in Kubernetes syntax."""
    if "labels" in ray_start_params:
        raise Rejected(f"validateRayGroupLabels: rayStartParams['labels'] is not supported for {group} group")
    for key, value in labels.items():
        prefix, _, name = key.rpartition("/")
        if not QUALIFIED_NAME.fullmatch(name) or len(name) > 63 or (prefix and not _dns_subdomain(prefix)):
            raise Rejected(f"validateRayGroupLabels: invalid label key for {group} group: {key!r}")
        if len(value) > 63 or not LABEL_VALUE.fullmatch(value):
            raise Rejected(f"validateRayGroupLabels: invalid label value for key {key!r} in {group} group")


def validate_ray_job_spec(spec: dict[str, Any], annotations: dict[str, str]) -> None:
    """ValidateRayJobSpec."""
    where = "ValidateRayJobSpec"
    for field in UNCHECKED_JOB_FIELDS:
        if field in spec:
            raise Rejected(f"{where}: spec.{field} has rules that tests/kuberay.py does not check yet")
    shutdown = spec.get("shutdownAfterJobFinishes", False)
    if spec.get("suspend") and not shutdown:
        raise Rejected(
            f"{where}: a RayJob with shutdownAfterJobFinishes set to false is not allowed to be suspended"
        )
    ttl = spec.get("ttlSecondsAfterFinished", 0)
    if ttl < 0:
        raise Rejected(f"{where}: TTLSecondsAfterFinished must be a non-negative integer")
    if not shutdown and ttl > 0:  # validateDeletionConfiguration
        raise Rejected(
            f"{where}: a RayJob with shutdownAfterJobFinishes set to false cannot have TTLSecondsAfterFinished"
        )
    selector = spec.get("clusterSelector", {})
    mode = spec.get("submissionMode", "K8sJobMode")
    backoff = spec.get("backoffLimit")
    if spec.get("suspend") and selector:
        raise Rejected(f"{where}: the ClusterSelector mode doesn't support the suspend operation")
    if "rayClusterSpec" not in spec and not selector:
        raise Rejected(f"{where}: one of RayClusterSpec or ClusterSelector must be set")
    if selector:
        if not selector.get(CLUSTER_SELECTOR_KEY):
            raise Rejected(f"{where}: cluster name in ClusterSelector should not be empty")
        if mode == "SidecarMode":
            raise Rejected(f"{where}: ClusterSelector is not supported in SidecarMode")
        if backoff is not None and backoff > 0:
            raise Rejected(f"{where}: BackoffLimit is incompatible with ClusterSelector mode")
    if mode == "InteractiveMode" and backoff is not None and backoff > 0:
        raise Rejected(f"{where}: BackoffLimit is incompatible with InteractiveMode")
    if mode == "SidecarMode":
        if "submitterPodTemplate" in spec or "submitterConfig" in spec:
            raise Rejected(f"{where}: SidecarMode doesn't support SubmitterPodTemplate or SubmitterConfig")
        restart = spec["rayClusterSpec"]["headGroupSpec"]["template"]["spec"].get("restartPolicy", "")
        if restart not in ("", "Never"):
            raise Rejected(
                f"{where}: restartPolicy for head Pod should be Never or unset when using SidecarMode"
            )
    if "rayClusterSpec" in spec:
        if spec["rayClusterSpec"].get("authOptions", {}).get("enableK8sTokenAuth"):
            raise Rejected(f"{where}: K8s token auth mode is currently not supported for RayJob")
        try:
            validate_ray_cluster_spec(spec["rayClusterSpec"], annotations)
        except Rejected as err:
            raise Rejected(f"{where}: {err}") from None
    try:
        yaml.safe_load(spec.get("runtimeEnvYAML", ""))
    except yaml.YAMLError as err:
        raise Rejected(f"{where}: runtimeEnvYAML is not YAML: {err}") from None
    for field in ("activeDeadlineSeconds", "preRunningDeadlineSeconds"):
        if field in spec and spec[field] <= 0:
            raise Rejected(f"{where}: {field} must be a positive integer")
    if backoff is not None and backoff < 0:
        raise Rejected(f"{where}: backoffLimit must be a positive integer")


def _dns_subdomain(text: str) -> bool:
    return len(text) <= 253 and all(DNS1123_LABEL.fullmatch(part) for part in text.split("."))


def _version(text: str) -> tuple[int, ...]:
    numbers = re.match(r"v?(\d+)\.(\d+)(?:\.(\d+))?", text)
    return tuple(int(n or 0) for n in numbers.groups()) if numbers else (0, 0, 0)
