"""Per-sample geometry and seeding: random crops (aligned for pairs), the 8 flips/rotations, centre tiles,
and the seed of every random choice as a pure function of (seed, epoch, sample key, round).

Nothing here keeps state: a sample's crop, orientation and noise follow from its key and the epoch, so a
resumed run, another worker count or another rank draws exactly the same ones.
"""

from __future__ import annotations

import hashlib

import numpy as np

# Validation draws its degradations from the key alone, under this fixed salt, so validation numbers are
# comparable between runs whatever their training seed.
VAL_SALT = 0x5EED_FA11


def key_hash(key: str) -> int:
    """A stable 63-bit integer of a sample key (Python's hash() changes between processes)."""
    return int.from_bytes(hashlib.blake2b(key.encode("utf-8"), digest_size=8).digest(), "little") >> 1


def sample_rng(seed: int, epoch: int, key: str, round_: int = 0) -> np.random.Generator:
    """The generator of one sample's random choices in one epoch. `round_` > 0 only when a worker must
    re-read samples to fill a batch that lost corrupt ones, so such a refill gets other crops."""
    return np.random.default_rng([seed & 0xFFFFFFFF, epoch, key_hash(key), round_])


def val_rng(key: str) -> np.random.Generator:
    return np.random.default_rng([VAL_SALT, key_hash(key)])


def random_crop_box(height: int, width: int, size: int, rng: np.random.Generator) -> tuple[int, int]:
    """Top-left corner of a `size` x `size` crop drawn uniformly inside a height x width image."""
    if height < size or width < size:
        raise ValueError(f"image {height}x{width} is smaller than the {size}x{size} crop")
    return int(rng.integers(0, height - size + 1)), int(rng.integers(0, width - size + 1))


def centre_box(height: int, width: int, size: int) -> tuple[int, int]:
    return max(0, (height - size) // 2), max(0, (width - size) // 2)


def crop(image: np.ndarray, top: int, left: int, size: int) -> np.ndarray:
    return image[top : top + size, left : left + size]


def orient(image: np.ndarray, code: int) -> np.ndarray:
    """One of the 8 dihedral transforms: bit 2 flips left-right, bits 0-1 rotate by 90 degrees."""
    if code & 4:
        image = image[:, ::-1]
    return np.rot90(image, k=code & 3, axes=(0, 1))


def to_float(pixels: np.ndarray) -> np.ndarray:
    """uint8 HWC -> float32 HWC in [0, 1], contiguous."""
    return np.ascontiguousarray(pixels, dtype=np.float32) / np.float32(255.0)
