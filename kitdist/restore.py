"""`python -m kitdist.restore`: restore photographs with a trained KiT.

    python -m kitdist.restore --weights runs/embedded photo.jpg scans/ --out restored/

Inputs are image files or folders of them (not recursive). Each is read as 8-bit RGB, restored whole or in
overlapping tiles (see `kitdist.inference`) on the GPU when there is one, and written as `OUT/<name>.png`
(the file name kept, the extension now .png). Grayscale, palette, RGBA and 16-bit images are converted
to 8-bit RGB and the conversion is reported; grayscale results are saved as grayscale again. An unreadable
file is reported and skipped; the other inputs are still restored. Exit status: 0 when every input was
restored, 1 when some were skipped, 2 when nothing could start (bad weights, no inputs).
"""

from __future__ import annotations

import argparse
import io
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from kitdist import storage
from kitdist.inference import (
    DEFAULT_OVERLAP,
    DEFAULT_TILE,
    WeightsError,
    add_self_ensemble_argument,
    check_tiling,
    count_tiles,
    load_restorer,
)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".ppm")


@dataclass
class InputImage:
    path: Path
    size: tuple[int, int]  # (width, height) from the header
    mode: str


@dataclass
class RestoreReport:
    written: list[str]
    skipped: list[str]  # one message per input that could not be restored
    notices: list[str]  # conversions done


def collect_inputs(inputs: Sequence[str]) -> tuple[list[InputImage], list[str]]:
    """Image files named directly or found in the named folders, each opened (header only) once; and a
    message for every input that is missing, unreadable, or a folder without images."""
    found, problems = [], []
    for name in inputs:
        path = Path(name)
        if path.is_dir():
            files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
            if not files:
                problems.append(f"{path}: folder holds no images ({', '.join(IMAGE_SUFFIXES)})")
        elif path.exists():
            files = [path]
        else:
            problems.append(f"{path}: no such file or folder")
            files = []
        for file in files:
            try:
                with Image.open(file) as image:
                    found.append(InputImage(file, image.size, image.mode))
            except Exception as err:  # PIL raises many types for a file that is not an image
                problems.append(f"{file}: not a readable image ({type(err).__name__}: {err})")
    return found, problems


SIXTEEN_BIT_MODES = ("I", "I;16", "I;16B", "I;16L")
GRAY_MODES = ("1", "L", "LA", *SIXTEEN_BIT_MODES)


def read_rgb(item: InputImage) -> tuple[np.ndarray, str | None]:
    """float32 HWC RGB in [0, 1], and a notice when the file had to be converted to get there."""
    with Image.open(item.path) as image:
        image.load()
        if image.mode in SIXTEEN_BIT_MODES:  # 16-bit grayscale PNG: rounded to 8 bits like the rest
            gray = (np.asarray(image, dtype=np.float64) / 257.0).round().clip(0, 255).astype(np.uint8)
            rgb = np.repeat(gray[..., None], 3, axis=2)
        else:
            rgb = np.asarray(image if image.mode == "RGB" else image.convert("RGB"))
        transparent = "A" in image.mode or "transparency" in image.info
    return rgb.astype(np.float32) / 255.0, _conversion_notice(item, transparent)


def _conversion_notice(item: InputImage, transparent: bool) -> str | None:
    name, mode = item.path.name, item.mode
    if mode == "RGB":
        return None
    if mode in SIXTEEN_BIT_MODES:
        return f"{name}: 16-bit grayscale ({mode}) reduced to 8 bits, restored as RGB, saved as grayscale"
    if mode in GRAY_MODES:
        alpha = " (alpha channel dropped)" if transparent else ""
        return f"{name}: grayscale ({mode}) restored as RGB, saved as grayscale{alpha}"
    alpha = " (alpha channel dropped)" if transparent else ""
    return f"{name}: {mode} image converted to RGB{alpha}"


