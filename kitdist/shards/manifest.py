"""`manifest.json`: the contract between the shard builder and every reader of shards.

A shard set is a folder (any fsspec URL) holding WebDataset tars and one `manifest.json` that lists them.
Readers trust the manifest, never a bucket listing: a shard is part of the set exactly when the manifest
names it, and its sample count, size and sha256 are what the manifest says.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any, Literal

from kitdist import storage
from kitdist.config import ConfigError

MANIFEST_NAME = "manifest.json"
FORMAT = "kitdist-shards/1"


class ManifestError(ValueError):
    """A manifest that is missing, unreadable or inconsistent; the message names its URL."""


@dataclass(frozen=True)
class ShardInfo:
    name: str  # file name relative to the manifest's folder
    samples: int
    bytes: int
    sha256: str


@dataclass(frozen=True)
class Reject:
    path: str  # source path relative to --src
    reason: str


@dataclass(frozen=True)
class Manifest:
    dataset: str  # e.g. "imagenet", "sidd"
    recipe: str
    split: str  # "train", "val", "test"
    # clean: `clean.<ext>` (+ `cls`); paired: `input.<ext>` + `target.<ext>`; input: `input.<ext>` only
    # (a benchmark's degraded inputs whose targets are withheld, e.g. SIDD's benchmark blocks)
    kind: Literal["clean", "paired", "input"]
    shards: tuple[ShardInfo, ...]
    builder_version: str
    options: dict[str, Any] = field(default_factory=dict)
    rejects: tuple[Reject, ...] = ()
    format: str = FORMAT

    @property
    def total_samples(self) -> int:
        return sum(shard.samples for shard in self.shards)

    @property
    def total_bytes(self) -> int:
        return sum(shard.bytes for shard in self.shards)

    def to_json(self) -> str:
        body = dataclasses.asdict(self)
        body["total_samples"] = self.total_samples
        body["total_bytes"] = self.total_bytes
        return json.dumps(body, indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str, source: str = "<manifest>") -> Manifest:
        try:
            body = json.loads(text)
            if body.get("format") != FORMAT:
                raise ManifestError(f"{source}: format {body.get('format')!r}, expected {FORMAT!r}")
            body.pop("total_samples", None)
            body.pop("total_bytes", None)
            body["shards"] = tuple(ShardInfo(**shard) for shard in body["shards"])
            body["rejects"] = tuple(Reject(**reject) for reject in body.get("rejects", ()))
            return cls(**body)
        except ManifestError:
            raise
        except (ValueError, TypeError, KeyError) as err:
            raise ManifestError(f"{source}: not a valid kitdist manifest ({err})") from err


def manifest_url(shards_url: str) -> str:
    """Accepts a shard folder or the manifest itself; returns the manifest's URL."""
    if shards_url.rstrip("/").endswith(".json"):
        return shards_url
    return storage.join(shards_url, MANIFEST_NAME)


def shard_folder(shards_url: str) -> str:
    url = manifest_url(shards_url)
    return url.rsplit("/", 1)[0]


def read_manifest(shards_url: str) -> Manifest:
    url = manifest_url(shards_url)
    try:
        text = storage.read_text(url)
    except FileNotFoundError:
        raise ManifestError(
            f"{url}: no manifest here (build shards with `python -m kitdist.shards build`)"
        ) from None
    return Manifest.from_json(text, source=url)


def read_manifest_of_kind(shards_url: str, kind: str, key: str) -> Manifest:
    """The manifest of the shard set that config key `key` names, which must hold `kind` samples
    ("clean" or "paired", what data.kind says). Errors name the key and the URL: ManifestError for a
    missing or unreadable manifest, ConfigError for no URL or samples of the other kind."""
    if not shards_url:
        raise ConfigError(f"{key}: no shard set given (a folder or manifest.json URL)", key=key)
    try:
        manifest = read_manifest(shards_url)
    except ManifestError as err:
        raise ManifestError(f"{key}: {err}") from None
    if manifest.kind != kind:
        raise ConfigError(
            f"{key}: {shards_url} holds {manifest.kind} samples, but {kind} samples are needed "
            f"(data.kind: {kind})",
            key=key,
        )
    return manifest


def write_manifest(shards_url: str, manifest: Manifest) -> None:
    storage.write_text(manifest_url(shards_url), manifest.to_json())


def shard_urls(shards_url: str, manifest: Manifest) -> list[str]:
    folder = shard_folder(shards_url)
    return [storage.join(folder, shard.name) for shard in manifest.shards]
