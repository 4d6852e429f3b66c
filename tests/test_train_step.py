"""One training step through each strategy, in this process (a gloo group of one; real DeepSpeed on CPU,
DS_ACCELERATOR=cpu from conftest): mixed precision keeps the network's input, global residual and output
in fp32; gradients are reduced in fp32 unless asked otherwise; a step reads nothing back from the device;
`train.compile` trains like eager; the world-size-independent state of DDP and ZeRO-1..3 round-trips
into a fresh strategy that then takes the same step; what each precision decides."""

from __future__ import annotations

import os
import traceback

import pytest
import torch
import torch.distributed as dist
from torch.overrides import TorchFunctionMode

from kitdist.config import load_config
from kitdist.model import build_model
from kitdist.train.engine import build_strategy
from kitdist.train.loop import LogWindow, train_step

CPU = torch.device("cpu")
ENGINES = {
    "ddp": ["dist.strategy=ddp", "dist.zero_stage=0"],
    "zero1": ["dist.strategy=deepspeed", "dist.zero_stage=1"],
    "zero2": ["dist.strategy=deepspeed", "dist.zero_stage=2"],
    "zero3": ["dist.strategy=deepspeed", "dist.zero_stage=3"],
}


@pytest.fixture(scope="module")
def group_of_one():
    """A gloo process group of one rank, as a launcher would leave it (DeepSpeed needs one)."""
    from s3server import free_port

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), RANK="0", WORLD_SIZE="1")
    os.environ.update(LOCAL_RANK="0")  # DeepSpeed insists on it
    dist.init_process_group("gloo", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def run_config(*overrides: str):
    base = ["model.size=debug", "data.crop_size=32", "data.global_batch_size=2", "dist.num_workers=1"]
    base += ["train.warmup_steps=1", "train.lr=1e-3"]
    return load_config(None, [*base, *overrides])


def strategy_for(engine: str, *overrides: str, seed: int = 0):
    cfg = run_config(*ENGINES[engine], *overrides)
    torch.manual_seed(seed)
    return cfg, build_strategy(cfg, build_model(cfg.model), CPU)


def batches(count: int, seed: int = 1):
    generator = torch.Generator().manual_seed(seed)
    for _ in range(count):
        target = torch.rand(2, 3, 32, 32, generator=generator)
        yield {"input": target + 0.1 * torch.randn(target.shape, generator=generator), "target": target}


@pytest.mark.parametrize("engine", ["ddp", "zero1"])
def test_bf16_keeps_input_residual_and_output_fp32(group_of_one, engine):
    """With the body's last layer zeroed the network is its global residual: under bf16 the output must
    be the fp32 input itself, not the input rounded to bf16 (DeepSpeed's own bf16 mode rounds it)."""
    _, strategy = strategy_for(engine, "train.precision=bf16")
    with torch.no_grad():
        strategy.module.conv_out.weight.zero_()
        strategy.module.conv_out.bias.zero_()
    x = torch.rand(1, 3, 32, 32) * 0.999 + 1e-4  # values bf16 cannot hold exactly
    assert strategy.input_dtype == torch.float32
    output = strategy.forward(x)
    assert output.dtype == torch.float32
    assert torch.equal(output, x)
    assert next(strategy.module.parameters()).dtype == torch.float32  # fp32 weights, autocast body


def deepspeed_comm_dtypes(strategy) -> set:
    from deepspeed.runtime.torch_autocast import get_comm_dtype

    return {get_comm_dtype(param) for param in strategy.module.parameters()}


def test_gradients_are_reduced_in_fp32_unless_asked(group_of_one):
    _, default = strategy_for("zero2", "train.precision=bf16")
    assert deepspeed_comm_dtypes(default) == {torch.float32}
    _, compressed = strategy_for("zero2", "train.precision=bf16", "train.grad_reduce_dtype=bf16")
    assert torch.bfloat16 in deepspeed_comm_dtypes(compressed)


class HostReads(TorchFunctionMode):
    """Records the tensor methods that copy a value to the host (each a synchronisation on a GPU), with
    the package whose code asked: the innermost frame in kitdist, deepspeed, torch.optim or torch."""

    READS = {torch.Tensor.item, torch.Tensor.tolist, torch.Tensor.__float__, torch.Tensor.__int__,
             torch.Tensor.__bool__, torch.Tensor.numpy, torch.Tensor.cpu}  # fmt: skip
    PACKAGES = (("/torch/optim/", "torch.optim"), ("/deepspeed/", "deepspeed"), ("/kitdist/", "kitdist"),
                ("/torch/", "torch"))  # fmt: skip

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[str, str]] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in self.READS:
            self.calls.append((self._asker(), func.__name__))
        return func(*args, **(kwargs or {}))

    def _asker(self) -> str:
        for frame in reversed(traceback.extract_stack()[:-2]):
            for marker, package in self.PACKAGES:
                if marker in frame.filename:
                    return package
        return "other"

    def by(self, *packages: str) -> list[tuple[str, str]]:
        return [call for call in self.calls if call[0] in packages]


