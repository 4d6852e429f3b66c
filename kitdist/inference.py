"""A trained KiT ready to restore: weights from any storage URL, the model size they belong to, tiling.

    >>> restorer = load_restorer("runs/embedded/step-00000060")       # folder or weights.safetensors
    >>> restored = restorer.restore(noisy)                              # float32 HWC in [0, 1], any size

The model size comes from the `config.yaml` that training writes beside `weights.safetensors`; a bare
weights file is matched against the named sizes by its tensor shapes. Asking for one size while the
weights hold another fails with a message naming both, except where a size changed its architecture
(`kitdist.model.sizes.FORMER_ARCHITECTURES`): weights written under the old name that fit the former
architecture load as it (`debug` checkpoints from before the new skeleton load as `debug_v1`).

`self_ensemble=True` restores each tile in its 8 orientations (rotations by 90 degrees, each also mirrored),
turns the 8 results back and averages them: the "+" variant restoration papers report (EDSR+, SwinIR+),
8x the compute for a few tenths of a dB (benchmarks/RESULTS.md). KiT is not equivariant to these maps
(the patch grid, LSH rotations and learned position biases all have a direction), so the 8 differ.

Large images are restored in overlapping tiles. Each tile's result is weighted by a window that is 0 in a
margin along every edge that borders another tile, then ramps linearly to 1 across the rest of the overlap:
a seam would come from pixels near a tile's inner edge (they see less context), and those get no weight,
while the ramp hides the remaining tile-to-tile difference of a non-local model. Inside tiles the model pads
to its multiple of 32 itself.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import yaml

from kitdist import checkpoints, storage
from kitdist.checkpoints import WeightsError
from kitdist.config import ConfigError, ModelConfig, RunConfig, from_dict
from kitdist.model import SIZES, build_model
from kitdist.model.sizes import FORMER_ARCHITECTURES
from kitdist.preflight import size_with_shapes

log = logging.getLogger(__name__)
DEFAULT_TILE = 512
DEFAULT_OVERLAP = 64


@dataclass(frozen=True)
class TilePlan:
    """Where tiles go along one axis: their start offsets and common length."""

    starts: tuple[int, ...]
    length: int


def plan_axis(size: int, tile: int, overlap: int) -> TilePlan:
    """Tile starts covering [0, size): step `tile - overlap`, the last tile flush with the end."""
    if size <= tile:
        return TilePlan((0,), size)
    step = tile - overlap
    starts = list(range(0, size - tile, step)) + [size - tile]
    return TilePlan(tuple(starts), tile)


def blend_window(length: int, lead: bool, trail: bool, overlap: int) -> torch.Tensor:
    """1-D tile weights [length]: 0 in a margin of overlap/4 at an edge shared with another tile (`lead`
    / `trail`), then a linear ramp to 1 over the rest of the overlap; 1 at the image's own edges."""
    window = torch.ones(length, dtype=torch.float64)
    margin = overlap // 4
    ramp = torch.arange(1, overlap - 2 * margin + 1, dtype=torch.float64) / (overlap - 2 * margin + 1)
    profile = torch.cat([torch.zeros(margin, dtype=torch.float64), ramp])  # [overlap - margin]
    if lead:
        window[: profile.numel()] = profile
    if trail:
        window[length - profile.numel() :] = torch.minimum(
            window[length - profile.numel() :], profile.flip(0)
        )
    return window


def check_tiling(tile: int, overlap: int) -> None:
    if tile < 32 or tile % 32:
        raise ValueError(f"--tile must be a positive multiple of 32 (the model's padding unit), got {tile}")
    if overlap < 8 or 2 * overlap >= tile:
        raise ValueError(f"--overlap must lie in [8, tile/2), got {overlap} with tile {tile}")


def count_tiles(height: int, width: int, tile: int, overlap: int) -> int:
    return len(plan_axis(height, tile, overlap).starts) * len(plan_axis(width, tile, overlap).starts)


