"""Reading shards: a byte stream that survives dropped connections, tar members grouped into samples,
the per-shard window shuffle, and a cursor that serves samples by (epoch, shard, offset).

Problems are counted per shard, never fatal: a corrupt sample, a truncated tar (its readable samples are
served, then the shard counts as damaged) and a shard that cannot be read after retries (named by URL).
"""

from __future__ import annotations

import io
import logging
import tarfile
import threading
import time
from collections.abc import Iterator
from typing import Any

import numpy as np

from kitdist import storage

log = logging.getLogger("kitdist.data")

Sample = dict[str, Any]  # "__key__" plus one bytes value per extension ("clean.png", "json", ...)


class ShardUnavailable(OSError):
    """A shard that could not be read after all retries; the message names its URL."""


class RetryingReader(io.RawIOBase):
    """Reads a URL front to back; on a network error it reopens at the same offset, with backoff. `head`,
    the URL's first bytes if already fetched, is served from memory before the network is asked."""

    def __init__(self, url: str, retries: int = 8, max_wait_s: float = 10.0, head: bytes = b"") -> None:
        super().__init__()
        self.url = url
        self.retries = retries
        self.max_wait_s = max_wait_s
        self.offset = 0
        self.head = memoryview(head)
        self._file: Any = None

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        if self.offset < len(self.head):
            data = self.head[self.offset : self.offset + len(buffer)]
            buffer[: len(data)] = data
            self.offset += len(data)
            return len(data)
        for attempt in range(self.retries + 1):
            try:
                if self._file is None:
                    self._file = storage.open_read(self.url)
                    if self.offset:
                        self._file.seek(self.offset)
                data = self._file.read(len(buffer))
                buffer[: len(data)] = data
                self.offset += len(data)
                return len(data)
            except Exception as err:  # network errors come as OSError, botocore or aiohttp types
                self._drop()
                if attempt == self.retries:
                    raise ShardUnavailable(
                        f"{self.url}: unreadable after {self.retries} retries: {err}"
                    ) from err
                wait = min(self.max_wait_s, 0.5 * 2**attempt)
                log.warning("reading %s failed (%s); retry %d in %.1fs", self.url, err, attempt + 1, wait)
                time.sleep(wait)
        raise AssertionError("unreachable")

    def _drop(self) -> None:
        if self._file is not None:
            try:
                self._file.close()
            except Exception:
                pass
        self._file = None

    def close(self) -> None:
        self._drop()
        super().close()


class HeadPrefetch:
    """Fetches the first bytes of the shard a worker will open next, in a background thread, so that on
    object stores the request latency and transfer overlap the decoding of the current shard. One attempt
    only: a failed prefetch leaves the reading (and its retries) to `RetryingReader`."""

    def __init__(self, limit_bytes: int) -> None:
        self.limit_bytes = limit_bytes
        self._url: str | None = None
        self._thread: threading.Thread | None = None
        self._fetched: dict[str, bytes] = {}

    def start(self, url: str) -> None:
        if url == self._url or self.limit_bytes <= 0:
            return
        fetched: dict[str, bytes] = {}

        def fetch() -> None:
            try:
                with storage.open_read(url) as handle:
                    fetched["head"] = handle.read(self.limit_bytes)
            except Exception as err:  # the real read retries and reports
                log.debug("prefetching %s failed: %s", url, err)

        self._url, self._fetched = url, fetched
        self._thread = threading.Thread(target=fetch, name="kitdist-prefetch", daemon=True)
        self._thread.start()

    def take(self, url: str) -> bytes:
        """The prefetched head of `url` (waiting for it), or b"" when another URL was prefetched."""
        if url != self._url or self._thread is None:
            return b""
        self._thread.join()
        head = self._fetched.get("head", b"")
        self._url, self._thread, self._fetched = None, None, {}
        return head


def split_name(name: str) -> tuple[str, str]:
    """WebDataset naming: `dir/key.ext.more` -> ("dir/key", "ext.more")."""
    folder, _, base = name.rpartition("/")
    stem, _, ext = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), ext


