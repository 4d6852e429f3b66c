"""manifest.json round trips and rejects what is not a kitdist manifest."""

from __future__ import annotations

import pytest

from kitdist import storage
from kitdist.config import ConfigError
from kitdist.shards.manifest import (
    Manifest,
    ManifestError,
    Reject,
    ShardInfo,
    read_manifest,
    read_manifest_of_kind,
    shard_urls,
    write_manifest,
)


def _manifest() -> Manifest:
    shards = (
        ShardInfo("train-000000.tar", 3, 3072, "ab" * 32),
        ShardInfo("train-000001.tar", 2, 2048, "cd" * 32),
    )
    return Manifest(
        dataset="folder",
        recipe="folder",
        split="train",
        kind="clean",
        shards=shards,
        builder_version="0.1.0",
        options={"samples_per_shard": 3},
        rejects=(Reject("bad.png", "cannot decode"),),
    )


def test_round_trip(tmp_path):
    write_manifest(str(tmp_path), _manifest())
    loaded = read_manifest(str(tmp_path))
    assert loaded == _manifest()
    assert loaded.total_samples == 5 and loaded.total_bytes == 5120
    assert shard_urls(str(tmp_path), loaded) == [
        f"{tmp_path}/train-000000.tar",
        f"{tmp_path}/train-000001.tar",
    ]
    assert read_manifest(f"{tmp_path}/manifest.json") == loaded


def test_missing_and_foreign_manifest(tmp_path):
    with pytest.raises(ManifestError, match="no manifest here"):
        read_manifest(str(tmp_path))
    storage.write_text(str(tmp_path / "manifest.json"), '{"shards": []}')
    with pytest.raises(ManifestError, match="format None"):
        read_manifest(str(tmp_path))


def test_a_set_of_the_other_kind_or_none_names_the_key_and_the_url(tmp_path):
    """The one check of data.kind against a shard set (the driver, the coordinator and the data stream)."""
    write_manifest(str(tmp_path), _manifest())
    assert read_manifest_of_kind(str(tmp_path), "clean", "data.train_shards") == _manifest()
    with pytest.raises(
        ConfigError, match=f"data.val_shards: {tmp_path} holds clean samples, but paired"
    ) as info:
        read_manifest_of_kind(str(tmp_path), "paired", "data.val_shards")
    assert info.value.key == "data.val_shards"
    with pytest.raises(ManifestError, match=f"test_shards: {tmp_path}/none/manifest.json: no manifest here"):
        read_manifest_of_kind(str(tmp_path / "none"), "paired", "test_shards")
    with pytest.raises(ConfigError, match="data.train_shards: no shard set given"):
        read_manifest_of_kind("", "clean", "data.train_shards")
