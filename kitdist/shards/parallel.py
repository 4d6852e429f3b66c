"""Worker processes for shard builds: ordered map, and a bounded pipeline that never runs far ahead.

Processes are spawned, not forked, so a build started from a process that already runs threads (Ray,
torch, an s3fs event loop) cannot deadlock in a child. One worker runs everything in-process.
"""

from __future__ import annotations

import multiprocessing
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from typing import Any


class WorkerPool:
    def __init__(self, workers: int) -> None:
        self.workers = workers
        self._pool: Any = None

    def __enter__(self) -> WorkerPool:
        if self.workers > 1:
            self._pool = multiprocessing.get_context("spawn").Pool(self.workers)
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self._pool is not None:
            self._pool.terminate()
            self._pool.join()

    def map(self, fn: Callable, jobs: list) -> Iterator:
        """Results in job order; small jobs travel in chunks."""
        if self._pool is None:
            return map(fn, jobs)
        chunksize = max(1, min(256, len(jobs) // (8 * self.workers)))
        return self._pool.imap(fn, jobs, chunksize=chunksize)

    def bounded(self, fn: Callable, jobs: Iterable, ahead: int) -> Iterator:
        """Results in job order, with at most `ahead` jobs submitted but not yet consumed.

        The bound keeps finished-but-unconsumed work (local temp shards waiting for upload) small.
        """
        if self._pool is None:
            yield from map(fn, jobs)
            return
        pending: deque = deque()
        for job in jobs:
            pending.append(self._pool.apply_async(fn, (job,)))
            if len(pending) >= ahead:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()
