"""`TrainStream`: the training micro-batches of one rank, resumable exactly and elastically.

    stream = TrainStream(cfg, rank, world_size, resume=None, device="cuda", micro_batch=None, grad_accum=None)
    for batch in stream:          # endless; batch["input"], batch["target"]: float32 [b, 3, H, W] on device
        ...                       # stream.grad_accum consecutive micro-batches make this rank's step
    stream.state_dict()           # this rank's position after the last batch yielded (JSON, small)

Micro-batch streams. A step reads global batch / micro-batch micro-batches, one from each micro-batch
stream; rank r with accumulation a reads streams r*a .. r*a+a-1 in that order (kitdist.data.stream_state).
Which samples a step reads therefore depends on the global batch and the micro-batch only: 2 ranks x
accumulation 1 and 1 rank x accumulation 2 read the same micro-batches in every step.

The DataLoader workers send uint8 crops and each sample's noise sigma and seed; the stream adds the noise
on `device` (`kitdist.data.batch`), so an accelerator takes that work off the data workers.
`stream.wire_batches()` yields what the workers sent, unfinished.

A checkpoint stores `[state_dict() of every rank]`; `TrainStream(cfg, rank, world, resume=that_list)`
continues. With the same streams (global batch and micro-batch) and `data.num_workers` it continues with
exactly the micro-batches the uninterrupted run would have read in each step, on any world size (when the
old ranks stood at the same step, as a checkpoint's do); otherwise the unread positions of the current
epoch(s) are split again over the new streams and workers (see `kitdist.data.order`). The state's types
and JSON format are in `kitdist.data.stream_state`.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from kitdist import storage
from kitdist.batching import plan_run
from kitdist.config import ConfigError, RunConfig
from kitdist.data import order
from kitdist.data.batch import finish
from kitdist.data.shardio import ShardSet
from kitdist.data.stream_state import DataProblems, ResumeError, StreamState, WorkerState, stream_of
from kitdist.data.worker import EpochWorker, ResampledWorker, StreamSpec, fresh_worker_state
from kitdist.shards.manifest import Manifest, read_manifest_of_kind, shard_urls

__all__ = ["ResumeError", "TrainStream", "batch_layout", "open_shard_set", "shard_set"]


def open_shard_set(url: str, kind: str, key: str) -> ShardSet:
    """The shard set at `url`, checked against the run's data kind."""
    return shard_set(url, read_manifest_of_kind(url, kind, key))


def shard_set(url: str, manifest: Manifest) -> ShardSet:
    """What the readers need of the shard set at `url`, from its manifest (already read)."""
    return ShardSet(
        tuple(shard_urls(url, manifest)),
        tuple(shard.name for shard in manifest.shards),
        tuple(shard.samples for shard in manifest.shards),
        tuple(shard.bytes for shard in manifest.shards),
    )


def batch_layout(
    cfg: RunConfig, world_size: int, micro_batch: int | None = None, grad_accum: int | None = None
) -> tuple[int, int]:
    """(micro-batch, accumulation) of every rank: those given, the other one derived from
    data.global_batch_size; when neither is given, as `kitdist.batching` decides them for the config."""
    total = cfg.data.global_batch_size
    if micro_batch is None and grad_accum is None:
        plan = plan_run(cfg, world_size)[0]
        micro_batch, grad_accum = plan.micro_batch, plan.grad_accum
    elif grad_accum is None:
        grad_accum = total // (world_size * micro_batch)
    elif micro_batch is None:
        micro_batch = total // (world_size * grad_accum)
    if min(micro_batch, grad_accum) < 1 or world_size * grad_accum * micro_batch != total:
        raise ConfigError(
            f"data.global_batch_size: {total} is not {world_size} ranks x accumulation {grad_accum} x"
            f" micro-batch {micro_batch} (train.grad_accum_steps={cfg.train.grad_accum_steps})",
            key="data.global_batch_size",
        )
    return micro_batch, grad_accum


class _Workers(IterableDataset):
    """The DataLoader's dataset. Torch worker i serves the rank's slots (i + rotation) % slots,
    (i + rotation + num_workers) % slots, ... in turn, so the DataLoader's round-robin over its workers
    yields slots rotation, rotation + 1, ... in order; a resumed DataLoader, which always starts its
    round-robin at worker 0, so continues with the right slot."""

    def __init__(self, spec: StreamSpec, states: list[WorkerState], rotation: int, batches: int) -> None:
        self.spec, self.states, self.rotation, self.batches = spec, states, rotation, batches

    def __iter__(self) -> Iterator[tuple[dict[str, Any], WorkerState]]:
        info = get_worker_info()
        first = (info.id if info is not None else 0) + self.rotation
        slots = [
            (first + turn * self.spec.num_workers) % self.spec.slots for turn in range(self.spec.grad_accum)
        ]
        return _in_turn([self._slot_batches(slot) for slot in slots])

    def _slot_batches(self, slot: int) -> Iterator[tuple[dict[str, Any], WorkerState]]:
        if self.spec.cfg.data.mode == "resampled":
            return ResampledWorker(
                self.spec, self.states[slot], self.batches // self.spec.grad_accum
            ).batches()
        return EpochWorker(self.spec, self.states[slot]).batches()


