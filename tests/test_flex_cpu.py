"""KLA's CUDA path (FlexAttention) tested on CPU, forward and backward, against the explicit kernel.

torch refuses Flex's backward on CPU by one Python device check (`flex_attention._validate_device`); the
`flex_backward_on_cpu` fixture (here, never in the package) bypasses it, so torch's dense Flex reference
runs forward and backward on CPU with the project's block mask, score_mod and sequence layout. Checked:
outputs, log-sum-exp and gradients of q, k, v and the bias (count / once, look-back, padded tails), the
whole `debug` model with attention_impl=flex equal to explicit, the compile plan (graphs counted with the
aot_eager backend for a `kit`-shaped forward and backward at two image sizes) and its budget error, and
the head-size check on the driver."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend
from torch.nn.attention import flex_attention as torch_flex

from kitdist.config import ConfigError, ModelConfig
from kitdist.model import build_model, flex, sizes
from kitdist.model.attention import KNNLocalAttention
from kitdist.model.kernels import explicit_attention


@pytest.fixture
def flex_backward_on_cpu(monkeypatch):
    """Lets torch's dense Flex reference run backward on CPU (tests only)."""
    assert hasattr(torch_flex, "_validate_device"), "torch moved Flex's device check: update this fixture"
    monkeypatch.setattr(torch_flex, "_validate_device", lambda *tensors: None)


def explicit_on_sequences(q, k, v, bias, scale, chunk_size, look_back, pair_bias):
    """The explicit chunk kernel on Flex's sequences `[S, h, C*k*P, d]`: chunks as a batch."""
    sequences, heads, length, dim = q.shape
    chunk_pixels = chunk_size * bias.shape[-1]
    chunks = length // chunk_pixels

    def cut(t):
        return t.view(sequences, heads, chunks, chunk_pixels, dim).transpose(1, 2).flatten(0, 1)

    cq, ck, cv = cut(q), cut(k), cut(v)
    if look_back:
        ck, cv = (KNNLocalAttention._with_previous_chunk(t, sequences, chunks) for t in (ck, cv))
    if pair_bias is not None:  # [S, h, Np, Kp] -> [S*C, h, k, Kp]
        pair_bias = pair_bias.view(sequences, heads, chunks, chunk_size, -1).transpose(1, 2).flatten(0, 1)
    out, lse = explicit_attention(cq, ck, cv, bias, scale, True, pair_bias)
    out = out.view(sequences, chunks, heads, chunk_pixels, dim).transpose(1, 2).reshape(q.shape)
    return out, lse.view(sequences, chunks, heads, chunk_pixels).transpose(1, 2).reshape(q.shape[:-1])


@pytest.mark.parametrize("look_back, once", [(False, False), (True, True)], ids=["count", "look_back,once"])
def test_flex_kernel_equals_the_explicit_kernel_forward_and_backward(flex_backward_on_cpu, look_back, once):
    torch.manual_seed(0)
    sequences, heads, chunk_size, chunks, pixels, dim = 3, 2, 4, 5, 16, 16
    length = chunks * chunk_size * pixels
    inputs = [torch.randn(sequences, heads, length, dim, dtype=torch.float64) for _ in range(3)]
    inputs.append(torch.randn(heads, pixels, pixels, dtype=torch.float64))  # the in-patch bias
    key_slots = 2 * chunk_size if look_back else chunk_size
    pair = -torch.rand(sequences, heads, chunks * chunk_size, key_slots, dtype=torch.float64)
    pair = pair if once else None
    weights = torch.randn(sequences, heads, length, dim, dtype=torch.float64)
    results = []
    for attend in (flex.flex_attention, explicit_on_sequences):
        leaves = [t.clone().requires_grad_() for t in inputs]
        out, lse = attend(*leaves[:3], leaves[3], 0.25, chunk_size, look_back, pair)
        loss = (out * weights).sum() + lse.sin().sum()  # the lse's gradient flows, as the round merge's does
        results.append((out, lse, torch.autograd.grad(loss, leaves)))
    (out, lse, grads), (ref_out, ref_lse, ref_grads) = results
    torch.testing.assert_close(out, ref_out, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(lse.double(), ref_lse.double(), atol=1e-6, rtol=1e-6)
    for name, grad, ref_grad in zip("qkv" + "b", grads, ref_grads, strict=True):
        torch.testing.assert_close(grad, ref_grad.to(grad.dtype), atol=1e-5, rtol=1e-5, msg=name)


# (the debug model's test below covers count, no look-back, 64-pixel chunks)
LAYER_OPTIONS = [
    dict(hash_rounds=2, chunk_size=5, duplicate_keys="once"),  # 24 patches in 5 chunks of 5: a pad slot
    dict(hash_rounds=3, look_back=True, chunk_size=7),  # 4 chunks of 7: 4 pad slots; 112-pixel chunks
]


@pytest.mark.parametrize("options", LAYER_OPTIONS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()))
def test_flex_layer_equals_the_explicit_layer_forward_and_backward(flex_backward_on_cpu, options):
    torch.manual_seed(0)
    options = {"chunk_size": 4, **options}
    explicit = KNNLocalAttention(32, 2, patch_size=4, attention_impl="explicit", **options)
    with torch.no_grad():
        explicit.bias_table.normal_(std=0.5)  # a bias big enough to matter
    flexed = copy.deepcopy(explicit)
    flexed.attention_impl = "flex"
    x = torch.randn(2, 16, 24, 32)
    results = []
    for layer in (flexed, explicit):
        inputs = x.clone().requires_grad_()
        torch.manual_seed(5)  # the same rotations for both
        out = layer(inputs)
        results.append((out, torch.autograd.grad(out.sin().sum(), [inputs, *layer.parameters()])))
    assert flexed.last_kernel == "flex" and explicit.last_kernel == "explicit"
    (out, grads), (ref_out, ref_grads) = results
    torch.testing.assert_close(out, ref_out, atol=2e-5, rtol=1e-4)
    names = ["input", *(name for name, _ in explicit.named_parameters())]
    for name, grad, ref_grad in zip(names, grads, ref_grads, strict=True):
        torch.testing.assert_close(grad, ref_grad, atol=1e-4, rtol=1e-3, msg=name)


