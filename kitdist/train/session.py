"""How the per-worker loop talks to whatever launched it: report metrics, hand over checkpoints, find
the checkpoint to resume from. `RaySession` runs under Ray Train (`kitdist.launch`); `StorageSession` under
torchrun (or any launcher that sets RANK / WORLD_SIZE) and writes checkpoints straight to the run's storage.

Both resume from `kitdist.checkpoints.resume_from` (the newest complete checkpoint in the run folder), and
both upload a rank's RNG file after the rest of its part of a checkpoint: its presence marks the part
complete. A test (and only a test) can make a rank die right after a checkpoint's report returns:
FAULT_ENV below.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol

import torch.distributed as dist

from kitdist import storage
from kitdist.checkpoints import LATEST, RNG_DIR, checkpoint_in_run, checkpoint_names, resume_from, rng_file

# "RANK:STEP": that rank kills itself (SIGKILL) right after its report of the checkpoint of STEP returns,
# the first time only (a marker file in the run folder says it happened). Read only by tests: it makes
# "a worker died in the moment after a checkpoint was written" happen on purpose.
FAULT_ENV = "KITDIST_TEST_EXIT_AFTER_REPORT"
FAULT_DONE = "fault-injected"


class Session(Protocol):
    """The launcher-facing side of a training worker."""

    rank: int
    world_size: int

    def latest_checkpoint(self) -> contextlib.AbstractContextManager[Path | None]:
        """A local folder holding the checkpoint to resume from (None when there is none)."""
        ...

    def report(self, metrics: dict[str, Any], checkpoint: Path | None, name: str | None) -> None:
        """Collective: every rank calls it at the same steps; `checkpoint` is this rank's local folder."""
        ...


@contextlib.contextmanager
def local_folder(url: str | None) -> Iterator[Path | None]:
    """A checkpoint at any storage URL as a local folder (local ones as they are, others downloaded)."""
    if url is None:
        yield None
        return
    if storage.is_local(url):
        yield Path(storage.absolute(url))
        return
    local = Path(tempfile.mkdtemp(prefix="kitdist-restore-"))
    try:
        fs, path = storage.url_to_fs(url)
        fs.get(path.rstrip("/") + "/", str(local) + "/", recursive=True)
        yield local
    finally:
        shutil.rmtree(local, ignore_errors=True)


def upload_rng_file(checkpoint: Path, target: str, rank: int) -> None:
    """Uploads this rank's RNG file from its local checkpoint folder, the last of its part."""
    local = Path(rng_file(str(checkpoint), rank))
    if local.is_file():
        storage.put_file(str(local), rng_file(target, rank))


def die_if_asked(run: str, rank: int, step_name: str) -> None:
    """FAULT_ENV: kills this process when it names this rank and checkpoint, once per run folder."""
    wanted = os.environ.get(FAULT_ENV, "")
    if not wanted:
        return
    fault_rank, fault_step = (int(part) for part in wanted.split(":"))
    marker = storage.join(run, FAULT_DONE)
    if (rank, f"step-{fault_step:08d}") != (fault_rank, step_name) or storage.exists(marker):
        return
    storage.write_text(marker, f"rank {rank} killed itself after reporting {step_name}\n")
    os.kill(os.getpid(), signal.SIGKILL)


class RaySession:
    """The Session of a Ray Train worker: checkpoints go through `ray.train.report` (Ray Train uploads
    them to `run` and tracks them); this rank's RNG file follows once the report returns."""

    def __init__(self, run: str) -> None:
        import ray.train

        context = ray.train.get_context()
        self.run = run
        self.rank = context.get_world_rank()
        self.world_size = context.get_world_size()

    @contextlib.contextmanager
    def latest_checkpoint(self) -> Iterator[Path | None]:
        import ray.train

        registered = ray.train.get_checkpoint()
        registered_url = None if registered is None else checkpoint_in_run(self.run, registered.path)
        with local_folder(resume_from(self.run, registered_url)) as folder:
            yield folder

    def report(self, metrics: dict[str, Any], checkpoint: Path | None, name: str | None) -> None:
        import ray.train

        plain = {key: value for key, value in metrics.items() if isinstance(value, (int, float, str))}
        if checkpoint is None or name is None:
            ray.train.report(plain)
            return
        held_back = Path(tempfile.mkdtemp(prefix="kitdist-rng-"))
        try:
            if (checkpoint / RNG_DIR).is_dir():  # Ray uploads a folder's files in any order
                shutil.move(str(checkpoint / RNG_DIR), str(held_back / RNG_DIR))
            reported = ray.train.Checkpoint.from_directory(str(checkpoint))
            ray.train.report(plain, checkpoint=reported, checkpoint_dir_name=name)
            upload_rng_file(held_back, storage.join(self.run, name), self.rank)
        finally:
            shutil.rmtree(held_back, ignore_errors=True)
        die_if_asked(self.run, self.rank, name)


class StorageSession:
    """Checkpoints written directly to `<run_url>/<name>/` by every rank; after a barrier, rank 0 moves
    the `latest` pointer and removes checkpoints beyond the newest `keep`."""

    def __init__(self, run_url: str, keep: int) -> None:
        self.run_url = run_url
        self.keep = keep
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        self.world_size = dist.get_world_size() if dist.is_initialized() else 1

    @contextlib.contextmanager
    def latest_checkpoint(self) -> Iterator[Path | None]:
        pointer = storage.join(self.run_url, LATEST)
        pointed = storage.read_text(pointer).strip() if storage.exists(pointer) else None
        registered = storage.join(self.run_url, pointed) if pointed else None
        with local_folder(resume_from(self.run_url, registered)) as folder:
            yield folder

    def report(self, metrics: dict[str, Any], checkpoint: Path | None, name: str | None) -> None:
        if checkpoint is None or name is None:
            return
        target = storage.join(self.run_url, name)
        for path in sorted(checkpoint.rglob("*")):
            if path.is_file() and path.parent.name != RNG_DIR:
                storage.put_file(str(path), storage.join(target, str(path.relative_to(checkpoint))))
        upload_rng_file(checkpoint, target, self.rank)
        if dist.is_initialized():
            dist.barrier()  # every rank's files are in place before the pointer moves
        if self.rank == 0:
            storage.write_text(storage.join(self.run_url, LATEST), name)
            self._prune()
        die_if_asked(self.run_url, self.rank, name)

    def _prune(self) -> None:
        names = checkpoint_names(self.run_url)
        for name in names[: max(0, len(names) - self.keep)]:
            storage.remove(storage.join(self.run_url, name), recursive=True)
