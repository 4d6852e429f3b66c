"""Process environment of a training worker: device choice, rank queries, DeepSpeed's CPU accelerator.

Works the same under Ray Train and torchrun: both initialise `torch.distributed` and set RANK,
WORLD_SIZE and LOCAL_RANK, so nothing here knows which launcher started the process.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

from kitdist.config import DistConfig


# Passed from the launching process to every worker when set there: the code path and where the object
# store is, never a secret. Ray records what it is given (runtime-env `env_vars` land in its logs and
# dashboard), so credentials come from the nodes' own environment: on a local cluster the driver starts,
# its processes inherit the driver's; on a remote one the nodes', set by the cluster (a Kubernetes
# Secret, SLURM's exported environment, an instance role), or a credentials file only the user can read
# whose path (AWS_SHARED_CREDENTIALS_FILE) alone travels. See kitdist.credentials.
FORWARDED_ENV = (
    "PYTHONPATH",
    "AWS_ENDPOINT_URL",
    "AWS_DEFAULT_REGION",
    "AWS_REGION",
    "AWS_PROFILE",
    "AWS_SHARED_CREDENTIALS_FILE",
    "AWS_CONFIG_FILE",
)


def worker_env_vars(cfg: DistConfig) -> dict[str, str]:
    """Variables every worker needs before it imports DeepSpeed (which picks its accelerator at import)."""
    from kitdist.credentials import assert_no_secrets

    env = {
        "DS_ACCELERATOR": "cuda" if cfg.use_gpu else "cpu",
        # Ray Train's print patch re-prints to a wrapped stdout AND logs the line: every progress line
        # reached the driver twice. Plain prints are forwarded by Ray once.
        "RAY_TRAIN_ENABLE_PRINT_PATCH": "0",
    }
    env.update({name: os.environ[name] for name in FORWARDED_ENV if os.environ.get(name)})
    return assert_no_secrets(env)


def device_for(cfg: DistConfig) -> torch.device:
    if cfg.use_gpu:
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def print0(*args: object) -> None:
    """print() on rank 0 only, flushed so that Ray forwards it to the driver promptly."""
    if rank() == 0:
        print(*args, flush=True)


def all_gather_objects(value: object) -> list[object]:
    """Every rank's `value`, in rank order (a list of one outside torch.distributed)."""
    if not dist.is_initialized():
        return [value]
    gathered: list[object] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, value)
    return gathered


def all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    """Element-wise sum over ranks of a short list of floats (in float64)."""
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_initialized():
        dist.all_reduce(tensor)
    return tensor.tolist()
