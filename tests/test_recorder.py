"""The metrics a user watches (kitdist.train.recorder), read back as TensorBoard and W&B read them:
files reach the run folder on the flush cadence, a resumed run's events have each step once (what an
earlier attempt logged past the checkpoint is purged), and the W&B sink in W&B's offline mode."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from kitdist.config import load_config
from kitdist.train.recorder import MetricsRecorder, remove_orphaned_copies


def run_config(root: Path, *overrides: str):
    return load_config(None, [f"storage.root={root}", "storage.run_name=r", *overrides])


def tensorboard_scalars(folder: Path, tag: str = "loss") -> list[tuple[int, float]]:
    """(step, value) of every `tag` event under `folder`, as TensorBoard loads them (all events files)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(folder))
    accumulator.Reload()
    return [(event.step, event.value) for event in accumulator.Scalars(tag)]


def test_metrics_reach_the_run_folder_on_the_flush_cadence(tmp_path):
    """metrics_flush_s=0: every logged step is in the run folder at once; a long cadence: only what
    sync (a checkpoint) sent."""
    metrics = tmp_path / "r" / "metrics"
    at_once = MetricsRecorder(run_config(tmp_path, "train.metrics_flush_s=0"))
    at_once.log(1, {"loss": 0.5})
    assert tensorboard_scalars(metrics / "tensorboard") == [(1, 0.5)]
    assert json.loads((metrics / "metrics.jsonl").read_text()) == {"step": 1, "loss": 0.5}
    at_once.close()

    later = MetricsRecorder(run_config(tmp_path, "train.metrics_flush_s=3600"), resume_step=1)
    later.log(2, {"loss": 0.25})
    assert tensorboard_scalars(metrics / "tensorboard") == [(1, 0.5)]
    later.sync()  # what a checkpoint does
    assert tensorboard_scalars(metrics / "tensorboard") == [(1, 0.5), (2, 0.25)]
    later.close()
    assert not at_once.local.exists() and not later.local.exists()  # no copy left in the worker's /tmp


def test_a_failed_attempt_leaves_what_it_synced_and_no_local_copy(tmp_path):
    metrics = tmp_path / "r" / "metrics"
    recorder = MetricsRecorder(run_config(tmp_path, "train.metrics_flush_s=3600"))
    recorder.log(1, {"loss": 0.5})
    recorder.sync()
    recorder.log(2, {"loss": 0.25})
    recorder.discard()  # the attempt failed after step 2, its last checkpoint at step 1
    assert not recorder.local.exists()
    assert [json.loads(line)["step"] for line in (metrics / "metrics.jsonl").read_text().splitlines()] == [1]


HOLD_A_COPY = """
import sys, time
from kitdist.train.recorder import local_copy
folder, _ = local_copy()
(folder / "metrics.jsonl").write_text("{}")
print(folder, flush=True)
time.sleep(600)
"""


def test_a_killed_workers_local_copy_is_removed_and_live_ones_are_kept(tmp_path):
    """A worker killed with SIGKILL removes nothing; the next recorder removes its folder, not the folder of
    a process that still runs, nor its own."""
    env = {**os.environ, "TMPDIR": str(tmp_path)}
    holders = [
        subprocess.Popen([sys.executable, "-c", HOLD_A_COPY], stdout=subprocess.PIPE, text=True, env=env)
        for _ in range(2)
    ]
    try:
        killed, alive = (Path(holder.stdout.readline().strip()) for holder in holders)
        assert killed.parent == tmp_path and (killed / "metrics.jsonl").is_file() and alive.is_dir()
        holders[0].kill()
        holders[0].wait()
        assert killed.is_dir()  # nothing removed it
        assert remove_orphaned_copies(str(tmp_path)) == [killed]
        assert not killed.exists() and alive.is_dir()
        recorder = MetricsRecorder(run_config(tmp_path / "runs"))
        assert remove_orphaned_copies(str(recorder.local.parent)).count(recorder.local) == 0
        assert recorder.local.is_dir()
        recorder.close()
    finally:
        for holder in holders:
            holder.kill()
            holder.wait()
    assert remove_orphaned_copies(str(tmp_path)) == [alive]  # its process has ended now


def test_a_recorder_that_fails_to_start_leaves_no_folder(tmp_path, monkeypatch):
    """A worker outlives many attempts: a start that fails (here: an unreadable earlier metrics file to
    resume from) removes its local folder and lets go of its lock."""
    local_root = tmp_path / "tmp"
    local_root.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(local_root))
    (tmp_path / "r" / "metrics").mkdir(parents=True)
    (tmp_path / "r" / "metrics" / "metrics.jsonl").write_text("{not json\n")
    with pytest.raises(json.JSONDecodeError):
        MetricsRecorder(run_config(tmp_path), resume_step=1)
    assert list(local_root.iterdir()) == []
    recorder = MetricsRecorder(run_config(tmp_path / "other"))
    recorder.close()
    assert list(local_root.iterdir()) == []
    synced = tmp_path / "other" / "r" / "metrics"
    assert {p.name for p in synced.rglob("*")} >= {"metrics.jsonl"}
    assert not list(synced.rglob(".kitdist-owner"))  # the lock file is never synced


