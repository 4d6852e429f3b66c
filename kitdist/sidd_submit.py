"""`python -m kitdist.sidd_submit`: SIDD's benchmark submission file, SubmitSrgb.mat, from trained weights.

SIDD withholds its benchmark's ground truth: its authors score a MATLAB file laid out as their own kit
writes it (`SIDD_Denoise.m`, `DenoiseSrgb.m`): `DenoisedBlocksSrgb`, an images x blocks (40 x 32) cell array
whose cell {i, b} is block b of image i denoised (256 x 256 x 3, single, in [0, 1]); `TimeMPSrgb`, seconds
of denoising per megapixel; `OptionalData`, a struct of text about the method (MethodName, Authors,
PaperTitle, Venue). This command restores every block of a shard set that the `sidd` recipe built from the
.mat files (split `benchmark`; or `val`, to score the file oneself against ValidationGtBlocksSrgb), puts
each in its cell by its key (`<split>__image<ii>__block<bb>`), rounded to 8 bits as a saved image is (as
`kitdist.evaluate` scores), and writes the file with scipy.io.savemat: MATLAB 5 format, where the kit saves
7.3; MATLAB's `load` reads both alike, and so does scipy.io.loadmat. Every one of the 40 x 32 blocks must be
there (`--grid` for other sizes): a partial submission is refused, naming the blocks that are missing.
`TimeMPSrgb` counts the restoring only (not reading, and not a first, untimed pass that compiles kernels).

    python -m kitdist.sidd_submit --weights runs/finetune-sidd --shards runs/data/sidd/benchmark \\
        --out runs/sidd-submission/SubmitSrgb.mat --authors "A. Author"
"""

from __future__ import annotations

import argparse
import io
import re
import sys
import time
from collections.abc import Iterator, Sequence

import numpy as np
from tqdm import tqdm

from kitdist import storage
from kitdist.checkpoints import WeightsError
from kitdist.data.decode import CorruptSample, decode_rgb, image_bytes
from kitdist.data.shardio import ReadOptions, ShardCursor
from kitdist.data.stream import shard_set
from kitdist.data.transforms import to_float
from kitdist.inference import DEFAULT_TILE, Restorer, add_self_ensemble_argument, load_restorer
from kitdist.shards.manifest import Manifest, ManifestError, read_manifest
from kitdist.train.validation import to_uint8

BLOCK_KEY = re.compile(r"^(?P<split>.+)__image(?P<image>\d+)__block(?P<block>\d+)$")
OPTIONAL_FIELDS = ("MethodName", "Authors", "PaperTitle", "Venue")
SIDD_GRID = (40, 32)  # images x blocks of SIDD's validation and benchmark sets


class SubmissionError(ValueError):
    """A shard set that cannot make a complete submission; the message names the URL or the blocks."""


def block_samples(shards_url: str, manifest: Manifest) -> Iterator[tuple[str, int, int, np.ndarray]]:
    """(key, image, block, uint8 noisy block) for every sample of a SIDD block shard set (its manifest
    given), in manifest order."""
    if manifest.kind not in ("input", "paired"):
        raise SubmissionError(
            f"{shards_url}: holds {manifest.kind} samples; a SIDD block set (python -m kitdist.shards build "
            "sidd, split benchmark or val) holds input or paired ones"
        )
    if manifest.rejects:
        first = manifest.rejects[0]
        raise SubmissionError(
            f"{shards_url}: the build rejected {len(manifest.rejects)} block(s) (first: {first.path}: "
            f"{first.reason}); SIDD scores complete submissions only: rebuild from intact .mat files"
        )
    shards = shard_set(shards_url, manifest)
    cursor = ShardCursor(shards, 0, 1, ReadOptions())
    for shard, count in enumerate(shards.samples):
        for offset in range(count):
            sample = cursor.get(0, shard, offset)
            if sample is None:
                raise SubmissionError(f"{shards.urls[shard]}: no readable sample at offset {offset}")
            key = sample["__key__"]
            found = BLOCK_KEY.match(key)
            if found is None:
                raise SubmissionError(
                    f"{shards_url}: sample {key!r} is not a SIDD block (keys <split>__image<ii>__block<bb>, "
                    "as the sidd recipe writes them from the .mat files)"
                )
            try:
                pixels = decode_rgb(image_bytes(sample, "input"), key)
            except CorruptSample as err:
                raise SubmissionError(f"{shards.urls[shard]}: {err}") from None
            yield key, int(found["image"]), int(found["block"]), pixels


