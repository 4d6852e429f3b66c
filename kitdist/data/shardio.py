"""Reading shards: a byte stream of ranged requests that survives dropped connections and reads ahead on
object stores, tar members grouped into samples, the per-shard window shuffle, and a cursor that serves
samples by (epoch, shard, offset).

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
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np

from kitdist import storage
from kitdist.config import DataConfig

log = logging.getLogger("kitdist.data")

Sample = dict[str, Any]  # "__key__" plus one bytes value per extension ("clean.png", "json", ...)


class ShardUnavailable(OSError):
    """A shard that could not be read after all retries; the message names its URL."""


# One ranged request when there is no read-ahead: large enough that per-request costs vanish (measured in
# benchmarks/RESULTS.md), small enough to hold a few per data worker.
DEFAULT_CHUNK_BYTES = 16 << 20


@dataclass(frozen=True)
class ReadOptions:
    """How shards are read. `prefetch_bytes` > 0: ranged requests of that size, the next one fetched in a
    background thread while the current one is decoded (object stores only; local files need none);
    0: requests of DEFAULT_CHUNK_BYTES made when needed. A failed request is retried `retries` times,
    backing off from 0.5 s to `max_wait_s`."""

    retries: int = 8
    max_wait_s: float = 10.0
    prefetch_bytes: int = DEFAULT_CHUNK_BYTES

    @classmethod
    def of(cls, data: DataConfig) -> ReadOptions:
        return cls(data.read_retries, data.read_retry_max_wait_s, data.prefetch_bytes)

    @property
    def chunk_bytes(self) -> int:
        return self.prefetch_bytes or DEFAULT_CHUNK_BYTES

    def reads_ahead(self, url: str) -> bool:
        return self.prefetch_bytes > 0 and not storage.is_local(url)


class RangeFetch:
    """One ranged request, run in a background thread. One attempt only: a failure is left to the
    reader, which makes the request again in the foreground, with its retries."""

    def __init__(self, url: str, start: int, end: int) -> None:
        self.url, self.start, self.end = url, start, end
        self._data: bytes | None = None
        self._thread = threading.Thread(target=self._fetch, name="kitdist-read-ahead", daemon=True)
        self._thread.start()

    def _fetch(self) -> None:
        try:
            self._data = storage.read_range(self.url, self.start, self.end)
        except Exception as err:  # the reader's own request retries and reports
            log.debug("reading ahead %s [%d, %d) failed: %s", self.url, self.start, self.end, err)

    def result(self) -> bytes | None:
        """The bytes, once fetched, or None when the request failed."""
        self._thread.join()
        return self._data


class ShardReader(io.RawIOBase):
    """Reads a shard of known size front to back in ranged requests (on object stores one GET each, no
    metadata request), fetching the next range in the background while this one is consumed when the
    options say so. `first`, a fetch started earlier (the next-shard prefetch), serves the first range.
    An object shorter than its manifest size ends the stream there: the tar reader reports the damage."""

    def __init__(self, url: str, size: int, options: ReadOptions, first: RangeFetch | None = None) -> None:
        super().__init__()
        self.url, self.size, self.options = url, size, options
        self.offset = 0  # bytes handed out so far
        self._chunk = memoryview(b"")
        self._chunk_start = 0
        self._ahead = first
        self._ended = size <= 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        at = self.offset - self._chunk_start
        if at >= len(self._chunk):
            if self._ended:
                return 0
            self._chunk, self._chunk_start, at = memoryview(self._next_range()), self.offset, 0
            if not self._chunk:
                return 0
        count = min(len(buffer), len(self._chunk) - at)
        buffer[:count] = self._chunk[at : at + count]
        self.offset += count
        return count

    def _next_range(self) -> bytes:
        start, end = self.offset, min(self.size, self.offset + self.options.chunk_bytes)
        ahead, self._ahead = self._ahead, None
        data = ahead.result() if ahead is not None and (ahead.start, ahead.end) == (start, end) else None
        if data is None:
            data = self._fetch_retrying(start, end)
        if len(data) < end - start or end >= self.size:
            self._ended = True
        elif self.options.reads_ahead(self.url):
            self._ahead = RangeFetch(self.url, end, min(self.size, end + self.options.chunk_bytes))
        return data

    def _fetch_retrying(self, start: int, end: int) -> bytes:
        retries = self.options.retries
        for attempt in range(retries + 1):
            try:
                return storage.read_range(self.url, start, end)
            except Exception as err:  # network errors come as OSError, botocore or aiohttp types
                if attempt == retries:
                    raise ShardUnavailable(f"{self.url}: unreadable after {retries} retries: {err}") from err
                if start and self._ends_before(start):
                    return b""
                wait = min(self.options.max_wait_s, 0.5 * 2**attempt)
                log.warning("reading %s failed (%s); retry %d in %.1fs", self.url, err, attempt + 1, wait)
                time.sleep(wait)
        raise AssertionError("unreachable")

    def _ends_before(self, offset: int) -> bool:
        """Whether the object is shorter than `offset` (a truncated shard, whose next range cannot be
        asked for), as opposed to a request that failed."""
        try:
            return storage.size(self.url) <= offset
        except Exception:
            return False


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


class ShardSet(NamedTuple):
    """What the readers need of a manifest, shard by shard."""

    urls: tuple[str, ...]
    names: tuple[str, ...]
    samples: tuple[int, ...]
    shard_bytes: tuple[int, ...]


class ShardCursor:
    """Serves samples by (epoch, shard, offset in the shard's shuffled order), reading forward only; a
    request behind the cursor reopens the shard. Keeps the per-shard problem counts."""

    def __init__(self, shards: ShardSet, seed: int, window: int, options: ReadOptions) -> None:
        self.shards, self.seed, self.window, self.options = shards, seed, window, options
        self.problems: dict[str, dict[str, int]] = {}  # shard name -> {"corrupt": n, "missing": n}
        self.damaged: dict[str, str] = {}  # shard name -> reason
        self.limiter = RateLimitedLog()
        self._at: tuple[int, int] | None = None
        self._stream: Iterator[Sample] | None = None
        self._next = 0
        self._unreadable: set[tuple[int, int]] = set()  # (epoch, shard) given up on: not retried again
        self._prefetched: RangeFetch | None = None  # the first range of the shard opened next

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
        """Starts fetching the first range of the shard this cursor will open next (on object stores)."""
        url = self.shards.urls[shard]
        if (epoch, shard) in self._unreadable or not self.options.reads_ahead(url):
            return
        if self._prefetched is None or self._prefetched.url != url:
            self._prefetched = RangeFetch(
                url, 0, min(self.shards.shard_bytes[shard], self.options.chunk_bytes)
            )

    def count(self, shard: int, kind: str, message: str) -> None:
        counts = self.problems.setdefault(self.shards.names[shard], {})
        counts[kind] = counts.get(kind, 0) + 1
        self.limiter.warn(f"{self.shards.urls[shard]}: {message}")

    def _open(self, epoch: int, shard: int) -> None:
        rng = np.random.default_rng([self.seed & 0xFFFFFFFF, epoch, shard, 0x5B0F])
        url = self.shards.urls[shard]
        first = None
        if self._prefetched is not None and self._prefetched.url == url:
            first, self._prefetched = self._prefetched, None
        reader = ShardReader(url, self.shards.shard_bytes[shard], self.options, first)

        def on_damage(reason: str, unreadable: bool) -> None:
            self.damaged[self.shards.names[shard]] = reason
            if unreadable:
                self._unreadable.add((epoch, shard))
            log.error("shard %s: %s", url, reason)

        self._at, self._next = (epoch, shard), 0
        if (epoch, shard) in self._unreadable:
            self._stream = None
            return
        self._stream = window_shuffle(tar_samples(reader, on_damage), self.window, rng)
