"""kitdist.batching, the one home of micro-batch arithmetic, and kitdist.memory: the micro-batch and accumulation derived
from the world size, the cap and the memory budget; the resume rule; the progressive schedule's phases;
every refusal naming its key; the memory estimate on fake tensors. Fast: no Ray, no training."""

from __future__ import annotations

import math

import pytest
import shardkit

from kitdist.batching import GIB, describe_plans, lr_scale, phases, plan_at, plan_run
from kitdist.config import ConfigError, ModelConfig, load_config
from kitdist.memory import activation_bytes, budget_bytes, estimate_memory, estimator
from kitdist.preflight import describe_batches

SCHEDULE = (
    "data.schedule=[{step: 0, crop_size: 32, global_batch_size: 16}, {step: 4, crop_size: 64, "
    "global_batch_size: 8}, {step: 8, crop_size: 96}]"
)


def config(*overrides: str):
    return load_config(None, ["model.size=debug", *overrides])


def decisions(world: int, *overrides: str) -> tuple[int, int]:
    plan = plan_run(config(f"dist.num_workers={world}", *overrides), world)[0]
    assert plan.world_size * plan.grad_accum * plan.micro_batch == plan.phase.global_batch_size
    return plan.micro_batch, plan.grad_accum


@pytest.mark.parametrize(
    ("world", "uncapped", "capped"),
    [(1, (64, 1), (4, 16)), (2, (32, 1), (4, 8)), (8, (8, 1), (4, 2)), (64, (1, 1), (1, 1))],
)
def test_the_same_recipe_on_1_2_8_and_64_workers(world, uncapped, capped):
    assert decisions(world, "data.global_batch_size=64") == uncapped
    assert decisions(world, "data.global_batch_size=64", "train.max_micro_batch=4") == capped


def test_the_micro_batch_is_the_largest_divisor_within_the_cap():
    assert decisions(2, "data.global_batch_size=48", "train.max_micro_batch=5") == (4, 6)
    assert decisions(1, "data.global_batch_size=7", "train.max_micro_batch=6") == (1, 7)


def test_a_positive_grad_accum_steps_still_fixes_the_accumulation():
    assert decisions(2, "data.global_batch_size=16", "train.grad_accum_steps=2") == (4, 2)
    # the default derives: without a cap or budget, what an old config's default of 1 gave
    assert load_config(None, []).train.grad_accum_steps == 0
    assert decisions(2, "data.global_batch_size=16") == (8, 1)


def test_the_memory_budget_picks_the_largest_micro_batch_that_fits():
    cfg = config("data.global_batch_size=16", "dist.num_workers=1", "data.crop_size=64")
    memory = estimate_memory(cfg, 64, 1)
    budget = (memory.total(4) + memory.total(8)) // 2
    plan = plan_run(cfg, 1, budget, estimate=estimator(cfg, 1))[0]
    assert (plan.micro_batch, plan.grad_accum) == (4, 4) and plan.memory == memory


def test_a_budget_is_the_one_stated_and_none_on_a_cpu():
    import torch

    assert budget_bytes(config(), torch.device("cpu")) is None
    assert budget_bytes(config("train.memory_budget_gb=1.5"), torch.device("cpu")) == int(1.5 * GIB)


def test_an_elastic_resume_keeps_the_micro_batch_and_doubles_the_accumulation():
    cfg = config("data.global_batch_size=8", "dist.num_workers=2", "train.max_steps=20")
    assert (plan_run(cfg, 2)[0].micro_batch, plan_run(cfg, 1)[0].micro_batch) == (4, 8)
    resumed = plan_run(cfg, 1, resumed=(10, 4))[0]
    assert (resumed.micro_batch, resumed.grad_accum) == (4, 2)
    capped = config("data.global_batch_size=8", "train.max_micro_batch=2", "train.max_steps=20")
    assert plan_run(capped, 1, resumed=(10, 4))[0].micro_batch == 2  # no longer allowed: derived again
    assert plan_run(cfg, 1, resumed=(10, 3))[0].micro_batch == 8  # no longer divides: derived again


def test_a_resume_keeps_the_micro_batch_only_inside_the_checkpoints_phase():
    cfg = config(SCHEDULE, "dist.num_workers=1", "train.max_steps=12")
    inside = plan_run(cfg, 1, resumed=(2, 8))
    assert [p.micro_batch for p in inside] == [8, 8, 8]
    at_change = plan_run(cfg, 1, resumed=(4, 4))  # step 4 ends phase 0: phase 1 is planned afresh
    assert [p.micro_batch for p in at_change] == [16, 8, 8]
    assert [p.micro_batch for p in plan_run(cfg, 1, resumed=(5, 4))] == [16, 4, 8]