def _in_turn(sources: list[Iterator[Any]]) -> Iterator[Any]:
    """One item from each endless source in turn, forever."""
    while True:
        for source in sources:
            yield next(source)


class TrainStream:
    """Endless training micro-batches for `rank` of `world_size`; see the module docstring."""

    def __init__(
        self,
        cfg: RunConfig,
        rank: int,
        world_size: int,
        resume: list[dict] | None = None,
        device: torch.device | str = "cpu",
        *,
        micro_batch: int | None = None,
        grad_accum: int | None = None,
    ) -> None:
        self.device = torch.device(device)
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, {world_size})")
        shards = open_shard_set(cfg.data.train_shards, cfg.data.kind, "data.train_shards")
        batch, accum = batch_layout(cfg, world_size, micro_batch, grad_accum)
        self.spec = StreamSpec(cfg, shards, rank, world_size, accum, batch, max(1, cfg.data.num_workers))
        self.digest = hashlib.sha256(
            "\n".join(f"{n}:{s}" for n, s in zip(shards.names, shards.samples, strict=True)).encode()
        ).hexdigest()[:16]
        check_size(self.spec)
        self._batches = 0
        self._next_slot = 0
        self._carried = DataProblems()
        self._workers = [fresh_worker_state(self.spec, slot) for slot in range(self.spec.slots)]
        if resume is not None:
            self._resume(resume)

    @property
    def micro_batch(self) -> int:
        return self.spec.micro_batch

    @property
    def grad_accum(self) -> int:
        """Micro-batches per optimiser step on this rank: one from each of its streams, in order."""
        return self.spec.grad_accum

    # --- iteration -----------------------------------------------------------------------------------

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for batch in self.wire_batches():
            yield finish(batch, self.device)

    def wire_batches(self) -> Iterator[dict[str, Any]]:
        """The batches as the workers send them (uint8 pixels, noise not yet drawn); the position advances
        as with iteration."""
        dataset = _Workers(self.spec, self._workers, self._next_slot, self._batches)
        workers = self.spec.cfg.data.num_workers
        loader = DataLoader(
            dataset,
            batch_size=None,
            num_workers=workers,
            prefetch_factor=2 if workers else None,
            pin_memory=self.device.type == "cuda",  # page-locked batches: asynchronous copies to the GPU
            # Created once per run and iterated endlessly: its workers live as long as the run.
            # A private generator: a DataLoader iterator otherwise draws its base seed from the global
            # RNG, which the model's LSH rotations also use; a resumed run (which creates its iterator
            # after restoring the RNG) would then draw other rotations than the uninterrupted run.
            generator=torch.Generator().manual_seed(self.spec.cfg.train.seed),
            **(storage.forked_loader_options() if workers else {}),
        )
        for batch, state in loader:
            self._workers[state.slot] = state
            self._batches += 1
            self._next_slot = (state.slot + 1) % self.spec.slots
            yield batch

    # --- state ---------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """This rank's position after the last batch yielded: JSON-serialisable and small."""
        return self.state().to_json()

    def state(self) -> StreamState:
        """This rank's position after the last batch yielded."""
        return StreamState(
            mode=self.spec.cfg.data.mode,
            seed=self.spec.cfg.train.seed,
            shards=self.digest,
            total_samples=self.spec.total,
            rank=self.spec.rank,
            world_size=self.spec.world_size,
            grad_accum=self.spec.grad_accum,
            micro_batch=self.spec.micro_batch,
            num_workers=self.spec.num_workers,
            batches=self._batches,
            next_slot=self._next_slot,
            workers=tuple(self._workers),
            carried=self._carried,
        )

    @property
    def epoch(self) -> int:
        """The epoch of the next batch (the earliest epoch any worker of this rank is in)."""
        return min(worker.segment.epoch for worker in self._workers)

    def problems(self) -> dict[str, dict[str, int]]:
        """Per shard name, the samples passed over on this rank ({"corrupt": n, "missing": n}), including
        those carried from before an elastic resume (which rank 0 carries)."""
        return self.state().problems.counts

    def damaged(self) -> dict[str, str]:
        """Shard name -> why it was cut short (truncated, unreadable after retries: the URL is named)."""
        return self.state().problems.damaged

    def _resume(self, saved: list[dict]) -> None:
        """Exactly where this rank stood with the same ranks and streams; each stream where it stood with
        the same streams on other ranks; otherwise the unread positions split again (`order.replan`)."""
        if not isinstance(saved, list) or not saved:
            raise ResumeError("resume: expected the list of every rank's state_dict()")
        states = [StreamState.from_json(tree, index) for index, tree in enumerate(saved)]
        check_states(states, self)
        spec = self.spec
        same_streams = states[0].layout == (spec.streams, spec.num_workers, spec.micro_batch)
        if same_streams and states[0].world_size == spec.world_size:
            self._continue_rank(states[spec.rank])
            return
        steps = common_step(states)
        old_steps = steps if steps is not None else states[0].batches // states[0].grad_accum
        self._batches = old_steps * spec.grad_accum
        if spec.cfg.data.mode == "resampled":
            self._carried = self._carried_over(states)
        elif same_streams and steps is not None:
            self._continue_streams(states, steps)
        else:
            self._replan(states)

    def _continue_rank(self, mine: StreamState) -> None:
        self._batches = mine.batches
        if self.spec.cfg.data.mode == "resampled":  # nothing to continue but the counts
            self._carried = mine.problems
        else:
            self._next_slot, self._workers, self._carried = mine.next_slot, list(mine.workers), mine.carried

    def _continue_streams(self, states: list[StreamState], steps: int) -> None:
        """This rank's streams, each as its old owner left it (its counts travel with it)."""
        self._workers = [_moved(states, self.spec, slot) for slot in range(self.spec.slots)]
        self._next_slot = steps % self.spec.num_workers * self.spec.grad_accum
        if self.spec.rank == 0:
            self._carried = DataProblems.total(state.carried for state in states)

    def _replan(self, states: list[StreamState]) -> None:
        spec = self.spec
        segments = order.replan(states, spec.streams, spec.num_workers, spec.micro_batch)
        self._workers = [
            WorkerState(slot, tuple(segments[stream][part]))
            for slot, (stream, part) in enumerate(map(self._stream_of, range(spec.slots)))
        ]
        self._carried = self._carried_over(states)

    def _stream_of(self, slot: int) -> tuple[int, int]:
        return stream_of(self.spec.rank, self.spec.grad_accum, slot)

    def _carried_over(self, states: list[StreamState]) -> DataProblems:
        """After an elastic resume rank 0 carries every old count, so that summing ranks counts each once."""
        return (
            DataProblems.total(state.problems for state in states) if self.spec.rank == 0 else DataProblems()
        )


