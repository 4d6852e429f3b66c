"""Image-quality metrics: PSNR and SSIM (the training losses are in `kitdist.train.losses`).

Every metric here states its convention, because restoration papers mix them: the colour space (`rgb`
or `y`, BT.601 luma as in MATLAB's rgb2ycbcr), the border cropped before measuring, and the data range.
Inputs are float tensors [B, 3, H, W] in [0, 1]; results are per-image tensors [B] so that ranks can sum
them and reduce. SSIM follows Wang et al. 2004 with an 11-tap Gaussian window (sigma 1.5), K1=0.01,
K2=0.03, "valid" filtering and population covariance, i.e. skimage's
`structural_similarity(gaussian_weights=True, sigma=1.5, use_sample_covariance=False)`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class MetricConvention:
    """How a PSNR/SSIM number was measured; printed beside every reported value."""

    space: Literal["rgb", "y"] = "rgb"
    crop_border: int = 0
    data_range: float = 1.0

    def describe(self) -> str:
        return f"{self.space.upper()}, crop {self.crop_border}px, data range {self.data_range:g}"


def rgb_to_y(image: torch.Tensor) -> torch.Tensor:
    """BT.601 luma in [16/255, 235/255] from RGB in [0, 1] ([B, 3, H, W] -> [B, 1, H, W])."""
    weights = image.new_tensor([65.481, 128.553, 24.966]).view(1, 3, 1, 1) / 255.0
    return (image * weights).sum(dim=1, keepdim=True) + 16.0 / 255.0


def _prepare(image: torch.Tensor, convention: MetricConvention) -> torch.Tensor:
    image = image.double()
    if convention.space == "y":
        image = rgb_to_y(image)
    border = convention.crop_border
    if border:
        image = image[..., border:-border, border:-border]
    return image * (convention.data_range / 1.0)


def psnr(output: torch.Tensor, target: torch.Tensor, convention: MetricConvention) -> torch.Tensor:
    """Per-image PSNR in dB ([B]); images are clamped to [0, 1] first, as a saved image would be."""
    a = _prepare(output.clamp(0, 1), convention)
    b = _prepare(target.clamp(0, 1), convention)
    mse = (a - b).square().flatten(1).mean(dim=1)
    return 10.0 * torch.log10(convention.data_range**2 / mse.clamp_min(1e-20))


def _gaussian_window(size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    coords = torch.arange(size, dtype=torch.float64) - size // 2
    kernel = torch.exp(-(coords**2) / (2 * sigma**2))
    return kernel / kernel.sum()


def ssim(output: torch.Tensor, target: torch.Tensor, convention: MetricConvention) -> torch.Tensor:
    """Per-image SSIM ([B]), the mean over channels of the mean SSIM map."""
    a = _prepare(output.clamp(0, 1), convention)
    b = _prepare(target.clamp(0, 1), convention)
    channels = a.shape[1]
    kernel = _gaussian_window().to(a.device)
    # Separable Gaussian filter applied per channel ("valid" region only, as skimage crops it).
    rows = kernel.view(1, 1, 1, -1).repeat(channels, 1, 1, 1)
    cols = kernel.view(1, 1, -1, 1).repeat(channels, 1, 1, 1)

    def blur(x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(F.conv2d(x, rows, groups=channels), cols, groups=channels)

    c1 = (0.01 * convention.data_range) ** 2
    c2 = (0.03 * convention.data_range) ** 2
    mu_a, mu_b = blur(a), blur(b)
    var_a = blur(a * a) - mu_a.square()
    var_b = blur(b * b) - mu_b.square()
    cov = blur(a * b) - mu_a * mu_b
    ssim_map = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / (
        (mu_a.square() + mu_b.square() + c1) * (var_a + var_b + c2)
    )
    return ssim_map.flatten(2).mean(dim=2).mean(dim=1)
