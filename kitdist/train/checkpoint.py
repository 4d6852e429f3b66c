"""Writing a checkpoint from every rank, and restoring the engine and RNG states from one: the parts that
need a Strategy. What a checkpoint folder holds, its naming and reading it back without an engine are
`kitdist.checkpoints`'s (the run folder's format).

Each rank writes into its own local folder (Ray Train merges them; under torchrun each rank uploads its
files). Resuming with the same world size and engine loads DeepSpeed's native state; otherwise the
world-size-independent full state (weights + optimizer.safetensors) is loaded, so no offline conversion
is needed.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from kitdist.checkpoints import (  # checkpoint_name, read_*: the names the loop reaches through this module
    CONFIG,
    NATIVE_DIR,
    OPTIMIZER,
    TRAIN_STATE,
    WEIGHTS,
    TrainState,
    checkpoint_name,
    read_resume_info,
    read_weights,
    rng_file,
)
from kitdist.config import RunConfig, dump_yaml
from kitdist.distributed.strategy import FullState, Strategy

__all__ = [
    "checkpoint_name",
    "read_resume_info",
    "read_weights",
    "restore_rng",
    "restore_strategy",
    "write_checkpoint",
]


def write_checkpoint(
    folder: Path,
    cfg: RunConfig,
    strategy: Strategy,
    step: int,
    data_states: list[dict[str, Any]],
    rank: int,
    world_size: int,
    batching: dict[str, int] | None = None,
) -> None:
    """Collective: every rank writes its part of the checkpoint for `step` into its local `folder`;
    `batching`: the step's micro-batch, accumulation and crop (`kitdist.batching`)."""
    folder.mkdir(parents=True, exist_ok=True)
    full = strategy.full_state()  # collective: all ranks take part, all get the full state
    strategy.save_native(str(folder / NATIVE_DIR))
    _write_rng(_rng_path(folder, rank))
    if rank != 0:
        return
    save_file(_contiguous(full.weights), str(folder / WEIGHTS), metadata={"step": str(step)})
    save_file(_contiguous(full.moments), str(folder / OPTIMIZER))
    state = TrainState(
        step, world_size, cfg.dist.strategy, cfg.dist.zero_stage, data_states, full.meta, batching or {}
    )
    (folder / TRAIN_STATE).write_text(state.to_json())
    (folder / CONFIG).write_text(dump_yaml(cfg))


def restore_strategy(folder: Path, cfg: RunConfig, strategy: Strategy, world_size: int) -> str:
    """Loads the optimizer state into `strategy` (weights were loaded into the model before wrapping).

    Returns how: "native" (same world size and engine) or "full" (world-size-independent state)."""
    state = read_resume_info(folder)
    same_layout = (
        state.world_size == world_size
        and state.strategy == cfg.dist.strategy
        and state.zero_stage == cfg.dist.zero_stage
        and (folder / NATIVE_DIR).is_dir()
    )
    if same_layout and strategy.name == "deepspeed":
        strategy.load_native(str(folder / NATIVE_DIR))
        return "native"
    full = FullState(
        weights=read_weights(folder), moments=load_file(str(folder / OPTIMIZER)), meta=state.optimizer
    )
    strategy.load_full_state(full)
    return "full"


def restore_rng(folder: Path, rank: int) -> bool:
    """Restores this rank's RNG states if the checkpoint has them for this rank (it may not, after a
    change of world size); returns whether it did."""
    path = _rng_path(folder, rank)
    if not path.is_file():
        return False
    states = torch.load(path, weights_only=True)
    random.setstate((states["python"][0], tuple(states["python"][1]), states["python"][2]))
    np_state = states["numpy"]
    np.random.set_state((np_state[0], np_state[1].numpy(), *np_state[2:]))
    torch.set_rng_state(states["torch"])
    if torch.cuda.is_available() and states.get("cuda") is not None:
        torch.cuda.set_rng_state_all(states["cuda"])
    return True


def _rng_path(folder: Path, rank: int) -> Path:
    return Path(rng_file(str(folder), rank))


def _write_rng(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    py_state = random.getstate()
    np_state = np.random.get_state()
    states = {
        "python": [py_state[0], list(py_state[1]), py_state[2]],
        "numpy": [np_state[0], torch.from_numpy(np_state[1].copy()), *np_state[2:]],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }
    torch.save(states, path)


def _contiguous(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {name: tensor.contiguous() for name, tensor in tensors.items()}
