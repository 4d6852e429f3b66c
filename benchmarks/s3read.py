"""CPU cost of reading shards from S3: kitdist's ranged shard reader against an s3fs file object.

    python benchmarks/s3read.py [--sizes-mb 3 15 64] [--objects 20] [--repeats 3]

Starts a SeaweedFS S3 server on 127.0.0.1, writes `--objects` random objects of each size and reads each
whole, front to back in 1 MiB reads (as the tar reader does through its buffer), counting the CPU seconds
of this process (the S3 client, all its threads) and of the server process, per object and per MB:

- ranged, read-ahead: `ShardReader` with the default `data.prefetch_bytes` (16 MiB ranged GETs, the next
  one fetched in a background thread);
- ranged, no read-ahead: `ShardReader` with `prefetch_bytes` 0 (16 MiB GETs made when needed);
- s3fs file: `storage.open_read`, a plain s3fs file object (a HEAD request at open, then its own block
  read-ahead). kitdist read shards through such files before its ranged reader, and then also opened a
  second one per shard for its next-shard prefetch (two HEADs and a GET per small shard).

Each figure is the median over `--repeats` rounds in which the readers take turns. On a machine where
the server runs beside the data workers (as here) both columns come out of the decoding's cores.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from kitdist import storage  # noqa: E402
from kitdist.data.shardio import ReadOptions, ShardReader  # noqa: E402

READ = 1 << 20
READERS = {
    "ranged, read-ahead": lambda url, size: ShardReader(url, size, ReadOptions()),
    "ranged, no read-ahead": lambda url, size: ShardReader(url, size, ReadOptions(prefetch_bytes=0)),
    "s3fs file": lambda url, size: storage.open_read(url),
}


def cpu_seconds(process: psutil.Process) -> float:
    """CPU seconds of a process and its children (the server may run its parts as children)."""
    return sum(sum(part.cpu_times()[:2]) for part in [process, *process.children(recursive=True)])


def read_all(server: psutil.Process, urls: list[str], size: int, open_reader) -> tuple[float, float, float]:
    """(client CPU s, server CPU s, wall s) of reading every URL whole."""
    client0, server0, wall0 = time.process_time(), cpu_seconds(server), time.perf_counter()
    for url in urls:
        with open_reader(url, size) as stream:
            got = 0
            while chunk := stream.read(READ):
                got += len(chunk)
        assert got == size, f"{url}: read {got} of {size} bytes"
    return time.process_time() - client0, cpu_seconds(server) - server0, time.perf_counter() - wall0


def measure(
    server: psutil.Process, urls: list[str], size: int, repeats: int
) -> dict[str, list[tuple[float, float, float]]]:
    runs: dict[str, list[tuple[float, float, float]]] = {name: [] for name in READERS}
    for open_reader in READERS.values():
        read_all(server, urls[:1], size, open_reader)  # warm: the client, its connection pool
    for _ in range(repeats):
        for name, open_reader in READERS.items():
            runs[name].append(read_all(server, urls, size, open_reader))
    return runs


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes-mb", type=float, nargs="+", default=[3, 15, 64], help="object sizes")
    parser.add_argument("--objects", type=int, default=20, help="objects of each size")
    parser.add_argument("--repeats", type=int, default=3, help="rounds; figures are medians over them")
    args = parser.parse_args()
    from s3server import BUCKET, serving

    with tempfile.TemporaryDirectory() as scratch, serving(Path(scratch) / "s3") as server:
        process = psutil.Process(server.process.pid)
        print(
            f"{args.objects} objects per size, read whole in {READ >> 20} MiB reads, {os.cpu_count()} cores"
        )
        print(
            "| object | reader | client CPU / object | server CPU / object | client ms/MB | server ms/MB | wall ms/MB |"
        )
        print("|---|---|---|---|---|---|---|")
        for size_mb in args.sizes_mb:
            size = int(size_mb * 2**20)
            urls = [f"s3://{BUCKET}/bench-{size}/{index}" for index in range(args.objects)]
            payload = os.urandom(size)
            for url in urls:
                storage.write_bytes(url, payload)
            for name, got in measure(process, urls, size, args.repeats).items():
                print(row(size_mb, name, got, args.objects))


def row(size_mb: float, reader: str, runs: list[tuple[float, float, float]], objects: int) -> str:
    client, server, wall = (statistics.median(run[part] for run in runs) for part in range(3))
    per_object, megabytes = 1000 / objects, objects * size_mb
    return (
        f"| {size_mb:g} MB | {reader} | {client * per_object:.1f} ms | {server * per_object:.1f} ms"
        f" | {1000 * client / megabytes:.2f} | {1000 * server / megabytes:.2f} | {1000 * wall / megabytes:.2f} |"
    )


if __name__ == "__main__":
    main()
