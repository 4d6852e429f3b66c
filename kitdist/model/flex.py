"""KLA's grouped attention on CUDA through FlexAttention: one fused kernel over each sorted sequence.

The LSH-sorted patches of one head and round form a sequence of N_padded * P pixels. A block-diagonal mask
(chunks of k*P pixels, plus the previous chunk with look-back) keeps every query inside its chunk, the
in-patch relative bias (and the duplicate-key correction, if asked) enters as a `score_mod`, and the
log-sum-exp comes back from the kernel with its gradient, so rounds merge exactly without the sink key
that the "sdpa" kernel needs. The lse is requested with `return_aux` where torch has it (>= 2.9), else with
the older `return_lse`. Calls are cut along the batch so batch x heads stays within CUDA's grid limit.

Block mask: built from chunk and block boundaries (`chunk_block_mask`), in memory proportional to the
number of blocks. torch's `create_block_mask` evaluates the mask on every [L, L] pair (about 10 bytes per
pair uncompiled: 640 GiB for a 512x512 tile's L = 262,144). Block size (`flex_block_size`): the largest
power of two in [16, 128] dividing a chunk's k*P pixels, so a tile lies inside one chunk or outside it
(k = 4 patches of 16 pixels: blocks of 64, where Flex's default 128 would half-mask every tile).

Compile plan (`compiled_flex`): one `torch.compile` of Flex per process and backend (inductor on CUDA,
`COMPILE_BACKENDS`), with static shapes: each distinct call signature (sequences, heads, length, head
size, dtype, mask, score_mod, grad mode) is one graph. `kit` training at one crop needs 3 (levels 1-3; the
k = 1 bottleneck runs fused SDPA), validation at one tile size 3 more without grad. A signature beyond
`FLEX_GRAPH_BUDGET` raises `FlexCompileBudgetError`: past dynamo's recompile limit torch would otherwise
fall back, silently, to eager Flex, which materialises every score (out of memory at these lengths).
Devices without a compile backend (CPU) run Flex eagerly, forward only (Flex refuses backward on CPU):
CPU tests check the forward against the reference, and test the backward with torch's device check
bypassed (tests/test_flex_cpu.py).
"""

from __future__ import annotations

import functools

import torch
from torch.nn.attention import flex_attention as flex

from kitdist.model.kernels import MAX_LAUNCH_BATCH

_HAS_AUX = hasattr(flex, "AuxRequest")
MIN_BLOCK, MAX_BLOCK = 16, 128  # Flex's smallest tile (CUDA refuses less); its default and largest
# device type -> torch.compile backend; devices not named run Flex eagerly (tests add "cpu": aot_eager)
COMPILE_BACKENDS: dict[str, object] = {"cuda": "inductor"}
FLEX_GRAPH_BUDGET = 12  # distinct compiled signatures per process (see the module docstring)


class FlexCompileBudgetError(RuntimeError):
    """A Flex call would compile a graph beyond `FLEX_GRAPH_BUDGET`."""


def flex_block_size(chunk_pixels: int) -> int:
    """The largest power of two in [16, 128] dividing `chunk_pixels` (then no tile straddles a chunk edge),
    or 16 when none does (tiles cut by chunk edges are partial: correct, with some masked work)."""
    block = MAX_BLOCK
    while block > MIN_BLOCK and chunk_pixels % block:
        block //= 2
    return block


