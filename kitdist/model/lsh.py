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
and leaves the global RNG untouched; the layer keeps them on its device per input shape
(`KNNLocalAttention._rotations`), so evaluation draws and copies them once, not every forward.

Moving the patches into chunks (`PixelRows`, `to_chunks`, `from_chunks`): the chunk kernels take q, k, v
sorted and chunked, `[parts, B, rounds, chunks, heads, k, P, d]` (Flex: `[parts, B, rounds, heads, chunks,
k, P, d]`, one sorted sequence per head and round), while the projections come out patch-major,
`[B, N, P, parts, heads, d]`. One `index_select` of d-float rows by a per-pixel index does the permute and
the sort in a single copy, and the backward of each move is a gather too (every source row sits once per
round at a known row, plus wrap-around duplicates), not a scatter-add into a zero-filled tensor
(benchmarks/RESULTS.md, "KLA on CPU after issue 18's last pass").

Sorting never builds a float64 key: patches are ordered by two stable sorts (by the in-bucket projection,
then by code), which gives the same order as a combined key without its precision limit.
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
    with no_autocast(unit.device.type):
        # rotations^T unit^T, [B, h, rounds * columns, N]: a GEMM with the few columns as rows runs ~3x
        # faster on CPU than unit @ rotations with a skinny output of 11 columns, and leaves N last
        projected = torch.matmul(rotations.transpose(-1, -2), unit.transpose(-1, -2))
    projected = projected.view(batch, heads, num_rounds, -1, num_patches)
    codes = torch.zeros((batch, heads, num_rounds, num_patches), dtype=torch.long, device=unit.device)
    start = 0
    for radix in radices:
        part = projected[:, :, :, start : start + radix // 2]
        codes = codes * radix + torch.cat([part, -part], dim=3).argmax(dim=3)
        start += radix // 2
    return codes, projected[:, :, :, -1]  # each [B, h, rounds, N]


def group_by_codes(
    codes: torch.Tensor, chunk_size: int, within_bucket: torch.Tensor | None = None
) -> Grouping:
    """Sorts patches per head and round by code, then by `within_bucket` if given, then by position; pads
    the order to a multiple of k."""
    num_patches = codes.shape[-1]
    position = torch.arange(num_patches, device=codes.device)
    if within_bucket is None:
        order = torch.argsort(codes * num_patches + position, dim=-1)  # unique keys: any sort will do
    else:  # two stable sorts, by projection then by code: no float64 key, ties stay in position order
        by_projection = torch.sort(within_bucket.float(), dim=-1, stable=True).indices
        by_code = torch.sort(codes.gather(-1, by_projection), dim=-1, stable=True).indices
        order = by_projection.gather(-1, by_code)
    slot_of = torch.empty_like(order).scatter_(-1, order, position.expand_as(order))
    pad = -num_patches % chunk_size
    if pad:  # wrap around: the last chunk borrows the first patches of the same round
        repeats = math.ceil(pad / num_patches)
        wrap = order.repeat(1, 1, 1, repeats)[..., :pad]
        order = torch.cat([order, wrap], dim=-1)
    return Grouping(order=order, slot_of=slot_of)


class PixelRows:
    """Row indices, one row per pixel, head (and part: q, k, v), between the map layout of KLA's
    projections, `[B, H, W, parts, h]` rows, and the sorted, chunked layout its kernels take: the chunk
    kernels' `[parts, B, R, chunks, h, k, P]` rows, or with `sequence_major` Flex's sequences,
    `[parts, B, R, h, chunks, k, P]` (outputs: `[B, R, H, W, h]` and the layout without parts).
    Moving rows of d floats by these indices cuts the map into patches, permutes and sorts in one copy.
    It keeps only per-patch tensors; each pixel-level index is built by broadcast arithmetic when a move
    (forward or backward) needs it, so autograd holds no index as large as the activations."""

    def __init__(
        self,
        grouping: Grouping,
        height: int,
        width: int,
        patch_size: int,
        chunk_size: int,
        parts: int,
        sequence_major: bool = False,
    ) -> None:
        order, slot_of = grouping.order, grouping.slot_of  # [B, h, R, Np], [B, h, R, N]
        self.batch, self.heads, self.rounds, num_padded = order.shape
        self.chunks, self.k, self.device = num_padded // chunk_size, chunk_size, order.device
        self.num_patches, self.map_pixels, self.parts = slot_of.shape[-1], height * width, parts
        self.pixels, self.sequence_major = patch_size * patch_size, sequence_major
        # [B, R, C, h, k] (chunk kernels) or [B, R, h, C, k] (Flex): the patch in each chunked slot
        self.patch = order.view(self.batch, self.heads, self.rounds, self.chunks, chunk_size).permute(
            (0, 2, 1, 3, 4) if sequence_major else (0, 2, 3, 1, 4)
        )
        self.map_position, patch_of_pixel, pixel_in_patch = _map_layout(
            height, width, patch_size, str(self.device)
        )
        # the output row, in the chunked layout, of each map pixel per head and round: [B, h, R, H*W]
        sequence = self._steps(self.batch, -1, 1, 1, 1) * self.rounds + self._steps(self.rounds, 1, 1, -1, 1)
        # index_select rather than slot_of[..., patch_of_pixel]: its output layout is the same when traced
        slot = slot_of.index_select(-1, patch_of_pixel)
        head = self._steps(self.heads, 1, -1, 1, 1)
        self.chunked_row = self._slot_row(sequence, head, slot) * self.pixels + pixel_in_patch
        self.output_rows = self.batch * self.rounds * self.chunks * self.heads * chunk_size * self.pixels

    def _slot_row(self, sequence: torch.Tensor, head: torch.Tensor, slot: torch.Tensor) -> torch.Tensor:
        """The chunked row (in patches) of sorted `slot` of `head` in `sequence` (batch x rounds)."""
        if self.sequence_major:
            return (sequence * self.heads + head) * self.chunks * self.k + slot
        return ((sequence * self.chunks + slot // self.k) * self.heads + head) * self.k + slot % self.k

    def _head_steps(self, leading: int) -> torch.Tensor:
        """Head indices shaped for `[leading x 1, B, R, C|h, h|C, k, P]`."""
        shape = [1] * (leading + 6)
        shape[leading + (2 if self.sequence_major else 3)] = -1
        return self._steps(self.heads, *shape)

    def _steps(self, count: int, *shape: int) -> torch.Tensor:
        return _steps(count, shape, str(self.device))

    def _map_position_of_patches(self) -> torch.Tensor:
        """`[B, R, C|h, h|C, k, P]`: the map position of each pixel of each chunked patch."""
        positions = self.map_position.index_select(0, self.patch.reshape(-1))
        return positions.view(*self.patch.shape, self.pixels)

    def source_of_chunked(self) -> torch.Tensor:
        """`[parts*B*R*C*h*k*P]`: the source row (of `[B, H, W, parts, h]`) of each chunked row."""
        pixel = self._steps(self.batch, -1, 1, 1, 1, 1, 1) * self.map_pixels + self._map_position_of_patches()
        rows = (pixel.unsqueeze(0) * self.parts + self._steps(self.parts, -1, 1, 1, 1, 1, 1, 1)) * self.heads
        return (rows + self._head_steps(1)).reshape(-1)

    def chunked_of_source(self) -> torch.Tensor:
        """`[R, B*H*W*parts*h]`: the chunked row of each source row in each round (its first slot)."""
        rows = self.chunked_row.permute(2, 0, 3, 1).unsqueeze(3)  # [R, B, H*W, 1, h]
        return (rows + self._steps(self.parts, -1, 1) * self.output_rows).reshape(self.rounds, -1)

    def chunked_of_pixel(self) -> torch.Tensor:
        """`[B*R*H*W*h]`: the chunked output row of each map pixel's output in each round."""
        return self.chunked_row.permute(0, 2, 3, 1).reshape(-1)

    def pixel_of_chunked(self) -> torch.Tensor:
        """`[B*R*C*h*k*P]`: the row of `[B, R, H, W, h]` of each chunked output row."""
        sequence = self._steps(self.batch, -1, 1, 1, 1, 1, 1) * self.rounds + self._steps(
            self.rounds, 1, -1, 1, 1, 1, 1
        )
        rows = (sequence * self.map_pixels + self._map_position_of_patches()) * self.heads
        return (rows + self._head_steps(0)).reshape(-1)

    def padded_outputs(self) -> torch.Tensor | None:
        """Chunked output rows in wrap-around pad slots (they feed nothing), or None."""
        if self.chunks * self.k == self.num_patches:
            return None
        slots = torch.arange(self.num_patches, self.chunks * self.k, device=self.device).view(1, 1, -1, 1)
        sequence = self._steps(self.batch * self.rounds, -1, 1, 1, 1)
        rows = self._slot_row(sequence, self._steps(self.heads, 1, -1, 1, 1), slots)
        rows = rows * self.pixels + self._steps(self.pixels, 1, 1, 1, -1)
        return rows.reshape(-1)  # [B*R, h, pad slots, P]

    def padded_inputs(self) -> torch.Tensor | None:
        """Chunked rows in pad slots, all parts (duplicates of rows that sit in an earlier slot too)."""
        outputs = self.padded_outputs()
        if outputs is None:
            return None
        return (outputs + self._steps(self.parts, -1, 1) * self.output_rows).reshape(-1)


_CONSTANTS: dict[tuple, tuple[torch.Tensor, ...]] = {}  # index constants per shape and device (see _constant)
_MAX_CONSTANTS = 256


def _constant(key: tuple, make) -> tuple[torch.Tensor, ...]:
    """`make()` (a tuple of tensors), kept per `key` (which ends with the device) and reused: at small maps
    building them costs more than the arithmetic. Only ordinary tensors are kept and handed out: under a
    fake-tensor mode (the memory estimate) or in inference mode new tensors are neither."""
    if torch.compiler.is_compiling():  # traced: the graph makes them itself
        return make()
    ordinary = type(torch.empty(0, device=key[-1])) is torch.Tensor and not torch.is_inference_mode_enabled()
    if ordinary and key in _CONSTANTS:
        return _CONSTANTS[key]
    made = make()
    if ordinary:
        if len(_CONSTANTS) >= _MAX_CONSTANTS:
            _CONSTANTS.clear()
        _CONSTANTS[key] = made
    return made


def _steps(count: int, shape: tuple[int, ...], device: str) -> torch.Tensor:
    """`arange(count)` viewed as `shape` on `device` (kept: never modified)."""
    return _constant(
        ("steps", count, shape, device), lambda: (torch.arange(count, device=device).view(*shape),)
    )[0]


def _map_layout(height: int, width: int, patch_size: int, device: str) -> tuple[torch.Tensor, ...]:
    """Per map shape: where each patch pixel sits in the map (`[N, P]`, row-major map position), and for
    each map pixel its patch and its pixel inside the patch (`[H*W]` each); kept per shape and device."""

    def make() -> tuple[torch.Tensor, ...]:
        rows = torch.arange(height, device=device).view(-1, 1)
        cols = torch.arange(width, device=device).view(1, -1)
        patch_of_pixel = ((rows // patch_size) * (width // patch_size) + cols // patch_size).reshape(-1)
        pixel_in_patch = ((rows % patch_size) * patch_size + cols % patch_size).reshape(-1)
        num_patches, pixels = height * width // patch_size**2, patch_size**2
        map_position = torch.empty((num_patches, pixels), dtype=torch.long, device=device)
        map_position[patch_of_pixel, pixel_in_patch] = torch.arange(height * width, device=device)
        return map_position, patch_of_pixel, pixel_in_patch

    return _constant(("map", height, width, patch_size, device), make)


def to_chunks(source: torch.Tensor, rows: PixelRows) -> torch.Tensor:
    """Rows `[B*H*W*parts*h, F]` of the projections -> `[parts*B*R*C*h*k*P, F]`, sorted and chunked."""
    return _MoveRows.apply(source, rows, True)


def from_chunks(chunked: torch.Tensor, rows: PixelRows) -> torch.Tensor:
    """A chunked output `[B*R*C*h*k*P, F]` -> `[B*R*H*W*h, F]` in map order, each patch's first slot."""
    return _MoveRows.apply(chunked, rows, False)


class _MoveRows(torch.autograd.Function):
    """`source[index]` whose backward gathers as well, instead of scatter-adding into zeros.

    Into chunks: a source row sits once per round at its first slot, plus in wrap-around pad slots; its
    gradient is the sum of those rows' (one gather per round, the pads added). Out of chunks: each
    chunked row feeds at most one output row; pad slots feed none and get no gradient."""

    @staticmethod
    def forward(ctx, source, rows, into_chunks):  # noqa: D102
        ctx.rows, ctx.into_chunks = rows, into_chunks
        index = rows.source_of_chunked() if into_chunks else rows.chunked_of_pixel()
        return source.index_select(0, index)

    @staticmethod
    def backward(ctx, grad):  # noqa: D102
        rows, grad = ctx.rows, grad.contiguous()
        if not ctx.into_chunks:
            moved = grad.index_select(0, rows.pixel_of_chunked())
            padded = rows.padded_outputs()
            return (moved if padded is None else moved.index_fill_(0, padded, 0.0)), None, None
        per_round = rows.chunked_of_source()
        moved = grad.index_select(0, per_round[0])
        for more in per_round[1:]:
            moved += grad.index_select(0, more)
        padded = rows.padded_inputs()
        if padded is not None:
            moved.index_add_(0, rows.source_of_chunked()[padded], grad.index_select(0, padded))
        return moved, None, None


def key_patches(grouping: Grouping, chunk_size: int, look_back: bool) -> torch.Tensor:
    """The patches whose pixels each chunk's queries see: `[B, h, R, chunks, Kp]`, Kp = k, or 2k with
    look-back (the chunk's own patches, then the previous chunk's, circular within a round)."""
    order = grouping.order
    own = order.view(*order.shape[:3], -1, chunk_size)
    return torch.cat([own, own.roll(1, dims=3)], dim=-1) if look_back else own


def duplicate_log_counts(grouping: Grouping, chunk_size: int, look_back: bool) -> torch.Tensor:
    """log of how often each key patch of a query patch's round-r key set occurs in the union of its key
    sets over all rounds: `[B, h, R, N_padded, Kp]` (float32), per sorted slot of the query patch.

    The merged softmax over rounds weighs a key patch that shares a chunk with the query in m rounds m
    times (the patch's own keys always, b times); subtracting log m from those logits counts every key of
    the union once (Reformer's duplicate correction)."""
    sets = key_patches(grouping, chunk_size, look_back)  # [B, h, R, C, Kp]
    own = sets.repeat_interleave(chunk_size, dim=3)  # [B, h, R, Np, Kp]: the key set of each slot
    chunk_of = (grouping.slot_of // chunk_size).unsqueeze(-1).expand(-1, -1, -1, -1, sets.shape[-1])
    by_patch = sets.gather(3, chunk_of)  # [B, h, R', N, Kp]: each patch's key set in round r'
    query = grouping.order.unsqueeze(-1).expand(-1, -1, -1, -1, sets.shape[-1])  # [B, h, R, Np, Kp]
    counts = torch.zeros(own.shape, dtype=torch.float32, device=own.device)
    for other_round in range(sets.shape[2]):
        other = by_patch[:, :, other_round].unsqueeze(2).expand(-1, -1, own.shape[2], -1, -1)
        other = other.gather(3, query).clone()  # [B, h, R, Np, Kp]: round r' key set of slot's patch
        other[:, :, other_round] = own[:, :, other_round]  # in its own round, the slot's chunk itself
        counts += (own.unsqueeze(-1) == other.unsqueeze(-2)).sum(-1)
    return counts.log()


def no_autocast(device_type: str) -> contextlib.AbstractContextManager:
    """Autocast off on `device_type` (hashing runs in float32 even under bf16 autocast: ties in bf16
    would blur bucket boundaries). Devices without autocast (meta: the driver's checks) get a no-op."""
    if device_type in ("cpu", "cuda"):
        return torch.autocast(device_type=device_type, enabled=False)
    return contextlib.nullcontext()
