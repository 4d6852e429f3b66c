"""The coordinator end to end on a real local Ray cluster (started here with `ray start --head`): one tiny
pipeline (pre-train + 2 fine-tunes + evaluations) in which a fine-tune job is stopped with Ray's job API
and the coordinator is SIGKILLed and run again; and a pipeline with its state on the S3 server, cancelled
while it pre-trains."""

from __future__ import annotations

import json
import signal
import subprocess
from pathlib import Path

import pytest
from coordkit import coordinator_env, start_coordinator, wait_for, write_pipeline
from s3server import cluster_node_env

from kitdist import storage
from kitdist.coordinator.cluster import LocalCluster, job_client
from kitdist.coordinator.state import StateStore

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def demo_data(tmp_path_factory) -> dict[str, str]:
    from kitdist.coordinator.demo import ensure_demo_shards

    return ensure_demo_shards(str(tmp_path_factory.mktemp("demo-data")))


@pytest.fixture(scope="module")
def local_cluster(request) -> LocalCluster:
    """The cluster the jobs run on. Its processes have the S3 server's endpoint and credentials in their
    environment, as a remote cluster's nodes do: the coordinator hands none over through Ray."""
    pytest.importorskip("ray")
    with cluster_node_env(request):
        cluster = LocalCluster.start(num_cpus=4)
    yield cluster
    cluster.stop()


@pytest.fixture(scope="module")
def ray_address(local_cluster) -> str:
    return local_cluster.address


def files_holding(folder: str, secret: str) -> list[str]:
    """Every regular file under `folder` whose bytes contain `secret`."""
    paths = (path for path in Path(folder).rglob("*") if path.is_file() and not path.is_symlink())
    return [str(path) for path in paths if secret.encode() in path.read_bytes()]


def stage(store: StateStore, name: str):
    state = store.load()
    return state.stages[name] if state else None


