"""`python -m kitdist.sidd_submit`: SIDD's submission file from tiny .mat files in SIDD's own layout, read
back with scipy.io.loadmat (as MATLAB's `load` and SIDD's scorer read it); every block in its cell, bit for
bit the restorer's output of the .mat's block; incomplete and foreign shard sets refused by name."""

from __future__ import annotations

import io
import json
import shutil

import numpy as np
import pytest
import scipy.io
from PIL import Image
from restorekit import write_image
from test_shards_recipes import write_sidd_mats

from kitdist import sidd_submit, storage
from kitdist.evaluate import evaluate
from kitdist.inference import load_restorer
from kitdist.shards import build_shards
from kitdist.shards.manifest import read_manifest, shard_urls
from kitdist.train.validation import image_metrics, to_uint8

IMAGES, BLOCKS, SIDE = 3, 4, 32
GRID = f"{IMAGES}x{BLOCKS}"


@pytest.fixture(scope="module")
def sidd(tmp_path_factory, photo_paths):
    """The three .mat files ([3, 4, 32, 32, 3] uint8 each) and their val and benchmark shard sets."""
    src = tmp_path_factory.mktemp("sidd-src")
    arrays = write_sidd_mats(photo_paths, src, images=IMAGES, blocks=BLOCKS, side=SIDE)
    out = tmp_path_factory.mktemp("sidd-shards")
    build_shards("sidd", src, str(out), splits=["val", "benchmark"], samples_per_shard=5, progress=False)
    return arrays, out


def test_submission_holds_every_block_in_its_cell(tmp_path, checkpoint, sidd, capsys):
    arrays, shards = sidd
    out = tmp_path / "SubmitSrgb.mat"
    argv = ["--weights", str(checkpoint), "--shards", str(shards / "benchmark"), "--out", str(out), "--quiet"]
    assert sidd_submit.main([*argv, "--authors", "A. Author", "--device", "cpu", "--grid", GRID]) == 0
    assert f"{IMAGES} x {BLOCKS} blocks denoised" in capsys.readouterr().out
    written = scipy.io.loadmat(out)
    cells = written["DenoisedBlocksSrgb"]
    assert cells.dtype == object and cells.shape == (IMAGES, BLOCKS)
    restorer = load_restorer(str(checkpoint), device="cpu")
    for image in range(IMAGES):
        for block in range(BLOCKS):
            noisy = arrays["benchmark_input"][image, block].astype(np.float32) / 255.0
            expected = to_uint8(restorer.restore(noisy)).astype(np.float32) / 255.0
            cell = cells[image, block]
            assert cell.dtype == np.float32 and cell.shape == (SIDE, SIDE, 3)
            assert np.array_equal(cell, expected), (image, block)
    assert written["TimeMPSrgb"].shape == (1, 1) and written["TimeMPSrgb"][0, 0] > 0
    optional = written["OptionalData"][0, 0]
    assert optional["MethodName"][0] == "KiT (debug)" and optional["Authors"][0] == "A. Author"
    assert set(optional.dtype.names) == set(sidd_submit.OPTIONAL_FIELDS)


@pytest.mark.s3
def test_shards_and_submission_on_s3(s3_env, checkpoint, sidd, capsys):
    """Blocks read from the S3 server, the file written there: the same cells as from local shards."""
    arrays, shards = sidd
    for name in ("manifest.json", *(p.name for p in (shards / "benchmark").glob("*.tar"))):
        storage.put_file(str(shards / "benchmark" / name), f"{s3_env}/benchmark/{name}")
    out = f"{s3_env}/submission/SubmitSrgb.mat"
    argv = ["--weights", str(checkpoint), "--shards", f"{s3_env}/benchmark", "--out", out, "--quiet"]
    assert sidd_submit.main([*argv, "--device", "cpu", "--grid", GRID]) == 0
    cells = scipy.io.loadmat(io.BytesIO(storage.read_bytes(out)))["DenoisedBlocksSrgb"]
    restorer = load_restorer(str(checkpoint), device="cpu")
    noisy = arrays["benchmark_input"][2, 3].astype(np.float32) / 255.0
    assert np.array_equal(cells[2, 3], to_uint8(restorer.restore(noisy)).astype(np.float32) / 255.0)


