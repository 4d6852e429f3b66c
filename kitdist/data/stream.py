"""`TrainStream`: the training batches of one rank, resumable exactly and elastically.

    stream = TrainStream(cfg, rank, world_size, resume=None, device="cuda")
    for batch in stream:          # endless; batch["input"], batch["target"]: float32 [b, 3, H, W] on device
        ...
    stream.state_dict()           # this rank's position after the last batch yielded (JSON, small)

The DataLoader workers send uint8 crops and each sample's noise sigma and seed; the stream adds the noise
on `device` (`kitdist.data.batch`), so an accelerator takes that work off the data workers.
`stream.wire_batches()` yields what the workers sent, unfinished.

A checkpoint stores `[state_dict() of every rank]`; `TrainStream(cfg, rank, world, resume=that_list)`
continues. With the same world size, `data.num_workers` and batch size it continues with exactly the batches
the uninterrupted run would have yielded; otherwise the unread positions of the current epoch(s) are split
again over the new ranks and workers (see `kitdist.data.order`). The state's types and JSON format are in
`kitdist.data.stream_state`.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from kitdist import storage
from kitdist.config import ConfigError, RunConfig
from kitdist.data import order
from kitdist.data.batch import finish
from kitdist.data.shardio import ShardSet
from kitdist.data.stream_state import DataProblems, ResumeError, StreamState, WorkerState
from kitdist.data.worker import EpochWorker, ResampledWorker, StreamSpec, fresh_worker_state
from kitdist.shards.manifest import read_manifest, shard_urls

__all__ = ["ResumeError", "TrainStream", "micro_batch_size", "open_shard_set"]


def open_shard_set(url: str, kind: str, key: str) -> ShardSet:
    """The shard set at `url`, checked against the run's data kind."""
    if not url:
        raise ConfigError(f"{key}: no shard set given (a folder or manifest.json URL)", key=key)
    manifest = read_manifest(url)
    if manifest.kind != kind:
        raise ConfigError(
            f"{key}: {url} holds {manifest.kind} samples but data.kind is {kind}", key="data.kind"
        )
    return ShardSet(
        tuple(shard_urls(url, manifest)),
        tuple(shard.name for shard in manifest.shards),
        tuple(shard.samples for shard in manifest.shards),
        tuple(shard.bytes for shard in manifest.shards),
    )


def micro_batch_size(cfg: RunConfig, world_size: int) -> int:
    per_step = world_size * cfg.train.grad_accum_steps
    if cfg.data.global_batch_size % per_step:
        raise ConfigError(
            f"data.global_batch_size: {cfg.data.global_batch_size} does not split over {world_size} ranks x"
            f" train.grad_accum_steps={cfg.train.grad_accum_steps}",
            key="data.global_batch_size",
        )
    return cfg.data.global_batch_size // per_step


class _Workers(IterableDataset):
    """The DataLoader's dataset: torch worker i plays logical slot (i + rotation) % num_workers, so a
    resumed DataLoader, which always starts its round-robin at worker 0, continues with the right slot."""

    def __init__(self, spec: StreamSpec, states: list[WorkerState], rotation: int, batches: int) -> None:
        self.spec, self.states, self.rotation, self.batches = spec, states, rotation, batches

    def __iter__(self) -> Iterator[tuple[dict[str, Any], WorkerState]]:
        info = get_worker_info()
        slot = ((info.id if info is not None else 0) + self.rotation) % self.spec.num_workers
        if self.spec.cfg.data.mode == "resampled":
            return ResampledWorker(self.spec, self.states[slot], self.batches).batches()
        return EpochWorker(self.spec, self.states[slot]).batches()


class TrainStream:
    """Endless training batches for `rank` of `world_size`; see the module docstring."""

    def __init__(
        self,
        cfg: RunConfig,
        rank: int,
        world_size: int,
        resume: list[dict] | None = None,
        device: torch.device | str = "cpu",
    ) -> None:
        self.device = torch.device(device)
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, {world_size})")
        shards = open_shard_set(cfg.data.train_shards, cfg.data.kind, "data.train_shards")
        batch = micro_batch_size(cfg, world_size)
        slots = max(1, cfg.data.num_workers)
        self.spec = StreamSpec(cfg, shards, rank, world_size, slots, batch)
        self.digest = hashlib.sha256(
            "\n".join(f"{n}:{s}" for n, s in zip(shards.names, shards.samples, strict=True)).encode()
        ).hexdigest()[:16]
        per_rank = self.spec.total // (world_size * batch)
        if cfg.data.mode == "epoch" and per_rank < slots:
            raise ConfigError(
                f"data.train_shards: {self.spec.total} samples give {per_rank} batches of {batch} per rank for"
                f" {world_size} ranks, fewer than data.num_workers={slots}: every worker needs a batch per epoch",
                key="data.train_shards",
            )
        self._batches = 0
        self._next_slot = 0
        self._carried = DataProblems()
        self._workers = [fresh_worker_state(self.spec, slot) for slot in range(slots)]
        if resume is not None:
            self._resume(resume)

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
            self._next_slot = (state.slot + 1) % self.spec.num_workers
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
            num_workers=self.spec.num_workers,
            batch_size=self.spec.batch_size,
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
        if not isinstance(saved, list) or not saved:
            raise ResumeError("resume: expected the list of every rank's state_dict()")
        states = [StreamState.from_json(tree, index) for index, tree in enumerate(saved)]
        check_states(states, self)
        mine = states[self.spec.rank] if self.spec.rank < len(states) else None
        old = states[0]
        same_layout = old.layout == (self.spec.world_size, self.spec.num_workers, self.spec.batch_size)
        if self.spec.cfg.data.mode == "resampled":
            self._batches = mine.batches if mine is not None else old.batches
            self._carried = mine.problems if same_layout and mine is not None else self._carried_over(states)
        elif same_layout and mine is not None:
            self._batches, self._next_slot = mine.batches, mine.next_slot
            self._workers, self._carried = list(mine.workers), mine.carried
        else:
            segments = order.replan(states, self.spec.world_size, self.spec.num_workers, self.spec.batch_size)
            self._workers = [
                WorkerState(slot, tuple(segments[self.spec.rank][slot]))
                for slot in range(self.spec.num_workers)
            ]
            self._batches = old.batches
            self._carried = self._carried_over(states)

    def _carried_over(self, states: list[StreamState]) -> DataProblems:
        """After an elastic resume rank 0 carries every old count, so that summing ranks counts each once."""
        return (
            DataProblems.total(state.problems for state in states) if self.spec.rank == 0 else DataProblems()
        )


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
        if state.rank != index or len(state.workers) != state.num_workers:
            raise ResumeError(f"resume: entry {index} is not rank {index}'s complete state")
