"""Angular locality-sensitive hashing of image patches: hash, sort into groups of k, and un-sort.

KLA (k-NN local attention) never searches for nearest neighbours explicitly. Each head hashes every patch
descriptor (its flattened, L2-normalised, detached keys) with random rotations; patches with equal codes are
likely similar. Sorting the patches by code and cutting the sorted sequence into chunks of k patches puts
similar patches, wherever they lie in the image, into one group. This is Reformer's scheme (hash -> sort ->
chunk -> un-sort) applied to patches instead of tokens.

Order inside a bucket: Reformer breaks ties by position. On photographs that loses most of the non-local
matches: buckets are crowded (smooth regions look alike; a planted patch's bucket held ~34 patches on
average in our test at 64x64, against N/(#buckets) = 4), so two identical patches at opposite corners sit
at opposite ends of their bucket and rarely share a chunk (4% of draws against 1.2% by chance). With
`bucket_order="similarity"` (the default) patches inside a bucket are ordered by one more random projection
of the same descriptor (ties, i.e. identical descriptors, by position), so near-identical patches are
neighbours in the order: the same pair then shares a chunk in 75% of draws. `"position"` keeps Reformer's.

Bucket codes are a product of small cross-polytope hashes (`argmax([xR, -xR])` with at most `MAX_RADIX`
buckets each), read as one mixed-radix number. A single flat hash with N/k buckets needs a D x N/(2k)
rotation per round, so its cost grows with N^2 and, at a 256x256 map, is 16x the attention itself. The
product keeps the bucket count near N/k at a cost of D x ~log(N) per patch, and its ordering is
hierarchical: buckets next to each other in sort order agree on their leading sub-hashes, so a chunk that
spills over a bucket edge picks up patches that are still similar. Every sub-hash is angular LSH, and a
product of LSH functions is again LSH (the AND construction).

Randomness: training draws fresh rotations every forward pass from the default torch generator of the
tensor's device, so restoring the RNG state (checkpoint resume, activation-checkpoint recompute) replays
them exactly. Evaluation draws them from a private CPU generator seeded per layer, so it is deterministic
and leaves the global RNG untouched.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

MAX_RADIX = 16  # buckets per sub-hash; 16 needs 8 rotation columns


def resolve_num_buckets(num_patches: int, chunk_size: int, num_buckets: int | None) -> int:
    """The bucket count of one round: `num_buckets` when set, else N/k rounded to an even number (>= 2)."""
    if num_buckets is not None:
        return num_buckets
    target = max(num_patches // chunk_size, 1)
    return max(2, target + target % 2)


def bucket_radices(num_buckets: int) -> list[int]:
    """Splits a bucket count into even sub-hash sizes <= MAX_RADIX, most significant first.

    The product is >= num_buckets and exceeds it by less than one leading step; 1 means a single bucket.
    """
    if num_buckets <= 1:
        return []
    num_subhashes = max(1, math.ceil(math.log(num_buckets, MAX_RADIX) - 1e-9))
    rest = MAX_RADIX ** (num_subhashes - 1)
    leading = math.ceil(num_buckets / rest)
    leading += leading % 2
    return [leading] + [MAX_RADIX] * (num_subhashes - 1)


@dataclass(frozen=True)
class Grouping:
    """Where each patch went: `order[b, h, round, slot]` is the patch in sorted slot `slot` (the sequence
    padded to a multiple of k by wrapping around); `slot_of[b, h, round, n]` is the first slot of patch n."""

    order: torch.Tensor  # [B, heads, rounds, N_padded] int64
    slot_of: torch.Tensor  # [B, heads, rounds, N] int64


def draw_rotations(
    dim: int, num_heads: int, num_rounds: int, num_columns: int, device: torch.device, eval_seed: int | None
) -> torch.Tensor:
    """Random Gaussian rotations `[heads, dim, rounds * columns]` (float32).

    eval_seed None: from the default generator of `device` (training). Otherwise from a private generator
    seeded with eval_seed, drawn on CPU so the values do not depend on the device.
    """
    shape = (num_heads, dim, num_rounds * num_columns)
    if eval_seed is None:
        return torch.randn(shape, device=device, dtype=torch.float32)
    generator = torch.Generator(device="cpu").manual_seed(eval_seed)
    rotations = torch.randn(shape, generator=generator, dtype=torch.float32)
    return rotations.to(device) if device.type != "meta" else torch.empty(shape, device=device)


def num_rotation_columns(radices: list[int]) -> int:
    """Rotation columns one round needs: half of each sub-hash's buckets, plus one in-bucket projection."""
    return sum(radix // 2 for radix in radices) + 1


def hash_codes(
    descriptors: torch.Tensor, rotations: torch.Tensor, radices: list[int], num_rounds: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Bucket codes `[B, heads, rounds, N]` (int64) of descriptors `[B, heads, N, D]` (detached inside),
    and each patch's projection on the round's last rotation column (float32, same shape) for ordering
    patches inside a bucket."""
    unit = F.normalize(descriptors.detach().float(), dim=-1)
    batch, heads, num_patches, _ = unit.shape
    with _no_autocast(unit.device.type):
        projected = torch.einsum("bhnd,hdc->bhnc", unit, rotations)  # [B, h, N, rounds * columns]
    projected = projected.view(batch, heads, num_patches, num_rounds, -1)
    codes = torch.zeros((batch, heads, num_patches, num_rounds), dtype=torch.long, device=unit.device)
    start = 0
    for radix in radices:
        part = projected[..., start : start + radix // 2]
        codes = codes * radix + torch.cat([part, -part], dim=-1).argmax(dim=-1)
        start += radix // 2
    return codes.permute(0, 1, 3, 2), projected[..., -1].permute(0, 1, 3, 2)  # each [B, h, rounds, N]


def group_by_codes(
    codes: torch.Tensor, chunk_size: int, within_bucket: torch.Tensor | None = None
) -> Grouping:
    """Sorts patches per head and round by code, then by `within_bucket` if given, then by position; pads
    the order to a multiple of k."""
    num_patches = codes.shape[-1]
    position = torch.arange(num_patches, device=codes.device)
    if within_bucket is None:
        order = torch.argsort(codes * num_patches + position, dim=-1)  # unique keys: any sort will do
    else:  # code + a fraction in (0, 1/2); float64 keeps ~30 bits of it for codes < 2^20
        key = codes.double() + 0.5 * torch.sigmoid(within_bucket.double())
        order = torch.sort(key, dim=-1, stable=True).indices  # stable: equal keys stay in position order
    slot_of = torch.empty_like(order).scatter_(-1, order, position.expand_as(order))
    pad = -num_patches % chunk_size
    if pad:  # wrap around: the last chunk borrows the first patches of the same round
        repeats = math.ceil(pad / num_patches)
        wrap = order.repeat(1, 1, 1, repeats)[..., :pad]
        order = torch.cat([order, wrap], dim=-1)
    return Grouping(order=order, slot_of=slot_of)


def gather_rows(source: torch.Tensor, row_index: torch.Tensor) -> torch.Tensor:
    """`source[row_index]` over the flattened leading dims: source [R, F], row_index [...] -> [..., F]."""
    return source.index_select(0, row_index.reshape(-1)).view(*row_index.shape, source.shape[-1])


def sorted_row_index(grouping: Grouping, num_patches: int) -> torch.Tensor:
    """Rows of a `[B, N, heads]`-flattened tensor in sorted order: `[B, rounds, N_padded, heads]`."""
    order = grouping.order  # [B, h, R, Np]
    batch, heads = order.shape[:2]
    batch_offset = torch.arange(batch, device=order.device).view(batch, 1, 1, 1) * num_patches
    head = torch.arange(heads, device=order.device).view(1, heads, 1, 1)
    rows = (batch_offset + order) * heads + head  # [B, h, R, Np]
    return rows.permute(0, 2, 3, 1)


def unsorted_row_index(grouping: Grouping, chunk_size: int, num_chunks: int) -> torch.Tensor:
    """Rows of a chunked `[B, rounds, chunks, heads, k]`-flattened tensor back in patch order: `[B, R, N, h]`."""
    slot_of = grouping.slot_of  # [B, h, R, N]
    batch, heads, num_rounds = slot_of.shape[:3]
    device = slot_of.device
    sequence = torch.arange(batch * num_rounds, device=device).view(batch, 1, num_rounds, 1)
    head = torch.arange(heads, device=device).view(1, heads, 1, 1)
    chunk, within = slot_of // chunk_size, slot_of % chunk_size
    rows = ((sequence * num_chunks + chunk) * heads + head) * chunk_size + within  # [B, h, R, N]
    return rows.permute(0, 2, 3, 1)


def _no_autocast(device_type: str) -> contextlib.AbstractContextManager:
    """Hashing runs in float32 even under bf16 autocast: ties in bf16 would blur bucket boundaries."""
    if device_type in ("cpu", "cuda"):
        return torch.autocast(device_type=device_type, enabled=False)
    return contextlib.nullcontext()
