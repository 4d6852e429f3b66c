"""The training stream's position, typed: what a checkpoint stores per rank so the stream resumes exactly.

    StreamState     one rank: which run it belongs to (seed, shard set, mode), its layout, its counts
      .workers      one WorkerState per slot: its Segments and where it stands
      .carried      DataProblems taken over from before an elastic resume
    Segment         the positions of one epoch a slot reads, and the epoch's positions nobody reads
    DataProblems    samples passed over per shard and shards cut short; adds itself to another

Streams and slots. An optimiser step reads `streams` = global batch / micro-batch micro-batches, one from
each micro-batch stream; rank r with accumulation a owns streams r*a .. r*a+a-1. Each stream is read by
`num_workers` parts (one per DataLoader worker) that take its micro-batches in turn. A rank's slot n is
part n // a of its stream n % a (`stream_of`), so reading slots 0, 1, 2, ... in turn gives one step's
micro-batches in stream order, then the next step's.

Every type is frozen: a worker makes a new state for each batch it yields, and the trainer's process keeps
the one that came with the last batch it handed on. `to_json` gives plain dicts and lists (the checkpoint
stores them as JSON); `from_json` reads them back and raises `ResumeError` naming what does not fit.

JSON format "kitdist-stream/2": {"format", "mode", "seed", "shards" (digest of names and sizes),
"total_samples", "rank", "world_size", "grad_accum", "micro_batch", "streams", "num_workers", "batches"
(micro-batches this rank yielded), "next_slot", "workers": [{"slot", "segments": [{"epoch", "intervals",
"unassigned"}], "pointer", "segment_batches", "problems", "damaged"}], "carried": {"problems",
"damaged"}}. Format "kitdist-stream/1" (before streams: one stream per rank, read by its workers; it has
"batch_size" and no accumulation fields) is read as grad_accum 1, micro_batch = batch_size.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

STATE_FORMAT = "kitdist-stream/2"
RANK_STREAMS_FORMAT = "kitdist-stream/1"  # written before streams; still read

Intervals = list[list[int]]  # sorted, half-open [start, end) position ranges; never changed in place


class ResumeError(ValueError):
    """A saved stream state that does not fit this run; the message names the mismatch."""


def stream_of(rank: int, grad_accum: int, slot: int) -> tuple[int, int]:
    """(stream, part of that stream) read by `slot` of `rank`; see the module docstring."""
    return rank * grad_accum + slot % grad_accum, slot // grad_accum


@dataclass(frozen=True)
class DataProblems:
    """Per shard name, samples passed over ({"corrupt": n, "missing": n}); shards cut short, with why."""

    counts: dict[str, dict[str, int]] = field(default_factory=dict)
    damaged: dict[str, str] = field(default_factory=dict)

    def __add__(self, other: DataProblems) -> DataProblems:
        counts = {shard: dict(kinds) for shard, kinds in self.counts.items()}
        for shard, kinds in other.counts.items():
            mine = counts.setdefault(shard, {})
            for kind, count in kinds.items():
                mine[kind] = mine.get(kind, 0) + count
        return DataProblems(counts, {**self.damaged, **other.damaged})

    @classmethod
    def copy_of(cls, counts: dict[str, dict[str, int]], damaged: dict[str, str]) -> DataProblems:
        """A snapshot of counts that their owner (a shard cursor) goes on changing."""
        return cls(_copy_counts(counts), dict(damaged))

    @staticmethod
    def total(parts: Iterable[DataProblems]) -> DataProblems:
        return sum(parts, DataProblems())

    def to_json(self) -> dict[str, Any]:
        return {"problems": _copy_counts(self.counts), "damaged": dict(self.damaged)}

    @classmethod
    def from_json(cls, tree: dict[str, Any]) -> DataProblems:
        return cls(_copy_counts(tree["problems"]), dict(tree["damaged"]))


def _copy_counts(counts: dict[str, dict[str, int]]) -> dict[str, dict[str, int]]:
    return {shard: {kind: int(n) for kind, n in kinds.items()} for shard, kinds in counts.items()}


@dataclass(frozen=True)
class Segment:
    """Positions of epoch `epoch` one worker reads in order; `unassigned`: the epoch's positions no worker
    of the plan reads (kept so a re-split on resume can hand them out)."""

    epoch: int
    intervals: Intervals
    unassigned: Intervals

    def to_json(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "intervals": _copy(self.intervals), "unassigned": _copy(self.unassigned)}

    @classmethod
    def from_json(cls, tree: dict[str, Any]) -> Segment:
        return cls(int(tree["epoch"]), _copy(tree["intervals"]), _copy(tree["unassigned"]))


def _copy(intervals: Intervals) -> Intervals:
    return [[int(start), int(end)] for start, end in intervals]


@dataclass(frozen=True)
class WorkerState:
    """One logical worker: it reads `segments[0]`, then the next; `pointer` positions of it are consumed
    (past its end: refills after passed-over samples) and `segment_batches` batches of it yielded."""

    slot: int
    segments: tuple[Segment, ...]
    pointer: int = 0
    segment_batches: int = 0
    problems: DataProblems = field(default_factory=DataProblems)

    @property
    def segment(self) -> Segment:
        return self.segments[0]

    def to_json(self) -> dict[str, Any]:
        return {
            "slot": self.slot,
            "segments": [segment.to_json() for segment in self.segments],
            "pointer": self.pointer,
            "segment_batches": self.segment_batches,
            **self.problems.to_json(),
        }

    @classmethod
    def from_json(cls, tree: dict[str, Any]) -> WorkerState:
        segments = tuple(Segment.from_json(segment) for segment in tree["segments"])
        if not segments:
            raise ValueError("a worker without segments")
        pointer, yielded = int(tree["pointer"]), int(tree["segment_batches"])
        return cls(int(tree["slot"]), segments, pointer, yielded, DataProblems.from_json(tree))


@dataclass(frozen=True)
class StreamState:
    """One rank's stream position after the last batch it yielded."""

    mode: str
    seed: int
    shards: str  # digest of the shard names and sizes: a state resumes only on the same set
    total_samples: int
    rank: int
    world_size: int
    grad_accum: int
    micro_batch: int
    num_workers: int  # parts per stream: max(1, data.num_workers)
    batches: int  # micro-batches this rank yielded since the run began
    next_slot: int  # the slot whose batch comes next
    workers: tuple[WorkerState, ...]  # one per slot: grad_accum * num_workers
    carried: DataProblems = field(default_factory=DataProblems)

    @property
    def streams(self) -> int:
        return self.world_size * self.grad_accum

    @property
    def layout(self) -> tuple[int, int, int]:
        """What decides who reads which positions: (streams, parts per stream, micro-batch)."""
        return self.streams, self.num_workers, self.micro_batch

    @property
    def problems(self) -> DataProblems:
        return DataProblems.total([self.carried, *(worker.problems for worker in self.workers)])

    def stream_of(self, slot: int) -> tuple[int, int]:
        return stream_of(self.rank, self.grad_accum, slot)

    def to_json(self) -> dict[str, Any]:
        return {
            "format": STATE_FORMAT,
            **{name: getattr(self, name) for name in _SCALARS},
            "streams": self.streams,
            "workers": [worker.to_json() for worker in self.workers],
            "carried": self.carried.to_json(),
        }

    @classmethod
    def from_json(cls, tree: Any, index: int) -> StreamState:
        """Entry `index` of a checkpoint's list of rank states (either format)."""
        found = tree.get("format") if isinstance(tree, dict) else type(tree).__name__
        if found not in (STATE_FORMAT, RANK_STREAMS_FORMAT):
            raise ResumeError(
                f"resume: entry {index} is not a {STATE_FORMAT} stream state (format {found!r})"
            )
        if found == RANK_STREAMS_FORMAT:
            tree = {**tree, "grad_accum": 1, "micro_batch": tree.get("batch_size")}
        try:
            scalars = {name: kind(tree[name]) for name, kind in _SCALARS.items()}
            workers = tuple(WorkerState.from_json(worker) for worker in tree["workers"])
            state = cls(**scalars, workers=workers, carried=DataProblems.from_json(tree["carried"]))
        except (KeyError, TypeError, ValueError) as err:
            raise ResumeError(f"resume: entry {index} is not a complete stream state ({err!r})") from None
        slots = state.grad_accum * state.num_workers
        if len(workers) != slots or tree.get("streams", state.streams) != state.streams:
            raise ResumeError(
                f"resume: entry {index} has {len(workers)} slots and streams={tree.get('streams')}, not"
                f" grad_accum x num_workers = {slots} and world_size x grad_accum = {state.streams}"
            )
        return state


_SCALARS = {
    "mode": str,
    "seed": int,
    "shards": str,
    "total_samples": int,
    "rank": int,
    "world_size": int,
    "grad_accum": int,
    "micro_batch": int,
    "num_workers": int,
    "batches": int,
    "next_slot": int,
}
