"""KLA on CUDA (marked `gpu`, skipped without a device): `auto` must run the compiled Flex kernel (a silent
fallback to eager Flex or another kernel fails), Flex equals the float64 union reference in values and
gradients, its lse is exact in fp16 on peaked logits, and launches beyond CUDA's grid limit are split."""

from __future__ import annotations

import warnings

import pytest
import torch
from test_attention import OPTIONS, make_kla, run_both

from kitdist.model import flex
from kitdist.model.flex import flex_attention
from kitdist.model.kernels import reference_attention, run_in_slices, sdpa_attention

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]
# What CUDA's lowering of the Flex path can get wrong, one compile each (tests/test_flex_cpu.py checks
# every option against the explicit kernel on CPU): whole 64-pixel blocks, 80- and 112-pixel chunks in
# 16-pixel blocks with padded tails, 16-pixel chunks (k = 1), look-back, the duplicate-key bias ("once"),
# crowded buckets.
CUDA_CASES = [
    (OPTIONS[1], "count"),
    (OPTIONS[3], "once"),
    (OPTIONS[4], "count"),
    (OPTIONS[5], "count"),
    (OPTIONS[6], "once"),
    (OPTIONS[7], "once"),
]


@pytest.fixture(scope="module", autouse=True)
def flex_shapes_of_many_layers():
    """One process compiles Flex for every layer shape here, more than one training process's plan
    (FLEX_GRAPH_BUDGET; tests/test_flex_cpu.py checks the plan itself)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(flex, "FLEX_GRAPH_BUDGET", 64)
        yield


def test_auto_runs_the_compiled_flex_kernel_on_cuda():
    kla = make_kla("auto", dim=32, hash_rounds=2).cuda()  # heads of 16: CUDA Flex refuses less
    x = torch.randn(2, 64, 64, 32, device="cuda", requires_grad=True)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*without torch.compile.*")  # eager Flex = a slow fallback
        kla(x).sum().backward()
    assert kla.last_kernel == "flex"
    assert x.grad is not None and torch.isfinite(x.grad).all()
    bottleneck = make_kla("auto", dim=32, chunk_size=1).cuda()
    bottleneck(x)
    assert bottleneck.last_kernel == "sdpa"  # k = 1: fused SDPA, no lse needed


@pytest.mark.parametrize(
    "options, duplicate_keys",
    CUDA_CASES,
    ids=[",".join([*(f"{k}={v}" for k, v in o.items()), d]) for o, d in CUDA_CASES],
)
def test_flex_equals_the_union_softmax_on_cuda(options, duplicate_keys):
    (out, grads), (ref_out, ref_grads) = run_both("flex", options, duplicate_keys, device="cuda", dim=32)
    torch.testing.assert_close(out, ref_out, atol=1e-4, rtol=1e-3)  # TF32 may round the matmuls
    for grad, ref_grad in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(grad, ref_grad, atol=1e-3, rtol=1e-2)


def test_flex_bf16_stays_within_tolerance_of_the_float64_union():
    (out, _), (ref_out, _) = run_both("flex", dict(hash_rounds=3, look_back=True), dtype=torch.bfloat16,
                                      device="cuda", dim=32)  # fmt: skip
    torch.testing.assert_close(out, ref_out, atol=3e-2, rtol=3e-2)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_flex_lse_is_exact_on_peaked_logits(dtype):
    torch.manual_seed(0)
    q, k, v = (torch.randn(6, 2, 128, 16, device="cuda").mul(4).to(dtype) for _ in range(3))
    bias = torch.randn(2, 16, 16, device="cuda")
    out, lse = flex_attention(q, k, v, bias, 0.25, 4, False)  # chunks of 4 patches = 64 pixels

    def chunks(t):  # [6, 2, 128, d] -> [12, 2, 64, d]: one row per chunk, as the chunk kernels take them
        return t.double().view(6, 2, 2, 64, -1).transpose(1, 2).flatten(0, 1)

    ref_out, ref_lse = reference_attention(chunks(q), chunks(k), chunks(v), bias.double(), 0.25, True)
    ref_lse = ref_lse.view(6, 2, 2, 64).transpose(1, 2).reshape(6, 2, 128)
    ref_out = ref_out.view(6, 2, 2, 64, -1).transpose(1, 2).reshape(q.shape)
    torch.testing.assert_close(lse.double(), ref_lse, atol=2e-2, rtol=1e-3)  # inputs' rounding only
    torch.testing.assert_close(out.double(), ref_out, atol=5e-2, rtol=2e-2)


def test_launches_beyond_the_grid_limit_are_split():
    bias = torch.randn(1, 16, 16, device="cuda")
    q = torch.randn(70_000, 1, 16, 16, device="cuda", dtype=torch.bfloat16)
    out, _ = run_in_slices(sdpa_attention, q, q, q, bias, 0.25, False)
    assert out.shape == q.shape and torch.isfinite(out).all()
    seq = torch.randn(40_000, 2, 64, 16, device="cuda", dtype=torch.bfloat16)  # batch x heads = 80,000
    out, lse = flex_attention(seq, seq, seq, torch.randn(2, 16, 16, device="cuda"), 0.25, 4, False)
    assert out.shape == seq.shape and torch.isfinite(lse).all()