def test_a_resumed_run_purges_the_steps_after_its_checkpoint(tmp_path):
    """An attempt logged steps 1-5 (its last checkpoint: step 3) and died; the resumed attempt logs 4-6
    again. TensorBoard and the JSONL then hold each step once, 4 and 5 from the resumed attempt; an
    events file holding only steps past the checkpoint is removed."""
    cfg = run_config(tmp_path, "train.metrics_flush_s=0")
    first = MetricsRecorder(cfg)
    for step in range(1, 6):
        first.log(step, {"loss": 1.0 / step})
    first.close()
    second = MetricsRecorder(cfg, resume_step=3)
    for step in (4, 5):
        second.log(step, {"loss": 2.0 / step})
    second.close()  # died after step 5 again: its checkpoint was step 3
    third = MetricsRecorder(cfg, resume_step=3)
    for step in (4, 5, 6):
        third.log(step, {"loss": 3.0 / step})
    third.close()

    metrics = tmp_path / "r" / "metrics"
    expected = [(1, 1.0), (2, 0.5), (3, 1 / 3), (4, 3 / 4), (5, 3 / 5), (6, 3 / 6)]
    events = tensorboard_scalars(metrics / "tensorboard")
    assert [step for step, _ in events] == [step for step, _ in expected]
    assert [value for _, value in events] == pytest.approx([value for _, value in expected], rel=1e-6)
    assert len(list((metrics / "tensorboard").glob("events.out.tfevents.*"))) == 2
    lines = [json.loads(line) for line in (metrics / "metrics.jsonl").read_text().splitlines()]
    assert [(line["step"], line["loss"]) for line in lines] == expected


def wandb_records(run_file: Path) -> list:
    """The records of a W&B offline run file (`run-<id>.wandb`): a 7-byte header, then records framed as
    LevelDB's log is (32 KiB blocks; each chunk: CRC32, length, type 1 full / 2 first / 3 middle / 4 last)."""
    from wandb.proto.wandb_internal_pb2 import Record

    data, block = run_file.read_bytes(), 32768
    assert data[:4] == b":W&B"
    records, pending, position = [], b"", 7
    while position + 7 <= len(data):
        if block - position % block < 7:  # a block's tail too short for a chunk header is padding
            position += block - position % block
            continue
        length, kind = struct.unpack("<HB", data[position + 4 : position + 7])
        pending += data[position + 7 : position + 7 + length]
        position += 7 + length
        if kind in (1, 4):
            record = Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


def test_wandb_sink_in_offline_mode(tmp_path, monkeypatch):
    """train.report_to=[wandb] alone: the numbers of each record reach a W&B run (offline) named after
    the run, with the run's config and the id kept in the metrics folder; no TensorBoard events."""
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb-dir"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    cfg = run_config(tmp_path / "runs", "train.report_to=[wandb]", "train.wandb_project=kit-test")
    recorder = MetricsRecorder(cfg)
    for step in (1, 2, 3):
        recorder.log(step, {"loss": 1.0 / step, "lr": 1e-3, "crop_size": 64, "note": "text"})
    recorder.close()

    metrics = tmp_path / "runs" / "r" / "metrics"
    run_id = (metrics / "wandb-run-id").read_text()
    assert not (metrics / "tensorboard").exists()
    (run_file,) = (tmp_path / "wandb-dir" / "wandb").glob(f"offline-run-*-{run_id}/run-{run_id}.wandb")
    records = wandb_records(run_file)
    runs = [record.run for record in records if record.HasField("run")]
    assert len(runs) == 1, f"{len(records)} records in {run_file.stat().st_size} bytes of {run_file}"
    (run,) = runs
    assert (run.run_id, run.project, run.display_name) == (run_id, "kit-test", "r")
    config = {item.key: json.loads(item.value_json) for item in run.config.update}
    assert config["train"]["wandb_project"] == "kit-test" and config["storage"]["run_name"] == "r"
    history = [
        {"/".join(item.nested_key) or item.key: json.loads(item.value_json) for item in record.history.item}
        for record in records
        if record.HasField("history")
    ]
    assert [(row["_step"], row["loss"], row["crop_size"]) for row in history] == [
        (1, 1.0, 64),
        (2, 0.5, 64),
        (3, 1 / 3, 64),
    ]
    assert all("note" not in row for row in history)
