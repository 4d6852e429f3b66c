"""One PSNR per model: training-time validation and `kitdist.evaluate` score the same weights on the same
images alike (odd sizes the model pads, an image wide enough to be tiled); validation leaves every RNG as
it found it, and a rank with fewer tiles runs the forwards that keep ZeRO-3's collectives in step."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from PIL import Image
from restorekit import EXPORT_OVERRIDES, export_debug_checkpoint, write_image

from kitdist import evaluate
from kitdist.config import load_config
from kitdist.data import val_batches
from kitdist.inference import DEFAULT_OVERLAP, DEFAULT_TILE, count_tiles
from kitdist.model import build_model
from kitdist.shards import build_shards
from kitdist.shards.manifest import read_manifest
from kitdist.train import checkpoint as ckpt
from kitdist.train import validation
from kitdist.train.engine import build_strategy
from kitdist.train.validation import METRICS, validate

NOISE = "degrade.noise_sigma=[25,25]"


@pytest.fixture(scope="module")
def weights_folder(tmp_path_factory, photo_paths):
    return export_debug_checkpoint(tmp_path_factory.mktemp("ckpt"), photo_paths[0])


@pytest.fixture(scope="module")
def val_shards(tmp_path_factory, photo_paths) -> str:
    """Odd-sized crops of real photographs (none a multiple of 32) and one wider than a tile."""
    folder = tmp_path_factory.mktemp("photos")
    for index, path in enumerate(photo_paths[1:3]):
        pixels = np.asarray(Image.open(path).convert("RGB"))[: 61 + 7 * index, : 83 + 11 * index]
        write_image(folder / f"photo{index}.png", pixels)
    wide = np.asarray(Image.open(photo_paths[3]).convert("RGB"))[:40]
    wide = np.concatenate([wide, wide[:, ::-1]], axis=1)[:, : DEFAULT_TILE + 37]
    write_image(folder / "wide.png", wide)
    out = str(tmp_path_factory.mktemp("shards"))
    build_shards("folder", folder, out, samples_per_shard=2, progress=False)
    return out


def training_strategy(weights_folder, val_shards: str):
    """The run's own validation set-up: the exported weights in a fresh DDP strategy on the CPU."""
    kind = read_manifest(val_shards).kind
    overrides = [f"data.val_shards={val_shards}", f"data.kind={kind}", "data.val_crop_size=0", NOISE]
    cfg = load_config(None, [*EXPORT_OVERRIDES, *overrides, "data.num_workers=0"])
    model = build_model(cfg.model)
    model.load_state_dict(ckpt.read_weights(weights_folder))
    return cfg, build_strategy(cfg, model, torch.device("cpu"))


def test_training_validation_scores_as_evaluate_does(weights_folder, val_shards):
    results = evaluate.evaluate(
        str(weights_folder), val_shards, overrides=[NOISE], device="cpu", progress=False
    )
    cfg, strategy = training_strategy(weights_folder, val_shards)
    during_training = validate(cfg, strategy, rank=0, world_size=1)
    assert during_training["val_images"] == results["images"] == 3
    assert max(record["width"] for record in results["per_image"]) > DEFAULT_TILE  # tiled
    for name in METRICS:
        assert during_training[f"val_{name}"] == pytest.approx(results[name], abs=1e-9), name
    assert 10 < results["input_psnr_rgb"] < 40 and 10 < results["psnr_rgb"] < 60


def test_validation_leaves_the_rngs_and_train_mode_as_it_found_them(weights_folder, val_shards):
    cfg, strategy = training_strategy(weights_folder, val_shards)
    strategy.train(True)
    random.seed(3)
    np.random.seed(3)
    torch.manual_seed(3)
    states = random.getstate(), np.random.get_state()[1].copy(), torch.get_rng_state()
    validate(cfg, strategy, rank=0, world_size=1)
    assert random.getstate() == states[0]
    assert np.array_equal(np.random.get_state()[1], states[1])
    assert torch.equal(torch.get_rng_state(), states[2])
    assert strategy.module.training


def test_a_rank_with_fewer_tiles_runs_as_many_forwards(weights_folder, val_shards, monkeypatch):
    """World size 1 standing in for rank 0 of two whose other rank has 3 tiles more: rank 0 runs 3
    blank forwards after its own."""
    cfg, strategy = training_strategy(weights_folder, val_shards)
    monkeypatch.setattr(validation, "all_gather_objects", lambda mine: [mine, mine + 3])
    shapes = []
    forward = strategy.forward
    monkeypatch.setattr(strategy, "forward", lambda x: shapes.append(tuple(x.shape)) or forward(x))
    validate(cfg, strategy, rank=0, world_size=1)
    sizes = [batch["input"].shape[-2:] for batch in val_batches(cfg, 0, 1)]
    own = sum(count_tiles(height, width, DEFAULT_TILE, DEFAULT_OVERLAP) for height, width in sizes)
    assert own > len(sizes)  # the wide image is tiled
    assert len(shapes) == own + 3 and shapes[-3:] == [(1, 3, 32, 32)] * 3
