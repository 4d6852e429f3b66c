"""Micro-batch streams on the data side: what accumulation costs the training stream at one global batch.

    python benchmarks/streams.py [--samples 640] [--per-shard 40] [--tile 128] [--crop 64] [--batch 16]
                                 [--workers 2] [--repeats 3]

With accumulation a a rank reads a micro-batch streams (kitdist/data/stream_state.py), so each DataLoader
worker serves a slots in turn, each with its own shard cursor, and the stream yields a micro-batches of
global/a samples where it yielded one batch. Measured here: samples/s of `TrainStream.wire_batches()` on
one rank for a = 1, 2, 4 at the same global batch, and, to tell the streams' cost from the micro-batch's,
a = 1 at a global batch of the a = 4 micro-batch (one stream, same micro-batch); one epoch each, taking
turns within every round (the steady rate, from the first batch to the last, as benchmarks/loader.py
measures); each ratio is the median of the per-round ratios, with the lowest and highest round.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from functools import partial
from itertools import islice
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from loader import interleaved_rounds, steady_rate  # noqa: E402

from kitdist.config import DataConfig, DistConfig, RunConfig  # noqa: E402
from kitdist.data import TrainStream  # noqa: E402

ACCUMULATIONS = (1, 2, 4)


def stream_rate(folder: str, args: argparse.Namespace, accumulation: int, batch: int) -> tuple[float, float]:
    data = DataConfig(
        train_shards=folder, crop_size=args.crop, global_batch_size=batch, num_workers=args.workers
    )
    cfg = RunConfig(data=data, dist=DistConfig(num_workers=1))
    stream = TrainStream(cfg, 0, 1, grad_accum=accumulation)
    micro_batches = args.samples // batch * accumulation
    return steady_rate(islice(stream.wire_batches(), micro_batches), lambda b: len(b["keys"]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for name, default in (("samples", 640), ("per-shard", 40), ("tile", 128), ("crop", 64), ("batch", 16)):
        parser.add_argument(f"--{name}", type=int, default=default)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    import shardkit

    from kitdist.pretrain import photo_paths

    with tempfile.TemporaryDirectory() as folder:
        sizes = [args.per_shard] * (args.samples // args.per_shard)
        shardkit.write_set(folder, photo_paths(), sizes, tile=args.tile, repeat=True)
        measures = {f"a={a}": partial(stream_rate, folder, args, a, args.batch) for a in ACCUMULATIONS}
        small = args.batch // ACCUMULATIONS[-1]
        measures["one stream"] = partial(stream_rate, folder, args, 1, small)
        report(interleaved_rounds(measures, args.repeats), args)


def report(runs: dict[str, list[tuple[float, float]]], args: argparse.Namespace) -> None:
    print(f"global batch {args.batch}, {args.workers} worker(s), {args.repeats} rounds")
    print("| accumulation | micro-batch | samples/s (median) | start (median) |\n|---|---|---|---|")
    for a in ACCUMULATIONS:
        rates, starts = zip(*[(rate, start) for start, rate in runs[f"a={a}"]], strict=True)
        print(
            f"| {a} | {args.batch // a} | {statistics.median(rates):.0f}/s | {statistics.median(starts):.2f} s |"
        )
    small = args.batch // ACCUMULATIONS[-1]
    rates, starts = zip(*[(rate, start) for start, rate in runs["one stream"]], strict=True)
    print(
        f"| 1 (global {small}) | {small} | {statistics.median(rates):.0f}/s | {statistics.median(starts):.2f} s |"
    )
    print("| ratio | median | lowest - highest round |\n|---|---|---|")
    pairs = [(f"a={a}", "a=1") for a in ACCUMULATIONS[1:]] + [(f"a={ACCUMULATIONS[-1]}", "one stream")]
    for top, bottom in pairs:
        ratios = [x[1] / y[1] for x, y in zip(runs[top], runs[bottom], strict=True)]
        print(
            f"| {top} / {bottom} | {statistics.median(ratios):.2f} | {min(ratios):.2f} - {max(ratios):.2f} |"
        )


if __name__ == "__main__":
    main()
