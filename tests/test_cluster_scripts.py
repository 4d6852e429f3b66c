"""cluster/slurm/submit.sh: the knobs turn into an sbatch line (whole GPU nodes by default) and entry-point
arguments that kitdist accepts, carried to kitdist.sbatch's command word for word."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
from pathlib import Path

from kitdist.config import load_config

REPO = Path(__file__).resolve().parent.parent
SUBMIT = REPO / "cluster" / "slurm" / "submit.sh"
SBATCH = REPO / "cluster" / "slurm" / "kitdist.sbatch"
# A progressive schedule as the README writes one (spaces, brackets, braces; batches that split over 64
# workers) and a range that is a glob pattern to a shell.
HARD_OVERRIDES = [
    "data.schedule=[{step: 0, crop_size: 128, global_batch_size: 64}, {step: 92000, crop_size: 160, global_batch_size: 64}]",
    "degrade.noise_sigma=[25,25]",
]


def dry_run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", str(SUBMIT), "--dry-run", *args], cwd=REPO, capture_output=True, text=True, timeout=30
    )


def submission(stdout: str) -> tuple[dict[str, str], list[str]]:
    """The dry run's line, `KITDIST_ENTRYPOINT=... KITDIST_ARGS=... sbatch ...`: (environment, sbatch argv)."""
    words = shlex.split(stdout.strip())
    env = dict(word.split("=", 1) for word in words[:2])
    assert list(env) == ["KITDIST_ENTRYPOINT", "KITDIST_ARGS"] and words[2] == "sbatch", stdout
    return env, words[2:]


def command_in_sbatch(env: dict[str, str], cwd: Path) -> list[str]:
    """The command kitdist.sbatch builds from the environment: its own lines, from `set -f` to `set +f`."""
    text = SBATCH.read_text()
    reading = text[text.index("\nset -f\n") : text.index("\nset +f\n") + len("\nset +f\n")]
    script = reading + 'printf "%s\\0" "${COMMAND[@]}"'
    result = subprocess.run(
        ["bash", "-c", script], env={**os.environ, **env}, cwd=cwd, capture_output=True, timeout=30
    )
    assert result.returncode == 0, result.stderr
    return result.stdout.decode().split("\0")[:-1]


def test_gpu_knobs_become_sbatch_options_and_arguments_arrive_word_for_word(tmp_path):
    result = dry_run(
        *("--nodes", "8", "--gpus-per-node", "8", "--time", "2-00:00:00", "--partition", "gpu"),
        *("--config", "configs/pretrain/kit-imagenet-64gpu.yaml", "--storage", "s3://bucket/runs"),
        "--",
        *HARD_OVERRIDES,
    )
    assert result.returncode == 0, result.stderr
    env, sbatch = submission(result.stdout)
    # Whole nodes: every CPU and all memory, so Ray sees them (a cluster's default may be 1 CPU per task).
    assert sbatch[:-1] == [
        "sbatch",
        "--parsable",
        "--nodes=8",
        "--time=2-00:00:00",
        "--gpus-per-node=8",
        "--exclusive",
        "--mem=0",
        "--partition=gpu",
    ]
    assert sbatch[-1].endswith("cluster/slurm/kitdist.sbatch")
    # A file the glob pattern would match, where the batch script runs: the override must stay as written.
    (tmp_path / "degrade.noise_sigma=2").touch()
    command = command_in_sbatch(env, tmp_path)
    assert command[:3] == ["python", "-m", "kitdist.pretrain"]
    args = command[3:]
    assert args[:2] == ["--config", "configs/pretrain/kit-imagenet-64gpu.yaml"]
    assert args[-2:] == HARD_OVERRIDES
    cfg = load_config(REPO / args[1], args[2:])
    assert cfg.dist.num_workers == 64 and cfg.dist.use_gpu and cfg.storage.root == "s3://bucket/runs"
    assert [p.crop_size for p in cfg.data.schedule] == [128, 160] and cfg.degrade.noise_sigma == (25, 25)


def test_cpu_memory_sharing_and_output_knobs():
    result = dry_run("--shared", "--cpus-per-node", "16", "--mem", "64G", "--output", "logs/kd-%j.out")
    assert result.returncode == 0, result.stderr
    _, sbatch = submission(result.stdout)
    assert "--exclusive" not in sbatch and "--mem=0" not in sbatch
    assert {"--cpus-per-task=16", "--mem=64G", "--output=logs/kd-%j.out"} <= set(sbatch)
    _, exclusive = submission(dry_run("--cpus-per-node", "8").stdout)
    assert {"--exclusive", "--mem=0", "--cpus-per-task=8"} <= set(exclusive)


def test_bad_knobs_are_refused_with_the_reason():
    assert "must be a positive integer" in dry_run("--nodes", "zero").stderr
    assert "config file not found: nope.yaml" in dry_run("--config", "nope.yaml").stderr
    assert "unknown option --gpus" in dry_run("--gpus", "8").stderr
    assert "--cpus-per-node must be a positive integer" in dry_run("--cpus-per-node", "all").stderr
    refused = dry_run("--shared")
    assert refused.returncode == 2 and re.search(r"--shared needs --cpus-per-node", refused.stderr)


def test_coordinator_entrypoint_gets_no_training_overrides(tmp_path):
    entry = (
        "env RAY_ADDRESS=http://127.0.0.1:8265 python -m kitdist.coordinator run configs/pipeline/kit.yaml"
    )
    result = dry_run("--nodes", "8", "--gpus-per-node", "8", "--storage", "s3://b/r", "--entrypoint", entry)
    assert result.returncode == 0, result.stderr
    env, _ = submission(result.stdout)
    assert env == {"KITDIST_ENTRYPOINT": entry, "KITDIST_ARGS": ""}
    assert command_in_sbatch(env, tmp_path) == entry.split()