def tar_samples(stream: io.RawIOBase, on_damage: Any) -> Iterator[Sample]:
    """Groups consecutive tar members by key. A damaged tar ends the stream after its last whole sample
    and calls on_damage(reason, unreadable)."""
    current: Sample | None = None
    try:
        with tarfile.open(fileobj=io.BufferedReader(stream, 1 << 20), mode="r|") as archive:
            for member in archive:
                if not member.isfile():
                    continue
                key, ext = split_name(member.name)
                handle = archive.extractfile(member)
                data = handle.read() if handle is not None else b""
                if current is not None and current["__key__"] != key:
                    yield current
                    current = None
                current = current or {"__key__": key}
                current[ext] = data
        if current is not None:
            yield current
    except ShardUnavailable as err:
        on_damage(str(err), True)
    except (tarfile.TarError, EOFError, OSError) as err:
        on_damage(f"damaged tar after {stream.offset} bytes: {type(err).__name__}: {err}", False)


def window_shuffle(samples: Iterator[Sample], window: int, rng: np.random.Generator) -> Iterator[Sample]:
    """Bounded-memory shuffle: keeps `window` samples, emits a random one as each new one arrives."""
    buffer: list[Sample] = []
    for sample in samples:
        if len(buffer) < window:
            buffer.append(sample)
            continue
        slot = int(rng.integers(len(buffer)))
        yield buffer[slot]
        buffer[slot] = sample
    for slot in rng.permutation(len(buffer)):
        yield buffer[slot]


class RateLimitedLog:
    """Logs the first few problems, then at most one summary line per interval."""

    def __init__(self, first: int = 5, interval_s: float = 30.0) -> None:
        self.first, self.interval_s = first, interval_s
        self.seen = 0
        self.last = 0.0

    def warn(self, message: str) -> None:
        self.seen += 1
        now = time.monotonic()
        if self.seen <= self.first or now - self.last >= self.interval_s:
            self.last = now
            log.warning("%s (%d data problems so far in this worker)", message, self.seen)


class ShardCursor:
    """Serves samples by (epoch, shard, offset in the shard's shuffled order), reading forward only; a
    request behind the cursor reopens the shard. Keeps the per-shard problem counts."""

    def __init__(
        self,
        urls: list[str],
        names: list[str],
        seed: int,
        window: int,
        retries: int,
        max_wait_s: float,
        prefetch_bytes: int = 0,
    ) -> None:
        self.urls, self.names, self.seed, self.window = urls, names, seed, window
        self.retries, self.max_wait_s = retries, max_wait_s
        self.prefetcher = HeadPrefetch(prefetch_bytes)
        self.problems: dict[str, dict[str, int]] = {}  # shard name -> {"corrupt": n, "missing": n}
        self.damaged: dict[str, str] = {}  # shard name -> reason
        self.limiter = RateLimitedLog()
        self._at: tuple[int, int] | None = None
        self._stream: Iterator[Sample] | None = None
        self._next = 0
        self._unreadable: set[tuple[int, int]] = set()  # (epoch, shard) given up on: not retried again

    def get(self, epoch: int, shard: int, offset: int) -> Sample | None:
        """The sample, or None when the shard has no readable sample at that offset."""
        if self._at != (epoch, shard) or offset < self._next:
            self._open(epoch, shard)
        sample = None
        while self._next <= offset and self._stream is not None:
            sample = next(self._stream, None)
            self._next += 1
            if sample is None:
                self._stream = None
        return sample

    def prefetch(self, epoch: int, shard: int) -> None:
        """Starts fetching the head of the shard this cursor will open next (on object stores)."""
        if (epoch, shard) not in self._unreadable and not storage.is_local(self.urls[shard]):
            self.prefetcher.start(self.urls[shard])

    def count(self, shard: int, kind: str, message: str) -> None:
        name = self.names[shard]
        counts = self.problems.setdefault(name, {})
        counts[kind] = counts.get(kind, 0) + 1
        self.limiter.warn(f"{self.urls[shard]}: {message}")

    def _open(self, epoch: int, shard: int) -> None:
        rng = np.random.default_rng([self.seed & 0xFFFFFFFF, epoch, shard, 0x5B0F])
        head = self.prefetcher.take(self.urls[shard])
        reader = RetryingReader(self.urls[shard], self.retries, self.max_wait_s, head)

        def on_damage(reason: str, unreadable: bool) -> None:
            self.damaged[self.names[shard]] = reason
            if unreadable:
                self._unreadable.add((epoch, shard))
            log.error("shard %s: %s", self.urls[shard], reason)

        self._at, self._next = (epoch, shard), 0
        if (epoch, shard) in self._unreadable:
            self._stream = None
            return
        self._stream = window_shuffle(tar_samples(reader, on_damage), self.window, rng)