def test_schedule_phases_steps_inheritance_and_unreached_points():
    cfg = config(SCHEDULE, "dist.num_workers=2", "train.max_steps=12")
    found = [(p.first, p.last, p.crop_size, p.global_batch_size) for p in phases(cfg)]
    assert found == [(1, 4, 32, 16), (5, 8, 64, 8), (9, 12, 96, 8)]
    plans = plan_run(cfg, 2)
    assert [plan_at(plans, step).phase.crop_size for step in (1, 4, 5, 8, 9, 12)] == [32, 32, 64, 64, 96, 96]
    short = config(SCHEDULE, "train.max_steps=6")  # a smoke run never reaches step 8's point
    assert [p.crop_size for p in phases(short)] == [32, 64]
    plain = config("data.crop_size=64", "data.global_batch_size=4", "train.max_steps=5")
    assert [(p.first, p.last, p.crop_size, p.global_batch_size) for p in phases(plain)] == [(1, 5, 64, 4)]


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        (["data.global_batch_size=6", "dist.num_workers=4"], "data.global_batch_size"),
        (
            [SCHEDULE.replace("global_batch_size: 8", "global_batch_size: 6"), "dist.num_workers=4"],
            "data.schedule[1].global_batch_size",
        ),  # fmt: skip
        ([SCHEDULE.replace("crop_size: 64", "crop_size: 48")], "data.schedule[1].crop_size"),
        ([SCHEDULE.replace("step: 0", "step: 2")], "data.schedule[0].step"),
        ([SCHEDULE.replace("step: 8", "step: 4")], "data.schedule[2].step"),
        (
            ["data.global_batch_size=8", "dist.num_workers=2", "train.grad_accum_steps=3"],
            "train.grad_accum_steps",
        ),
        (
            ["data.global_batch_size=8", "train.grad_accum_steps=1", "train.max_micro_batch=2"],
            "train.max_micro_batch",
        ),
        (["train.max_micro_batch=-1"], "train.max_micro_batch"),
        (["train.memory_budget_gb=-1"], "train.memory_budget_gb"),
        (["train.lr_scaling=cube"], "train.lr_scaling"),
    ],
)
def test_a_recipe_that_cannot_run_is_refused_naming_its_key(overrides, key):
    with pytest.raises(ConfigError) as info:
        config("train.max_steps=20", *overrides)
    assert info.value.key == key and str(info.value).startswith(f"command line: {key}:")


def test_a_budget_too_small_for_one_sample_is_refused_with_the_estimate():
    cfg = config("data.crop_size=64", "train.memory_budget_gb=0.001", "dist.num_workers=1")
    one_sample = estimate_memory(cfg, 64, 1).total(1)
    with pytest.raises(
        ConfigError, match=r"train\.memory_budget_gb: 0\.001 GiB .* micro-batch of 1 at 64x64"
    ) as info:
        describe_batches(cfg)
    assert info.value.key == "train.memory_budget_gb" and f"{one_sample / GIB:.3g} GiB" in str(info.value)


def test_the_driver_prints_every_phase():
    cfg = config(SCHEDULE, "dist.num_workers=2", "train.max_steps=6")
    lines = describe_plans(plan_run(cfg, 2, estimate=estimator(cfg, 2))).splitlines()
    assert lines[0].startswith("steps 1..4: crop 32, global batch 16 = micro-batch 8 x accumulation 1 x 2")
    assert lines[1].startswith("steps 5..6: crop 64, global batch 8 = micro-batch 4 x accumulation 1 x 2")
    assert all(" MiB per worker (model states " in line for line in lines) and len(lines) == 2


def test_the_estimate_grows_with_the_crop_and_shrinks_with_activation_checkpointing():
    plain, checkpointed = ModelConfig(size="debug"), ModelConfig(size="debug", checkpoint_activations=True)
    sizes = [activation_bytes(plain, crop, "fp32")[1] for crop in (32, 64, 128)]
    assert sizes[0] < sizes[1] < sizes[2] and 3.5 < sizes[2] / sizes[1] < 4.5  # ~ the pixel count
    assert activation_bytes(checkpointed, 64, "fp32")[1] < sizes[1] / 2
    assert activation_bytes(plain, 64, "bf16")[1] < sizes[1]  # autocast keeps half-size copies


def test_the_estimate_counts_what_autograd_keeps_for_a_real_forward():
    import torch

    from kitdist.model import build_model

    fixed, per_sample, params = activation_bytes(ModelConfig(size="debug"), 32, "fp32")
    model = build_model(ModelConfig(size="debug")).train()
    kept = 0

    def pack(tensor):
        nonlocal kept
        kept += tensor.numel() * tensor.element_size()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        model(torch.rand(3, 3, 32, 32))
    assert kept == fixed + 3 * per_sample and params == sum(p.numel() for p in model.parameters())


def test_zero_stages_shard_the_model_states():
    states = [
        estimate_memory(config(f"dist.zero_stage={stage}"), 32, 4).model_state for stage in (0, 1, 2, 3)
    ]
    params = activation_bytes(ModelConfig(size="debug"), 32, "bf16")[2]
    assert states == [int(params * per) for per in (16, 4 + 4 + 2, 4 + 1 + 2, 1 + 1 + 2)]


def test_lr_scaling_applies_only_when_asked():
    cfg = config(SCHEDULE, "train.max_steps=12")
    assert [lr_scale(cfg, step) for step in (1, 5, 9)] == [1.0, 1.0, 1.0]
    linear = config(SCHEDULE, "train.max_steps=12", "train.lr_scaling=linear")
    assert [lr_scale(linear, step) for step in (4, 5)] == [1.0, 0.5]
    assert lr_scale(config(SCHEDULE, "train.max_steps=12", "train.lr_scaling=sqrt"), 9) == math.sqrt(0.5)


@pytest.fixture(scope="module")
def shards(tmp_path_factory, photo_paths) -> str:
    folder = str(tmp_path_factory.mktemp("batching-shards"))
    shardkit.write_set(folder, photo_paths, [8, 8], tile=64)
    return folder


def test_the_command_refuses_a_budget_too_small_before_ray_starts(tmp_path, shards):
    ray = pytest.importorskip("ray")
    from kitdist.pretrain import main

    was_up = ray.is_initialized()
    with pytest.raises(SystemExit) as info:
        main([f"data.train_shards={shards}", f"storage.root={tmp_path}", "train.memory_budget_gb=0.001"])
    message = str(info.value.code)
    assert message.startswith("error: ") and "train.memory_budget_gb" in message and "estimate" in message
    assert "\n" not in message and ray.is_initialized() == was_up
