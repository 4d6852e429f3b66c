"""The one interface the training loop uses to run a model on many workers: `Strategy`.

The loop only calls `forward`, `backward`, `step`, and the state methods below, so DeepSpeed ZeRO and
plain DDP are interchangeable (A/B runs) and the loop never imports either. A strategy wraps what it is
given: the model already on its device (and compiled if asked) with its optimiser and lr schedule, built
by the trainer (`kitdist.train.engine`), so nothing here depends on the training package.

Two kinds of state are saved:
- *native*: the engine's own per-rank files (DeepSpeed's ZeRO partitions), exact but tied to the
  world size and ZeRO stage that wrote them;
- *full*: the fp32 master weights, Adam moments and step, keyed by parameter name. It is the same
  whatever the world size, so a run can resume on a different number of workers without conversion.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from kitdist.batching import plan_run
from kitdist.config import RunConfig

ADAM_MOMENTS = ("exp_avg", "exp_avg_sq")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@dataclass
class FullState:
    """World-size-independent training state (CPU tensors, fp32)."""

    weights: dict[str, torch.Tensor]  # the bare model's state_dict, parameters as fp32 masters
    moments: dict[str, torch.Tensor]  # "exp_avg/<param name>", "exp_avg_sq/<param name>"
    meta: dict[str, Any] = field(default_factory=dict)  # optimizer step, scheduler state, loss scale


class Strategy(ABC):
    """Wraps a model, its optimizer and lr schedule for one worker of a data-parallel run."""

    name: str
    device: torch.device
    # what `forward` expects its input in: fp32 always, mixed precision is autocast inside `forward`, so
    # the network's input, its global residual and its output stay fp32
    input_dtype: torch.dtype = torch.float32

    def __init__(self, cfg: RunConfig, model: nn.Module) -> None:
        """`model` on its device (see `kitdist.train.engine`, which also builds the optimizer)."""
        self.cfg = cfg
        self.device = next(model.parameters()).device

    @property
    @abstractmethod
    def module(self) -> nn.Module:
        """The bare model (no wrapper), e.g. to export weights."""

    @abstractmethod
    def forward(self, x: torch.Tensor) -> torch.Tensor: ...

    grad_accum: int = 1  # micro-batches per update, from `set_batching`

    def set_batching(self, micro_batch: int, grad_accum: int) -> None:
        """The micro-batch and accumulation of the updates that follow (a phase's, `kitdist.batching`):
        each micro-batch's loss counts 1 / grad_accum of the update."""
        self.grad_accum = grad_accum

    @abstractmethod
    def backward(self, loss: torch.Tensor, last_micro_batch: bool) -> None:
        """Backward for one micro-batch; gradients are synchronised on the last one of an update."""

    @abstractmethod
    def step(self) -> torch.Tensor | float | None:
        """Clips, applies the update and advances the lr schedule; returns the global grad norm, left
        where the engine computed it (a device tensor is read only at logging steps: `as_float`)."""

    @abstractmethod
    def lr(self) -> float: ...

    @abstractmethod
    def train(self, mode: bool = True) -> None: ...

    @abstractmethod
    def full_state(self) -> FullState:
        """Collective: every rank must call it; every rank gets the whole state."""

    @abstractmethod
    def load_full_state(self, state: FullState) -> None:
        """Restores optimizer moments and fp32 masters (weights were loaded into the model before wrapping)."""

    def save_native(self, folder: str) -> bool:
        """Writes this rank's engine-native state under `folder`; False if the engine has none."""
        return False

    def load_native(self, folder: str) -> None:
        raise NotImplementedError(f"{self.name} has no native checkpoint format")

    def peak_memory_bytes(self) -> int:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device)
        return 0


def first_batching(cfg: RunConfig, world_size: int) -> tuple[int, int]:
    """(micro-batch, accumulation) of the run's first phase, as `kitdist.batching` decides them; the
    loop sets each phase's with `Strategy.set_batching`."""
    plan = plan_run(cfg, world_size)[0]
    return plan.micro_batch, plan.grad_accum


def optimizer_step_of(optimizer: torch.optim.Optimizer) -> int:
    """Adam's update count (for bias correction), read from any parameter's state; 0 before the first."""
    for state in optimizer.state.values():
        if "step" in state:
            return int(state["step"])
    return 0


def set_optimizer_step(optimizer: torch.optim.Optimizer, step: int) -> None:
    for state in optimizer.state.values():
        if "step" in state:
            value = state["step"]
            if torch.is_tensor(value):  # fused / capturable AdamW keep it on the parameters' device
                state["step"] = torch.tensor(float(step), dtype=value.dtype, device=value.device)
            else:
                state["step"] = step


def step_tensor(optimizer: torch.optim.Optimizer, param: torch.Tensor, step: int) -> torch.Tensor:
    """Adam's step count as this optimizer keeps it: on the parameter's device for fused or capturable
    AdamW, on the CPU otherwise (where reading it costs no device synchronisation)."""
    on_device = optimizer.defaults.get("fused") or optimizer.defaults.get("capturable")
    return torch.tensor(float(step), device=param.device if on_device else "cpu")


def set_loss_scale(scaler: torch.amp.GradScaler, scale: float) -> None:
    """Restores fp16's loss scale, also into a scaler that has not scaled anything yet (whose `update`
    would refuse)."""
    scaler.load_state_dict({**scaler.state_dict(), "scale": float(scale)})


def snapshot(tensor: torch.Tensor) -> torch.Tensor:
    """A CPU fp32 copy that owns its memory: on a CPU `.float().cpu()` would return the live tensor
    itself, and a state taken then would change with the next step."""
    return tensor.detach().to("cpu", torch.float32, copy=True)


def as_float(value: torch.Tensor | float | None) -> float:
    """A number the loop kept on the device, read at a logging step (the one synchronisation)."""
    if value is None:
        return float("nan")
    return float(value)


def load_scheduler_state(scheduler: torch.optim.lr_scheduler.LRScheduler, state: dict[str, Any]) -> None:
    """Restores the schedule and the optimizer's current lr (load_state_dict alone leaves the lr stale)."""
    scheduler.load_state_dict(state)
    for group, lr in zip(scheduler.optimizer.param_groups, scheduler.get_last_lr(), strict=True):
        group["lr"] = lr
