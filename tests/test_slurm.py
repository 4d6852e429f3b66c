"""cluster/slurm on a real SLURM (munge + slurmctld + two slurmd on this machine): the sbatch script brings up
a 2-node Ray cluster, submits the job, and on the pre-emption signal checkpoints, requeues and resumes."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from s3server import free_port
from slurmcluster import SlurmCluster, SlurmUnavailable

REPO = Path(__file__).resolve().parent.parent
SUBMIT = REPO / "cluster" / "slurm" / "submit.sh"

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    cluster = SlurmCluster(tmp_path_factory.mktemp("slurm"))
    try:
        cluster.start()
    except SlurmUnavailable as err:
        pytest.skip(f"SLURM could not start here: {err}")
    yield cluster
    cluster.stop()


def submit(slurm: SlurmCluster, folder: Path, out: Path, entrypoint: str, overrides: list[str]) -> str:
    """cluster/slurm/submit.sh for 2 nodes, run in `folder` (where the batch script runs), with loopback
    addresses and free ports; returns the job id."""
    env = {
        "KITDIST_RAY_PORT": str(free_port()),
        "KITDIST_DASHBOARD_PORT": str(free_port()),
        "KITDIST_AGENT_PORT": str(free_port()),
        "KITDIST_HEAD_IP": "127.0.0.1",
        "KITDIST_WORKER_IP": "127.0.0.1",
        "KITDIST_STOP_GRACE": "120",
        "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
    }
    command = ["bash", str(SUBMIT), "--nodes", "2", "--output", str(out), "--entrypoint", entrypoint]
    result = subprocess.run(
        [*command, "--", *overrides],
        env={**slurm.env, **env},
        cwd=folder,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    return re.match(r"submitted job (\d+):", result.stdout).group(1)


STEPS = 40


# A progressive schedule as the README writes one (spaces, brackets, braces; its second phase comes after
# the run's last step) and a range that is a glob pattern to a shell: each must reach the run as written.
SCHEDULE = "data.schedule=[{step: 0, crop_size: 64, global_batch_size: 8}, {step: 4000, crop_size: 96, global_batch_size: 8}]"
NOISE = "degrade.noise_sigma=[25,25]"


def pretrain_args(root: Path, steps: int, every: int) -> list[str]:
    """The embedded default (debug KiT, photographs), shortened; the two 'nodes' share this disk as a real
    cluster shares its file system."""
    return [
        *(f"train.max_steps={steps}", "train.warmup_steps=1", f"train.checkpoint_every={every}"),
        *("train.log_every=1", f"storage.root={root}", "storage.run_name=slurm", SCHEDULE, NOISE),
    ]


def checkpoints(root: Path) -> list[Path]:
    return sorted(root.glob("slurm/**/weights.safetensors"))


def test_two_node_pretrain_is_preempted_requeued_and_resumes(slurm, tmp_path):
    """One run covers the script end to end: a 2-node Ray cluster forms, pre-training writes checkpoints, the
    pre-emption signal requeues the job, and the requeued job resumes and finishes."""
    out = tmp_path / "job.out"
    root = tmp_path / "runs"
    # What the glob pattern in NOISE would match in the batch script's folder, were it expanded there.
    (tmp_path / "degrade.noise_sigma=2").touch()
    # The stop request takes several seconds to arrive (`ray job stop` -> driver SIGTERM -> marker file ->
    # rank 0's poll): 32 steps after the first checkpoint leave it time to on a fast machine (12 did not).
    job = submit(slurm, tmp_path, out, f"{sys.executable} -m kitdist.pretrain", pretrain_args(root, STEPS, 8))
    deadline = time.monotonic() + 420
    while not checkpoints(root):
        assert time.monotonic() < deadline, f"no checkpoint within 420 s:\n{out.read_text()[-4000:]}"
        assert slurm.job_field(job, "JobState") in {"PENDING", "RUNNING"}, out.read_text()[-4000:]
        time.sleep(3)
    slurm.run("scancel", "--signal=USR1", "--batch", job)
    deadline = time.monotonic() + 300
    while int(slurm.job_field(job, "Restarts")) < 1:
        assert time.monotonic() < deadline, f"not requeued:\n{out.read_text()[-4000:]}"
        time.sleep(3)
    # SLURM holds a requeued job back for a while (BeginTime); a test need not wait that out.
    slurm.run("scontrol", "update", f"JobId={job}", "StartTime=now")
    state = slurm.wait_for_state(job, {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"}, timeout=600)
    log = out.read_text()
    assert "Ray cluster up: 2/2 nodes" in log
    assert "pre-emption signal" in log and "requeueing" in log
    first_run = log.split("restart 1", 1)[0]
    assert "stopped on request after step" in first_run, "the pre-empted run must checkpoint before it stops"
    assert state == "COMPLETED", log[-4000:]
    assert "restart 1" in log
    assert "resumed from step" in log.split("restart 1", 1)[1], "the requeued run must resume, not start over"
    assert "finished: SUCCEEDED" in log
    assert any(path.parent.name == f"step-{STEPS:08d}" for path in checkpoints(root))
    saved = yaml.safe_load((root / "slurm" / f"step-{STEPS:08d}" / "config.yaml").read_text())
    assert saved["data"]["schedule"] == [
        {"step": 0, "crop_size": 64, "global_batch_size": 8},
        {"step": 4000, "crop_size": 96, "global_batch_size": 8},
    ]
    assert saved["degrade"]["noise_sigma"] == [25, 25]
