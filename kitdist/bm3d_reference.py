"""BM3D, the classical denoiser learned ones are measured against, as a reference on the same test inputs
as a model (`python -m kitdist.evaluate --bm3d-sigma S`): PyPI `bm3d` (`bm3d_rgb`) told the true noise
sigma, scored in the model's conventions. `bm3d` is free for non-commercial use only, so kitdist does not
install it: without it the results say so instead of failing the evaluation.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from kitdist.train.validation import METRICS, score_unrestored

BM3D_MISSING = "not installed: pip install bm3d (its licence: non-commercial use)"


def bm3d_denoiser(sigma: float) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """BM3D (PyPI `bm3d`, `bm3d_rgb`) told the noise sigma (0-255 scale): a function of an [3, H, W] float
    tensor in [0, 1] scale; None when the package is not installed."""
    if sigma <= 0:
        raise ValueError(f"--bm3d-sigma: the noise sigma on the 0-255 scale is > 0, got {sigma}")
    try:
        from bm3d import bm3d_rgb
    except ImportError:
        return None

    def denoise(noisy: torch.Tensor) -> torch.Tensor:
        pixels = noisy.detach().cpu().permute(1, 2, 0).double().numpy()
        return torch.from_numpy(bm3d_rgb(pixels, sigma_psd=sigma / 255.0)).permute(2, 0, 1).float()

    return denoise


def score_bm3d(
    denoise: Callable[[torch.Tensor], torch.Tensor], batch: dict, crop_border: int
) -> dict[str, float]:
    """BM3D's output on one image, scored as a restoration is (8-bit rounded, same convention)."""
    scores = score_unrestored(denoise(batch["input"][0]), batch["target"][0], crop_border)
    return {f"bm3d_{name}": value for name, value in scores.items()}


def bm3d_summary(sigma: float, records: list[dict] | None) -> dict[str, Any]:
    """BM3D's means over the images (records scored with it), in the same conventions as the model's; or,
    records None, why there are none."""
    method = f"BM3D (bm3d_rgb, told sigma {sigma:g})"
    if records is None:
        return {"method": method, "sigma": sigma, "error": BM3D_MISSING}
    means = {name: float(np.mean([r[f"bm3d_{name}"] for r in records])) for name in METRICS}
    return {"method": method, "sigma": sigma, **means}


def bm3d_line(bm3d: dict[str, Any]) -> str:
    """BM3D's means in one line, or why there are none."""
    if "error" in bm3d:
        return bm3d["error"]
    return (
        f"PSNR RGB {bm3d['psnr_rgb']:.2f} dB, SSIM RGB {bm3d['ssim_rgb']:.4f}, "
        f"PSNR Y {bm3d['psnr_y']:.2f} dB, SSIM Y {bm3d['ssim_y']:.4f}"
    )
