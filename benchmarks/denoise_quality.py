"""Denoising quality of trained KiT weights against non-local means and BM3D, on held-out photographs.

    python benchmarks/denoise_quality.py --weights embedded=runs/embedded --weights long=runs/embedded-200

The photographs are the ones the embedded default run holds out for validation (the last
`kitdist.pretrain.NUM_VAL_PHOTOS` of `kitdist.pretrain.photo_paths()`), so none was seen in training; the
script checks that against the training shards' source folder when it exists. `--photos A.jpg B.png ...`
measures on other photographs instead (ones outside the project, that no recipe was tuned on). Each is cut to
its centre `--crop` square (0: whole) and given additive white Gaussian noise of sigma 15, 25, 50 (0-255
scale, seeded, unclipped as in the AWGN benchmarks and as training's degradation). Methods, all told the true
sigma: non-local means (scikit-image `denoise_nl_means`, fast mode, 5x5 patches, distance 6, h = 0.8 sigma as
in scikit-image's documentation example), BM3D (PyPI `bm3d`, `bm3d_rgb(sigma_psd=sigma/255)`), and each
`--weights` (with `--self-ensemble` also each weights' x8 self-ensemble, "NAME x8"). PSNR/SSIM as `kitdist.evaluate` measures them (RGB, 8-bit rounded, data range 1, no border crop);
means over the photographs. Prints a Markdown table; writes a comparison grid at sigma 25.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

from kitdist import storage
from kitdist.inference import load_restorer
from kitdist.pretrain import EMBEDDED_DATA, NUM_VAL_PHOTOS, photo_paths
from kitdist.report import comparison_grid
from kitdist.train.validation import image_metrics, to_uint8

SIGMAS = (15, 25, 50)
NLM_H_FACTOR = 0.8  # scikit-image's example: h = 0.8 * sigma in fast mode


def held_out_photos() -> list[Path]:
    """The photographs the embedded default validates on, never trained on."""
    chosen = photo_paths()[-NUM_VAL_PHOTOS:]
    trained = Path(EMBEDDED_DATA) / "source" / "train"
    if trained.is_dir():
        overlap = {p.name for p in chosen} & {p.name for p in trained.iterdir()}
        if overlap:
            raise RuntimeError(f"{sorted(overlap)} are in the training source {trained}; not held out")
    return chosen


def centre_crop(pixels: np.ndarray, side: int) -> np.ndarray:
    if not side:
        return pixels
    height, width = pixels.shape[:2]
    side = min(side, height, width)
    top, left = (height - side) // 2, (width - side) // 2
    return pixels[top : top + side, left : left + side]


def classical_methods() -> dict:
    from bm3d import bm3d_rgb
    from skimage.restoration import denoise_nl_means

    def nlm(noisy: np.ndarray, sigma: float) -> np.ndarray:
        return denoise_nl_means(noisy, h=NLM_H_FACTOR * sigma, sigma=sigma, fast_mode=True, patch_size=5,
                                patch_distance=6, channel_axis=-1)  # fmt: skip

    return {"non-local means": nlm, "BM3D": lambda noisy, sigma: bm3d_rgb(noisy, sigma_psd=sigma)}


def run(
    weights: dict[str, str], photos: list[Path], crop: int, tile: int, self_ensemble: bool = False
) -> tuple[list[dict], dict[str, np.ndarray]]:
    """One row per (sigma, method, photo); and the sigma-25 outputs of the first photo for the grid."""
    methods = classical_methods()
    for name, url in weights.items():
        restorer = load_restorer(url, device="auto")
        variants = {name: restorer}
        if self_ensemble:
            variants[f"{name} x8"] = dataclasses.replace(restorer, self_ensemble=True)
        for label, variant in variants.items():
            methods[label] = lambda noisy, sigma, r=variant: r.restore(noisy.astype(np.float32), tile=tile)
    rows, grid = [], {}
    for index, path in enumerate(photos):
        clean = centre_crop(np.asarray(Image.open(path).convert("RGB")), crop)
        for sigma in SIGMAS:
            rng = np.random.default_rng(1000 * index + sigma)
            noisy = clean / 255.0 + rng.normal(0.0, sigma / 255.0, clean.shape)
            outputs = {"noisy input": (noisy, 0.0)}
            for name, method in methods.items():
                started = time.perf_counter()
                outputs[name] = (method(noisy, sigma / 255.0), time.perf_counter() - started)
            for name, (output, seconds) in outputs.items():
                values = image_metrics(to_uint8(output), clean)
                rows.append(
                    {"sigma": sigma, "method": name, "photo": path.name, "seconds": seconds, **values}
                )
                if index == 0 and sigma == 25:
                    grid[name] = np.clip(output, 0, 1)
            print(f"{path.name} sigma {sigma}: done", file=sys.stderr, flush=True)
        if index == 0:
            grid["clean"] = clean / 255.0
    return rows, grid


def table(rows: list[dict]) -> str:
    lines = ["| sigma | method | PSNR (dB) | SSIM | s / photo | vs NLM (dB) |", "|---|---|---|---|---|---|"]
    keys = list(dict.fromkeys((r["sigma"], r["method"]) for r in rows))

    def mean(sigma, method, field):
        return float(np.mean([r[field] for r in rows if r["sigma"] == sigma and r["method"] == method]))

    for sigma, method in keys:
        psnr = mean(sigma, method, "psnr_rgb")
        delta = psnr - mean(sigma, "non-local means", "psnr_rgb")
        lines.append(f"| {sigma} | {method} | {psnr:.2f} | {mean(sigma, method, 'ssim_rgb'):.4f} | "
                     f"{mean(sigma, method, 'seconds'):.2f} | {delta:+.2f} |")  # fmt: skip
    return "\n".join(lines)


def per_photo_table(rows: list[dict], sigma: int = 25) -> str:
    """PSNR per photograph at one sigma: a mean can hide a method that wins on one kind of picture."""
    methods = list(dict.fromkeys(r["method"] for r in rows))
    photos = list(dict.fromkeys(r["photo"] for r in rows))
    psnr = {(r["photo"], r["method"]): r["psnr_rgb"] for r in rows if r["sigma"] == sigma}
    lines = [f"| photo (sigma {sigma}) | " + " | ".join(methods) + " |", "|---" * (len(methods) + 1) + "|"]
    lines += [
        f"| {photo} | " + " | ".join(f"{psnr[photo, m]:.2f}" for m in methods) + " |" for photo in photos
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--weights", action="append", default=[], metavar="NAME=URL", help="KiT weights to compare"
    )
    parser.add_argument(
        "--photos",
        nargs="+",
        type=Path,
        metavar="PHOTO",
        help="photographs to measure on (default: the embedded default's two held-out ones)",
    )
    parser.add_argument("--crop", type=int, default=256, help="centre square side per photo (0: whole; 256)")
    parser.add_argument("--tile", type=int, default=512, help="restore tile side (512)")
    parser.add_argument(
        "--self-ensemble", action="store_true", help="also each weights' x8 self-ensemble (NAME x8)"
    )
    parser.add_argument(
        "--out", default="runs/denoise_quality", help="folder for the grid (runs/denoise_quality)"
    )
    args = parser.parse_args(argv)
    weights = dict(item.split("=", 1) for item in args.weights)
    photos = args.photos or held_out_photos()
    missing = [str(path) for path in photos if not path.is_file()]
    if missing:
        parser.error(f"--photos: no such file: {', '.join(missing)}")
    print(f"photographs: {', '.join(p.name for p in photos)}; crop {args.crop or 'none'}")
    rows, grid = run(weights, photos, args.crop, args.tile, args.self_ensemble)
    print(table(rows))
    print()
    print(per_photo_table(rows))
    labels = [name for name in grid if name != "clean"] + ["clean"]
    png = comparison_grid(
        [(f"{name} (sigma 25)" if name != "clean" else "clean", grid[name]) for name in labels]
    )
    storage.write_bytes(storage.join(args.out, "grid_sigma25.png"), png)
    print(f"grid: {storage.join(args.out, 'grid_sigma25.png')}")
    return 0


if __name__ == "__main__":
    from kitdist.distributed.env import keep_freed_memory_in_this_program

    keep_freed_memory_in_this_program()  # as kitdist.restore and kitdist.evaluate do
    sys.exit(main())