@pytest.mark.parametrize("engine, precision", [("ddp", "fp32"), ("ddp", "bf16"), ("zero2", "bf16")])
def test_a_training_step_reads_nothing_back(group_of_one, engine, precision):
    """Neither kitdist's step nor torch reads from the device (the CPU AdamW reads its own CPU step
    counter; on CUDA the optimiser is fused and reads nothing). DeepSpeed's ZeRO checks its overflow flag
    on the host; the GPU battery counts those (`torch.cuda.set_sync_debug_mode`)."""
    cfg, strategy = strategy_for(engine, f"train.precision={precision}")
    stream, window = batches(3), LogWindow()
    # the first step creates the optimizer state
    train_step(cfg, strategy, stream, window, strategy.grad_accum)
    with HostReads() as reads:
        train_step(cfg, strategy, stream, window, strategy.grad_accum)
        train_step(cfg, strategy, stream, window, strategy.grad_accum)
    assert reads.by("kitdist", "torch", "other") == []
    if engine == "ddp":
        assert reads.by("deepspeed") == []
    assert window.steps == 3 and torch.is_tensor(window.loss_sum)


def test_compiled_model_trains_like_eager(group_of_one, monkeypatch):
    """`train.compile=true`: dynamo captures the debug model's forward and backward (no graph break may
    stop it: `fullgraph`) and two fp32 steps give eager's losses. The backend is aot_eager: inductor's C++
    compilation takes minutes on this CPU (the GPU tests compile with inductor)."""
    import kitdist.train.engine as engine_module

    monkeypatch.setattr(engine_module, "COMPILE_OPTIONS", {"backend": "aot_eager", "fullgraph": True})
    losses = {}
    for compiled in (False, True):
        cfg, strategy = strategy_for("ddp", "train.precision=fp32", f"train.compile={str(compiled).lower()}")
        torch.manual_seed(5)
        window, found, stream = LogWindow(), [], batches(2)
        for _ in range(2):
            before = window.loss_sum
            train_step(cfg, strategy, stream, window, strategy.grad_accum)
            found.append(float(window.loss_sum - before))
        losses[compiled] = found
    assert losses[True] == pytest.approx(losses[False], rel=1e-5)


@pytest.mark.parametrize("engine", ["ddp", "zero2"])
def test_fp16_trains_and_its_loss_scale_survives_checkpoints(group_of_one, engine, tmp_path):
    """fp16 (autocast + dynamic loss scaling; CPU autocast stands in for CUDA's here, so the config is
    told dist.use_gpu=true while the strategy gets the CPU): it trains, and the loss scale goes through
    the world-size-independent state and DeepSpeed's native checkpoint."""
    from kitdist.distributed.strategy import set_loss_scale

    cfg, strategy = strategy_for(engine, "train.precision=fp16", "dist.use_gpu=true")
    stream, window = batches(3), LogWindow()
    for _ in range(3):
        train_step(cfg, strategy, stream, window, strategy.grad_accum)
    assert float(window.loss_sum) == float(window.loss_sum)  # not NaN
    scaler = strategy.scaler if engine == "ddp" else strategy._grad_scaler()
    set_loss_scale(scaler, 1024.0)
    state = strategy.full_state()
    assert state.meta["loss_scale"] == 1024.0
    _, fresh = strategy_for(engine, "train.precision=fp16", "dist.use_gpu=true")
    fresh.load_full_state(state)
    assert fresh.full_state().meta["loss_scale"] == 1024.0
    if engine != "ddp":
        strategy.save_native(str(tmp_path))
        _, native = strategy_for(engine, "train.precision=fp16", "dist.use_gpu=true")
        native.load_native(str(tmp_path))
        assert native._grad_scaler().get_scale() == 1024.0


def assert_same_state(found, expected) -> None:
    assert found.weights.keys() == expected.weights.keys() and found.moments.keys() == expected.moments.keys()
    for name, value in [*expected.weights.items(), *expected.moments.items()]:
        other = found.weights.get(name, found.moments.get(name))
        assert torch.equal(other, value), name
    assert found.meta == expected.meta


@pytest.mark.parametrize("engine", ["ddp", "zero1", "zero2", "zero3"])
def test_full_state_round_trip_gives_the_same_next_step(group_of_one, engine):
    """The world-size-independent state of a strategy that trained two steps, loaded as a resume loads
    it (weights into a fresh model with other initial values, then the state into a fresh strategy):
    the same fp32 weights, Adam moments, optimizer step and schedule, and the same next step."""
    cfg, trained = strategy_for(engine, "train.precision=fp32")
    stream = batches(3)
    for _ in range(2):
        train_step(cfg, trained, stream, LogWindow(), trained.grad_accum)
    state = trained.full_state()
    assert state.moments and state.meta["optimizer_step"] == 2
    torch.manual_seed(1)
    model = build_model(cfg.model)
    model.load_state_dict(state.weights)
    resumed = build_strategy(cfg, model, CPU)
    resumed.load_full_state(state)
    assert_same_state(resumed.full_state(), state)
    batch = next(stream)
    losses, states = [], []
    for strategy in (trained, resumed):
        torch.manual_seed(7)  # the LSH rotations of the step
        window = LogWindow()
        train_step(cfg, strategy, iter([batch]), window, strategy.grad_accum)
        losses.append(float(window.loss_sum))
        states.append(strategy.full_state())
    assert losses[0] == losses[1]
    assert_same_state(states[1], states[0])


