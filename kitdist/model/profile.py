"""Parameters, forward MACs and (optionally) measured forward time of a KiT size.

    python -m kitdist.model.profile --model kit --size 256   # 20.28 M params, 47.14 G (42.52 G by hooks)
    python -m kitdist.model.profile --model debug --height 64 --width 96 --json
    python -m kitdist.model.profile --model kit --size 256 hash_rounds=1 --time

MACs are counted with `torch.utils.flop_counter.FlopCounterMode` on the meta device (no memory, no
compute; on CPU the fused SDPA kernel would count zero), forward only, batch 1, MACs = FLOPs / 2. They are
counted on the reference attention path (every kernel computes the same function; the sdpa one with a few
extra dot-product columns), so implementation costs show in time, not in the model's MACs. `module_macs`
counts Linear/Conv layers only, as thop does. Hashing counts; sort, gather and scatter count zero although
they cost real time, hence `--time`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
import typing

import torch
from torch.utils.flop_counter import FlopCounterMode

from kitdist.config import ConfigError, ModelConfig, from_dict
from kitdist.model.kit import build_model
from kitdist.model.sizes import SIZES


def count_params(model: torch.nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def count_macs(cfg: ModelConfig, height: int, width: int) -> int:
    """Forward multiply-accumulates of one `[1, 3, height, width]` image, counted on the meta device."""
    counted = dataclasses.replace(cfg, attention_impl="reference", checkpoint_activations=False)
    with torch.device("meta"):
        model = build_model(counted).eval()
        image = torch.empty(1, 3, height, width)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(image)
    return counter.get_total_flops() // 2


def count_module_macs(cfg: ModelConfig, height: int, width: int) -> int:
    """Forward MACs as module-hook counters (thop, ptflops' default backend) count them: only Linear,
    Conv2d and ConvTranspose2d modules, so the attention's own matmuls (q k^T, p v) and the hashing are
    missed. Papers' MAC figures often use this convention (see shared research notes, perf.md)."""
    counted = dataclasses.replace(cfg, attention_impl="reference", checkpoint_activations=False)
    total = 0

    def hook(module: torch.nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        nonlocal total
        if isinstance(module, torch.nn.Linear):
            total += output.numel() * module.in_features
        elif isinstance(module, torch.nn.ConvTranspose2d):  # every input pixel scatters a kernel
            kernel = module.kernel_size[0] * module.kernel_size[1]
            total += inputs[0].numel() * module.out_channels // module.groups * kernel
        elif isinstance(module, torch.nn.Conv2d):
            kernel = module.kernel_size[0] * module.kernel_size[1]
            total += output.numel() * module.in_channels // module.groups * kernel

    with torch.device("meta"):
        model = build_model(counted).eval()
        image = torch.empty(1, 3, height, width)
    handles = [m.register_forward_hook(hook) for m in model.modules()]
    with torch.no_grad():
        model(image)
    for handle in handles:
        handle.remove()
    return total


def time_forward(cfg: ModelConfig, height: int, width: int, repeats: int = 3) -> float:
    """Median wall-clock ms of one eval forward of a `[1, 3, height, width]` image on CPU."""
    model = build_model(cfg).eval()
    image = torch.rand(1, 3, height, width)
    times = []
    with torch.no_grad():
        model(image)  # warm-up: allocator and kernel selection
        for _ in range(repeats):
            start = time.perf_counter()
            model(image)
            times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m kitdist.model.profile",
        description="Print a KiT size's parameter count and forward MACs (meta device, FlopCounterMode, "
        "batch 1, MACs = FLOPs/2); optionally the measured CPU forward time.",
    )
    parser.add_argument("--model", default="kit", help=f"a named size ({', '.join(SIZES)}); default kit")
    parser.add_argument("--size", type=int, help="square input side in pixels (sets height and width)")
    parser.add_argument("--height", type=int, default=256, help="input height in pixels (default 256)")
    parser.add_argument("--width", type=int, default=256, help="input width in pixels (default 256)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    parser.add_argument("--time", action="store_true", help="also measure the forward time on this CPU")
    parser.add_argument(
        "overrides", nargs="*", help="model config overrides as key=value, e.g. hash_rounds=1 look_back=true"
    )
    args = parser.parse_args(argv)
    if args.size is not None:
        args.height = args.width = args.size
    if args.height < 1 or args.width < 1:
        parser.error(f"--height/--width must be >= 1, got {args.height}x{args.width}")
    return args


def model_config(name: str, overrides: typing.Sequence[str]) -> ModelConfig:
    """A ModelConfig for size `name` with `key=value` overrides (YAML values), validated like any config."""
    import yaml

    tree: dict[str, typing.Any] = {"size": name}
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r}: expected key=value (e.g. hash_rounds=1)")
        tree[key.strip().removeprefix("model.")] = yaml.safe_load(raw)
    return from_dict(ModelConfig, tree, prefix="model.")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        cfg = model_config(args.model, args.overrides)
        report = {"model": cfg.size, "height": args.height, "width": args.width}
        report["params"] = count_params(build_model(cfg))
        report["macs"] = count_macs(cfg, args.height, args.width)
        report["module_macs"] = count_module_macs(cfg, args.height, args.width)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.time:
        report["forward_ms"] = round(time_forward(cfg, args.height, args.width), 1)
    if args.json:
        print(json.dumps(report))
        return 0
    print(f"KiT {report['model']} at {args.height}x{args.width}")
    print(f"  parameters   {report['params'] / 1e6:8.2f} M ({report['params']:,})")
    print(f"  forward MACs {report['macs'] / 1e9:8.2f} G (meta device, FlopCounterMode, batch 1)")
    print(f"  module MACs  {report['module_macs'] / 1e9:8.2f} G (Linear/Conv hooks as thop counts)")
    if args.time:
        print(
            f"  forward time {report['forward_ms']:8.1f} ms (CPU, {torch.get_num_threads()} threads, median)"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
