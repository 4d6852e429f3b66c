"""Shard builds on local folders and the real S3 server: tar layout, determinism, kill-and-resume."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest
from test_shards_recipes import lay_out, read_samples
from webdataset.gopen import gopen_schemes

from kitdist import storage
from kitdist.shards import build_shards, split_url
from kitdist.shards.__main__ import main
from kitdist.shards.manifest import read_manifest, shard_urls

REPO = Path(__file__).resolve().parents[1]


def _files(folder: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(folder.iterdir()) if path.is_file()}


@pytest.fixture
def gopro_src(photo_paths, tmp_path) -> Path:
    src = tmp_path / "gopro"
    lay_out("gopro", photo_paths, src)
    return src


def _open_with_fsspec(url: str, mode: str = "rb", bufsize: int = 8192, **kw):
    fs, path = storage.url_to_fs(url)
    return fs.open(path, mode)


@pytest.mark.s3
def test_build_to_s3_reads_back_with_webdataset_and_tar(gopro_src, s3_env, tmp_path, monkeypatch):
    monkeypatch.setitem(gopen_schemes, "s3", _open_with_fsspec)
    manifests = build_shards(
        "gopro", gopro_src, s3_env, samples_per_shard=24, tile=128, stride=128, progress=False
    )
    train = manifests["train"]
    urls = shard_urls(split_url(s3_env, "gopro", "train"), train)
    assert read_manifest(split_url(s3_env, "gopro", "train")) == train and len(urls) > 1
    assert not storage.exists(
        storage.join(split_url(s3_env, "gopro", "train"), "_build/train-000000.tar.json")
    )
    samples = read_samples(urls)  # plain webdataset, its s3:// scheme opened with fsspec
    assert len(samples) == train.total_samples == len({s["__key__"] for s in samples})
    assert all({"input.png", "target.png", "json"} <= set(sample) for sample in samples)
    local = tmp_path / "first.tar"
    local.write_bytes(storage.read_bytes(urls[0]))
    listing = subprocess.run(["tar", "-tvf", str(local)], capture_output=True, text=True, check=True).stdout
    assert listing.count(".input.png") == listing.count(".target.png") == train.shards[0].samples
    assert main(["verify", s3_env, "--deep"]) == 0


def test_local_shards_are_plain_deterministic_tars(gopro_src, tmp_path):
    first, second = tmp_path / "first", tmp_path / "second"
    build_shards("gopro", gopro_src, str(first), samples_per_shard=5, tile=128, stride=96, progress=False)
    build_shards(
        "gopro", gopro_src, str(second), samples_per_shard=5, tile=128, stride=96, workers=2, progress=False
    )
    for split in ("train", "test"):
        assert _files(first / split) == _files(second / split)  # byte-identical, 1 or 2 workers
    with tarfile.open(next((first / "train").glob("*.tar"))) as tar:
        members = tar.getmembers()
    assert {(m.uid, m.gid, m.uname, m.gname, m.mtime) for m in members} == {(0, 0, "", "", 946684800)}
    names = [m.name for m in members]
    assert names[:3] == [names[0].split(".")[0] + suffix for suffix in (".input.png", ".json", ".target.png")]
    assert not (first / "train" / "_build").exists()


def test_rebuild_of_a_finished_set_does_nothing_and_other_options_need_overwrite(gopro_src, tmp_path, capsys):
    out = str(tmp_path / "out")
    build_shards("gopro", gopro_src, out, samples_per_shard=4, progress=False)
    before = _files(tmp_path / "out" / "train")
    assert (
        build_shards("gopro", gopro_src, out, samples_per_shard=4, progress=False)["train"].total_samples > 0
    )
    assert "nothing to do" in capsys.readouterr().err and _files(tmp_path / "out" / "train") == before
    assert main(["build", "gopro", "--src", str(gopro_src), "--out", out, "--samples-per-shard", "2"]) == 2
    assert "--overwrite" in capsys.readouterr().err
    manifests = build_shards("gopro", gopro_src, out, samples_per_shard=2, overwrite=True, progress=False)
    assert (
        read_manifest(f"{out}/train") == manifests["train"]
        and manifests["train"].options["samples_per_shard"] == 2
    )


@pytest.mark.slow
def test_killed_build_resumes_to_the_same_shards(photo_paths, tmp_path):
    src = tmp_path / "gopro"
    lay_out("gopro", photo_paths, src)
    # small overlapping tiles: ~1000 samples in ~70 shards, a build long enough to kill midway
    args = ["build", "gopro", "--src", str(src), "--split", "train", "--tile", "48", "--stride", "32"]
    args += ["--samples-per-shard", "16", "--no-progress"]
    killed, reference = tmp_path / "killed", tmp_path / "reference"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    process = subprocess.Popen([sys.executable, "-m", "kitdist.shards", *args, "--out", str(killed)], env=env)
    published = _wait_for_shards(killed / "train", process, at_least=3)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert not (killed / "train" / "manifest.json").exists(), "the build finished before it could be killed"
    assert main([*args, "--out", str(killed)]) == 0
    assert main([*args, "--out", str(reference)]) == 0
    assert _files(killed / "train") == _files(reference / "train")
    manifest = read_manifest(str(killed / "train"))
    assert len(published) < len(manifest.shards)
    samples = read_samples(shard_urls(str(killed / "train"), manifest))
    keys = [sample["__key__"] for sample in samples]
    assert len(keys) == len(set(keys)) == manifest.total_samples > 0


def _wait_for_shards(folder: Path, process: subprocess.Popen, at_least: int) -> list[str]:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and process.poll() is None:
        sidecars = list((folder / "_build").glob("*.json")) if (folder / "_build").exists() else []
        if len(sidecars) >= at_least:
            return [path.name for path in sidecars]
        time.sleep(0.01)
    raise AssertionError(
        f"build exited ({process.poll()}) or stalled before {at_least} shards were published"
    )
