"""Training engine costs, measured side by side in one run: DDP vs DeepSpeed ZeRO-1/2/3, activation
checkpointing on/off, and Ray Train against the same loop under torchrun.

    python benchmarks/train.py [--model debug] [--crop 64] [--batch 4] [--steps 8] [--warmup 3]

- engines: the training loop under torchrun (2 processes, gloo on CPU, no Ray), the same global batch,
  bf16; step time is the median over the steps after `--warmup`, from the run's own metrics (log every
  step); peak memory is rank 0's peak resident set (CPU) or peak allocated memory (CUDA);
- activation checkpointing: one process, forward + backward of one micro-batch; activation memory is
  the bytes autograd saves for backward (counted with saved-tensor hooks), time the median of repeats;
- Ray: the same ZeRO-2 run launched by `python -m kitdist.pretrain` on a local Ray cluster against
  torchrun: median step time, and wall-clock of the whole command (start-up included).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from kitdist.config import load_config  # noqa: E402
from kitdist.pretrain import ensure_photo_shards  # noqa: E402

ENGINES = {
    "DDP": ["dist.strategy=ddp", "dist.zero_stage=0"],
    "ZeRO-1": ["dist.strategy=deepspeed", "dist.zero_stage=1"],
    "ZeRO-2": ["dist.strategy=deepspeed", "dist.zero_stage=2"],
    "ZeRO-3": ["dist.strategy=deepspeed", "dist.zero_stage=3"],
}


def overrides(args: argparse.Namespace, shards: tuple[str, str], root: str, name: str) -> list[str]:
    return [
        f"model.size={args.model}",
        f"data.crop_size={args.crop}",
        f"data.global_batch_size={args.batch}",
        "data.num_workers=0",
        f"data.train_shards={shards[0]}",
        f"train.max_steps={args.steps}",
        "train.warmup_steps=1",
        "train.log_every=1",
        f"train.checkpoint_every={args.steps}",
        "train.precision=bf16",
        "dist.num_workers=2",
        f"storage.root={root}",
        f"storage.run_name={name}",
    ]


def run_command(command: list[str]) -> float:
    env = {**os.environ, "PYTHONPATH": str(REPO), "DS_ACCELERATOR": "cpu"}
    start = time.perf_counter()
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"{' '.join(command[:6])} ... failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return time.perf_counter() - start


def torchrun(cli: list[str]) -> float:
    port = str(20000 + os.getpid() % 20000)
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", port]
    return run_command([*launcher, "-m", "kitdist.torchrun", *cli])


def step_figures(root: str, name: str, args: argparse.Namespace) -> tuple[float, float]:
    """(median step time in s after warm-up, peak memory in MiB) from a run's metrics."""
    lines = Path(root, name, "metrics", "metrics.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    times = [args.batch / r["samples_per_s"] for r in records if r["step"] > args.warmup]
    return statistics.median(times), max(r["peak_memory_mb"] for r in records)


def saved_activation_bytes(model: torch.nn.Module, x: torch.Tensor) -> tuple[int, float]:
    """Bytes autograd keeps for backward in one forward, and the forward+backward time in s."""
    total = 0

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        nonlocal total
        total += tensor.numel() * tensor.element_size()
        return tensor

    start = time.perf_counter()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss = model(x).float().square().mean()
    loss.backward()
    return total, time.perf_counter() - start


def activation_checkpointing(args: argparse.Namespace) -> dict[str, tuple[int, float]]:
    """Per setting: (saved activation bytes, median fwd+bwd seconds). The two settings alternate, so
    that a change in the machine's load hits both alike; the first round is a warm-up."""
    from kitdist.model import build_model

    x = torch.rand(args.batch // 2, 3, args.crop, args.crop)
    models = {}
    for label, flag in (("off", "false"), ("on", "true")):
        cfg = load_config(None, [f"model.size={args.model}", f"model.checkpoint_activations={flag}"])
        torch.manual_seed(0)
        models[label] = build_model(cfg.model).train()
    runs: dict[str, list[tuple[int, float]]] = {label: [] for label in models}
    for _ in range(args.repeats + 1):
        for label, model in models.items():
            runs[label].append(saved_activation_bytes(model, x))
    return {label: (found[0][0], statistics.median(s for _, s in found[1:])) for label, found in runs.items()}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="debug", help="KiT size (default debug)")
    parser.add_argument("--crop", type=int, default=64, help="training crop side (default 64)")
    parser.add_argument("--batch", type=int, default=4, help="global batch (default 4, over 2 workers)")
    parser.add_argument("--steps", type=int, default=8, help="steps per run (default 8)")
    parser.add_argument("--warmup", type=int, default=3, help="steps left out of the median (default 3)")
    parser.add_argument("--repeats", type=int, default=6, help="activation-checkpointing repeats (default 6)")
    args = parser.parse_args()
    folder = tempfile.mkdtemp(prefix="kitdist-bench-train-")
    shards = ensure_photo_shards(str(Path(folder) / "data"))
    root = str(Path(folder) / "runs")
    figures = {}
    for label, extra in ENGINES.items():
        torchrun([*overrides(args, shards, root, label), *extra])
        figures[label] = step_figures(root, label, args)
    print_engines(figures)
    print_checkpointing(activation_checkpointing(args))
    print_ray(args, shards, root)


def print_engines(figures: dict[str, tuple[float, float]]) -> None:
    ddp_time, ddp_memory = figures["DDP"]
    print("\nengine (torchrun, 2 workers, bf16) | step s (median) | x DDP | peak MiB (rank 0) | x DDP")
    for label, (seconds, memory) in figures.items():
        print(
            f"{label:<35} | {seconds:15.3f} | {seconds / ddp_time:5.2f} | {memory:17.0f} | {memory / ddp_memory:5.2f}"
        )


def print_checkpointing(results: dict[str, tuple[int, float]]) -> None:
    (off_bytes, off_time), (on_bytes, on_time) = results["off"], results["on"]
    print("\nactivation checkpointing | saved activations MiB | fwd+bwd s (median)")
    print(f"off                      | {off_bytes / 2**20:21.1f} | {off_time:.3f}")
    print(f"on                       | {on_bytes / 2**20:21.1f} | {on_time:.3f}")
    print(f"ratio on/off: memory {on_bytes / off_bytes:.2f}, time {on_time / off_time:.2f}")


def print_ray(args: argparse.Namespace, shards: tuple[str, str], root: str) -> None:
    cli = [*overrides(args, shards, root, "ray"), *ENGINES["ZeRO-2"]]
    ray_wall = run_command([sys.executable, "-m", "kitdist.pretrain", "--config", _empty_config(root), *cli])
    torchrun_wall = torchrun([*overrides(args, shards, root, "torchrun"), *ENGINES["ZeRO-2"]])
    ray_step, _ = step_figures(root, "ray", args)
    torchrun_step, _ = step_figures(root, "torchrun", args)
    print("\nZeRO-2 launched by | step s (median) | whole command s")
    print(f"torchrun           | {torchrun_step:15.3f} | {torchrun_wall:15.1f}")
    print(f"Ray Train          | {ray_step:15.3f} | {ray_wall:15.1f}")
    print(
        f"ratio Ray/torchrun: step {ray_step / torchrun_step:.2f}, whole command {ray_wall / torchrun_wall:.2f}"
    )


def _empty_config(root: str) -> str:
    """An empty YAML config: with --config, pretrain skips the embedded default's own settings."""
    path = Path(root).parent / "empty.yaml"
    path.write_text("{}\n")
    return str(path)


if __name__ == "__main__":
    main()