def test_pipeline_survives_a_stopped_job_and_a_killed_coordinator(tmp_path, demo_data, ray_address):
    pipeline = write_pipeline(tmp_path / "pipeline.yaml", demo_data)
    store, log = StateStore(str(tmp_path / "state")), tmp_path / "coordinator.log"
    env = coordinator_env(RAY_ADDRESS=ray_address)
    client = job_client(ray_address)
    first = start_coordinator("run", str(pipeline), env=env, log=log)
    try:
        # A fine-tune job stopped mid-run (after its first checkpoint) is resubmitted by the live coordinator.
        checkpoint = tmp_path / "runs" / "t-denoise" / "step-00000002"
        wait_for(checkpoint.is_dir, 400, "the denoise fine-tune's first checkpoint", first, log)
        stopped_id = stage(store, "finetune/denoise").current.job_id
        assert client.stop_job(stopped_id)
        wait_for(
            lambda: len(stage(store, "finetune/denoise").attempts) == 2, 120, "a resubmission", first, log
        )
        before = store.load()
    finally:
        first.send_signal(signal.SIGKILL)  # the coordinator dies mid-pipeline, its jobs run on
        first.wait()
    assert before.status == "running"
    second = subprocess.run(
        ["python", "-m", "kitdist.coordinator", "run", str(pipeline)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        cwd=str(tmp_path),
    )
    after = store.load()
    # Finished stages were not redone, running jobs were re-attached: same job ids, no new attempts.
    assert after.stages["pretrain"].attempts == before.stages["pretrain"].attempts
    assert [a.job_id for a in after.stages["finetune/deblur"].attempts][:1] == [
        a.job_id for a in before.stages["finetune/deblur"].attempts
    ][:1]
    denoise = after.stages["finetune/denoise"]
    assert denoise.status == "succeeded", second.stdout[-3000:]
    assert [a.job_id for a in denoise.attempts] == [
        a.job_id for a in before.stages["finetune/denoise"].attempts
    ]
    assert denoise.attempts[0].job_id == stopped_id and denoise.attempts[0].status == "STOPPED"
    assert "resumed from step" in client.get_job_logs(denoise.attempts[1].job_id)
    assert denoise.weights.endswith("step-00000010/weights.safetensors") and storage.exists(denoise.weights)
    listed = {job.submission_id for job in client.list_jobs()}
    assert {a.job_id for s in after.stages.values() for a in s.attempts} <= listed  # all in `ray job list`
    table = (tmp_path / "state" / "results.md").read_text()
    rows = json.loads((tmp_path / "state" / "results.json").read_text())["rows"]
    assert [row["task"] for row in rows] == ["denoise", "deblur"]
    assert denoise.checkpoint in table
    status = subprocess.run(
        ["python", "-m", "kitdist.coordinator", "status", str(tmp_path / "state")],
        env=env,
        capture_output=True,
        text=True,
    )
    assert status.returncode == 0 and "finetune/denoise" in status.stdout and "succeeded" in status.stdout
    assert after.status == "succeeded", second.stdout[-3000:]
    for row in rows:
        assert (
            10 < row["psnr_rgb"] < 60 and 0 < row["ssim_rgb"] <= 1 and row["params"] > 0 and row["macs"] > 0
        )


def test_state_on_s3_and_cancel(tmp_path, demo_data, local_cluster, ray_address, s3_env):
    """State and the pre-training's run on the S3 server; the pipeline cancelled while it pre-trains. The
    job reached S3 with the credentials of its node's environment: the secret is in no file under the
    cluster's folder (Ray's session logs, the jobs' logs), not in the state, not in what the run wrote."""
    pipeline = write_pipeline(
        tmp_path / "pipeline.yaml", demo_data, state=f"{s3_env}/pipeline", storage_root=f"{s3_env}/runs"
    )
    tree = pipeline.read_text().replace("train.max_steps=2", "train.max_steps=500")
    pipeline.write_text(tree)
    store, log = StateStore(f"{s3_env}/pipeline"), tmp_path / "coordinator.log"
    env = coordinator_env(RAY_ADDRESS=ray_address)
    client = job_client(ray_address)
    coordinator = start_coordinator("run", str(pipeline), env=env, log=log)
    try:
        job_id = wait_for(
            lambda: (
                (s := stage(store, "pretrain"))
                and s.current
                and s.current.status == "RUNNING"
                and s.current.job_id
            ),
            300,
            "the pre-training job to run",
            coordinator,
            log,
        )
        metrics = f"{s3_env}/runs/t-pretrain/metrics"  # written by the job's training workers
        wait_for(
            lambda: storage.list_names(metrics), 300, "the pre-training to write to S3", coordinator, log
        )
        text = storage.read_text(store.url)
        assert "SECRET" not in text and env["AWS_SECRET_ACCESS_KEY"] not in text
        cancel = subprocess.run(
            ["python", "-m", "kitdist.coordinator", "cancel", str(pipeline)],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert cancel.returncode == 0, cancel.stderr
        assert coordinator.wait(timeout=120) == 1
    finally:
        if coordinator.poll() is None:
            coordinator.kill()
    state = store.load()
    assert state.status == "cancelled" and state.stages["pretrain"].status == "cancelled"
    assert all(s.status == "cancelled" for s in state.stages.values() if s.name != "pretrain")
    wait_for(lambda: client.get_job_status(job_id).is_terminal(), 60, "Ray to stop the job")
    assert str(client.get_job_status(job_id)) in ("STOPPED", "JobStatus.STOPPED")
    secret = env["AWS_SECRET_ACCESS_KEY"]
    assert files_holding(local_cluster.temp_dir, secret) == []
    assert secret not in client.get_job_logs(job_id) and secret not in log.read_text(errors="replace")
    fs, prefix = storage.url_to_fs(s3_env)
    assert not [path for path in fs.find(prefix) if secret.encode() in fs.cat_file(path)]
