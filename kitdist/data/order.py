"""Who reads which samples: the epoch order, its split over (rank, worker), and re-splitting on resume.

Positions. Epoch `e` has one global sample order, a pure function of (seed, e): the shards in an order
drawn from (seed, e), each shard's samples window-shuffled with a generator drawn from (seed, e, shard).
Position g of that order is a sample; a set of positions is a sorted list of half-open intervals.

Split. A plan cuts a list of positions into equal runs of whole batches: every rank gets
floor(R / (world * b)) batches, each worker of a rank a contiguous part of its rank's run. The fewer than
world * b positions left over are `unassigned`: not read in this epoch (the next epoch reshuffles them).

Segments. A worker owns `Segment`s (kitdist.data.stream_state); it reads a segment in order, then the
next, then (when it has none left) the fresh plan of the next epoch for its (rank, worker) slot.

Resume. With the same world size, worker count and batch size a worker simply continues its segments.
Otherwise `replan` collects, per epoch, every position no worker has yielded yet (plus the unassigned
ones) and splits that again over the new ranks and workers.
"""

from __future__ import annotations

import bisect
import dataclasses
from dataclasses import dataclass

import numpy as np

from kitdist.data.stream_state import Intervals, Segment, StreamState, WorkerState


def length(intervals: Intervals) -> int:
    return sum(end - start for start, end in intervals)


def take(intervals: Intervals, count: int) -> tuple[Intervals, Intervals]:
    """Splits off the first `count` positions: (head, rest)."""
    head: Intervals = []
    rest: Intervals = []
    for start, end in intervals:
        if count <= 0:
            rest.append([start, end])
        elif end - start <= count:
            head.append([start, end])
            count -= end - start
        else:
            head.append([start, start + count])
            rest.append([start + count, end])
            count = 0
    return head, rest


def merge(intervals: Intervals) -> Intervals:
    """Sorted, overlap-free, adjacent intervals joined."""
    out: Intervals = []
    for start, end in sorted(i for i in intervals if i[1] > i[0]):
        if out and start <= out[-1][1]:
            out[-1][1] = max(out[-1][1], end)
        else:
            out.append([start, end])
    return out


def position_at(intervals: Intervals, index: int) -> int:
    """The `index`-th position of the list."""
    for start, end in intervals:
        if index < end - start:
            return start + index
        index -= end - start
    raise IndexError(index)


@dataclass(frozen=True)
class EpochLayout:
    """Maps epoch positions to (shard index in the manifest, offset in that shard's shuffled order)."""

    shard_order: tuple[int, ...]
    starts: tuple[int, ...]  # first position of each shard in `shard_order`

    @classmethod
    def build(cls, seed: int, epoch: int, shard_sizes: list[int]) -> EpochLayout:
        order = np.random.default_rng([seed & 0xFFFFFFFF, epoch, 0x5A4D]).permutation(len(shard_sizes))
        starts = np.concatenate([[0], np.cumsum([shard_sizes[i] for i in order])[:-1]])
        return cls(tuple(int(i) for i in order), tuple(int(s) for s in starts))

    def locate(self, position: int) -> tuple[int, int]:
        slot = bisect.bisect_right(self.starts, position) - 1
        return self.shard_order[slot], position - self.starts[slot]


def next_shard(layout: EpochLayout, intervals: Intervals, index: int) -> int | None:
    """The shard a reader of `intervals` opens after the one holding their `index`-th position, or None
    when no other shard follows."""
    current = None
    for start, end in take(intervals, index)[1]:
        position = start
        while position < end:
            slot = bisect.bisect_right(layout.starts, position) - 1
            if current is None:
                current = slot
            elif slot != current:
                return layout.shard_order[slot]
            position = layout.starts[slot + 1] if slot + 1 < len(layout.starts) else end
    return None


def split(
    positions: Intervals, world: int, workers: int, batch: int
) -> tuple[list[list[Intervals]], Intervals]:
    """Cuts positions into [rank][worker] runs of whole batches, equal per rank; returns (runs, leftover).

    Worker w of a rank gets as many batches as the round-robin of a DataLoader hands it: batches
    w, w + workers, ... of the rank's floor(R / (world * batch)) batches."""
    per_rank = length(positions) // (world * batch)
    runs: list[list[Intervals]] = []
    rest = positions
    for _ in range(world):
        rank_runs = []
        for worker in range(workers):
            count = len(range(worker, per_rank, workers))
            head, rest = take(rest, count * batch)
            rank_runs.append(head)
        runs.append(rank_runs)
    return runs, rest


def fresh_segment(
    total: int, epoch: int, rank: int, worker: int, world: int, workers: int, batch: int
) -> Segment:
    runs, leftover = split([[0, total]], world, workers, batch)
    return Segment(epoch, runs[rank][worker], leftover)


def unread(worker: WorkerState, batch: int) -> dict[int, Intervals]:
    """Per epoch, the positions a worker owns and has not yielded yet (its current segment past the
    batches it yielded, and its queued segments)."""
    owned: dict[int, Intervals] = {}
    for index, segment in enumerate(worker.segments):
        intervals = segment.intervals
        if index == 0:
            # Positions that went into yielded batches; refills past the end (corrupt samples) count
            # as read, so a resumed run never re-reads them.
            used = max(worker.pointer, worker.segment_batches * batch)
            intervals = take(intervals, used)[1]
        owned.setdefault(segment.epoch, []).extend(intervals)
    return owned


def with_fresh_plans(state: StreamState, worker: WorkerState, last_epoch: int) -> WorkerState:
    """The worker with the plans of the epochs up to `last_epoch` it has not started yet queued."""
    fresh = [
        fresh_segment(state.total_samples, epoch, state.rank, worker.slot, *state.layout)
        for epoch in range(worker.segments[-1].epoch + 1, last_epoch + 1)
    ]
    return dataclasses.replace(worker, segments=worker.segments + tuple(fresh))


def replan(old_ranks: list[StreamState], world: int, workers: int, batch: int) -> list[list[list[Segment]]]:
    """New segments [rank][worker] -> list of segments, covering every epoch some old worker was in."""
    last_epoch = max(w.segments[-1].epoch for state in old_ranks for w in state.workers)
    remaining: dict[int, Intervals] = {}
    unassigned: dict[int, Intervals] = {}
    for state in old_ranks:
        for worker in state.workers:
            worker = with_fresh_plans(state, worker, last_epoch)
            unassigned.update((segment.epoch, segment.unassigned) for segment in worker.segments)
            for epoch, intervals in unread(worker, state.batch_size).items():
                remaining.setdefault(epoch, []).extend(intervals)
    new: list[list[list[Segment]]] = [[[] for _ in range(workers)] for _ in range(world)]
    for epoch in sorted(unassigned):
        runs, leftover = split(merge(remaining.get(epoch, []) + unassigned[epoch]), world, workers, batch)
        for rank in range(world):
            for worker in range(workers):
                new[rank][worker].append(Segment(epoch, runs[rank][worker], leftover))
    return new