def denoise_blocks(
    restorer: Restorer, shards_url: str, grid: tuple[int, int] = SIDD_GRID, progress: bool = True
) -> tuple[np.ndarray, float, int]:
    """The `grid` (images x blocks) object array of denoised blocks (float32 [h, w, 3] in [0, 1], 8-bit
    levels), the seconds spent restoring (the first block's warm-up not counted), and the pixels restored."""
    manifest = read_manifest(shards_url)
    images, blocks = grid
    cells: dict[tuple[int, int], np.ndarray] = {}
    seconds, pixels = 0.0, 0
    for key, image, block, noisy in tqdm(
        block_samples(shards_url, manifest), total=manifest.total_samples, unit="block", disable=not progress,
        file=sys.stderr,
    ):  # fmt: skip
        if image >= images or block >= blocks:
            raise SubmissionError(
                f"{shards_url}: {key} lies outside the {images} x {blocks} blocks of a submission (--grid)"
            )
        if (image, block) in cells:
            raise SubmissionError(f"{shards_url}: {key} appears twice")
        degraded = to_float(noisy)
        if not cells:  # kernels are compiled or tuned on first use (Flex on CUDA): not denoising time
            restorer.restore(degraded, tile=DEFAULT_TILE)
        started = time.perf_counter()
        restored = restorer.restore(degraded, tile=DEFAULT_TILE)
        seconds += time.perf_counter() - started
        pixels += noisy.shape[0] * noisy.shape[1]
        cells[image, block] = to_float(to_uint8(restored))
    missing = [(i, b) for i in range(images) for b in range(blocks) if (i, b) not in cells]
    if missing:
        shown = ", ".join(f"{manifest.split}__image{i:02d}__block{b:02d}" for i, b in missing[:5])
        raise SubmissionError(
            f"{shards_url}: {len(missing)} of the {images} x {blocks} blocks missing ({shown}"
            f"{', ...' if len(missing) > 5 else ''}); SIDD scores complete submissions only"
        )
    cell_array = np.empty(grid, dtype=object)  # scipy.io.savemat writes an object array as a cell array
    for (image, block), denoised in cells.items():
        cell_array[image, block] = denoised
    return cell_array, seconds, pixels


def parse_grid(text: str) -> tuple[int, int]:
    """`40x32` -> (40, 32)."""
    images, _, blocks = text.partition("x")
    if not (images.isdigit() and blocks.isdigit() and int(images) > 0 and int(blocks) > 0):
        raise SubmissionError(f"--grid {text}: expected IMAGESxBLOCKS, e.g. 40x32")
    return int(images), int(blocks)


def submission_bytes(cells: np.ndarray, seconds_per_megapixel: float, optional: dict[str, str]) -> bytes:
    """SubmitSrgb.mat's bytes: DenoisedBlocksSrgb (cell), TimeMPSrgb (double), OptionalData (struct)."""
    import scipy.io

    buffer = io.BytesIO()
    scipy.io.savemat(
        buffer,
        {
            "DenoisedBlocksSrgb": cells,
            "TimeMPSrgb": float(seconds_per_megapixel),
            "OptionalData": {name: optional.get(name, "") for name in OPTIONAL_FIELDS},
        },
        do_compression=True,
    )
    return buffer.getvalue()


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m kitdist.sidd_submit",
        description="Denoise SIDD's benchmark blocks with trained KiT weights and write the submission "
        "file SIDD's authors score (SubmitSrgb.mat: DenoisedBlocksSrgb, TimeMPSrgb, OptionalData, as their "
        "MATLAB kit writes it).",
        epilog="--shards: a shard set built by `python -m kitdist.shards build sidd --src SIDD --out OUT` "
        "(OUT/benchmark from BenchmarkNoisyBlocksSrgb.mat; OUT/val from the validation files, to check the "
        "file against ValidationGtBlocksSrgb yourself). Weights: a weights.safetensors, a checkpoint folder "
        "or a run folder (newest step-*).",
    )
    parser.add_argument("--weights", required=True, help="URL of the weights")
    parser.add_argument("--shards", required=True, help="the SIDD block shard set (e.g. .../sidd/benchmark)")
    parser.add_argument("--out", required=True, help="URL of the .mat file to write (e.g. SubmitSrgb.mat)")
    parser.add_argument("--model", help="model size of a bare weights file")
    parser.add_argument(
        "--grid",
        default="x".join(map(str, SIDD_GRID)),
        metavar="IMAGESxBLOCKS",
        help=f"the blocks the file must hold ({SIDD_GRID[0]}x{SIDD_GRID[1]}: SIDD's)",
    )
    parser.add_argument("--method-name", default="", help="OptionalData.MethodName (default: KiT (<size>))")
    parser.add_argument("--authors", default="", help="OptionalData.Authors")
    parser.add_argument("--paper-title", default="", help="OptionalData.PaperTitle")
    parser.add_argument("--venue", default="", help="OptionalData.Venue")
    add_self_ensemble_argument(parser)
    parser.add_argument("--device", default="auto", help="auto (GPU when there is one), cpu, cuda")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        if not args.out.endswith(".mat"):
            raise SubmissionError(
                f"--out {args.out}: a MATLAB file name ending in .mat (SIDD: SubmitSrgb.mat)"
            )
        grid = parse_grid(args.grid)
        folder = args.out.rpartition("/")[0] or ("/" if args.out.startswith("/") else ".")
        storage.check_writable(folder)  # before the work, not after
        restorer = load_restorer(args.weights, args.model, args.device, self_ensemble=args.self_ensemble)
        cells, seconds, pixels = denoise_blocks(restorer, args.shards, grid, progress=not args.quiet)
        optional = {
            "MethodName": args.method_name or f"KiT ({restorer.size_name})",
            "Authors": args.authors,
            "PaperTitle": args.paper_title,
            "Venue": args.venue,
        }
        per_megapixel = seconds * 2**20 / pixels  # SIDD's TimeMP: seconds per 1024 x 1024 pixels
        storage.write_bytes(args.out, submission_bytes(cells, per_megapixel, optional))
    except (ValueError, WeightsError, ManifestError, storage.StorageError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    images, blocks = cells.shape
    print(
        f"{images} x {blocks} blocks denoised ({per_megapixel:.2f} s per megapixel on {restorer.device}); "
        f"wrote {args.out}"
    )
    return 0


if __name__ == "__main__":
    from kitdist.distributed.env import keep_freed_memory_in_this_program

    keep_freed_memory_in_this_program()  # as kitdist.restore and kitdist.evaluate do
    sys.exit(main(sys.argv[1:]))
