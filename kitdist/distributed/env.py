"""Process environment of a training worker: device choice, rank queries, DeepSpeed's CPU accelerator.

Works the same under Ray Train and torchrun: both initialise `torch.distributed` and set RANK,
WORLD_SIZE and LOCAL_RANK. Where they differ is how a worker finds its GPU: torchrun starts one process
per GPU with every GPU visible (the GPU is `cuda:LOCAL_RANK`), while Ray assigns GPUs through
CUDA_VISIBLE_DEVICES (often listing the GPUs of every worker on the node) and `ray.get_gpu_ids()`.
`choose_device` decides from those facts alone, for training, `restore` and `evaluate` alike.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist

from kitdist.config import DistConfig
from kitdist.credentials import STORAGE_ENV, passed_on_env

# Passed from the launching process to every worker when set there: the code path and the object store's
# settings (kitdist.credentials.STORAGE_ENV, which says why credentials never go this way).
FORWARDED_ENV = ("PYTHONPATH", *STORAGE_ENV)


# Ray starts its worker processes at nice 15 (RayConfig `worker_niceness`, read from this variable by each
# worker) so that they yield to its own daemons; a training worker is the work itself, and at nice 15 any
# other process on the machine takes its CPU first.
WORKER_PRIORITY_ENV = {"RAY_worker_niceness": "0"}


def worker_env_vars(cfg: DistConfig) -> dict[str, str]:
    """Variables every worker needs from its start: glibc's allocator tunables on CPU (CPU_ALLOCATOR_ENV; a
    launching environment's own values stand), the accelerator DeepSpeed picks at import, Ray's settings."""
    allocator = (
        {} if cfg.use_gpu else {name: os.environ.get(name, v) for name, v in CPU_ALLOCATOR_ENV.items()}
    )
    env = {
        **allocator,
        "DS_ACCELERATOR": "cuda" if cfg.use_gpu else "cpu",
        # Ray Train's print patch re-prints to a wrapped stdout AND logs the line: every progress line
        # reached the driver twice. Plain prints are forwarded by Ray once.
        "RAY_TRAIN_ENABLE_PRINT_PATCH": "0",
        **WORKER_PRIORITY_ENV,
    }
    return env | passed_on_env(FORWARDED_ENV)


class DeviceError(RuntimeError):
    """No usable device for this worker; the message names the facts it was chosen from."""


@dataclass(frozen=True)
class LauncherFacts:
    """What a process knows about the GPUs it may use."""

    visible_gpus: int  # torch.cuda.device_count(): GPUs this process can address, cuda:0..n-1
    cuda_visible_devices: str | None = None  # as the launcher set it (None: unset, every GPU visible)
    local_rank: int | None = None  # torchrun / Ray Train: this process's rank on its node
    ray_gpu_ids: Sequence[str] = ()  # ray.get_gpu_ids() inside a Ray worker holding GPUs

    @classmethod
    def of_this_process(cls, env: Mapping[str, str] = os.environ) -> LauncherFacts:
        local_rank = env.get("LOCAL_RANK")
        return cls(
            visible_gpus=torch.cuda.device_count() if torch.cuda.is_available() else 0,
            cuda_visible_devices=env.get("CUDA_VISIBLE_DEVICES"),
            local_rank=int(local_rank) if local_rank not in (None, "") else None,
            ray_gpu_ids=_ray_gpu_ids(),
        )


def _ray_gpu_ids() -> tuple[str, ...]:
    """The GPUs Ray assigned to this worker; empty outside Ray (ray is never imported for this)."""
    ray = sys.modules.get("ray")
    if ray is None or not ray.is_initialized():
        return ()
    return tuple(str(gpu) for gpu in ray.get_gpu_ids())


def choose_device(use_gpu: bool, facts: LauncherFacts) -> torch.device:
    """The one decision of which device a worker (or `restore` / `evaluate`) runs on:
    - Ray assigned GPUs: the first of them, at its position in CUDA_VISIBLE_DEVICES (what
      `ray.train.torch.get_device()` answers), whatever LOCAL_RANK says;
    - exactly one visible GPU: cuda:0 (the launcher isolated it; LOCAL_RANK counts processes, not GPUs);
    - several: cuda:LOCAL_RANK (torchrun's one process per GPU), cuda:0 without LOCAL_RANK."""
    if not use_gpu:
        return torch.device("cpu")
    seen = f"CUDA_VISIBLE_DEVICES={facts.cuda_visible_devices!r}, LOCAL_RANK={facts.local_rank}"
    if facts.visible_gpus < 1:
        raise DeviceError(f"dist.use_gpu=true but this process sees no CUDA GPU ({seen})")
    if facts.ray_gpu_ids:
        return torch.device("cuda", _ray_index(facts, seen))
    if facts.visible_gpus == 1:
        return torch.device("cuda", 0)
    index = facts.local_rank or 0
    if index >= facts.visible_gpus:
        raise DeviceError(f"LOCAL_RANK {index} but only {facts.visible_gpus} GPUs are visible ({seen})")
    return torch.device("cuda", index)


def _ray_index(facts: LauncherFacts, seen: str) -> int:
    assigned = facts.ray_gpu_ids[0]
    if facts.cuda_visible_devices is None:  # Ray left every GPU visible: its ids are torch's indices
        return int(assigned)
    listed = [item.strip() for item in facts.cuda_visible_devices.split(",") if item.strip()]
    if assigned not in listed:
        raise DeviceError(f"Ray assigned GPU {assigned}, which CUDA_VISIBLE_DEVICES does not list ({seen})")
    return listed.index(assigned)


def device_for(cfg: DistConfig) -> torch.device:
    """This worker's device, made current (`torch.cuda.set_device`) so that every collective that
    picks the current device (all_gather_object, barrier, NCCL's communicator) uses it: call it before
    the first collective."""
    device = choose_device(cfg.use_gpu, LauncherFacts.of_this_process())
    use_device(device)
    return device


def use_device(device: torch.device) -> None:
    """Makes a GPU `device` the current one (a CPU needs nothing). The allocator is not changed here: a
    library call must not change the whole process (see CPU_ALLOCATOR_ENV)."""
    if device.type == "cuda":
        torch.cuda.set_device(device)


# glibc hands every freed block above its mmap threshold (which adapts up to 32 MiB) back to the kernel,
# and the next allocation of that size faults every page back in, zeroed. On CPU a KiT's activations pass
# 32 MiB from about 512x512 on (a map of 16 channels, a LeFF's hidden layer, KLA's logits), and page faults
# then took a third of the forward: 7.2x the time for each doubling of the side instead of 4.3x
# (benchmarks/RESULTS.md, "KLA on CPU after issue 18's last pass"). The fix PyTorch's CPU tuning guide gives
# is another allocator (jemalloc, tcmalloc: LD_PRELOAD, outside our reach); glibc's own switches do the same.
# Blocks up to KEEP_FREED_BYTES stay in the process, and up to as much free at the heap top (2 GiB; 1 GiB
# still let a 3-round step at 512x512 fault 320 MB back in).
KEEP_FREED_BYTES = 2**31 - 1
# It is a setting of the whole process, so it is made only where a process is started: a CPU training
# worker gets it in its environment from the launcher (glibc reads these tunables when the process starts;
# other C libraries ignore them), and the programs that run the model in their own process (restore,
# evaluate, torchrun) call `keep_freed_memory_in_this_program` first thing in their `__main__`. Importing
# kitdist or calling its functions (`load_restorer` in a notebook) leaves the allocator as it was.
CPU_ALLOCATOR_ENV = {
    "MALLOC_MMAP_THRESHOLD_": str(KEEP_FREED_BYTES),
    "MALLOC_TRIM_THRESHOLD_": str(KEEP_FREED_BYTES),
}
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt parameters (malloc.h)


def keep_freed_memory() -> bool:
    """Makes glibc keep freed blocks of up to KEEP_FREED_BYTES for reuse instead of returning them to the
    kernel (the peak memory a step needs then stays with the process): what CPU_ALLOCATOR_ENV does at a
    process's start, done now. For a program's `__main__` or a benchmark, never a library call. True where
    it took effect; False where the C library is not glibc or refused."""
    import ctypes
    import platform

    if platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL(None)
        return bool(
            libc.mallopt(_M_MMAP_THRESHOLD, KEEP_FREED_BYTES)
            and libc.mallopt(_M_TRIM_THRESHOLD, KEEP_FREED_BYTES)
        )
    except (OSError, AttributeError):
        return False


def keep_freed_memory_in_this_program() -> None:
    """First thing in the `__main__` of a program that runs the model in its own process: the allocator
    setting of CPU_ALLOCATOR_ENV, unless this process was started with glibc tunables of its own (then
    those stand). A refused setting is said once, on stderr."""
    if any(name in os.environ for name in CPU_ALLOCATOR_ENV):
        return
    if not keep_freed_memory():
        print(
            "note: the C library refused to keep freed memory (glibc's mallopt); on CPU, large images run "
            "slower as freed blocks are faulted back in (benchmarks/RESULTS.md)",
            file=sys.stderr,
            flush=True,
        )


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


def all_reduce_sum(values: list[float | torch.Tensor], device: torch.device) -> list[float]:
    """Element-wise sum over ranks of a short list of numbers (in float64); numbers may be 0-d tensors
    on `device`, which are read here, once, rather than where they were computed."""
    # Python numbers straight to float64 (torch.as_tensor would make them float32 first, 7 digits).
    tensor = torch.stack(
        [
            value.to(device).double().reshape(())
            if torch.is_tensor(value)
            else torch.tensor(float(value), dtype=torch.float64, device=device)
            for value in values
        ]
    )
    if dist.is_initialized():
        dist.all_reduce(tensor)
    return tensor.tolist()
