"""KLA's grouped attention on CUDA through FlexAttention: one fused kernel over each sorted sequence.

The LSH-sorted patches of one head and round form a sequence of N_padded * P pixels. A block-diagonal mask
(chunks of k*P pixels, plus the previous chunk with look-back) keeps every query inside its chunk, the
in-patch relative bias (and the duplicate-key correction, if asked) enters as a `score_mod`, and the
log-sum-exp comes back from the kernel with its gradient, so rounds merge exactly without the sink key
that the "sdpa" kernel needs. The mask is built once per shape and device and cached.

Compiled with `torch.compile` on CUDA (uncompiled Flex materialises the full score matrix and warns);
elsewhere it runs eagerly, forward only (Flex has no CPU backward): CPU tests use it to check the forward
against the reference. The lse is requested with `return_aux` where torch has it (>= 2.9), else with
the older `return_lse`. Calls are cut along the batch so batch x heads stays within CUDA's grid limit.
"""

from __future__ import annotations

import functools

import torch
from torch.nn.attention import flex_attention as flex

from kitdist.model.kernels import MAX_LAUNCH_BATCH

_HAS_AUX = hasattr(flex, "AuxRequest")


@functools.lru_cache(maxsize=32)
def chunk_block_mask(length: int, chunk_pixels: int, look_back: bool, device: str) -> flex.BlockMask:
    """Queries see the keys of their own chunk (and of the previous one, circular, with look-back)."""
    num_chunks = length // chunk_pixels

    def same_chunk(batch, head, q_idx, kv_idx):
        q_chunk, kv_chunk = q_idx // chunk_pixels, kv_idx // chunk_pixels
        seen = q_chunk == kv_chunk
        if look_back:
            seen = seen | (kv_chunk == (q_chunk + num_chunks - 1) % num_chunks)
        return seen

    return flex.create_block_mask(same_chunk, None, None, length, length, device=device)


@functools.lru_cache(maxsize=1)
def _compiled_flex():
    """Compiled once per process. Shapes: dynamo's automatic dynamic (the default) recompiles once with
    symbolic sizes after the second shape, so whole images of many sizes do not exhaust the recompile
    limit (beyond it dynamo would silently run eager Flex, which materialises every score)."""
    return torch.compile(flex.flex_attention)


def flex_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    bias: torch.Tensor,
    scale: float,
    chunk_size: int,
    look_back: bool,
    pair_bias: torch.Tensor | None = None,
    max_batch: int = MAX_LAUNCH_BATCH,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of sorted sequences q, k, v `[S, h, N_padded*P, d]` within chunks of `chunk_size` patches;
    bias `[h, P, P]`; pair_bias `[S, h, N_padded, Kp]` or None. Returns the output and the lse (float32)."""
    per_call = max(1, max_batch // q.shape[1])
    if q.shape[0] <= per_call:
        return _flex_call(q, k, v, bias, scale, chunk_size, look_back, pair_bias)
    outs, lses = [], []
    for start in range(0, q.shape[0], per_call):
        part = slice(start, start + per_call)
        pair = None if pair_bias is None else pair_bias[part]
        out, lse = _flex_call(q[part], k[part], v[part], bias, scale, chunk_size, look_back, pair)
        outs.append(out)
        lses.append(lse)
    return torch.cat(outs), torch.cat(lses)


def _flex_call(q, k, v, bias, scale, chunk_size, look_back, pair_bias):
    length, pixels = q.shape[-2], bias.shape[-1]
    block_mask = chunk_block_mask(length, chunk_size * pixels, look_back, str(q.device))
    score_mod = _score_mod(bias.to(torch.float32), pixels, chunk_size, pair_bias)
    attend = _compiled_flex() if q.is_cuda else flex.flex_attention
    if _HAS_AUX:
        out, aux = attend(
            q, k, v, score_mod=score_mod, block_mask=block_mask, scale=scale,
            return_aux=flex.AuxRequest(lse=True),
        )  # fmt: skip
        return out, aux.lse
    return attend(q, k, v, score_mod=score_mod, block_mask=block_mask, scale=scale, return_lse=True)


def _score_mod(bias: torch.Tensor, pixels: int, chunk_size: int, pair_bias: torch.Tensor | None):
    """score + bias[h, query pixel, key pixel] (+ pair_bias[seq, h, query patch, key slot])."""
    if pair_bias is None:

        def with_bias(score, batch, head, q_idx, kv_idx):
            return score + bias[head, q_idx % pixels, kv_idx % pixels]

        return with_bias
    pair_bias = pair_bias.to(torch.float32)
    look_back = pair_bias.shape[-1] > chunk_size  # key slots k..2k-1 are the previous chunk's

    def with_pair_bias(score, batch, head, q_idx, kv_idx):
        # score_mod also runs on masked-out pairs of a tile: every index must stay in range
        q_patch, kv_patch = q_idx // pixels, kv_idx // pixels
        key_slot = kv_patch % chunk_size
        if look_back:
            own_chunk = q_patch // chunk_size == kv_patch // chunk_size
            key_slot = torch.where(own_chunk, key_slot, key_slot + chunk_size)
        return score + bias[head, q_idx % pixels, kv_idx % pixels] + pair_bias[batch, head, q_patch, key_slot]

    return with_pair_bias
