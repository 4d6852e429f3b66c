"""`val_batches`: the validation samples of one rank, one image per batch, in a fixed order.

The validation set (its first `data.max_val_samples`, if set) is cut into `world_size` contiguous parts in
manifest order; rank r evaluates part r, so the ranks together see every sample exactly once; within a part the order is the manifest's. Images come
whole (or as their centre `data.val_crop_size` tile) and unpadded: the model pads. Clean sets are degraded
with a generator drawn from the sample key alone, so numbers are comparable between runs.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from kitdist import storage
from kitdist.config import RunConfig
from kitdist.data.batch import stack
from kitdist.data.decode import CorruptSample, val_pair
from kitdist.data.order import EpochLayout
from kitdist.data.shardio import ReadOptions, ShardCursor, ShardSet
from kitdist.data.stream import open_shard_set

SKIPPED = {"skipped": True}


class _ValPart(IterableDataset):
    def __init__(self, cfg: RunConfig, shards: ShardSet, start: int, end: int) -> None:
        self.cfg, self.shards, self.start, self.end = cfg, shards, start, end

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        index, count = (info.id, info.num_workers) if info is not None else (0, 1)
        cursor = ShardCursor(self.shards, 0, 1, ReadOptions.of(self.cfg.data))
        samples = self.shards.samples
        layout = EpochLayout(tuple(range(len(samples))), _starts(samples))  # manifest order
        # Positions go round-robin over the workers, as the DataLoader collects from them, so batches arrive
        # in manifest order; a skipped sample still sends a marker to keep the turn.
        for position in range(self.start + index, self.end, count):
            shard, offset = layout.locate(position)
            sample = cursor.get(0, shard, offset)
            if sample is None:
                cursor.count(shard, "missing", f"no readable sample at offset {offset}")
                yield SKIPPED
                continue
            try:
                source, target = val_pair(sample, self.cfg)
            except CorruptSample as err:
                cursor.count(shard, "corrupt", str(err))
                yield SKIPPED
                continue
            yield {"input": stack([source]), "target": stack([target]), "keys": [sample["__key__"]]}


def _starts(sizes: tuple[int, ...]) -> tuple[int, ...]:
    starts, total = [], 0
    for size in sizes:
        starts.append(total)
        total += size
    return tuple(starts)


def val_batches(cfg: RunConfig, rank: int, world_size: int) -> Iterator[dict[str, Any]]:
    """This rank's validation samples as {"input", "target": float32 [1, 3, H, W], "keys": [key]}."""
    shards = open_shard_set(cfg.data.val_shards, cfg.data.kind, "data.val_shards")
    sizes = shards.samples
    total = sum(sizes) if not cfg.data.max_val_samples else min(sum(sizes), cfg.data.max_val_samples)
    start, end = rank * total // world_size, (rank + 1) * total // world_size
    workers = min(cfg.data.num_workers, max(0, end - start))
    part = _ValPart(cfg, shards, start, end)
    loader = DataLoader(
        part,
        batch_size=None,
        num_workers=workers,
        prefetch_factor=2 if workers else None,
        **(storage.forked_loader_options() if workers else {}),
    )
    yield from (batch for batch in loader if "skipped" not in batch)
