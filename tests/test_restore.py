"""`python -m kitdist.restore` and the tiling under it: a real (tiny, exported-by-training) KiT on real
photographs; tiled against whole-image restoration, seams, formats and sizes, and every bad input."""

from __future__ import annotations

import dataclasses
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from restorekit import write_image

from kitdist import restore
from kitdist.data import transforms
from kitdist.inference import WeightsError, load_restorer, restore_tiled


@pytest.fixture(scope="module")
def restorer(checkpoint):
    return load_restorer(str(checkpoint), device="cpu")


def noisy_crop(photo, height: int, width: int, sigma: float = 25.0) -> np.ndarray:
    clean = np.asarray(Image.open(photo).convert("RGB"))[:height, :width] / 255.0
    return (clean + np.random.default_rng(0).normal(0, sigma / 255, clean.shape)).astype(np.float32)


def test_tiles_equal_whole_image_for_a_local_model():
    """A model that sees 2 px around each pixel: tiles blended with zero weight near inner edges give
    exactly the whole-image result, on sizes that are no multiple of anything."""
    torch.manual_seed(0)
    local = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.GELU(), torch.nn.Conv2d(8, 3, 3, padding=1)
    )
    image = torch.rand(3, 151, 233)
    with torch.no_grad():
        whole = local(image[None])[0]
        tiled = restore_tiled(local, image, tile=96, overlap=32, batch=3)
    assert torch.allclose(tiled, whole, atol=1e-5), (tiled - whole).abs().max()


