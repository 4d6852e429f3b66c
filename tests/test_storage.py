"""Storage through fsspec: atomic writes locally and on a real S3 server; failures name the URL, fast."""

from __future__ import annotations

import time

import pytest

from kitdist import storage


def test_local_write_read_list_remove(tmp_path):
    url = storage.join(str(tmp_path), "a", "b.json")
    storage.write_text(url, '{"x": 1}')
    assert storage.read_text(url) == '{"x": 1}'
    assert storage.list_names(storage.join(str(tmp_path), "a")) == ["b.json"]
    assert not [p for p in tmp_path.rglob("*") if ".tmp-" in p.name]
    storage.remove(url)
    assert not storage.exists(url)


def test_file_url_is_the_same_place(tmp_path):
    storage.write_bytes(f"file://{tmp_path}/x.bin", b"abc")
    assert (tmp_path / "x.bin").read_bytes() == b"abc"


def test_local_paths_made_absolute_other_urls_kept(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert storage.absolute("runs/r") == storage.absolute("file://runs/r") == f"{tmp_path}/runs/r"
    assert storage.absolute("/data/x") == "/data/x" and storage.absolute("file:///data/x") == "/data/x"
    assert storage.absolute("s3://bucket/runs") == "s3://bucket/runs" and storage.absolute("") == ""


def test_unwritable_local_destination_is_named(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(storage.StorageError, match=str(blocker)):
        storage.check_writable(str(blocker / "sub"))


@pytest.mark.s3
def test_s3_round_trip(s3_env, tmp_path):
    url = storage.join(s3_env, "run", "state.json")
    storage.write_text(url, "hello")
    assert storage.read_text(url) == "hello"
    local = tmp_path / "w.bin"
    local.write_bytes(b"\x00" * 1000)
    storage.put_file(str(local), storage.join(s3_env, "run", "w.bin"))
    assert storage.list_names(storage.join(s3_env, "run")) == ["state.json", "w.bin"]
    storage.check_writable(s3_env)


@pytest.mark.s3
def test_s3_wrong_credentials_fail_fast(s3_env, monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong")
    storage.url_to_fs(s3_env)[0].clear_instance_cache()
    started = time.monotonic()
    with pytest.raises((storage.StorageError, PermissionError), match=s3_env.split("/")[2]):
        storage.check_writable(s3_env)
    assert time.monotonic() - started < 30


def test_unreachable_endpoint_fails_fast(monkeypatch):
    from s3server import free_port

    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "x")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "y")
    started = time.monotonic()
    with pytest.raises(storage.StorageError, match="s3://nowhere/run"):
        storage.check_writable("s3://nowhere/run")
    assert time.monotonic() - started < 60


@pytest.mark.parametrize("where", ["local", "s3"])
def test_move_takes_a_folder_with_everything_below_it(where, tmp_path, request):
    root = str(tmp_path) if where == "local" else request.getfixturevalue("s3_env")
    storage.write_text(storage.join(root, "run", "step-1", "a.txt"), "a")
    storage.write_text(storage.join(root, "run", "b.txt"), "b")
    storage.move(storage.join(root, "run"), storage.join(root, "run.replaced-x"))
    for name in ("b.txt", "step-1/a.txt"):  # (SeaweedFS may still list the emptied folder itself)
        assert not storage.exists(storage.join(root, "run", name)), name
    assert storage.read_text(storage.join(root, "run.replaced-x", "step-1", "a.txt")) == "a"
    assert storage.list_names(storage.join(root, "run.replaced-x")) == ["b.txt", "step-1"]
