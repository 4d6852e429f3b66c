"""Every recipe builds from real photographs laid out as its dataset, and plain webdataset reads it back.

The layout helpers here are shared by the other tests of kitdist.shards (`from test_shards_recipes import ...`).
Pairs are made with synthetic degradations (noise, blur, JPEG) of scikit-image's photographs.
"""

from __future__ import annotations

import functools
import io
import json
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from PIL import Image, ImageFilter

from kitdist.shards import build_shards, split_url
from kitdist.shards.manifest import read_manifest, shard_urls


def load_rgb(path: Path) -> Image.Image:
    with Image.open(path) as image:
        return image.convert("RGB")


@functools.lru_cache(maxsize=64)
def photo(path: Path) -> Image.Image:
    """A photograph scaled to at most 400 px a side: the same content, and layouts write quickly."""
    image = load_rgb(path)
    image.thumbnail((400, 400))
    return image


def noisy(image: Image.Image, seed: int) -> Image.Image:
    pixels = np.asarray(image, dtype=np.float32)
    noise = np.random.default_rng(seed).normal(0.0, 15.0, pixels.shape)
    return Image.fromarray(np.clip(pixels + noise, 0, 255).astype(np.uint8))


def blurred(image: Image.Image) -> Image.Image:
    return image.filter(ImageFilter.GaussianBlur(2.0))


def save(image: Image.Image, path: Path, **params) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, **({"compress_level": 1} if path.suffix.lower() == ".png" else {}), **params)


def lay_out(recipe: str, photos: list[Path], src: Path) -> dict[str, int]:
    """Writes `photos` under `src` as `recipe` expects; returns the expected sample count per split."""
    return LAYOUTS[recipe](photos, src)


def _folder(photos, src):
    for index, path in enumerate(photos):
        suffix = ".jpg" if index % 2 else ".png"
        save(photo(path), src / f"group{index % 3}" / "nested" / f"{path.stem}{suffix}", quality=90)
    (src / "notes.txt").write_text("not an image: ignored")
    return {"train": len(photos)}


def _imagenet(photos, src):
    wnids = ["n01440764", "n01443537", "n01484850"]
    for index, path in enumerate(photos):
        split = "val" if index % 4 == 3 else "train"
        save(photo(path), src / split / wnids[index % 3] / f"{wnids[index % 3]}_{index}.JPEG", quality=90)
    num_val = sum(1 for index in range(len(photos)) if index % 4 == 3)
    return {"train": len(photos) - num_val, "val": num_val}


def _sidd(photos, src):
    for index, path in enumerate(photos):
        scene = src / "Data" / f"{index:04d}_001_S6_00100_00060_3200_L"
        clean = photo(path)
        save(noisy(clean, index), scene / f"{index:04d}_NOISY_SRGB_010.PNG")
        save(clean, scene / f"{index:04d}_GT_SRGB_010.PNG")
    return {"train": len(photos)}


def _gopro(photos, src):
    for index, path in enumerate(photos):
        split = "test" if index % 4 == 3 else "train"
        sequence = src / split / f"GOPR0{index % 2}_07_00"
        clean = photo(path)
        save(blurred(clean), sequence / "blur" / f"{index:06d}.png")
        save(clean, sequence / "sharp" / f"{index:06d}.png")
    num_test = sum(1 for index in range(len(photos)) if index % 4 == 3)
    return {"train": len(photos) - num_test, "test": num_test}


def _rain13k(photos, src):
    num_test = 0
    for index, path in enumerate(photos):
        folder = src / "test" / ("Rain100H" if index % 2 else "Test100") if index % 4 == 3 else src / "train"
        num_test += index % 4 == 3
        clean = photo(path)
        save(noisy(clean, index), folder / "input" / f"{index}.png")
        save(clean, folder / "target" / f"{index}.png")
    return {"train": len(photos) - num_test, "test": num_test}


def _reds(photos, src):
    for index, path in enumerate(photos):
        split = "val" if index % 4 == 3 else "train"
        clean = photo(path)
        save(blurred(clean), src / f"{split}_blur_jpeg" / f"{index % 2:03d}" / f"{index:08d}.jpg", quality=60)
        save(clean, src / f"{split}_sharp" / f"{index % 2:03d}" / f"{index:08d}.png")
    num_val = sum(1 for index in range(len(photos)) if index % 4 == 3)
    return {"train": len(photos) - num_val, "val": num_val}


