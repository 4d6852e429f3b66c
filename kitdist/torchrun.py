"""The training loop without Ray: `torchrun --nproc-per-node N -m kitdist.torchrun [--config F] [k=v ...]`.

The same per-worker loop as `python -m kitdist.pretrain`, launched by torchrun (or any launcher that sets
RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT), with checkpoints written straight to the run's storage by
`StorageSession`. It is how the cost of Ray is measured (benchmarks/train.py), and a fallback where Ray
is not available. No driver-side checks, no worker restarts: those are what Ray adds.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

import torch.distributed as dist

from kitdist.cli import config_or_exit, parser


def main(argv: Sequence[str] | None = None) -> None:
    args = parser(
        "torchrun --nproc-per-node N -m kitdist.torchrun",
        "Run the kitdist training loop under torchrun (no Ray): checkpoints straight to storage.",
        "pretrain",
    ).parse_args(argv)
    if args.check:  # the checks live on the Ray launcher's driver; this entry point has none
        sys.exit("error: --check: use python -m kitdist.pretrain --check (or finetune) with the same config")
    cfg = config_or_exit(args.config, args.overrides)
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if cfg.dist.use_gpu else "cpu")
    import torch

    from kitdist.checkpoints import run_url
    from kitdist.distributed.env import device_for
    from kitdist.launch import with_absolute_paths, with_worker_cpus
    from kitdist.train.loop import train_worker
    from kitdist.train.session import StorageSession
    from kitdist.train.stop import clear_request

    # the same share of this machine's cores per process as a local Ray cluster gives each worker
    local_workers = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    cfg = with_absolute_paths(with_worker_cpus(cfg, os.cpu_count() or 1, local_workers))
    torch.set_num_threads(cfg.dist.cpus_per_worker)
    device_for(cfg.dist)  # sets this rank's GPU before NCCL starts: every collective then runs on it
    dist.init_process_group("nccl" if cfg.dist.use_gpu else "gloo")
    if dist.get_rank() == 0:
        clear_request(run_url(cfg))  # a request left by an earlier, stopped launch of this run
    dist.barrier()
    try:
        train_worker(cfg, StorageSession(run_url(cfg), cfg.train.keep_checkpoints))
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    from kitdist.distributed.env import keep_freed_memory_in_this_program

    keep_freed_memory_in_this_program()  # this program's process, not the library's (see there)
    main(sys.argv[1:])
