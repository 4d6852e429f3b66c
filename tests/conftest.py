"""Shared fixtures: a real S3 server, real photographs from scikit-image, CPU-only settings."""

from __future__ import annotations

import os
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
