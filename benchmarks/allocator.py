"""glibc's allocator settings side by side: the debug KiT's eval forward on CPU at growing image sides, in
a fresh process per setting, as kitdist starts its processes (kitdist/distributed/env.py):

- `launcher-env`: started with CPU_ALLOCATOR_ENV in its environment (a Ray training worker);
- `main-mallopt`: keep_freed_memory_in_this_program() first thing (restore's, evaluate's, torchrun's
  __main__);
- `glibc-defaults`: neither (what a notebook calling kitdist's functions gets).

    PYTHONPATH=. python benchmarks/allocator.py                       # sides 256 512 1024, 2 rounds of 3
    PYTHONPATH=. python benchmarks/allocator.py --sides 128 256 --rounds 1 --repeats 1   # a smoke test

Each round runs every setting's process once, one after another (so load from other processes hits all
alike); a process times `--repeats` forwards per side after one warm-up, sides interleaved, 1 thread.
Reported: the median ms per side, the time ratio of each doubling of the side (4x the pixels), and the
median minor page faults of one forward (faults are what the setting changes; time follows from them).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

SETTINGS = ("launcher-env", "main-mallopt", "glibc-defaults")


def child(sides: list[int], repeats: int) -> dict:
    import torch

    from kitdist.config import ModelConfig
    from kitdist.model import build_model

    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = build_model(ModelConfig(size="debug")).eval()
    images = {side: torch.rand(1, 3, side, side) for side in sides}
    ms: dict[int, list[float]] = {side: [] for side in sides}
    faults: dict[int, list[int]] = {side: [] for side in sides}
    with torch.no_grad():
        for repeat in range(repeats + 1):  # the first forward of each side warms up, and is dropped
            for side, image in images.items():
                before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
                start = time.perf_counter()
                model(image)
                elapsed = (time.perf_counter() - start) * 1e3
                if repeat:
                    ms[side].append(elapsed)
                    faults[side].append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    return {"ms": ms, "faults": faults}


def run_setting(setting: str, sides: list[int], repeats: int) -> dict:
    from kitdist.distributed.env import CPU_ALLOCATOR_ENV

    env = {name: value for name, value in os.environ.items() if name not in CPU_ALLOCATOR_ENV}
    env |= CPU_ALLOCATOR_ENV if setting == "launcher-env" else {}
    command = [sys.executable, __file__, "--child", setting, "--sides", *map(str, sides)]
    command += ["--repeats", str(repeats)]
    result = subprocess.run(command, env=env, capture_output=True, text=True, check=True)
    return json.loads(result.stdout)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sides", type=int, nargs="+", default=[256, 512, 1024])
    parser.add_argument("--rounds", type=int, default=2, help="processes per setting, interleaved")
    parser.add_argument("--repeats", type=int, default=3, help="timed forwards per side in each process")
    parser.add_argument("--child", choices=SETTINGS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        if args.child == "main-mallopt":
            from kitdist.distributed.env import keep_freed_memory_in_this_program

            keep_freed_memory_in_this_program()
        print(json.dumps(child(args.sides, args.repeats)))
        return
    found = {setting: {"ms": {}, "faults": {}} for setting in SETTINGS}
    for round_ in range(args.rounds):
        for setting in SETTINGS:
            print(f"  round {round_ + 1}: {setting} ...", file=sys.stderr, flush=True)
            for kind, per_side in run_setting(setting, args.sides, args.repeats).items():
                for side, values in per_side.items():
                    found[setting][kind].setdefault(int(side), []).extend(values)
    print(f"| setting | {' | '.join(f'{s}² ms' for s in args.sides)} | per doubling | faults per forward |")
    print(f"|---|{'---|' * len(args.sides)}---|---|")
    for setting, values in found.items():
        ms = {side: statistics.median(times) for side, times in values["ms"].items()}
        faults = {side: int(statistics.median(counts)) for side, counts in values["faults"].items()}
        sides = args.sides
        doubling = " / ".join(f"{ms[b] / ms[a]:.2f}x" for a, b in zip(sides, sides[1:], strict=False))
        print(
            f"| {setting} | {' | '.join(f'{ms[s]:.0f}' for s in sides)} | {doubling} | "
            f"{' / '.join(f'{faults[s]:,}' for s in sides)} |"
        )


if __name__ == "__main__":
    main()
