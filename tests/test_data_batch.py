"""The worker -> trainer batch format: uint8 crops with the noise drawn by the trainer, equal bit for bit to
degrading the whole sample in one place, for every mix of blur, noise and JPEG."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from kitdist.config import DataConfig, DegradeConfig, RunConfig, TrainConfig
from kitdist.data import transforms
from kitdist.data.batch import collate, finish
from kitdist.data.decode import train_item
from kitdist.data.degrade import degrade

MIXES = {
    "noise only": DegradeConfig(),
    "blur then noise": DegradeConfig(blur_prob=1.0, blur_sigma=(0.5, 2.0)),
    "noise then JPEG": DegradeConfig(jpeg_prob=1.0),
    "some of each": DegradeConfig(noise_prob=0.5, blur_prob=0.5, jpeg_prob=0.5),
    "nothing": DegradeConfig(noise_prob=0.0),
}


@pytest.fixture(scope="module")
def samples(photo_paths):
    """Eight real photographs as clean shard samples (PNG bytes under "clean.png")."""
    out = []
    for path in photo_paths[:8]:
        buffer = io.BytesIO()
        Image.open(path).convert("RGB").crop((0, 0, 112, 96)).save(buffer, format="PNG")
        out.append({"__key__": path.stem, "clean.png": buffer.getvalue()})
    return out


def one_place(sample: dict, cfg: RunConfig, epoch: int) -> tuple[np.ndarray, np.ndarray]:
    """The reference: crop, orient and degrade the whole sample in one process, all in float32."""
    pixels = np.asarray(Image.open(io.BytesIO(sample["clean.png"])).convert("RGB"))
    rng = transforms.sample_rng(cfg.train.seed, epoch, sample["__key__"], 0)
    top, left = transforms.random_crop_box(*pixels.shape[:2], cfg.data.crop_size, rng)
    code = int(rng.integers(8))
    target = transforms.to_float(
        transforms.orient(transforms.crop(pixels, top, left, cfg.data.crop_size), code)
    )
    return degrade(target, cfg.degrade, rng), target


@pytest.mark.parametrize("mix", MIXES)
def test_finished_batch_equals_degrading_in_one_place(samples, mix):
    cfg = RunConfig(data=DataConfig(crop_size=64), degrade=MIXES[mix], train=TrainConfig(seed=3))
    wire = collate([train_item(sample, cfg, epoch=2, round_=0) for sample in samples])
    assert wire["target"].dtype == torch.uint8 and wire["target"].shape == (8, 3, 64, 64)
    batch = finish(wire, "cpu")
    for index, sample in enumerate(samples):
        source, target = one_place(sample, cfg, epoch=2)
        assert batch["keys"][index] == sample["__key__"]
        assert np.array_equal(batch["target"][index].permute(1, 2, 0).numpy(), target)
        assert np.array_equal(batch["input"][index].permute(1, 2, 0).numpy(), source), mix


def test_noise_only_sends_no_input_and_a_quarter_of_the_bytes(samples):
    cfg = RunConfig(data=DataConfig(crop_size=64), train=TrainConfig(seed=3))
    wire = collate([train_item(sample, cfg, epoch=0, round_=0) for sample in samples])
    assert "input" not in wire
    sent = sum(value.numel() * value.element_size() for value in wire.values() if torch.is_tensor(value))
    finished = finish(wire)
    model_ready = finished["input"].numel() * 4 + finished["target"].numel() * 4
    assert sent < model_ready / 7
    noise = (finished["input"] - finished["target"]) * 255
    for index, sigma in enumerate(wire["noise_sigma"].tolist()):
        assert (
            abs(float(noise[index].std()) - sigma) < 0.06 * sigma + 0.05
        )  # 12288 normals: std within +-1.3 % at 2 sd


def test_finish_leaves_the_global_rng_alone(samples):
    """The LSH rotations draw from the global RNG; the data's noise must not shift them."""
    cfg = RunConfig(data=DataConfig(crop_size=64), train=TrainConfig(seed=3))
    wire = collate([train_item(sample, cfg, epoch=0, round_=0) for sample in samples])
    torch.manual_seed(11)
    expected = torch.rand(3)
    torch.manual_seed(11)
    finish(wire)
    assert torch.equal(torch.rand(3), expected)
