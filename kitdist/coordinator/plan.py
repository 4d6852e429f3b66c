"""From a PipelineSpec to the exact jobs it will run, checked before anything is submitted.

Every stage's run config is loaded with `kitdist.config.load_config` (file + overrides) and given the
pipeline's run name, storage root and datasets as typed values; its datasets' manifests are read, the
fine-tunes' model must have the pre-trained model's parameter shapes, and the storage must take writes.
Any problem is one `PlanError` naming the stage and the key, file or URL.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from kitdist import checkpoints, storage
from kitdist.config import ConfigError, ModelConfig, RunConfig, config_file, load_config
from kitdist.config_loader import as_overrides, replace_values
from kitdist.coordinator.jobs import JobSpec
from kitdist.coordinator.spec import EvalSet, PipelineSpec, Resources, TaskSpec
from kitdist.launch import with_absolute_paths
from kitdist.preflight import check_fine_tune_data, first_difference, model_shapes, weights_shapes
from kitdist.shards.manifest import ManifestError, read_manifest_of_kind
from kitdist.storage import absolute

PRETRAIN = "pretrain"
SHARD_KEYS = ("train_shards", "val_shards")  # a stage's data named in the pipeline file


class PlanError(ValueError):
    """A pipeline that cannot run; the message names the stage and what is wrong."""


@dataclass(frozen=True)
class TrainPlan:
    """A training stage: its resolved config and the arguments that reproduce it in a job."""

    stage: str
    module: str  # kitdist.pretrain or kitdist.finetune
    config_path: str
    overrides: list[str]  # everything after --config, init_weights excepted (known only later)
    cfg: RunConfig
    resources: Resources

    @property
    def run_url(self) -> str:
        return checkpoints.run_url(self.cfg)

    def job(self, init_weights: str = "") -> JobSpec:
        extra = as_overrides({"train.init_weights": absolute(init_weights)}) if init_weights else []
        argv = ["python", "-m", self.module, "--config", self.config_path, *self.overrides, *extra]
        return JobSpec(argv, self.resources)


@dataclass(frozen=True)
class EvalPlan:
    """Evaluating one fine-tuned model on one of its task's test sets."""

    stage: str  # evaluate/<task stage>[/<benchmark>]
    task: TaskSpec
    test_shards: str
    out: str  # folder URL; the evaluator writes results.json there
    resources: Resources
    benchmark: str = ""  # the protocol it is measured with (kitdist.benchmarks)

    def job(self, weights: str) -> JobSpec:
        argv = ["python", "-m", "kitdist.evaluate", "--weights", absolute(weights)]
        argv += ["--shards", self.test_shards, "--out", self.out]
        argv += ["--benchmark", self.benchmark] if self.benchmark else []
        return JobSpec([*argv, *self.task.eval_args], self.resources)


@dataclass(frozen=True)
class Plan:
    spec: PipelineSpec
    pretrain: TrainPlan | None  # None: the fine-tunes start from spec.pretrain.weights
    finetunes: dict[str, TrainPlan]  # by task stage name
    evaluations: dict[str, EvalPlan]

    def stage_kinds(self) -> dict[str, str]:
        kinds = {PRETRAIN: "pretrain"} if self.pretrain else {}
        kinds |= {f"finetune/{name}": "finetune" for name in self.finetunes}
        return kinds | {f"evaluate/{name}": "evaluate" for name in self.evaluations}


