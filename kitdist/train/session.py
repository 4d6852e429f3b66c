"""How the per-worker loop talks to whatever launched it: report metrics, hand over checkpoints, find
the latest checkpoint. Ray Train's adapter lives in `kitdist.launch`; the one here runs under torchrun
(or any launcher that sets RANK / WORLD_SIZE) and writes checkpoints straight to the run's storage."""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol

import torch.distributed as dist

from kitdist import storage
from kitdist.checkpoints import LATEST, checkpoint_names


class Session(Protocol):
    """The launcher-facing side of a training worker."""

    rank: int
    world_size: int

    def latest_checkpoint(self) -> contextlib.AbstractContextManager[Path | None]:
        """A local folder holding the latest complete checkpoint (None when there is none)."""
        ...

    def report(self, metrics: dict[str, Any], checkpoint: Path | None, name: str | None) -> None:
        """Collective: every rank calls it at the same steps; `checkpoint` is this rank's local folder."""
        ...


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
        if not storage.exists(pointer):
            yield None
            return
        name = storage.read_text(pointer).strip()
        local = Path(tempfile.mkdtemp(prefix="kitdist-restore-"))
        try:
            fs, path = storage.url_to_fs(storage.join(self.run_url, name))
            fs.get(path + "/", str(local) + "/", recursive=True)
            yield local
        finally:
            shutil.rmtree(local, ignore_errors=True)

    def report(self, metrics: dict[str, Any], checkpoint: Path | None, name: str | None) -> None:
        if checkpoint is None or name is None:
            return
        target = storage.join(self.run_url, name)
        for path in sorted(checkpoint.rglob("*")):
            if path.is_file():
                storage.put_file(str(path), storage.join(target, str(path.relative_to(checkpoint))))
        if dist.is_initialized():
            dist.barrier()  # every rank's files are in place before the pointer moves
        if self.rank == 0:
            storage.write_text(storage.join(self.run_url, LATEST), name)
            self._prune()

    def _prune(self) -> None:
        names = checkpoint_names(self.run_url)
        for name in names[: max(0, len(names) - self.keep)]:
            storage.remove(storage.join(self.run_url, name), recursive=True)
