"""Shared pieces of the coordinator tests: the demo data, a pipeline file written for a test, the
coordinator run as a real subprocess (so it can be SIGKILLed), and waiting on its state document."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]


def write_pipeline(path: Path, data: dict[str, str], **changes: Any) -> Path:
    """A tiny pipeline: pre-train 2 steps on 1 worker, fine-tune denoise and deblur from it."""
    tree: dict[str, Any] = {
        "name": "t",
        "state": str(path.parent / "state"),
        "storage_root": str(path.parent / "runs"),
        "forward_env": ["PYTHONPATH", "DS_ACCELERATOR"],
        "max_attempts": 2,
        "backoff_s": 1,
        "poll_s": 1,
        "pretrain": {
            "config": str(ROOT / "configs/pretrain/debug.yaml"),
            "train_shards": data["photos_train"],
            "val_shards": data["photos_val"],
            "overrides": [
                "train.max_steps=2",
                "train.warmup_steps=1",
                "train.checkpoint_every=2",
                "dist.num_workers=1",
            ]
            + ["data.max_val_samples=1", "data.val_crop_size=64"],
        },
        "finetune": [
            _task("denoise", data["sidd_train"], data["sidd_test"], ["train.max_steps=10"]),
            _task("deblur", data["gopro_train"], data["gopro_test"], ["train.max_steps=4"]),
        ],
    }
    tree.update(changes)
    path.write_text(yaml.safe_dump(tree, sort_keys=False))
    return path


def _task(task: str, train: str, test: str, overrides: list[str]) -> dict[str, Any]:
    return {
        "task": task,
        "dataset": f"demo {task}",
        "config": str(ROOT / "configs/finetune/demo.yaml"),
        "train_shards": train,
        "val_shards": test,
        "test_shards": test,
        "overrides": ["data.max_val_samples=1", *overrides],
        "eval_resources": {"num_cpus": 0},
    }


def coordinator_env(**extra: str) -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "DS_ACCELERATOR": "cpu", **extra}
    return env


def start_coordinator(*args: str, env: dict[str, str], log: Path) -> subprocess.Popen:
    handle = open(log, "ab")
    process = subprocess.Popen(
        [sys.executable, "-m", "kitdist.coordinator", *args],
        env=env,
        cwd=ROOT,
        stdout=handle,
        stderr=subprocess.STDOUT,
    )
    handle.close()
    return process


def wait_for(
    condition, timeout: float, what: str, process: subprocess.Popen | None = None, log: Path | None = None
):
    """Polls `condition()` until it returns something truthy; fails naming `what` (and the log)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        if process is not None and process.poll() is not None:
            raise AssertionError(f"coordinator exited ({process.returncode}) before {what}: {_tail(log)}")
        time.sleep(0.5)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}: {_tail(log)}")


def _tail(log: Path | None) -> str:
    return log.read_text(errors="replace")[-3000:] if log and log.exists() else ""
