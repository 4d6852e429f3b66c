"""The one home of micro-batch arithmetic: which crop and global batch each step trains on, and how many
samples each worker runs at once (the micro-batch m) and how many times it accumulates (a) to make it.

A recipe states the global batch G, so the same recipe runs unchanged on any number of workers W:

    plans = plan_run(cfg, world_size)        # one BatchPlan per phase, decided before training
    plan = plan_at(plans, step)              # the plan of update `step` (1-based)
    plan.micro_batch, plan.grad_accum        # m and a, with W x a x m == G

- **Phases.** `data.schedule` lists `{step, crop_size, global_batch_size}` points (Restormer's progressive
  training: crops grow while the batch shrinks). A point `{step: N, ...}` applies to the updates after the
  first N (N+1, N+2, ...); the first point's step is 0 and steps increase. A value of 0 in a point keeps
  the previous phase's (the first phase's: `data.crop_size` / `data.global_batch_size`). Without a
  schedule the run is one phase of `data.crop_size` and `data.global_batch_size`.
- **The decision**, per phase: m is the largest divisor of G/W that is at most `train.max_micro_batch` (0:
  no cap) and whose memory estimate fits `train.memory_budget_gb`; a = G / (W x m). A positive
  `train.grad_accum_steps` fixes a instead (old configs mean what they meant). On resume the checkpoint's
  micro-batch is kept when the resumed step is in the checkpoint's phase and it still divides G/W and
  fits: an elastic resume from 2 workers to 1 doubles the accumulation, not the micro-batch, so each
  update reads the same micro-batches (`kitdist.data` lays out its streams by micro-batch).
- **Memory**: `train.memory_budget_gb` GiB per worker (0: none on a CPU, a share of the GPU's memory on
  CUDA) against an estimate made without a device (`kitdist.memory`, handed in as `estimate`).
- **The same draws on any world size.** Micro-batch i of rank r is stream r x a + i (the data's layout);
  the model's random draws for it are seeded by (train.seed, step, stream) (`micro_batch_seed`), so 2
  workers x 1 micro-batch and 1 worker x 2 compute the same update up to reduction order.
- **Learning rate.** The global batch is the recipe's, so nothing is rescaled by default. A schedule
  whose phases change the global batch may ask for `train.lr_scaling`: `linear` multiplies the lr of a
  phase by G / G0, `sqrt` by sqrt(G / G0), where G0 is the first phase's global batch (`lr_scale`).

Every refusal is a ConfigError naming the key, raised when the config loads or, for the memory budget,
by the driver before any worker starts (`kitdist.preflight.describe_batches`); only a budget taken from
a GPU's size (not stated) is checked on the worker, where the GPU is.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from kitdist.config_loader import ConfigError

if TYPE_CHECKING:  # type names only: kitdist.config validates with check_recipe, so this never imports it
    from kitdist.config import RunConfig

GIB = 2**30


@dataclass(frozen=True)
class Phase:
    """Updates `first`..`last` (1-based, inclusive) train on `crop_size` crops, `global_batch_size` a step.
    `crop_key` / `batch_key` name the config keys the two values came from (for error messages)."""

    first: int
    last: int
    crop_size: int
    global_batch_size: int
    crop_key: str = "data.crop_size"
    batch_key: str = "data.global_batch_size"


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes one worker needs: model states plus activations, linear in the micro-batch."""

    model_state: int  # weights, gradients and Adam moments, after ZeRO sharding
    fixed_activations: int  # kept for backward whatever the micro-batch (e.g. weights cast to bf16)
    per_sample: int  # kept for backward per sample (plus the recomputed block with checkpointing)

    def total(self, micro_batch: int) -> int:
        return self.model_state + self.fixed_activations + micro_batch * self.per_sample


@dataclass(frozen=True)
class BatchPlan:
    """The decision for one phase on `world_size` workers: world_size x grad_accum x micro_batch == G."""

    phase: Phase
    world_size: int
    micro_batch: int
    grad_accum: int
    memory: MemoryEstimate | None = None

    @property
    def streams(self) -> int:
        """Micro-batch streams per update (G / m): what the data layout depends on, not the world size."""
        return self.phase.global_batch_size // self.micro_batch


