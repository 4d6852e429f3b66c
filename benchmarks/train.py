"""Training engine costs, measured side by side in one run: DDP vs DeepSpeed ZeRO-1/2/3, activation
checkpointing on/off, and Ray Train against the same loop under torchrun.

    python benchmarks/train.py [--model debug] [--crop 64] [--batch 4] [--steps 8] [--warmup 3]

- engines: the training loop under torchrun (2 processes, gloo on CPU, no Ray), the same global batch,
  bf16; step time is the median over the steps after `--warmup`, from the run's own metrics (log every
  step); peak memory is rank 0's peak resident set (CPU) or peak allocated memory (CUDA);
- activation checkpointing: one process, forward + backward of one micro-batch; activation memory is
  the bytes autograd saves for backward (counted with saved-tensor hooks), time the median of repeats;
- Ray: the embedded default's config (`configs/pretrain/embedded.yaml`: ZeRO-2 fp32, batch 8 over 2 workers)
  for `--steps` steps, launched by `python -m kitdist.pretrain` (a local Ray cluster of its own) and by
  torchrun, alternating for `--rounds` rounds: median step time and the whole command's wall-clock, with
  its phases (seconds from the command's start to: the cluster joined, the loop started, the first and
  the last step logged, the process gone). `--ray-only` runs this part alone.
- batching (`--batching-only` runs it alone): the same recipe, global batch `--accum-batch` over 2
  workers under torchrun (ZeRO-2, bf16), with the micro-batch and accumulation that `kitdist.batching`
  derives (`train.grad_accum_steps=0`) against hand-picked accumulations of 2, 4, ... (smaller
  micro-batches at the same global batch), alternating for `--rounds` rounds: median step time each.
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
from kitdist.memory import SavedBytes  # noqa: E402
from kitdist.pretrain import EMBEDDED_CONFIG, ensure_photo_shards  # noqa: E402

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


# A command's phases: the first output line holding each marker (the Ray launcher's worker line, the
# loop's start line, a progress line), then the last progress line and the exit.
PHASES = {"cluster joined": " workers x ", "loop started": "training steps ", "first step": " | loss "}


def run_command(command: list[str]) -> float:
    return timed_command(command)["exit"]


def timed_command(command: list[str]) -> dict[str, float]:
    """Runs a command; seconds from its start to each phase of PHASES that it printed, and to "exit"."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "DS_ACCELERATOR": "cpu"}
    start, seen, lines = time.perf_counter(), {}, []
    with subprocess.Popen(
        command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    ) as job:
        for line in job.stdout:
            lines.append(line)
            now = time.perf_counter() - start
            for phase, marker in PHASES.items():
                if marker in line:
                    seen.setdefault(phase, now)
            if " | loss " in line:
                seen["last step"] = now
    if job.returncode != 0:
        sys.exit(f"{' '.join(command[:6])} ... failed:\n{''.join(lines[-40:])}")
    return {**seen, "exit": time.perf_counter() - start}


def torchrun(cli: list[str]) -> float:
    return timed_torchrun(cli)["exit"]


def timed_torchrun(cli: list[str]) -> dict[str, float]:
    port = str(20000 + os.getpid() % 20000)
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", port]
    return timed_command([*launcher, "-m", "kitdist.torchrun", *cli])


