"""The training stream's position, typed: what a checkpoint stores per rank so the stream resumes exactly.

    StreamState     one rank: which run it belongs to (seed, shard set, mode), its layout, its counts
      .workers      one WorkerState per logical DataLoader worker (slot): its Segments and where it stands
      .carried      DataProblems taken over from before an elastic resume
    Segment         the positions of one epoch a worker reads, and the epoch's positions nobody reads
    DataProblems    samples passed over per shard and shards cut short; adds itself to another

Every type is frozen: a worker makes a new state for each batch it yields, and the trainer's process keeps
the one that came with the last batch it handed on. `to_json` gives plain dicts and lists (the checkpoint
stores them as JSON); `from_json` reads them back and raises `ResumeError` naming what does not fit.

JSON format "kitdist-stream/1" (unchanged from the untyped dicts that came before, so old checkpoints
resume): {"format", "mode", "seed", "shards" (digest of names and sizes), "total_samples", "rank",
"world_size", "num_workers", "batch_size", "batches", "next_slot", "workers": [{"slot", "segments":
[{"epoch", "intervals", "unassigned"}], "pointer", "segment_batches", "problems", "damaged"}], "carried":
{"problems", "damaged"}}.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

STATE_FORMAT = "kitdist-stream/1"

Intervals = list[list[int]]  # sorted, half-open [start, end) position ranges; never changed in place


class ResumeError(ValueError):
    """A saved stream state that does not fit this run; the message names the mismatch."""


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
    num_workers: int  # logical workers: max(1, data.num_workers)
    batch_size: int
    batches: int  # batches this rank yielded since the run began
    next_slot: int  # the worker whose batch comes next
    workers: tuple[WorkerState, ...]
    carried: DataProblems = field(default_factory=DataProblems)
    format: str = STATE_FORMAT

    @property
    def layout(self) -> tuple[int, int, int]:
        """What must stay equal for an exact resume: (world size, workers, batch size)."""
        return self.world_size, self.num_workers, self.batch_size

    @property
    def problems(self) -> DataProblems:
        return DataProblems.total([self.carried, *(worker.problems for worker in self.workers)])

    def to_json(self) -> dict[str, Any]:
        return {
            "format": self.format,
            **{name: getattr(self, name) for name in _SCALARS},
            "workers": [worker.to_json() for worker in self.workers],
            "carried": self.carried.to_json(),
        }

    @classmethod
    def from_json(cls, tree: Any, index: int) -> StreamState:
        """Entry `index` of a checkpoint's list of rank states."""
        if not isinstance(tree, dict) or tree.get("format") != STATE_FORMAT:
            found = tree.get("format") if isinstance(tree, dict) else type(tree).__name__
            raise ResumeError(
                f"resume: entry {index} is not a {STATE_FORMAT} stream state (format {found!r})"
            )
        try:
            scalars = {name: kind(tree[name]) for name, kind in _SCALARS.items()}
            workers = tuple(WorkerState.from_json(worker) for worker in tree["workers"])
            return cls(**scalars, workers=workers, carried=DataProblems.from_json(tree["carried"]))
        except (KeyError, TypeError, ValueError) as err:
            raise ResumeError(f"resume: entry {index} is not a complete stream state ({err!r})") from None


_SCALARS = {
    "mode": str,
    "seed": int,
    "shards": str,
    "total_samples": int,
    "rank": int,
    "world_size": int,
    "num_workers": int,
    "batch_size": int,
    "batches": int,
    "next_slot": int,
}
