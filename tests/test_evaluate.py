"""`python -m kitdist.evaluate` and the chart: PSNR/SSIM against scikit-image on the same images, reports
written locally and on the real S3 server, conventions stated, bad input named."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from PIL import Image
from restorekit import write_image
from shardkit import noisy
from skimage.color import rgb2ycbcr
from skimage.metrics import peak_signal_noise_ratio, structural_similarity
from test_shards_recipes import decode, read_samples

from kitdist import evaluate, storage
from kitdist.report import chart
from kitdist.shards import build_shards
from kitdist.shards.manifest import read_manifest, shard_urls
from kitdist.train.validation import image_metrics

CONTRACT = (
    "psnr_rgb",
    "ssim_rgb",
    "psnr_y",
    "ssim_y",
    "convention",
    "images",
    "params",
    "macs",
    "model_size",
)


@pytest.fixture(scope="module")
def test_photos(tmp_path_factory, photo_paths):
    """Three small crops (odd sizes) of real photographs, as a raw folder for the shard builder."""
    folder = tmp_path_factory.mktemp("photos")
    for index, path in enumerate(photo_paths[1:4]):
        pixels = np.asarray(Image.open(path).convert("RGB"))[: 70 + 9 * index, : 90 + 13 * index]
        write_image(folder / f"photo{index}.png", pixels)
    return folder


def skimage_metrics(output: np.ndarray, target: np.ndarray, border: int) -> dict[str, float]:
    """The reference: scikit-image on uint8 HWC images, data range 1, Y from skimage's rgb2ycbcr."""
    if border:
        output, target = output[border:-border, border:-border], target[border:-border, border:-border]
    values = {}
    for space, a, b in (
        ("rgb", output / 255.0, target / 255.0),
        ("y", rgb2ycbcr(output)[..., :1] / 255.0, rgb2ycbcr(target)[..., :1] / 255.0),
    ):
        values[f"psnr_{space}"] = peak_signal_noise_ratio(b, a, data_range=1.0)
        values[f"ssim_{space}"] = structural_similarity(
            a,
            b,
            data_range=1.0,
            channel_axis=2,
            gaussian_weights=True,
            sigma=1.5,
            use_sample_covariance=False,
        )
    return values


@pytest.mark.parametrize("border", [0, 4])
def test_image_metrics_equal_skimage(photo_paths, border):
    rng = np.random.default_rng(1)
    for path in photo_paths[:3]:
        target = np.asarray(Image.open(path).convert("RGB"))[:120, :150]
        output = np.clip(target + rng.normal(0, 12, target.shape), 0, 255).round().astype(np.uint8)
        ours, reference = (
            image_metrics(output, target, border),
            skimage_metrics(output, target, border),
        )
        for name in ("psnr_rgb", "psnr_y"):
            assert abs(ours[name] - reference[name]) < 1e-4, (name, ours[name], reference[name])
        for name in ("ssim_rgb", "ssim_y"):
            assert abs(ours[name] - reference[name]) < 1e-6, (name, ours[name], reference[name])


def test_evaluate_locally_matches_skimage_on_written_images(tmp_path, checkpoint, test_photos):
    shards = tmp_path / "shards"
    build_shards("folder", test_photos, str(shards), samples_per_shard=2, progress=False)
    out = tmp_path / "eval"
    results = evaluate.evaluate(
        str(checkpoint), str(shards), out_url=str(out), crop_border=2, save_images=True, num_grids=2,
        overrides=["degrade.noise_sigma=[25,25]"], tile=64, overlap=16, device="cpu", progress=False,
    )  # fmt: skip
    assert results["images"] == 3 and results["model_size"] == "debug"
    written = json.loads((out / "results.json").read_text())
    assert set(CONTRACT) | {"weights", "shards", "conventions"} <= set(written)
    assert "border 2 px" in written["conventions"]["psnr_y"] and "BT.601" in written["conventions"]["psnr_y"]
    for record in written["per_image"]:  # the restored PNG on disk against the source photograph
        restored = np.asarray(Image.open(out / "restored" / f"{record['key']}.png"))
        target = np.asarray(Image.open(test_photos / f"{record['key']}.png"))
        reference = skimage_metrics(restored, target, 2)
        for name in ("psnr_rgb", "psnr_y", "ssim_rgb", "ssim_y"):
            assert abs(record[name] - reference[name]) < 1e-4, (record["key"], name)
    assert abs(written["psnr_rgb"] - np.mean([r["psnr_rgb"] for r in written["per_image"]])) < 1e-9
    markdown = (out / "results.md").read_text()
    assert "| psnr_y |" in markdown and "| photo2 |" in markdown
    assert len(list((out / "grids").glob("*.png"))) == 2
    for png in [*(out / "grids").glob("*.png"), out / "chart.png"]:
        with Image.open(png) as image:
            image.verify()
            assert image.format == "PNG"


