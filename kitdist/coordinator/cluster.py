"""Reaching a Ray cluster's job API: the one at RAY_ADDRESS, or a local one the coordinator starts.

A local cluster is `ray start --head --block` on 127.0.0.1 with ports of its own and its own temp folder,
in its own process group, so that it neither joins nor disturbs other Ray clusters on the machine, it
outlives a coordinator that is killed (its jobs keep running), and stopping it touches only its own
processes. Its dashboard address is recorded in the pipeline state so a re-run coordinator finds it.

Ray 2.60 turns token authentication on by default. The token comes from RAY_AUTH_TOKEN, the file named by
RAY_AUTH_TOKEN_PATH, or ~/.ray/auth_token (Ray's own order); it is sent as a bearer header and never
written anywhere by us. RAY_AUTH_MODE=disabled sends none.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

START_TIMEOUT_S = 180.0  # a loaded 2-core machine takes 15-60 s to bring up a head node
START_ATTEMPTS = 3  # a port chosen free can be taken by another process before Ray binds it
WORKER_PORTS = 100
PORT_NAMES = (
    "port",
    "dashboard-port",
    "ray-client-server-port",
    "node-manager-port",
    "object-manager-port",
    "dashboard-agent-listen-port",
    "dashboard-agent-grpc-port",
    "runtime-env-agent-port",
    "metrics-export-port",
)


class ClusterError(RuntimeError):
    """A Ray cluster that cannot be reached or started; the message names the address."""


class ClusterStartFailed(ClusterError):
    """`ray start --head` exited before its cluster answered."""


def auth_token() -> str | None:
    """The Ray auth token from the environment or Ray's token file, or None (auth disabled or no token)."""
    if os.environ.get("RAY_AUTH_MODE", "").lower() == "disabled":
        return None
    if os.environ.get("RAY_AUTH_TOKEN"):
        return os.environ["RAY_AUTH_TOKEN"].strip()
    path = Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token")
    if path.is_file():
        return path.read_text().strip() or None
    return None


def auth_headers() -> dict[str, str]:
    token = auth_token()
    return {"Authorization": f"Bearer {token}"} if token else {}


def job_client(address: str) -> Any:
    """A JobSubmissionClient for `address` (dashboard http://host:port, or anything Ray accepts)."""
    from ray.job_submission import JobSubmissionClient

    try:
        return JobSubmissionClient(address, headers=auth_headers())
    except Exception as err:  # ConnectionError, RuntimeError, auth errors: all mean "not reachable"
        raise ClusterError(f"Ray cluster at {address}: cannot reach its job API ({err})") from err


def reachable(address: str) -> bool:
    try:
        job_client(address)
    except ClusterError:
        return False
    return True


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def choose_ports(seed: int) -> tuple[dict[str, int], range]:
    """A port for each component and a range of WORKER_PORTS ports for Ray's workers, none shared.

    The range is placed from `seed` (the process id: clusters started side by side get different ones)
    in 20000-59999; the component ports are free ports outside it, so the range may sit inside the
    kernel's ephemeral range without ever meeting them (Ray refuses to start when they overlap)."""
    first = 20000 + (seed % 400) * WORKER_PORTS
    workers = range(first, first + WORKER_PORTS)
    ports: dict[str, int] = {}
    while len(ports) < len(PORT_NAMES):
        port = _free_port()
        if port not in workers and port not in ports.values():
            ports[PORT_NAMES[len(ports)]] = port
    return ports, workers


@dataclass
class LocalCluster:
    """A Ray head node on this machine, started and stopped by us (by its process group id)."""

    address: str  # the dashboard / job API, http://127.0.0.1:PORT
    pid: int  # the `ray start --block` process; its process group holds the whole cluster
    temp_dir: str

    @classmethod
    def start(cls, num_cpus: int, num_gpus: int = 0, log_path: str | None = None) -> LocalCluster:
        """Starts the head node and waits until its job API answers; a start that fails early (a port
        taken meanwhile) is tried again on fresh ports."""
        for attempt in range(START_ATTEMPTS - 1):
            try:
                return cls._start_once(num_cpus, num_gpus, log_path, seed=os.getpid() + attempt)
            except ClusterStartFailed:
                continue
        return cls._start_once(num_cpus, num_gpus, log_path, seed=os.getpid() + START_ATTEMPTS - 1)

    @classmethod
    def _start_once(cls, num_cpus: int, num_gpus: int, log_path: str | None, seed: int) -> LocalCluster:
        ports, workers = choose_ports(seed)
        # Short: Ray puts Unix sockets under it, and their paths are limited to ~107 bytes.
        temp_dir = tempfile.mkdtemp(prefix="kdray-", dir="/tmp")
        args = ["ray", "start", "--head", "--block", "--node-ip-address=127.0.0.1"]
        args += ["--dashboard-host=127.0.0.1", "--include-dashboard=true", "--disable-usage-stats"]
        args += [f"--num-cpus={num_cpus}", f"--num-gpus={num_gpus}", f"--temp-dir={temp_dir}"]
        args += [f"--min-worker-port={workers[0]}", f"--max-worker-port={workers[-1]}"]
        args += [f"--{name}={port}" for name, port in ports.items()]
        env = {**os.environ}
        env.pop("RAY_ADDRESS", None)
        if auth_token():  # the cluster checks the same token we send
            env.setdefault("RAY_AUTH_MODE", "token")
        log = open(log_path or os.path.join(temp_dir, "ray-start.log"), "ab")
        process = subprocess.Popen(
            args, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
        log.close()
        cluster = cls(f"http://127.0.0.1:{ports['dashboard-port']}", process.pid, temp_dir)
        cluster._wait_ready(process)
        return cluster

    def _wait_ready(self, process: subprocess.Popen) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if process.poll() is not None:
                self.stop(grace_s=1.0)  # whatever it started before failing
                raise ClusterStartFailed(
                    f"`ray start --head` exited with {process.returncode}; see {self.temp_dir}"
                )
            if reachable(self.address):
                return
            time.sleep(1.0)
        self.stop()
        raise ClusterError(f"local Ray cluster at {self.address} not ready after {START_TIMEOUT_S:.0f} s")

    def alive(self) -> bool:
        try:
            os.killpg(self.pid, 0)
        except (ProcessLookupError, PermissionError):
            return False
        return True

    def stop(self, grace_s: float = 5.0) -> None:
        """SIGTERM to the cluster's process group, SIGKILL to what is left after `grace_s`."""
        for sig, wait in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 5.0)):
            try:
                os.killpg(self.pid, sig)
            except ProcessLookupError:
                return
            deadline = time.monotonic() + wait
            while self.alive() and time.monotonic() < deadline:
                time.sleep(0.5)
                _reap(self.pid)
            if not self.alive():
                return


def _reap(pid: int) -> None:
    """Collects the exit status if the process is our child (else it would linger as a zombie)."""
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass
