"""KiT: the k-NN image transformer, a U-net of k-NN transformer blocks (KTB = LN -> KLA -> LN -> FFN).

Input `[B, 3, H, W]` in [0, 1], any H and W: reflect-padded to a multiple of 32 (patch size 4 x three 2x
downsamplings), restored, cropped back, output the same shape. The architecture choices the paper leaves
open, and why, are in `sizes.py`. No training machinery lives here: DeepSpeed and Ray wrap this module
from the outside. For ZeRO-3 every parameter is created in `__init__` and read only inside the forward of
the module that owns it.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from kitdist.config import ModelConfig
from kitdist.model.attention import KNNLocalAttention
from kitdist.model.sizes import ModelSize, resolve_size

log = logging.getLogger(__name__)
_fused_notice_given = False


def make_layer_norm(dim: int, fused: bool) -> nn.Module:
    """apex FusedLayerNorm when asked for and importable, else torch's LayerNorm (one notice per process)."""
    global _fused_notice_given
    if fused:
        try:
            from apex.normalization import FusedLayerNorm

            return FusedLayerNorm(dim)
        except ImportError:
            if not _fused_notice_given:
                log.warning("model.fused_layernorm: apex is not importable; using torch.nn.LayerNorm")
                _fused_notice_given = True
    return nn.LayerNorm(dim)


class LeFF(nn.Module):
    """Locally-enhanced FFN on `[B, H, W, c]`: Linear -> GELU -> 3x3 depthwise conv -> GELU -> Linear."""

    def __init__(self, dim: int, ratio: float) -> None:
        super().__init__()
        hidden = int(dim * ratio)
        self.expand = nn.Linear(dim, hidden)
        self.depthwise = nn.Conv2d(hidden, hidden, 3, padding=1, groups=hidden)
        self.shrink = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = F.gelu(self.expand(x)).permute(0, 3, 1, 2)  # [B, hidden, H, W]
        hidden = F.gelu(self.depthwise(hidden)).permute(0, 2, 3, 1)  # [B, H, W, hidden]
        return self.shrink(hidden)


class KTB(nn.Module):
    """k-NN transformer block on `[B, H, W, c]`: x + KLA(LN(x)), then x + FFN(LN(x))."""

    def __init__(self, dim: int, size: ModelSize, chunk_size: int, cfg: ModelConfig, layer_id: int) -> None:
        super().__init__()
        self.norm1 = make_layer_norm(dim, cfg.fused_layernorm)
        self.attn = KNNLocalAttention(
            dim,
            dim // size.head_dim,
            patch_size=size.patch_size,
            chunk_size=chunk_size,
            hash_rounds=size.hash_rounds,
            num_buckets=size.num_buckets,
            look_back=size.look_back,
            bucket_order=cfg.bucket_order,
            attention_impl=cfg.attention_impl,
            duplicate_keys=cfg.duplicate_keys,
            eval_hash_seed=cfg.eval_hash_seed,
            layer_id=layer_id,
        )
        self.norm2 = make_layer_norm(dim, cfg.fused_layernorm)
        self.ffn = LeFF(dim, size.ffn_ratio)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.ffn(self.norm2(x))


