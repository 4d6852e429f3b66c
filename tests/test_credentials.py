"""Credentials never travel through Ray: what the launcher and the coordinator hand to Ray (runtime-env
variables, the pickled S3 client for checkpoints) holds where the object store is, never a secret; a
pipeline that asks to forward one is refused naming forward_env. (The runs themselves, secret searched
for in Ray's session folder, objects and console: tests/test_train.py and tests/test_coordinator.py.)"""

from __future__ import annotations

import pickle

import pytest
from coordkit import write_pipeline

from kitdist.config import ConfigError, DistConfig
from kitdist.coordinator.jobs import job_env
from kitdist.coordinator.spec import load_pipeline
from kitdist.credentials import SECRET_ENV, STORAGE_ENV
from kitdist.distributed.env import worker_env_vars
from kitdist.storage import arrow_filesystem

SECRET = "s3-secret-value-for-this-test"


@pytest.fixture
def credentials(monkeypatch) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "key-id-for-this-test")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    monkeypatch.setenv("AWS_SESSION_TOKEN", "session-token-for-this-test")


def test_worker_environment_names_the_endpoint_and_holds_no_secret(credentials):
    env = worker_env_vars(DistConfig())
    assert env["AWS_ENDPOINT_URL"] == "http://127.0.0.1:9"
    assert not {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"} & set(env)
    assert SECRET not in repr(env)


def test_job_environment_holds_no_secret_and_refuses_to_forward_one(credentials, monkeypatch):
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    env = job_env(["DS_ACCELERATOR"])
    assert env == {"AWS_ENDPOINT_URL": "http://127.0.0.1:9", "DS_ACCELERATOR": "cpu"}
    with pytest.raises(ConfigError, match="forward_env: AWS_SECRET_ACCESS_KEY is a credential"):
        job_env(["AWS_SECRET_ACCESS_KEY"])
    monkeypatch.setenv("COPY_OF_SECRET", SECRET)
    with pytest.raises(ConfigError, match="forward_env: COPY_OF_SECRET holds a credential"):
        job_env(["COPY_OF_SECRET"])


def test_jobs_and_workers_get_the_same_storage_settings_and_no_credential(credentials, monkeypatch):
    """One list (STORAGE_ENV) for both; the session token stays behind with the key pair, for both."""
    for name in STORAGE_ENV:
        monkeypatch.setenv(name, f"value-of-{name}")
    workers = {
        name: value for name, value in worker_env_vars(DistConfig()).items() if name.startswith("AWS_")
    }
    assert workers == job_env([]) == {name: f"value-of-{name}" for name in STORAGE_ENV}
    for name in SECRET_ENV:
        with pytest.raises(ConfigError, match=f"forward_env: {name} is a credential"):
            job_env([name])


def test_pipeline_forwarding_a_credential_is_refused_when_loaded(tmp_path):
    data = dict.fromkeys(
        ["photos_train", "photos_val", "sidd_train", "sidd_test", "gopro_train", "gopro_test"], "x"
    )
    path = write_pipeline(tmp_path / "p.yaml", data, forward_env=["PYTHONPATH", "AWS_SECRET_ACCESS_KEY"])
    with pytest.raises(ConfigError, match=rf"{path}: forward_env: AWS_SECRET_ACCESS_KEY is a credential"):
        load_pipeline(path)


def test_s3_client_handed_to_ray_carries_no_credentials(credentials):
    """Ray Train pickles the checkpoint filesystem to its controller and workers; each of them finds the
    credentials in its own environment."""
    filesystem, path = arrow_filesystem("s3://bucket/runs")
    pickled = pickle.dumps(filesystem)
    assert path == "bucket/runs" and b"127.0.0.1:9" in pickled
    assert SECRET.encode() not in pickled and b"session-token-for-this-test" not in pickled


def test_a_credentials_file_whose_path_alone_travels_reaches_s3(s3_env, s3_server, tmp_path, monkeypatch):
    """No key in the environment, only AWS_SHARED_CREDENTIALS_FILE (a path, forwarded to the workers):
    both S3 clients, fsspec's (data, metrics) and pyarrow's (Ray Train's checkpoints), read the file.
    One that others can read is refused, naming the variable."""
    import os

    from kitdist import storage
    from kitdist.credentials import check_credentials_file

    path = tmp_path / "credentials"
    path.write_text(
        f"[default]\naws_access_key_id = {s3_server.env['AWS_ACCESS_KEY_ID']}\n"
        f"aws_secret_access_key = {s3_server.env['AWS_SECRET_ACCESS_KEY']}\n"
    )
    os.chmod(path, 0o600)
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(name)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(path))
    check_credentials_file()
    assert worker_env_vars(DistConfig())["AWS_SHARED_CREDENTIALS_FILE"] == str(path)
    storage.write_text(f"{s3_env}/by-file.txt", "fsspec")
    filesystem, prefix = arrow_filesystem(s3_env)
    with filesystem.open_output_stream(f"{prefix}/by-arrow.txt") as out:
        out.write(b"arrow")
    assert storage.read_text(f"{s3_env}/by-arrow.txt") == "arrow"
    os.chmod(path, 0o644)
    with pytest.raises(ConfigError, match="AWS_SHARED_CREDENTIALS_FILE: .* can be read by others"):
        check_credentials_file()
