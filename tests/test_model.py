"""KiT end to end on CPU: shapes for any input size, gradients, activation checkpointing, hashing randomness,
the calibrated `kit` size, the profile CLI and config errors."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kitdist.config import ConfigError, ModelConfig
from kitdist.model import SIZES, KiT, build_model
from kitdist.model.attention import KNNLocalAttention
from kitdist.model.kit import KTB, pad_to_multiple
from kitdist.model.profile import count_macs, count_module_macs, count_params
from kitdist.model.profile import main as profile_main


def debug_model(**overrides) -> KiT:
    torch.manual_seed(0)
    return build_model(ModelConfig(**{"size": "debug", **overrides}))


@pytest.mark.parametrize("height,width", [(32, 32), (64, 64), (48, 80), (37, 53), (31, 33), (5, 7), (1, 1)])
def test_forward_keeps_shape_for_any_size(height, width):
    model = debug_model().eval()
    image = torch.rand(1, 3, height, width)
    with torch.no_grad():
        restored = model(image)
    assert restored.shape == image.shape
    assert torch.isfinite(restored).all()


def test_reflect_padding_reaches_a_multiple_and_keeps_the_image():
    image = torch.rand(1, 3, 5, 70)
    padded = pad_to_multiple(image, 32)
    assert padded.shape[-2:] == (32, 96)
    assert torch.equal(padded[..., :5, :70], image)
    assert torch.equal(padded[..., 5, :70], image[..., 3, :])  # a reflection, not zeros or a copy of the edge


def test_gradients_reach_every_parameter():
    model = debug_model().train()
    image = torch.rand(2, 3, 32, 32)
    loss = (model(image) - image.flip(-1)).abs().mean()
    loss.backward()
    missing = [name for name, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing, f"no gradient reached {missing}"


@pytest.mark.parametrize("impl", ["explicit", "sdpa"])
def test_every_kernel_gives_the_reference_model(impl):
    reference, fused = debug_model(attention_impl="reference"), debug_model(attention_impl=impl)
    fused.load_state_dict(reference.state_dict())
    image = torch.rand(2, 3, 64, 32)
    outputs, grads = [], []
    for model in (reference, fused):
        torch.manual_seed(7)  # the same rotations for both
        out = model(image)
        out.square().mean().backward()
        outputs.append(out)
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    torch.testing.assert_close(outputs[0], outputs[1], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(grads[0], grads[1], atol=1e-6, rtol=1e-3)


@pytest.mark.parametrize("options", [{}, dict(duplicate_keys="once", attention_impl="reference")])
def test_activation_checkpointing_gives_identical_outputs_and_gradients(options):
    plain, checkpointed = debug_model(**options), debug_model(**options)
    checkpointed.checkpoint_activations = True
    checkpointed.load_state_dict(plain.state_dict())
    image = torch.rand(1, 3, 32, 64)
    results = []
    for model in (plain, checkpointed):
        torch.manual_seed(3)  # training rotations come from the global generator: same draws in both runs
        out = model.train()(image)
        out.abs().mean().backward()
        results.append((out.detach(), [p.grad.clone() for p in model.parameters()]))
    assert torch.equal(results[0][0], results[1][0])
    for grad_plain, grad_ckpt in zip(results[0][1], results[1][1], strict=True):
        torch.testing.assert_close(grad_plain, grad_ckpt, atol=0, rtol=0)


def test_checkpoint_switch_comes_from_config():
    assert debug_model(checkpoint_activations=True).checkpoint_activations


def test_eval_is_deterministic_and_leaves_the_global_rng_alone():
    model = debug_model().eval()
    image = torch.rand(1, 3, 64, 64)
    state = torch.get_rng_state()
    with torch.no_grad():
        first, second = model(image), model(image)
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(first, second)
    other_seed = debug_model(eval_hash_seed=1).eval()
    with torch.no_grad():
        assert not torch.equal(other_seed(image), first)  # the seed really picks the rotations


def test_training_rotations_follow_the_global_seed():
    model = debug_model().train()
    image = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        torch.manual_seed(11)
        first = model(image)
        torch.manual_seed(11)
        again = model(image)
        fresh = model(image)  # the next step draws new rotations
    assert torch.equal(first, again)
    assert not torch.equal(first, fresh)


def test_bf16_autocast_forward_and_backward():
    model = debug_model().train()
    image = torch.rand(1, 3, 32, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(image)
    out.float().mean().backward()
    assert torch.isfinite(out.float()).all()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


def test_fused_layernorm_falls_back_to_torch_with_one_notice(caplog):
    import kitdist.model.kit as kit_module

    kit_module._fused_notice_given = False
    with caplog.at_level("WARNING", logger="kitdist.model.kit"):
        model = debug_model(fused_layernorm=True)
    try:
        import apex  # noqa: F401
    except ImportError:
        assert all(type(m) is torch.nn.LayerNorm for m in model.modules() if "Norm" in type(m).__name__)
        notices = [r for r in caplog.records if "apex" in r.getMessage()]
        assert len(notices) == 1 and "model.fused_layernorm" in notices[0].getMessage()


def test_sizes_table_and_debug_is_small():
    assert {"debug", "small", "kit"} <= set(SIZES)
    assert count_params(debug_model()) < 500_000


def test_kit_matches_the_paper_within_3_percent_under_module_hook_counting():
    cfg = ModelConfig(size="kit")
    with torch.device("meta"):
        model = build_model(cfg)
    params, macs = count_params(model), count_module_macs(cfg, 256, 256)
    assert abs(params / 20.6e6 - 1) < 0.03, f"{params / 1e6:.2f} M parameters"
    assert abs(macs / 43.08e9 - 1) < 0.03, f"{macs / 1e9:.2f} GMACs (Linear/Conv hooks, as thop)"
    hashed = [m for m in model.modules() if isinstance(m, KNNLocalAttention) and m.chunk_size > 1]
    plain = [m for m in model.modules() if isinstance(m, KNNLocalAttention) and m.chunk_size == 1]
    assert len(hashed) > len(plain)  # k-NN attention in most blocks
    assert all(ktb.ffn.expand.out_features % 8 == 0 for ktb in model.modules() if isinstance(ktb, KTB))
    assert count_macs(cfg, 256, 256) > macs  # FlopCounterMode also counts the attention matmuls


def test_debug_v1_is_numerically_the_debug_model_before_the_new_skeleton():
    # output and parameter shapes of main's debug KiT before the new skeleton (seed 0, 32x48 input)
    reference = torch.load(Path(__file__).parent / "data" / "debug_kit_reference.pt")
    model = debug_model(size="debug_v1").eval()
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == reference["shapes"]
    image = torch.rand(1, 3, 32, 48, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(model(image), reference["output"], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("name", ["debug", "small", "kit"])
def test_the_named_sizes_share_the_papers_skeleton(name):
    with torch.device("meta"):
        model = build_model(ModelConfig(size=name))
    assert all(isinstance(up.conv, torch.nn.ConvTranspose2d) for up in model.up)
    assert all(down.conv.stride == (2, 2) and down.conv.kernel_size == (4, 4) for down in model.down)
    assert all(isinstance(fuse, torch.nn.Linear) for fuse in model.fuse)  # the fused decoder
    assert [len(stage) > 0 for stage in model.encoder] == [True] * 3 and len(model.bottleneck) > 0


@pytest.mark.parametrize("decoder", ["fused", "concat"])
def test_a_tiny_model_on_the_new_skeleton_runs_forward_and_backward(decoder, monkeypatch):
    tiny = dataclasses.replace(SIZES["small"], channels=8, head_dim=8, decoder=decoder, bottleneck_blocks=1)
    monkeypatch.setitem(SIZES, "tiny", tiny)
    torch.manual_seed(0)
    # heads of 8 channels are below Flex's CUDA minimum, so the size is built for the explicit kernel
    model = build_model(ModelConfig(size="tiny", attention_impl="explicit")).train()
    assert isinstance(model.up[0].conv, torch.nn.ConvTranspose2d) and model.down[0].conv.stride == (2, 2)
    image = torch.rand(1, 3, 32, 32)
    out = model(image)
    assert out.shape == image.shape
    out.square().mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_macs_grow_linearly_with_pixels():
    cfg = ModelConfig(size="debug")
    small, large = count_macs(cfg, 64, 64), count_macs(cfg, 256, 256)
    assert 15.0 < large / small < 17.0  # 16x the pixels; hashing adds only a log factor


def test_unknown_size_names_the_key():
    with pytest.raises(ConfigError, match="model.size.*'huge'.*debug"):
        build_model(ModelConfig(size="huge"))


def test_indivisible_heads_name_the_key(monkeypatch):
    monkeypatch.setitem(SIZES, "odd", dataclasses.replace(SIZES["debug"], channels=12))
    with pytest.raises(ConfigError, match="model.size.*head_dim"):
        build_model(ModelConfig(size="odd"))


def run_profile(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "kitdist.model.profile", *args], capture_output=True, text=True, timeout=120
    )


def test_profile_cli_json():
    result = run_profile("--model", "debug", "--height", "64", "--width", "96", "--json", "hash_rounds=1")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["params"] == count_params(debug_model())
    assert report["macs"] == count_macs(ModelConfig(size="debug", hash_rounds=1), 64, 96)


@pytest.mark.parametrize(
    "args,key",
    [
        (["chunk_size=0"], "model.chunk_size"),
        (["colour=red"], "model.colour"),
        (["--model", "nope"], "model.size"),
    ],
)
def test_profile_cli_bad_config_names_the_key(args, key, capsys):
    assert profile_main(["--size", "64", *args]) == 2
    assert key in capsys.readouterr().err