@pytest.mark.s3
def test_evaluate_cli_on_s3(s3_env, checkpoint, test_photos, capsys):
    shards, weights_folder, out = f"{s3_env}/shards", f"{s3_env}/run/step-2", f"{s3_env}/eval"
    build_shards("folder", test_photos, shards, samples_per_shard=2, progress=False)
    for name in ("weights.safetensors", "config.yaml"):
        storage.put_file(str(checkpoint / name), storage.join(weights_folder, name))
    argv = ["--weights", f"{s3_env}/run", "--shards", shards, "--out", out, "--quiet", "--max-images", "2"]
    assert evaluate.main([*argv, "--tile", "64", "--overlap", "16"]) == 0
    assert "psnr_y:" in capsys.readouterr().out
    results = json.loads(storage.read_text(f"{out}/results.json"))
    assert set(CONTRACT) <= set(results) and results["images"] == 2
    assert results["weights"] == f"{weights_folder}/weights.safetensors" and results["shards"] == shards
    assert set(storage.list_names(out)) >= {"results.json", "results.md", "chart.png", "grids"}


def test_evaluate_bad_shards_and_weights_are_named(tmp_path, checkpoint, capsys):
    assert evaluate.main(["--weights", str(checkpoint), "--shards", str(tmp_path / "none"), "--quiet"]) == 2
    assert f"{tmp_path / 'none'}/manifest.json: no manifest here" in capsys.readouterr().err
    argv = ["--weights", str(checkpoint), "--model", "kit", "--shards", str(tmp_path)]
    assert evaluate.main(argv) == 2
    assert "'debug'" in capsys.readouterr().err


def test_chart_cli_from_results(tmp_path):
    results = {"model_size": "debug", "images": 2, "macs": 3.37e9, "psnr_rgb": 27.5, "shards": "runs/val"}
    (tmp_path / "results.json").write_text(json.dumps(results))
    assert chart.main([str(tmp_path / "results.json"), "--out", str(tmp_path / "chart.png")]) == 0
    with Image.open(io.BytesIO((tmp_path / "chart.png").read_bytes())) as image:
        assert image.format == "PNG" and image.size[0] > 800


def test_benchmark_protocol_on_whole_frames_larger_than_the_tile(tmp_path, checkpoint, photo_paths):
    """A deraining test set (Y channel) built whole despite --tile, restored in 64 px tiles: the headline
    numbers are the Y ones, equal to scikit-image's on the restored files, whole frames measured."""
    src = tmp_path / "raw" / "test" / "Rain100L"
    rng = np.random.default_rng(3)
    for index, path in enumerate(photo_paths[4:5]):
        clean = np.asarray(Image.open(path).convert("RGB"))[:80, :112]
        rainy = np.clip(clean + rng.normal(0, 20, clean.shape), 0, 255).astype(np.uint8)
        write_image(src / "input" / f"{index}.png", rainy)
        write_image(src / "target" / f"{index}.png", clean)
    shards, out = tmp_path / "shards", tmp_path / "eval"
    build_shards("rain13k", tmp_path / "raw", str(shards), tile=64, progress=False)
    results = evaluate.evaluate(
        str(checkpoint), str(shards / "Rain100L"), out_url=str(out), benchmark="Rain100L", save_images=True,
        tile=64, overlap=16, device="cpu", progress=False,
    )  # fmt: skip
    bench = results["benchmark"]
    assert (bench["name"], bench["space"], bench["paper"]) == ("Rain100L", "y", None)
    assert (bench["psnr"], bench["ssim"]) == (results["psnr_y"], results["ssim_y"])
    assert "Y (BT.601 luma), border 0 px" in bench["convention"]
    for record in results["per_image"]:
        assert (record["width"], record["height"]) == (112, 80)  # whole frames, restored in 4 tiles
        restored = np.asarray(Image.open(out / "restored" / f"{record['key']}.png"))
        target = np.asarray(Image.open(src / "target" / f"{record['key'].rsplit('__', 1)[1]}.png"))
        reference = skimage_metrics(restored, target, 0)
        assert abs(record["psnr_y"] - reference["psnr_y"]) < 1e-4
        assert abs(record["ssim_y"] - reference["ssim_y"]) < 1e-6
    assert "Benchmark Rain100L:" in (out / "results.md").read_text()
    with pytest.raises(ValueError, match="benchmark SIDD is measured with border 0 px"):
        evaluate.evaluate(str(checkpoint), str(shards / "Rain100L"), benchmark="SIDD", crop_border=4)


@pytest.fixture(scope="module")
def noisy_pairs(tmp_path_factory, photo_paths) -> str:
    """Two photographs with Gaussian noise of sigma 25 saved as 8-bit files, in SIDD's layout, as shards."""
    src = tmp_path_factory.mktemp("sidd")
    for index, path in enumerate(photo_paths[1:3]):
        clean = np.asarray(Image.open(path).convert("RGB"))[:64, : 80 + 16 * index]
        scene = src / "Data" / f"{index:04d}_001_TEST_{index}"
        write_image(scene / f"{index:04d}_NOISY_SRGB_010.PNG", noisy(clean, scene.name, sigma=25))
        write_image(scene / f"{index:04d}_GT_SRGB_010.PNG", clean)
    out = str(tmp_path_factory.mktemp("sidd-shards"))
    build_shards("sidd", src, out, splits=["train"], progress=False)
    return f"{out}/train"


