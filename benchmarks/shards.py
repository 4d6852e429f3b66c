"""Shard build throughput against the work a build cannot avoid, on the same images and the same cores.

Two cases, each built with 1 and 2 worker processes to a local folder and to a SeaweedFS S3 server
started here (tests/s3server.py):
- copy: a folder of JPEG/PNG photos stored byte-for-byte; the limit is reading and hashing each file.
- tile: GoPro-like 1280x720 PNG pairs cut into 256 px tiles every 192 px; the limit is decoding both
  frames and PNG-encoding every input and target tile (same zlib level as the build).
The limit runs the bare work in a pool of as many processes as the build has workers, so the ratio is
per core. Build times include everything: listing, probing, process start, upload, manifest.

    PYTHONPATH=$PWD python benchmarks/shards.py [--files 600] [--frames 32] [--workers 1 2] [--repeat 2] [--no-s3]
"""

from __future__ import annotations

import argparse
import hashlib
import io
import multiprocessing
import os
import sys
import tempfile
import time
from pathlib import Path

from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]

from kitdist import storage  # noqa: E402
from kitdist.shards import build_shards  # noqa: E402
from kitdist.shards.samples import tile_boxes  # noqa: E402

TILE, STRIDE, PNG_LEVEL = 256, 192, 1


def photographs() -> list[Path]:
    import skimage

    folder = Path(skimage.__file__).parent / "data"
    return [
        p for p in sorted(folder.glob("*")) if p.suffix in (".png", ".jpg") and Image.open(p).mode == "RGB"
    ]


def make_copy_source(folder: Path, num_files: int) -> list[Path]:
    photos, paths = photographs(), []
    for index in range(num_files):
        photo = photos[index % len(photos)]
        path = folder / f"{index % 10}" / f"{index:05d}_{photo.name}"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(photo.read_bytes())
        paths.append(path)
    return paths


def make_tile_source(folder: Path, num_frames: int) -> list[tuple[Path, Path]]:
    """GoPro layout: train/<seq>/{blur,sharp}/<frame>.png, 1280x720 frames resized from the photographs."""
    from PIL import ImageFilter

    photos, pairs = photographs(), []
    for index in range(num_frames):
        sharp = Image.open(photos[index % len(photos)]).convert("RGB").resize((1280, 720))
        sequence = folder / "train" / f"seq{index % 4}"
        for role, image in (("sharp", sharp), ("blur", sharp.filter(ImageFilter.BoxBlur(3)))):
            (sequence / role).mkdir(parents=True, exist_ok=True)
            image.save(sequence / role / f"{index:06d}.png", compress_level=1)
        pairs.append((sequence / "blur" / f"{index:06d}.png", sequence / "sharp" / f"{index:06d}.png"))
    return pairs


def read_and_hash(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    hashlib.sha256(data).digest()
    return 1, len(data)


def decode_tile_encode(pair: tuple[Path, Path]) -> tuple[int, int]:
    images = [Image.open(path).convert("RGB") for path in pair]
    num_bytes, boxes = 0, tile_boxes(*images[0].size, TILE, STRIDE)
    for box in boxes:
        for image in images:
            buffer = io.BytesIO()
            image.crop(box).save(buffer, format="PNG", compress_level=PNG_LEVEL)
            num_bytes += buffer.tell()
    return len(boxes), num_bytes


def best_of(repeat: int, measure, *args) -> tuple[float, int, int]:
    """The fastest of `repeat` runs: the machine is shared, and slow runs measure the neighbours."""
    return min((measure(*args) for _ in range(repeat)), key=lambda outcome: outcome[0])


def measure_limit(work, jobs: list, workers: int) -> tuple[float, int, int]:
    """Seconds for the bare work over `jobs` in `workers` processes (started and warm before timing)."""
    if workers == 1:
        start = time.perf_counter()
        results = [work(job) for job in jobs]
        return time.perf_counter() - start, *map(sum, zip(*results, strict=True))
    with multiprocessing.get_context("spawn").Pool(workers) as pool:
        pool.map(work, jobs[:workers])  # imports done and caches warm, as in a long build
        start = time.perf_counter()
        results = pool.map(work, jobs, chunksize=1)
        return time.perf_counter() - start, *map(sum, zip(*results, strict=True))


def measure_build(recipe: str, src: Path, out: str, workers: int, tile: int | None) -> tuple[float, int, int]:
    start = time.perf_counter()
    stride = STRIDE if tile else None
    manifests = build_shards(
        recipe, src, out, samples_per_shard=64, tile=tile, stride=stride, workers=workers, progress=False
    )
    seconds = time.perf_counter() - start
    storage.remove(out, recursive=True)  # the next repeat builds from scratch
    return (
        seconds,
        sum(m.total_samples for m in manifests.values()),
        sum(m.total_bytes for m in manifests.values()),
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--files", type=int, default=600, help="photos in the copy case")
    parser.add_argument("--frames", type=int, default=32, help="1280x720 frame pairs in the tile case")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--no-s3", action="store_true", help="local destination only")
    parser.add_argument("--repeat", type=int, default=2, help="runs per measurement; the fastest counts")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="kitdist-bench-") as tmp:
        root = Path(tmp)
        copy_files = make_copy_source(root / "copy", args.files)
        tile_pairs = make_tile_source(root / "tile", args.frames)
        cases = [
            ("copy", "folder", root / "copy", None, read_and_hash, copy_files),
            ("tile", "gopro", root / "tile", TILE, decode_tile_encode, tile_pairs),
        ]
        server = None if args.no_s3 else start_s3(root / "s3")
        destinations = ["local"] + ([] if server is None else ["s3"])
        try:
            rows = run_all(cases, destinations, args.workers, root, args.repeat)
        finally:
            if server is not None:
                server.stop()
    print_table(rows)


def start_s3(folder: Path):
    from s3server import BUCKET, SeaweedS3

    server = SeaweedS3(folder)
    server.start()
    os.environ.update(server.env)
    server.bucket = BUCKET
    return server


def run_all(cases, destinations, worker_counts, root: Path, repeat: int) -> list[dict]:
    rows = []
    for name, recipe, src, tile, work, jobs in cases:
        for workers in worker_counts:
            limit_s, limit_samples, _ = best_of(repeat, measure_limit, work, jobs, workers)
            for destination in destinations:
                out = (
                    str(root / "out" / f"{name}-{workers}")
                    if destination == "local"
                    else f"s3://kitdist/{name}-{workers}"
                )
                seconds, samples, num_bytes = best_of(repeat, measure_build, recipe, src, out, workers, tile)
                assert samples == limit_samples, (
                    f"{name}: built {samples} samples, limit work made {limit_samples}"
                )
                rows.append(
                    dict(
                        case=name,
                        dest=destination,
                        workers=workers,
                        samples=samples,
                        mb=num_bytes / 1e6,
                        seconds=seconds,
                        limit_rate=limit_samples / limit_s,
                    )
                )
                print(f"done {name} {destination} workers={workers}: {seconds:.2f}s", file=sys.stderr)
    return rows


def print_table(rows: list[dict]) -> None:
    print(
        "| case | dest | workers | samples | MB | build s | samples/s | MB/s | limit samples/s | build/limit |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        rate = row["samples"] / row["seconds"]
        print(
            f"| {row['case']} | {row['dest']} | {row['workers']} | {row['samples']} | {row['mb']:.0f} | "
            f"{row['seconds']:.2f} | {rate:.0f} | {row['mb'] / row['seconds']:.0f} | {row['limit_rate']:.0f} | "
            f"{rate / row['limit_rate']:.0%} |"
        )


if __name__ == "__main__":
    main()
