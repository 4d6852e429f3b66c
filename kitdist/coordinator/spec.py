"""What a pipeline is: the typed schema of PIPELINE.yaml, loaded with the same strict loader as run configs.

    name: kit-paper                  # names the runs: each stage trains under storage.run_name=<name>-<stage>
    state: s3://runs/kitdist/pipelines/kit-paper   # folder: state.json, results.md, results.json, eval/
    storage_root: s3://runs/kitdist  # storage.root of every stage ("" keeps each config's own)
    pretrain: {config: configs/pretrain/x.yaml, overrides: [...], resources: {num_cpus: 0, num_gpus: 0}}
              # or {weights: URL of a weights.safetensors}: start the fine-tunes from a named checkpoint
    finetune:
      - {task: denoise, dataset: SIDD, config: configs/finetune/sidd.yaml, test_shards: URL, benchmark: SIDD}
      - {task: derain, ..., tests: [{benchmark: Rain100H, shards: URL}, {benchmark: Test100, shards: URL}]}

A task's test set is `test_shards` (with `benchmark`, the protocol it is measured with: kitdist.benchmarks)
or several in `tests`, each evaluated by a stage of its own (evaluate/<task>/<benchmark>).

Relative paths are relative to the working directory, like every kitdist command; they are made absolute
before a job is submitted (the cluster's processes run elsewhere).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from kitdist.config import ConfigError, from_dict
from kitdist.credentials import assert_no_secrets

# The tasks of the paper's recipe; a fine-tune names one of them.
TASKS = {
    "denoise": "real-noise removal (SIDD)",
    "deblur": "motion deblurring (GoPro)",
    "derain": "rain removal (Rain13k)",
    "deblur_jpeg": "deblurring of JPEG-compressed frames (REDS)",
}


@dataclass(frozen=True, kw_only=True)
class Resources:
    """What a job's entrypoint process reserves on the cluster (Ray Train reserves its workers itself)."""

    num_cpus: float = 0.0
    num_gpus: float = 0.0

    def __post_init__(self) -> None:
        if self.num_cpus < 0 or self.num_gpus < 0:
            raise ConfigError("resources: num_cpus and num_gpus must be >= 0", key="resources")


@dataclass(frozen=True, kw_only=True)
class PretrainSpec:
    """Pre-training: a run config (+ overrides), or `weights`: a named checkpoint to start from instead."""

    config: str = ""
    overrides: list[str] = field(default_factory=list)
    train_shards: str = ""  # overrides data.train_shards when set
    val_shards: str = ""
    weights: str = ""
    resources: Resources = field(default_factory=Resources)

    def __post_init__(self) -> None:
        if bool(self.config) == bool(self.weights):
            raise ConfigError("pretrain: give either config (pre-train) or weights (a named checkpoint)")


@dataclass(frozen=True, kw_only=True)
class EvalSet:
    """One test set of a task: the benchmark it is (its protocol, kitdist.benchmarks) and its shards."""

    benchmark: str
    shards: str

    def __post_init__(self) -> None:
        if self.benchmark:
            _check_benchmark(self.benchmark, "benchmark")
        if not self.shards:
            raise ConfigError("shards: missing; the URL of the test shards", key="shards")


def _check_benchmark(name: str, key: str) -> None:
    from kitdist.benchmarks import BENCHMARKS

    if name not in BENCHMARKS:
        raise ConfigError(f"{key}: unknown benchmark {name!r}; known: {', '.join(BENCHMARKS)}", key=key)


