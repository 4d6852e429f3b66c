"""The named KiT sizes, and how a `ModelConfig` turns into the exact architecture to build.

The paper (supplementary Table 2) fixes the skeleton: a 3x3 input conv to C channels, three encoder stages
and a bottleneck, channels doubling as resolution halves, a mirrored decoder, patch size r = 4, chunk size
k = 4 in encoder/decoder and k = 1 in the bottleneck, b = 2 in every stage, and the totals 20.6 M parameters
and 43.08 GMACs at 256x256. Everything else is our choice, made to land on those totals:

- C = 48 and heads of 24 channels (2, 4, 8, 16 heads per level), so every head hashes a 24 x 16 = 384-dim
  patch descriptor.
- One KTB per encoder and decoder stage and 10 in the bottleneck. A block costs about the same MACs at
  every level (channels double while pixels quarter) but 4x the parameters one level down, so the two
  totals together pin the width and where the depth sits. Measured (meta device, 256x256):
  C=48, 1/10/1, FFN 3.875: 20.55 M (-0.3%), 43.48 G (+0.9%)  <- `kit`
  C=48, 1/10/1, FFN 4:     20.95 M (+1.7%), 44.10 G (+2.4%)
  C=48, 2/9/2,  FFN 4:     20.35 M (-1.2%), 56.71 G (+32%)   (deeper encoder/decoder costs MACs)
  C=52, 1/8/1,  FFN 4:     20.36 M (-1.2%), 47.08 G (+9.3%)
  C=40, 1/14/1, FFN 4:     19.57 M (-5.0%), 36.30 G (-16%)
  Uformer-like 2 blocks per stage at C=32 would need ~24 bottleneck blocks to reach the parameters.
- FFN: LeFF (Linear -> GELU -> 3x3 depthwise conv -> GELU -> Linear) as in Uformer, ratio 3.875 for `kit`
  (hidden 186 at C = 48): the depthwise conv adds the locality across patch borders that KLA lacks.
- Interpolation layers: bilinear x1/2 then 3x3 conv c -> 2c (down); bilinear x2 then 3x3 conv 2c -> c (up);
  skips concatenate and fuse with a 1x1 conv 2c -> c; a global residual adds the input to the output.
- MACs are counted forward, on the meta device with `FlopCounterMode` over the reference attention path
  (see `profile.py`); hashing (a ~log N cost per patch) is included, sort and gather cost time but 0 MACs.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from kitdist.config import ConfigError, ModelConfig


@dataclass(frozen=True)
class ModelSize:
    """One row of the size table: everything `KiT.__init__` needs."""

    channels: int  # C: channels of the first level (doubling per level down)
    encoder_blocks: tuple[int, int, int]  # KTBs per encoder stage, level 1 to 3
    bottleneck_blocks: int
    decoder_blocks: tuple[int, int, int]  # KTBs per decoder stage, level 3 back up to 1
    head_dim: int  # channels per head; heads = level channels / head_dim
    ffn_ratio: float  # hidden channels of the LeFF FFN = ratio x channels
    patch_size: int = 4  # r
    chunk_size: int = 4  # k in encoder and decoder stages
    bottleneck_chunk_size: int = 1  # k in the bottleneck (paper: only N/64 patches there)
    hash_rounds: int = 2  # b
    num_buckets: int | None = None  # None: N/k rounded to even, per stage
    look_back: bool = False

    @property
    def spatial_multiple(self) -> int:
        """Inputs are padded to a multiple of this: a whole patch at the lowest of the 3 downsamplings."""
        return self.patch_size * 2**3


SIZES: dict[str, ModelSize] = {
    # tests and CPU demos: 0.43 M parameters, ~60 ms forward of one 64x64 image on 2 cores
    "debug": ModelSize(
        channels=16, encoder_blocks=(1, 1, 1), bottleneck_blocks=1, decoder_blocks=(1, 1, 1),
        head_dim=16, ffn_ratio=2.0,
    ),
    # a quick real run: 2.2 M parameters
    "small": ModelSize(
        channels=32, encoder_blocks=(1, 1, 1), bottleneck_blocks=2, decoder_blocks=(1, 1, 1),
        head_dim=16, ffn_ratio=2.0,
    ),
    # the paper's: 20.6 M parameters, 43.08 GMACs at 256x256 (supplementary, section 5)
    "kit": ModelSize(
        channels=48, encoder_blocks=(1, 1, 1), bottleneck_blocks=10, decoder_blocks=(1, 1, 1),
        head_dim=24, ffn_ratio=3.875,
    ),
}  # fmt: skip


def resolve_size(cfg: ModelConfig) -> ModelSize:
    """The size row named by `cfg.size` with the fields `cfg` sets (not None) put over it."""
    if cfg.size not in SIZES:
        raise ConfigError(
            f"model.size: unknown size {cfg.size!r} (known sizes: {', '.join(SIZES)})", key="model.size"
        )
    overrides = {
        name: getattr(cfg, name)
        for name in ("patch_size", "chunk_size", "hash_rounds", "num_buckets", "look_back")
        if getattr(cfg, name) is not None
    }
    size = dataclasses.replace(SIZES[cfg.size], **overrides)
    for level in range(4):
        channels = size.channels * 2**level
        if channels % size.head_dim:
            raise ConfigError(
                f"model.size: {cfg.size!r} has {channels} channels at level {level + 1}, "
                f"not divisible by head_dim={size.head_dim}",
                key="model.size",
            )
    return size
