"""Flex's chunk mask built from block arithmetic (`kitdist.model.flex.chunk_block_mask`) has exactly the
partial and full blocks that torch's `create_block_mask` finds by evaluating every pair, for chunks that
fill blocks, chunks that straddle them, tails shorter than a block and look-back; and a 512x512 tile's
mask (L = 262,144) is small."""

from __future__ import annotations

import pytest
import torch
from torch.nn.attention import flex_attention as flex

from kitdist.model.flex import chunk_block_mask, flex_block_size


def dense(counts: torch.Tensor, indices: torch.Tensor, columns: int) -> torch.Tensor:
    """`[rows, columns]` bool: the blocks a (counts, indices) pair lists."""
    counts, indices = counts.flatten(), indices.view(counts.numel(), -1)
    out = torch.zeros(counts.numel(), columns, dtype=torch.bool)
    for row, count in enumerate(counts.tolist()):
        out[row, indices[row, :count].long()] = True
    return out


@pytest.mark.parametrize("look_back", [False, True])
@pytest.mark.parametrize(
    "chunk_pixels, num_chunks",
    [(64, 5), (64, 1), (16, 9), (48, 7), (40, 6), (36, 5), (8, 11), (200, 3), (128, 2), (256, 3)],
)
def test_arithmetic_mask_has_the_blocks_create_block_mask_finds(chunk_pixels, num_chunks, look_back):
    length = chunk_pixels * num_chunks
    ours = chunk_block_mask(length, chunk_pixels, look_back, "cpu")
    block = flex_block_size(chunk_pixels)
    assert ours.BLOCK_SIZE == (block, block)
    mask_mod = ours.mask_mod
    theirs = flex.create_block_mask(mask_mod, None, None, length, length, device="cpu", BLOCK_SIZE=block)
    blocks = -(-length // block)
    for fields in (("kv_num_blocks", "kv_indices"), ("full_kv_num_blocks", "full_kv_indices"),
                   ("q_num_blocks", "q_indices"), ("full_q_num_blocks", "full_q_indices")):  # fmt: skip
        mine = dense(*(getattr(ours, name) for name in fields), blocks)
        reference = dense(*(getattr(theirs, name) for name in fields), blocks)
        assert torch.equal(mine, reference), (fields, mine.int(), reference.int())
    # the pixel-level mask itself: queries see their chunk (and the previous one with look-back)
    q, kv = torch.arange(length).view(-1, 1), torch.arange(length).view(1, -1)
    seen = mask_mod(0, 0, q, kv)
    assert seen.sum() == length * chunk_pixels * (2 if look_back and num_chunks > 1 else 1)


def test_block_sizes_fit_the_chunks():
    assert flex_block_size(64) == 64  # k = 4 patches of 4x4: tiles of one chunk, never half masked
    assert flex_block_size(256) == 128 and flex_block_size(48) == 16 and flex_block_size(36) == 16


def test_a_512px_tile_mask_is_small():
    length = 512 * 512  # level 1 of a 512x512 tile: create_block_mask asks for tens of GiB here
    mask = chunk_block_mask(length, 64, True, "cpu")
    tensors = [getattr(mask, name) for name in ("kv_num_blocks", "kv_indices", "full_kv_num_blocks",
                                                "full_kv_indices", "q_num_blocks", "q_indices",
                                                "full_q_num_blocks", "full_q_indices")]  # fmt: skip
    assert sum(t.numel() * t.element_size() for t in tensors) < 1 << 20
    assert mask.full_kv_num_blocks.flatten().tolist() == [2] * (length // 64)  # own and previous chunk
    assert int(mask.kv_num_blocks.sum()) == 0  # chunks fill 64-pixel blocks: no tile is partial
