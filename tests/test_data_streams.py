"""Micro-batch streams: the samples of each optimiser step depend on the global batch and the micro-batch,
not on how many ranks share the accumulation, so a recipe reads the same data on any world size and an
elastic resume that keeps the micro-batch continues the very same sequence."""

from __future__ import annotations

import json
from collections import Counter

import pytest
import test_data_pipeline
from test_data_pipeline import flat, make_cfg

from kitdist.config import ConfigError, RunConfig
from kitdist.data import TrainStream

clean_set = test_data_pipeline.clean_set  # the fixture: 48 samples in 6 uneven shards


def run_steps(
    cfg: RunConfig, world: int, steps: int, micro_batch: int, resume: list | None = None
) -> tuple[list[list], list[dict]]:
    """Every rank side by side for `steps` optimiser steps. Returns, per step, the (key, pixels) of each
    micro-batch of every rank in rank order (that is, in stream order), and the gathered states."""
    streams = [TrainStream(cfg, rank, world, resume=resume, micro_batch=micro_batch) for rank in range(world)]
    readers = [iter(stream) for stream in streams]
    accum = streams[0].grad_accum
    per_step = [[flat([next(reader)]) for reader in readers for _ in range(accum)] for _ in range(steps)]
    return per_step, json.loads(json.dumps([stream.state_dict() for stream in streams]))


@pytest.mark.parametrize("mode,workers", [("epoch", 0), ("epoch", 2), ("resampled", 2)])
def test_two_ranks_and_one_rank_accumulating_two_read_the_same_micro_batches(clean_set, mode, workers):
    folder, _ = clean_set
    cfg = make_cfg(folder, global_batch_size=4, num_workers=workers, mode=mode)
    two_ranks, _ = run_steps(cfg, 2, 14, micro_batch=2)  # 48 samples: 12 steps an epoch
    one_rank, _ = run_steps(cfg, 1, 14, micro_batch=2)  # accumulation 2
    assert one_rank == two_ranks  # per step: the same keys, crops and noise, in the same order


@pytest.mark.parametrize("worlds", [(2, 1), (1, 2), (1, 1)])
def test_resume_at_equal_micro_batch_continues_the_uninterrupted_sequence(clean_set, worlds):
    folder, _ = clean_set
    cfg = make_cfg(folder, global_batch_size=4, num_workers=2)
    reference, _ = run_steps(cfg, worlds[0], 14, micro_batch=2)
    before, states = run_steps(cfg, worlds[0], 5, micro_batch=2)  # odd: the parts of each stream differ
    after, _ = run_steps(cfg, worlds[1], 9, micro_batch=2, resume=states)
    assert before + after == reference


def read_in_epoch(cfg: RunConfig, legs: list[tuple[int, int, int]], epoch: int = 0) -> list[str]:
    """Keys of `epoch` read over resumed legs of (world size, micro-batch, steps)."""
    keys, resume = [], None
    for world, micro_batch, steps in legs:
        streams = [TrainStream(cfg, r, world, resume=resume, micro_batch=micro_batch) for r in range(world)]
        readers = [iter(stream) for stream in streams]
        for _ in range(steps):
            for reader in readers:
                for _ in range(streams[0].grad_accum):
                    batch = next(reader)
                    keys += batch["keys"] if batch["epoch"] == epoch else []
        resume = json.loads(json.dumps([stream.state_dict() for stream in streams]))
    return keys


def test_another_micro_batch_mid_epoch_reads_every_position_once(clean_set):
    folder, keys = clean_set
    cfg = make_cfg(folder, global_batch_size=8, num_workers=2)
    # 2 steps of 1 rank x 2 x 4 (16 samples), then 2 ranks x 2 x 2: 4 streams share the 32 left
    seen = read_in_epoch(cfg, [(1, 4, 2), (2, 2, 6)])
    assert Counter(seen) == Counter(keys)


def test_another_micro_batch_loses_only_what_a_fresh_plan_leaves_unassigned(clean_set):
    folder, _ = clean_set
    cfg = make_cfg(folder, global_batch_size=10, num_workers=2)  # 4 steps of 10 an epoch, 8 unassigned
    seen = read_in_epoch(cfg, [(1, 5, 1), (1, 10, 5)])  # 10 read; then 30 + 8 over one stream of 10
    assert len(seen) == len(set(seen)) == 40


def test_a_micro_batch_that_does_not_make_the_global_batch_is_refused(clean_set):
    folder, _ = clean_set
    cfg = make_cfg(folder, global_batch_size=4)
    for layout in ({"micro_batch": 3}, {"micro_batch": 1, "grad_accum": 1}, {"grad_accum": 3}):
        with pytest.raises(ConfigError, match="data.global_batch_size: 4 is not 2 ranks x"):
            TrainStream(cfg, 0, 2, **layout)
    assert TrainStream(cfg, 0, 2, grad_accum=2).micro_batch == 1


def test_a_change_point_after_an_elastic_resume_reads_what_the_uninterrupted_run_reads(clean_set):
    """A progressive schedule's change point (another global batch, micro-batch and crop) replans from
    the streams' positions alone, so it gives the same steps whichever world size reached it."""
    folder, _ = clean_set
    first = make_cfg(folder, global_batch_size=8, num_workers=2, crop_size=32)
    second = make_cfg(folder, global_batch_size=4, num_workers=2, crop_size=64)
    before, states = run_steps(first, 1, 3, micro_batch=4)  # accumulation 2
    after, _ = run_steps(second, 1, 5, micro_batch=2, resume=states)
    start, states = run_steps(first, 1, 2, micro_batch=4)
    elastic, states = run_steps(first, 2, 1, micro_batch=4, resume=states)  # accumulation 1 on 2 ranks
    changed, _ = run_steps(second, 2, 5, micro_batch=2, resume=states)
    assert start + elastic + changed == before + after
