"""Bad input loses nothing and gets a clear answer: rejects with reasons, errors before work, verify failures."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from PIL import Image
from test_shards_recipes import lay_out, photo, read_samples, save

from kitdist.shards import build_shards
from kitdist.shards.__main__ import main
from kitdist.shards.manifest import read_manifest, shard_urls
from kitdist.shards.samples import check_jpeg, check_png


def _reasons(manifest) -> dict[str, str]:
    return {reject.path: reject.reason for reject in manifest.rejects}


def test_damaged_clean_images_are_rejected_and_the_rest_kept(photo_paths, tmp_path, capsys):
    src = tmp_path / "raw"
    lay_out("folder", photo_paths, src)
    good = sorted(
        path.relative_to(src).as_posix() for path in src.rglob("*") if path.suffix in (".png", ".jpg")
    )
    png, jpeg = (src / good[0]).read_bytes(), next((src / p).read_bytes() for p in good if p.endswith(".jpg"))
    (src / "bad").mkdir()
    (src / "bad" / "empty.png").write_bytes(b"")
    (src / "bad" / "garbage.png").write_bytes(b"this is not an image at all" * 40)
    (src / "bad" / "truncated.png").write_bytes(png[: len(png) // 2])
    (src / "bad" / "flipped.png").write_bytes(png[:5000] + bytes([png[5000] ^ 0xFF]) + png[5001:])
    (src / "bad" / "truncated.jpg").write_bytes(jpeg[: len(jpeg) // 2])
    (src / "bad" / "twin.png").write_bytes(png)
    (src / "bad" / "twin.jpg").write_bytes(jpeg)  # the same key as twin.png
    manifest = build_shards("folder", src, str(tmp_path / "out"), samples_per_shard=4, progress=False)[
        "train"
    ]
    reasons = _reasons(manifest)
    assert "empty file" in reasons["bad/empty.png"]
    assert "cannot read image header" in reasons["bad/garbage.png"]
    assert "truncated" in reasons["bad/truncated.png"] and "truncated" in reasons["bad/truncated.jpg"]
    assert "CRC mismatch" in reasons["bad/flipped.png"]
    assert "duplicate key bad__twin (already used by bad/twin.jpg)" in reasons["bad/twin.png"]
    assert manifest.total_samples == len(good) + 1 and len(reasons) == 6
    keys = {sample["__key__"] for sample in read_samples(shard_urls(str(tmp_path / "out"), manifest))}
    assert len(keys) == len(good) + 1
    assert "6 rejected" in capsys.readouterr().err
    assert main(["stats", str(tmp_path / "out")]) == 0
    summary = capsys.readouterr().out
    assert "rejected: 6" in summary and "empty file" in summary and "corrupt image" in summary


def test_pair_problems_reject_the_pair(photo_paths, tmp_path):
    src = tmp_path / "raw"
    lay_out("gopro", photo_paths, src)
    sequence = src / "train" / "GOPR00_07_00"
    blurs = sorted((sequence / "blur").glob("*.png"))
    (sequence / "sharp" / blurs[0].name).unlink()  # input without target
    (sequence / "blur" / blurs[1].name).unlink()  # target without input
    save(photo(photo_paths[0]).resize((200, 150)), sequence / "sharp" / blurs[2].name)  # size mismatch
    (sequence / "blur" / blurs[3].name).write_bytes(b"")
    manifests = build_shards("gopro", src, str(tmp_path / "out"), progress=False)
    reasons = _reasons(manifests["train"])
    prefix = "train/GOPR00_07_00"
    assert "missing target" in reasons[f"{prefix}/blur/{blurs[0].name}"]
    assert "missing input" in reasons[f"{prefix}/sharp/{blurs[1].name}"]
    assert "size mismatch" in reasons[f"{prefix}/blur/{blurs[2].name}"]
    assert "empty file" in reasons[f"{prefix}/blur/{blurs[3].name}"]
    num_train = len(list((src / "train").glob("*/blur/*.png")))  # after one blur was removed
    assert manifests["train"].total_samples == num_train - 3 and not manifests["test"].rejects


@pytest.mark.parametrize(
    "case, message",
    [
        ("unknown recipe", "unknown recipe 'nosuch'"),
        ("missing source", "no such folder"),
        ("empty source", "no files match"),
        ("unwritable destination", "cannot write"),
        ("unknown split", "split 'holdout' is not in recipe gopro"),
        ("bad tile", "--stride"),
    ],
)
def test_bad_requests_fail_before_any_work(case, message, tmp_path, capsys):
    src, out = tmp_path / "raw", tmp_path / "out"
    (src / "train" / "seq" / "blur").mkdir(parents=True)
    Image.new("RGB", (64, 64)).save(src / "train" / "seq" / "blur" / "0.png")
    args = {"recipe": "gopro", "--src": str(src), "--out": str(out)}
    extra: list[str] = []
    if case == "unknown recipe":
        args["recipe"] = "nosuch"
    elif case == "missing source":
        args["--src"] = str(tmp_path / "absent")
    elif case == "empty source":
        shutil.rmtree(src / "train")
    elif case == "unwritable destination":
        (tmp_path / "a_file").write_text("x")
        args["--out"] = str(tmp_path / "a_file" / "out")
    elif case == "unknown split":
        extra = ["--split", "holdout"]
    else:
        extra = ["--tile", "64", "--stride", "96"]
    argv = ["build", args.pop("recipe"), *(item for pair in args.items() for item in pair), *extra]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "writing" not in err and "probing" not in err
    assert not out.exists()


@pytest.mark.s3
def test_s3_destination_with_wrong_credentials_fails_before_work(
    photo_paths, s3_env, tmp_path, monkeypatch, capsys
):
    lay_out("folder", photo_paths[:2], tmp_path / "raw")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
    assert main(["build", "folder", "--src", str(tmp_path / "raw"), "--out", s3_env]) == 2
    err = capsys.readouterr().err
    assert (
        f"--out {s3_env}: cannot write there" in err and "not-the-secret" not in err and "probing" not in err
    )


def test_verify_catches_a_flipped_byte_and_a_missing_shard(photo_paths, tmp_path, capsys):
    src, out = tmp_path / "raw", tmp_path / "out"
    lay_out("sidd", photo_paths[:6], src)
    manifest = build_shards("sidd", src, str(out), samples_per_shard=2, progress=False)["train"]
    assert main(["verify", str(out), "--deep"]) == 0
    shards = [out / "train" / shard.name for shard in manifest.shards]
    data = bytearray(shards[0].read_bytes())
    data[len(data) // 3] ^= 0x01
    shards[0].write_bytes(bytes(data))
    shards[1].unlink()
    assert main(["verify", str(out)]) == 1
    report = capsys.readouterr().out
    assert f"{shards[0].name}: sha256" in report and f"{shards[1].name}: missing" in report
    assert not any(shards[2].name in line for line in report.splitlines())


def test_deep_verify_decodes_every_image(photo_paths, tmp_path, capsys):
    out = tmp_path / "out"
    lay_out("folder", photo_paths[:3], tmp_path / "raw")
    build_shards("folder", tmp_path / "raw", str(out), progress=False)
    manifest = read_manifest(str(out))
    shard = out / manifest.shards[0].name
    data = shard.read_bytes()
    # damage pixel data inside a JPEG but keep the manifest consistent: only decoding can notice
    start = data.index(b"\xff\xda") + 200
    shard.write_bytes(data[:start] + b"\xff\xd9" * 4000 + data[start + 8000 :])
    _rewrite_manifest(out, shard)
    assert main(["verify", str(out)]) == 0
    assert main(["verify", str(out), "--deep"]) == 1
    assert "does not decode" in capsys.readouterr().out


def test_deep_verify_reads_every_shard_back_through_webdataset(photo_paths, tmp_path, capsys):
    """A shard whose tar holds a sample's file twice: its manifest agrees and its images decode, but
    webdataset's reader refuses it, so `--deep` fails naming the shard."""
    import io
    import tarfile

    out = tmp_path / "out"
    lay_out("folder", photo_paths[:2], tmp_path / "raw")
    build_shards("folder", tmp_path / "raw", str(out), progress=False)
    shard = out / read_manifest(str(out)).shards[0].name
    copy = io.BytesIO()
    with tarfile.open(shard) as source, tarfile.open(fileobj=copy, mode="w") as target:
        for index, member in enumerate(source.getmembers()):
            data = source.extractfile(member).read()
            for _ in range(2 if index == 0 else 1):
                target.addfile(member, io.BytesIO(data))
    shard.write_bytes(copy.getvalue())
    _rewrite_manifest(out, shard)
    assert main(["verify", str(out)]) == 0
    assert main(["verify", str(out), "--deep"]) == 1
    assert f"{shard}: webdataset cannot read it" in capsys.readouterr().out


