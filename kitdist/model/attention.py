"""k-NN local attention (KLA): pair-wise local attention among the pixels of k hashed-together patches.

A feature map `[B, H, W, c]` is cut into N = HW/r^2 patches of P = r^2 pixels. Per head, LSH (`lsh.py`)
sorts the patches so that similar ones sit next to each other, and the sorted sequence is cut into chunks
of k patches. Every pixel then attends to all k*P pixels of its chunk (plus the previous chunk with
`look_back`), with a learned bias indexed by the in-patch offset between query and key pixel ((2r-1)^2
entries per head: positions across different patches carry no spatial meaning). With b hash rounds each
round gives an output and its log-sum-exp; rounds are merged by a softmax over their log-sum-exps, which
equals one softmax over the union of the rounds' keys.

Two implementations of the grouped attention, picked once at construction, give the same values and
gradients:
- "reference": einsum, bias add, logsumexp, softmax, einsum: plain and easy to check.
- "sdpa": one `F.scaled_dot_product_attention` over `[B*chunks, heads, k*P, d]` with no mask, so fused
  kernels apply (a mask that needs a gradient sends PyTorch back to the unfused math path). The bias is
  folded into the dot product instead: queries carry their row of the P x P bias table and keys a one-hot
  of their pixel, so q'.k' = q.k + bias exactly. When rounds must be merged, one extra "sink" key with a
  known logit (the query's own score, so the sink holds at most half the mass) and a one-hot value yields
  each query's log-sum-exp from the fused output.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kitdist.model import lsh


def relative_position_index(patch_size: int) -> torch.Tensor:
    """`[P, P]` index into a (2r-1)^2 bias table for every (query pixel, key pixel) pair of a patch."""
    rows, cols = torch.meshgrid(torch.arange(patch_size), torch.arange(patch_size), indexing="ij")
    coords = torch.stack([rows.flatten(), cols.flatten()])  # [2, P]
    offset = coords[:, :, None] - coords[:, None, :] + patch_size - 1  # [2, P, P], each in [0, 2r-2]
    return offset[0] * (2 * patch_size - 1) + offset[1]


def reference_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor, scale: float, need_lse: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """softmax(q k^T * scale + bias) v and its log-sum-exp. q [X, h, L, d]; k, v [X, h, S, d]; bias [h, P, P]."""
    queries, keys, pixels = q.shape[-2], k.shape[-2], bias.shape[-1]
    full_bias = bias.repeat(
        1, queries // pixels, keys // pixels
    )  # [h, L, S]: same table for every patch pair
    logits = torch.einsum("xhld,xhsd->xhls", q, k) * scale + full_bias
    lse = torch.logsumexp(logits, dim=-1)  # [X, h, L]
    probs = torch.exp(logits - lse.unsqueeze(-1))
    return torch.einsum("xhls,xhsd->xhld", probs, v), (lse if need_lse else None)


def sdpa_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor, scale: float, need_lse: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The same as `reference_attention`, through one fused `scaled_dot_product_attention` call."""
    head_dim, pixels = q.shape[-1], bias.shape[-1]
    queries, keys = q.shape[-2], k.shape[-2]
    q_bias = (bias / scale).to(q.dtype).repeat(1, queries // pixels, 1)  # [h, L, P]: the query's bias row
    k_onehot = torch.eye(pixels, dtype=q.dtype, device=q.device).repeat(keys // pixels, 1)  # [S, P]
    q_aug = torch.cat([q, q_bias.expand(q.shape[0], -1, -1, -1)], dim=-1)
    k_aug = torch.cat([k, k_onehot.expand(*k.shape[:2], -1, -1)], dim=-1)
    if not need_lse:
        q_aug, k_aug, v = _pad_for_kernel(q_aug, k_aug, v)
        out = F.scaled_dot_product_attention(q_aug, k_aug, v, scale=scale)
        return out[..., :head_dim], None
    # the sink's logit s0 is the query's own score: s0 <= lse, so the sink's share c lies in (0, 1/2]
    self_score = (q * k[..., :queries, :]).sum(-1) * scale + bias[:, 0, 0].view(1, -1, 1)  # [X, h, L]
    self_score = (self_score.detach() / scale).to(q.dtype)
    q_aug = torch.cat([q_aug, self_score.unsqueeze(-1)], dim=-1)
    k_aug = torch.cat([F.pad(k_aug, (0, 1)), _unit_row(k_aug, k_aug.shape[-1] + 1)], dim=-2)
    v_aug = torch.cat([F.pad(v, (0, 1)), _unit_row(v, head_dim + 1)], dim=-2)
    q_aug, k_aug, v_aug = _pad_for_kernel(q_aug, k_aug, v_aug)
    out = F.scaled_dot_product_attention(q_aug, k_aug, v_aug, scale=scale)
    sink_share = out[..., head_dim].float().clamp(min=torch.finfo(torch.float32).tiny, max=0.75)
    sink_logit = self_score.float() * scale
    lse = sink_logit + torch.log1p(-sink_share) - torch.log(sink_share)
    return out[..., :head_dim] / (1.0 - sink_share).unsqueeze(-1).to(out.dtype), lse


def _unit_row(like: torch.Tensor, width: int) -> torch.Tensor:
    """One extra row `[X, h, 1, width]` that is zero except a 1 in its last column (the sink)."""
    row = like.new_zeros((*like.shape[:2], 1, width))
    row[..., -1] = 1.0
    return row


def _pad_for_kernel(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """On CUDA, flash/memory-efficient kernels want one head size, a multiple of 8; CPU takes any."""
    if tensors[0].device.type != "cuda":
        return tensors
    width = -(-max(t.shape[-1] for t in tensors) // 8) * 8
    return tuple(F.pad(t, (0, width - t.shape[-1])) for t in tensors)


ATTENTION_IMPLS = {"reference": reference_attention, "sdpa": sdpa_attention}


class KNNLocalAttention(nn.Module):
    """KLA on a channels-last feature map `[B, H, W, c]` (H and W multiples of the patch size).

    Args:
        dim: channels c. num_heads: heads (c must divide evenly).
        patch_size: r, a patch is r x r pixels. chunk_size: k, patches per group.
        hash_rounds: b, independent LSH rounds. num_buckets: per round; None = N/k rounded to even.
        look_back: keys also include the previous chunk of the sorted order (Reformer's look-one-back).
        bucket_order: order inside a bucket, "similarity" (a further random projection) or "position".
        attention_impl: "reference" or "sdpa" (see the module docstring).
        eval_hash_seed: evaluation rotations come from this seed (mixed with layer_id), so eval is
            deterministic; training draws fresh rotations from the default generator every call.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        *,
        patch_size: int,
        chunk_size: int,
        hash_rounds: int,
        num_buckets: int | None = None,
        look_back: bool = False,
        bucket_order: str = "similarity",
        attention_impl: str = "sdpa",
        eval_hash_seed: int = 0,
        layer_id: int = 0,
    ) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"KLA: dim={dim} is not divisible by num_heads={num_heads}")
        if attention_impl not in ATTENTION_IMPLS:
            raise ValueError(
                f"KLA: attention_impl must be one of {sorted(ATTENTION_IMPLS)}, got {attention_impl!r}"
            )
        if bucket_order not in ("similarity", "position"):
            raise ValueError(f"KLA: bucket_order must be 'similarity' or 'position', got {bucket_order!r}")
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.patch_size, self.chunk_size, self.hash_rounds = patch_size, chunk_size, hash_rounds
        self.num_buckets, self.look_back, self.bucket_order = num_buckets, look_back, bucket_order
        self.eval_seed = eval_hash_seed * 1_000_003 + layer_id  # distinct, fixed rotations per layer
        self.attend = ATTENTION_IMPLS[attention_impl]
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.bias_table = nn.Parameter(torch.zeros(num_heads, (2 * patch_size - 1) ** 2))
        nn.init.trunc_normal_(self.bias_table, std=0.02)
        self.register_buffer("bias_index", relative_position_index(patch_size), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, height, width, channels = x.shape
        r, heads = self.patch_size, self.num_heads
        patches = partition(x, r)  # [B, N, P, c]
        num_patches, pixels = patches.shape[1], r * r
        qkv = self.qkv(patches).view(batch, num_patches, pixels, 3, heads, self.head_dim)
        q, k, v = qkv.permute(3, 0, 1, 4, 2, 5).unbind(0)  # each [B, N, h, P, d]
        bias = self.bias_table[:, self.bias_index]  # [h, P, P]
        if self.chunk_size == 1 and not self.look_back:  # a patch alone: no grouping to do
            out, _ = self.attend(
                *(t.reshape(-1, heads, pixels, self.head_dim) for t in (q, k, v)),
                bias,
                self.head_dim**-0.5,
                False,
            )
            out = out.view(batch, num_patches, heads, pixels, self.head_dim)
        else:
            out = self._grouped(q, k, v, bias)
        out = out.permute(0, 1, 3, 2, 4).reshape(batch, num_patches, pixels, channels)
        return unpartition(self.proj(out), height, width)

    def _grouped(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        """Hash, sort, chunk, attend, un-sort and merge rounds. q, k, v [B, N, h, P, d] -> [B, N, h, P, d]."""
        batch, num_patches, heads, pixels, head_dim = q.shape
        grouping = self._group(k)
        num_padded = grouping.order.shape[-1]
        num_chunks, rounds = num_padded // self.chunk_size, self.hash_rounds
        rows = lsh.sorted_row_index(grouping, num_patches)  # [B, R, Np, h]
        rows = rows.view(batch, rounds, num_chunks, self.chunk_size, heads).transpose(-1, -2)
        sorted_qkv = [lsh.gather_rows(t.reshape(-1, pixels * head_dim), rows) for t in (q, k, v)]
        chunk_shape = (batch * rounds * num_chunks, heads, self.chunk_size * pixels, head_dim)
        sq, sk, sv = (t.view(chunk_shape) for t in sorted_qkv)  # [B*R*chunks, h, k*P, d]
        if self.look_back and num_chunks > 1:
            sk, sv = (self._with_previous_chunk(t, batch * rounds, num_chunks) for t in (sk, sv))
        out, lse = self.attend(sq, sk, sv, bias, head_dim**-0.5, rounds > 1)
        back = lsh.unsorted_row_index(grouping, self.chunk_size, num_chunks)  # [B, R, N, h]
        out = lsh.gather_rows(out.reshape(-1, pixels * head_dim), back)  # [B, R, N, h, P*d]
        out = out.view(batch, rounds, num_patches, heads, pixels, head_dim)
        if rounds == 1:
            return out[:, 0]
        lse = lsh.gather_rows(lse.reshape(-1, pixels), back)  # [B, R, N, h, P]
        weights = torch.softmax(lse, dim=1).unsqueeze(-1).to(out.dtype)
        return (out * weights).sum(dim=1)

    def _group(self, keys: torch.Tensor) -> lsh.Grouping:
        """LSH grouping of the patches per head from their detached keys [B, N, h, P, d]."""
        batch, num_patches, heads, pixels, head_dim = keys.shape
        descriptors = keys.permute(0, 2, 1, 3, 4).reshape(batch, heads, num_patches, pixels * head_dim)
        num_buckets = lsh.resolve_num_buckets(num_patches, self.chunk_size, self.num_buckets)
        radices = lsh.bucket_radices(num_buckets)
        columns = lsh.num_rotation_columns(radices)
        rotations = lsh.draw_rotations(
            pixels * head_dim,
            heads,
            self.hash_rounds,
            columns,
            keys.device,
            None if self.training else self.eval_seed,
        )
        codes, projection = lsh.hash_codes(descriptors, rotations, radices, self.hash_rounds)
        within_bucket = projection if self.bucket_order == "similarity" else None
        return lsh.group_by_codes(codes, self.chunk_size, within_bucket)

    @staticmethod
    def _with_previous_chunk(t: torch.Tensor, sequences: int, num_chunks: int) -> torch.Tensor:
        """Keys of each chunk followed by those of the chunk before it (circular within a round)."""
        per_sequence = t.view(sequences, num_chunks, *t.shape[1:])
        previous = per_sequence.roll(1, dims=1)
        return torch.cat([per_sequence, previous], dim=-2).flatten(0, 1)


def partition(x: torch.Tensor, patch_size: int) -> torch.Tensor:
    """`[B, H, W, c]` -> `[B, N, r*r, c]`: non-overlapping r x r patches in raster order."""
    batch, height, width, channels = x.shape
    r = patch_size
    x = x.view(batch, height // r, r, width // r, r, channels).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(batch, -1, r * r, channels)


def unpartition(patches: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Inverse of `partition`: `[B, N, r*r, c]` -> `[B, H, W, c]`."""
    batch, _, pixels, channels = patches.shape
    r = int(round(pixels**0.5))
    x = patches.view(batch, height // r, width // r, r, r, channels).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(batch, height, width, channels)
