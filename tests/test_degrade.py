"""Synthetic degradations on a real photograph: noise level, blur and JPEG effects, determinism."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image
from skimage.metrics import peak_signal_noise_ratio

from kitdist.config import ConfigError, DegradeConfig
from kitdist.data import degrade as D


@pytest.fixture(scope="module")
def photo(photo_paths) -> np.ndarray:
    with Image.open(photo_paths[0]) as image:
        return np.asarray(image.convert("RGB"), dtype=np.float32)[:256, :256] / 255.0


@pytest.mark.parametrize("sigma", [5.0, 25.0, 50.0])
def test_noise_std_matches_sigma(photo, sigma):
    noisy = D.add_gaussian_noise(photo, sigma, seed=0)
    measured = float(np.std(noisy - photo)) * 255.0
    assert measured == pytest.approx(sigma, rel=0.02)
    assert abs(float(np.mean(noisy - photo))) * 255 < 0.5


def test_blur_smooths_and_keeps_the_mean(photo):
    blurred = D.gaussian_blur(photo, 2.0)
    high_freq = lambda x: np.abs(np.diff(x, axis=1)).mean()  # noqa: E731
    assert high_freq(blurred) < 0.6 * high_freq(photo)
    assert float(blurred.mean()) == pytest.approx(float(photo.mean()), abs=2e-3)


def test_jpeg_lowers_psnr_with_quality(photo):
    psnr = {
        q: peak_signal_noise_ratio(photo, D.jpeg_compress(photo, q), data_range=1.0) for q in (10, 50, 95)
    }
    assert psnr[10] < psnr[50] < psnr[95] < 60
    assert psnr[10] > 20  # still the same picture


def test_same_generator_state_gives_the_same_output(photo):
    cfg = DegradeConfig(noise_prob=1.0, blur_prob=0.5, jpeg_prob=0.5)
    first = D.degrade(photo, cfg, np.random.default_rng(123))
    again = D.degrade(photo, cfg, np.random.default_rng(123))
    other = D.degrade(photo, cfg, np.random.default_rng(124))
    assert np.array_equal(first, again)
    assert not np.array_equal(first, other)


def test_disabled_kinds_leave_the_image_alone(photo):
    cfg = DegradeConfig(noise_prob=0.0, blur_prob=0.0, jpeg_prob=0.0)
    assert np.array_equal(D.degrade(photo, cfg, np.random.default_rng(0)), photo)


def test_sigma_is_drawn_from_the_configured_range(photo):
    cfg = DegradeConfig(noise_sigma=(10.0, 20.0))
    sigmas = [np.std(D.degrade(photo, cfg, np.random.default_rng(s)) - photo) * 255 for s in range(40)]
    assert 9.5 < min(sigmas) and max(sigmas) < 20.5
    assert max(sigmas) - min(sigmas) > 5  # drawn, not fixed


def test_multi_task_is_a_config_change(photo):
    rng = np.random.default_rng(0)
    only_jpeg = D.degrade(photo, DegradeConfig(noise_prob=0.0, jpeg_prob=1.0, jpeg_quality=(20, 20)), rng)
    assert np.array_equal(only_jpeg, D.jpeg_compress(photo, 20))


@pytest.mark.parametrize(
    "kwargs, key",
    [({"noise_prob": 1.5}, "degrade.noise_prob"), ({"blur_sigma": (3.0, 1.0)}, "degrade.blur_sigma")],
)
def test_bad_degrade_config_names_the_key(kwargs, key):
    with pytest.raises(ConfigError, match=key):
        DegradeConfig(**kwargs)
