"""What a DataLoader worker sends to the trainer, and how the trainer turns it into model-ready tensors.

Workers do the CPU-bound part (read, decode, crop, orient, blur/JPEG when configured) and send pixels as
uint8 where they can: a clean training sample travels as its uint8 target crop plus the sigma and seed of
its Gaussian noise, and the trainer draws that noise on its own device (`finish`). On a GPU the noise then
costs the data workers nothing and the host-to-device copy is a quarter of float32's; on CPU `finish`
reproduces `degrade.add_gaussian_noise` bit for bit (same torch generator, seed and HWC draw order).

Wire batch: {"target": uint8 [b, 3, H, W], "input": uint8 or float32 [b, 3, H, W] (absent when every
input is its target before noise), "noise_sigma": float64 [b] (0-255 scale, 0 = none), "noise_seed":
int64 [b], "keys": [str], "epoch": int}. Finished batch: "input" and "target" float32 in [0, 1] (input
noisy, unclipped) on the requested device, the other fields unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from kitdist.data.transforms import to_float


@dataclass
class TrainItem:
    """One training sample as a worker produced it. `source` is None when the input is the target (before
    noise); uint8 HWC for paired sets, float32 HWC in [0, 1] when blur or JPEG made it."""

    key: str
    target: np.ndarray  # uint8 HWC
    source: np.ndarray | None = None
    noise_sigma: float = 0.0
    noise_seed: int = 0


def stack(arrays: list[np.ndarray]) -> torch.Tensor:
    """[H, W, 3] arrays -> one contiguous [b, 3, H, W] tensor (one copy, by numpy: torch's permute +
    contiguous costs ten times more here)."""
    return torch.from_numpy(np.stack([array.transpose(2, 0, 1) for array in arrays]))


def collate(items: list[TrainItem]) -> dict[str, Any]:
    """The wire batch of a list of items (see the module docstring)."""
    batch: dict[str, Any] = {
        "target": stack([item.target for item in items]),
        "noise_sigma": torch.tensor([item.noise_sigma for item in items], dtype=torch.float64),
        "noise_seed": torch.tensor([item.noise_seed for item in items], dtype=torch.int64),
        "keys": [item.key for item in items],
    }
    sources = [item.source for item in items]
    if any(source is not None for source in sources):
        if any(source is None or source.dtype != np.uint8 for source in sources):
            sources = [
                as_float(item.target) if source is None else as_float(source)
                for item, source in zip(items, sources, strict=True)
            ]
        batch["input"] = stack(sources)
    return batch


def as_float(pixels: np.ndarray) -> np.ndarray:
    """uint8 -> float32 in [0, 1]; float32 passes through."""
    return to_float(pixels) if pixels.dtype == np.uint8 else pixels


def _to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """An asynchronous copy to a GPU: from pinned memory (the DataLoader pins batches for a CUDA trainer;
    small tensors made here are pinned on the way), so the host never waits for the copy."""
    if device.type != "cuda":
        return tensor.to(device)
    if not tensor.is_pinned():
        tensor = tensor.pin_memory()
    return tensor.to(device, non_blocking=True)


def _to_unit(pixels: torch.Tensor, device: torch.device) -> torch.Tensor:
    pixels = _to_device(pixels, device)
    return pixels.float() / 255.0 if pixels.dtype == torch.uint8 else pixels.float()


def finish(batch: dict[str, Any], device: torch.device | str = "cpu") -> dict[str, Any]:
    """The wire batch made model-ready on `device`: float32 input (noise added here) and target."""
    device = torch.device(device)
    target = _to_unit(batch["target"], device)
    source = _to_unit(batch["input"], device) if "input" in batch else target
    size, channels, height, width = target.shape
    noise = torch.zeros((size, height, width, channels), device=device)  # HWC: the order degrade draws in
    sigmas = batch["noise_sigma"].tolist()
    for index, (sigma, seed) in enumerate(zip(sigmas, batch["noise_seed"].tolist(), strict=True)):
        if sigma > 0:
            generator = torch.Generator(device).manual_seed(seed)
            torch.randn((height, width, channels), generator=generator, device=device, out=noise[index])
    scale = _to_device(torch.tensor([sigma / 255.0 for sigma in sigmas], dtype=torch.float32), device)
    noise *= scale.view(size, 1, 1, 1)
    extra = {k: v for k, v in batch.items() if k not in ("input", "target", "noise_sigma", "noise_seed")}
    return {"input": source + noise.permute(0, 3, 1, 2), "target": target, **extra}
