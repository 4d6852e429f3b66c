"""Training metrics on disk: JSONL and TensorBoard events under the run's `metrics/` folder.

Rank 0 writes into a local folder and copies it to the run's storage (local path or s3://) at every
checkpoint and at the end, so the metrics of a run live beside its checkpoints. On resume, the earlier
JSONL is fetched first and lines past the checkpoint being resumed are dropped (they are re-done).
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

from kitdist import storage

METRICS_FILE = "metrics.jsonl"


class MetricsRecorder:
    """Appends one JSON record per logging step and mirrors it as TensorBoard scalars."""

    def __init__(self, metrics_url: str, resume_step: int = 0) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.metrics_url = metrics_url
        self.local = Path(tempfile.mkdtemp(prefix="kitdist-metrics-"))
        self._fetch_previous(resume_step)
        self.tensorboard = SummaryWriter(log_dir=str(self.local / "tensorboard"))

    def _fetch_previous(self, resume_step: int) -> None:
        remote = storage.join(self.metrics_url, METRICS_FILE)
        lines: list[str] = []
        if resume_step > 0 and storage.exists(remote):
            for line in storage.read_text(remote).splitlines():
                if line.strip() and json.loads(line).get("step", 0) <= resume_step:
                    lines.append(line)
        (self.local / METRICS_FILE).write_text("".join(f"{line}\n" for line in lines))

    def log(self, step: int, record: dict[str, Any]) -> None:
        with open(self.local / METRICS_FILE, "a") as handle:
            handle.write(json.dumps({"step": step, **record}) + "\n")
        for key, value in record.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                self.tensorboard.add_scalar(key, value, step)

    def sync(self) -> None:
        """Copies the JSONL and TensorBoard files to the run's metrics folder."""
        self.tensorboard.flush()
        for path in sorted(self.local.rglob("*")):
            if path.is_file():
                storage.put_file(str(path), storage.join(self.metrics_url, str(path.relative_to(self.local))))

    def close(self) -> None:
        self.sync()
        self.tensorboard.close()
