"""TrainStream and val_batches on real photographs: batches, exact resume, elastic resume, workers."""

from __future__ import annotations

import json
import random
from collections import Counter
from itertools import islice

import pytest
import shardkit
import torch

from kitdist.config import ConfigError, DataConfig, DistConfig, RunConfig, TrainConfig
from kitdist.data import ResumeError, TrainStream, val_batches


def make_cfg(shards: str, **data) -> RunConfig:
    defaults = {"train_shards": shards, "val_shards": shards, "global_batch_size": 4, "num_workers": 0}
    defaults.update(shuffle_buffer=4, crop_size=32)
    defaults.update(data)
    return RunConfig(data=DataConfig(**defaults), train=TrainConfig(seed=7), dist=DistConfig(num_workers=1))


@pytest.fixture(scope="module")
def clean_set(tmp_path_factory, photo_paths):
    folder = str(tmp_path_factory.mktemp("clean"))
    keys = shardkit.write_set(folder, photo_paths, [7, 9, 8, 6, 10, 8], tile=64)  # 48 samples, uneven shards
    return folder, keys


def take(stream: TrainStream, count: int) -> list[dict]:
    return list(islice(iter(stream), count))


def run_with_stops(cfg: RunConfig, worlds: list[int], stops: list[int]) -> list[list[dict]]:
    """Runs ranks side by side, `stops[i]` steps with world size `worlds[i]`, resuming from the gathered
    states each time; returns every rank's batches per leg."""
    resume = None
    legs = []
    for world, steps in zip(worlds, stops, strict=True):
        streams = [TrainStream(cfg, rank, world, resume=resume) for rank in range(world)]
        legs.append([take(stream, steps) for stream in streams])
        resume = json.loads(json.dumps([stream.state_dict() for stream in streams]))  # as a checkpoint would
    return legs


def flat(batches: list[dict]) -> list[tuple[str, bytes]]:
    """(key, exact bytes of its input and target) of every sample, in order."""
    out = []
    for batch in batches:
        for index, key in enumerate(batch["keys"]):
            pixels = torch.cat([batch["input"][index], batch["target"][index]]).numpy().tobytes()
            out.append((key, pixels))
    return out


def test_batches_are_model_ready(clean_set):
    folder, keys = clean_set
    cfg = make_cfg(folder, global_batch_size=8)
    batches = take(TrainStream(cfg, rank=0, world_size=2), 4)
    for batch in batches:
        assert batch["input"].shape == batch["target"].shape == (4, 3, 32, 32)
        assert batch["input"].dtype == torch.float32
        assert 0.0 <= batch["target"].min() and batch["target"].max() <= 1.0
        assert not torch.equal(batch["input"], batch["target"])  # noise with sigma ~ U[0, 50]
        assert set(batch["keys"]) <= set(keys) and batch["epoch"] == 0


def test_one_epoch_covers_every_sample_once_across_ranks(clean_set):
    folder, keys = clean_set
    cfg = make_cfg(folder, global_batch_size=8)  # 48 samples, 2 ranks x 4: 6 batches per rank
    (ranks,) = run_with_stops(cfg, [2], [6])
    seen = [key for batches in ranks for key, _ in flat(batches)]
    assert Counter(seen) == Counter(keys)
    assert all(batch["epoch"] == 0 for batches in ranks for batch in batches)


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_at_random_steps_repeats_the_uninterrupted_run(clean_set, workers):
    folder, _ = clean_set
    cfg = make_cfg(folder, num_workers=workers)
    total = 30  # 2.5 epochs of 12 batches
    (reference,) = run_with_stops(cfg, [1], [total])
    rng = random.Random(workers)
    cuts = sorted(rng.sample(range(1, total), 3))
    legs = run_with_stops(cfg, [1] * 4, [b - a for a, b in zip([0] + cuts, cuts + [total], strict=True)])
    resumed = [batch for leg in legs for batch in leg[0]]
    assert flat(resumed) == flat(reference[0])  # same keys, crops, flips and noise, bit for bit
    assert [b["epoch"] for b in resumed] == [b["epoch"] for b in reference[0]]


def test_workers_zero_and_two_serve_the_same_samples(clean_set):
    folder, _ = clean_set
    by_workers = {}
    for workers in (0, 2):
        (ranks,) = run_with_stops(make_cfg(folder, num_workers=workers), [1], [12])
        by_workers[workers] = sorted(flat(ranks[0]))
    assert by_workers[0] == by_workers[2]  # every sample, same crop and noise; the order may differ