def phases(cfg: RunConfig) -> list[Phase]:
    """The run's phases over `train.max_steps` updates (points at or beyond it are never reached)."""
    points = cfg.data.schedule or [None]
    crop, batch = cfg.data.crop_size, cfg.data.global_batch_size
    crop_key, batch_key = "data.crop_size", "data.global_batch_size"
    found = []
    for index, point in enumerate(points):
        start = point.step if point is not None else 0
        if start >= cfg.train.max_steps and index:
            break
        if point is not None and point.crop_size:
            crop, crop_key = point.crop_size, f"data.schedule[{index}].crop_size"
        if point is not None and point.global_batch_size:
            batch, batch_key = point.global_batch_size, f"data.schedule[{index}].global_batch_size"
        found.append(Phase(start + 1, cfg.train.max_steps, crop, batch, crop_key, batch_key))
    return [dataclasses.replace(p, last=n.first - 1) for p, n in zip(found, found[1:], strict=False)] + found[
        -1:
    ]


def check_recipe(cfg: RunConfig) -> None:
    """The config's own checks of these keys (RunConfig calls it): everything but the memory budget."""
    train = cfg.train
    for name in ("grad_accum_steps", "max_micro_batch", "memory_budget_gb"):
        if getattr(train, name) < 0:
            _fail(f"train.{name}", f"must be >= 0 (0: derived / none), got {getattr(train, name)}")
    for phase in phases(cfg):
        _micro_batches(phase, cfg.dist.num_workers, train.grad_accum_steps, train.max_micro_batch)