LAYOUTS = {
    "folder": _folder,
    "imagenet": _imagenet,
    "sidd": _sidd,
    "gopro": _gopro,
    "rain13k": _rain13k,
    "reds": _reds,
}


def read_samples(urls: list[str]) -> list[dict]:
    """Every sample of the shards, through plain webdataset (no kitdist code)."""
    return list(wds.WebDataset(urls, shardshuffle=False, empty_check=False))


def decode(data: bytes) -> Image.Image:
    with Image.open(io.BytesIO(data)) as image:
        return image.convert("RGB")


@pytest.mark.parametrize("recipe", sorted(LAYOUTS))
def test_recipe_builds_every_split_and_reads_back(recipe, photo_paths, tmp_path):
    src, out = tmp_path / "raw", str(tmp_path / "shards")
    expected = lay_out(recipe, photo_paths, src)
    manifests = build_shards(recipe, src, out, samples_per_shard=3, progress=False)
    assert {split: m.total_samples for split, m in manifests.items()} == expected
    for split, manifest in manifests.items():
        folder = split_url(out, recipe, split)
        assert read_manifest(folder) == manifest and manifest.split == split and not manifest.rejects
        samples = read_samples(shard_urls(folder, manifest))
        assert len(samples) == expected[split] == len({s["__key__"] for s in samples})
        for sample in samples:
            _check_against_source(sample, manifest.kind, src)


def _check_against_source(sample: dict, kind: str, src: Path) -> None:
    """Stored bytes are the source file's bytes (untiled JPEG/PNG sources are copied, not re-encoded)."""
    provenance = json.loads(sample["json"])
    roles = ["clean"] if kind == "clean" else ["input", "target"]
    for role in roles:
        source = src / provenance["source"][role]
        (field,) = [name for name in sample if name.startswith(f"{role}.")]
        assert field == f"{role}.{'jpg' if source.suffix.lower() in ('.jpg', '.jpeg') else 'png'}"
        assert sample[field] == source.read_bytes()
        assert list(decode(sample[field]).size) == provenance["size"]
    if "cls" in sample:
        assert int(sample["cls"]) == provenance["cls"]
        classes = sorted(path.name for path in (src / "train").iterdir())
        assert classes[provenance["cls"]] == Path(provenance["source"]["clean"]).parent.name


def test_tiles_are_aligned_crops_of_input_and_target(photo_paths, tmp_path):
    src, out = tmp_path / "raw", str(tmp_path / "shards")
    lay_out("reds", photo_paths[:4], src)
    manifests = build_shards("reds", src, out, splits=["train"], tile=128, stride=96, progress=False)
    samples = read_samples(shard_urls(split_url(out, "reds", "train"), manifests["train"]))
    boxes_seen = set()
    for sample in samples:
        provenance = json.loads(sample["json"])
        box = tuple(provenance["box"])
        assert sample["__key__"].endswith(f"__y{box[1]}_x{box[0]}") and box[2] - box[0] == 128
        for role in ("input", "target"):
            source = load_rgb(src / provenance["source"][role])
            tile = decode(sample[f"{role}.png"])  # JPEG inputs are tiled into lossless PNG
            assert np.array_equal(np.asarray(tile), np.asarray(source.crop(box)))
        boxes_seen.add((provenance["source"]["input"], box))
    width, height = load_rgb(src / provenance["source"]["input"]).size
    assert (provenance["source"]["input"], (width - 128, height - 128, width, height)) in boxes_seen
    assert len(samples) == len(boxes_seen) == manifests["train"].total_samples


def test_build_help_explains_split_folders_and_every_layout(capsys):
    from kitdist.shards.__main__ import main

    with pytest.raises(SystemExit) as exit_info:
        main(["build", "--help"])
    text = capsys.readouterr().out
    assert exit_info.value.code == 0 and "OUT/<split>/" in text and "--tile" in text
    assert all(f"  {recipe} (" in text for recipe in LAYOUTS)
    assert "SRC/Data/<scene>/<id>_NOISY_SRGB_<n>.PNG" in text
