"""The end-of-run summary a training command prints: the steps and time, the restarts, where the weights
are, the validation PSNR against the input's, a comparison grid of a held-out image (input | restored |
target), where the metrics went, and the commands to try next, spelled with the Python that ran the run.
What the console shows while the run lives is `kitdist.console`'s."""

from __future__ import annotations

import os
import shutil
import sys
import time
from typing import Any

from kitdist import storage
from kitdist.checkpoints import METRICS_DIR, checkpoint_in_run, run_url, weights_file
from kitdist.config import RunConfig
from kitdist.console import shown
from kitdist.train.progress import duration


def summary_lines(
    cfg: RunConfig, metrics: dict[str, Any], checkpoint: str, seconds: float, restarts: list[str] = ()
) -> list[str]:
    """The summary of a finished run (cfg with absolute paths; metrics: the last report; restarts: one
    line each, `RunConsole.restarts`)."""
    run = run_url(cfg)
    lines = [f"done: {metrics.get('step', cfg.train.max_steps)} steps in {duration(seconds)}"]
    lines += [f"restart {number}:   {line}" for number, line in enumerate(restarts, 1)]
    lines.append(f"weights:     {shown(weights_file(checkpoint))}")
    if cfg.data.val_shards and "val_psnr_rgb" in metrics:
        lines += _validation_lines(cfg, metrics, checkpoint, run)
    kinds = ", ".join(["metrics.jsonl"] + ["TensorBoard events"] * ("tensorboard" in cfg.train.report_to))
    lines.append(f"metrics:     {shown(storage.join(run, METRICS_DIR))} ({kinds})")
    if "wandb" in cfg.train.report_to:
        lines.append(f"W&B:         project {cfg.train.wandb_project}, run {cfg.storage.run_name}")
    lines += ["next:", *(f"  {command}" for command in next_commands(cfg, run))]
    return lines


def _validation_lines(cfg: RunConfig, metrics: dict[str, Any], checkpoint: str, run: str) -> list[str]:
    try:
        input_psnr, grid = comparison(cfg, checkpoint, run)
    except Exception as err:  # the summary must never turn a finished run into a failure
        return [f"validation:  {metrics['val_psnr_rgb']:.2f} dB PSNR (RGB); comparison not made: {err}"]
    count = metrics.get("val_images", "the")
    return [
        f"validation:  {metrics['val_psnr_rgb']:.2f} dB PSNR (RGB) on {count} held-out images; "
        f"their inputs: {input_psnr:.2f} dB",
        f"comparison:  {shown(grid)} ({' | '.join(panel_names(cfg))})",
    ]


def panel_names(cfg: RunConfig) -> tuple[str, str, str]:
    degrade = cfg.degrade
    only_noise = cfg.data.kind == "clean" and degrade.blur_prob == 0 and degrade.jpeg_prob == 0
    return ("noisy" if only_noise else "input", "restored", "clean" if cfg.data.kind == "clean" else "target")


GRID_SIDE = 256  # the grid shows this much of a held-out image (its centre), at least


def comparison(cfg: RunConfig, checkpoint: str, run: str) -> tuple[float, str]:
    """The validation inputs' mean PSNR (RGB, as validation scores a restoration), and the URL of a grid
    (input | restored | target) of the most textured validation image's centre, degraded as validation
    degrades it, restored by the run's weights."""
    import dataclasses

    import torch

    from kitdist.data import val_batches
    from kitdist.inference import load_restorer
    from kitdist.report import comparison_grid
    from kitdist.train.validation import score_unrestored

    values = [
        score_unrestored(batch["input"][0], batch["target"][0])["psnr_rgb"]
        for batch in val_batches(cfg, 0, 1)
    ]
    side = max(cfg.data.val_crop_size, GRID_SIDE) if cfg.data.val_crop_size else 0
    larger = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, val_crop_size=side))
    picked = max(
        val_batches(larger, 0, 1), key=lambda batch: float(batch["target"].diff(dim=-1).abs().mean())
    )
    image, target = (picked[name][0].permute(1, 2, 0).numpy() for name in ("input", "target"))
    with torch.random.fork_rng():
        restored = load_restorer(checkpoint, device="cpu").restore(image)
    png = comparison_grid(list(zip(panel_names(cfg), (image.clip(0, 1), restored, target), strict=True)))
    grid = storage.join(run, "summary", f"{picked['keys'][0]}.png")
    storage.write_bytes(grid, png)
    return sum(values) / len(values), grid


def python_command() -> str:
    """How to run this Python from the working directory: `python`, unless it is a virtual environment
    that is not activated (the README's `.venv/bin/python -m kitdist.pretrain`), whose python is named by
    its path, relative when it lies under the working directory."""
    if sys.prefix == sys.base_prefix:
        return "python"
    venv_python = os.path.join(sys.prefix, "bin", "python")
    on_path = shutil.which("python")
    if on_path is not None and os.path.abspath(on_path) == os.path.abspath(venv_python):
        return "python"
    return shown(venv_python)


def next_commands(cfg: RunConfig, run: str) -> list[str]:
    python = python_command()
    commands = [f"{python} -m kitdist.restore --weights {shown(run)} photo.jpg --out restored/"]
    if cfg.data.val_shards:
        out = storage.join(cfg.storage.root, "eval", cfg.storage.run_name)
        commands.append(
            f"{python} -m kitdist.evaluate --weights {shown(run)} --shards {shown(cfg.data.val_shards)} "
            f"--out {shown(out)}"
        )
    if "tensorboard" in cfg.train.report_to:
        commands.append(f"tensorboard --logdir {shown(storage.join(run, METRICS_DIR))}")
    return commands


def print_summary(cfg: RunConfig, result: Any, started: float, restarts: list[str] = ()) -> None:
    checkpoint = result.checkpoint.path if result.checkpoint is not None else ""
    if not checkpoint:
        return
    if not storage.is_local(cfg.storage.root):  # Ray's checkpoint path has no scheme
        checkpoint = checkpoint_in_run(run_url(cfg), checkpoint)
    lines = summary_lines(cfg, result.metrics or {}, checkpoint, time.monotonic() - started, restarts)
    print("\n".join(["", *lines]), flush=True, file=sys.stdout)