@functools.lru_cache(maxsize=32)
def chunk_block_mask(length: int, chunk_pixels: int, look_back: bool, device: str) -> flex.BlockMask:
    """Queries see the keys of their own chunk (and of the previous one, circular, with look-back).
    `length` must be a whole number of chunks."""
    if length % chunk_pixels:
        raise ValueError(f"KLA Flex: length {length} is not a whole number of {chunk_pixels}-pixel chunks")
    num_chunks, block = length // chunk_pixels, flex_block_size(chunk_pixels)

    def same_chunk(batch, head, q_idx, kv_idx):  # pixel-level: partial tiles and the eager (CPU) path
        q_chunk, kv_chunk = q_idx // chunk_pixels, kv_idx // chunk_pixels
        seen = q_chunk == kv_chunk
        if look_back:
            seen = seen | (kv_chunk == (q_chunk + num_chunks - 1) % num_chunks)
        return seen

    # rows of query blocks list the key blocks they see (chunk offsets 0 and -1); the transposed lists,
    # key blocks' query blocks (offsets 0 and +1), serve the backward
    kv_partial, kv_full = _seen_blocks(length, block, chunk_pixels, (0, -1) if look_back else (0,), device)
    q_partial, q_full = _seen_blocks(length, block, chunk_pixels, (0, 1) if look_back else (0,), device)
    return flex.BlockMask(
        seq_lengths=(length, length), kv_num_blocks=kv_partial[0], kv_indices=kv_partial[1],
        full_kv_num_blocks=kv_full[0], full_kv_indices=kv_full[1], q_num_blocks=q_partial[0],
        q_indices=q_partial[1], full_q_num_blocks=q_full[0], full_q_indices=q_full[1],
        BLOCK_SIZE=(block, block), mask_mod=same_chunk,
    )  # fmt: skip