@dataclass(frozen=True, kw_only=True)
class TaskSpec:
    """One fine-tuning task: its run config, its data, its test set and the resources of its jobs."""

    task: str
    dataset: str
    config: str
    name: str = ""  # the stage's name; default: the task
    overrides: list[str] = field(default_factory=list)
    train_shards: str = ""  # overrides data.train_shards when set
    val_shards: str = ""
    test_shards: str = ""
    benchmark: str = ""  # the protocol test_shards is measured with (kitdist.benchmarks); "" for none
    tests: list[EvalSet] = field(default_factory=list)  # several test sets instead of test_shards
    resources: Resources = field(default_factory=Resources)
    eval_resources: Resources = field(default_factory=lambda: Resources(num_cpus=1.0))
    eval_args: list[str] = field(default_factory=list)  # more arguments to `python -m kitdist.evaluate`

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            known = ", ".join(f"{name} ({what})" for name, what in TASKS.items())
            raise ConfigError(f"task: unknown task {self.task!r}; known tasks: {known}", key="task")
        if not self.dataset:
            raise ConfigError("dataset: name the dataset (it labels the results table)", key="dataset")
        if not self.test_shards and not self.tests:
            raise ConfigError(
                "test_shards: missing; the URL of the test shards to evaluate on (or `tests`: several)",
                key="test_shards",
            )
        if self.test_shards and self.tests:
            raise ConfigError("tests: give test_shards or tests, not both", key="tests")
        if self.benchmark:
            _check_benchmark(self.benchmark, "benchmark")
        if self.tests and self.benchmark:
            raise ConfigError(
                "benchmark: goes with test_shards; each of `tests` names its own", key="benchmark"
            )
        names = [test.benchmark for test in self.tests]
        if "" in names:
            raise ConfigError("tests: each test set names its benchmark", key="tests")
        if len(set(names)) < len(names):
            raise ConfigError("tests: a benchmark is listed twice", key="tests")

    def test_sets(self) -> dict[str, EvalSet]:
        """The evaluations of this task by stage name suffix: <stage> alone, or <stage>/<benchmark>."""
        if self.test_shards:
            return {self.stage: EvalSet(benchmark=self.benchmark, shards=self.test_shards)}
        return {f"{self.stage}/{test.benchmark}": test for test in self.tests}

    @property
    def stage(self) -> str:
        return self.name or self.task


@dataclass(frozen=True, kw_only=True)
class PipelineSpec:
    """A whole pipeline: pre-training, the fine-tuning fan-out, evaluation, and how failures are handled."""

    name: str
    state: str  # folder URL of the state document and the results
    pretrain: PretrainSpec
    finetune: list[TaskSpec]
    storage_root: str = ""
    demo_data: str = ""  # when set: build the demo shards there (once) before anything else
    # env vars passed to the jobs through Ray (besides AWS_ENDPOINT_URL and the region): never credentials
    forward_env: list[str] = field(default_factory=list)
    max_attempts: int = 3  # tries per job before its stage fails (jobs lost with their cluster not counted)
    backoff_s: float = 30.0  # wait before a retry, doubled per failure
    poll_s: float = 10.0
    max_concurrent_jobs: int = 0  # 0: submit all that are ready, the cluster queues them
    local_cluster_cpus: int = 0  # CPUs of a local cluster the coordinator starts (0: this machine's)

    def __post_init__(self) -> None:
        if not self.name or not all(c.isalnum() or c in "-_" for c in self.name):
            raise ConfigError(f"name: letters, digits, - and _ only, got {self.name!r}", key="name")
        if not self.state:
            raise ConfigError("state: missing; the folder URL that holds the pipeline's state", key="state")
        if not self.finetune:
            raise ConfigError("finetune: list at least one task", key="finetune")
        stages = [task.stage for task in self.finetune]
        duplicates = sorted({stage for stage in stages if stages.count(stage) > 1})
        if duplicates:
            raise ConfigError(f"finetune: two tasks named {duplicates[0]!r}; give each a distinct name")
        assert_no_secrets(dict.fromkeys(self.forward_env, ""), key="forward_env")
        if self.max_attempts < 1 or self.backoff_s < 0 or self.poll_s <= 0:
            raise ConfigError("max_attempts >= 1, backoff_s >= 0 and poll_s > 0 are required")


def load_pipeline(path: str | Path) -> PipelineSpec:
    """Reads PIPELINE.yaml into a PipelineSpec; every error names the file and the key."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: pipeline file not found")
    try:
        tree: Any = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    if isinstance(tree, dict) and isinstance(tree.get("finetune"), list):
        tree["finetune"] = [_tagged(item, index) for index, item in enumerate(tree["finetune"])]
    try:
        return from_dict(PipelineSpec, tree)
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}", key=err.key) from None
    except TypeError as err:  # a required key is missing
        raise ConfigError(f"{path}: {err}") from None


def _tagged(item: Any, index: int) -> Any:
    """Checks one fine-tune entry on its own, so that its errors name it (finetune[1].task: ...)."""
    prefix = f"finetune[{index}]"
    if not isinstance(item, dict):
        raise ConfigError(f"{prefix}: expected a mapping, got {item!r}")
    missing = [key for key in ("task", "dataset", "config") if key not in item]
    if missing:
        raise ConfigError(f"{prefix}.{missing[0]}: missing", key=f"{prefix}.{missing[0]}")
    try:
        from_dict(TaskSpec, item, f"{prefix}.")
    except ConfigError as err:
        if str(err).startswith(prefix):
            raise
        raise ConfigError(f"{prefix}.{err}", key=f"{prefix}.{err.key}") from None
    return item
