"""Writes one planned shard: encode its samples, a deterministic tar, publish atomically, then a sidecar.

A shard is written under a temporary name (locally beside its destination, for object stores in a local
temp file) and published whole with one rename or one PUT. Its sidecar (`_build/<name>.json`: counts,
sha256, rejects, and the fingerprint of what was planned into it) is written after the shard, so a
sidecar with the expected fingerprint means the shard is complete and a resumed build may skip it.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import BinaryIO

from kitdist import storage
from kitdist.shards.samples import EncodeOptions, ProbedItem, RejectError, encode

BUILD_DIR = "_build"  # sidecars of a build in progress; removed once the manifest is written
TAR_MTIME = 946684800  # 2000-01-01: fixed so rebuilt shards are byte-identical
_COPY_BUFFER = 8 << 20  # one write per image instead of one per 16 KiB


@dataclass(frozen=True)
class ShardTask:
    split_url: str  # the folder that receives the shard and its manifest
    name: str
    fingerprint: str  # sha256 of everything that determines the shard's bytes
    items: tuple[ProbedItem, ...]
    src: str
    dataset: str
    encode: EncodeOptions


@dataclass(frozen=True)
class ShardResult:
    name: str
    fingerprint: str
    samples: int
    bytes: int
    sha256: str
    rejects: list[tuple[str, str]] = field(default_factory=list)

    @classmethod
    def from_json(cls, text: str) -> ShardResult:
        body = json.loads(text)
        body["rejects"] = [tuple(reject) for reject in body["rejects"]]
        return cls(**body)


def sidecar_url(split_url: str, name: str) -> str:
    return storage.join(split_url, BUILD_DIR, f"{name}.json")


def read_sidecar(task: ShardTask) -> ShardResult | None:
    """The finished shard's result when its sidecar matches this plan, else None (build it)."""
    try:
        result = ShardResult.from_json(storage.read_text(sidecar_url(task.split_url, task.name)))
    except FileNotFoundError:
        return None
    except (ValueError, TypeError, KeyError):
        return None  # a damaged sidecar only costs a rebuild of its shard
    return result if result.fingerprint == task.fingerprint else None


def write_shard(task: ShardTask) -> tuple[ShardResult, str | None]:
    """Encodes and writes one shard; runs in a worker process.

    A local destination is published here (rename, then sidecar) and None is returned with the result;
    for object stores the finished file stays in a local temp file whose path is returned, and the
    caller publishes it with `publish_staged` (uploads then overlap with encoding).
    """
    destination = storage.join(task.split_url, task.name)
    local_dir = _local_folder(destination)
    handle, temporary = tempfile.mkstemp(prefix=f"{task.name}.", suffix=".partial", dir=local_dir)
    try:
        with os.fdopen(handle, "wb") as raw:
            hashing = _HashingWriter(raw)
            samples, rejects = _write_tar(task, hashing)
        result = ShardResult(task.name, task.fingerprint, samples, hashing.size, hashing.sha256(), rejects)
        if local_dir is None:
            return result, temporary
        if samples:
            os.chmod(temporary, 0o644)
            os.replace(temporary, os.path.join(local_dir, task.name))
    finally:
        if local_dir is not None:
            _remove_quietly(temporary)
    _write_sidecar(task.split_url, result)
    return result, None


def publish_staged(split_url: str, result: ShardResult, staged: str) -> ShardResult:
    """Uploads a shard written by `write_shard` to an object store, then its sidecar."""
    try:
        if result.samples:
            storage.put_file(staged, storage.join(split_url, result.name))
    finally:
        _remove_quietly(staged)
    _write_sidecar(split_url, result)
    return result


def _write_sidecar(split_url: str, result: ShardResult) -> None:
    storage.write_text(sidecar_url(split_url, result.name), json.dumps(asdict(result)))


def _write_tar(task: ShardTask, out: BinaryIO) -> tuple[int, list[tuple[str, str]]]:
    samples, rejects = 0, []
    with tarfile.open(fileobj=out, mode="w", format=tarfile.GNU_FORMAT, copybufsize=_COPY_BUFFER) as tar:
        for probed in task.items:
            try:
                encoded = encode(probed, Path(task.src), task.dataset, task.encode)
            except RejectError as err:
                rejects.append((probed.item.paths[0][1], str(err)))
                continue
            for sample in encoded:
                _add_sample(tar, sample)
            samples += len(encoded)
    return samples, rejects


def _add_sample(tar: tarfile.TarFile, sample: dict[str, bytes | str]) -> None:
    key = sample["__key__"]
    for suffix in sorted(name for name in sample if name != "__key__"):
        data = sample[suffix]
        assert isinstance(data, bytes)
        info = tarfile.TarInfo(f"{key}.{suffix}")
        info.size, info.mtime, info.mode = len(data), TAR_MTIME, 0o444
        info.uid = info.gid = 0
        info.uname = info.gname = ""
        tar.addfile(info, io.BytesIO(data))


def _local_folder(destination: str) -> str | None:
    """The destination's local folder (temp files go beside it, publishing is a rename); None if remote."""
    if not storage.is_local(destination):
        return None
    _, path = storage.url_to_fs(destination)
    folder = os.path.dirname(path)
    os.makedirs(folder, exist_ok=True)
    return folder


class _HashingWriter(io.RawIOBase):
    """Passes writes through while hashing and counting them, so a shard is read only once."""

    def __init__(self, raw: BinaryIO) -> None:
        self._raw, self._hash, self.size = raw, hashlib.sha256(), 0

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        self._hash.update(data)
        self.size += len(data)
        return self._raw.write(data)

    def tell(self) -> int:
        return self.size

    def sha256(self) -> str:
        return self._hash.hexdigest()


def _remove_quietly(path: str) -> None:
    try:
        os.remove(path)
    except OSError:
        pass