def test_validation_file_scores_as_evaluate_does(tmp_path, checkpoint, sidd):
    """The val split's file against ValidationGtBlocksSrgb (what a user checks before submitting) gives
    `kitdist.evaluate`'s PSNR on the same shards."""
    arrays, shards = sidd
    out = tmp_path / "ValidationSrgb.mat"
    argv = ["--weights", str(checkpoint), "--shards", str(shards / "val"), "--out", str(out), "--quiet"]
    assert sidd_submit.main([*argv, "--device", "cpu", "--grid", GRID]) == 0
    cells = scipy.io.loadmat(out)["DenoisedBlocksSrgb"]
    psnr = [
        image_metrics((cells[i, b] * 255).round().astype(np.uint8), arrays["val_target"][i, b])["psnr_rgb"]
        for i in range(IMAGES)
        for b in range(BLOCKS)
    ]
    results = evaluate(str(checkpoint), str(shards / "val"), device="cpu", progress=False)
    assert results["images"] == IMAGES * BLOCKS
    assert np.mean(psnr) == pytest.approx(results["psnr_rgb"], abs=1e-6)


def test_incomplete_and_foreign_shard_sets_are_refused(tmp_path, checkpoint, sidd, photo_paths, capsys):
    _, shards = sidd
    # the benchmark's first shard alone (blocks 0-3 of image 0 and block 0 of image 1), under a manifest
    # that lists only it
    partial = tmp_path / "partial"
    partial.mkdir()
    manifest = json.loads((shards / "benchmark" / "manifest.json").read_text())
    manifest["shards"] = manifest["shards"][:1]
    manifest["total_samples"] = manifest["shards"][0]["samples"]
    (partial / "manifest.json").write_text(json.dumps(manifest))
    first = shard_urls(str(shards / "benchmark"), read_manifest(str(shards / "benchmark")))[0]
    shutil.copy(first, partial)
    out = tmp_path / "SubmitSrgb.mat"
    argv = ["--weights", str(checkpoint), "--out", str(out), "--quiet", "--device", "cpu", "--grid", GRID]
    assert sidd_submit.main([*argv, "--shards", str(partial)]) == 2
    err = capsys.readouterr().err
    assert "7 of the 3 x 4 blocks missing (benchmark__image01__block01, benchmark__image01__block02, " in err
    assert "benchmark__image02__block01, ...); SIDD scores complete submissions only" in err
    assert not out.exists()
    # SIDD's own 40 x 32 unless told otherwise; a block beyond the grid is named
    assert sidd_submit.main([*argv[:-2], "--shards", str(shards / "benchmark")]) == 2
    assert "1268 of the 40 x 32 blocks missing" in capsys.readouterr().err
    assert sidd_submit.main([*argv[:-1], "2x4", "--shards", str(shards / "benchmark")]) == 2
    assert "benchmark__image02__block00 lies outside the 2 x 4 blocks" in capsys.readouterr().err
    assert sidd_submit.main([*argv[:-1], "40-32", "--shards", str(shards / "benchmark")]) == 2
    assert "--grid 40-32: expected IMAGESxBLOCKS" in capsys.readouterr().err

    # a build that rejected a block (its manifest says so) makes no submission either
    rejected = tmp_path / "rejected"
    shutil.copytree(shards / "benchmark", rejected)
    manifest = json.loads((rejected / "manifest.json").read_text())
    manifest["rejects"] = [{"path": "BenchmarkNoisyBlocksSrgb.mat", "reason": "block 2, 3: unreadable"}]
    (rejected / "manifest.json").write_text(json.dumps(manifest))
    assert sidd_submit.main([*argv, "--shards", str(rejected)]) == 2
    assert "rejected 1 block(s) (first: BenchmarkNoisyBlocksSrgb.mat: block 2, 3" in capsys.readouterr().err

    photos = tmp_path / "photos"
    write_image(photos / "a.png", np.asarray(Image.open(photo_paths[0]).convert("RGB"))[:40, :40])
    build_shards("folder", photos, str(tmp_path / "clean"), progress=False)
    assert sidd_submit.main([*argv, "--shards", str(tmp_path / "clean")]) == 2
    assert "holds clean samples; a SIDD block set" in capsys.readouterr().err
    argv[argv.index("--out") + 1] = str(tmp_path / "SubmitSrgb.txt")
    assert sidd_submit.main([*argv, "--shards", str(shards / "val")]) == 2
    assert "a MATLAB file name ending in .mat" in capsys.readouterr().err
