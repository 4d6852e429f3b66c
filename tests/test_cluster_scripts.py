"""cluster/slurm/submit.sh: the knobs turn into an sbatch line and entry-point arguments that kitdist accepts."""

from __future__ import annotations

import shlex
import subprocess
from pathlib import Path

from kitdist.config import load_config

REPO = Path(__file__).resolve().parent.parent
SUBMIT = REPO / "cluster" / "slurm" / "submit.sh"


def dry_run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", str(SUBMIT), *args, "--dry-run"], cwd=REPO, capture_output=True, text=True, timeout=30
    )


def test_gpu_knobs_become_sbatch_options_and_valid_overrides():
    result = dry_run(
        "--nodes",
        "8",
        "--gpus-per-node",
        "8",
        "--time",
        "2-00:00:00",
        "--partition",
        "gpu",
        "--config",
        "configs/pretrain/kit-imagenet-64gpu.yaml",
        "--storage",
        "s3://bucket/runs",
    )
    assert result.returncode == 0, result.stderr
    line = result.stdout.strip()
    assert "sbatch --parsable --nodes=8 --time=2-00:00:00 --gpus-per-node=8 --partition=gpu" in line
    args = shlex.split(line.split("KITDIST_ARGS=", 1)[1].split(" sbatch ", 1)[0])
    assert args[:2] == ["--config", "configs/pretrain/kit-imagenet-64gpu.yaml"]
    cfg = load_config(REPO / args[1], args[2:])
    assert cfg.dist.num_workers == 64 and cfg.dist.use_gpu and cfg.storage.root == "s3://bucket/runs"


def test_bad_knobs_are_refused_with_the_reason():
    assert "must be a positive integer" in dry_run("--nodes", "zero").stderr
    assert "config file not found: nope.yaml" in dry_run("--config", "nope.yaml").stderr
    assert "unknown option --gpus" in dry_run("--gpus", "8").stderr


def test_coordinator_entrypoint_gets_no_training_overrides():
    entry = (
        "env RAY_ADDRESS=http://127.0.0.1:8265 python -m kitdist.coordinator run configs/pipeline/kit.yaml"
    )
    result = dry_run("--nodes", "8", "--gpus-per-node", "8", "--storage", "s3://b/r", "--entrypoint", entry)
    assert result.returncode == 0, result.stderr
    assert f"KITDIST_ENTRYPOINT={entry} KITDIST_ARGS= sbatch" in result.stdout
