"""A training command run again under a run name that already has checkpoints: what changed since the
latest checkpoint (its `config.yaml` against the config now), whether the run may continue under it, and
starting fresh under the same name.

`storage.on_existing` says what the user wants:
- `resume` (the default): continue from the latest checkpoint; a changed setting outside SAFE_TO_CHANGE
  (the model, the data, the degradations, the optimisation...: anything that makes the continued run
  another run) is refused before any worker starts, naming the keys;
- `resume_with_changes`: continue under whatever changed;
- `restart`: the old run folder is moved aside to `<run_name>.replaced-<UTC time>` and a new run starts.
Every case prints the differences (`key: old -> new`).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import yaml

from kitdist import storage
from kitdist.checkpoints import CONFIG, latest_checkpoint, run_url, step_of
from kitdist.config import ConfigError, RunConfig, to_dict

# Settings a resumed run may change and still be the same run (the rest of the schema may not). Each says
# why: it changes how much is trained or recorded, where and on what the same computation runs, or
# how it is split (resume is elastic: weights and Adam moments are world-size and engine independent, the
# data position is re-split over other workers, and the global batch stays the recipe's).
SAFE_TO_CHANGE = {
    "train.max_steps": "how far to train (the cosine schedule then ends at the new step)",
    "train.log_every": "logging cadence",
    "train.val_every": "validation cadence",
    "train.checkpoint_every": "checkpoint cadence",
    "train.keep_checkpoints": "how many checkpoints are kept",
    "train.report_to": "where metrics go",
    "train.wandb_project": "where metrics go",
    "train.metrics_flush_s": "how often metrics reach the run folder",
    "train.max_micro_batch": "memory: the micro-batch (the global batch stays)",
    "train.memory_budget_gb": "memory: the micro-batch (the global batch stays)",
    "train.grad_accum_steps": "memory: the micro-batch (the global batch stays)",
    "train.compile": "the same model, compiled",
    "train.fused_optimizer": "the same AdamW, another kernel",
    "model.attention_impl": "the same attention, another kernel (auto picks by device anyway)",
    "model.checkpoint_activations": "memory: recomputed activations, the same values",
    "model.fused_layernorm": "the same LayerNorm, another kernel",
    "data.num_workers": "data loader processes: the unread samples re-split over them",
    "data.read_retries": "reading: how failed reads are retried",
    "data.read_retry_max_wait_s": "reading: how failed reads are retried",
    "data.prefetch_bytes": "reading: request size and read-ahead",
}
SAFE_SECTIONS = {
    "dist": "workers, engine, ZeRO stage and cluster: the resume is elastic",
    "storage": "where the run lives (the same run folder)",
}
# Values the launcher resolves before the workers save the config: the saved value is the resolved one
# (dist.cpus_per_worker=0: the cluster's even share), so the unresolved value is no change.
RESOLVED_AT_LAUNCH = {"dist.cpus_per_worker": 0}
REPLACED = ".replaced-"  # a restarted run's old folder: <run_name>.replaced-<UTC time>


@dataclass(frozen=True)
class Rerun:
    """A run name met again: its folder, its latest complete checkpoint (if any) and what changed since."""

    run: str
    checkpoint: str | None
    changes: dict[str, tuple[Any, Any]]  # dotted key -> (the checkpoint's value, the value now)

    @property
    def step(self) -> int:
        return step_of(self.checkpoint) if self.checkpoint else 0

    @property
    def refused(self) -> list[str]:
        refused = [key for key in self.changes if not is_safe_to_change(key)]
        if "train.warmup_steps" in refused and "train.max_steps" in self.changes:
            steps, warmup = self.changes["train.max_steps"], self.changes["train.warmup_steps"]
            if same_warmup_asked(steps, warmup):
                refused.remove("train.warmup_steps")
        return refused


def is_safe_to_change(key: str) -> bool:
    return key in SAFE_TO_CHANGE or key.split(".", 1)[0] in SAFE_SECTIONS


def same_warmup_asked(max_steps: tuple[int, int], warmup: tuple[int, int]) -> bool:
    """Whether one train.warmup_steps gives both saved values, shortened to each train.max_steps as
    TrainConfig shortens it: then only max_steps changed (a shorter warm-up of a short first attempt)."""
    (old_max, new_max), (old_warmup, new_warmup) = max_steps, warmup
    asked = old_warmup if old_warmup < old_max else new_warmup if new_warmup < new_max else max(max_steps)
    return (min(asked, old_max), min(asked, new_max)) == warmup


def find_rerun(cfg: RunConfig) -> Rerun | None:
    """The run folder as `cfg` finds it (cfg with absolute paths, as the workers save it); None when the
    run name is new (no folder, or an empty one)."""
    run = run_url(cfg)
    if not storage.list_names(run):
        return None
    checkpoint = latest_checkpoint(run)
    if checkpoint is None:
        return Rerun(run, None, {})
    saved = storage.join(checkpoint, CONFIG)
    try:
        before = yaml.safe_load(storage.read_text(saved))
    except FileNotFoundError:
        raise ConfigError(
            f"{saved}: the checkpoint has no {CONFIG} to compare this run's config with"
        ) from None
    return Rerun(run, checkpoint, differences(before, to_dict(cfg)))


def differences(before: dict[str, Any], now: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """The dotted keys whose values differ, in the schema's order. A key the old config lacks (a setting
    added to kitdist since) counts as its default then."""
    old = _flat(to_dict(RunConfig())) | _flat(before)
    return {
        key: (old.get(key), value)
        for key, value in _flat(now).items()
        if old.get(key) != value and RESOLVED_AT_LAUNCH.get(key, object()) != value
    }


def _flat(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for name, value in tree.items():
        if isinstance(value, dict):
            flat |= _flat(value, f"{prefix}{name}.")
        else:
            flat[f"{prefix}{name}"] = value
    return flat


def check_rerun(cfg: RunConfig) -> Rerun | None:
    """`find_rerun`, and ConfigError naming the changed keys that storage.on_existing=resume refuses."""
    found = find_rerun(cfg)
    if found is None or cfg.storage.on_existing != "resume" or not found.refused:
        return found
    changed = ", ".join(f"{key} ({_shown(found.changes[key])})" for key in found.refused)
    raise ConfigError(
        f"storage.run_name={cfg.storage.run_name}: resuming {found.checkpoint} would change {changed}, which "
        "makes it another run; set storage.on_existing=resume_with_changes to continue under the changes, "
        "storage.on_existing=restart to start afresh under this name (the old run is moved aside), or "
        "another storage.run_name",
        key=found.refused[0],
    )


def describe(cfg: RunConfig, found: Rerun | None) -> str:
    """What a launch does with the run name: new, resumed (with the changes), or restarted."""
    name = cfg.storage.run_name
    if found is None:
        return f"run {name}: new"
    lines = [f"  {key}: {_shown(change)}" for key, change in found.changes.items()]
    if cfg.storage.on_existing == "restart":
        head = f"run {name}: restarting (storage.on_existing=restart): the old run moves to {name}{REPLACED}<UTC time>"
        lines = []
    elif found.checkpoint is None:
        head = f"run {name}: no complete checkpoint yet, starting from step 0"
        lines = []
    elif found.changes:
        head = f"run {name}: resuming from step {found.step}, with changed settings (checkpoint -> now):"
    else:
        head = f"run {name}: resuming from step {found.step}, settings unchanged"
    return "\n".join([head, *lines])


def _shown(change: tuple[Any, Any]) -> str:
    def one(value: Any) -> str:
        return yaml.safe_dump(value, default_flow_style=True, width=2**31).strip().removesuffix("...").strip()

    return f"{one(change[0])} -> {one(change[1])}"


def replaced_name(run: str, now: float | None = None) -> str:
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(now))
    return f"{run.rstrip('/')}{REPLACED}{stamp}"


def proceed(cfg: RunConfig, found: Rerun | None, announce: Callable[[str], None]) -> None:
    """Says what the launch does with the run name; storage.on_existing=restart moves the old run aside."""
    announce(describe(cfg, found))
    if found is not None and cfg.storage.on_existing == "restart":
        target = replaced_name(found.run)
        storage.move(found.run, target)
        announce(f"the old run is now {target}")
