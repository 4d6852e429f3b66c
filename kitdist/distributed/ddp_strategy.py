"""Plain PyTorch DDP behind the Strategy interface: the baseline DeepSpeed is measured against.

Mixed precision is autocast (bf16, or fp16 with a dynamic GradScaler) over fp32 weights: the network's
input, global residual and output stay fp32, gradients are fp32 and all-reduced in fp32 unless
`train.grad_reduce_dtype` asks for a compressed all-reduce (DDP's bf16 / fp16 communication hooks).
"""

from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from kitdist.config import RunConfig
from kitdist.distributed.strategy import (
    ADAM_MOMENTS,
    DTYPES,
    FullState,
    Strategy,
    first_batching,
    load_scheduler_state,
    optimizer_step_of,
    set_loss_scale,
    set_optimizer_step,
    snapshot,
    step_tensor,
)


class DDPStrategy(Strategy):
    name = "ddp"

    def __init__(
        self,
        cfg: RunConfig,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler: torch.optim.lr_scheduler.LRScheduler,
    ) -> None:
        super().__init__(cfg, model)
        self.autocast_dtype = DTYPES[cfg.train.precision]
        self._bare = model
        if dist.is_initialized():
            device_ids = [self.device.index] if self.device.type == "cuda" else None
            self._wrapped: nn.Module = DistributedDataParallel(self._bare, device_ids=device_ids)
            _compress_gradients(self._wrapped, cfg.train.grad_reduce_dtype)
        else:
            self._wrapped = self._bare
        self.optimizer, self.scheduler = optimizer, scheduler
        self.scaler = torch.amp.GradScaler(self.device.type) if cfg.train.precision == "fp16" else None
        self.grad_accum = first_batching(cfg, dist.get_world_size() if dist.is_initialized() else 1)[1]

    @property
    def module(self) -> nn.Module:
        return self._bare

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.autocast_dtype == torch.float32:
            return self._wrapped(x)
        with torch.autocast(self.device.type, dtype=self.autocast_dtype):
            return self._wrapped(x)

    def backward(self, loss: torch.Tensor, last_micro_batch: bool) -> None:
        loss = loss / self.grad_accum
        if self.scaler is not None:
            loss = self.scaler.scale(loss)
        no_sync = getattr(self._wrapped, "no_sync", None)
        context = no_sync() if (no_sync is not None and not last_micro_batch) else contextlib.nullcontext()
        with context:
            loss.backward()

    def step(self) -> torch.Tensor:
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        max_norm = self.cfg.train.grad_clip if self.cfg.train.grad_clip > 0 else float("inf")
        norm = torch.nn.utils.clip_grad_norm_(self._bare.parameters(), max_norm)
        if self.scaler is not None:  # with fused AdamW the overflow check stays on the device
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norm.detach()

    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def train(self, mode: bool = True) -> None:
        self._bare.train(mode)

    def full_state(self) -> FullState:
        weights = {name: snapshot(t) for name, t in self._bare.state_dict().items()}
        moments = {}
        for name, param in self._bare.named_parameters():
            state = self.optimizer.state.get(param, {})
            for key in ADAM_MOMENTS:
                if key in state:
                    moments[f"{key}/{name}"] = snapshot(state[key])
        meta = {
            "optimizer_step": optimizer_step_of(self.optimizer),
            "scheduler": self.scheduler.state_dict(),
            "loss_scale": self.scaler.get_scale() if self.scaler is not None else None,
        }
        return FullState(weights=weights, moments=moments, meta=meta)

    def load_full_state(self, state: FullState) -> None:
        step = int(state.meta.get("optimizer_step", 0))
        for name, param in self._bare.named_parameters():
            if f"exp_avg/{name}" not in state.moments:
                continue
            self.optimizer.state[param] = {
                "step": step_tensor(self.optimizer, param, step),
                **{key: state.moments[f"{key}/{name}"].to(param.device, copy=True) for key in ADAM_MOMENTS},
            }
        set_optimizer_step(self.optimizer, step)
        load_scheduler_state(self.scheduler, state.meta["scheduler"])
        if self.scaler is not None and state.meta.get("loss_scale"):
            set_loss_scale(self.scaler, state.meta["loss_scale"])


def _compress_gradients(ddp: DistributedDataParallel, dtype: str) -> None:
    """All-reduce gradients in `dtype` (train.grad_reduce_dtype) instead of their own fp32."""
    if dtype == "fp32":
        return
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

    hook = default_hooks.bf16_compress_hook if dtype == "bf16" else default_hooks.fp16_compress_hook
    ddp.register_comm_hook(None, hook)
