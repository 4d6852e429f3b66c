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


SIDD_MATS = {  # file -> variable, as SIDD distributes them
    "val_input": ("ValidationNoisyBlocksSrgb.mat", "ValidationNoisyBlocksSrgb"),
    "val_target": ("ValidationGtBlocksSrgb.mat", "ValidationGtBlocksSrgb"),
    "benchmark_input": ("BenchmarkNoisyBlocksSrgb.mat", "BenchmarkNoisyBlocksSrgb"),
}


def sidd_blocks(photos: list[Path], images: int, blocks: int, side: int) -> np.ndarray:
    """[images, blocks, side, side, 3] uint8 ground-truth blocks cut from the photographs (SIDD's layout:
    image i's blocks come from one photograph)."""
    out = np.zeros((images, blocks, side, side, 3), np.uint8)
    for image in range(images):
        pixels = np.asarray(photo(photos[image % len(photos)]))
        for block in range(blocks):
            top, left = (block * 7) % (pixels.shape[0] - side), (block * side) % (pixels.shape[1] - side)
            out[image, block] = pixels[top : top + side, left : left + side]
    return out


def write_sidd_mats(photos: list[Path], src: Path, images: int = 2, blocks: int = 3, side: int = 32) -> dict:
    """SIDD's three .mat files (MATLAB v5, one uint8 [images, blocks, h, w, 3] variable each, written with
    scipy.io.savemat as MATLAB's `save` writes them); returns the arrays by SIDD_MATS name."""
    import scipy.io

    clean = sidd_blocks(photos, images, blocks, side)
    rng = np.random.default_rng(7)
    arrays = {
        "val_input": np.clip(clean + rng.normal(0, 15, clean.shape), 0, 255).astype(np.uint8),
        "val_target": clean,
        "benchmark_input": np.clip(clean[::-1] + rng.normal(0, 15, clean.shape), 0, 255).astype(np.uint8),
    }
    src.mkdir(parents=True, exist_ok=True)
    for name, (file, variable) in SIDD_MATS.items():
        scipy.io.savemat(src / file, {variable: arrays[name]}, do_compression=True)
    return arrays


def _sidd(photos, src):
    for index, path in enumerate(photos):
        scene = src / "Data" / f"{index:04d}_001_S6_00100_00060_3200_L"
        clean = photo(path)
        save(noisy(clean, index), scene / f"{index:04d}_NOISY_SRGB_010.PNG")
        save(clean, scene / f"{index:04d}_GT_SRGB_010.PNG")
    write_sidd_mats(photos, src)
    return {"train": len(photos), "val": 6, "benchmark": 6}


def _hide(photos, src):
    for index, path in enumerate(photos):
        shot = "test-close-ups" if index % 2 else "test-long-shot"
        clean = photo(path)
        save(blurred(clean), src / "test" / shot / f"{index}fromGOPR0950.png")
        save(clean, src / "GT" / f"{index}fromGOPR0950.png")
    save(photo(photos[0]), src / "GT" / "trainonly.png")  # GT/ also holds the training targets
    return {"test": len(photos)}


def _gopro(photos, src):
    for index, path in enumerate(photos):
        split = "test" if index % 4 == 3 else "train"
        sequence = src / split / f"GOPR0{index % 2}_07_00"
        clean = photo(path)
        save(blurred(clean), sequence / "blur" / f"{index:06d}.png")
        save(clean, sequence / "sharp" / f"{index:06d}.png")
    num_test = sum(1 for index in range(len(photos)) if index % 4 == 3)
    return {"train": len(photos) - num_test, "test": num_test}


RAIN13K_TEST_SETS = ("Rain100H", "Rain100L", "Test100", "Test1200", "Test2800")


def _rain13k(photos, src):
    counts = dict.fromkeys(("train", *RAIN13K_TEST_SETS), 0)
    for index, path in enumerate(photos):
        split = RAIN13K_TEST_SETS[index % 5] if index % 2 else "train"
        counts[split] += 1
        folder = src / "train" if split == "train" else src / "test" / split
        clean = photo(path)
        save(noisy(clean, index), folder / "input" / f"{index}.png")
        save(clean, folder / "target" / f"{index}.png")
    return {split: count for split, count in counts.items() if count}


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
    "hide": _hide,
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
    roles = {"clean": ["clean"], "input": ["input"]}.get(kind, ["input", "target"])
    if "block" in provenance:  # a block of a MATLAB array, stored as lossless PNG
        _check_block(sample, roles, provenance, src)
        return
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


