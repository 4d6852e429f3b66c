"""What a DataLoader worker does for each slot it serves (one part of one micro-batch stream): walk the
slot's segments position by position, read and transform the samples, and yield whole micro-batches, each
as (batch, the slot's state right after it).

The state travels with the batch so that the trainer's process knows the position of what was YIELDED,
whatever the DataLoader prefetched. A position that gives no usable sample (corrupt, missing from a
truncated or unreadable shard) is counted and passed over; when a segment runs out before its last batch
is full, the worker refills from the start of the segment (another "round", other crops), so every rank
still yields exactly its number of batches.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from kitdist.config import RunConfig
from kitdist.data import order
from kitdist.data.batch import TrainItem, collate
from kitdist.data.decode import CorruptSample, train_item
from kitdist.data.shardio import ReadOptions, ShardCursor, ShardSet
from kitdist.data.stream_state import DataProblems, Segment, WorkerState, stream_of

# A segment that still cannot fill its batches after this many passes over its positions is hopeless.
MAX_ROUNDS = 4


class DataUnavailable(RuntimeError):
    """Too few readable samples to fill the batches a slot owes; names the shards at fault."""


@dataclass(frozen=True)
class StreamSpec:
    """Everything a worker needs, picklable: the shard set, the run's settings and this rank's place."""

    cfg: RunConfig
    shards: ShardSet
    rank: int
    world_size: int
    grad_accum: int
    micro_batch: int
    num_workers: int  # parts per stream: max(1, data.num_workers)

    @property
    def total(self) -> int:
        return sum(self.shards.samples)

    @property
    def streams(self) -> int:
        return self.world_size * self.grad_accum

    @property
    def slots(self) -> int:
        """This rank's slots: a part of one of its streams each."""
        return self.grad_accum * self.num_workers

    @property
    def per_stream(self) -> int:
        """Micro-batches each stream reads per epoch."""
        return self.total // (self.streams * self.micro_batch)

    def cursor(self, problems: DataProblems) -> ShardCursor:
        """A shard cursor whose counts start from `problems`."""
        data = self.cfg.data
        cursor = ShardCursor(self.shards, self.cfg.train.seed, data.shuffle_buffer, ReadOptions.of(data))
        counts = DataProblems.copy_of(problems.counts, problems.damaged)
        cursor.problems, cursor.damaged = counts.counts, counts.damaged
        return cursor

    def fresh_segment(self, slot: int, epoch: int) -> Segment:
        """Epoch `epoch`'s plan for `slot` of this rank."""
        stream, part = stream_of(self.rank, self.grad_accum, slot)
        return order.fresh_segment(
            self.total, epoch, stream, part, self.streams, self.num_workers, self.micro_batch
        )


def fresh_worker_state(spec: StreamSpec, slot: int) -> WorkerState:
    return WorkerState(slot, (spec.fresh_segment(slot, 0),))


def counted(cursor: ShardCursor) -> DataProblems:
    return DataProblems.copy_of(cursor.problems, cursor.damaged)


class EpochWorker:
    """Yields (batch, state after it) from a worker state onwards."""

    def __init__(self, spec: StreamSpec, state: WorkerState) -> None:
        self.spec = spec
        self.state = state
        self.cursor = spec.cursor(state.problems)
        self.layouts: dict[int, order.EpochLayout] = {}
        self._reading: tuple[int, int] | None = None  # (epoch, shard) of the last position served

    def batches(self) -> Iterator[tuple[dict[str, Any], WorkerState]]:
        while True:
            segment = self.state.segment
            if self.state.segment_batches >= order.length(segment.intervals) // self.spec.micro_batch:
                self.state = self._next_segment()
                continue
            batch, pointer = self._fill(segment, self.state.pointer)
            self.state = dataclasses.replace(
                self.state,
                pointer=pointer,
                segment_batches=self.state.segment_batches + 1,
                problems=counted(self.cursor),
            )
            yield batch, self.state

    def _next_segment(self) -> WorkerState:
        done, *queued = self.state.segments
        if not queued:
            queued = [self.spec.fresh_segment(self.state.slot, done.epoch + 1)]
        return dataclasses.replace(self.state, segments=tuple(queued), pointer=0, segment_batches=0)

    def _fill(self, segment: Segment, pointer: int) -> tuple[dict[str, Any], int]:
        """The next batch of the segment from position index `pointer` on, and the index after it."""
        epoch, intervals = segment.epoch, segment.intervals
        size = order.length(intervals)
        items: list[TrainItem] = []
        while len(items) < self.spec.micro_batch:
            if pointer >= MAX_ROUNDS * size:
                raise DataUnavailable(self._hopeless_message(epoch))
            round_, index = divmod(pointer, size)
            pointer += 1
            shard, offset = self._layout(epoch).locate(order.position_at(intervals, index))
            item = self._read(epoch, shard, offset, round_)
            if item is not None:
                items.append(item)
            if (epoch, shard) != self._reading:  # just opened (which took its prefetch): ask for the next
                self._reading = (epoch, shard)
                upcoming = order.next_shard(self._layout(epoch), intervals, index)
                if upcoming is not None:
                    self.cursor.prefetch(epoch, upcoming)
        return {**collate(items), "epoch": epoch}, pointer

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

    def _layout(self, epoch: int) -> order.EpochLayout:
        if epoch not in self.layouts:
            self.layouts = {
                epoch: order.EpochLayout.build(
                    self.spec.cfg.train.seed, epoch, list(self.spec.shards.samples)
                )
            }
        return self.layouts[epoch]

    def _hopeless_message(self, epoch: int) -> str:
        bad = sorted(set(self.cursor.problems) | set(self.cursor.damaged))
        stream, part = stream_of(self.spec.rank, self.spec.grad_accum, self.state.slot)
        return (
            f"rank {self.spec.rank} stream {stream} part {part}, epoch {epoch}: too few readable samples to fill"
            f" {self.spec.micro_batch}-sample batches after {MAX_ROUNDS} passes; problem shards: {bad}"
        )


class ResampledWorker:
    """`data.mode: resampled`: shards drawn with replacement, forever, from a generator per (stream,
    part); no position to keep, only the count of micro-batches per stream read before (`start`), so a
    resumed run draws new shards instead of replaying the first ones. Its state carries only the problem
    counts."""

    def __init__(self, spec: StreamSpec, state: WorkerState, start: int) -> None:
        self.spec, self.state, self.start = spec, state, start
        self.cursor = spec.cursor(state.problems)

    def batches(self) -> Iterator[tuple[dict[str, Any], WorkerState]]:
        seed = self.spec.cfg.train.seed & 0xFFFFFFFF
        stream, part = stream_of(self.spec.rank, self.spec.grad_accum, self.state.slot)
        rng = np.random.default_rng([seed, stream, part, self.start, 0x2E5A])
        per_epoch = max(1, self.spec.per_stream)
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
                if len(items) == self.spec.micro_batch:
                    epoch = (self.start + done * self.spec.num_workers) // per_epoch
                    self.state = dataclasses.replace(self.state, problems=counted(self.cursor))
                    yield {**collate(items), "epoch": epoch}, self.state
                    items = []
                    done += 1