@pytest.mark.parametrize(
    "precision, reduce, autocast",
    [("fp32", "fp32", None), ("bf16", "fp32", torch.bfloat16), ("bf16", "bf16", torch.bfloat16)],
)
def test_precision_decides_autocast_and_gradient_reduction_not_inputs(
    group_of_one, precision, reduce, autocast
):
    """Per train.precision: the body runs in the autocast dtype while the input and output stay fp32;
    DeepSpeed reduces gradients in fp32 unless train.grad_reduce_dtype names the precision's dtype (then
    Linear and Conv weights' in it), and DDP registers no compression hook for fp32 (torch's bf16 hook
    needs CUDA and NCCL: the config refuses it on CPU, so DDP's compressed reduction is for the GPU tests)."""
    from kitdist.distributed.deepspeed_strategy import deepspeed_config

    cfg = run_config(*ENGINES["zero1"], f"train.precision={precision}", f"train.grad_reduce_dtype={reduce}")
    section = deepspeed_config(cfg, 1).get("torch_autocast")
    assert (section is None) == (autocast is None)
    if section is not None:
        assert section["dtype"] == str(autocast).removeprefix("torch.")
        assert ("lower_precision_safe_modules" in section) == (reduce == "fp32")
    if reduce != "fp32":
        return
    _, ddp = strategy_for("ddp", f"train.precision={precision}")
    assert ddp.input_dtype == torch.float32 and ddp.autocast_dtype == (autocast or torch.float32)
    seen = []
    ddp.module.conv_in.register_forward_hook(lambda module, args, out: seen.append(out.dtype))
    assert ddp.forward(torch.rand(1, 3, 32, 32)).dtype == torch.float32
    assert seen == [autocast or torch.float32]
    assert getattr(ddp._wrapped, "_comm_hooks", []) == []


def test_fp16_needs_a_gpu():
    from kitdist.config import ConfigError

    with pytest.raises(ConfigError, match="train.precision"):
        run_config("train.precision=fp16")
    assert run_config("train.precision=fp16", "dist.use_gpu=true").train.precision == "fp16"


def test_a_compressed_ddp_all_reduce_needs_gpus():
    from kitdist.config import ConfigError

    with pytest.raises(ConfigError, match="train.grad_reduce_dtype"):
        run_config(
            "train.precision=bf16", "train.grad_reduce_dtype=bf16", "dist.strategy=ddp", "dist.zero_stage=0"
        )
    cfg = run_config("train.precision=bf16", "train.grad_reduce_dtype=bf16", "dist.strategy=deepspeed")
    assert cfg.train.grad_reduce_dtype == "bf16"  # DeepSpeed reduces in bf16 over gloo too


@pytest.mark.parametrize("engine", ["ddp", "zero1", "zero3"])
def test_the_accumulation_changes_between_updates_and_each_update_is_the_whole_batch(group_of_one, engine):
    """`set_batching` between updates (a progressive schedule's phases, an elastic resume): updates of
    4 samples as 1 x 4, 2 x 2 and 4 x 1 micro-batches give the gradient norms and weights of three plain
    4-sample updates (hashing off: the model is then deterministic, whatever the batch is cut into)."""
    deterministic = ["train.precision=fp32", "model.num_buckets=1", "model.bucket_order=position"]
    generator = torch.Generator().manual_seed(3)
    inputs = [torch.rand(4, 3, 32, 32, generator=generator) for _ in range(3)]
    weights, norms = [], []
    for layout in ([(4, 1)] * 3, [(1, 4), (2, 2), (4, 1)]):
        _, strategy = strategy_for(engine, "data.global_batch_size=4", *deterministic)
        for x, (micro, accum) in zip(inputs, layout, strict=True):
            strategy.set_batching(micro, accum)
            for index in range(accum):
                part = x[index * micro : (index + 1) * micro]
                loss = (strategy.forward(part) - part).abs().mean()
                strategy.backward(loss, last_micro_batch=index == accum - 1)
            norms.append(float(strategy.step()))
        weights.append(strategy.full_state().weights)
    assert norms[3:] == pytest.approx(norms[:3], rel=1e-5)  # each update's gradient is the batch mean's
    for name, value in weights[0].items():
        torch.testing.assert_close(weights[1][name], value, rtol=1e-5, atol=1e-6, msg=name)