@pytest.mark.parametrize("worlds", [(2, 1), (1, 2)])
def test_elastic_resume_sees_every_sample_of_the_epoch_once(clean_set, worlds):
    folder, keys = clean_set
    cfg = make_cfg(folder, global_batch_size=4, num_workers=2)  # the micro-batch follows the world size
    first, second = worlds
    stop = 5 if first == 1 else 3  # mid-epoch, odd so the two workers stand at different places
    legs = run_with_stops(cfg, [first, second], [stop, (48 - 4 * stop) // 4 + 2])
    per_rank = [Counter(b["epoch"] for b in batches) for batches in legs[1]]
    assert len({counts[0] for counts in per_rank}) == 1, f"ranks got different batch counts: {per_rank}"
    seen = [key for leg in legs for batches in leg for b in batches if b["epoch"] == 0 for key in b["keys"]]
    assert Counter(seen) == Counter(keys)  # nothing repeated, nothing lost


def test_every_rank_gets_the_same_number_of_batches(clean_set):
    folder, _ = clean_set
    cfg = make_cfg(folder, global_batch_size=12, num_workers=2)  # 48 / (3 ranks x 4) = 4 batches per rank
    (ranks,) = run_with_stops(cfg, [3], [10])
    per_rank = [Counter(b["epoch"] for b in batches) for batches in ranks]
    assert all(counts == Counter({0: 4, 1: 4, 2: 2}) for counts in per_rank), per_rank


def test_too_small_a_set_for_the_ranks_and_workers_is_named(clean_set):
    folder, _ = clean_set
    cfg = make_cfg(folder, global_batch_size=32, num_workers=2)  # 48 samples: 1 batch per rank, 2 workers
    with pytest.raises(ConfigError, match="data.train_shards.*data.num_workers=2"):
        TrainStream(cfg, 0, 2)


def test_resume_from_another_seed_is_refused(clean_set):
    folder, _ = clean_set
    stream = TrainStream(make_cfg(folder), 0, 1)
    take(stream, 2)
    state = stream.state_dict()
    state["seed"] = 99
    with pytest.raises(ResumeError, match="seed"):
        TrainStream(make_cfg(folder), 0, 1, resume=[state])


def test_validation_is_split_disjointly_and_deterministic(clean_set):
    folder, keys = clean_set
    cfg = make_cfg(folder, num_workers=2)
    parts = [list(val_batches(cfg, rank, 3)) for rank in range(3)]
    seen = [b["keys"][0] for part in parts for b in part]
    assert seen == keys  # manifest order, each sample once
    assert all(b["input"].shape == (1, 3, 64, 64) for part in parts for b in part)
    again = list(val_batches(cfg, 1, 3))
    assert all(torch.equal(a["input"], b["input"]) for a, b in zip(parts[1], again, strict=True))
    tiles = list(val_batches(make_cfg(folder, val_crop_size=32, max_val_samples=5), 0, 1))
    assert [b["target"].shape for b in tiles] == [(1, 3, 32, 32)] * 5


def test_kind_mismatch_names_the_key(clean_set):
    folder, _ = clean_set
    with pytest.raises(ConfigError, match="data.kind"):
        TrainStream(make_cfg(folder, kind="paired"), 0, 1)


@pytest.fixture(scope="module")
def paired_set(tmp_path_factory, photo_paths):
    folder = str(tmp_path_factory.mktemp("paired"))
    return folder, shardkit.write_set(folder, photo_paths, [8] * 4, kind="paired", tile=64)


def test_paired_crops_are_aligned(paired_set):
    folder, _ = paired_set
    batch = next(iter(TrainStream(make_cfg(folder, kind="paired"), 0, 1)))
    residual = (batch["input"] - batch["target"]) * 255  # the shards' inputs are target + N(0, 25), clipped
    assert 18 < float(residual.std()) < 27  # misaligned crops would differ by image content, far more
    assert abs(float(residual.mean())) < 3


def test_paired_validation_gives_whole_pairs(paired_set):
    folder, keys = paired_set
    batches = list(val_batches(make_cfg(folder, kind="paired"), 0, 1))
    assert [b["keys"][0] for b in batches] == keys
    assert all(b["input"].shape == b["target"].shape == (1, 3, 64, 64) for b in batches)


def test_resampled_mode_draws_shards_and_resumes_without_replaying(clean_set):
    folder, keys = clean_set
    cfg = make_cfg(folder, mode="resampled", num_workers=2)
    stream = TrainStream(cfg, 0, 1)
    first = take(stream, 20)
    assert set(k for b in first for k in b["keys"]) <= set(keys)
    assert (
        Counter(k for b in first for k in b["keys"]).most_common(1)[0][1] > 2
    )  # drawn with replacement: no epoch bounds it
    resumed = take(TrainStream(cfg, 0, 1, resume=[stream.state_dict()]), 4)
    assert flat(resumed) != flat(first[:4])  # a resumed run draws on, it does not start over
