"""The README's `ray job submit` line, run as written (the head's address put in, a tiny run's overrides
appended) against a Ray head on loopback with token authentication on, started the way a KubeRay pod starts
it: by cluster/k8s/ray-node.sh. Then the pod's SIGTERM to that script: the job checkpoints and stops, and
the Ray node goes down. One tiny training covers both."""

from __future__ import annotations

import os
import re
import secrets
import shlex
import signal
import subprocess
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from kitdist.coordinator.cluster import choose_ports

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
NODE_SCRIPT = REPO / "cluster" / "k8s" / "ray-node.sh"
STEPS = 400  # never reached: the stop request ends the run after a few steps


def readme_submit_line() -> str:
    """The one `ray job submit` command in the README's code blocks."""
    blocks = re.findall(r"```bash\n(.*?)```", (REPO / "README.md").read_text(), flags=re.S)
    lines = [line for block in blocks for line in block.splitlines() if "ray job submit" in line]
    assert len(lines) == 1, lines
    return lines[0]


def tiny_run(shards: tuple[str, str], root: Path) -> list[str]:
    """Overrides that shrink the 64-GPU config to one CPU worker, a debug model and small crops."""
    train, val = shards
    return [
        *("model.size=debug", f"data.train_shards={train}", f"data.val_shards={val}", "data.crop_size=32"),
        *(
            "data.global_batch_size=2",
            "data.num_workers=0",
            "data.val_crop_size=32",
            "data.max_val_samples=1",
        ),
        *("dist.num_workers=1", "dist.use_gpu=false", "dist.cpus_per_worker=1", "train.precision=fp32"),
        *(f"train.max_steps={STEPS}", "train.warmup_steps=1", "train.log_every=1", "train.val_every=1000"),
        *("train.checkpoint_every=1000", f"storage.root={root}", "storage.run_name=submitted"),
    ]


def job_api_answers(url: str, token: str | None) -> int:
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status
    except urllib.error.HTTPError as err:
        return err.code
    except OSError:
        return 0


class Output:
    """A subprocess's output, collected line by line."""

    def __init__(self, process: subprocess.Popen) -> None:
        self.process, self.lines = process, []
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        for line in self.process.stdout:
            self.lines.append(line.rstrip("\n"))

    def text(self) -> str:
        return "\n".join(self.lines)

    def wait_for(self, pattern: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not any(re.search(pattern, line) for line in self.lines):
            assert self.process.poll() is None, self.text()[-4000:]
            assert time.monotonic() < deadline, f"no {pattern!r} after {timeout}s:\n{self.text()[-4000:]}"
            time.sleep(0.5)


def test_readme_submission_trains_and_a_pod_sigterm_checkpoints_it(tmp_path):
    from kitdist.pretrain import ensure_photo_shards

    shards = ensure_photo_shards(str(tmp_path / "photos"))
    token = secrets.token_hex(16)
    ports, workers = choose_ports(os.getpid())
    temp_dir = Path(f"/tmp/kdsub-{os.getpid()}")  # short: Ray's socket paths are limited to ~107 bytes
    start = ["ray", "start", "--head", "--block", "--node-ip-address=127.0.0.1", "--num-cpus=2"]
    start += ["--dashboard-host=127.0.0.1", "--disable-usage-stats", f"--temp-dir={temp_dir}"]
    start += [f"--min-worker-port={workers[0]}", f"--max-worker-port={workers[-1]}"]
    start += [f"--{name}={port}" for name, port in ports.items()]
    api = f"http://127.0.0.1:{ports['dashboard-port']}"
    # The pod's environment as KubeRay with token authentication would make it; the nodes' own Python has
    # kitdist's dependencies, the code comes with the job's working directory.
    node_env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "RAY_ADDRESS")}
    node_env |= {
        "KUBERAY_GEN_RAY_START_CMD": shlex.join(start),
        "KITDIST_JOB_API": api,
        "KITDIST_DRAIN_WAIT": "150",
        "RAY_JOB_STOP_WAIT_TIME_S": "120",
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN": token,
        "DS_ACCELERATOR": "cpu",
    }
    node = subprocess.Popen(
        ["bash", str(NODE_SCRIPT)],
        cwd=tmp_path,  # not the checkout: `--config configs/...` resolves only in the uploaded working dir
        env=node_env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    node_output = Output(node)
    client = None
    try:
        deadline = time.monotonic() + 180
        while job_api_answers(f"{api}/api/version", token) != 200:
            assert node.poll() is None and time.monotonic() < deadline, node_output.text()[-4000:]
            time.sleep(1)
        # Authentication is on: a request without the token is refused, as the README says.
        assert job_api_answers(f"{api}/api/jobs/", None) == 401

        line = readme_submit_line()
        assert "http://HEAD:8265" in line
        command = (
            line.replace("http://HEAD:8265", api) + " " + shlex.join(tiny_run(shards, tmp_path / "runs"))
        )
        client_env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_MODE")}
        client_env["RAY_AUTH_TOKEN"] = (
            token  # where a laptop keeps it: RAY_AUTH_TOKEN(_PATH), ~/.ray/auth_token
        )
        client = subprocess.Popen(
            ["bash", "-c", command],
            cwd=REPO,
            env=client_env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        submitted = Output(client)
        submitted.wait_for(rf"step 2/{STEPS} \|", timeout=400)

        node.send_signal(signal.SIGTERM)  # what Kubernetes sends the pod's first process on eviction or drain
        assert node.wait(timeout=300) == 0, node_output.text()[-4000:]
        assert client.wait(timeout=60) == 0, submitted.text()[-4000:]
        submitted.reader.join(timeout=10)
        log = submitted.text()
        assert "asked 1 running job(s) to stop" in node_output.text(), node_output.text()
        stopped = re.search(r"stopped on request after step (\d+)", log)
        assert stopped, log[-4000:]
        step = int(stopped.group(1))
        assert (tmp_path / "runs" / "submitted" / f"step-{step:08d}" / "weights.safetensors").is_file()
        # The Ray node went down with the script: nothing of its process group is left.
        deadline = time.monotonic() + 60
        while _group_alive(node.pid):
            assert time.monotonic() < deadline, "the Ray node's processes outlived ray-node.sh"
            time.sleep(1)
    finally:
        for process in (client, node):
            if process is not None and process.poll() is None:
                process.kill()
        if _group_alive(node.pid):
            os.killpg(node.pid, signal.SIGKILL)
        subprocess.run(["rm", "-rf", str(temp_dir)], check=False)


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True
