"""LSH grouping: photographs' look-alike patches share chunks far more often than chance, sort and un-sort
are exact, duplicate keys are counted right, no float64 on the hot path, evaluation rotations are fixed,
drawn once per shape and left on the model's device."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image
from torch.utils._python_dispatch import TorchDispatchMode

from kitdist.model import lsh
from kitdist.model.attention import KNNLocalAttention


def planted_photo_descriptors(photo_path, size: int = 64, r: int = 4) -> tuple[torch.Tensor, int, int]:
    """Patch descriptors of a real photo with one patch copied far across the image: `[1, 1, N, r*r*3]`."""
    image = np.asarray(Image.open(photo_path).convert("RGB").resize((size, size)), dtype=np.float32) / 255
    grid = size // r
    source, target = (1, 2), (grid - 2, grid - 1)  # top-left and bottom-right, far apart
    sy, sx, ty, tx = (c * r for c in (*source, *target))
    image[ty : ty + r, tx : tx + r] = image[sy : sy + r, sx : sx + r]
    patches = (
        torch.from_numpy(image).view(grid, r, grid, r, 3).permute(0, 2, 1, 3, 4).reshape(grid * grid, -1)
    )
    patches = patches - patches.mean(dim=0)  # centred, as keys after LayerNorm are
    return patches.view(1, 1, grid * grid, -1), source[0] * grid + source[1], target[0] * grid + target[1]


def same_chunk_rate(
    planted: list, bucket_order: str, chunk_size: int = 4, draws: int = 100
) -> tuple[float, float]:
    """How often the planted pair shares a chunk over random rotations (one draw = one hash round), and the
    rate by chance."""
    hits = 0
    for descriptors, source, target in planted:
        num_patches = descriptors.shape[2]
        radices = lsh.bucket_radices(lsh.resolve_num_buckets(num_patches, chunk_size, None))
        shape = (1, descriptors.shape[-1], draws * lsh.num_rotation_columns(radices))
        rotations = torch.randn(shape, generator=torch.Generator().manual_seed(0))
        codes, projection = lsh.hash_codes(descriptors, rotations, radices, draws)
        within = projection if bucket_order == "similarity" else None
        chunk_of = lsh.group_by_codes(codes, chunk_size, within).slot_of[0, 0] // chunk_size  # [draws, N]
        hits += int((chunk_of[:, source] == chunk_of[:, target]).sum())
    return hits / (draws * len(planted)), (chunk_size - 1) / (num_patches - 1)


def test_planted_identical_patches_far_apart_share_a_chunk_far_more_often_than_chance(photo_paths):
    planted = [planted_photo_descriptors(path) for path in photo_paths[:4]]
    rate, chance = same_chunk_rate(planted, "similarity")
    position_rate, _ = same_chunk_rate(planted, "position")
    print(
        f"same-chunk rate: similarity order {rate:.3f}, position order {position_rate:.3f}, chance {chance:.4f}"
    )
    assert rate > 20 * chance, f"same-chunk rate {rate:.3f} vs chance {chance:.4f}"
    assert position_rate > chance  # Reformer's order still beats chance, by far less (see lsh.py)
    assert rate > 5 * position_rate


def test_bucket_radices_are_even_and_cover_the_bucket_count():
    for num_buckets in (2, 6, 16, 18, 64, 100, 1024, 4096, 10_000):
        radices = lsh.bucket_radices(num_buckets)
        product = int(np.prod(radices))
        assert all(r % 2 == 0 and 2 <= r <= lsh.MAX_RADIX for r in radices)
        assert num_buckets <= product < 2 * num_buckets + lsh.MAX_RADIX
    assert lsh.bucket_radices(1) == []
    assert lsh.resolve_num_buckets(4096, 4, None) == 1024 and lsh.resolve_num_buckets(20, 4, None) == 6


def test_grouping_sorts_by_bucket_then_position_and_unsorts_exactly():
    codes = torch.tensor([3, 1, 3, 0, 1, 3, 0]).view(1, 1, 1, 7)
    grouping = lsh.group_by_codes(codes, chunk_size=3)
    assert grouping.order[0, 0, 0].tolist() == [3, 6, 1, 4, 0, 2, 5, 3, 6]  # padded by wrapping around
    order = grouping.order[0, 0, 0, :7]
    assert torch.equal(order[grouping.slot_of[0, 0, 0]], torch.arange(7))


def test_eval_rotations_do_not_touch_the_global_generator():
    state = torch.get_rng_state()
    first = lsh.draw_rotations(8, 2, 2, 4, torch.device("cpu"), eval_seed=5)
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(first, lsh.draw_rotations(8, 2, 2, 4, torch.device("cpu"), eval_seed=5))


def photo_descriptors(photo_path, size: int = 64, r: int = 4) -> torch.Tensor:
    """Centred r x r x 3 patch descriptors of a real photograph: `[1, 1, N, r*r*3]`."""
    image = np.asarray(Image.open(photo_path).convert("RGB").resize((size, size)), dtype=np.float32) / 255
    grid = size // r
    patches = (
        torch.from_numpy(image).view(grid, r, grid, r, 3).permute(0, 2, 1, 3, 4).reshape(grid * grid, -1)
    )
    return (patches - patches.mean(dim=0)).view(1, 1, grid * grid, -1)


def test_true_nearest_neighbours_share_a_chunk_at_least_5x_as_often_as_random_grouping(photo_paths):
    chunk_size, draws, shared, total = 4, 20, 0, 0
    for path in photo_paths[:4]:
        descriptors = photo_descriptors(path)
        num_patches = descriptors.shape[2]
        unit = torch.nn.functional.normalize(descriptors[0, 0], dim=-1)
        similarity = unit @ unit.T - 3 * torch.eye(num_patches)  # angular: what the hash approximates
        neighbours = similarity.topk(3, dim=-1).indices  # [N, 3]: each patch's true 3 nearest
        radices = lsh.bucket_radices(lsh.resolve_num_buckets(num_patches, chunk_size, None))
        shape = (1, descriptors.shape[-1], draws * lsh.num_rotation_columns(radices))
        rotations = torch.randn(shape, generator=torch.Generator().manual_seed(1))
        codes, projection = lsh.hash_codes(descriptors, rotations, radices, draws)
        chunk_of = lsh.group_by_codes(codes, chunk_size, projection).slot_of[0, 0] // chunk_size  # [draws, N]
        shared += int((chunk_of[:, neighbours] == chunk_of.unsqueeze(-1)).sum())
        total += draws * neighbours.numel()
    rate, chance = shared / total, (chunk_size - 1) / (num_patches - 1)
    print(f"share of true 3-NN in the patch's chunk: {rate:.3f}, random grouping {chance:.4f}")
    assert rate >= 5 * chance


def test_duplicate_log_counts_count_each_key_patch_over_the_rounds():
    # 4 patches, k = 2; round 0 chunks {0,1} {2,3}; round 1 chunks {0,2} {1,3}; round 2 like round 0
    order = torch.tensor([[0, 1, 2, 3], [0, 2, 1, 3], [1, 0, 3, 2]]).view(1, 1, 3, 4)
    slot_of = torch.argsort(order, dim=-1)
    counts = lsh.duplicate_log_counts(lsh.Grouping(order, slot_of), 2, look_back=False).exp()
    # patch 0 in round 0 sees {0: 3 rounds, 1: rounds 0 and 2}
    assert counts[0, 0, 0, 0].tolist() == [3.0, 2.0]
    # patch 2 at slot 1 of round 1 sees {0: round 1 only, 2: 3 rounds}
    assert counts[0, 0, 1, 1].tolist() == [1.0, 3.0]
    assert torch.equal(
        lsh.key_patches(lsh.Grouping(order, slot_of), 2, True)[0, 0, 0, 0], torch.tensor([0, 1, 2, 3])
    )


class DtypeRecorder(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.dtypes: set[torch.dtype] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(tensor, torch.Tensor):
                self.dtypes.add(tensor.dtype)
        return out


def test_no_float64_on_the_hot_path():
    kla = KNNLocalAttention(16, 2, patch_size=4, chunk_size=4, hash_rounds=2, duplicate_keys="once")
    x = torch.randn(1, 32, 32, 16, requires_grad=True)
    with DtypeRecorder() as recorder:
        kla(x).sum().backward()
    assert torch.float64 not in recorder.dtypes and torch.float32 in recorder.dtypes


def test_eval_rotations_are_drawn_once_per_shape_and_kept(monkeypatch):
    kla = KNNLocalAttention(16, 2, patch_size=4, chunk_size=4, hash_rounds=2).eval()
    draws = []
    real_draw = lsh.draw_rotations
    monkeypatch.setattr(lsh, "draw_rotations", lambda *a: draws.append(a) or real_draw(*a))
    x = torch.randn(1, 32, 32, 16)
    with torch.no_grad():
        first, second = kla(x), kla(x)
        kla(torch.randn(1, 64, 64, 16))  # another size: more buckets, more rotation columns
    assert torch.equal(first, second) and len(draws) == 2
    assert all(r.device == x.device for r in kla._eval_rotations.values())