def encode_png(restored: np.ndarray, grayscale: bool) -> bytes:
    """8-bit PNG bytes of float HWC RGB in [0, 1] (rounded; grayscale as luma when asked)."""
    image = Image.fromarray((restored * 255.0).round().clip(0, 255).astype(np.uint8), "RGB")
    if grayscale:
        image = image.convert("L")
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def restore_files(
    restorer, items: list[InputImage], out: str, tile: int, overlap: int, batch: int, progress: bool
) -> RestoreReport:
    """Restores every item into `out` (a folder or URL); a file that fails is reported, not fatal."""
    report = RestoreReport([], [], [])
    total = sum(count_tiles(item.size[1], item.size[0], tile, overlap) for item in items)
    names: dict[str, Path] = {}
    with tqdm(total=total, unit="tile", desc="restoring", disable=not progress, file=sys.stderr) as bar:
        for item in items:
            name = item.path.stem + ".png"
            if name in names:
                report.skipped.append(f"{item.path}: its output {name} would overwrite that of {names[name]}")
                continue
            names[name] = item.path
            try:
                pixels, notice = read_rgb(item)
            except Exception as err:  # truncated or corrupt data only shows when decoding
                report.skipped.append(f"{item.path}: cannot decode ({type(err).__name__}: {err})")
                continue
            if notice:
                report.notices.append(notice)
                bar.write(f"note: {notice}", file=sys.stderr)
            restored = restorer.restore(pixels, tile, overlap, batch, on_tile=lambda: bar.update(1))
            grayscale = item.mode in GRAY_MODES
            storage.write_bytes(storage.join(out, name), encode_png(restored, grayscale))
            report.written.append(storage.join(out, name))
    return report


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m kitdist.restore",
        description="Restore images with a trained KiT. Writes OUT/<input name>.png (8-bit RGB; grayscale "
        "inputs stay grayscale). Large images are restored in overlapping, blended tiles.",
        epilog="Weights: a weights.safetensors, a checkpoint folder holding one (its config.yaml gives the "
        "model size), or a run folder (its newest step-* checkpoint); local path, file:// or s3://. "
        "Exit status 0: all restored; 1: some inputs skipped (each named); 2: nothing could start.",
    )
    parser.add_argument("inputs", nargs="+", metavar="INPUT", help="image files or folders of images")
    parser.add_argument("--weights", required=True, help="URL of the weights (see below)")
    parser.add_argument("--out", required=True, help="output folder or URL (created if missing)")
    parser.add_argument(
        "--model", help="model size of a bare weights file (default: from config.yaml or shapes)"
    )
    parser.add_argument(
        "--tile", type=int, default=DEFAULT_TILE, help=f"tile side, multiple of 32 ({DEFAULT_TILE})"
    )
    parser.add_argument(
        "--overlap", type=int, default=DEFAULT_OVERLAP, help=f"tile overlap ({DEFAULT_OVERLAP})"
    )
    parser.add_argument("--batch", type=int, default=1, help="tiles per forward pass (1)")
    parser.add_argument("--device", default="auto", help="auto (GPU when there is one), cpu, cuda, cuda:N")
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="fp32", help="bf16: autocast on GPU")
    add_self_ensemble_argument(parser)
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        check_tiling(args.tile, args.overlap)
        if args.batch < 1:
            raise ValueError(f"--batch must be >= 1, got {args.batch}")
        restorer = load_restorer(args.weights, args.model, args.device, args.precision, args.self_ensemble)
    except (ValueError, WeightsError, storage.StorageError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    items, problems = collect_inputs(args.inputs)
    for problem in problems:
        print(f"skipped: {problem}", file=sys.stderr)
    if not items:
        print("error: no images to restore among the inputs", file=sys.stderr)
        return 2
    print(
        f"model: {restorer.size_name} KiT from {restorer.weights_url} on {restorer.device}", file=sys.stderr
    )
    report = restore_files(restorer, items, args.out, args.tile, args.overlap, args.batch, not args.quiet)
    for problem in report.skipped:
        print(f"skipped: {problem}", file=sys.stderr)
    skipped = len(problems) + len(report.skipped)
    print(f"restored {len(report.written)} image(s) into {args.out}; skipped {skipped}")
    return 1 if skipped else 0


if __name__ == "__main__":
    from kitdist.distributed.env import keep_freed_memory_in_this_program

    keep_freed_memory_in_this_program()  # this program's process, not the library's (see there)
    sys.exit(main(sys.argv[1:]))
