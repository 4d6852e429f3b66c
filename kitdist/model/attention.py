"""k-NN local attention (KLA): pair-wise local attention among the pixels of k hashed-together patches.

A feature map `[B, H, W, c]` is cut into N = HW/r^2 patches of P = r^2 pixels. Per head, LSH (`lsh.py`)
sorts the patches so that similar ones sit next to each other, and the sorted sequence is cut into chunks
of k patches. Every pixel then attends to all k*P pixels of its chunk (plus the previous chunk with
`look_back`), with a learned bias indexed by the in-patch offset between query and key pixel ((2r-1)^2
entries per head: positions across different patches carry no spatial meaning). With b hash rounds each
round gives an output and its log-sum-exp; rounds are merged by a softmax over their log-sum-exps, which
equals one softmax over the union of the rounds' key sets.

Duplicate keys: a patch's own keys sit in its chunk in every round (and a neighbour may share its chunk in
several), so the union is a multiset. `duplicate_keys="count"` (the default, and what KLA always did)
keeps it so: a key present in m rounds weighs m times, the plain average-of-rounds reading of the merge.
`"once"` subtracts log m from such keys' logits (Reformer's correction), so the merge is one softmax over
the distinct keys of the union. With one round, or k = 1, the two are the same.

The grouped attention itself runs in one of the kernels of `kernels.py` ("explicit": the CPU default,
"reference": the ground truth, "sdpa") or in FlexAttention over the sorted sequences ("flex", `flex.py`:
the CUDA default). `attention_impl="auto"` picks "flex" on CUDA and "explicit" elsewhere, per call, so a
model built on CPU and moved to a GPU takes the GPU kernel. All give the same values and gradients. The
kernels take q, k, v moved from the map straight into sorted chunks (Flex: sorted sequences) and give
their outputs straight back (`lsh.PixelRows`).
"""

from __future__ import annotations

import torch
from torch import nn

from kitdist.model import lsh
from kitdist.model.kernels import CHUNK_KERNELS, reference_attention, run_in_slices

ATTENTION_IMPLS = ("auto", "explicit", "reference", "sdpa", "flex")
DUPLICATE_KEYS = ("count", "once")
EVAL_ROTATION_CACHE = 8  # distinct input shapes whose evaluation rotations a layer keeps


def relative_position_index(patch_size: int) -> torch.Tensor:
    """`[P, P]` index into a (2r-1)^2 bias table for every (query pixel, key pixel) pair of a patch."""
    rows, cols = torch.meshgrid(torch.arange(patch_size), torch.arange(patch_size), indexing="ij")
    coords = torch.stack([rows.flatten(), cols.flatten()])  # [2, P]
    offset = coords[:, :, None] - coords[:, None, :] + patch_size - 1  # [2, P, P], each in [0, 2r-2]
    return offset[0] * (2 * patch_size - 1) + offset[1]


def resolve_impl(attention_impl: str, device: torch.device) -> str:
    """The kernel "auto" means on `device`: Flex on CUDA, the explicit kernel elsewhere."""
    if attention_impl != "auto":
        return attention_impl
    return "flex" if device.type == "cuda" else "explicit"


__all__ = ["KNNLocalAttention", "partition", "reference_attention", "relative_position_index", "unpartition"]