class Downsample(nn.Module):
    """Interpolation layer down, `[B, H, W, c]` -> `[B, H/2, W/2, 2c]`: bilinear x1/2 then a 3x3 conv
    ("bilinear_conv"), or Uformer's strided 4x4 conv ("strided_conv")."""

    def __init__(self, dim: int, mode: str = "bilinear_conv") -> None:
        super().__init__()
        self.mode = mode
        if mode == "bilinear_conv":
            self.conv = nn.Conv2d(dim, 2 * dim, 3, padding=1)
        else:
            self.conv = nn.Conv2d(dim, 2 * dim, 4, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.permute(0, 3, 1, 2)
        if self.mode == "bilinear_conv":
            x = F.interpolate(x, scale_factor=0.5, mode="bilinear", align_corners=False)
        return self.conv(x).permute(0, 2, 3, 1)


class Upsample(nn.Module):
    """Interpolation layer up, `[B, H, W, in_dim]` -> `[B, 2H, 2W, out_dim]`: bilinear x2 then a 3x3 conv
    ("bilinear_conv"), or Uformer's 2x2 transposed conv of stride 2 ("strided_conv")."""

    def __init__(self, in_dim: int, out_dim: int, mode: str = "bilinear_conv") -> None:
        super().__init__()
        self.mode = mode
        if mode == "bilinear_conv":
            self.conv = nn.Conv2d(in_dim, out_dim, 3, padding=1)
        else:
            self.conv = nn.ConvTranspose2d(in_dim, out_dim, 2, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.permute(0, 3, 1, 2)
        if self.mode == "bilinear_conv":
            x = F.interpolate(x, scale_factor=2.0, mode="bilinear", align_corners=False)
        return self.conv(x).permute(0, 2, 3, 1)


class KiT(nn.Module):
    """The KiT U-net. Build it with `build_model(ModelConfig)`.

    Decoder "fused": the upsampled map and the skip are concatenated and fused back to the level's c
    channels by a linear layer; the decoder KTBs work on c. "concat" (Uformer's): no fusion, the decoder
    KTBs work on the 2c concatenated channels and the next upsampling halves them again.
    """

    def __init__(self, size: ModelSize, cfg: ModelConfig) -> None:
        super().__init__()
        self.size, self.checkpoint_activations = size, cfg.checkpoint_activations
        widths = [size.channels * 2**level for level in range(4)]
        concat = size.decoder == "concat"
        decoder_widths = [2 * w if concat else w for w in widths[:3]]
        layer_ids = iter(range(10_000))

        def stage(dim: int, count: int, chunk_size: int) -> nn.ModuleList:
            return nn.ModuleList(KTB(dim, size, chunk_size, cfg, next(layer_ids)) for _ in range(count))

        self.conv_in = nn.Conv2d(3, size.channels, 3, padding=1)
        self.encoder = nn.ModuleList(
            stage(widths[i], size.encoder_blocks[i], size.chunk_size) for i in range(3)
        )
        self.down = nn.ModuleList(Downsample(widths[i], size.interpolation) for i in range(3))
        self.bottleneck = stage(widths[3], size.bottleneck_blocks, size.bottleneck_chunk_size)
        up_inputs = [decoder_widths[1], decoder_widths[2], widths[3]] if concat else widths[1:]
        self.up = nn.ModuleList(Upsample(up_inputs[i], widths[i], size.interpolation) for i in range(3))
        self.fuse = nn.ModuleList(
            nn.Identity() if concat else nn.Linear(2 * widths[i], widths[i]) for i in range(3)
        )
        decoder_blocks = size.decoder_blocks[::-1]  # stored level 1..3, the table lists 3..1
        self.decoder = nn.ModuleList(
            stage(decoder_widths[i], decoder_blocks[i], size.chunk_size) for i in range(3)
        )
        self.conv_out = nn.Conv2d(decoder_widths[0], 3, 3, padding=1)
        self.apply(_init_weights)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        height, width = x.shape[-2:]
        padded = pad_to_multiple(x, self.size.spatial_multiple)
        feat = self.conv_in(padded).permute(0, 2, 3, 1)  # [B, H, W, C], channels-last through the blocks
        skips = []
        for level in range(3):
            feat = self._run(self.encoder[level], feat)
            skips.append(feat)
            feat = self.down[level](feat)
        feat = self._run(self.bottleneck, feat)
        for level in reversed(range(3)):
            feat = self.fuse[level](torch.cat([self.up[level](feat), skips[level]], dim=-1))
            feat = self._run(self.decoder[level], feat)
        out = self.conv_out(feat.permute(0, 3, 1, 2)) + padded
        return out[..., :height, :width]

    def _run(self, blocks: nn.ModuleList, feat: torch.Tensor) -> torch.Tensor:
        """Runs a stage's KTBs; with activation checkpointing each block's inner activations are recomputed
        in backward (the default generator state is replayed, so LSH draws the same rotations)."""
        for block in blocks:
            if self.checkpoint_activations and torch.is_grad_enabled():
                feat = checkpoint(block, feat, use_reentrant=False, preserve_rng_state=True)
            else:
                feat = block(feat)
        return feat


def build_model(cfg: ModelConfig) -> KiT:
    """The one way to construct a KiT: the size row of `cfg.size` with `cfg`'s overrides."""
    return KiT(resolve_size(cfg), cfg)


def pad_to_multiple(x: torch.Tensor, multiple: int) -> torch.Tensor:
    """Reflect-pads the bottom and right of `[B, C, H, W]` up to a multiple (replicate where reflect cannot:
    a reflection needs the pad to be shorter than the side, so tiny inputs are reflected repeatedly)."""
    while True:
        height, width = x.shape[-2:]
        pad_h, pad_w = -height % multiple, -width % multiple
        if not pad_h and not pad_w:
            return x
        step_h, step_w = min(pad_h, height - 1), min(pad_w, width - 1)
        if step_h == 0 and step_w == 0:  # a side of 1 pixel cannot be reflected
            return F.pad(x, (0, pad_w, 0, pad_h), mode="replicate")
        x = F.pad(x, (0, step_w, 0, step_h), mode="reflect")


def _init_weights(module: nn.Module) -> None:
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
