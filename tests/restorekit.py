"""Shared by the restore and evaluate tests: a tiny trained-and-exported KiT, the way training exports it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from kitdist.checkpoints import checkpoint_name
from kitdist.config import load_config
from kitdist.model import build_model
from kitdist.train.checkpoint import write_checkpoint
from kitdist.train.engine import build_strategy
from kitdist.train.losses import charbonnier_loss

EXPORT_OVERRIDES = [
    "model.size=debug",
    "dist.strategy=ddp",
    "dist.zero_stage=0",
    "dist.num_workers=1",
    "train.precision=fp32",
    "data.global_batch_size=2",
]


def export_debug_checkpoint(root: Path, photo: Path, steps: int = 2) -> Path:
    """A `debug` KiT trained for a few denoising steps on crops of `photo`, written by the training code's
    own `write_checkpoint` (weights.safetensors + config.yaml + the rest); returns the checkpoint folder."""
    torch.manual_seed(0)
    cfg = load_config(None, EXPORT_OVERRIDES)
    strategy = build_strategy(cfg, build_model(cfg.model), torch.device("cpu"))
    clean = torch.from_numpy(np.asarray(Image.open(photo).convert("RGB"))[:64, :128] / 255.0).float()
    clean = clean.permute(2, 0, 1).reshape(3, 64, 2, 64).permute(2, 0, 1, 3)  # [2, 3, 64, 64]
    strategy.train(True)
    for _ in range(steps):
        noisy = clean + 0.1 * torch.randn_like(clean)
        strategy.backward(charbonnier_loss(strategy.forward(noisy), clean), last_micro_batch=True)
        strategy.step()
    folder = root / checkpoint_name(steps)
    write_checkpoint(folder, cfg, strategy, steps, [], rank=0, world_size=1)
    return folder


def write_image(path: Path, pixels: np.ndarray, mode: str | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels, mode).save(path)
    return path