def _seen_blocks(length: int, block: int, chunk: int, offsets: tuple[int, ...], device: str):
    """For each row block of a [length, length] chunk mask where row chunk x sees column chunk
    (x + offset) mod C: its partial and its full column blocks, each as (counts `[1, 1, rows]`, indices
    `[1, 1, rows, width]`, int32, ascending, zero-padded; one spare column, as the kernels may read one
    index past a row's count). A tile is full when every pair in it is seen: both blocks whole (a tail
    block past `length` is padding) and every row chunk it meets sees every column chunk it meets."""
    num_blocks, num_chunks = -(-length // block), length // chunk
    index = torch.arange(num_blocks, device=device)
    first_chunk = index * block // chunk  # [rows]: the chunks a block meets, first to last
    last_chunk = (torch.clamp((index + 1) * block, max=length) - 1) // chunk
    whole = (index + 1) * block <= length
    chunks_per_block = -(-block // chunk) + 1  # at most, counting both partial ends
    blocks_per_chunk = -(-chunk // block) + 1
    # candidates: the column blocks of chunk (x + offset) for each chunk x the row meets, [rows, cands]
    row_chunk = first_chunk.view(-1, 1) + torch.arange(chunks_per_block, device=device)  # [rows, Sx]
    row_chunk_ok = row_chunk <= last_chunk.view(-1, 1)
    seen_chunk = (row_chunk.unsqueeze(-1) + torch.tensor(offsets, device=device)) % num_chunks  # [rows,Sx,O]
    column = (seen_chunk * chunk // block).unsqueeze(-1) + torch.arange(blocks_per_chunk, device=device)
    inside = column * block < (seen_chunk.unsqueeze(-1) + 1) * chunk  # the block starts inside that chunk
    column_ok = row_chunk_ok.view(*row_chunk_ok.shape, 1, 1) & inside
    column = torch.where(column_ok, column, num_blocks).flatten(1)  # [rows, cands]; num_blocks: none
    column = column.sort(dim=1).values
    repeated = torch.zeros_like(column, dtype=torch.bool)
    repeated[:, 1:] = column[:, 1:] == column[:, :-1]
    column = torch.where(repeated, num_blocks, column).sort(dim=1).values
    valid = column < num_blocks
    # full: every chunk pair (x, y) of the tile is seen
    safe = torch.where(valid, column, 0)
    col_first, col_last = first_chunk[safe], last_chunk[safe]  # [rows, cands]
    col_chunk = col_first.unsqueeze(-1) + torch.arange(chunks_per_block, device=device)  # [rows, cands, Sy]
    col_chunk_ok = col_chunk <= col_last.unsqueeze(-1)
    offset = (col_chunk.unsqueeze(2) - row_chunk.view(num_blocks, 1, -1, 1)) % num_chunks  # [r, c, Sx, Sy]
    pair_seen = torch.zeros_like(offset, dtype=torch.bool)
    for step in offsets:
        pair_seen |= offset == step % num_chunks
    relevant = row_chunk_ok.view(num_blocks, 1, -1, 1) & col_chunk_ok.unsqueeze(2)
    full = valid & (pair_seen | ~relevant).flatten(2).all(-1) & whole.view(-1, 1) & whole[safe]
    return _ordered(column, valid & ~full, num_blocks), _ordered(column, full, num_blocks)


def _ordered(column: torch.Tensor, keep: torch.Tensor, num_blocks: int):
    """(counts `[1, 1, rows]`, kept columns ascending and zero-padded `[1, 1, rows, width + 1]`), int32."""
    kept = torch.where(keep, column, num_blocks).sort(dim=1).values
    kept = torch.nn.functional.pad(kept, (0, 1), value=num_blocks)
    kept = torch.where(kept < num_blocks, kept, 0)
    counts = keep.sum(dim=1)
    kept = kept[:, : int(counts.max()) + 1].to(torch.int32).contiguous()
    return counts.to(torch.int32).view(1, 1, -1), kept.view(1, 1, *kept.shape)


@functools.lru_cache(maxsize=4)
def compiled_flex(backend: object = "inductor"):
    """Flex compiled once per process and backend with static shapes: every signature is its own graph,
    counted against FLEX_GRAPH_BUDGET by `flex_attention` (automatic dynamic shapes would make the
    length symbolic after a second size, and the mask's chunk count with it, for no fewer graphs here)."""
    return torch.compile(flex.flex_attention, backend=backend, dynamic=False)


_COMPILED_SIGNATURES: dict[object, list[tuple]] = {}  # backend -> the signatures compiled so far


def _admit(backend: object, signature: tuple) -> None:
    """Records a compiled call's signature; FlexCompileBudgetError for one beyond FLEX_GRAPH_BUDGET."""
    seen = _COMPILED_SIGNATURES.setdefault(backend, [])
    if signature in seen:
        return
    if len(seen) >= FLEX_GRAPH_BUDGET:
        listed = "\n  ".join(map(str, seen))
        raise FlexCompileBudgetError(
            f"KLA Flex: a call of signature {signature} would compile graph {len(seen) + 1}, beyond the plan "
            f"of {FLEX_GRAPH_BUDGET} per process (kitdist.model.flex.FLEX_GRAPH_BUDGET): past dynamo's "
            f"recompile limit torch would run eager Flex, which materialises every score. Feed fewer input "
            f"shapes (fixed crops, one tile size) or raise the budget. Compiled so far:\n  {listed}"
        )
    seen.append(signature)


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
    chunk_pixels = chunk_size * pixels
    block_mask = chunk_block_mask(length, chunk_pixels, look_back, str(q.device))
    score_mod = _score_mod(bias.to(torch.float32), pixels, chunk_size, pair_bias)
    block = block_mask.BLOCK_SIZE[0]
    # the forward kernel's tiles equal the mask's blocks (a larger tile than a block is refused); the
    # backward's tiles are left to torch, which keeps only configurations dividing the block
    options = {"BLOCK_M": block, "BLOCK_N": block}
    backend = COMPILE_BACKENDS.get(q.device.type)
    attend = flex.flex_attention
    if backend is not None:
        signature = (str(q.device), tuple(q.shape), tuple(k.shape), q.dtype, chunk_pixels, look_back,
                     None if pair_bias is None else tuple(pair_bias.shape), torch.is_grad_enabled())  # fmt: skip
        _admit(backend, signature)
        attend = compiled_flex(backend)
    extra = {"return_aux": flex.AuxRequest(lse=True)} if _HAS_AUX else {"return_lse": True}
    with _no_silent_recompile():
        out, aux = attend(
            q, k, v, score_mod=score_mod, block_mask=block_mask, scale=scale, kernel_options=options, **extra
        )
    return out, (aux.lse if _HAS_AUX else aux)


def _no_silent_recompile():
    """dynamo's recompile limit above the budget, and an error rather than eager Flex past it (should a
    signature that `_admit` counts once ever compile twice)."""
    settings = {"recompile_limit": 2 * FLEX_GRAPH_BUDGET, "fail_on_recompile_limit_hit": True}
    config = torch._dynamo.config
    return config.patch({name: value for name, value in settings.items() if hasattr(config, name)})


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