def column_jumps(output: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """Per interior column: mean |step| of (output - reference) across it, relative to the mean over all.
    The 8 columns at each image edge are left out: there the whole image is reflect-padded to a multiple
    of 32 and an edge tile may not be, a difference at the image's border, not a seam."""
    steps = np.abs(np.diff((output - reference).mean(axis=2), axis=1)).mean(axis=0)[8:-8]
    return steps / steps.mean()


def test_kit_tiled_close_to_whole_and_seamless(restorer, photo_paths):
    noisy = noisy_crop(photo_paths[1], 160, 300)
    whole = restorer.restore(noisy, tile=512)  # one tile: the whole image
    tiled = restorer.restore(noisy, tile=96, overlap=32)
    assert 10 * np.log10(1 / np.mean((tiled - whole) ** 2)) > 40  # dB between the two
    # Negative control: hard-cut tiles (no overlap) leave seams the measure must see.
    x = torch.from_numpy(noisy).permute(2, 0, 1)
    cut = torch.cat(
        [restorer.forward(x[None, :, :, left : left + 96])[0] for left in range(0, 300, 96)], dim=2
    )
    cut = cut.clamp(0, 1).permute(1, 2, 0).numpy()
    assert column_jumps(cut, whole).max() > 5
    assert column_jumps(tiled, whole).max() < 3


def test_cli_restores_sizes_and_formats_and_reports_bad_inputs(
    tmp_path, checkpoint, restorer, photo_paths, capsys
):
    photo = np.asarray(Image.open(photo_paths[2]).convert("RGB"))
    inputs = tmp_path / "in"
    odd = write_image(inputs / "odd.png", photo[:37, :53])
    write_image(inputs / "photo.jpg", photo[:45, :70])
    write_image(inputs / "gray.png", photo[:40, :40, 0], "L")
    rgba = np.concatenate([photo[:33, :65], np.full((33, 65, 1), 128, np.uint8)], axis=2)
    write_image(inputs / "alpha.png", rgba, "RGBA")
    (inputs / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    (tmp_path / "empty").mkdir()
    out = tmp_path / "out"
    code = restore.main(
        ["--weights", str(checkpoint), str(inputs), str(tmp_path / "empty"), "--out", str(out), "--quiet"]
    )
    err = capsys.readouterr().err
    assert code == 1
    assert "broken.png: not a readable image" in err and "empty: folder holds no images" in err
    assert "gray.png: grayscale (L) restored as RGB, saved as grayscale" in err
    assert "alpha.png: RGBA image converted to RGB (alpha channel dropped)" in err
    expected = {"odd.png": ((53, 37), "RGB"), "photo.png": ((70, 45), "RGB"), "gray.png": ((40, 40), "L")}
    expected["alpha.png"] = ((65, 33), "RGB")
    assert sorted(p.name for p in out.iterdir()) == sorted(expected)
    for name, (size, mode) in expected.items():
        with Image.open(out / name) as image:
            assert (image.format, image.size, image.mode) == ("PNG", size, mode)
    direct = restorer.restore(np.asarray(Image.open(odd), dtype=np.float32) / 255.0)
    assert np.array_equal(np.asarray(Image.open(out / "odd.png")), (direct * 255).round().astype(np.uint8))


def test_self_ensemble_is_the_mean_of_the_eight_orientations(tmp_path, checkpoint, restorer, photo_paths):
    """x8: each of the data pipeline's 8 orientations (`transforms.orient`, numpy) restored, turned back and
    averaged, then clamped; on a non-square crop, so the quarter turns swap height and width. The CLI's
    --self-ensemble writes that image."""
    noisy = noisy_crop(photo_paths[1], 48, 80)
    outputs = []
    for code in range(8):
        oriented = torch.from_numpy(np.ascontiguousarray(transforms.orient(noisy, code))).permute(2, 0, 1)
        restored = restorer.forward(oriented[None])[0].permute(1, 2, 0).numpy()
        back = np.rot90(restored, k=-(code & 3), axes=(0, 1))
        outputs.append(back[:, ::-1] if code & 4 else back)
    reference = np.clip(np.mean(outputs, axis=0), 0, 1)
    ensemble = dataclasses.replace(restorer, self_ensemble=True)
    assert np.abs(ensemble.restore(noisy) - reference).max() < 1e-5
    # the orientations really differ (KiT is not equivariant to them), so the mean is not the plain output
    assert np.abs(restorer.restore(noisy) - reference).max() > 1e-3
    write_image(tmp_path / "in" / "noisy.png", (noisy.clip(0, 1) * 255).round().astype(np.uint8))
    argv = ["--weights", str(checkpoint), str(tmp_path / "in"), "--out", str(tmp_path / "out"), "--quiet"]
    assert restore.main([*argv, "--self-ensemble"]) == 0
    saved = np.asarray(Image.open(tmp_path / "in" / "noisy.png"), dtype=np.float32) / 255.0
    expected = (ensemble.restore(saved) * 255).round().astype(np.uint8)
    assert np.array_equal(np.asarray(Image.open(tmp_path / "out" / "noisy.png")), expected)


def test_cli_truncated_image_is_skipped_others_restored(tmp_path, checkpoint, photo_paths, capsys):
    good = write_image(tmp_path / "good.png", np.asarray(Image.open(photo_paths[0]).convert("RGB"))[:40, :40])
    data = good.read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])  # header fine, pixels missing
    out = tmp_path / "out"
    code = restore.main(
        ["--weights", str(checkpoint), str(tmp_path / "cut.png"), str(good), "--out", str(out)]
    )
    captured = capsys.readouterr()
    assert code == 1 and "cut.png: cannot decode" in captured.err
    assert [p.name for p in out.iterdir()] == ["good.png"]


def test_no_images_at_all_is_one_clear_error(tmp_path, checkpoint, capsys):
    (tmp_path / "empty").mkdir()
    code = restore.main(["--weights", str(checkpoint), str(tmp_path / "empty"), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2 and "folder holds no images" in err and "no images to restore" in err


def test_weights_of_another_size_name_both_sizes(tmp_path, checkpoint, capsys):
    with pytest.raises(WeightsError, match="'debug'.*'small'"):
        load_restorer(str(checkpoint), size="small")
    bare = tmp_path / "bare.safetensors"  # no config.yaml beside it: the shapes tell the size
    shutil.copy(checkpoint / "weights.safetensors", bare)
    with pytest.raises(WeightsError, match="fit model size 'debug', but model size 'kit'"):
        load_restorer(str(bare), size="kit")
    assert load_restorer(str(bare)).size_name == "debug"
    assert restore.main(["--weights", str(bare), "--model", "small", str(bare), "--out", str(tmp_path)]) == 2
    assert "'debug'" in capsys.readouterr().err


def test_missing_weights_and_help(tmp_path, capsys):
    assert restore.main(["--weights", str(tmp_path / "nothing"), "x.png", "--out", str(tmp_path)]) == 2
    assert "no weights.safetensors here" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        restore.main(["--help"])
    assert exit_info.value.code == 0 and "overlapping" in capsys.readouterr().out
