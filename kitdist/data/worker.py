"""What one DataLoader worker does: walk its segments position by position, read and transform the
samples, and yield whole batches, each carrying the worker's state right after it.

The state travels with the batch so that the trainer's process knows the position of what was YIELDED,
whatever the DataLoader prefetched. A position that gives no usable sample (corrupt, missing from a
truncated or unreadable shard) is counted and passed over; when a segment runs out before its last batch
is full, the worker refills from the start of the segment (another "round", other crops), so every rank
still yields exactly its number of batches.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from kitdist.config import RunConfig
from kitdist.data import plan
from kitdist.data.batch import TrainItem, collate
from kitdist.data.samples import CorruptSample, train_item
from kitdist.data.shardio import ReadOptions, ShardCursor, ShardSet

# A segment that still cannot fill its batches after this many passes over its positions is hopeless.
MAX_ROUNDS = 4


class DataUnavailable(RuntimeError):
    """Too few readable samples to fill the batches this worker owes; names the shards at fault."""


@dataclass(frozen=True)
class StreamSpec:
    """Everything a worker needs, picklable: the shard set, the run's settings and this rank's place."""

    cfg: RunConfig
    shards: ShardSet
    rank: int
    world_size: int
    num_workers: int  # logical workers: max(1, data.num_workers)
    batch_size: int

    @property
    def total(self) -> int:
        return sum(self.shards.samples)

    def cursor(self, problems: dict, damaged: dict) -> ShardCursor:
        data = self.cfg.data
        cursor = ShardCursor(self.shards, self.cfg.train.seed, data.shuffle_buffer, ReadOptions.of(data))
        cursor.problems = copy.deepcopy(problems)
        cursor.damaged = dict(damaged)
        return cursor


def fresh_worker_state(spec: StreamSpec, slot: int, epoch: int = 0) -> dict[str, Any]:
    segment = plan.fresh_segment(
        spec.total, epoch, spec.rank, slot, spec.world_size, spec.num_workers, spec.batch_size
    )
    return {
        "slot": slot,
        "segments": [segment],
        "pointer": 0,
        "segment_batches": 0,
        "problems": {},
        "damaged": {},
    }


class EpochWorker:
    """Yields batches from a worker state (which it advances in place)."""

    def __init__(self, spec: StreamSpec, state: dict[str, Any]) -> None:
        self.spec = spec
        self.state = state
        self.cursor = spec.cursor(state["problems"], state["damaged"])
        self.layouts: dict[int, plan.EpochLayout] = {}
        self._reading: tuple[int, int] | None = None  # (epoch, shard) of the last position served

    def batches(self) -> Iterator[dict[str, Any]]:
        while True:
            segment = self.state["segments"][0]
            if self.state["segment_batches"] >= plan.length(segment["intervals"]) // self.spec.batch_size:
                self._next_segment()
                continue
            batch = self._fill(segment)
            self.state["segment_batches"] += 1
            self.state["problems"] = self.cursor.problems
            self.state["damaged"] = self.cursor.damaged
            batch["_state"] = copy.deepcopy(self.state)
            yield batch

    def _next_segment(self) -> None:
        done = self.state["segments"].pop(0)
        if not self.state["segments"]:
            self.state["segments"].append(
                fresh_worker_state(self.spec, self.state["slot"], done["epoch"] + 1)["segments"][0]
            )
        self.state["pointer"] = 0
        self.state["segment_batches"] = 0

    def _fill(self, segment: dict[str, Any]) -> dict[str, Any]:
        epoch, intervals = segment["epoch"], segment["intervals"]
        size = plan.length(intervals)
        items: list[TrainItem] = []
        while len(items) < self.spec.batch_size:
            pointer = self.state["pointer"]
            if pointer >= MAX_ROUNDS * size:
                raise DataUnavailable(self._hopeless_message(epoch))
            self.state["pointer"] += 1
            round_ = pointer // size
            shard, offset = self._layout(epoch).locate(plan.position_at(intervals, pointer % size))
            item = self._read(epoch, shard, offset, round_)
            if item is not None:
                items.append(item)
            if (epoch, shard) != self._reading:  # just opened (which took its prefetch): ask for the next
                self._reading = (epoch, shard)
                upcoming = plan.next_shard(self._layout(epoch), intervals, pointer % size)
                if upcoming is not None:
                    self.cursor.prefetch(epoch, upcoming)
        return {**collate(items), "epoch": epoch}

    def _read(self, epoch: int, shard: int, offset: int, round_: int) -> TrainItem | None:
        sample = self.cursor.get(epoch, shard, offset)
        if sample is None:
            if round_ == 0:
                self.cursor.count(shard, "missing", f"no readable sample at offset {offset}")
            return None
        try:
            return train_item(sample, self.spec.cfg, epoch, round_)
        except CorruptSample as err:
            if round_ == 0:
                self.cursor.count(shard, "corrupt", str(err))
            return None

    def _layout(self, epoch: int) -> plan.EpochLayout:
        if epoch not in self.layouts:
            self.layouts = {
                epoch: plan.EpochLayout.build(self.spec.cfg.train.seed, epoch, list(self.spec.shards.samples))
            }
        return self.layouts[epoch]

    def _hopeless_message(self, epoch: int) -> str:
        bad = sorted(set(self.cursor.problems) | set(self.cursor.damaged))
        return (
            f"rank {self.spec.rank} worker {self.state['slot']}, epoch {epoch}: too few readable samples to fill"
            f" {self.spec.batch_size}-sample batches after {MAX_ROUNDS} passes; problem shards: {bad}"
        )


class ResampledWorker:
    """`data.mode: resampled`: shards drawn with replacement, forever; no position to keep, only a batch
    count so a resumed run draws new shards instead of replaying the first ones."""

    def __init__(self, spec: StreamSpec, slot: int, start_batches: int) -> None:
        self.spec, self.slot, self.start = spec, slot, start_batches
        self.cursor = spec.cursor({}, {})

    def batches(self) -> Iterator[dict[str, Any]]:
        seed = self.spec.cfg.train.seed & 0xFFFFFFFF
        rng = np.random.default_rng([seed, self.spec.rank, self.slot, self.start, 0x2E5A])
        per_epoch = max(1, self.spec.total // (self.spec.world_size * self.spec.batch_size))
        items: list[TrainItem] = []
        done = 0
        while True:
            draw = int(rng.integers(2**62))  # stands in for the epoch in every seed of this shard's samples
            shard = int(rng.integers(len(self.spec.shards.samples)))
            for offset in range(self.spec.shards.samples[shard]):
                sample = self.cursor.get(draw, shard, offset)
                if sample is None:
                    break
                try:
                    items.append(train_item(sample, self.spec.cfg, draw, 0))
                except CorruptSample as err:
                    self.cursor.count(shard, "corrupt", str(err))
                    continue
                if len(items) == self.spec.batch_size:
                    epoch = (self.start + done * self.spec.num_workers) // per_epoch
                    state = {
                        "slot": self.slot,
                        "problems": self.cursor.problems,
                        "damaged": self.cursor.damaged,
                    }
                    yield {**collate(items), "epoch": epoch, "_state": copy.deepcopy(state)}
                    items = []
                    done += 1
