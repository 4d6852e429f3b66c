"""The modules `benchmarks/attention.py` times: KLA in each kernel, window attention three ways, dense."""

from __future__ import annotations

import resource

import torch
import torch.nn.functional as F
from torch import nn

from kitdist.model.attention import KNNLocalAttention, partition, relative_position_index, unpartition
from kitdist.model.kernels import explicit_attention, reference_attention

# case -> (attention_impl, hash_rounds)
KLA_CASES = {
    "kla_explicit_b1": ("explicit", 1), "kla_explicit_b2": ("explicit", 2), "kla_explicit_b3": ("explicit", 3),
    "kla_ref_b1": ("reference", 1), "kla_ref_b2": ("reference", 2),
    "kla_sdpa_b1": ("sdpa", 1), "kla_sdpa_b2": ("sdpa", 2),
    "kla_flex_b1": ("flex", 1), "kla_flex_b2": ("flex", 2),
}  # fmt: skip
CPU_CASES = ["window_explicit", "window_ref", "window_sdpa", "window_flash", "kla_explicit_b1", "kla_explicit_b2",
             "kla_explicit_b3", "kla_ref_b1", "kla_ref_b2", "kla_sdpa_b1", "kla_sdpa_b2", "dense_sdpa"]  # fmt: skip
CUDA_CASES = ["window_sdpa", "window_flex", "window_flash", "kla_flex_b1", "kla_flex_b2", "kla_sdpa_b1",
              "kla_explicit_b1"]  # fmt: skip


class WindowAttention(nn.Module):
    """Swin-style attention inside non-overlapping w x w windows with a relative position bias.

    impl "reference": einsum + bias; "explicit": KLA's CPU kernel (the same bias); "sdpa": SDPA with the bias as mask; "flash": fused SDPA without bias
    (a lower bound); "flex": FlexAttention over window-ordered pixels, bias as score_mod (CUDA, compiled).
    """

    def __init__(self, dim: int, num_heads: int, window: int, impl: str) -> None:
        super().__init__()
        self.num_heads, self.window, self.impl = num_heads, window, impl
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.bias_table = nn.Parameter(torch.randn(num_heads, (2 * window - 1) ** 2) * 0.02)
        self.register_buffer("bias_index", relative_position_index(window), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, height, width, channels = x.shape
        windows = partition(x, self.window)  # [B, nW, w*w, c]
        qkv = self.qkv(windows).view(-1, self.window**2, 3, self.num_heads, channels // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each [B*nW, h, w*w, d]
        bias = self.bias_table[:, self.bias_index]  # [h, w*w, w*w]
        if self.impl in ("reference", "explicit"):
            kernel = reference_attention if self.impl == "reference" else explicit_attention
            out, _ = kernel(q, k, v, bias, q.shape[-1] ** -0.5, False)
        elif self.impl == "sdpa":
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype))
        elif self.impl == "flex":
            out = _window_flex(q, k, v, bias, batch)
        else:
            out = F.scaled_dot_product_attention(q, k, v)
        out = out.transpose(1, 2).reshape(windows.shape)
        return unpartition(self.proj(out), height, width)


def _window_flex(q, k, v, bias, batch):
    """Windows laid end to end per image, a block-diagonal mask of window size, the bias as score_mod."""
    from kitdist.model.flex import chunk_block_mask, compiled_flex

    windows, heads, pixels, head_dim = q.shape
    seq = [t.view(batch, windows // batch, heads, pixels, head_dim).transpose(1, 2).reshape(
        batch, heads, -1, head_dim) for t in (q, k, v)]  # fmt: skip
    mask = chunk_block_mask(seq[0].shape[-2], pixels, False, str(q.device))
    bias = bias.float()

    def with_bias(score, b, h, q_idx, kv_idx):
        return score + bias[h, q_idx % pixels, kv_idx % pixels]

    tiles = {"BLOCK_M": mask.BLOCK_SIZE[0], "BLOCK_N": mask.BLOCK_SIZE[1]}  # as KLA's Flex path
    out = compiled_flex()(*seq, score_mod=with_bias, block_mask=mask, kernel_options=tiles)
    return out.view(batch, heads, windows // batch, pixels, head_dim).transpose(1, 2).reshape(q.shape)


class DenseAttention(nn.Module):
    """Every pixel attends to every pixel (fused SDPA, no bias)."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, height, width, channels = x.shape
        qkv = self.qkv(x.view(batch, -1, channels))
        q, k, v = qkv.view(batch, -1, 3, self.num_heads, channels // self.num_heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(batch, height, width, channels)
        return self.proj(out)


def build_case(case: str, channels: int, heads: int) -> nn.Module:
    if case in KLA_CASES:
        impl, rounds = KLA_CASES[case]
        return KNNLocalAttention(
            channels, heads, patch_size=4, chunk_size=4, hash_rounds=rounds, attention_impl=impl
        )
    if case.startswith("window"):
        return WindowAttention(channels, heads, 8, case.removeprefix("window_").replace("ref", "reference"))
    return DenseAttention(channels, heads)


def peak_rss_mb(module: nn.Module, side: int, channels: int) -> float:
    """Peak extra MB of one forward+backward: max RSS above the RSS once module and input exist. A first
    run on a 32x32 map pages in the code and kernels, which would otherwise count as the case's memory."""
    module.train()(torch.randn(1, 32, 32, channels, requires_grad=True)).square().mean().backward()
    x = torch.randn(1, side, side, channels, requires_grad=True)
    with open("/proc/self/clear_refs", "w") as clear_refs:  # Linux keeps the peak across fork: reset it
        clear_refs.write("5")
    with open("/proc/self/statm") as statm:
        baseline_kb = int(statm.read().split()[1]) * (resource.getpagesize() // 1024)
    module(x).square().mean().backward()
    with open("/proc/self/status") as status:
        peak_kb = next(int(line.split()[1]) for line in status if line.startswith("VmHWM:"))
    return max(peak_kb - baseline_kb, 0) / 1024
