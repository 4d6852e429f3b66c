"""Data for the demo pipeline (configs/pipeline/demo.yaml), built once and cached like the embedded
pre-training's: scikit-image's photographs, small, with synthetic degradations laid out as the real
datasets' recipes expect, then turned into shards by the same `build_shards` as the real data.

    <folder>/photos/{train,val}     clean shards for pre-training (kitdist.pretrain.ensure_photo_shards)
    <folder>/sidd/train             denoise pairs (Gaussian noise sigma 25), SIDD layout, training photos
    <folder>/sidd-test/train        the same from the held-out photos (SIDD's recipe has one split)
    <folder>/gopro/{train,test}     deblur pairs (Gaussian blur), GoPro layout, training / held-out photos
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter

from kitdist import storage

TRAIN_SIDE = 192  # training photos are scaled to this long side and cut into 64 px tiles
TEST_SIDE = 128  # held-out photos, evaluated whole
NOISE_SIGMA = 25.0
BLUR_SIGMA = 1.5


EMBEDDED_RUN = "runs/embedded"  # where `python -m kitdist.pretrain` (the embedded default) leaves its run


def embedded_weights(run: str = EMBEDDED_RUN) -> str:
    """The finished embedded default's weights.safetensors (its newest checkpoint), or "" if none."""
    from kitdist.checkpoints import newest_weights

    return newest_weights(os.path.abspath(run))


def with_embedded_weights(spec):  # a PipelineSpec; typed loosely to keep this module free of the planner
    """The demo pipeline started from the embedded default's trained weights when they exist: the
    fine-tunes then begin from a real denoiser (a few demo pre-training steps restore nothing)."""
    weights = embedded_weights()
    if not weights or not spec.pretrain.config:
        print(
            f"pre-training {spec.pretrain.config} for a few steps; the fine-tunes start from the embedded "
            f"default's weights instead once `python -m kitdist.pretrain` has left them in {EMBEDDED_RUN}",
            flush=True,
        )
        return spec
    print(
        f"fine-tunes start from the embedded default's weights: {weights} (pre-training skipped)", flush=True
    )
    return dataclasses.replace(spec, pretrain=dataclasses.replace(spec.pretrain, config="", weights=weights))


def ensure_demo_shards(folder: str) -> dict[str, str]:
    """Builds what is missing (a finished set has its manifest) and returns the shard URLs by name."""
    from kitdist.pretrain import NUM_VAL_PHOTOS, ensure_photo_shards, photo_paths

    urls = {
        "sidd_train": storage.join(folder, "sidd", "train"),
        "sidd_test": storage.join(folder, "sidd-test", "train"),
        "gopro_train": storage.join(folder, "gopro", "train"),
        "gopro_test": storage.join(folder, "gopro", "test"),
    }
    urls["photos_train"], urls["photos_val"] = ensure_photo_shards(storage.join(folder, "photos"))
    if all(storage.exists(storage.join(url, "manifest.json")) for url in urls.values()):
        return urls
    photos = photo_paths()
    train, test = photos[:-NUM_VAL_PHOTOS], photos[-NUM_VAL_PHOTOS:]
    raw = Path(folder) / "raw"
    print(f"building the demo's paired shards under {folder} (once)", flush=True)
    sidd_train, sidd_test = (
        _lay_out_sidd(train, raw / "sidd", TRAIN_SIDE),
        _lay_out_sidd(test, raw / "sidd-test", TEST_SIDE),
    )
    _build("sidd", sidd_train, storage.join(folder, "sidd"), splits=["train"], tile=64)
    _build("sidd", sidd_test, storage.join(folder, "sidd-test"), splits=["train"])
    _lay_out_gopro(train, raw / "gopro" / "train", TRAIN_SIDE)
    _lay_out_gopro(test, raw / "gopro" / "test", TEST_SIDE)
    _build("gopro", raw / "gopro", storage.join(folder, "gopro"), splits=["train"], tile=64)
    _build("gopro", raw / "gopro", storage.join(folder, "gopro"), splits=["test"])
    return urls


def _build(
    recipe: str, src: Path, out: str, splits: list[str] | None = None, tile: int | None = None
) -> None:
    from kitdist.shards import build_shards

    build_shards(recipe, src, out, splits=splits, samples_per_shard=8, tile=tile, stride=tile, progress=False)


def _small(path: Path, side: int) -> Image.Image:
    with Image.open(path) as image:
        small = image.convert("RGB")
    small.thumbnail((side, side))
    # whole multiples of 32 so that evaluation needs no padding and tiles cover the image
    width, height = small.width // 32 * 32, small.height // 32 * 32
    return small.crop((0, 0, width, height))


def _noisy(image: Image.Image, seed: int) -> Image.Image:
    pixels = np.asarray(image, dtype=np.float32)
    noise = np.random.default_rng(seed).normal(0.0, NOISE_SIGMA, pixels.shape)
    return Image.fromarray(np.clip(pixels + noise, 0, 255).round().astype(np.uint8))


def _lay_out_sidd(photos: list[Path], src: Path, side: int) -> Path:
    for index, path in enumerate(photos):
        scene = src / "Data" / f"{index:04d}_001_DEMO_{path.stem}"
        scene.mkdir(parents=True, exist_ok=True)
        clean = _small(path, side)
        _noisy(clean, index).save(scene / f"{index:04d}_NOISY_SRGB_010.PNG", compress_level=1)
        clean.save(scene / f"{index:04d}_GT_SRGB_010.PNG", compress_level=1)
    return src


def _lay_out_gopro(photos: list[Path], split_dir: Path, side: int) -> None:
    for path in photos:
        sequence = split_dir / f"DEMO_{path.stem}"
        (sequence / "blur").mkdir(parents=True, exist_ok=True)
        (sequence / "sharp").mkdir(parents=True, exist_ok=True)
        sharp = _small(path, side)
        sharp.filter(ImageFilter.GaussianBlur(BLUR_SIGMA)).save(
            sequence / "blur" / "000000.png", compress_level=1
        )
        sharp.save(sequence / "sharp" / "000000.png", compress_level=1)
