"""`verify` and `stats`: check a shard set against its manifest, and summarise it for people.

Both accept a folder holding `manifest.json`, the manifest itself, or a build's output folder whose
splits live in sub-folders (`OUT/train/`, `OUT/val/`, ...). `verify` reads each shard with its own tar
reader (the bytes the manifest hashes); `--deep` also decodes every image and reads the shard back through
webdataset's own tar reader, so a user's WebDataset loaders are known to see the same samples.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import tarfile
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field

from kitdist import storage
from kitdist.shards.manifest import (
    MANIFEST_NAME,
    Manifest,
    ManifestError,
    ShardInfo,
    read_manifest,
    shard_urls,
)
from kitdist.shards.samples import decode_bytes

_READ_CHUNK = 1 << 20


@dataclass
class ShardCheck:
    """What one pass over a shard found."""

    sha256: str = ""
    bytes: int = 0
    keys: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


def find_manifests(url: str) -> list[str]:
    """Manifest folders at `url`: the folder itself, or its split sub-folders."""
    if url.rstrip("/").endswith(".json") or storage.exists(storage.join(url, MANIFEST_NAME)):
        return [url]
    found = [
        storage.join(url, name)
        for name in storage.list_names(url)
        if storage.exists(storage.join(url, name, MANIFEST_NAME))
    ]
    if not found:
        raise ManifestError(f"{url}: no {MANIFEST_NAME} here or in its sub-folders (build shards first)")
    return found


def verify(url: str, deep: bool = False) -> list[str]:
    """Every mismatch between the shards and their manifests; [] when all agree."""
    problems = []
    for folder in find_manifests(url):
        manifest = read_manifest(folder)
        seen: set[str] = set()
        for shard, shard_url in zip(manifest.shards, shard_urls(folder, manifest), strict=True):
            check = check_shard(shard_url, manifest.kind, deep)
            problems += check.problems or _compare(shard_url, shard, check)
            duplicates = seen.intersection(check.keys)
            if duplicates:
                problems.append(f"{shard_url}: keys also in an earlier shard, e.g. {sorted(duplicates)[0]}")
            seen.update(check.keys)
    return problems


def _compare(shard_url: str, shard: ShardInfo, check: ShardCheck) -> list[str]:
    problems = []
    if check.bytes != shard.bytes:
        problems.append(f"{shard_url}: {check.bytes} bytes, manifest says {shard.bytes}")
    if check.sha256 != shard.sha256:
        problems.append(f"{shard_url}: sha256 {check.sha256[:16]}..., manifest says {shard.sha256[:16]}...")
    if len(check.keys) != shard.samples:
        problems.append(f"{shard_url}: {len(check.keys)} samples, manifest says {shard.samples}")
    return problems


def check_shard(shard_url: str, kind: str, deep: bool) -> ShardCheck:
    """One streaming pass: sha256 and size of the bytes, the samples' keys, and (deep) every decode."""
    check = ShardCheck()
    digest = hashlib.sha256()
    reader = None
    try:
        fs, path = storage.url_to_fs(shard_url)
        with fs.open(path, "rb") as raw:
            reader = _HashingReader(raw, digest)
            for key, files in _samples(tarfile.open(fileobj=reader, mode="r|")):
                check.keys.append(key)
                if deep:
                    check.problems += [f"{shard_url}: {key}: {p}" for p in check_sample(files, kind)]
            while reader.read(_READ_CHUNK):  # the tar's end padding still counts for size and hash
                pass
        if deep:
            check.problems += webdataset_problems(shard_url, check.keys)
    except FileNotFoundError:
        check.problems.append(f"{shard_url}: missing")
    except (OSError, tarfile.TarError, EOFError) as err:
        check.problems.append(f"{shard_url}: unreadable tar ({err})")
    check.sha256, check.bytes = digest.hexdigest(), reader.size if reader is not None else 0
    return check


def _samples(tar: tarfile.TarFile) -> Iterator[tuple[str, dict[str, bytes]]]:
    """Groups consecutive members by WebDataset key (the name up to the first dot of its last part)."""
    key, files = None, {}
    for member in tar:
        if not member.isfile():
            continue
        folder, _, base = member.name.rpartition("/")
        stem, _, suffix = base.partition(".")
        name = f"{folder}/{stem}" if folder else stem
        if key is not None and name != key:
            yield key, files
            files = {}
        key = name
        files[suffix] = tar.extractfile(member).read()
    if key is not None:
        yield key, files


