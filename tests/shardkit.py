"""Test shard sets built from real photographs: tiles of scikit-image's RGB photos written with
webdataset's TarWriter plus a manifest, clean or paired (input made with a synthetic degradation), and
tools to damage them (a corrupt member, a truncated tar)."""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path

import numpy as np
import webdataset as wds
from PIL import Image

from kitdist import storage
from kitdist.shards.manifest import Manifest, ShardInfo, write_manifest


def photo_tiles(
    photo_paths: list[Path], tile: int, count: int, repeat: bool = False
) -> list[tuple[str, np.ndarray]]:
    """The first `count` non-overlapping tile x tile RGB tiles, photo after photo, named photo-row-col;
    with `repeat`, the photos are gone through again (keys get a -r<n> suffix) until there are enough."""
    tiles = []
    for lap in range(1000 if repeat else 1):
        tiles += _tiles_of(photo_paths, tile, count - len(tiles), f"-r{lap}" if lap else "")
        if len(tiles) == count:
            return tiles
    raise AssertionError(f"the photographs hold fewer than {count} tiles of {tile} px")


def _tiles_of(photo_paths: list[Path], tile: int, count: int, suffix: str) -> list[tuple[str, np.ndarray]]:
    tiles = []
    for path in photo_paths:
        with Image.open(path) as image:
            pixels = np.asarray(image.convert("RGB"))
        for top in range(0, pixels.shape[0] - tile + 1, tile):
            for left in range(0, pixels.shape[1] - tile + 1, tile):
                name = f"{path.stem}-{top:04d}-{left:04d}{suffix}"
                tiles.append((name, pixels[top : top + tile, left : left + tile]))
                if len(tiles) == count:
                    return tiles
    return tiles


def encode(pixels: np.ndarray, fmt: str = "png") -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG" if fmt == "png" else "JPEG", quality=95)
    return buffer.getvalue()


def noisy(pixels: np.ndarray, key: str, sigma: float = 25.0) -> np.ndarray:
    rng = np.random.default_rng(int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "little"))
    return np.clip(pixels + rng.normal(0, sigma, pixels.shape), 0, 255).astype(np.uint8)


def sample_of(key: str, pixels: np.ndarray, kind: str, fmt: str) -> dict:
    provenance = json.dumps({"source": key, "dataset": "skimage-test"}).encode()
    if kind == "clean":
        return {"__key__": key, f"clean.{fmt}": encode(pixels, fmt), "json": provenance}
    return {
        "__key__": key,
        f"input.{fmt}": encode(noisy(pixels, key), fmt),
        f"target.{fmt}": encode(pixels, fmt),
        "json": provenance,
    }


def tar_bytes(samples: list[dict]) -> bytes:
    buffer = io.BytesIO()
    with wds.TarWriter(buffer, encoder=False) as writer:
        for sample in samples:
            writer.write(sample)
    return buffer.getvalue()


def write_set(
    folder: str,
    photo_paths: list[Path],
    shard_sizes: list[int],
    kind: str = "clean",
    tile: int = 96,
    fmt: str = "png",
    first_tile: int = 0,
    repeat: bool = False,
) -> list[str]:
    """Writes shards with the given sample counts (and the manifest) under `folder`, a path or URL;
    returns every sample key in manifest order."""
    tiles = photo_tiles(photo_paths, tile, first_tile + sum(shard_sizes), repeat)[first_tile:]
    infos, keys = [], []
    for index, size in enumerate(shard_sizes):
        chunk, tiles = tiles[:size], tiles[size:]
        data = tar_bytes([sample_of(key, pixels, kind, fmt) for key, pixels in chunk])
        name = f"shard-{index:05d}.tar"
        storage.write_bytes(storage.join(folder, name), data)
        infos.append(
            ShardInfo(name=name, samples=size, bytes=len(data), sha256=hashlib.sha256(data).hexdigest())
        )
        keys += [key for key, _ in chunk]
    manifest = Manifest(
        dataset="skimage-test",
        recipe="tests",
        split="train",
        kind=kind,
        shards=tuple(infos),
        builder_version="test",
    )
    write_manifest(folder, manifest)
    return keys


def corrupt_member(folder: str, shard: str, key: str, field: str) -> None:
    """Replaces one sample's image bytes by garbage of the same length (the tar itself stays valid)."""
    url = storage.join(folder, shard)
    data = bytearray(storage.read_bytes(url))
    start = data.index(f"{key}.{field}".encode()) + 512  # the member's data follows its 512-byte header
    data[start + 16 : start + 400] = bytes(384)
    storage.write_bytes(url, bytes(data))


def truncate(folder: str, shard: str, keep_fraction: float) -> None:
    url = storage.join(folder, shard)
    data = storage.read_bytes(url)
    storage.write_bytes(url, data[: int(len(data) * keep_fraction)])
