"""The same weights scored the way training-time validation scored before issue 14 (whole image padded
by edge replication to a multiple of 32, float output clamped, no rounding) and the one way now
(`kitdist.train.validation.restore_and_score`, also `kitdist.evaluate`'s: tiles, the model's own reflect
padding, 8-bit output and target), side by side on the same validation images.

    python benchmarks/val_convention.py --weights runs/embedded --shards runs/data/skimage-photos/val
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from kitdist.config import SPATIAL_MULTIPLE, load_config
from kitdist.data import val_batches
from kitdist.inference import load_restorer, recorded_run_config
from kitdist.shards.manifest import read_manifest
from kitdist.train.metrics import MetricConvention, psnr
from kitdist.train.validation import restore_and_score


def replicate_padded_float(forward, image: torch.Tensor) -> torch.Tensor:
    """The pre-issue-14 training-time validation output ([1, 3, H, W] in, float in [0, 1] out)."""
    height, width = image.shape[-2:]
    padded = F.pad(image, (0, -width % SPATIAL_MULTIPLE, 0, -height % SPATIAL_MULTIPLE), mode="replicate")
    return forward(padded)[..., :height, :width].clamp(0, 1)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--weights", required=True)
    parser.add_argument("--shards", required=True)
    args = parser.parse_args()
    restorer = load_restorer(args.weights, device="cpu")
    recorded = recorded_run_config(restorer.weights_url)
    overrides = [f"data.val_shards={args.shards}", f"data.kind={read_manifest(args.shards).kind}"]
    overrides += ["data.val_crop_size=0", "data.num_workers=0"]
    cfg = load_config(None, [f"model.size={restorer.size_name}", *overrides])
    if recorded is not None:  # the run's own degradations
        cfg = load_config(None, [f"degrade.noise_sigma={list(recorded.degrade.noise_sigma)}", *overrides])
    print(
        "| image | size | before: replicate pad, float (dB) | now: evaluate's convention (dB) | difference |"
    )
    print("|---|---|---:|---:|---:|")
    for batch in val_batches(cfg, 0, 1):
        before = psnr(
            replicate_padded_float(restorer.forward, batch["input"]), batch["target"], MetricConvention()
        )
        now = restore_and_score(restorer.forward, batch["input"][0], batch["target"][0]).metrics["psnr_rgb"]
        size = "x".join(str(side) for side in batch["input"].shape[:-3:-1])
        print(
            f"| {batch['keys'][0]} | {size} | {before.item():.4f} | {now:.4f} | {now - before.item():+.4f} |"
        )


if __name__ == "__main__":
    main()
