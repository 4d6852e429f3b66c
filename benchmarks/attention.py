"""KLA against 8x8 window attention and dense global attention: forward+backward time and peak memory.

    PYTHONPATH=. python benchmarks/attention.py                      # 64^2 .. 512^2, 32 channels, 1 thread
    PYTHONPATH=. python benchmarks/attention.py --sizes 64 128 --repeats 5 --breakdown

Times are medians over `--repeats` rounds in which the cases run interleaved (so load from other processes
hits all alike). Peak memory is measured once per case in its own child process (max RSS above the RSS once
module and input exist). Window attention uses the same 64 keys per query as KLA with k=4 patches of 4x4, so the ratio
KLA / window is the price of hashing, sorting and gathering. Window attention is timed three ways: einsum
with its learned bias, SDPA with the bias as `attn_mask` (which PyTorch runs unfused on CPU), and fused
SDPA without any bias ("flash", a lower bound); the ratios use the fastest. Dense attention is fused SDPA without bias; it is skipped above `--dense-max` (its cost is
quadratic: at 256^2 it would take minutes per step on this CPU).
"""

from __future__ import annotations

import argparse
import resource
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

from kitdist.model.attention import (
    KNNLocalAttention,
    partition,
    reference_attention,
    relative_position_index,
    unpartition,
)

KLA_CASES = {"kla_ref_b1": ("reference", 1), "kla_ref_b2": ("reference", 2), "kla_sdpa_b1": ("sdpa", 1),
             "kla_sdpa_b2": ("sdpa", 2)}  # fmt: skip
CASES = ["window_ref", "window_sdpa", "window_flash", *KLA_CASES, "dense_sdpa"]


