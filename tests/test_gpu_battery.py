"""The GPU battery's --cpu mode end to end (benchmarks/gpu/run.sh OUTDIR --cpu), so that the script the
next GPU machine runs has not rotted: every section runs or is recorded as failed, and the sections this
branch owns produce their figures."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SECTIONS = ("device", "tests", "attention", "train", "restore", "loader")

pytestmark = pytest.mark.slow


def test_cpu_battery_writes_every_section(tmp_path):
    out = tmp_path / "battery"
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    done = subprocess.run(
        ["bash", str(REPO / "benchmarks" / "gpu" / "run.sh"), str(out), "--cpu"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    assert report["mode"] == "cpu" and tuple(report["sections"]) == SECTIONS
    sections = report["sections"]
    for name in SECTIONS:
        assert "seconds" in sections[name] and ("error" in sections[name] or sections[name]["ok"]), name
    for name in ("device", "train", "restore", "loader"):
        assert sections[name]["ok"], (name, sections[name], (out / "battery.log").read_text()[-3000:])
    train = sections["train"]
    assert [(row["engine"], row["checkpointing"]) for row in train["variants"]] == [
        (engine, setting) for setting in ("off", "on") for engine in ("DDP", "ZeRO-1", "ZeRO-2")
    ]
    assert all(row["step_ms"] > 0 and row["images_per_s"] > 0 for row in train["variants"])
    restore = sections["restore"]
    assert restore["resumed_from"] == 4 and len(restore["losses"]) == 6
    assert "weights.safetensors" in restore["checkpoint_files"]
    assert restore["restore"]["fp32"]["shape"] == [96, 128, 3]
    assert sections["loader"]["rates"]["pipeline"] > 0
    markdown = (out / "report.md").read_text()
    assert all(f"## {name}" in markdown for name in SECTIONS)
