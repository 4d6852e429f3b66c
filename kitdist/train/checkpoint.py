"""What a checkpoint folder holds, and how one is written by every rank and read back.

One folder per checkpoint (`step-00000040/`), assembled from what each rank writes into its own local
folder (Ray Train merges them; under torchrun each rank uploads its files):

    config.yaml            the resolved RunConfig
    train_state.json       step, world size, engine, data position of ALL ranks, optimizer step/schedule
    weights.safetensors    fp32 weights of the bare model: loads into build_model(cfg.model) alone
    optimizer.safetensors  Adam moments by parameter name (world-size independent)
    rng/rank-00000.pt      each rank's RNG states (python, numpy, torch, cuda)
    deepspeed/...          DeepSpeed's native per-rank state (ZeRO partitions), when the engine is DeepSpeed

Resuming with the same world size and engine loads the native state; otherwise the world-size-independent
full state (weights + optimizer.safetensors) is loaded, so no offline conversion is needed.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from kitdist.config import RunConfig, dump_yaml
from kitdist.dist.strategy import FullState, Strategy

WEIGHTS = "weights.safetensors"
OPTIMIZER = "optimizer.safetensors"
TRAIN_STATE = "train_state.json"
CONFIG = "config.yaml"
NATIVE_DIR = "deepspeed"


def checkpoint_name(step: int) -> str:
    return f"step-{step:08d}"


@dataclass
class ResumeInfo:
    """What the loop needs to continue from a checkpoint."""

    step: int
    data_states: list[dict[str, Any]]
    world_size: int


def write_checkpoint(
    folder: Path,
    cfg: RunConfig,
    strategy: Strategy,
    step: int,
    data_states: list[dict[str, Any]],
    rank: int,
    world_size: int,
) -> None:
    """Collective: every rank writes its part of the checkpoint for `step` into its local `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    full = strategy.full_state()  # collective: all ranks take part, all get the full state
    strategy.save_native(str(folder / NATIVE_DIR))
    _write_rng(folder / "rng" / f"rank-{rank:05d}.pt")
    if rank != 0:
        return
    save_file(_contiguous(full.weights), str(folder / WEIGHTS), metadata={"step": str(step)})
    save_file(_contiguous(full.moments), str(folder / OPTIMIZER))
    state = {
        "step": step,
        "world_size": world_size,
        "strategy": cfg.dist.strategy,
        "zero_stage": cfg.dist.zero_stage,
        "data_states": data_states,
        "optimizer": full.meta,
    }
    (folder / TRAIN_STATE).write_text(json.dumps(state, indent=1))
    (folder / CONFIG).write_text(dump_yaml(cfg))


def read_resume_info(folder: Path) -> ResumeInfo:
    state = json.loads((folder / TRAIN_STATE).read_text())
    return ResumeInfo(step=state["step"], data_states=state["data_states"], world_size=state["world_size"])


def read_weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / WEIGHTS))


def restore_strategy(folder: Path, cfg: RunConfig, strategy: Strategy, world_size: int) -> str:
    """Loads the optimizer state into `strategy` (weights were loaded into the model before wrapping).

    Returns how: "native" (same world size and engine) or "full" (world-size-independent state)."""
    state = json.loads((folder / TRAIN_STATE).read_text())
    same_layout = (
        state["world_size"] == world_size
        and state["strategy"] == cfg.dist.strategy
        and state["zero_stage"] == cfg.dist.zero_stage
        and (folder / NATIVE_DIR).is_dir()
    )
    if same_layout and strategy.name == "deepspeed":
        strategy.load_native(str(folder / NATIVE_DIR))
        return "native"
    full = FullState(
        weights=read_weights(folder), moments=load_file(str(folder / OPTIMIZER)), meta=state["optimizer"]
    )
    strategy.load_full_state(full)
    return "full"


def restore_rng(folder: Path, rank: int) -> bool:
    """Restores this rank's RNG states if the checkpoint has them for this rank (it may not, after a
    change of world size); returns whether it did."""
    path = folder / "rng" / f"rank-{rank:05d}.pt"
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
