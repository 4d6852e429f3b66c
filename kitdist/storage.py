"""Storage helpers over fsspec: one way to reach a local path, `file://` or `s3://` URL.

Everything that reads or writes run data (shards, manifests, checkpoints, metrics, coordinator state)
goes through here, so that:
- S3 endpoints and credentials come only from the environment (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID,
  AWS_SECRET_ACCESS_KEY, AWS_DEFAULT_REGION), never from configs that end up in logs;
- every network call has a timeout and bounded retries, so a dead endpoint fails with the URL named
  instead of hanging;
- writes are atomic: a reader sees the whole file or no file. Locally that is write-to-temp + rename;
  on object stores a single PUT already publishes all-or-nothing.
"""

from __future__ import annotations

import os
import uuid
from typing import Any

import fsspec
from fsspec.implementations.local import LocalFileSystem

# Bounded so that an unreachable endpoint or a wrong port fails in seconds, not minutes.
_S3_MAX_ATTEMPTS = 4
_S3_CLIENT_CONFIG = {
    "connect_timeout": 5,
    "read_timeout": 60,
    "retries": {"max_attempts": _S3_MAX_ATTEMPTS, "mode": "standard"},
}


class StorageError(OSError):
    """A URL that cannot be reached, read or written; the message names the URL."""


def storage_options(url: str) -> dict[str, Any]:
    """fsspec options for `url`'s protocol, built from the environment only."""
    if protocol_of(url) in ("s3", "s3a"):
        # botocore rewrites the retries mapping it is given: hand it a copy.
        config = {**_S3_CLIENT_CONFIG, "retries": dict(_S3_CLIENT_CONFIG["retries"])}
        # No listings cache: a run's folder is written by other processes (the workers, Ray Train), so
        # a listing cached by the driver before training goes stale (its checkpoints then look missing).
        options: dict[str, Any] = {"config_kwargs": config, "use_listings_cache": False}
        if os.environ.get("AWS_ENDPOINT_URL"):
            options["endpoint_url"] = os.environ["AWS_ENDPOINT_URL"]
        return options
    return {}


def arrow_filesystem(url: str) -> tuple[Any, str]:
    """A pyarrow filesystem and the path within it for a remote `url` (Ray Train's storage wants one).

    S3 gets pyarrow's native client, built from the same environment variables, timeouts and retries as
    the fsspec one. It is pickled to Ray's controller and workers, so it carries no credentials (Ray keeps
    what it is given): each process finds them in its own environment (see kitdist.credentials). It never
    creates buckets (an S3-compatible server may refuse, and a typo in a bucket name should fail, not
    create a bucket).
    Other protocols go through pyarrow's wrapper of the fsspec filesystem."""
    if protocol_of(url) in ("s3", "s3a"):
        return _arrow_s3(), url.split("://", 1)[1].rstrip("/")
    from pyarrow.fs import FSSpecHandler, PyFileSystem

    fs, path = url_to_fs(url)
    return PyFileSystem(FSSpecHandler(fs)), path


def _arrow_s3() -> Any:
    from pyarrow.fs import AwsStandardS3RetryStrategy, S3FileSystem

    options: dict[str, Any] = {
        "connect_timeout": float(_S3_CLIENT_CONFIG["connect_timeout"]),
        "request_timeout": float(_S3_CLIENT_CONFIG["read_timeout"]),
        "retry_strategy": AwsStandardS3RetryStrategy(
            max_attempts=_S3_CLIENT_CONFIG["retries"]["max_attempts"]
        ),
        "allow_bucket_creation": False,
        "allow_bucket_deletion": False,
    }
    endpoint = os.environ.get("AWS_ENDPOINT_URL", "")
    if endpoint:
        scheme, _, host = endpoint.partition("://") if "://" in endpoint else ("https", "", endpoint)
        options.update(endpoint_override=host.rstrip("/"), scheme=scheme)
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    if region or endpoint:  # a custom endpoint has no region to discover
        options["region"] = region or "us-east-1"
    return S3FileSystem(**options)


def protocol_of(url: str) -> str:
    return url.split("://", 1)[0] if "://" in url else "file"


