"""Shared fixtures: a real S3 server, real photographs from scikit-image, CPU-only settings, and a time
limit on each test marked `gpu`."""

from __future__ import annotations

import faulthandler
import os
import signal
import sys
import threading
from pathlib import Path

import pytest

# DeepSpeed picks its accelerator at import; tests run on CPU whatever the machine has.
os.environ.setdefault("DS_ACCELERATOR", "cpu")


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """A SeaweedFS S3 server on 127.0.0.1 for the whole session (skips only if it cannot start)."""
    from s3server import SeaweedS3

    server = SeaweedS3(tmp_path_factory.mktemp("seaweedfs"))
    try:
        server.start()
    except (FileNotFoundError, TimeoutError, RuntimeError) as err:
        pytest.skip(f"SeaweedFS S3 server could not start: {err}")
    yield server
    server.stop()


@pytest.fixture
def s3_env(s3_server, monkeypatch):
    """Points this test's process (and children it starts) at the test S3 server; yields a fresh prefix."""
    import uuid

    from s3server import BUCKET

    for key, value in s3_server.env.items():
        monkeypatch.setenv(key, value)
    import fsspec

    fsspec.config.conf.clear()
    fsspec.filesystem("s3").clear_instance_cache()
    yield f"s3://{BUCKET}/{uuid.uuid4().hex[:10]}"


@pytest.fixture(scope="session")
def photo_paths() -> list[Path]:
    """The real colour photographs scikit-image ships (RGB, at least 256 px on each side): the same ones
    the embedded default trains on."""
    from kitdist.pretrain import photo_paths as shipped_photographs

    paths = shipped_photographs()
    assert len(paths) >= 8, "expected scikit-image's photographs (is scikit-image installed?)"
    return paths


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory, photo_paths) -> Path:
    """A `debug` KiT trained for two steps and exported by training's own code (read only: the restore,
    evaluate and SIDD submission tests share it)."""
    from restorekit import export_debug_checkpoint

    return export_debug_checkpoint(tmp_path_factory.mktemp("ckpt"), photo_paths[0])


# Each GPU test's own limit, so that one stuck test (a hung NCCL call, a compile that never ends) fails
# alone and the GPU battery's other tests still run; `@pytest.mark.gpu(timeout_s=N)` sets a test's own.
# The GPU machines carry no more than the battery's wheels: this needs no plugin (pytest-timeout).
GPU_TEST_TIMEOUT_S = 90
GPU_TEST_HARD_EXIT_GRACE_S = 30  # past the limit, a test stuck in C code (no Python to interrupt)


class GpuTestTimeout(Exception):
    """A test marked `gpu` ran past its limit."""


@pytest.fixture(autouse=True)
def gpu_test_time_limit(request):
    """SIGALRM raises GpuTestTimeout in the test at its limit; a test that cannot be interrupted there
    (inside a CUDA or NCCL call) has its stacks dumped and the process ended GPU_TEST_HARD_EXIT_GRACE_S
    later, which the battery records with the tests that finished before it."""
    marker = request.node.get_closest_marker("gpu")
    if marker is None or threading.current_thread() is not threading.main_thread():
        yield
        return
    limit = int(marker.kwargs.get("timeout_s", GPU_TEST_TIMEOUT_S))

    def expire(signum, frame):
        faulthandler.dump_traceback(file=sys.__stderr__, all_threads=True)  # what the other threads do
        raise GpuTestTimeout(f"{request.node.nodeid} ran past its limit of {limit} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(limit)
    faulthandler.dump_traceback_later(limit + GPU_TEST_HARD_EXIT_GRACE_S, exit=True, file=sys.__stderr__)
    try:
        yield
    finally:
        signal.alarm(0)
        faulthandler.cancel_dump_traceback_later()
        signal.signal(signal.SIGALRM, previous)