def test_debug_model_with_flex_equals_explicit_forward_and_backward(flex_backward_on_cpu):
    torch.manual_seed(0)
    explicit = build_model(ModelConfig(size="debug", attention_impl="explicit"))
    flexed = build_model(ModelConfig(size="debug", attention_impl="flex"))
    flexed.load_state_dict(explicit.state_dict())
    x = torch.rand(1, 3, 32, 32)
    results = []
    for model in (flexed, explicit):
        torch.manual_seed(7)
        out = model(x)
        results.append((out, torch.autograd.grad(out.square().mean(), list(model.parameters()))))
    kernels = {module.last_kernel for module in flexed.modules() if isinstance(module, KNNLocalAttention)}
    assert kernels == {"flex", "sdpa"}  # the k = 1 bottleneck runs fused SDPA on the CUDA path
    (out, grads), (ref_out, ref_grads) = results
    torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=1e-4)
    for (name, _), grad, ref_grad in zip(explicit.named_parameters(), grads, ref_grads, strict=True):
        torch.testing.assert_close(grad, ref_grad, atol=1e-5, rtol=1e-3, msg=name)


@pytest.fixture
def counted_cpu_compiles(monkeypatch, flex_backward_on_cpu):
    """Flex on CPU compiled by aot_eager through the project's plan, graphs counted; a fresh plan."""
    counter = CompileCounterWithBackend("aot_eager")
    monkeypatch.setitem(flex.COMPILE_BACKENDS, "cpu", counter)
    monkeypatch.setattr(flex, "_COMPILED_SIGNATURES", {})
    torch._dynamo.reset()
    yield counter
    torch._dynamo.reset()


def test_kit_shaped_training_compiles_the_planned_graphs_once(counted_cpu_compiles):
    # kit's heads (3, 6, 12 at levels 1-3, 16 channels each), its chunking and two rounds; fewer blocks
    size = dataclasses.replace(sizes.SIZES["kit"], encoder_blocks=(1, 1, 1), bottleneck_blocks=1,
                               decoder_blocks=(1, 1, 1), ffn_ratio=1.0)  # fmt: skip
    sizes.SIZES["kit_plan"] = size
    try:
        model = build_model(ModelConfig(size="kit_plan", attention_impl="flex"))
    finally:
        del sizes.SIZES["kit_plan"]
    for height, width in ((32, 32), (32, 64), (32, 32)):
        model(torch.rand(1, 3, height, width)).mean().backward()
    # 3 graphs per image size (levels 1-3, forward and backward together; the k = 1 bottleneck is SDPA),
    # the second step at a size compiles nothing
    assert counted_cpu_compiles.frame_count == 6
    assert len(flex._COMPILED_SIGNATURES[counted_cpu_compiles]) == 6


def test_a_graph_beyond_the_budget_is_an_error_not_eager_flex(counted_cpu_compiles, monkeypatch):
    monkeypatch.setattr(flex, "FLEX_GRAPH_BUDGET", 2)
    bias = torch.randn(1, 16, 16)
    with torch.no_grad():
        for chunks in (1, 2, 1):
            q = torch.randn(1, 1, chunks * 64, 16)
            flex.flex_attention(q, q, q, bias, 0.25, 4, False)
        with pytest.raises(flex.FlexCompileBudgetError, match="FLEX_GRAPH_BUDGET"):
            q = torch.randn(1, 1, 3 * 64, 16)
            flex.flex_attention(q, q, q, bias, 0.25, 4, False)
    assert counted_cpu_compiles.frame_count == 2


def test_heads_under_16_channels_are_refused_on_the_driver_where_flex_can_run(monkeypatch):
    monkeypatch.setitem(sizes.SIZES, "narrow", dataclasses.replace(sizes.SIZES["debug"], head_dim=8))
    for impl in ("auto", "flex"):
        with pytest.raises(ConfigError, match="head_dim=8") as err:
            sizes.resolve_size(ModelConfig(size="narrow", attention_impl=impl))
        assert err.value.key == "model.size"
    assert sizes.resolve_size(ModelConfig(size="narrow", attention_impl="explicit")).head_dim == 8