def _micro_batches(phase: Phase, world_size: int, grad_accum: int, cap: int) -> list[int]:
    """The micro-batches allowed for `phase` on `world_size` workers, largest first."""
    if phase.global_batch_size % world_size:
        _fail(
            phase.batch_key,
            f"{phase.global_batch_size} does not split over {world_size} workers "
            f"(dist.num_workers); use a multiple of {world_size}",
        )
    per_worker = phase.global_batch_size // world_size
    if grad_accum:
        if per_worker % grad_accum:
            _fail(
                "train.grad_accum_steps",
                f"{grad_accum} does not divide {phase.batch_key}="
                f"{phase.global_batch_size} / {world_size} workers = {per_worker} samples per worker",
            )
        choices = [per_worker // grad_accum]
        if cap and choices[0] > cap:
            _fail(
                "train.max_micro_batch",
                f"{cap} is below the micro-batch {choices[0]} that "
                f"train.grad_accum_steps={grad_accum} fixes; set one of them, not both",
            )
        return choices
    return [m for m in range(per_worker, 0, -1) if per_worker % m == 0 and (not cap or m <= cap)]


def plan_run(
    cfg: RunConfig,
    world_size: int,
    budget: int | None = None,
    resumed: tuple[int, int] | None = None,
    estimate: Callable[[int], MemoryEstimate] | None = None,
) -> list[BatchPlan]:
    """One BatchPlan per phase. `budget`: bytes per worker (None: none; `kitdist.memory.budget_bytes`);
    `resumed`: (step, micro-batch) of the checkpoint the run resumes from; `estimate`: the memory of a
    worker at a crop size (`kitdist.memory.estimator`), needed with a budget."""
    plans = []
    for phase in phases(cfg):
        keep = resumed[1] if resumed and phase.first <= resumed[0] < phase.last else None
        memory = estimate(phase.crop_size) if estimate is not None else None
        plans.append(plan_phase(cfg, phase, world_size, budget, keep, memory))
    return plans


def plan_phase(
    cfg: RunConfig,
    phase: Phase,
    world_size: int,
    budget: int | None,
    keep: int | None,
    memory: MemoryEstimate | None,
) -> BatchPlan:
    """The micro-batch and accumulation of one phase; `keep`: a micro-batch to stay with if allowed."""
    train = cfg.train
    choices = _micro_batches(phase, world_size, train.grad_accum_steps, train.max_micro_batch)
    if budget is not None:
        fitting = [m for m in choices if memory.total(m) <= budget]
        if not fitting:
            _refuse_budget(phase, memory, budget, choices[-1])
        choices = fitting
    micro = keep if keep in choices else choices[0]
    return BatchPlan(phase, world_size, micro, phase.global_batch_size // (world_size * micro), memory)


def _refuse_budget(phase: Phase, memory: MemoryEstimate, budget: int, micro: int) -> None:
    _fail(
        "train.memory_budget_gb",
        f"{budget / GIB:.3g} GiB per worker is too small for a micro-batch of "
        f"{micro} at {phase.crop_size}x{phase.crop_size} ({phase.crop_key}): the estimate is "
        f"{memory.total(micro) / GIB:.3g} GiB ({describe_memory(memory, micro)})",
    )


def plan_at(plans: list[BatchPlan], step: int) -> BatchPlan:
    """The plan of update `step` (1-based); steps past the last phase stay in it."""
    for plan in plans:
        if step <= plan.phase.last:
            return plan
    return plans[-1]


def phase_config(cfg: RunConfig, plan: BatchPlan) -> RunConfig:
    """`cfg` as one phase runs it: the phase's crop and global batch, its accumulation fixed, its world
    size, no schedule. What the data stream, the engine and the MFU figure read."""
    data = dataclasses.replace(
        cfg.data, crop_size=plan.phase.crop_size, global_batch_size=plan.phase.global_batch_size, schedule=[]
    )
    train = dataclasses.replace(cfg.train, grad_accum_steps=plan.grad_accum)
    dist = dataclasses.replace(cfg.dist, num_workers=plan.world_size)
    return dataclasses.replace(cfg, data=data, train=train, dist=dist)


def micro_batch_seed(seed: int, step: int, stream: int) -> int:
    """The seed of the model's random draws (KiT's LSH rotations) for micro-batch stream `stream` of
    update `step`: a function of the recipe, not of the world size or the RNG's history, so 2 workers x 1
    micro-batch and 1 worker x 2 draw the same rotations for the same samples, and any resume too."""
    digest = hashlib.blake2b(f"{seed}:{step}:{stream}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def batches_per_epoch(cfg: RunConfig, samples: int) -> int:
    """Micro-batches each micro-batch stream reads per epoch of `samples` (the data stream's rule: the
    epoch is cut into whole global batches), in the phase with the largest global batch."""
    return samples // max(phase.global_batch_size for phase in phases(cfg))


def lr_scale(cfg: RunConfig, step: int) -> float:
    """`train.lr_scaling`: the lr multiplier of update `step` for its phase's global batch."""
    if cfg.train.lr_scaling == "none":
        return 1.0
    all_phases = phases(cfg)
    ratio = plan_phase_of(all_phases, step).global_batch_size / all_phases[0].global_batch_size
    return ratio if cfg.train.lr_scaling == "linear" else math.sqrt(ratio)


def plan_phase_of(all_phases: list[Phase], step: int) -> Phase:
    return next((phase for phase in all_phases if step <= phase.last), all_phases[-1])


# --- what the driver prints -------------------------------------------------------------------------


def describe_memory(memory: MemoryEstimate, micro_batch: int) -> str:
    activations = memory.fixed_activations + micro_batch * memory.per_sample
    return f"model states {size_text(memory.model_state)} + activations {size_text(activations)}"


def size_text(size: int) -> str:
    """Bytes as MiB below a GiB, else GiB, three significant digits."""
    return f"{size / 2**20:.3g} MiB" if size < GIB else f"{size / GIB:.3g} GiB"


def describe_plans(plans: list[BatchPlan], budget_note: str = "") -> str:
    """One line per phase: steps, crop, global batch = micro-batch x accumulation x workers, memory."""
    lines = []
    for plan in plans:
        phase, memory = plan.phase, plan.memory
        line = (
            f"steps {phase.first}..{phase.last}: crop {phase.crop_size}, global batch "
            f"{phase.global_batch_size} = micro-batch {plan.micro_batch} x accumulation "
            f"{plan.grad_accum} x {plan.world_size} worker(s)"
        )
        if memory is not None:
            line += f", ~{size_text(memory.total(plan.micro_batch))} per worker ({describe_memory(memory, plan.micro_batch)})"
        lines.append(line + budget_note)
    return "\n".join(lines)


def _fail(key: str, message: str):
    raise ConfigError(f"{key}: {message}", key=key)