def webdataset_problems(shard_url: str, keys: list[str]) -> list[str]:
    """Where webdataset's own reader (its tar iterator and grouping by key, what `webdataset.WebDataset`
    runs) does not see the samples `keys` that this module's reader found in the shard."""
    from webdataset.tariterators import group_by_keys, tar_file_expander

    fs, path = storage.url_to_fs(shard_url)
    try:
        with fs.open(path, "rb") as stream:
            seen = [
                sample["__key__"]
                for sample in group_by_keys(tar_file_expander([{"url": shard_url, "stream": stream}]))
            ]
    except Exception as err:  # webdataset raises what its parts raise (ValueError, tarfile errors, ...)
        return [
            f"{shard_url}: webdataset cannot read it ({type(err).__name__}: {err.args[0] if err.args else err})"
        ]
    if seen != keys:
        missing = sorted(set(keys) - set(seen)) or sorted(set(seen) - set(keys)) or ["(order)"]
        return [
            f"{shard_url}: webdataset reads {len(seen)} samples, the tar holds {len(keys)} (e.g. {missing[0]})"
        ]
    return []


def check_sample(files: dict[str, bytes], kind: str) -> list[str]:
    """A sample's fields are those of its kind, its json parses and its images decode (same sizes)."""
    roles = {"clean": ("clean",), "input": ("input",)}.get(kind, ("input", "target"))
    problems, sizes = [], []
    for role in roles:
        names = [name for name in files if name.split(".")[0] == role]
        if len(names) != 1:
            problems.append(f"expected one {role}.<ext>, found {names or 'none'}")
            continue
        try:
            sizes.append(decode_bytes(files[names[0]]).size)
        except Exception as err:  # PIL raises many types for damaged data
            problems.append(f"{names[0]} does not decode ({type(err).__name__}: {err})")
    if len(set(sizes)) > 1:
        problems.append(f"input and target sizes differ: {sizes}")
    try:
        json.loads(files.get("json", b""))
    except ValueError:
        problems.append("json missing or not valid JSON")
    return problems


def stats(url: str) -> str:
    """A readable summary of every manifest at `url`."""
    return "\n\n".join(_describe(folder, read_manifest(folder)) for folder in find_manifests(url))


def _describe(folder: str, manifest: Manifest) -> str:
    counts = [shard.samples for shard in manifest.shards] or [0]
    mean_kb = manifest.total_bytes / max(manifest.total_samples, 1) / 1e3
    lines = [
        f"{folder}",
        f"  dataset {manifest.dataset}, split {manifest.split}, kind {manifest.kind}, "
        f"builder {manifest.builder_version}",
        f"  {len(manifest.shards)} shards, {manifest.total_samples} samples, "
        f"{manifest.total_bytes / 1e6:.1f} MB ({mean_kb:.1f} KB per sample)",
        f"  samples per shard: min {min(counts)}, max {max(counts)}",
        f"  rejected: {len(manifest.rejects)}",
    ]
    reasons = Counter(_reason_kind(reject.reason) for reject in manifest.rejects)
    lines += [f"    {count:6d}  {reason}" for reason, count in reasons.most_common()]
    shown = {k: v for k, v in manifest.options.items() if k not in ("plan_sha256",)}
    lines.append("  options: " + ", ".join(f"{key}={value}" for key, value in sorted(shown.items())))
    return "\n".join(lines)


def _reason_kind(reason: str) -> str:
    """'a/b.png: corrupt image (CRC ...)' -> 'corrupt image'."""
    reason = re.sub(r"^\S+\.\w+: ", "", reason)
    return re.split(r"[(:]", reason, maxsplit=1)[0].strip()


class _HashingReader(io.RawIOBase):
    def __init__(self, raw, digest) -> None:
        self._raw, self._digest, self.size = raw, digest, 0

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        data = self._raw.read(size)
        self._digest.update(data)
        self.size += len(data)
        return data
