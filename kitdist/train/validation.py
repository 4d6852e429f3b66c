"""How a restoration is scored: one function for training-time validation and `kitdist.evaluate`.

The convention is the published one (`kitdist.evaluate`'s), so a model gets one PSNR wherever it is
measured: each image is restored whole, or in overlapping blended tiles when a side exceeds `tile`
(`kitdist.inference.restore_tiled`), the model reflect-padding to its multiple of 32 itself; output and
target are rounded to 8 bits, as saved files are; PSNR and SSIM (`kitdist.train.metrics`) are measured
on RGB and on BT.601 luma, data range 1, after cutting `crop_border` pixels from every side.

Training-time validation (`validate`) scores each rank's part of the validation set that way and sums
over ranks; it leaves every RNG as it found it, and under ZeRO-3 every rank runs as many forwards.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from kitdist.config import SPATIAL_MULTIPLE, RunConfig
from kitdist.distributed.env import all_gather_objects, all_reduce_sum
from kitdist.distributed.strategy import Strategy
from kitdist.inference import DEFAULT_OVERLAP, DEFAULT_TILE, count_tiles, restore_tiled
from kitdist.train.metrics import MetricConvention, psnr, ssim

METRICS = ("psnr_rgb", "ssim_rgb", "psnr_y", "ssim_y")
SSIM_NOTE = (
    "SSIM: Wang et al. 2004, Gaussian window 11 px sigma 1.5, K1 0.01, K2 0.03, valid region, mean over "
    "channels = skimage structural_similarity(gaussian_weights=True, sigma=1.5, use_sample_covariance=False)"
)
Forward = Callable[[torch.Tensor], torch.Tensor]  # [B, 3, h, w] float32 -> restored, same shape


def conventions(crop_border: int) -> dict[str, str]:
    """The convention each reported number was measured with, in words."""
    common = "8-bit rounded output and target, data range 1 (255 on 8 bits)"
    space = {"rgb": "RGB, 3 channels", "y": "Y = BT.601 luma (MATLAB rgb2ycbcr, 16-235)"}
    out = {}
    for name in METRICS:
        kind, colour = name.split("_")
        method = "PSNR = 10 log10(1 / MSE)" if kind == "psnr" else SSIM_NOTE
        out[name] = f"{space[colour]}; border {crop_border} px cropped; {common}; {method}"
    return out


def to_8bit(image: torch.Tensor) -> torch.Tensor:
    """A float image (any layout, any device) as an 8-bit file holds it: clamped to [0, 1], rounded."""
    return (image.detach().clamp(0, 1) * 255.0).round().to(torch.uint8)


def scores_8bit(output: torch.Tensor, target: torch.Tensor, crop_border: int = 0) -> dict[str, float]:
    """The METRICS of two uint8 [3, H, W] RGB images, on their device."""
    a, b = output[None].double() / 255.0, target[None].double() / 255.0
    values = {}
    for space in ("rgb", "y"):
        convention = MetricConvention(space=space, crop_border=crop_border)
        values[f"psnr_{space}"] = psnr(a, b, convention).item()
        values[f"ssim_{space}"] = ssim(a, b, convention).item()
    return {name: values[name] for name in METRICS}


def to_uint8(pixels: np.ndarray) -> np.ndarray:
    """`to_8bit` for float HWC numpy images (scripts, reports)."""
    return to_8bit(torch.from_numpy(np.ascontiguousarray(pixels))).numpy()


def image_metrics(output: np.ndarray, target: np.ndarray, crop_border: int = 0) -> dict[str, float]:
    """`scores_8bit` of two uint8 HWC numpy images."""
    return scores_8bit(_chw(output), _chw(target), crop_border)


def _chw(image: np.ndarray) -> torch.Tensor:
    return torch.tensor(image).permute(2, 0, 1)


@dataclass
class Scored:
    """One image restored and measured: the 8-bit restored image and target (uint8 [3, H, W] on the
    restoring device) and the METRICS of the first against the second."""

    restored: torch.Tensor
    target: torch.Tensor
    metrics: dict[str, float]

    def images(self) -> tuple[np.ndarray, np.ndarray]:
        """The restored image and the target as uint8 HWC numpy arrays (for figures and files)."""
        return tuple(image.permute(1, 2, 0).cpu().numpy() for image in (self.restored, self.target))


def restore_and_score(
    forward: Forward,
    degraded: torch.Tensor,
    target: torch.Tensor,
    *,
    tile: int = DEFAULT_TILE,
    overlap: int = DEFAULT_OVERLAP,
    crop_border: int = 0,
) -> Scored:
    """Restores `degraded` ([3, H, W] float, on the device `forward` runs on) with `forward` and scores
    it against `target` ([3, H, W] in [0, 1]) by the convention above, on that device."""
    restored = to_8bit(restore_tiled(forward, degraded, tile, overlap))
    target8 = to_8bit(target.to(restored.device))
    return Scored(restored, target8, scores_8bit(restored, target8, crop_border))


def score_unrestored(degraded: torch.Tensor, target: torch.Tensor, crop_border: int = 0) -> dict[str, float]:
    """The METRICS of a degraded input itself ([3, H, W]), as a restoration of it would be scored."""
    return scores_8bit(to_8bit(degraded), to_8bit(target.to(degraded.device)), crop_border)


def validate(cfg: RunConfig, strategy: Strategy, rank: int, world_size: int) -> dict[str, Any]:
    """Collective: the mean METRICS over the validation set (each rank scores its part, whole images,
    tiled as `kitdist.evaluate` tiles them). RNG states are left as they were, so validating (or not,
    e.g. at the end of a shorter run) never changes the training that follows: a resumed run stays the
    run that would have happened."""
    if not cfg.data.val_shards:
        return {}
    python_state, numpy_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[strategy.device] if strategy.device.type == "cuda" else []):
        result = _validate(cfg, strategy, rank, world_size)
    random.setstate(python_state)
    np.random.set_state(numpy_state)
    return result


@torch.no_grad()
def _validate(cfg: RunConfig, strategy: Strategy, rank: int, world_size: int) -> dict[str, Any]:
    from kitdist.data import val_batches

    images = list(val_batches(cfg, rank, world_size))
    # ZeRO-3 gathers parameters inside forward, a collective: every rank runs as many forwards as the
    # rank with the most tiles (agreed before any forward; a rank with fewer runs the difference on a
    # small blank image and ignores the results).
    forwards = sum(count_tiles(*batch["input"].shape[-2:], DEFAULT_TILE, DEFAULT_OVERLAP) for batch in images)
    blanks = max(all_gather_objects(forwards)) - forwards
    strategy.train(False)
    sums = dict.fromkeys(METRICS, 0.0)
    for batch in images:
        scored = restore_and_score(
            lambda x: strategy.forward(x.to(strategy.input_dtype)).float(),
            batch["input"][0].to(strategy.device),
            batch["target"][0],
        )
        for name in METRICS:
            sums[name] += scored.metrics[name]
    for _ in range(blanks):
        strategy.forward(torch.zeros(1, 3, SPATIAL_MULTIPLE, SPATIAL_MULTIPLE, device=strategy.device))
    strategy.train(True)
    return _means(sums, len(images), strategy.device)


def _means(sums: dict[str, float], images: int, device: torch.device) -> dict[str, Any]:
    """Collective: the means over every rank's images."""
    *totals, count = all_reduce_sum([*sums.values(), float(images)], device)
    record: dict[str, Any] = {
        f"val_{name}": total / max(count, 1.0) for name, total in zip(sums, totals, strict=True)
    }
    record["val_images"] = int(count)
    record["val_convention"] = f"mean over images of per-image values; {conventions(0)['psnr_rgb']}"
    return record
