"""The memory a training worker needs, estimated on the driver without a device, and the budget it has.

- **Budget** per worker, in GiB (2^30 bytes): `train.memory_budget_gb`; 0 means none on a CPU (the
  machine's memory is shared) and, on a GPU, `CUDA_BUDGET_SHARE` of the device's memory, decided on the
  worker (`budget_bytes`; a fixed `train.grad_accum_steps` is then taken as it is).
- **Estimate** (`estimate_memory`), deterministic, no device needed: the model runs on fake tensors
  (shapes only) at the phase's crop, under the run's autocast precision, with saved-tensor hooks counting
  the bytes autograd keeps for backward (`SavedBytes`), at micro-batches 1 and 2: the difference is the
  per-sample part, the rest (such as weights cast to bf16) the fixed part. With
  `model.checkpoint_activations` the backward recomputes one block at a time, so the largest block's
  activations are added. Model states: fp32 weights (4 bytes a parameter), gradients (4) and Adam's two
  moments (8), divided over the workers as the ZeRO stage shards them (1: moments, 2: + gradients,
  3: + weights). Allocator fragmentation and temporaries are left out, hence the share on GPUs.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

from kitdist.batching import GIB, MemoryEstimate
from kitdist.config import ModelConfig, RunConfig

CUDA_BUDGET_SHARE = 0.85  # of a GPU's memory: the estimate leaves out fragmentation and temporaries
ADAM_BYTES, WEIGHT_BYTES, GRAD_BYTES = 8, 4, 4  # per parameter, fp32 master weights and moments


def budget_bytes(cfg: RunConfig, device: object = None) -> int | None:
    """Bytes a worker may use: `train.memory_budget_gb`, else on a CUDA `device` its share of the GPU's
    memory, else None (no budget: the CPU's memory is the machine's, shared). A fixed
    `train.grad_accum_steps` is not second-guessed by the GPU's size, only by a budget stated."""
    if cfg.train.memory_budget_gb > 0:
        return int(cfg.train.memory_budget_gb * GIB)
    if getattr(device, "type", None) == "cuda" and not cfg.train.grad_accum_steps:
        import torch

        return int(torch.cuda.get_device_properties(device).total_memory * CUDA_BUDGET_SHARE)
    return None


def estimator(cfg: RunConfig, world_size: int) -> Callable[[int], MemoryEstimate]:
    """`estimate_memory` of this run at a given crop size, as `kitdist.batching.plan_run` asks for it."""
    return lambda crop: estimate_memory(cfg, crop, world_size)


def estimate_memory(cfg: RunConfig, crop: int, world_size: int) -> MemoryEstimate:
    """Bytes one of `world_size` workers needs at `crop` x `crop` crops: see the module docstring."""
    fixed, per_sample, params = activation_bytes(cfg.model, crop, cfg.train.precision)
    stage = cfg.dist.zero_stage if cfg.dist.strategy == "deepspeed" else 0
    shards = [world_size if stage >= level else 1 for level in (3, 2, 1)]
    per_param = WEIGHT_BYTES / shards[0] + GRAD_BYTES / shards[1] + ADAM_BYTES / shards[2]
    return MemoryEstimate(int(params * per_param), fixed, per_sample)


@functools.lru_cache(maxsize=64)
def activation_bytes(model_cfg: ModelConfig, crop: int, precision: str) -> tuple[int, int, int]:
    """(fixed bytes, bytes per sample, parameter count) autograd keeps for one training forward at
    `crop` x `crop`, counted on fake tensors (shapes only: no memory, a second for the paper-size model)."""
    import torch
    from torch._subclasses.fake_tensor import FakeTensorMode

    from kitdist.model import build_model

    with torch.device("meta"):
        model = build_model(model_cfg).train()
    params = sum(p.numel() for p in model.parameters())
    with FakeTensorMode(allow_non_fake_inputs=True):
        model.to_empty(device="cpu")
        one, two = (_saved_by_forward(model, batch, crop, precision)[0] for batch in (1, 2))
        if model.checkpoint_activations:  # backward recomputes one block at a time: add the largest
            model.checkpoint_activations = False
            one += _saved_by_forward(model, 1, crop, precision)[1]
            two += _saved_by_forward(model, 2, crop, precision)[1]
    per_sample = two - one
    return one - per_sample, per_sample, params


def _saved_by_forward(model, batch: int, crop: int, precision: str) -> tuple[int, int]:
    """Bytes saved for backward by one forward under the run's autocast, and the most one block saved."""
    import torch

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    autocast = torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None)
    with SavedBytes(model) as saved, autocast:
        model(torch.zeros(batch, 3, crop, crop))
    return saved.total, saved.largest_block


class SavedBytes:
    """Counts the bytes autograd keeps for backward while active (saved-tensor hooks): in all, and the
    most any one KTB block of `model` kept. The one implementation: the benchmarks count with it too.

        with SavedBytes(model) as saved:
            loss = model(x).square().mean()
        saved.total, saved.largest_block
    """

    def __init__(self, model=None) -> None:
        from kitdist.model.kit import KTB

        self.blocks = [m for m in model.modules() if isinstance(m, KTB)] if model is not None else []
        self.total, self.largest_block = 0, 0
        self._starts: list[int] = []

    def __enter__(self) -> SavedBytes:
        import torch

        self._hooks = [h for b in self.blocks for h in (b.register_forward_pre_hook(self._enter),
                       b.register_forward_hook(self._leave))]  # fmt: skip
        self._saving = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda tensor: tensor)
        self._saving.__enter__()
        return self

    def __exit__(self, *failure) -> None:
        self._saving.__exit__(*failure)
        for hook in self._hooks:
            hook.remove()

    def _pack(self, tensor):
        self.total += tensor.numel() * tensor.element_size()
        return tensor

    def _enter(self, module, args) -> None:
        self._starts.append(self.total)

    def _leave(self, module, args, output) -> None:
        self.largest_block = max(self.largest_block, self.total - self._starts.pop())
