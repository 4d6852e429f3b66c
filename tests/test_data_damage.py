"""Damaged data: a corrupt member, a truncated shard and a missing shard are skipped, counted per shard,
kept in the state, and never break the batch count or exact resume."""

from __future__ import annotations

import json
from collections import Counter
from itertools import islice

import pytest
import shardkit
from test_data_pipeline import flat, make_cfg, run_with_stops

from kitdist import storage
from kitdist.data import TrainStream
from kitdist.data.shardio import ReadOptions, ShardReader


@pytest.fixture(scope="module")
def damaged_set(tmp_path_factory, photo_paths):
    folder = str(tmp_path_factory.mktemp("damaged"))
    keys = shardkit.write_set(folder, photo_paths, [8] * 6, tile=64)
    shardkit.corrupt_member(folder, "shard-00001.tar", keys[10], "clean.png")
    shardkit.truncate(folder, "shard-00003.tar", 0.5)
    return folder, keys


def test_damage_is_skipped_counted_and_batches_stay_full(damaged_set):
    folder, keys = damaged_set
    stream = TrainStream(make_cfg(folder, num_workers=2), 0, 1)
    epoch = list(islice(iter(stream), 12))  # 48 samples / 4
    assert all(len(b["keys"]) == 4 and b["input"].shape[0] == 4 for b in epoch)
    seen = Counter(key for b in epoch for key in b["keys"])
    problems = stream.problems()
    assert problems["shard-00001.tar"] == {"corrupt": 1}
    lost = problems["shard-00003.tar"]["missing"]
    assert 2 <= lost <= 6  # half the bytes: its first samples survive
    assert "shard-00003.tar" in stream.damaged() and "damaged tar" in stream.damaged()["shard-00003.tar"]
    assert keys[10] not in seen
    readable = set(keys) - {keys[10]} - set(keys[24:32])
    assert readable <= set(seen)  # every sample of the intact shards served
    assert len(set(keys[24:32]) & set(seen)) == 8 - lost  # the truncated shard's readable ones too
    assert sum(seen.values()) == 48  # refills from the same positions keep the count


def test_resume_through_damage_is_exact_and_keeps_the_counts(damaged_set):
    folder, _ = damaged_set
    cfg = make_cfg(folder, num_workers=2)
    (reference,) = run_with_stops(cfg, [1], [14])
    legs = run_with_stops(cfg, [1, 1], [7, 7])
    assert flat(legs[0][0] + legs[1][0]) == flat(reference[0])
    first = TrainStream(cfg, 0, 1)
    list(islice(iter(first), 12))
    resumed = TrainStream(cfg, 0, 1, resume=json.loads(json.dumps([first.state_dict()])))
    assert resumed.problems() == first.problems() and resumed.damaged() == first.damaged()
    elastic = [TrainStream(cfg, rank, 2, resume=[first.state_dict()]) for rank in range(2)]
    assert elastic[0].problems() == first.problems() and elastic[1].problems() == {}  # rank 0 carries them


def test_a_missing_shard_is_reported_by_url(tmp_path, photo_paths):
    folder = str(tmp_path)
    keys = shardkit.write_set(folder, photo_paths, [8, 8, 8], tile=64)
    storage.remove(storage.join(folder, "shard-00001.tar"))
    cfg = make_cfg(folder, read_retries=1, read_retry_max_wait_s=0.1)
    stream = TrainStream(cfg, 0, 1)
    seen = {key for b in islice(iter(stream), 6) for key in b["keys"]}
    assert seen == set(keys[:8] + keys[16:])
    reason = stream.damaged()["shard-00001.tar"]
    assert storage.join(folder, "shard-00001.tar") in reason and "unreadable" in reason
    assert stream.problems()["shard-00001.tar"] == {"missing": 8}


def test_ranges_join_into_the_whole_file_and_a_short_file_ends_early(tmp_path):
    """The shard reader on a local file in ranges far smaller than it: the same bytes as reading it
    whole; a file shorter than its manifest size gives what it has and ends (no retries, no error)."""
    path = tmp_path / "bytes.bin"
    content = bytes(range(256)) * 100  # 25600 bytes: five ranges of 5000 and a part
    path.write_bytes(content)
    small = ReadOptions(retries=1, max_wait_s=0.1, prefetch_bytes=5000)
    assert ShardReader(str(path), len(content), small).read() == content
    assert ShardReader(str(path), len(content) + 9000, small).read() == content
    reader = ShardReader(str(path), len(content), small)
    pieces = []
    while piece := reader.read(777):  # reads that straddle range boundaries
        pieces.append(piece)
    assert b"".join(pieces) == content and reader.offset == len(content)
