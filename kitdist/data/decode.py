"""From a shard sample (bytes per field) to what a worker sends (training) or an (input, target) pair of
float32 HWC arrays in [0, 1] (validation).

Training (`train_item`): clean samples get a random crop, one of 8 orientations and the synthetic
degradations, the Gaussian noise as a sigma and seed for the trainer to draw; paired samples get the same
crop and orientation on input and target; pixels stay uint8 where they can (see `kitdist.data.batch`).
Validation (`val_pair`): whole images (or a centre tile), clean ones degraded with a generator drawn from
the key alone. Any sample that cannot be used raises `CorruptSample` with the reason.
"""

from __future__ import annotations

import io
from typing import Any

import numpy as np
from PIL import Image

from kitdist.config import RunConfig
from kitdist.data import transforms
from kitdist.data.batch import TrainItem
from kitdist.data.degrade import apply, degrade, draw

IMAGE_EXTENSIONS = ("png", "jpg", "jpeg", "webp", "ppm")


class CorruptSample(ValueError):
    """A sample that cannot be used; the message says why."""


def image_bytes(sample: dict[str, Any], role: str) -> bytes:
    for ext in IMAGE_EXTENSIONS:
        data = sample.get(f"{role}.{ext}")
        if data is not None:
            return data
    raise CorruptSample(f"sample {sample.get('__key__')!r} has no {role}.<png|jpg> field")


def decode_rgb(data: bytes, key: str) -> np.ndarray:
    """uint8 HWC RGB pixels of an encoded image."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            return np.asarray(image if image.mode == "RGB" else image.convert("RGB"))
    except Exception as err:  # PIL raises many types for bad data
        raise CorruptSample(f"sample {key!r}: cannot decode image ({type(err).__name__}: {err})") from None


def decode_pair(sample: dict[str, Any], kind: str) -> tuple[np.ndarray, np.ndarray | None]:
    """(target pixels, input pixels or None for clean sets)."""
    key = sample["__key__"]
    if kind == "clean":
        return decode_rgb(image_bytes(sample, "clean"), key), None
    target = decode_rgb(image_bytes(sample, "target"), key)
    source = decode_rgb(image_bytes(sample, "input"), key)
    if source.shape != target.shape:
        raise CorruptSample(f"sample {key!r}: input {source.shape[:2]} and target {target.shape[:2]} differ")
    return target, source


def train_item(sample: dict[str, Any], cfg: RunConfig, epoch: int, round_: int) -> TrainItem:
    """One training sample's crops as a worker sends them; every random choice comes from (seed, epoch,
    key). A clean sample's Gaussian noise is left to the trainer unless JPEG follows it."""
    key = sample["__key__"]
    target, source = decode_pair(sample, cfg.data.kind)
    rng = transforms.sample_rng(cfg.train.seed, epoch, key, round_)
    size = cfg.data.crop_size
    try:
        top, left = transforms.random_crop_box(target.shape[0], target.shape[1], size, rng)
    except ValueError as err:
        raise CorruptSample(f"sample {key!r}: {err}") from None
    code = int(rng.integers(8))
    # views, copied once when the batch is stacked
    target = transforms.orient(transforms.crop(target, top, left, size), code)
    if source is not None:
        return TrainItem(key, target, transforms.orient(transforms.crop(source, top, left, size), code))
    chosen = draw(cfg.degrade, rng)
    if chosen.jpeg:  # the noise must exist before the compression
        return TrainItem(key, target, apply(transforms.to_float(target), chosen))
    blurred = apply(transforms.to_float(target), chosen, noise=False) if chosen.blur > 0 else None
    return TrainItem(key, target, blurred, chosen.noise, chosen.noise_seed)


def val_pair(sample: dict[str, Any], cfg: RunConfig) -> tuple[np.ndarray, np.ndarray]:
    """(input, target) of one validation sample: whole, or its centre tile, deterministic per key."""
    key = sample["__key__"]
    target, source = decode_pair(sample, cfg.data.kind)
    size = cfg.data.val_crop_size
    if size and min(target.shape[:2]) >= size:
        top, left = transforms.centre_box(target.shape[0], target.shape[1], size)
        target = transforms.crop(target, top, left, size)
        source = None if source is None else transforms.crop(source, top, left, size)
    target = transforms.to_float(target)
    if source is None:
        return degrade(target, cfg.degrade, transforms.val_rng(key)), target
    return transforms.to_float(source), target
