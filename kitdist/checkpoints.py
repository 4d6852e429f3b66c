"""The run folder's format: where a run's checkpoints live, what each holds, which are complete, and how a
weights URL (a file, a checkpoint or a whole run) becomes the weights. The one place that knows it.

    <storage.root>/<storage.run_name>/     run_url(cfg)
        step-00000600/                      checkpoint_name(600); step_of("step-00000600") == 600
            config.yaml                     the resolved RunConfig
            train_state.json                TrainState: step, world size, engine, every rank's data position,
                                            the micro-batch, accumulation and crop of the step
            weights.safetensors             fp32 weights of the bare model (loads into build_model alone)
            optimizer.safetensors           Adam moments by parameter name (world-size independent)
            rng/rank-00000.pt               each rank's RNG states
            deepspeed/                      DeepSpeed's native per-rank state, when the engine is DeepSpeed
        latest                              under torchrun: the name of the newest checkpoint
        metrics/                            metrics.jsonl and TensorBoard events

A checkpoint is complete when it holds its weights, its training state and every rank's RNG file: each rank
uploads its part of a checkpoint, and its RNG file last (`kitdist.train.session`), so a folder without them
is one whose upload was cut short. Where a run resumes has one rule, `resume_from`: the newest complete
checkpoint in the run folder, whether the workers were restarted by Ray Train or the command was run
again. The coordinator takes the same; restoring and fine-tuning need only weights, and take a run's newest
weights file.
Writing the engine's part of a checkpoint (it needs a Strategy) is `kitdist.train.checkpoint`'s.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kitdist import storage

if TYPE_CHECKING:
    import torch

    from kitdist.config import RunConfig

WEIGHTS = "weights.safetensors"
OPTIMIZER = "optimizer.safetensors"
TRAIN_STATE = "train_state.json"
CONFIG = "config.yaml"
NATIVE_DIR = "deepspeed"
RNG_DIR = "rng"
LATEST = "latest"
METRICS_DIR = "metrics"
COMPLETE_FILES = (WEIGHTS, TRAIN_STATE)
STEP_NAME = re.compile(r"step-(\d+)")


class WeightsError(ValueError):
    """Weights that cannot be used: missing, unreadable, or for another model; the message names the URL."""


class WeightsNotFoundError(WeightsError, FileNotFoundError):
    """No weights at a URL: a missing file to the launcher (no retry helps), bad weights to a user."""


def run_url(cfg: RunConfig) -> str:
    """The run's folder: every checkpoint, the metrics and the stop marker of `storage.run_name`."""
    return storage.join(cfg.storage.root, cfg.storage.run_name)


def checkpoint_name(step: int) -> str:
    return f"step-{step:08d}"


def step_of(name: str) -> int | None:
    """The step of a checkpoint folder's name (`step-00000600` -> 600); None for any other name."""
    match = STEP_NAME.fullmatch(storage.name_of(name))
    return int(match.group(1)) if match else None


def checkpoint_names(run: str) -> list[str]:
    """The names of the run's checkpoint folders, complete or not, oldest step first."""
    steps = {name: step_of(name) for name in storage.list_names(run)}
    return sorted((name for name, step in steps.items() if step is not None), key=lambda name: steps[name])


def weights_file(checkpoint: str) -> str:
    """The weights file of a checkpoint folder (complete or not)."""
    return storage.join(checkpoint, WEIGHTS)


def rng_file(checkpoint: str, rank: int) -> str:
    """Where a rank's RNG states are in a checkpoint: written last of the rank's files, so its presence
    says that the rank's part is all there."""
    return storage.join(checkpoint, RNG_DIR, f"rank-{rank:05d}.pt")


def is_complete(checkpoint: str) -> bool:
    """Weights, training state and the RNG file of every rank that wrote the checkpoint."""
    if not all(storage.exists(storage.join(checkpoint, name)) for name in COMPLETE_FILES):
        return False
    try:
        ranks = read_resume_info(checkpoint).world_size
    except ValueError:  # a training state cut short
        return False
    return all(storage.exists(rng_file(checkpoint, rank)) for rank in range(ranks))


def complete_checkpoints(run: str) -> list[str]:
    """The URLs of the run's complete checkpoints, oldest step first."""
    folders = [storage.join(run, name) for name in checkpoint_names(run)]
    return [folder for folder in folders if is_complete(folder)]