def restore_tiled(
    fn: Callable[[torch.Tensor], torch.Tensor],
    image: torch.Tensor,
    tile: int = DEFAULT_TILE,
    overlap: int = DEFAULT_OVERLAP,
    batch: int = 1,
    on_tile: Callable[[], None] | None = None,
) -> torch.Tensor:
    """Applies `fn` ([B, 3, h, w] -> same) to `image` [3, H, W] tile by tile and blends the results."""
    check_tiling(tile, overlap)
    _, height, width = image.shape
    rows, cols = plan_axis(height, tile, overlap), plan_axis(width, tile, overlap)
    boxes = [(top, left) for top in rows.starts for left in cols.starts]
    total = torch.zeros(image.shape, dtype=torch.float64, device=image.device)
    weights = torch.zeros((1, height, width), dtype=torch.float64, device=image.device)
    for first in range(0, len(boxes), batch):
        chunk = boxes[first : first + batch]
        tiles = torch.stack([image[:, t : t + rows.length, c : c + cols.length] for t, c in chunk])
        outputs = fn(tiles).double()  # [b, 3, rows.length, cols.length]
        for (top, left), output in zip(chunk, outputs, strict=True):
            window = _tile_window(top, left, rows, cols, height, width, overlap).to(image.device)
            total[:, top : top + rows.length, left : left + cols.length] += output * window
            weights[:, top : top + rows.length, left : left + cols.length] += window
            if on_tile is not None:
                on_tile()
    return (total / weights).to(image.dtype)


def _tile_window(
    top: int, left: int, rows: TilePlan, cols: TilePlan, height: int, width: int, overlap: int
) -> torch.Tensor:
    """The 2-D weights [rows.length, cols.length] of one tile: the outer product of its axis windows."""
    vertical = blend_window(rows.length, top > 0, top + rows.length < height, overlap)
    horizontal = blend_window(cols.length, left > 0, left + cols.length < width, overlap)
    return vertical[:, None] * horizontal[None, :]


DIHEDRAL_ORIENTATIONS = 8


def orient(batch: torch.Tensor, index: int) -> torch.Tensor:
    """Orientation `index` (0-7) of `[B, C, H, W]`: rotated by `index % 4` quarter turns, mirrored left-right
    first when `index >= 4`. 0 is the identity."""
    if index >= 4:
        batch = batch.flip(-1)
    return torch.rot90(batch, index % 4, dims=(-2, -1))


def unorient(batch: torch.Tensor, index: int) -> torch.Tensor:
    """The inverse of `orient(., index)`."""
    batch = torch.rot90(batch, -(index % 4), dims=(-2, -1))
    return batch.flip(-1) if index >= 4 else batch


def ensembled(fn: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[torch.Tensor], torch.Tensor]:
    """`fn` ([B, 3, h, w] -> same) applied in all 8 orientations, turned back and averaged."""

    def forward(batch: torch.Tensor) -> torch.Tensor:
        total = fn(batch).double()
        for index in range(1, DIHEDRAL_ORIENTATIONS):
            total += unorient(fn(orient(batch, index)), index).double()
        return (total / DIHEDRAL_ORIENTATIONS).to(batch.dtype)

    return forward


def add_self_ensemble_argument(parser: argparse.ArgumentParser) -> None:
    """`--self-ensemble`, as every command that restores takes it (Restorer.self_ensemble)."""
    parser.add_argument(
        "--self-ensemble",
        action="store_true",
        help="restore in the 8 orientations (quarter turns, each mirrored) and average: a few tenths of a "
        "dB for 8x the time",
    )


@dataclass
class Restorer:
    """A KiT in eval mode on its device, with the facts a report needs about where it came from."""

    model: torch.nn.Module
    model_cfg: ModelConfig
    weights_url: str
    device: torch.device
    precision: str = "fp32"  # "bf16": autocast on CUDA (faster; outputs differ by ~1e-3)
    self_ensemble: bool = False  # every forward averages the 8 orientations (see the module docstring)

    @property
    def size_name(self) -> str:
        return self.model_cfg.size

    def forward(self, batch: torch.Tensor) -> torch.Tensor:
        """[B, 3, h, w] float32 in [0, 1] -> restored, same shape (not clamped); with `self_ensemble` the
        mean of the 8 orientations' restorations."""
        if self.self_ensemble:
            return ensembled(self._forward_once)(batch)
        return self._forward_once(batch)

    def _forward_once(self, batch: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            if self.precision == "bf16" and self.device.type == "cuda":
                with torch.autocast("cuda", dtype=torch.bfloat16):
                    return self.model(batch.to(self.device)).float()
            return self.model(batch.to(self.device)).float()

    def restore(
        self,
        image: np.ndarray,
        tile: int = DEFAULT_TILE,
        overlap: int = DEFAULT_OVERLAP,
        batch: int = 1,
        on_tile: Callable[[], None] | None = None,
    ) -> np.ndarray:
        """float32 HWC RGB in [0, 1] (noisy inputs may leave it) -> restored float32 HWC in [0, 1]."""
        tensor = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32)).permute(2, 0, 1)
        restored = restore_tiled(self.forward, tensor.to(self.device), tile, overlap, batch, on_tile)
        return restored.clamp(0, 1).permute(1, 2, 0).cpu().numpy()


