"""Writes `stream_states_v1.json`: TrainStream states in format "kitdist-stream/1", as the code before the
typed stream state (commit cae7b4d) saved them, with what that code yielded next, so that
tests/test_data_state.py proves such checkpoints still resume. Run once, against that code:

    PYTHONPATH=<a checkout of cae7b4d>:tests python tests/data/make_stream_states_v1.py

The shard set is test_data_pipeline's `clean_set` (same photographs, shard sizes, seed and batch).
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from itertools import islice
from pathlib import Path

import shardkit

from kitdist.config import DataConfig, DistConfig, RunConfig, TrainConfig
from kitdist.data import TrainStream
from kitdist.pretrain import photo_paths

OUT = Path(__file__).with_name("stream_states_v1.json")


def make_cfg(shards: str, **data) -> RunConfig:
    defaults = {"train_shards": shards, "val_shards": shards, "global_batch_size": 4, "num_workers": 2}
    defaults.update(shuffle_buffer=4, crop_size=32)
    defaults.update(data)
    return RunConfig(data=DataConfig(**defaults), train=TrainConfig(seed=7), dist=DistConfig(num_workers=1))


def described(batches: list[dict]) -> list[dict]:
    """Keys and a digest of the exact pixels of each batch."""
    out = []
    for batch in batches:
        pixels = batch["input"].numpy().tobytes() + batch["target"].numpy().tobytes()
        digest = hashlib.sha256(pixels).hexdigest()[:16]
        out.append({"keys": batch["keys"], "epoch": batch["epoch"], "pixels": digest})
    return out


def case(folder: str, world: int, steps: int, after: int, **data) -> dict:
    cfg = make_cfg(folder, **data)
    streams = [TrainStream(cfg, rank, world) for rank in range(world)]
    iterators = [iter(stream) for stream in streams]
    read = [described(list(islice(it, steps))) for it in iterators]
    states = [stream.state_dict() for stream in streams]
    following = [described(list(islice(it, after))) for it in iterators]
    return {"data": data, "world_size": world, "states": states, "read": read, "next": following}


def main() -> None:
    with tempfile.TemporaryDirectory() as folder:
        shardkit.write_set(folder, photo_paths(), [7, 9, 8, 6, 10, 8], tile=64)
        cases = {
            "one_rank_mid_epoch": case(folder, 1, 5, 9),
            "two_ranks_mid_epoch": case(folder, 2, 3, 3),
            "resampled": case(folder, 1, 6, 2, mode="resampled"),
        }
    OUT.write_text(json.dumps(cases, indent=1) + "\n")


if __name__ == "__main__":
    main()