def _check_block(sample: dict, roles: list[str], provenance: dict, src: Path) -> None:
    import scipy.io

    image, block = provenance["image"], provenance["block"]
    assert sample["__key__"].endswith(f"__image{image:02d}__block{block:02d}")
    for role in roles:
        file, variable = provenance["source"][role].split(":")
        expected = scipy.io.loadmat(src / file)[variable][image, block]
        assert np.array_equal(np.asarray(decode(sample[f"{role}.png"])), expected)


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


def test_sidd_readme_command_tiles_frames_and_keeps_blocks_whole_in_order(photo_paths, tmp_path, capsys):
    """The README's SIDD command: training frames tiled; the validation blocks whole, paired, bit-exact
    and in SIDD's [image, block] order across shards; the benchmark's noisy blocks alone (kind input)."""
    from kitdist.shards.__main__ import main
    from kitdist.shards.verify import verify

    src, out = tmp_path / "raw", str(tmp_path / "sidd")
    lay_out("sidd", photo_paths[:2], src)
    arrays = write_sidd_mats(photo_paths, src, images=3, blocks=4, side=48)
    argv = ["build", "sidd", "--src", str(src), "--out", out, "--tile", "128", "--stride", "96"]
    assert main([*argv, "--samples-per-shard", "5", "--no-progress"]) == 0
    assert "split val" not in capsys.readouterr().err  # blocks are whole by nature: no note about --tile
    train, val, bench = (
        read_manifest(split_url(out, "sidd", split)) for split in ("train", "val", "benchmark")
    )
    assert train.options["tile"] == 128 and val.options["tile"] is None and bench.options["tile"] is None
    assert (val.kind, bench.kind, len(val.shards)) == ("paired", "input", 3)
    samples = read_samples(shard_urls(split_url(out, "sidd", "val"), val))
    order = [(image, block) for image in range(3) for block in range(4)]
    assert [s["__key__"] for s in samples] == [f"val__image{i:02d}__block{b:02d}" for i, b in order]
    for sample, (image, block) in zip(samples, order, strict=True):
        assert np.array_equal(np.asarray(decode(sample["input.png"])), arrays["val_input"][image, block])
        assert np.array_equal(np.asarray(decode(sample["target.png"])), arrays["val_target"][image, block])
    benchmark = read_samples(shard_urls(split_url(out, "sidd", "benchmark"), bench))
    assert [sorted(k for k in s if not k.startswith("__")) for s in benchmark] == [["input.png", "json"]] * 12
    assert np.array_equal(np.asarray(decode(benchmark[-1]["input.png"])), arrays["benchmark_input"][2, 3])
    assert verify(out, deep=True) == []


def test_per_split_tiling_keeps_test_splits_whole_unless_named(photo_paths, tmp_path, capsys):
    from kitdist.shards.__main__ import main

    src = tmp_path / "raw"
    expected = lay_out("gopro", photo_paths[:4], src)
    base = ["build", "gopro", "--src", str(src), "--no-progress", "--tile", "128", "--stride", "96"]
    assert main([*base, "--out", str(tmp_path / "a")]) == 0
    assert "note: split test is a test split: stored whole, not tiled" in capsys.readouterr().err
    test = read_manifest(str(tmp_path / "a" / "test"))
    assert test.total_samples == expected["test"] and test.options["tile"] is None
    assert read_manifest(str(tmp_path / "a" / "train")).total_samples > expected["train"]
    assert main([*base, "--out", str(tmp_path / "b"), "--tile", "test=64", "--stride", "test=64"]) == 0
    tiled = read_manifest(str(tmp_path / "b" / "test"))
    assert (tiled.options["tile"], tiled.options["stride"]) == (64, 64)
    assert tiled.total_samples > expected["test"]
    assert main([*base, "--out", str(tmp_path / "c"), "--tile", "val=64"]) == 2
    assert "no split 'val' in recipe gopro" in capsys.readouterr().err


def test_mat_files_of_another_layout_are_named(photo_paths, tmp_path):
    import scipy.io

    from kitdist.shards import RecipeError

    src = tmp_path / "raw"
    write_sidd_mats(photo_paths, src)
    scipy.io.savemat(src / "ValidationGtBlocksSrgb.mat", {"GtBlocks": np.zeros((2, 3, 32, 32, 3), np.uint8)})
    with pytest.raises(RecipeError, match="ValidationGtBlocksSrgb.mat: no variable 'ValidationGtBlocksSrgb'"):
        build_shards("sidd", src, str(tmp_path / "a"), splits=["val"], progress=False)
    scipy.io.savemat(src / "ValidationGtBlocksSrgb.mat", {"ValidationGtBlocksSrgb": np.zeros((6, 32, 32, 3))})
    with pytest.raises(RecipeError, match=r"is double \[6, 32, 32, 3\]; expected uint8 \[images, blocks"):
        build_shards("sidd", src, str(tmp_path / "b"), splits=["val"], progress=False)
