"""PSNR and SSIM against scikit-image on real photographs, in RGB and in Y; the losses' values."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from kitdist.train.losses import charbonnier_loss, l1_loss
from kitdist.train.metrics import MetricConvention, psnr, rgb_to_y, ssim


def pair(path, sigma: float = 0.08):
    with Image.open(path) as image:
        clean = np.asarray(image.convert("RGB"), dtype=np.float64)[:160, :192] / 255.0
    noisy = np.clip(clean + np.random.default_rng(0).normal(0, sigma, clean.shape), 0, 1)
    return clean, noisy


def as_tensor(image: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(image).permute(2, 0, 1)[None].float()


def y_of(image: np.ndarray) -> np.ndarray:
    return rgb_to_y(as_tensor(image).double())[0, 0].numpy()


@pytest.mark.parametrize("space, border", [("rgb", 0), ("y", 0), ("rgb", 4), ("y", 8)])
def test_psnr_and_ssim_match_skimage(photo_paths, space, border):
    convention = MetricConvention(space=space, crop_border=border)
    for path in photo_paths[:3]:
        clean, noisy = pair(path)
        a, b = as_tensor(noisy), as_tensor(clean)
        ref_clean = clean.astype(np.float32).astype(np.float64)
        ref_noisy = noisy.astype(np.float32).astype(np.float64)
        if space == "y":
            ref_clean, ref_noisy = y_of(ref_clean), y_of(ref_noisy)
        if border:
            ref_clean = ref_clean[border:-border, border:-border]
            ref_noisy = ref_noisy[border:-border, border:-border]
        channel_axis = None if space == "y" else 2
        expected_psnr = peak_signal_noise_ratio(ref_clean, ref_noisy, data_range=1.0)
        expected_ssim = structural_similarity(
            ref_clean,
            ref_noisy,
            data_range=1.0,
            channel_axis=channel_axis,
            gaussian_weights=True,
            sigma=1.5,
            use_sample_covariance=False,
        )
        assert psnr(a, b, convention).item() == pytest.approx(expected_psnr, abs=1e-6)
        assert ssim(a, b, convention).item() == pytest.approx(expected_ssim, abs=1e-6)


def test_identical_images_have_perfect_ssim_and_huge_psnr(photo_paths):
    clean, _ = pair(photo_paths[0])
    image = as_tensor(clean)
    assert ssim(image, image, MetricConvention()).item() == pytest.approx(1.0)
    assert psnr(image, image, MetricConvention()).item() > 100


def test_losses():
    output, target = torch.tensor([0.0, 1.0]), torch.tensor([0.5, 1.0])
    assert l1_loss(output, target).item() == pytest.approx(0.25)
    expected = (np.sqrt(0.25 + 1e-6) + 1e-3) / 2
    assert charbonnier_loss(output, target).item() == pytest.approx(expected, rel=1e-6)
