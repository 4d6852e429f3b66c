"""Loader throughput: the training pipeline against the decode-only limit, local against S3, 1 and 2 workers.

    python benchmarks/loader.py [--samples 1200] [--tile 256] [--crop 128] [--repeats 3]

Builds one clean shard set from scikit-image's photographs (tiles, repeated under new keys to reach
`--samples`), writes it to a local folder and to a SeaweedFS S3 server started here, and measures samples/s:

- decode-only: DataLoader workers read the same shards and decode every image, nothing else (the limit);
- pipeline: `TrainStream.wire_batches()`, what the data workers deliver to the trainer (read, decode,
  random crop, flips, degradation draws, uint8 batches with each sample's noise sigma and seed, state
  tracking);
- + noise on CPU: `TrainStream` iterated with device "cpu", i.e. the trainer process also draws the
  Gaussian noise (what a CPU-only trainer pays; on a GPU trainer that step runs on the accelerator).

Each figure is the best of `--repeats` runs of one epoch (the four measures taking turns within each
round), measured in the steady state: from the first
batch received to the last (a training run streams for hours; its start is paid once). The start (from
creating the loader to its first batch: forking the workers, their first object-store client, the first
shard) is printed apart, as the median over the repeats.
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

from kitdist.config import DataConfig, DistConfig, RunConfig  # noqa: E402
from kitdist.data import TrainStream  # noqa: E402
from kitdist.data.samples import decode_rgb, image_bytes  # noqa: E402
from kitdist.data.shardio import ReadOptions, ShardReader, tar_samples  # noqa: E402
from kitdist.shards.manifest import read_manifest, shard_urls  # noqa: E402


class DecodeOnly(IterableDataset):
    """Each worker reads its share of the shards and decodes every image."""

    def __init__(self, urls: list[str], sizes: list[int]) -> None:
        self.urls, self.sizes = urls, sizes

    def __iter__(self):
        info = get_worker_info()
        index, count = (info.id, info.num_workers) if info else (0, 1)
        for url, size in zip(self.urls[index::count], self.sizes[index::count], strict=True):
            reader = ShardReader(url, size, ReadOptions())
            for sample in tar_samples(reader, lambda reason, unreadable: None):
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


def decode_only_rate(folder: str, workers: int) -> tuple[float, float]:
    manifest = read_manifest(folder)
    sizes = [shard.bytes for shard in manifest.shards]
    return steady_rate(
        DataLoader(DecodeOnly(shard_urls(folder, manifest), sizes), batch_size=None, num_workers=workers), int
    )


def pipeline_rate(
    folder: str, workers: int, crop: int, batch: int, finished: bool = False
) -> tuple[float, float]:
    data = DataConfig(train_shards=folder, crop_size=crop, global_batch_size=batch, num_workers=workers)
    cfg = RunConfig(data=data, dist=DistConfig(num_workers=1))
    stream = TrainStream(cfg, 0, 1, device="cpu")
    steps = read_manifest(folder).total_samples // batch
    batches = iter(stream) if finished else stream.wire_batches()
    return steady_rate(islice(batches, steps), lambda b: len(b["keys"]))


def build_sets(root: Path, samples: int, tile: int, s3_url: str) -> None:
    import shardkit

    from kitdist.pretrain import photo_paths

    photos = photo_paths()
    per_shard = 20
    sizes = [per_shard] * (samples // per_shard)
    for target in (str(root / "local"), s3_url):
        shardkit.write_set(target, photos, sizes, tile=tile, repeat=True)


def interleaved_best(measures: list, repeats: int) -> list[tuple[float, float]]:
    """(median start, best steady rate) of each measure over `repeats` rounds, the measures taking turns
    within a round, so that a slow spell of a shared machine hits them all alike."""
    runs: list[list[tuple[float, float]]] = [[] for _ in measures]
    for _ in range(repeats):
        for index, measure in enumerate(measures):
            runs[index].append(measure())
    return [(statistics.median(r[0] for r in got), max(r[1] for r in got)) for got in runs]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--samples", type=int, default=1200, help="samples in the shard set (20 per shard)")
    parser.add_argument("--tile", type=int, default=256, help="stored tile size in pixels (PNG)")
    parser.add_argument("--crop", type=int, default=128, help="training crop size (data.crop_size)")
    parser.add_argument("--batch", type=int, default=8, help="batch size")
    parser.add_argument("--repeats", type=int, default=3, help="runs per figure; the best is kept")
    args = parser.parse_args()
    from s3server import BUCKET, SeaweedS3

    with tempfile.TemporaryDirectory() as scratch:
        server = SeaweedS3(Path(scratch) / "s3")
        server.start()
        try:
            os.environ.update(server.env)
            s3_url = f"s3://{BUCKET}/bench"
            build_sets(Path(scratch), args.samples, args.tile, s3_url)
            local = str(Path(scratch) / "local")
            print(
                f"{args.samples} PNG tiles of {args.tile}px, crop {args.crop}, batch {args.batch}, {os.cpu_count()} cores"
            )
            print(
                "| workers | decode-only local | pipeline local | pipeline S3 | + noise on CPU, local"
                " | pipeline/decode | S3/local | (+ noise on CPU)/decode | start: decode, local, S3 |"
            )
            print("|---|---|---|---|---|---|---|---|---|")
            for workers in (1, 2):
                limit, ours, remote, cpu = interleaved_best(
                    [
                        partial(decode_only_rate, local, workers),
                        partial(pipeline_rate, local, workers, args.crop, args.batch),
                        partial(pipeline_rate, s3_url, workers, args.crop, args.batch),
                        partial(pipeline_rate, local, workers, args.crop, args.batch, True),
                    ],
                    args.repeats,
                )
                print(
                    f"| {workers} | {limit[1]:.0f}/s | {ours[1]:.0f}/s | {remote[1]:.0f}/s | {cpu[1]:.0f}/s"
                    f" | {ours[1] / limit[1]:.0%} | {remote[1] / ours[1]:.0%} | {cpu[1] / limit[1]:.0%}"
                    f" | {limit[0]:.2f} s, {ours[0]:.2f} s, {remote[0]:.2f} s |"
                )
        finally:
            server.stop()


if __name__ == "__main__":
    main()