def check_size(spec: StreamSpec) -> None:
    """Every part of every stream needs a micro-batch per epoch (the DataLoader takes from each in turn)."""
    if spec.cfg.data.mode == "epoch" and spec.per_stream < spec.num_workers:
        raise ConfigError(
            f"data.train_shards: {spec.total} samples give {spec.per_stream} micro-batches of"
            f" {spec.micro_batch} per stream for {spec.streams} streams ({spec.world_size} ranks x accumulation"
            f" {spec.grad_accum}), fewer than data.num_workers={spec.num_workers}: every worker needs a batch"
            " per epoch",
            key="data.train_shards",
        )


def common_step(states: list[StreamState]) -> int | None:
    """The optimiser step every old rank stands at, or None when they stand at different ones or mid-step."""
    steps = {divmod(state.batches, state.grad_accum) for state in states}
    return steps.pop()[0] if len(steps) == 1 and not next(iter(steps))[1] else None


def _moved(states: list[StreamState], spec: StreamSpec, slot: int) -> WorkerState:
    """The old state of the (stream, part) that `slot` of this rank now reads."""
    stream, part = stream_of(spec.rank, spec.grad_accum, slot)
    old = states[stream // states[0].grad_accum]
    old_slot = part * old.grad_accum + stream % old.grad_accum
    return dataclasses.replace(old.workers[old_slot], slot=slot)


def check_states(states: list[StreamState], stream: TrainStream) -> None:
    """Fails with the field named when a saved state belongs to another shard set, seed or mode."""
    expected = {
        "mode": stream.spec.cfg.data.mode,
        "seed": stream.spec.cfg.train.seed,
        "shards": stream.digest,
        "total_samples": stream.spec.total,
    }
    for index, state in enumerate(states):
        for name, value in expected.items():
            if getattr(state, name) != value:
                raise ResumeError(
                    f"resume: rank {index}'s state has {name}={getattr(state, name)!r}, this run has {value!r}"
                    " (a data position only resumes on the same shard set, seed and data.mode)"
                )
        if (state.rank, state.world_size, state.layout) != (index, len(states), states[0].layout):
            raise ResumeError(f"resume: entry {index} is not rank {index}'s complete state")
