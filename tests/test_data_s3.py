"""The pipeline through the real S3 server (SeaweedFS): same batches as from a local folder, and a server
that goes away mid-epoch and comes back is waited for, with no sample lost or repeated."""

from __future__ import annotations

import threading
import time
from itertools import islice

import pytest
import shardkit
from test_data_pipeline import flat, make_cfg

from kitdist.data import TrainStream, val_batches

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


@pytest.mark.slow
def test_server_restart_mid_epoch_is_survived(s3_server, s3_env, photo_paths, caplog):
    keys = shardkit.write_set(s3_env, photo_paths, [4] * 12, tile=64)
    cfg = make_cfg(s3_env, num_workers=0, shuffle_buffer=2, read_retry_max_wait_s=2.0)
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
    assert any("retry" in record.getMessage() for record in caplog.records)
    assert sorted(key for key, _ in reference) == sorted(keys)
