"""Loader throughput: the training pipeline against the decode-only limit, local against S3, 1 and 2 workers.

    python benchmarks/loader.py [--samples 1200] [--per-shard 100] [--tile 256] [--crop 128] [--repeats 5]

Builds one clean shard set from scikit-image's photographs (tiles, repeated under new keys to reach
`--samples`), writes it to a local folder and to a SeaweedFS S3 server started here, and measures samples/s:

- decode-only: DataLoader workers read the same shards and decode every image, nothing else (the limit);
- pipeline: `TrainStream.wire_batches()`, what the data workers deliver to the trainer (read, decode,
  random crop, flips, degradation draws, uint8 batches with each sample's noise sigma and seed, state
  tracking);
- + noise on CPU: `TrainStream` iterated with device "cpu", i.e. the trainer process also draws the
  Gaussian noise (what a CPU-only trainer pays; on a GPU trainer that step runs on the accelerator).

Also decode-only from S3, once through kitdist's ranged shard reader and once through an s3fs file object
(what kitdist read through before), which isolates the reading layer.

The measures take turns within each of `--repeats` rounds. Rates are measured in the steady state: from
the first batch received to the last (a training run streams for hours; its start is paid once); the
start (creating the loader to its first batch: forking the workers, their first object-store client, the
first shard) is printed apart. Each rate is the median over the rounds, each ratio the median of the
per-round ratios with the lowest and highest round beside it: on a shared VM a figure moves by 15-20%
between runs, two measures of one round much less.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from functools import partial
from itertools import islice
from pathlib import Path

from torch.utils.data import DataLoader, IterableDataset, get_worker_info

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from kitdist import storage  # noqa: E402
from kitdist.config import DataConfig, DistConfig, RunConfig  # noqa: E402
from kitdist.data import TrainStream  # noqa: E402
from kitdist.data.decode import decode_rgb, image_bytes  # noqa: E402
from kitdist.data.shardio import ReadOptions, ShardReader, tar_samples  # noqa: E402
from kitdist.shards.manifest import read_manifest, shard_urls  # noqa: E402


class DecodeOnly(IterableDataset):
    """Each worker reads its share of the shards and decodes every image. `reader` "ranged" is kitdist's
    shard reader; "s3fs-file" reads through an s3fs file object (its own block read-ahead, a HEAD request
    per open), as kitdist did before its ranged reader: the two side by side isolate the reading layer."""

    def __init__(self, urls: list[str], sizes: list[int], reader: str = "ranged") -> None:
        self.urls, self.sizes, self.reader = urls, sizes, reader

    def __iter__(self):
        info = get_worker_info()
        index, count = (info.id, info.num_workers) if info else (0, 1)
        for url, size in zip(self.urls[index::count], self.sizes[index::count], strict=True):
            if self.reader == "ranged":
                stream = ShardReader(url, size, ReadOptions())
            else:
                stream = storage.open_read(url)
            with stream:
                for sample in tar_samples(stream, lambda reason, unreadable: None):
                    decode_rgb(image_bytes(sample, "clean"), sample["__key__"])
                    yield 1


def steady_rate(items, count_of) -> tuple[float, float]:
    """(seconds to the first item, items per second after it) of an iterable, counted by `count_of`."""
    start = time.perf_counter()
    iterator = iter(items)
    next(iterator)
    first = time.perf_counter()
    done = sum(count_of(item) for item in iterator)
    return first - start, done / (time.perf_counter() - first)


def decode_only_rate(folder: str, workers: int, reader: str = "ranged") -> tuple[float, float]:
    manifest = read_manifest(folder)
    sizes = [shard.bytes for shard in manifest.shards]
    dataset = DecodeOnly(shard_urls(folder, manifest), sizes, reader)
    options = storage.forked_loader_options() if workers else {}
    return steady_rate(DataLoader(dataset, batch_size=None, num_workers=workers, **options), int)


def pipeline_rate(
    folder: str, workers: int, crop: int, batch: int, finished: bool = False
) -> tuple[float, float]:
    data = DataConfig(train_shards=folder, crop_size=crop, global_batch_size=batch, num_workers=workers)
    cfg = RunConfig(data=data, dist=DistConfig(num_workers=1))
    stream = TrainStream(cfg, 0, 1, device="cpu")
    steps = read_manifest(folder).total_samples // batch
    batches = iter(stream) if finished else stream.wire_batches()
    return steady_rate(islice(batches, steps), lambda b: len(b["keys"]))


def build_sets(root: Path, samples: int, per_shard: int, tile: int, s3_url: str) -> None:
    import shardkit

    from kitdist.pretrain import photo_paths

    photos = photo_paths()
    sizes = [per_shard] * (samples // per_shard)
    for target in (str(root / "local"), s3_url):
        shardkit.write_set(target, photos, sizes, tile=tile, repeat=True)


def interleaved_rounds(measures: dict, repeats: int) -> dict[str, list[tuple[float, float]]]:
    """(start, steady rate) of each measure in each of `repeats` rounds, the measures taking turns within
    a round, so that a slow spell of a shared machine hits them all alike."""
    runs: dict[str, list[tuple[float, float]]] = {name: [] for name in measures}
    for _ in range(repeats):
        for name, measure in measures.items():
            runs[name].append(measure())
    return runs


RATIOS = {  # label: (numerator, denominator), compared round by round
    "pipeline/decode": ("pipeline", "decode"),
    "S3/local (pipeline)": ("pipeline S3", "pipeline"),
    "S3/local (decode)": ("decode S3", "decode"),
    "ranged/s3fs-file reader (S3 decode)": ("decode S3", "decode S3, s3fs file"),
    "(+ noise on CPU)/decode": ("+ noise on CPU", "decode"),
}


def report(workers: int, runs: dict[str, list[tuple[float, float]]]) -> None:
    """Median rate and start of each measure; each ratio as the median of its per-round ratios, with the
    lowest and highest round (the spread is this machine's noise)."""
    print(f"\n{workers} worker(s), {len(next(iter(runs.values())))} rounds")
    print("| measure | samples/s (median) | start (median) |\n|---|---|---|")
    for name, got in runs.items():
        rates, starts = [rate for _, rate in got], [start for start, _ in got]
        print(f"| {name} | {statistics.median(rates):.0f}/s | {statistics.median(starts):.2f} s |")
    print("| ratio | median | lowest - highest round |\n|---|---|---|")
    for label, (top, bottom) in RATIOS.items():
        ratios = [a[1] / b[1] for a, b in zip(runs[top], runs[bottom], strict=True)]
        print(f"| {label} | {statistics.median(ratios):.0%} | {min(ratios):.0%} - {max(ratios):.0%} |")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--samples", type=int, default=1200, help="samples in the shard set")
    parser.add_argument(
        "--per-shard",
        type=int,
        default=100,
        help="samples per shard (default 100, ~15 MB shards; the shard builder's default is 256 MB; 20 gives"
        " 3 MB shards, where the per-request cost of the store shows)",
    )
    parser.add_argument("--tile", type=int, default=256, help="stored tile size in pixels (PNG)")
    parser.add_argument("--crop", type=int, default=128, help="training crop size (data.crop_size)")
    parser.add_argument("--batch", type=int, default=8, help="batch size")
    parser.add_argument("--repeats", type=int, default=5, help="rounds; figures are medians over them")
    args = parser.parse_args()
    from s3server import BUCKET, serving

    with tempfile.TemporaryDirectory() as scratch, serving(Path(scratch) / "s3"):
        s3_url = f"s3://{BUCKET}/bench"
        build_sets(Path(scratch), args.samples, args.per_shard, args.tile, s3_url)
        local = str(Path(scratch) / "local")
        print(
            f"{args.samples} PNG tiles of {args.tile}px, {args.per_shard} per shard, crop {args.crop},"
            f" batch {args.batch}, {os.cpu_count()} cores"
        )
        for workers in (1, 2):
            pipeline = partial(pipeline_rate, workers=workers, crop=args.crop, batch=args.batch)
            measures = {
                "decode": partial(decode_only_rate, local, workers),
                "pipeline": partial(pipeline, local),
                "pipeline S3": partial(pipeline, s3_url),
                "decode S3": partial(decode_only_rate, s3_url, workers),
                "decode S3, s3fs file": partial(decode_only_rate, s3_url, workers, "s3fs-file"),
                "+ noise on CPU": partial(pipeline, local, finished=True),
            }
            report(workers, interleaved_rounds(measures, args.repeats))


if __name__ == "__main__":
    main()