def url_to_fs(url: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """The filesystem for `url` and the path within it."""
    try:
        return fsspec.core.url_to_fs(url, **storage_options(url))
    except (ImportError, ValueError) as err:
        raise StorageError(f"{url}: cannot open this URL ({err})") from err


def forked_loader_options() -> dict[str, Any]:
    """DataLoader options for worker processes that read through this module.

    Object-store clients (aiohttp sessions, botocore state, fsspec's event loop) do not survive fork():
    a worker that inherits a live client from its parent stalled on its first read until the 60 s read
    timeout (S3, 2 workers: 3 samples/s instead of 235). So the parent forgets its cached clients before
    the workers are forked, and each worker starts with fresh ones; both are made anew on next use.
    """
    _drop_cached_clients()
    return {"worker_init_fn": _reset_in_child}


def _drop_cached_clients() -> None:
    import fsspec.asyn

    for cls in set(fsspec.registry.values()):
        if issubclass(cls, fsspec.asyn.AsyncFileSystem):
            cls.clear_instance_cache()


def _reset_in_child(_worker_id: int) -> None:
    import fsspec.asyn

    fsspec.asyn.reset_lock()
    _drop_cached_clients()


def is_local(url: str) -> bool:
    return protocol_of(url) in ("file", "local")


def absolute(url: str) -> str:
    """A local path or `file://` URL as an absolute path, the same from any working directory (Ray
    workers and jobs run in another one); other URLs, and "", as they are."""
    if not url or not is_local(url):
        return url
    return os.path.abspath(url.removeprefix("file://"))


def name_of(url: str) -> str:
    """The last part of a URL or path, a trailing '/' ignored (`s3://b/run/step-00000004/` -> `step-00000004`)."""
    return url.rstrip("/").rsplit("/", 1)[-1]


def join(url: str, *parts: str) -> str:
    """Appends path parts to a URL or local path with '/'."""
    out = url.rstrip("/")
    for part in parts:
        out = f"{out}/{part.strip('/')}"
    return out


def exists(url: str) -> bool:
    fs, path = url_to_fs(url)
    return _call(url, fs.exists, path)


def read_bytes(url: str) -> bytes:
    fs, path = url_to_fs(url)
    return _call(url, fs.cat_file, path)


def read_text(url: str) -> str:
    return read_bytes(url).decode("utf-8")


def read_range(url: str, start: int, end: int) -> bytes:
    """Bytes [start, end) of `url` in one request (fewer when the file ends first)."""
    fs, path = url_to_fs(url)
    return _call(url, fs.cat_file, path, start=start, end=end)


def size(url: str) -> int:
    fs, path = url_to_fs(url)
    return int(_call(url, fs.size, path))


def open_read(url: str) -> Any:
    """A seekable binary file object for reading `url` (on object stores it reads ahead in blocks)."""
    fs, path = url_to_fs(url)
    return _call(url, fs.open, path, "rb")


def write_bytes(url: str, data: bytes) -> None:
    """Writes `data` so that readers see either the old file, or none, or all of the new one."""
    fs, path = url_to_fs(url)
    if isinstance(fs, LocalFileSystem):
        _publish_local(url, fs, path, lambda temporary: _write_synced(temporary, data))
    else:
        _call(url, fs.pipe_file, path, data)


def write_text(url: str, text: str) -> None:
    write_bytes(url, text.encode("utf-8"))


def put_file(local_path: str, url: str) -> None:
    """Uploads (or copies) a finished local file to `url` atomically."""
    fs, path = url_to_fs(url)
    if isinstance(fs, LocalFileSystem):
        _publish_local(url, fs, path, lambda temporary: fs.cp_file(local_path, temporary))
    else:
        _call(url, fs.put_file, local_path, path)


def _publish_local(url: str, fs: LocalFileSystem, path: str, fill: Any) -> None:
    """Fills a temporary file beside `path`, then renames it into place (atomic on one file system)."""
    _call(url, fs.makedirs, fs._parent(path), exist_ok=True)
    temporary = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        fill(temporary)
        os.replace(temporary, path)
    except OSError as err:
        _remove_quietly(temporary)
        raise StorageError(f"{url}: cannot write ({err})") from err


def _write_synced(path: str, data: bytes) -> None:
    with open(path, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())


def list_names(url: str) -> list[str]:
    """Names (not paths) directly under a folder URL; [] when it does not exist."""
    fs, path = url_to_fs(url)
    if not _call(url, fs.exists, path):
        return []
    return sorted(name_of(entry) for entry in _call(url, fs.ls, path, detail=False))


def remove(url: str, recursive: bool = False) -> None:
    fs, path = url_to_fs(url)
    if _call(url, fs.exists, path):
        _call(url, fs.rm, path, recursive=recursive)


def move(url: str, target: str) -> None:
    """Moves a file or folder (with everything below it) to `target` on the same storage. Locally one
    rename; object stores have no rename, so there every object is copied, then the originals removed."""
    fs, path = url_to_fs(url)
    _, target_path = url_to_fs(target)
    if isinstance(fs, LocalFileSystem):
        _call(url, os.rename, path, target_path)
    else:  # file by file: fsspec's recursive mv also copies the folder markers S3 does not store
        for found in _call(url, fs.find, path):
            _call(url, fs.copy, found, target_path + found[len(path) :])
        _call(url, fs.rm, path, recursive=True)


def check_writable(url: str) -> None:
    """Fails fast, naming the URL, when a destination cannot take writes (bad bucket, credentials, path)."""
    probe = join(url, f".kitdist-probe-{uuid.uuid4().hex[:8]}")
    write_bytes(probe, b"ok")
    remove(probe)


def _call(url: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
    try:
        return fn(*args, **kwargs)
    except FileNotFoundError:
        raise
    except (OSError, ValueError) as err:
        raise StorageError(f"{url}: {type(err).__name__}: {err}") from err
    except Exception as err:  # botocore and aiohttp raise their own types for network failures
        if type(err).__module__.split(".")[0] in ("botocore", "aiohttp", "aiobotocore", "s3fs"):
            raise StorageError(f"{url}: {type(err).__name__}: {err}") from err
        raise


def _remove_quietly(path: str) -> None:
    try:
        os.remove(path)
    except OSError:
        pass