def latest_checkpoint(run: str) -> str | None:
    """The URL of the run's newest complete checkpoint; None when it has none (yet)."""
    for name in reversed(checkpoint_names(run)):
        folder = storage.join(run, name)
        if is_complete(folder):
            return folder
    return None


def checkpoint_in_run(run: str, path: str) -> str:
    """A checkpoint path as Ray Train gives it, as a URL in the run folder (Ray's paths of remote storage
    carry no scheme; the folder's name is the checkpoint's)."""
    return storage.join(run, storage.name_of(path))


def resume_from(run: str, registered: str | None = None) -> str | None:
    """Where a run resumes, after a restart of its workers and after a rerun of its command alike: the
    newest complete checkpoint in the run folder. `registered` (the checkpoint Ray Train has registered,
    if any) is taken only when it is newer or the run folder cannot be read: Ray registers a checkpoint a
    moment after the workers' report of it returns, and a worker that dies in between would otherwise
    throw a complete checkpoint away."""
    try:
        newest = latest_checkpoint(run)
    except OSError:  # StorageError included: the folder cannot be read, Ray's word is all there is
        return registered
    if registered is None or newest is None:
        return newest or registered
    return registered if (step_of(registered) or 0) > (step_of(newest) or 0) else newest


def newest_weights(run: str) -> str:
    """The newest weights file among the run's checkpoints ("" when there is none yet). The checkpoint
    need not be complete: its weights file is all that restoring or fine-tuning reads."""
    for name in reversed(checkpoint_names(run)):
        weights = weights_file(storage.join(run, name))
        if storage.exists(weights):
            return weights
    return ""


def weights_url(url: str) -> str:
    """A weights file (`*.safetensors`, taken as it is), a checkpoint folder holding one, or a run folder
    (its newest weights); WeightsNotFoundError naming the URL when there is none."""
    if url.endswith(".safetensors"):
        return url
    direct = weights_file(url)
    if storage.exists(direct):
        return direct
    newest = newest_weights(url)
    if newest:
        return newest
    raise WeightsNotFoundError(
        f"{url}: no {WEIGHTS} here (no {direct}), nor in a step-* checkpoint folder below it"
    )


def load_weights_url(url: str) -> dict[str, torch.Tensor]:
    """The weights at `url` (see `weights_url`), from any storage. WeightsError names the file."""
    from safetensors.torch import load

    resolved = weights_url(url)
    try:
        return load(storage.read_bytes(resolved))
    except FileNotFoundError:
        raise WeightsNotFoundError(f"{resolved}: weights file not found") from None
    except storage.StorageError:
        raise
    except Exception as err:  # safetensors raises its own error type for a damaged header
        raise WeightsError(f"{resolved}: not a readable safetensors file ({err})") from None


def read_weights(checkpoint: str | Path) -> dict[str, torch.Tensor]:
    """The weights of one checkpoint folder (local or at any storage URL)."""
    return load_weights_url(weights_file(str(checkpoint)))


def config_beside(weights: str) -> str:
    """Where the run config training wrote beside a weights file is (it may not be there)."""
    return storage.join(weights.rsplit("/", 1)[0], CONFIG) if "/" in weights else CONFIG


@dataclass(frozen=True)
class TrainState:
    """train_state.json: what training needs to continue from a checkpoint, and what wrote it."""

    step: int
    world_size: int
    strategy: str  # the engine: "deepspeed" or "ddp"
    zero_stage: int
    data_states: list[dict[str, Any]]  # every rank's TrainStream.state_dict(), by rank
    optimizer: dict[str, Any]  # the optimizer's step and learning-rate schedule (FullState.meta)
    # the step's micro_batch, grad_accum, crop_size and global_batch_size (kitdist.batching); {} when
    # written before they were stored
    batching: dict[str, int] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1)

    @classmethod
    def from_json(cls, text: str, source: str) -> TrainState:
        try:
            body = json.loads(text)
            return cls(**{name: body[name] for name in cls.__dataclass_fields__ if name in body})
        except (ValueError, TypeError, KeyError) as err:
            raise ValueError(f"{source}: not a kitdist {TRAIN_STATE} ({type(err).__name__}: {err})") from None


def read_resume_info(checkpoint: str | Path) -> TrainState:
    """The training state of one checkpoint folder (local or at any storage URL)."""
    url = storage.join(str(checkpoint), TRAIN_STATE)
    return TrainState.from_json(storage.read_text(url), source=url)