def pick_device(name: str = "auto") -> torch.device:
    """ "auto": a GPU when there is one, else the CPU; "auto" and "cuda" take the GPU the launcher meant
    for this process (`kitdist.distributed.env.choose_device`: LOCAL_RANK, Ray's assignment), "cuda:N" that one.
    A GPU is made the current device (`kitdist.distributed.env.use_device`)."""
    from kitdist.distributed.env import LauncherFacts, choose_device, use_device

    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: no CUDA GPU is visible to PyTorch")
    if name in ("auto", "cuda"):
        device = choose_device(torch.cuda.is_available(), LauncherFacts.of_this_process())
    else:
        device = torch.device(name)
    use_device(device)
    return device


def load_restorer(
    url: str,
    size: str | None = None,
    device: str = "auto",
    precision: str = "fp32",
    self_ensemble: bool = False,
) -> Restorer:
    """The model whose weights are at `url` (a file, a checkpoint or a run folder: see
    `kitdist.checkpoints.weights_url`), in eval mode on `device`; `self_ensemble`: x8 (see the module
    docstring)."""
    resolved = checkpoints.weights_url(url)
    weights = checkpoints.load_weights_url(resolved)
    model_cfg = _model_config(resolved, weights, size)
    model = build_model(dataclasses.replace(model_cfg, checkpoint_activations=False))
    model.load_state_dict(weights, strict=True)
    target = pick_device(device)
    return Restorer(model.eval().to(target), model_cfg, resolved, target, precision, self_ensemble)


def _model_config(weights_url: str, weights: dict[str, torch.Tensor], asked: str | None) -> ModelConfig:
    """The ModelConfig the weights were trained with (config.yaml beside them, else --model or the shapes);
    fails naming both sizes when they disagree."""
    run = recorded_run_config(weights_url)
    recorded = run.model if run is not None else None
    held = size_of_weights(weights)
    if recorded is not None and asked is not None and recorded.size != asked:
        raise WeightsError(
            f"{weights_url}: these weights are for model size {recorded.size!r} (its {checkpoints.CONFIG}), "
            f"but model size {asked!r} was asked for"
        )
    cfg = recorded or ModelConfig(size=asked or held or "debug")
    if held is not None and held == FORMER_ARCHITECTURES.get(cfg.size):
        log.warning("%s: weights of model size %r from before its change: loading them as %r", weights_url,
                    cfg.size, held)  # fmt: skip
        cfg = dataclasses.replace(cfg, size=held)
    if held != cfg.size:
        found = f"model size {held!r}" if held else "no named model size (" + ", ".join(SIZES) + ")"
        raise WeightsError(
            f"{weights_url}: the weights' tensor shapes fit {found}, but model size {cfg.size!r} was asked for"
        )
    return cfg


def recorded_run_config(weights_url: str) -> RunConfig | None:
    """The run config training wrote beside the weights (`config.yaml`), if there is one."""
    config_url = checkpoints.config_beside(weights_url)
    if not storage.exists(config_url):
        return None
    try:
        tree = yaml.safe_load(storage.read_text(config_url)) or {}
        return from_dict(RunConfig, tree)
    except (yaml.YAMLError, ConfigError) as err:
        raise WeightsError(f"{config_url}: not a kitdist run config ({err})") from None


def size_of_weights(weights: dict[str, torch.Tensor]) -> str | None:
    """The named size whose parameter names and shapes the weights match exactly, if any."""
    return size_with_shapes({name: tuple(tensor.shape) for name, tensor in weights.items()})
