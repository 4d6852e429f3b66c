"""The stream state's types: JSON round trips, problem counts that add up, and states saved by the code
before the typed state (format "kitdist-stream/1", tests/data/stream_states_v1.json) resuming exactly."""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from itertools import islice
from pathlib import Path

import pytest
import shardkit
from test_data_pipeline import make_cfg

from kitdist.data import ResumeError, TrainStream
from kitdist.data.stream_state import DataProblems, StreamState

V1_STATES = json.loads((Path(__file__).parent / "data" / "stream_states_v1.json").read_text())


@pytest.fixture(scope="module")
def clean_set(tmp_path_factory, photo_paths):
    """test_data_pipeline's set, which the saved states were made on (their shard digest checks it)."""
    folder = str(tmp_path_factory.mktemp("clean"))
    return folder, shardkit.write_set(folder, photo_paths, [7, 9, 8, 6, 10, 8], tile=64)


def described(stream: TrainStream, count: int) -> list[dict]:
    """What make_stream_states_v1.py recorded of each batch: keys, epoch and a digest of the pixels."""
    out = []
    for batch in islice(iter(stream), count):
        pixels = batch["input"].numpy().tobytes() + batch["target"].numpy().tobytes()
        digest = hashlib.sha256(pixels).hexdigest()[:16]
        out.append({"keys": batch["keys"], "epoch": batch["epoch"], "pixels": digest})
    return out


def resumed(folder: str, case: dict, world: int) -> list[TrainStream]:
    cfg = make_cfg(folder, num_workers=2, **case["data"])
    return [TrainStream(cfg, rank, world, resume=case["states"]) for rank in range(world)]


@pytest.mark.parametrize("name", ["one_rank_mid_epoch", "two_ranks_mid_epoch"])
def test_old_states_resume_exactly(clean_set, name):
    folder, _ = clean_set
    case = V1_STATES[name]
    streams = resumed(folder, case, case["world_size"])
    for stream, expected in zip(streams, case["next"], strict=True):
        assert described(stream, len(expected)) == expected  # the batches the old code yielded next


def test_old_states_resume_elastically(clean_set):
    folder, keys = clean_set
    case = V1_STATES["two_ranks_mid_epoch"]  # 2 ranks x 3 batches of 2 read: 36 samples left in epoch 0
    (stream,) = resumed(folder, case, 1)
    rest = [key for batch in islice(iter(stream), 11) for key in batch["keys"] if batch["epoch"] == 0]
    before = [key for rank in case["read"] for batch in rank for key in batch["keys"]]
    assert Counter(before + rest) == Counter(keys)  # the epoch: nothing repeated, nothing lost


def test_old_resampled_state_resumes_with_its_count(clean_set):
    folder, _ = clean_set
    case = V1_STATES["resampled"]
    (stream,) = resumed(folder, case, 1)
    assert len(described(stream, 2)) == 2
    assert stream.state().batches == case["states"][0]["batches"] + 2


def test_state_json_round_trips_and_reads_the_old_format_as_one_stream_per_rank(clean_set):
    folder, _ = clean_set
    stream = TrainStream(make_cfg(folder, num_workers=2, global_batch_size=8), 0, 1, micro_batch=4)
    list(islice(iter(stream), 13))  # into the second epoch
    tree = json.loads(json.dumps(stream.state_dict()))
    assert tree["format"] == "kitdist-stream/2" and (tree["micro_batch"], tree["streams"]) == (4, 2)
    assert StreamState.from_json(tree, 0) == stream.state()
    old = V1_STATES["two_ranks_mid_epoch"]["states"][1]
    new = StreamState.from_json(old, 1).to_json()
    assert (new["grad_accum"], new["micro_batch"], new["streams"]) == (1, old["batch_size"], 2)
    assert {k: v for k, v in new.items() if k in old and k != "format"} == {
        k: v for k, v in old.items() if k not in ("format", "batch_size")
    }


def test_problems_add_up_per_shard_and_kind():
    first = DataProblems({"a.tar": {"corrupt": 1}}, {"b.tar": "truncated"})
    second = DataProblems({"a.tar": {"corrupt": 2, "missing": 1}, "b.tar": {"missing": 3}}, {"c.tar": "gone"})
    total = DataProblems.total([first, second, DataProblems()])
    assert total.counts == {"a.tar": {"corrupt": 3, "missing": 1}, "b.tar": {"missing": 3}}
    assert total.damaged == {"b.tar": "truncated", "c.tar": "gone"}
    assert first.counts == {"a.tar": {"corrupt": 1}}  # the parts are left as they were


def test_a_broken_state_is_refused_naming_the_entry(clean_set):
    folder, _ = clean_set
    cfg = make_cfg(folder, num_workers=2)
    state = json.loads(json.dumps(V1_STATES["one_rank_mid_epoch"]["states"][0]))
    del state["workers"][1]["pointer"]
    with pytest.raises(ResumeError, match="entry 0 is not a complete stream state.*pointer"):
        TrainStream(cfg, 0, 1, resume=[state])
    with pytest.raises(ResumeError, match="entry 0 is not a kitdist-stream/2 stream state.*kitdist-stream/0"):
        TrainStream(cfg, 0, 1, resume=[{**state, "format": "kitdist-stream/0"}])
    current = TrainStream(cfg, 0, 1).state_dict()
    with pytest.raises(ResumeError, match="entry 0 has 2 slots and streams=3"):
        TrainStream(cfg, 0, 1, resume=[{**current, "streams": 3}])
