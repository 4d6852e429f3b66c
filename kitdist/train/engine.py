"""Builds what a run trains with: the model on its device (compiled when `train.compile` asks), its
optimiser and lr schedule (`kitdist.train.optim`), wrapped in the `Strategy` that `dist.strategy` names.

The strategies (`kitdist.distributed`) wrap what they are given and import nothing from `kitdist.train`: the
order is fixed here, once. The model goes to its device before the optimiser is built (fused AdamW needs
its parameters there) and is compiled in place before the engine wraps it.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from kitdist.batching import lr_scale
from kitdist.config import RunConfig
from kitdist.distributed.ddp_strategy import DDPStrategy
from kitdist.distributed.deepspeed_strategy import DeepSpeedStrategy
from kitdist.distributed.strategy import Strategy
from kitdist.train.optim import build_optimizer, build_scheduler

STRATEGIES: dict[str, type[DDPStrategy] | type[DeepSpeedStrategy]] = {
    "ddp": DDPStrategy,
    "deepspeed": DeepSpeedStrategy,
}
# torch.compile's options for `train.compile` (inductor by default); tests on a CPU swap in "aot_eager",
# which traces and differentiates the same graphs without inductor's minutes of C++ compilation.
COMPILE_OPTIONS: dict[str, Any] = {}


def build_strategy(cfg: RunConfig, model: nn.Module, device: torch.device) -> Strategy:
    """The strategy named by `dist.strategy`, owning `model` (weights loaded) on `device`."""
    model = compile_if_asked(model.to(device), cfg)
    optimizer = build_optimizer(model.parameters(), cfg.train)
    scheduler = build_scheduler(optimizer, cfg.train, lambda update: lr_scale(cfg, update))
    return STRATEGIES[cfg.dist.strategy](cfg, model, optimizer, scheduler)


def compile_if_asked(model: nn.Module, cfg: RunConfig) -> nn.Module:
    """`train.compile`: compiles the model's forward in place (`nn.Module.compile`), so parameter names,
    state dicts and checkpoints stay those of the eager model."""
    if cfg.train.compile:
        model.compile(**COMPILE_OPTIONS)
    return model
