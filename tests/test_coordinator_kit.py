"""configs/pipeline/kit.yaml from raw data to the results table, at toy scale on CPU and without Ray:
synthetic data in each dataset's raw layout (SIDD's frames and .mat blocks, GoPro and HIDE folders,
Rain13k's training pairs and five test sets, REDS, ImageNet), built with the README's own commands; the
pipeline planned as `coordinator run` plans it (every shard set it names must exist); each evaluation job's
command run with a tiny model; the results table written with each benchmark's protocol and the paper's
number. Training is the other coordinator tests' part."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import numpy as np
import yaml
from PIL import Image
from restorekit import export_debug_checkpoint, write_image
from test_shards_recipes import write_sidd_mats

from kitdist import evaluate
from kitdist.config import load_config
from kitdist.coordinator.plan import make_plan
from kitdist.coordinator.report import write_results
from kitdist.coordinator.spec import load_pipeline
from kitdist.coordinator.state import new_state
from kitdist.shards.__main__ import main as shards_main

ROOT = Path(__file__).resolve().parents[1]
DATASETS, RUNS = "s3://datasets/kitdist", "s3://runs/kitdist"
TRAIN_SIZE, TEST_SIZE = (96, 128), (80, 112)  # (height, width): test frames are larger than the 64 px tile


def readme_build_commands() -> list[str]:
    """The README's commands that build the datasets of the paper's fine-tunes."""
    readme = (ROOT / "README.md").read_text()
    return re.findall(rf"^python -m kitdist\.shards build \S+ --src \S+ --out {DATASETS}/.*$", readme, re.M)


class Frames:
    """Pairs cut from a real photograph: the target a crop, the input the crop with noise."""

    def __init__(self, photo: Path) -> None:
        self.pixels = np.asarray(Image.open(photo).convert("RGB"))
        self.count = 0

    def pair(self, size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
        self.count += 1
        top, left = (17 * self.count) % 100, (29 * self.count) % 100
        clean = self.pixels[top : top + size[0], left : left + size[1]]
        noise = np.random.default_rng(self.count).normal(0, 20, clean.shape)
        return np.clip(clean + noise, 0, 255).astype(np.uint8), clean

    def write(self, input_path: Path, target_path: Path, size: tuple[int, int]) -> None:
        degraded, clean = self.pair(size)
        write_image(input_path, degraded)
        write_image(target_path, clean)


def lay_out_raw(raw: Path, frames: Frames, photo_paths: list[Path]) -> None:
    """One dataset per folder, named as the README's --src names it, each in its own raw layout."""
    scene = raw / "SIDD_Medium_Srgb" / "Data" / "0001_001_S6_00100_00060_3200_L"
    frames.write(scene / "0001_NOISY_SRGB_010.PNG", scene / "0001_GT_SRGB_010.PNG", TRAIN_SIZE)
    write_sidd_mats(photo_paths, raw / "SIDD_Medium_Srgb", images=2, blocks=2, side=32)
    for split, size in (("train", TRAIN_SIZE), ("test", TEST_SIZE)):
        sequence = raw / "GoPro" / split / "GOPR0372_07_00"
        frames.write(sequence / "blur" / "000047.png", sequence / "sharp" / "000047.png", size)
    hide = raw / "HIDE_dataset"
    frames.write(
        hide / "test" / "test-close-ups" / "1fromGOPR0950.png", hide / "GT" / "1fromGOPR0950.png", TEST_SIZE
    )
    frames.write(raw / "Rain13k/train/input/1.png", raw / "Rain13k/train/target/1.png", TRAIN_SIZE)
    for name in ("Rain100H", "Rain100L", "Test100", "Test1200", "Test2800"):
        folder = raw / "Rain13k" / "test" / name
        frames.write(folder / "input" / "1.png", folder / "target" / "1.png", TEST_SIZE)
    for split, size in (("train", TRAIN_SIZE), ("val", TEST_SIZE)):
        blurred, sharp = frames.pair(size)
        write_image(raw / "REDS" / f"{split}_sharp" / "000" / "00000000.png", sharp)
        path = raw / "REDS" / f"{split}_blur_jpeg" / "000" / "00000000.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(blurred).save(path, quality=75)
    for split in ("train", "val"):
        for wnid in ("n01440764", "n01443537"):
            _, clean = frames.pair(TRAIN_SIZE)
            path = raw / "ILSVRC2012" / split / wnid / f"{wnid}_{split}.JPEG"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(clean).save(path, quality=90)


def local(url: str, tmp_path: Path) -> str:
    return url.replace(DATASETS, str(tmp_path / "datasets")).replace(RUNS, str(tmp_path / "runs"))