def _rewrite_manifest(out: Path, shard: Path) -> None:
    import dataclasses
    import hashlib

    from kitdist.shards.manifest import write_manifest

    manifest = read_manifest(str(out))
    data = shard.read_bytes()
    shards = tuple(
        dataclasses.replace(info, bytes=len(data), sha256=hashlib.sha256(data).hexdigest())
        if info.name == shard.name
        else info
        for info in manifest.shards
    )
    write_manifest(str(out), dataclasses.replace(manifest, shards=shards))


def test_structural_checks_accept_real_files_and_refuse_damage(photo_paths):
    png = next(path for path in photo_paths if path.suffix == ".png").read_bytes()
    jpeg = next(path for path in photo_paths if path.suffix == ".jpg").read_bytes()
    check_png(png)
    check_jpeg(jpeg)
    for damaged in (png[:-20], png[:100] + b"\x00" + png[101:], b"\x89PNG" + png[4:][:50]):
        with pytest.raises(ValueError):
            check_png(damaged)
    with pytest.raises(ValueError):
        check_jpeg(jpeg[: len(jpeg) - 5000])


def test_header_sizes_match_pil(photo_paths, tmp_path):
    from kitdist.shards.headers import image_size

    progressive = tmp_path / "progressive.jpg"
    Image.open(photo_paths[0]).convert("RGB").save(
        progressive, progressive=True, exif=b"Exif\x00\x00" + b"x" * 9000
    )
    for path in [*photo_paths, progressive]:
        with Image.open(path) as image:
            assert image_size(path) == image.size
    (tmp_path / "bad.jpg").write_bytes(b"\xff\xd8\x00\x00garbage")
    with pytest.raises(ValueError):
        image_size(tmp_path / "bad.jpg")