class KNNLocalAttention(nn.Module):
    """KLA on a channels-last feature map `[B, H, W, c]` (H and W multiples of the patch size).

    Args:
        dim: channels c. num_heads: heads (c must divide evenly).
        patch_size: r, a patch is r x r pixels. chunk_size: k, patches per group.
        hash_rounds: b, independent LSH rounds. num_buckets: per round; None = N/k rounded to even.
        look_back: keys also include the previous chunk of the sorted order (Reformer's look-one-back).
        bucket_order: order inside a bucket, "similarity" (a further random projection) or "position".
        attention_impl: one of ATTENTION_IMPLS (see the module docstring).
        duplicate_keys: "count" or "once" (see the module docstring).
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
        attention_impl: str = "auto",
        duplicate_keys: str = "count",
        eval_hash_seed: int = 0,
        layer_id: int = 0,
    ) -> None:
        super().__init__()
        _check_choice("dim", dim % num_heads == 0, f"dim={dim} is not divisible by num_heads={num_heads}")
        for name, value, allowed in (
            ("attention_impl", attention_impl, ATTENTION_IMPLS),
            ("bucket_order", bucket_order, ("similarity", "position")),
            ("duplicate_keys", duplicate_keys, DUPLICATE_KEYS),
        ):
            _check_choice(name, value in allowed, f"{name} must be one of {list(allowed)}, got {value!r}")
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.patch_size, self.chunk_size, self.hash_rounds = patch_size, chunk_size, hash_rounds
        self.num_buckets, self.look_back, self.bucket_order = num_buckets, look_back, bucket_order
        self.attention_impl, self.duplicate_keys = attention_impl, duplicate_keys
        self.eval_seed = eval_hash_seed * 1_000_003 + layer_id  # distinct, fixed rotations per layer
        self.last_kernel = ""  # the kernel the latest forward ran ("explicit", "flex", ...): for tests
        self._eval_rotations: dict[tuple, torch.Tensor] = {}
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.bias_table = nn.Parameter(torch.zeros(num_heads, (2 * patch_size - 1) ** 2))
        nn.init.trunc_normal_(self.bias_table, std=0.02)
        self.register_buffer("bias_index", relative_position_index(patch_size), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, height, width, channels = x.shape
        heads, head_dim = self.num_heads, self.head_dim
        bias = self.bias_table[:, self.bias_index]  # [h, P, P]
        impl = resolve_impl(self.attention_impl, x.device)
        self.last_kernel = impl
        if self.chunk_size > 1 or self.look_back:
            # q, k, v move from the map straight into chunks (or Flex's sequences), outputs straight back
            qkv = self.qkv(x).view(batch, height, width, 3, heads, head_dim)
            out = self._grouped_chunks(qkv, bias, impl)  # [B, H, W, h, d]
            return self.proj(out.reshape(batch, height, width, channels))
        patches = partition(x, self.patch_size)  # [B, N, P, c]
        num_patches, pixels = patches.shape[1:3]
        qkv = self.qkv(patches).view(batch, num_patches, pixels, 3, heads, head_dim)
        # k = 1 (the bottleneck): each patch attends to itself, whatever the hash; every round would give
        # the same output and lse, so one round and no hashing compute exactly the merged result (Flex would
        # waste most of a tile on 16-pixel blocks: fused SDPA serves this case on CUDA)
        self.last_kernel = "sdpa" if impl == "flex" else impl
        q, k, v = qkv.permute(3, 0, 1, 4, 2, 5).flatten(1, 2).unbind(0)  # each [B*N, h, P, d]
        out, _ = run_in_slices(CHUNK_KERNELS[self.last_kernel], q, k, v, bias, head_dim**-0.5, False)
        out = out.view(batch, num_patches, heads, pixels, head_dim).transpose(2, 3)
        return unpartition(self.proj(out.reshape(batch, num_patches, pixels, channels)), height, width)

    def _grouped_chunks(self, qkv: torch.Tensor, bias: torch.Tensor, impl: str) -> torch.Tensor:
        """Hash, sort, chunk, attend, un-sort and merge rounds through a chunk kernel, with the chunks as a
        batch `[B*R*chunks, h, k*P, d]`, or through Flex, with one sorted sequence per head and round
        `[B*R, h, N_padded*P, d]` (`flex.py`). qkv [B, H, W, 3, h, d] -> [B, H, W, h, d]: the projections
        go from the map into chunks and the outputs back in one row copy each (`lsh.PixelRows`)."""
        batch, height, width, _, heads, head_dim = qkv.shape
        r = self.patch_size
        keys = qkv[:, :, :, 1].view(batch, height // r, r, width // r, r, heads, head_dim)
        descriptors = keys.permute(0, 5, 1, 3, 2, 4, 6).reshape(batch, heads, -1, r * r * head_dim)
        grouping = self._hash(descriptors)
        num_chunks, rounds = grouping.order.shape[-1] // self.chunk_size, self.hash_rounds
        look_back = self.look_back and num_chunks > 1
        flex = impl == "flex"
        rows = lsh.PixelRows(grouping, height, width, r, self.chunk_size, 3, sequence_major=flex)
        chunked = lsh.to_chunks(qkv.reshape(-1, head_dim), rows)  # [3*B*R*C*h*k*P, d]
        pair_bias = None
        if self.duplicate_keys == "once" and rounds > 1:  # [B, h, R, Np, Kp]
            pair_bias = -lsh.duplicate_log_counts(grouping, self.chunk_size, look_back)
        scale = head_dim**-0.5
        if flex:
            from kitdist.model.flex import flex_attention

            sq, sk, sv = chunked.view(3, batch * rounds, heads, -1, head_dim).unbind(0)
            if pair_bias is not None:  # -> [B*R, h, Np, Kp]
                pair_bias = pair_bias.transpose(1, 2).flatten(0, 1)
            out, lse = flex_attention(sq, sk, sv, bias, scale, self.chunk_size, look_back, pair_bias)
        else:
            sequences, chunk_pixels = batch * rounds * num_chunks, self.chunk_size * r * r
            sq, sk, sv = chunked.view(3, sequences, heads, chunk_pixels, head_dim).unbind(0)
            if look_back:
                sk, sv = (self._with_previous_chunk(t, batch * rounds, num_chunks) for t in (sk, sv))
            if pair_bias is not None:  # -> [B*R*chunks, h, k, Kp]
                pair_bias = pair_bias.view(batch, heads, rounds, num_chunks, self.chunk_size, -1)
                pair_bias = pair_bias.permute(0, 2, 3, 1, 4, 5).reshape(sequences, heads, self.chunk_size, -1)
            out, lse = run_in_slices(CHUNK_KERNELS[impl], sq, sk, sv, bias, scale, rounds > 1, pair_bias)
        out = lsh.from_chunks(out.reshape(-1, head_dim), rows)  # [B*R*H*W*h, d]
        if rounds == 1:
            return out.view(batch, height, width, heads, head_dim)
        lse = lsh.from_chunks(lse.reshape(-1, 1), rows).view(batch, rounds, height, width, heads, 1)
        return merge_rounds(out.view(batch, rounds, height, width, heads, head_dim), lse, dim=1)

    def _hash(self, descriptors: torch.Tensor) -> lsh.Grouping:
        """LSH grouping of the patches per head from their descriptors [B, h, N, P*d] (detached inside)."""
        num_patches, dim = descriptors.shape[-2:]
        num_buckets = lsh.resolve_num_buckets(num_patches, self.chunk_size, self.num_buckets)
        radices = lsh.bucket_radices(num_buckets)
        rotations = self._rotations(dim, lsh.num_rotation_columns(radices), descriptors.device)
        codes, projection = lsh.hash_codes(descriptors, rotations, radices, self.hash_rounds)
        within_bucket = projection if self.bucket_order == "similarity" else None
        return lsh.group_by_codes(codes, self.chunk_size, within_bucket)

    def _rotations(self, dim: int, columns: int, device: torch.device) -> torch.Tensor:
        """Training: fresh draws on `device`. Evaluation: the layer's fixed rotations, drawn once per shape
        and device and kept (a CPU draw and a copy to the device on every forward would stall a GPU)."""
        if self.training:
            return lsh.draw_rotations(dim, self.num_heads, self.hash_rounds, columns, device, None)
        key = (dim, columns, str(device))
        if key not in self._eval_rotations:
            if len(self._eval_rotations) >= EVAL_ROTATION_CACHE:
                self._eval_rotations.pop(next(iter(self._eval_rotations)))
            self._eval_rotations[key] = lsh.draw_rotations(
                dim, self.num_heads, self.hash_rounds, columns, device, self.eval_seed
            )
        return self._eval_rotations[key]

    @staticmethod
    def _with_previous_chunk(t: torch.Tensor, sequences: int, num_chunks: int) -> torch.Tensor:
        """Keys of each chunk followed by those of the chunk before it (circular within a round)."""
        per_sequence = t.view(sequences, num_chunks, *t.shape[1:])
        previous = per_sequence.roll(1, dims=1)
        return torch.cat([per_sequence, previous], dim=-2).flatten(0, 1)


def merge_rounds(out: torch.Tensor, lse: torch.Tensor, dim: int) -> torch.Tensor:
    """The rounds' outputs weighted by the softmax of their log-sum-exps over `dim` (lse broadcasts
    against out): one softmax over the union of the rounds' keys."""
    weights = torch.softmax(lse, dim=dim).to(out.dtype)
    return (out * weights).sum(dim=dim)


def _check_choice(name: str, ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(f"KLA: {message}")


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
