"""The pipeline through the real S3 server (SeaweedFS): same batches as from a local folder, and a server
that goes away mid-epoch and comes back is waited for, with no sample lost or repeated."""

from __future__ import annotations

import threading
import time
from itertools import islice

import pytest
import shardkit
from test_data_pipeline import flat, make_cfg

from kitdist import storage
from kitdist.data import TrainStream, val_batches
from kitdist.data.shardio import RangeFetch, ReadOptions, ShardCursor, ShardReader, ShardSet
from kitdist.shards.manifest import read_manifest, shard_urls

pytestmark = pytest.mark.s3


def test_s3_serves_the_same_batches_as_local(s3_env, tmp_path, photo_paths):
    local = str(tmp_path)
    shardkit.write_set(local, photo_paths, [8] * 6, tile=64)
    shardkit.write_set(s3_env, photo_paths, [8] * 6, tile=64)
    for workers in (0, 2):
        from_local = list(islice(iter(TrainStream(make_cfg(local, num_workers=workers), 0, 1)), 14))
        from_s3 = list(islice(iter(TrainStream(make_cfg(s3_env, num_workers=workers), 0, 1)), 14))
        assert flat(from_s3) == flat(from_local)
    val_local = [b["keys"][0] for b in val_batches(make_cfg(local), 0, 1)]
    assert [b["keys"][0] for b in val_batches(make_cfg(s3_env), 0, 1)] == val_local


def test_ranged_reads_ahead_join_into_the_whole_shard(s3_env, photo_paths):
    """Ranges much smaller than the shard, each fetched ahead in the background, and a first range
    prefetched before the shard is opened: the bytes and the samples equal a plain read's."""
    shardkit.write_set(s3_env, photo_paths, [8] * 3, tile=64)
    manifest = read_manifest(s3_env)
    urls, sizes = shard_urls(s3_env, manifest), [shard.bytes for shard in manifest.shards]
    whole = storage.read_bytes(urls[1])
    small = ReadOptions(retries=2, max_wait_s=1.0, prefetch_bytes=5000)
    assert ShardReader(urls[1], sizes[1], small).read() == whole
    first = RangeFetch(urls[1], 0, 5000)
    assert ShardReader(urls[1], sizes[1], small, first).read() == whole

    shards = ShardSet(tuple(urls), ("a", "b", "c"), (8, 8, 8), tuple(sizes))
    plain = ShardCursor(shards, 7, 1, ReadOptions(prefetch_bytes=0))
    ahead = ShardCursor(shards, 7, 1, small)
    for shard in (2, 0):
        ahead.prefetch(0, shard)
        for offset in range(8):
            assert ahead.get(0, shard, offset) == plain.get(0, shard, offset)
    assert not ahead.problems and not ahead.damaged


def test_object_shorter_than_its_manifest_size_ends_at_its_end(s3_env, caplog):
    """A shard truncated exactly at a range boundary: the next range cannot be asked for (the server
    answers 416); the reader sees the object's end instead of retrying, and the stream ends there."""
    url = f"{s3_env}/short.tar"
    storage.write_bytes(url, bytes(range(256)) * 40)  # 10240 bytes: two ranges of 5120
    options = ReadOptions(retries=3, max_wait_s=5.0, prefetch_bytes=5120)
    assert ShardReader(url, 15360, options).read() == bytes(range(256)) * 40
    assert not [record for record in caplog.records if "retry" in record.getMessage()]


@pytest.mark.slow
@pytest.mark.parametrize("prefetch_bytes", [0, 16 << 20], ids=["reader-only", "reading-ahead"])
def test_server_restart_mid_epoch_is_survived(s3_server, s3_env, photo_paths, prefetch_bytes):
    """Without read-ahead the shard reader's retries (or the S3 client's own, depending on timing) ride out
    the outage; with it, a range fetched in the background that fails is asked for again by the reader;
    either way the stream waits for the server, no shard is given up, and no sample is lost or repeated."""
    keys = shardkit.write_set(s3_env, photo_paths, [4] * 12, tile=64)
    cfg = make_cfg(
        s3_env, num_workers=0, shuffle_buffer=2, read_retry_max_wait_s=2.0, prefetch_bytes=prefetch_bytes
    )
    reference = flat(list(islice(iter(TrainStream(cfg, 0, 1)), 12)))
    source = TrainStream(cfg, 0, 1)
    stream = iter(source)
    batches = list(islice(stream, 3))
    s3_server.stop()
    down_s = 12.0  # longer than botocore's and s3fs's own retries, so the reader's reopening is needed
    restarted = threading.Thread(target=lambda: (time.sleep(down_s), s3_server.start()))
    restarted.start()
    began = time.monotonic()
    try:
        batches += list(islice(stream, 9))  # the next shard is opened while the server is down
    finally:
        restarted.join()
    assert time.monotonic() - began >= down_s  # it did wait for the server
    assert flat(batches) == reference  # and continued with exactly the samples it would have read
    assert not source.damaged() and not source.problems()  # no shard given up, no sample passed over
    assert sorted(key for key, _ in reference) == sorted(keys)