def make_plan(spec: PipelineSpec) -> Plan:
    """Checks the whole pipeline and returns its jobs; raises PlanError before anything runs."""
    pretrain = None
    if spec.pretrain.config:
        pretrain = _train_plan(spec, PRETRAIN, "kitdist.pretrain", spec.pretrain, fine_tune=False)
        reference, source = model_shapes(pretrain.cfg.model), f"pretrain ({spec.pretrain.config})"
    else:
        reference, source = _weights_shapes(spec.pretrain.weights), spec.pretrain.weights
    finetunes, evaluations = {}, {}
    for task in spec.finetune:
        plan = _train_plan(spec, task.stage, "kitdist.finetune", task, fine_tune=True)
        _check_same_model(task.stage, model_shapes(plan.cfg.model), reference, source, plan.cfg.model)
        finetunes[task.stage] = plan
        for name, test in task.test_sets().items():
            evaluations[name] = _eval_plan(spec, task, name, test)
    storage_folders = {spec.state} | {p.run_url for p in [pretrain, *finetunes.values()] if p}
    for folder in sorted(storage_folders):
        _check(f"storage {folder}", storage.check_writable, folder)
    return Plan(spec, pretrain, finetunes, evaluations)


def _train_plan(spec: PipelineSpec, stage: str, module: str, part, fine_tune: bool) -> TrainPlan:
    label = f"stage {stage}"
    run_name = {"storage.run_name": f"{spec.name}-{stage.replace('_', '-')}"}
    given = {"storage.root": spec.storage_root} | {f"data.{k}": getattr(part, k) for k in SHARD_KEYS}
    try:
        config_path = os.path.abspath(config_file(part.config))  # a shipped config's name too
        cfg = load_config(config_path, part.overrides)
        cfg = with_absolute_paths(replace_values(cfg, run_name | {k: v for k, v in given.items() if v}))
    except ConfigError as err:
        raise PlanError(f"{label}: {err}") from None
    if fine_tune:
        _check(f"{label}: {config_path}", check_fine_tune_data, cfg)
    if not cfg.data.train_shards:
        raise PlanError(f"{label}: data.train_shards: missing dataset URL (in {part.config} or train_shards)")
    for key in ("train_shards", "val_shards"):
        if getattr(cfg.data, key):
            _check(label, read_manifest_of_kind, getattr(cfg.data, key), cfg.data.kind, f"data.{key}")
    # Absolute local paths on the command line: the job does not run in this working directory.
    pinned = {"data.train_shards": cfg.data.train_shards, "storage.root": cfg.storage.root}
    pinned |= {"data.val_shards": cfg.data.val_shards} if cfg.data.val_shards else {}
    overrides = [*part.overrides, *as_overrides(run_name | pinned)]
    return TrainPlan(stage, module, config_path, overrides, cfg, part.resources)


def _eval_plan(spec: PipelineSpec, task: TaskSpec, name: str, test: EvalSet) -> EvalPlan:
    test_shards = absolute(test.shards)
    key = f"tests[{test.benchmark}].shards" if task.tests else "test_shards"
    _check(f"stage {task.stage}", read_manifest_of_kind, test_shards, "paired", key)
    out = storage.join(absolute(spec.state), "eval", name)
    return EvalPlan(f"evaluate/{name}", task, test_shards, out, task.eval_resources, test.benchmark)


def _check(label: str, fn, *args):
    try:
        return fn(*args)
    except (ManifestError, storage.StorageError, FileNotFoundError, ConfigError) as err:
        raise PlanError(f"{label}: {err}") from None


def _weights_shapes(url: str) -> dict[str, tuple[int, ...]]:
    """Tensor shapes of the weights at `url` (a file, a checkpoint or a run folder) from their header."""
    try:
        return weights_shapes(checkpoints.weights_url(absolute(url)))
    except (OSError, ConfigError) as err:  # each names the URL
        raise PlanError(f"pretrain.weights: {err}") from None


def _check_same_model(stage, shapes, reference, source: str, cfg: ModelConfig) -> None:
    name = first_difference(shapes, reference)
    if name is None:
        return
    raise PlanError(
        f"stage {stage}: model (size {cfg.size!r}) does not match the pre-trained model of {source}: "
        f"parameter {name} is {shapes.get(name, 'absent')} here, {reference.get(name, 'absent')} there; "
        "set model.* in the fine-tune config to the pre-trained model's"
    )
