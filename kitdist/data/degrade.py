"""Synthetic degradations for pre-training: Gaussian blur, Gaussian noise, JPEG artifacts.

Every function is pure: `draw` turns an explicit `numpy.random.Generator` into one sample's choices, and
`apply` turns a clean image (float32 HWC in [0, 1]) and those choices into a new image, so the same
generator state gives the same output in any process. The kinds apply in the order a camera pipeline
would (blur, then sensor noise, then compression), each with its probability from `DegradeConfig`;
multi-task pre-training is a config change. `degrade` is draw + apply.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from scipy.ndimage import gaussian_filter

from kitdist.config import DegradeConfig


def add_gaussian_noise(image: np.ndarray, sigma_255: float, seed: int) -> np.ndarray:
    """Adds white Gaussian noise of std `sigma_255` on the 0-255 scale. Not clipped: the noise of the
    AWGN benchmarks (CBSD68 sigma=50 and the like) is unclipped, and clipping would lower its std.
    The normals come from torch's vectorised sampler (3x numpy's), seeded with `seed`, drawn in HWC order
    (`kitdist.data.batch.finish` draws the same ones on the trainer's device)."""
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn(image.shape, generator=generator, dtype=torch.float32).numpy()
    noise *= np.float32(sigma_255 / 255.0)
    noise += image
    return noise


def gaussian_blur(image: np.ndarray, sigma_px: float) -> np.ndarray:
    """Blurs each channel with an isotropic Gaussian of std `sigma_px` pixels (reflected borders)."""
    if sigma_px <= 0:
        return image.copy()
    return gaussian_filter(image, sigma=(sigma_px, sigma_px, 0), mode="reflect").astype(np.float32)


def jpeg_compress(image: np.ndarray, quality: int) -> np.ndarray:
    """Encodes to JPEG at `quality` (4:2:0, like most cameras) and decodes again."""
    pixels = np.clip(np.rint(image * 255.0), 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=int(quality))
    buffer.seek(0)
    with Image.open(buffer) as decoded:
        return np.asarray(decoded.convert("RGB"), dtype=np.float32) / 255.0


@dataclass(frozen=True)
class Draw:
    """The random choices of one sample's degradation: which kinds apply and with what strength."""

    blur: float  # Gaussian blur std in pixels; 0 = none
    noise: float  # Gaussian noise std on the 0-255 scale; 0 = none
    jpeg: int  # JPEG quality; 0 = none
    noise_seed: int  # seeds the noise's torch generator


def draw(cfg: DegradeConfig, rng: np.random.Generator) -> Draw:
    """Draws one sample's degradation. The generator is always consumed the same way (every draw happens
    whether or not a kind applies), so one kind's probability does not shift another's random numbers."""
    use_blur, use_noise, use_jpeg = rng.random(3) < (cfg.blur_prob, cfg.noise_prob, cfg.jpeg_prob)
    blur_sigma = rng.uniform(*cfg.blur_sigma)
    noise_sigma = rng.uniform(*cfg.noise_sigma)
    quality = int(rng.integers(cfg.jpeg_quality[0], cfg.jpeg_quality[1] + 1))
    noise_seed = int(np.random.default_rng(rng.integers(0, 2**63)).integers(2**63))
    return Draw(
        blur=float(blur_sigma) if use_blur else 0.0,
        noise=float(noise_sigma) if use_noise else 0.0,
        jpeg=quality if use_jpeg else 0,
        noise_seed=noise_seed,
    )


def apply(image: np.ndarray, chosen: Draw, noise: bool = True) -> np.ndarray:
    """`chosen` applied to a clean float32 HWC image, in camera order (blur, noise, JPEG); `noise=False`
    leaves the noise out (the trainer adds it: see `kitdist.data.batch`)."""
    out = image
    if chosen.blur > 0:
        out = gaussian_blur(out, chosen.blur)
    if noise and chosen.noise > 0:
        out = add_gaussian_noise(out, chosen.noise, chosen.noise_seed)
    if chosen.jpeg:
        out = jpeg_compress(out, chosen.jpeg)
    return out if out is not image else image.copy()


def degrade(image: np.ndarray, cfg: DegradeConfig, rng: np.random.Generator) -> np.ndarray:
    """Applies the enabled degradations to a clean float32 HWC image."""
    return apply(image, draw(cfg, rng))