class WindowAttention(nn.Module):
    """Swin-style attention inside non-overlapping w x w windows with a relative position bias."""

    def __init__(self, dim: int, num_heads: int, window: int, impl: str) -> None:
        super().__init__()
        self.num_heads, self.window, self.impl = num_heads, window, impl
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.bias_table = nn.Parameter(torch.randn(num_heads, (2 * window - 1) ** 2) * 0.02)
        self.register_buffer("bias_index", relative_position_index(window), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, height, width, channels = x.shape
        windows = partition(x, self.window)  # [B, nW, w*w, c]
        qkv = self.qkv(windows).view(-1, self.window**2, 3, self.num_heads, channels // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each [B*nW, h, w*w, d]
        bias = self.bias_table[:, self.bias_index]  # [h, w*w, w*w]
        if self.impl == "reference":
            out, _ = reference_attention(q, k, v, bias, q.shape[-1] ** -0.5, False)
        elif self.impl == "sdpa":
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        else:  # "flash": no bias, so fused kernels apply: the cheapest window attention there is
            out = F.scaled_dot_product_attention(q, k, v)
        out = out.transpose(1, 2).reshape(windows.shape)
        return unpartition(self.proj(out), height, width)


class DenseAttention(nn.Module):
    """Every pixel attends to every pixel (fused SDPA, no bias)."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, height, width, channels = x.shape
        qkv = self.qkv(x.view(batch, -1, channels)).view(
            batch, -1, 3, self.num_heads, channels // self.num_heads
        )
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each [B, h, HW, d]
        out = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(batch, height, width, channels)
        return self.proj(out)


def build_case(case: str, channels: int, heads: int) -> nn.Module:
    if case in KLA_CASES:
        impl, rounds = KLA_CASES[case]
        return KNNLocalAttention(
            channels, heads, patch_size=4, chunk_size=4, hash_rounds=rounds, attention_impl=impl
        )
    if case.startswith("window"):
        return WindowAttention(channels, heads, 8, case.removeprefix("window_").replace("ref", "reference"))
    return DenseAttention(channels, heads)


def time_cases(cases: list[str], size: int, args: argparse.Namespace) -> dict[str, float]:
    """Median forward+backward ms of each case, the cases interleaved round-robin so that load from other
    processes on the machine spreads over all of them alike."""
    torch.manual_seed(0)
    modules = {case: build_case(case, args.channels, args.heads).train() for case in cases}
    x = torch.randn(1, size, size, args.channels, requires_grad=True)
    times: dict[str, list[float]] = {case: [] for case in cases}
    for repeat in range(args.repeats + 1):  # the first round warms allocator and kernels up, and is dropped
        for case, module in modules.items():
            start = time.perf_counter()
            module(x).square().mean().backward()
            if repeat:
                times[case].append((time.perf_counter() - start) * 1e3)
    return {case: statistics.median(values) for case, values in times.items()}


def peak_memory_mb(case: str, size: int, channels: int, heads: int) -> float:
    """Peak extra MB of one forward+backward: max RSS above the RSS once module and input exist. A first
    run on a 32x32 map pages in the code and kernels, which would otherwise count as the case's memory."""
    torch.manual_seed(0)
    module = build_case(case, channels, heads).train()
    module(torch.randn(1, 32, 32, channels, requires_grad=True)).square().mean().backward()
    x = torch.randn(1, size, size, channels, requires_grad=True)
    _reset_peak_rss()
    baseline_kb = _current_rss_kb()
    module(x).square().mean().backward()
    return max(_peak_rss_kb() - baseline_kb, 0) / 1024


def breakdown(size: int, channels: int, heads: int) -> dict[str, float]:
    """Self CPU ms of fused KLA (b=1) forward+backward, grouped into hash/sort/gather, attention, rest."""
    module = build_case("kla_sdpa_b1", channels, heads).train()
    x = torch.randn(1, size, size, channels, requires_grad=True)
    module(x).square().mean().backward()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        module(x).square().mean().backward()
    # checked in this order; the hash projection is the only bmm in the fused path, linear layers use addmm/mm
    groups = {"attention kernel (fused SDPA)": ("scaled_dot_product", "flash_attention"),
              "projections (qkv, out)": ("addmm", "aten::mm", "linear"),
              "LSH: hash, sort, gather, scatter": ("bmm", "sort", "argmax", "gather", "scatter", "index", "normal",
                                                   "sigmoid", "norm", "randn")}  # fmt: skip
    totals = dict.fromkeys([*groups, "other (copies, reshapes, elementwise)"], 0.0)
    for event in prof.key_averages():
        name = event.key.lower()
        group = next((g for g, keys in groups.items() if any(key in name for key in keys)), None)
        if name.startswith("aten::") and group is None:
            group = "other (copies, reshapes, elementwise)"
        if group:
            totals[group] += event.self_cpu_time_total / 1e3
    return totals


def _reset_peak_rss() -> None:
    """Linux keeps the peak RSS across fork and exec, so a child would report its parent's; "5" resets it."""
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")


def _peak_rss_kb() -> int:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmHWM:"))


def _current_rss_kb() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * (resource.getpagesize() // 1024)


def measure_memory(case: str, size: int, args: argparse.Namespace) -> float | None:
    """Peak memory of one case in a fresh child process (max RSS is per process and never goes down)."""
    command = [sys.executable, __file__, "--child", case, "--sizes", str(size), "--channels", str(args.channels),
               "--heads", str(args.heads), "--threads", str(args.threads)]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode:
        print(f"  {case} at {size}^2 failed: {result.stderr.strip().splitlines()[-1:]}", file=sys.stderr)
        return None
    return float(result.stdout)


def print_table(results: dict, sizes: list[int]) -> None:
    print(f"{'map':>6} | " + " | ".join(f"{case:>17}" for case in CASES))
    print("-" * (9 + 20 * len(CASES)))
    for size in sizes:
        cells = []
        for case in CASES:
            r = results.get((case, size))
            memory = f"{r['peak_mb']:5.0f}MB" if r and r["peak_mb"] is not None else "    ?MB"
            cells.append(f"{r['ms']:8.1f}ms {memory}" if r else f"{'skipped':>17}")
        print(f"{size:>4}^2 | " + " | ".join(cells))


def print_ratios(results: dict, sizes: list[int]) -> None:
    print("\nratios (time):")
    for size in sizes:
        windows = [results[(c, size)]["ms"] for c in CASES if c.startswith("window") and (c, size) in results]
        if not windows:
            continue
        window = min(windows)
        line = [f"{size:>4}^2:"]
        for case in KLA_CASES:
            if (case, size) in results:
                line.append(f"{case}/window {results[(case, size)]['ms'] / window:.2f}x")
        if ("kla_sdpa_b1", size) in results and ("kla_sdpa_b2", size) in results:
            extra = results[("kla_sdpa_b2", size)]["ms"] - results[("kla_sdpa_b1", size)]["ms"]
            line.append(f"(b2-b1)/window {extra / window:.2f}x")
        print("  " + "  ".join(line))
    for low, high in zip(sizes, sizes[1:], strict=False):
        growth = [f"{case} {results[(case, high)]['ms'] / results[(case, low)]['ms']:.2f}x"
                  for case in CASES if (case, low) in results and (case, high) in results]  # fmt: skip
        print(f"  growth {low}^2 -> {high}^2 (4x pixels): " + ", ".join(growth))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 128, 256, 512], help="feature map sides")
    parser.add_argument("--channels", type=int, default=32)
    parser.add_argument("--heads", type=int, default=1)
    parser.add_argument(
        "--repeats", type=int, default=3, help="timed runs per case (median), after one warm-up"
    )
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads in every case")
    parser.add_argument("--dense-max", type=int, default=128, help="largest map side for dense attention")
    parser.add_argument(
        "--breakdown", action="store_true", help="profile where fused KLA b=1 spends its time"
    )
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.child:
        print(peak_memory_mb(args.child, args.sizes[0], args.channels, args.heads))
        return
    print(f"forward+backward, batch 1, {args.channels} channels, {args.heads} head(s), fp32, "
          f"{args.threads} thread(s), median of {args.repeats}; torch {torch.__version__}")  # fmt: skip
    results = {}
    for size in args.sizes:
        cases = [case for case in CASES if case != "dense_sdpa" or size <= args.dense_max]
        print(f"  measuring {size}^2 ...", file=sys.stderr, flush=True)
        for case, ms in time_cases(cases, size, args).items():
            results[(case, size)] = {"ms": ms, "peak_mb": measure_memory(case, size, args)}
    print_table(results, args.sizes)
    print_ratios(results, args.sizes)
    if args.breakdown:
        size = max(s for s in args.sizes if s <= 256)
        print(f"\nfused KLA b=1 at {size}^2, self CPU ms by group (torch.profiler):")
        for group, ms in breakdown(size, args.channels, args.heads).items():
            print(f"  {group:<40} {ms:8.1f}")


if __name__ == "__main__":
    main()