def local_pipeline(tmp_path: Path) -> Path:
    """kit.yaml with its URLs on local folders, and each stage's shards as its own config names them."""
    tree = yaml.safe_load(local((ROOT / "configs/pipeline/kit.yaml").read_text(), tmp_path))
    tree["state"] = str(tmp_path / "state")
    for part in [tree["pretrain"], *tree["finetune"]]:
        data = load_config(ROOT / part["config"]).data
        part["train_shards"], part["val_shards"] = (
            local(data.train_shards, tmp_path),
            local(data.val_shards, tmp_path),
        )
        part["config"] = str(ROOT / part["config"])
    path = tmp_path / "kit.yaml"
    path.write_text(yaml.safe_dump(tree, sort_keys=False))
    return path


def test_kit_pipeline_from_raw_layouts_to_the_results_table(tmp_path, photo_paths, capsys):
    raw = tmp_path / "raw"
    lay_out_raw(raw, Frames(photo_paths[2]), photo_paths)
    commands = readme_build_commands()
    assert {shlex.split(c)[4] for c in commands} == {"sidd", "gopro", "hide", "rain13k", "reds", "imagenet"}
    for command in commands:
        argv = shlex.split(local(command.replace("/data/", f"{raw}/"), tmp_path))[3:]
        argv = [{"256": "64", "192": "64", "16": "1"}.get(arg, arg) for arg in argv]  # toy scale
        assert shards_main([*argv, "--no-progress"]) == 0, capsys.readouterr().err

    plan = make_plan(load_pipeline(local_pipeline(tmp_path)))  # reads every manifest kit.yaml names
    rain = [f"derain/{name}" for name in ("Rain100H", "Rain100L", "Test100", "Test1200", "Test2800")]
    assert list(plan.evaluations) == ["denoise", "deblur/GoPro", "deblur/HIDE", *rain, "deblur_jpeg"]

    checkpoint = export_debug_checkpoint(tmp_path / "ckpt", photo_paths[0])
    state = new_state(plan.spec.name, plan.stage_kinds())
    for name, evaluation in plan.evaluations.items():
        argv = evaluation.job(str(checkpoint)).entrypoint[3:]  # python -m kitdist.evaluate ...
        argv += ["--bm3d-sigma", "20"] if name == "denoise" else []  # as a task's eval_args asks
        assert evaluate.main([*argv, "--tile", "64", "--overlap", "16", "--grids", "0", "--quiet"]) == 0
        results = json.loads((Path(evaluation.out) / "results.json").read_text())
        stage = state.stages[f"evaluate/{name}"]
        stage.status, stage.results = "succeeded", results
        state.stages[f"finetune/{evaluation.task.stage}"].status = "succeeded"
        sizes = {(r["height"], r["width"]) for r in results["per_image"]}
        assert sizes == ({(32, 32)} if name == "denoise" else {TEST_SIZE}), name  # whole blocks and frames
    sidd = state.stages["evaluate/denoise"].results
    assert [r["key"] for r in sidd["per_image"]] == [
        f"val__image{i:02d}__block{b:02d}" for i in (0, 1) for b in (0, 1)
    ]

    rows = {
        row["stage"]: row
        for row in json.loads(Path(write_results(state, plan, str(tmp_path / "state"))["json"]).read_text())[
            "rows"
        ]
    }
    table = (tmp_path / "state" / "results.md").read_text()
    assert "| denoise | SIDD | SIDD |" in table and "39.85 / 0.974 (KiT† (ImageNet pre-trained)" in table
    assert rows["denoise"]["psnr"] == sidd["psnr_rgb"] and rows["denoise"]["paper_psnr"] == 39.85
    bm3d = f"| {sidd['bm3d']['psnr_rgb']:.2f} / {sidd['bm3d']['ssim_rgb']:.4f} |"  # SIDD's RGB, beside ours
    assert "| SSIM | BM3D PSNR / SSIM |" in table and f"{sidd['ssim_rgb']:.4f} {bm3d}" in table
    assert (
        rows["deblur/GoPro"]["bm3d_psnr"] is None and rows["denoise"]["bm3d_psnr"] == sidd["bm3d"]["psnr_rgb"]
    )
    for name in rain:  # deraining: the Y channel, no published number
        results = state.stages[f"evaluate/{name}"].results
        assert (rows[name]["psnr"], rows[name]["ssim"]) == (results["psnr_y"], results["ssim_y"])
        assert rows[name]["protocol"].startswith("Y (BT.601 luma)") and rows[name]["paper_psnr"] is None
    assert (
        rows["deblur/HIDE"]["protocol"].startswith("RGB")
        and rows["deblur/HIDE"]["psnr"] == state.stages["evaluate/deblur/HIDE"].results["psnr_rgb"]
    )

    benchmark = str(tmp_path / "datasets" / "sidd" / "benchmark")  # SIDD withholds its ground truth
    assert evaluate.main(["--weights", str(checkpoint), "--shards", benchmark, "--quiet"]) == 2
    assert "holds degraded inputs without targets" in capsys.readouterr().err
