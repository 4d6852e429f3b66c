"""The training path on a CUDA GPU (marked `gpu`, skipped without one; the GPU battery runs them with
DS_ACCELERATOR=cuda): the device made current, fused AdamW, no host synchronisation in a step (CUDA's own
sync debug mode raises on one), bf16 keeping the fp32 residual, fp16 training with dynamic loss scaling in
DDP and DeepSpeed and its scale carried through a checkpoint."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist

from kitdist.config import load_config
from kitdist.model import build_model, flex
from kitdist.train.engine import build_strategy
from kitdist.train.loop import LogWindow, train_step

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


@pytest.fixture(scope="module", autouse=True)
def flex_shapes_of_many_runs():
    """One process runs the Flex shapes of several runs (precisions, batch sizes), more than one training
    process's plan (FLEX_GRAPH_BUDGET; tests/test_flex_cpu.py checks the plan itself)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(flex, "FLEX_GRAPH_BUDGET", 64)
        yield


@pytest.fixture(scope="module")
def nccl_group_of_one():
    from s3server import free_port

    if os.environ.get("DS_ACCELERATOR") != "cuda":
        pytest.skip("DeepSpeed's accelerator is not CUDA here (run with DS_ACCELERATOR=cuda)")
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), RANK="0", WORLD_SIZE="1")
    os.environ.update(LOCAL_RANK="0")
    torch.cuda.set_device(0)
    dist.init_process_group("nccl", rank=0, world_size=1)
    yield torch.device("cuda", 0)
    dist.destroy_process_group()


def strategy_for(device, *overrides: str):
    base = ["model.size=debug", "data.crop_size=64", "data.global_batch_size=4", "dist.num_workers=1"]
    cfg = load_config(None, [*base, "dist.use_gpu=true", "train.warmup_steps=1", "train.lr=1e-3", *overrides])
    torch.manual_seed(0)
    return cfg, build_strategy(cfg, build_model(cfg.model), device)


def batches(device, count: int = 100):
    generator = torch.Generator().manual_seed(1)
    for _ in range(count):
        target = torch.rand(4, 3, 64, 64, generator=generator)
        noisy = target + 0.1 * torch.randn(target.shape, generator=generator)
        yield {"input": noisy.to(device), "target": target.to(device)}


DDP = ("dist.strategy=ddp", "dist.zero_stage=0")
ZERO2 = ("dist.strategy=deepspeed", "dist.zero_stage=2")


def test_device_for_makes_the_gpu_current(monkeypatch):
    from kitdist.distributed.env import device_for

    monkeypatch.setenv("LOCAL_RANK", str(torch.cuda.device_count() - 1))
    device = device_for(load_config(None, ["dist.use_gpu=true"]).dist)
    assert device.type == "cuda" and torch.cuda.current_device() == device.index
    torch.cuda.set_device(0)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_ddp_step_never_synchronises(nccl_group_of_one, precision):
    cfg, strategy = strategy_for(nccl_group_of_one, *DDP, f"train.precision={precision}")
    assert strategy.optimizer.defaults["fused"]
    stream, window = batches(nccl_group_of_one), LogWindow()
    for _ in range(2):  # DDP rebuilds its buckets on step 2, with a blocking device-to-host copy
        train_step(cfg, strategy, stream, window, strategy.grad_accum)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            train_step(cfg, strategy, stream, window, strategy.grad_accum)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(window.loss_sum)


@pytest.mark.parametrize("engine", [DDP, ZERO2])
def test_bf16_output_is_the_fp32_residual(nccl_group_of_one, engine):
    _, strategy = strategy_for(nccl_group_of_one, *engine, "train.precision=bf16")
    with torch.no_grad():
        strategy.module.conv_out.weight.zero_()
        strategy.module.conv_out.bias.zero_()
    x = torch.rand(1, 3, 64, 64, device=nccl_group_of_one) * 0.999 + 1e-4
    output = strategy.forward(x)
    assert output.dtype == torch.float32 and torch.equal(output, x)


@pytest.mark.parametrize("engine", [DDP, ZERO2])
def test_fp16_trains_with_a_dynamic_loss_scale_kept_in_checkpoints(nccl_group_of_one, engine):
    cfg, strategy = strategy_for(nccl_group_of_one, *engine, "train.precision=fp16")
    stream, window = batches(nccl_group_of_one), LogWindow()
    losses = []
    for _ in range(8):
        before = window.loss_sum
        train_step(cfg, strategy, stream, window, strategy.grad_accum)
        losses.append(float(window.loss_sum - before))
    assert all(map(lambda loss: loss == loss and loss < 10, losses)), losses
    assert losses[-1] < losses[0]
    state = strategy.full_state()
    assert state.meta["loss_scale"] and state.meta["loss_scale"] > 1
    _, fresh = strategy_for(nccl_group_of_one, *engine, "train.precision=fp16")
    fresh.load_full_state(state)
    assert fresh.full_state().meta["loss_scale"] == state.meta["loss_scale"]


@pytest.mark.gpu(timeout_s=180)  # inductor compiles the whole model, forward and backward
def test_inductor_compiled_model_trains_like_eager(nccl_group_of_one):
    """`train.compile=true` with inductor (Triton kernels): two bf16 steps give eager's losses (inductor
    told to draw LSH rotations from torch's generator, as eager does)."""
    import torch._inductor.config as inductor_config

    losses = {}
    for compiled in (False, True):
        cfg, strategy = strategy_for(nccl_group_of_one, *DDP, f"train.compile={str(compiled).lower()}")
        torch.manual_seed(5)
        window, found, stream = LogWindow(), [], batches(nccl_group_of_one)
        with inductor_config.patch(fallback_random=True):
            for _ in range(2):
                before = window.loss_sum
                train_step(cfg, strategy, stream, window, strategy.grad_accum)
                found.append(float(window.loss_sum - before))
        losses[compiled] = found
    assert losses[True] == pytest.approx(losses[False], rel=2e-2)
