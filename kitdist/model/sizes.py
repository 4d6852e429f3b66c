"""The named KiT sizes, and how a `ModelConfig` turns into the exact architecture to build.

The paper (supplementary Table 2) fixes the skeleton: a 3x3 input conv to C channels, three encoder stages
and a bottleneck, channels doubling as resolution halves, a mirrored decoder, patch size r = 4, chunk size
k = 4 in encoder/decoder and k = 1 in the bottleneck, "b = 2" in every stage, and the totals 20.6 M
parameters and 43.08 GMACs at 256x256. Everything else is ours to choose.

Two readings of "b = 2" (measured with `python -m kitdist.model.profile`, 256x256, batch 1):
- b = KTBs per stage (2 everywhere). Then MACs / parameters is fixed by the skeleton, whatever C, heads
  or FFN ratio: a block costs ~(4 + 2 ratio) c^2 HW_l MACs, the same at every level (channels double while
  pixels quarter), while its parameters grow 4x per level; 7 stages of 2 blocks give 14 HW-units of MACs
  for 2*(1+4+16+64+16+4+1) = 212 C^2-units of parameters. Hitting 20.6 M needs C ~ 88 and ~85 GMACs;
  hitting 43 G leaves ~10 M. Uformer-S (2 blocks per stage, C = 32, decoder on the concatenated skips)
  reaches 20.75 M / 41 G only through a fourth downsampling (16C = 512 channels at H/16); with Table 2's
  three it measures 5.16 M / 35.45 G (FlopCounterMode). The concatenated decoder doubles the decoder's
  cost: every "concat" configuration within 15 % of the parameters was 35-163 % over the MACs.
- b = hash rounds (our reading: the same b in every stage fits a per-layer LSH parameter, as in NLSA and
  Reformer; in the k = 1 bottleneck rounds change nothing). KTB counts are then free, and both totals
  pin where the depth sits: parameters want blocks deep, MACs want them few.

Conventions: "FlopCounterMode" counts every matmul (attention's q k^T and p v included: with b = 2 rounds
they add ~21/c of a block's linear MACs, +44 % at c = 48); "module hooks" counts Linear/Conv layers only,
as thop and ptflops' default backend do (what most papers' tables report, e.g. Restormer's 140 G). The
`kit` size is calibrated under module hooks:

| size | C | interp. | decoder | KTBs enc / bott. / dec | ratio | params | FlopCounter | hooks |
|---|---|---|---|---|---|---|---|---|
| `kit` | 48 | strided | fused | 1,1,4 / 8 / 4,1,1 | 4 | 20.28 M (-1.5 %) | 47.14 G (+9.4 %) | 42.52 G (-1.3 %) |
| `kit_v1` | 48 | bilinear | fused | 1,1,1 / 10 / 1,1,1 | 3.875 | 20.55 M (-0.3 %) | 43.50 G (+1.0 %) | 40.18 G (-6.7 %) |
| (Uformer-like) | 48 | strided | fused | 2,2,2 / 8 / 2,2,2 | 4 | 18.76 M (-8.9 %) | 49.25 G (+14 %) | 42.75 G (-0.8 %) |
| (more k-NN) | 48 | strided | fused | 2,2,4 / 8 / 4,2,2 | 4 | 20.57 M (-0.1 %) | 57.49 G (+33 %) | 50.11 G (+16 %) |

`kit` has k-NN attention (k = 4, hashed) in 12 of its 20 KTBs (`kit_v1`: 6 of 16), LeFF hidden widths
192 ... 1536 (multiples of 8; `kit_v1` had 186), heads of 16 channels (3 ... 24 heads; a power of two
suits Flex and tensor cores), and Uformer's interpolation layers, strided 4x4 conv down and 2x2
transposed conv up (4.5 GMACs where `kit_v1`'s bilinear + 3x3 conv took 8.15). Its extra KTBs sit at
level 3 (H/4, 4C = 192 channels), the cheapest level that still hashes. "fused" decoder: skip and
upsampled map concatenated, then a linear layer back to c channels; "concat" (Uformer) keeps 2c.

`debug` and `small` follow the same skeleton. The sizes whose architecture changed keep the old one under
a new name (`FORMER_ARCHITECTURES`: `debug_v1`, bilinear interpolation; `kit_v1`), and a checkpoint whose
config names the size but whose weights fit the former architecture loads as it (`kitdist.inference`).
Hashing counts in MACs (a ~log N cost per patch); sort, gather and scatter cost time but 0 MACs.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from kitdist.config import ConfigError, ModelConfig

INTERPOLATIONS = ("bilinear_conv", "strided_conv")
FLEX_MIN_HEAD_DIM = 16  # CUDA's FlexAttention lowering refuses smaller heads
DECODERS = ("fused", "concat")


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
    interpolation: str = "bilinear_conv"  # or "strided_conv": 4x4 stride-2 conv down, 2x2 transposed up
    decoder: str = "fused"  # or "concat": decoder KTBs on the concatenated skip channels (Uformer)

    @property
    def spatial_multiple(self) -> int:
        """Inputs are padded to a multiple of this: a whole patch at the lowest of the 3 downsamplings."""
        return self.patch_size * 2**3


SIZES: dict[str, ModelSize] = {
    # tests and CPU demos (the embedded default): the paper's skeleton at C = 16, one KTB per stage;
    # 0.46 M parameters, 0.17 GMACs at 64x64 (FlopCounterMode; 0.10 G by module hooks)
    "debug": ModelSize(
        channels=16, encoder_blocks=(1, 1, 1), bottleneck_blocks=1, decoder_blocks=(1, 1, 1),
        head_dim=16, ffn_ratio=2.0, interpolation="strided_conv",
    ),
    # a quick real run on the paper's skeleton
    "small": ModelSize(
        channels=32, encoder_blocks=(1, 1, 2), bottleneck_blocks=2, decoder_blocks=(2, 1, 1),
        head_dim=16, ffn_ratio=2.0, interpolation="strided_conv",
    ),
    # the paper's: 20.6 M parameters, 43.08 GMACs at 256x256 (supplementary, section 5), module hooks
    "kit": ModelSize(
        channels=48, encoder_blocks=(1, 1, 4), bottleneck_blocks=8, decoder_blocks=(4, 1, 1),
        head_dim=16, ffn_ratio=4.0, interpolation="strided_conv",
    ),
    # the first calibration: on the totals under FlopCounterMode, but 10 of 16 KTBs in the bottleneck
    "kit_v1": ModelSize(
        channels=48, encoder_blocks=(1, 1, 1), bottleneck_blocks=10, decoder_blocks=(1, 1, 1),
        head_dim=24, ffn_ratio=3.875,
    ),
    # `debug` before it took the new skeleton (bilinear + 3x3 conv interpolation): its checkpoints load
    "debug_v1": ModelSize(
        channels=16, encoder_blocks=(1, 1, 1), bottleneck_blocks=1, decoder_blocks=(1, 1, 1),
        head_dim=16, ffn_ratio=2.0,
    ),
}  # fmt: skip

# size name -> the name its former architecture lives on under: checkpoints that recorded the name before
# the change still load (their weights fit the former architecture, not the current one)
FORMER_ARCHITECTURES = {"debug": "debug_v1", "kit": "kit_v1"}


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
    for name, allowed in (("interpolation", INTERPOLATIONS), ("decoder", DECODERS)):
        if getattr(size, name) not in allowed:
            raise ConfigError(
                f"model.size: {cfg.size!r} has {name}={getattr(size, name)!r}, not one of {list(allowed)}",
                key="model.size",
            )
    if size.head_dim < FLEX_MIN_HEAD_DIM and cfg.attention_impl in ("auto", "flex"):
        raise ConfigError(
            f"model.size: {cfg.size!r} has heads of head_dim={size.head_dim} channels; model.attention_impl="
            f"{cfg.attention_impl} runs FlexAttention on CUDA, whose kernels need head_dim >= "
            f"{FLEX_MIN_HEAD_DIM} (use a size with larger heads, or model.attention_impl=explicit)",
            key="model.size",
        )
    for level in range(4):
        channels = size.channels * 2**level
        if channels % size.head_dim:
            raise ConfigError(
                f"model.size: {cfg.size!r} has {channels} channels at level {level + 1}, "
                f"not divisible by head_dim={size.head_dim}",
                key="model.size",
            )
    return size