def test_bm3d_is_scored_on_the_same_inputs_as_the_model(tmp_path, checkpoint, noisy_pairs, capsys):
    """--bm3d-sigma: BM3D told the true sigma on each test input, scored in the model's conventions;
    the reference is bm3d_rgb on the saved noisy file and scikit-image's metrics."""
    from bm3d import bm3d_rgb

    out = tmp_path / "eval"
    argv = ["--weights", str(checkpoint), "--shards", noisy_pairs, "--out", str(out), "--quiet"]
    assert evaluate.main([*argv, "--tile", "64", "--overlap", "16", "--bm3d-sigma", "25"]) == 0
    assert "BM3D (bm3d_rgb, told sigma 25): PSNR RGB" in capsys.readouterr().out
    results = json.loads((out / "results.json").read_text())
    assert results["bm3d"]["sigma"] == 25 and len(results["per_image"]) == 2
    shards = wds_pairs(noisy_pairs)
    for record in results["per_image"]:
        noisy, clean = shards[record["key"]]
        denoised = np.clip(bm3d_rgb(noisy / 255.0, sigma_psd=25 / 255.0), 0, 1)
        reference = skimage_metrics((denoised * 255.0).round().astype(np.uint8), clean, 0)
        for name in ("psnr_rgb", "psnr_y", "ssim_rgb", "ssim_y"):
            assert abs(record[f"bm3d_{name}"] - reference[name]) < 1e-3, (record["key"], name)
        assert record["bm3d_psnr_rgb"] > record["input_psnr_rgb"] + 3  # it denoised
    for name in ("psnr_rgb", "ssim_y"):
        assert results["bm3d"][name] == pytest.approx(
            np.mean([r[f"bm3d_{name}"] for r in results["per_image"]])
        )
    assert "BM3D (bm3d_rgb, told sigma 25) on the same inputs" in (out / "results.md").read_text()


def test_self_ensemble_is_evaluated_and_said(tmp_path, checkpoint, noisy_pairs, capsys):
    """--self-ensemble: every image restored by the x8 ensemble (the per-image numbers are those of its
    output), and results.json, results.md and the summary line say so."""
    from kitdist.inference import load_restorer

    out = tmp_path / "eval"
    argv = [
        "--weights",
        str(checkpoint),
        "--shards",
        noisy_pairs,
        "--out",
        str(out),
        "--quiet",
        "--save-images",
    ]
    assert evaluate.main([*argv, "--tile", "64", "--overlap", "16", "--self-ensemble"]) == 0
    assert "model debug, x8 self-ensemble" in capsys.readouterr().out
    results = json.loads((out / "results.json").read_text())
    assert results["self_ensemble"] is True
    assert "with x8 self-ensemble (8 orientations averaged)" in (out / "results.md").read_text()
    ensemble = load_restorer(str(checkpoint), device="cpu", self_ensemble=True)
    plain = evaluate.evaluate(str(checkpoint), noisy_pairs, tile=64, overlap=16, progress=False)
    assert plain["self_ensemble"] is False
    assert results["macs"] == 8 * plain["macs"]  # what restoring an image costs as evaluated
    for record, plain_record in zip(results["per_image"], plain["per_image"], strict=True):
        noisy_input, clean = wds_pairs(noisy_pairs)[record["key"]]
        restored = ensemble.restore(noisy_input / np.float32(255.0), tile=64, overlap=16)
        assert np.array_equal(np.asarray(Image.open(out / "restored" / f"{record['key']}.png")),
                              (restored * 255).round().astype(np.uint8))  # fmt: skip
        assert record["psnr_rgb"] != plain_record["psnr_rgb"]


def wds_pairs(url: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """The shard set's (input, target) uint8 images by key, read with plain webdataset."""
    pairs = {}
    for sample in read_samples(shard_urls(url, read_manifest(url))):
        images = {
            k.split(".")[0]: np.asarray(decode(v))
            for k, v in sample.items()
            if k.startswith(("input", "target"))
        }
        pairs[sample["__key__"]] = (images["input"], images["target"])
    return pairs


def test_bm3d_not_installed_is_said_in_the_results_not_raised(tmp_path, checkpoint, noisy_pairs, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "bm3d", None)  # `import bm3d` now raises ImportError
    results = evaluate.evaluate(
        str(checkpoint), noisy_pairs, bm3d_sigma=25, tile=64, overlap=16, progress=False
    )
    assert "pip install bm3d" in results["bm3d"]["error"] and results["images"] == 2
    with pytest.raises(ValueError, match="--bm3d-sigma"):
        evaluate.evaluate(str(checkpoint), noisy_pairs, bm3d_sigma=0, progress=False)
