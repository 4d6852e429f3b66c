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
from kitdist.data.shardio import HeadPrefetch, RetryingReader, ShardCursor
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


def test_prefetched_heads_join_the_rest_of_the_shard_exactly(s3_env, photo_paths):
    """A prefetch shorter than the shard: the reader serves the head from memory and reads on from the
    network at that offset; the samples equal a plain read's."""
    shardkit.write_set(s3_env, photo_paths, [8] * 3, tile=64)
    urls = shard_urls(s3_env, read_manifest(s3_env))
    whole = storage.read_bytes(urls[1])
    prefetch = HeadPrefetch(5000)
    prefetch.start(urls[1])
    assert prefetch.take(urls[0]) == b"", "another URL's head is never handed out"
    assert prefetch.take(urls[1]) == whole[:5000]
    marked = RetryingReader(urls[1], retries=2, max_wait_s=1.0, head=b"X" * 5000)
    assert marked.read() == b"X" * 5000 + whole[5000:]  # head from memory, the rest from offset 5000

    plain = ShardCursor(urls, ["a", "b", "c"], 7, 1, 2, 1.0)
    prefetching = ShardCursor(urls, ["a", "b", "c"], 7, 1, 2, 1.0, prefetch_bytes=5000)
    for shard in (2, 0):
        prefetching.prefetch(0, shard)
        for offset in range(8):
            assert prefetching.get(0, shard, offset) == plain.get(0, shard, offset)
    assert not prefetching.problems and not prefetching.damaged


@pytest.mark.slow
@pytest.mark.parametrize("prefetch_bytes", [0, 64 << 20], ids=["reader-only", "prefetching"])
def test_server_restart_mid_epoch_is_survived(s3_server, s3_env, photo_paths, caplog, prefetch_bytes):
    """Without prefetch the shard reader's own reopening rides out the outage; with it, the prefetch of
    the next shard (or, when that fails, the reader) does; either way no sample is lost or repeated."""
    keys = shardkit.write_set(s3_env, photo_paths, [4] * 12, tile=64)
    cfg = make_cfg(
        s3_env, num_workers=0, shuffle_buffer=2, read_retry_max_wait_s=2.0, prefetch_bytes=prefetch_bytes
    )
    reference = flat(list(islice(iter(TrainStream(cfg, 0, 1)), 12)))
    stream = iter(TrainStream(cfg, 0, 1))
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
    if not prefetch_bytes:
        assert any("retry" in record.getMessage() for record in caplog.records)
    assert sorted(key for key, _ in reference) == sorted(keys)
