"""cluster/slurm on a real SLURM (munge + slurmctld + two slurmd on this machine): the sbatch script brings up
a 2-node Ray cluster, submits the job, and on the pre-emption signal checkpoints, requeues and resumes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from s3server import free_port
from slurmcluster import SlurmCluster, SlurmUnavailable

REPO = Path(__file__).resolve().parent.parent
SBATCH = REPO / "cluster" / "slurm" / "kitdist.sbatch"

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


def submit(slurm: SlurmCluster, out: Path, entrypoint: str, args: str = "", nodes: int = 2) -> str:
    """sbatch the real script with loopback addresses and free ports; returns the job id."""
    env = {
        "KITDIST_ENTRYPOINT": entrypoint,
        "KITDIST_ARGS": args,
        "KITDIST_RAY_PORT": str(free_port()),
        "KITDIST_DASHBOARD_PORT": str(free_port()),
        "KITDIST_AGENT_PORT": str(free_port()),
        "KITDIST_HEAD_IP": "127.0.0.1",
        "KITDIST_WORKER_IP": "127.0.0.1",
        "KITDIST_STOP_GRACE": "120",
        "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
    }
    command = ["sbatch", "--parsable", f"--nodes={nodes}", f"--output={out}", f"--chdir={REPO}", str(SBATCH)]
    result = subprocess.run(command, env={**slurm.env, **env}, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip().split(";")[0]


def test_two_node_ray_cluster_runs_a_job(slurm, tmp_path):
    out = tmp_path / "job.out"
    probe = tmp_path / "probe.py"
    probe.write_text(
        "import ray\nray.init()\nprint('ALIVE_NODES', sum(1 for n in ray.nodes() if n['Alive']))\n"
    )
    job = submit(slurm, out, f"{sys.executable} {probe}")
    state = slurm.wait_for_state(job, {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"}, timeout=240)
    log = out.read_text()
    assert state == "COMPLETED", log
    assert "Ray cluster up: 2/2 nodes" in log
    assert "ALIVE_NODES 2" in log
    assert "finished: SUCCEEDED" in log