def step_figures(root: str, name: str, args: argparse.Namespace) -> tuple[float, float]:
    """(median step time in s after warm-up, peak memory in MiB) from a run's metrics."""
    lines = Path(root, name, "metrics", "metrics.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    times = [args.batch / r["samples_per_s"] for r in records if r["step"] > args.warmup]
    return statistics.median(times), max(r["peak_memory_mb"] for r in records)


def saved_activation_bytes(model: torch.nn.Module, x: torch.Tensor) -> tuple[int, float]:
    """Bytes autograd keeps for backward in one forward, and the forward+backward time in s."""
    start = time.perf_counter()
    with SavedBytes() as saved:
        loss = model(x).float().square().mean()
    loss.backward()
    return saved.total, time.perf_counter() - start


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


def batching_settings(args: argparse.Namespace) -> dict[str, list[str]]:
    """The derived setting and every hand-picked accumulation that divides the per-worker batch."""
    per_worker = args.accum_batch // 2
    picked = [a for a in range(2, per_worker + 1) if per_worker % a == 0]
    return {"derived": ["train.grad_accum_steps=0"]} | {
        f"a={a}": [f"train.grad_accum_steps={a}"] for a in picked
    }


def batching(args: argparse.Namespace, shards: tuple[str, str], root: str) -> None:
    """Step time of the derived micro-batch x accumulation against hand-picked ones, same global batch."""
    from kitdist.batching import plan_run

    settings = batching_settings(args)
    base = [*ENGINES["ZeRO-2"], f"data.global_batch_size={args.accum_batch}"]
    times: dict[str, list[float]] = {label: [] for label in settings}
    for round_ in range(args.rounds):
        for label in settings if round_ % 2 == 0 else reversed(settings):
            name = f"batching-{label.replace('=', '')}-{round_}"
            torchrun([*overrides(args, shards, root, name), *base, *settings[label]])
            times[label].append(median_step(root, name, args.accum_batch, skip=args.warmup))
    print(f"\nbatching: global batch {args.accum_batch} over 2 workers (torchrun, ZeRO-2, bf16)")
    print("setting | micro x accumulation x workers | step s per round | x derived per round (paired)")
    for label, found in times.items():
        plan = plan_run(load_config(None, [*base, "dist.num_workers=2", *settings[label]]), 2)[0]
        shape = f"{plan.micro_batch} x {plan.grad_accum} x {plan.world_size}"
        rounds = ", ".join(f"{t:.3f}" for t in found)
        ratios = ", ".join(f"{t / d:.2f}" for t, d in zip(found, times["derived"], strict=True))
        print(f"{label:<7} | {shape:<29} | {rounds:<16} | {ratios}")


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
    parser.add_argument("--ray-steps", type=int, default=60, help="steps per Ray/torchrun run (default 60)")
    parser.add_argument("--rounds", type=int, default=2, help="Ray/torchrun rounds, alternating (default 2)")
    parser.add_argument("--ray-only", action="store_true", help="only the Ray/torchrun comparison")
    parser.add_argument("--accum-batch", type=int, default=16, help="global batch of the batching part")
    parser.add_argument("--batching-only", action="store_true", help="only the batching comparison")
    args = parser.parse_args()
    folder = tempfile.mkdtemp(prefix="kitdist-bench-train-")
    shards = ensure_photo_shards(str(Path(folder) / "data"))
    root = str(Path(folder) / "runs")
    if not args.ray_only and not args.batching_only:
        figures = {}
        for label, extra in ENGINES.items():
            torchrun([*overrides(args, shards, root, label), *extra])
            figures[label] = step_figures(root, label, args)
        print_engines(figures)
        print_checkpointing(activation_checkpointing(args))
    if not args.ray_only:
        batching(args, shards, root)
    if not args.batching_only:
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


def embedded_overrides(args: argparse.Namespace, shards: tuple[str, str], root: str, name: str) -> list[str]:
    """The embedded default's config, shortened to --ray-steps and logging every step."""
    return [
        "--config",
        str(EMBEDDED_CONFIG),
        f"data.train_shards={shards[0]}",
        f"data.val_shards={shards[1]}",
        f"train.max_steps={args.ray_steps}",
        "train.log_every=1",
        f"train.checkpoint_every={args.ray_steps}",
        f"storage.root={root}",
        f"storage.run_name={name}",
    ]


def median_step(root: str, name: str, batch: int, skip: int) -> float:
    lines = Path(root, name, "metrics", "metrics.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    return statistics.median(batch / r["samples_per_s"] for r in records if r["step"] > skip)


def print_ray(args: argparse.Namespace, shards: tuple[str, str], root: str) -> None:
    """Ray Train against torchrun on the embedded config, ABBA order so that drifting load hits both."""
    batch = load_config(EMBEDDED_CONFIG).data.global_batch_size
    launchers = {
        "torchrun": timed_torchrun,
        "Ray Train": lambda cli: timed_command([sys.executable, "-m", "kitdist.pretrain", *cli]),
    }
    print(
        f"\nembedded config, {args.ray_steps} steps | step s (median, after step 10) | phases: s from start"
    )
    steps: dict[str, list[float]] = {label: [] for label in launchers}
    for round_ in range(args.rounds):
        order = list(launchers) if round_ % 2 == 0 else list(reversed(launchers))
        for label in order:
            name = f"{label.split()[0].lower()}-{round_}"
            phases = launchers[label](embedded_overrides(args, shards, root, name))
            steps[label].append(median_step(root, name, batch, skip=10))
            shown = ", ".join(f"{phase} {seconds:.1f}" for phase, seconds in phases.items())
            print(f"round {round_} {label:<9} | {steps[label][-1]:.3f} | {shown}", flush=True)
    ratios = [ray / torch_ for ray, torch_ in zip(steps["Ray Train"], steps["torchrun"], strict=True)]
    print(f"step time Ray/torchrun per round: {', '.join(f'{r:.3f}' for r in ratios)}")


if __name__ == "__main__":
    main()
