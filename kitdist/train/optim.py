"""The optimiser and learning-rate schedule: AdamW with linear warmup and cosine decay to `train.min_lr`.

On CUDA torch's fused AdamW (one kernel for all parameters, and with a GradScaler no host synchronisation
to check for overflow); apex FusedAdam only when asked for (`train.fused_optimizer`) and importable; on CPU
the plain AdamW, whose results the CPU tests pin."""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable

import torch

from kitdist.config import TrainConfig


def build_optimizer(params: Iterable[torch.nn.Parameter], cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW with the config's lr, betas and weight decay, fused when the parameters live on CUDA; apex
    FusedAdam (adam_w_mode) if requested and importable."""
    params = list(params)
    if cfg.fused_optimizer:
        fused = _apex_fused_adam(params, cfg)
        if fused is not None:
            return fused
    on_cuda = bool(params) and all(param.device.type == "cuda" for param in params)
    return torch.optim.AdamW(
        params, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay, fused=True if on_cuda else None
    )


def _apex_fused_adam(params: list[torch.nn.Parameter], cfg: TrainConfig) -> torch.optim.Optimizer | None:
    try:
        from apex.optimizers import FusedAdam
    except ImportError:
        warnings.warn(
            "train.fused_optimizer=true but apex is not importable; using torch.optim.AdamW", stacklevel=3
        )
        return None
    return FusedAdam(params, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay, adam_w_mode=True)


def lr_factor(step: int, cfg: TrainConfig) -> float:
    """Multiplier of `cfg.lr` for the update that follows `step` completed updates."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    decay_steps = max(1, cfg.max_steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / decay_steps)
    floor = cfg.min_lr / cfg.lr
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(
    optimizer: torch.optim.Optimizer, cfg: TrainConfig, scale: Callable[[int], float] | None = None
) -> torch.optim.lr_scheduler.LambdaLR:
    """Warmup + cosine; `scale(update)`: a further multiplier of the lr of update `update` (1-based),
    e.g. `kitdist.batching.lr_scale` for a schedule that changes the global batch."""
    if scale is None:
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, cfg))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, cfg) * scale(step + 1))
