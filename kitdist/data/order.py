"""Who reads which samples: the epoch order, its split over micro-batch streams, and re-splitting on resume.

Positions. Epoch `e` has one global sample order, a pure function of (seed, e): the shards in an order
drawn from (seed, e), each shard's samples window-shuffled with a generator drawn from (seed, e, shard).
Position g of that order is a sample; a set of positions is a sorted list of half-open intervals.

Split. A plan cuts a list of positions into equal runs of whole micro-batches, one run per micro-batch
stream (global batch / micro-batch of them, whatever the world size: see kitdist.data.stream_state):
every stream gets floor(R / (streams * b)) micro-batches, each part of a stream (one per DataLoader
worker) a contiguous piece of its stream's run. The fewer than streams * b positions left over are
`unassigned`: not read in this epoch (the next epoch reshuffles them).

Segments. A slot (one part of one stream) owns `Segment`s; it reads a segment in order, then the next,
then (when it has none left) the fresh plan of the next epoch for its (stream, part).

Resume. With the same streams, parts and micro-batch every slot simply continues its segments, whichever
rank now owns its stream. Otherwise `replan` collects, per epoch, every position no slot has yielded yet
(plus the unassigned ones) and splits that again over the new streams and parts.
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
    positions: Intervals, streams: int, parts: int, batch: int
) -> tuple[list[list[Intervals]], Intervals]:
    """Cuts positions into [stream][part] runs of whole batches, equal per stream; returns (runs,
    leftover).

    Part p of a stream gets as many batches as it serves when the parts take turns: batches
    p, p + parts, ... of the stream's floor(R / (streams * batch)) batches."""
    per_stream = length(positions) // (streams * batch)
    runs: list[list[Intervals]] = []
    rest = positions
    for _ in range(streams):
        stream_runs = []
        for part in range(parts):
            count = len(range(part, per_stream, parts))
            head, rest = take(rest, count * batch)
            stream_runs.append(head)
        runs.append(stream_runs)
    return runs, rest


def fresh_segment(
    total: int, epoch: int, stream: int, part: int, streams: int, parts: int, batch: int
) -> Segment:
    runs, leftover = split([[0, total]], streams, parts, batch)
    return Segment(epoch, runs[stream][part], leftover)


def unread(worker: WorkerState, batch: int) -> dict[int, Intervals]:
    """Per epoch, the positions a slot owns and has not yielded yet (its current segment past the
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
    """The slot with the plans of the epochs up to `last_epoch` it has not started yet queued."""
    stream, part = state.stream_of(worker.slot)
    fresh = [
        fresh_segment(state.total_samples, epoch, stream, part, *state.layout)
        for epoch in range(worker.segments[-1].epoch + 1, last_epoch + 1)
    ]
    return dataclasses.replace(worker, segments=worker.segments + tuple(fresh))


def replan(old_ranks: list[StreamState], streams: int, parts: int, batch: int) -> list[list[list[Segment]]]:
    """New segments [stream][part] -> list of segments, covering every epoch some old slot was in."""
    last_epoch = max(w.segments[-1].epoch for state in old_ranks for w in state.workers)
    remaining: dict[int, Intervals] = {}
    unassigned: dict[int, Intervals] = {}
    for state in old_ranks:
        for worker in state.workers:
            worker = with_fresh_plans(state, worker, last_epoch)
            unassigned.update((segment.epoch, segment.unassigned) for segment in worker.segments)
            for epoch, intervals in unread(worker, state.micro_batch).items():
                remaining.setdefault(epoch, []).extend(intervals)
    new: list[list[list[Segment]]] = [[[] for _ in range(parts)] for _ in range(streams)]
    for epoch in sorted(unassigned):
        runs, leftover = split(merge(remaining.get(epoch, []) + unassigned[epoch]), streams, parts, batch)
        for stream in range(streams):
            for part in range(parts):
                new[stream][part].append(Segment(epoch, runs[stream][part], leftover))
    return new
