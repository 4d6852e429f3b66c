"""Training metrics: JSONL under the run's `metrics/` folder, and the sinks of `train.report_to`
(TensorBoard events in `metrics/tensorboard/`, Weights & Biases).

Rank 0 writes into a local folder and copies it to the run's storage (local path or s3://) every
`train.metrics_flush_s` seconds (at the first logged step after they have passed), at every checkpoint
and at the end, so a run can be watched while it trains and its metrics live beside its checkpoints.
On resume, what the earlier attempts recorded past the checkpoint being resumed (steps that are done
again) is dropped: JSONL lines and TensorBoard events (each events file rewritten without them). A W&B run
lasts as long as the run folder: its id is kept in `metrics/wandb-run-id`, and a resumed run continues it.

The local folder (`kitdist-locked-metrics-*` in the temp dir) is removed at the end of a run and after a
failed attempt; a worker that is killed (SIGKILL, the OOM killer) removes nothing, so each folder is held
with an flock (on a file inside it, opened for writing, as NFS needs; never synced) while its process
lives, and every new recorder first removes the folders no live process holds (the kernel drops a dead
process's locks, whatever killed it, and in any PID namespace).
"""

from __future__ import annotations

import fcntl
import io
import json
import logging
import os
import shutil
import tempfile
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kitdist import storage
from kitdist.checkpoints import METRICS_DIR, run_url
from kitdist.config import ConfigError

if TYPE_CHECKING:
    from kitdist.config import RunConfig

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"
WANDB_ID_FILE = "wandb-run-id"
log = logging.getLogger(__name__)

# Only folders made under the lock are candidates for removal: an unlocked `kitdist-metrics-*` folder of an
# earlier version may belong to a live process
LOCAL_PREFIX = "kitdist-locked-metrics-"
STAGING_PREFIX = "kitdist-new-metrics-"  # not matched by LOCAL_PREFIX + "*": see local_copy
OWNER_FILE = ".kitdist-owner"  # the file whose flock marks a folder in use


def _open_owner(folder: Path, create: bool) -> int:
    return os.open(folder / OWNER_FILE, os.O_RDWR | (os.O_CREAT if create else 0), 0o600)


def local_copy() -> tuple[Path, int]:
    """A new local folder for metrics, and the descriptor of the flock that marks it as in use (closed
    when the folder is removed, or by the kernel when the process dies). Orphans are removed first."""
    remove_orphaned_copies()
    staging = Path(tempfile.mkdtemp(prefix=STAGING_PREFIX))
    held = _open_owner(staging, create=True)
    try:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as err:  # a file system without locks: keep the staging name, which no clean-up removes
        log.warning(
            "metrics folder %s cannot be locked (%s); a killed worker would leave it behind", staging, err
        )
        return staging, held
    # locked before it carries the name the clean-up looks for, so it is never seen unlocked
    folder = staging.with_name(LOCAL_PREFIX + staging.name.removeprefix(STAGING_PREFIX))
    staging.rename(folder)
    return folder, held


def remove_orphaned_copies(root: str | None = None) -> list[Path]:
    """Removes the metrics folders under `root` (the temp dir) that no live process holds: those of killed
    workers. Returns them."""
    removed = []
    for folder in Path(root or tempfile.gettempdir()).glob(LOCAL_PREFIX + "*"):
        try:
            probe = _open_owner(folder, create=False)
        except OSError:  # gone meanwhile, or not ours to open
            continue
        try:
            fcntl.flock(probe, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:  # held: its process is alive
            continue
        else:
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder)
        finally:
            os.close(probe)
    return removed


class MetricsRecorder:
    """Appends one JSON record per logging step and mirrors its numbers to the sinks of train.report_to."""

    def __init__(self, cfg: RunConfig, resume_step: int = 0) -> None:
        self.metrics_url = storage.join(run_url(cfg), METRICS_DIR)
        self.flush_s = cfg.train.metrics_flush_s
        self.tensorboard = self.wandb = None
        self.local, self._held = local_copy()
        try:
            self._fetch_previous(resume_step)
            if "tensorboard" in cfg.train.report_to:
                from torch.utils.tensorboard import SummaryWriter

                purge_events(storage.join(self.metrics_url, TENSORBOARD_DIR), resume_step)
                self.tensorboard = SummaryWriter(log_dir=str(self.local / TENSORBOARD_DIR))
            self.wandb = open_wandb(cfg, self.metrics_url) if "wandb" in cfg.train.report_to else None
            self.sync()  # the trimmed JSONL replaces the earlier one now, not at the next checkpoint
        except BaseException:  # a worker outlives many attempts: no folder or lock left per failed start
            self.discard()
            raise

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
        numbers = {
            key: value
            for key, value in record.items()
            if isinstance(value, (int, float)) and not isinstance(value, bool)
        }
        if self.tensorboard is not None:
            for key, value in numbers.items():
                self.tensorboard.add_scalar(key, value, step)
        if self.wandb is not None:
            self.wandb.log(numbers, step=step)
        if time.monotonic() - self.synced >= self.flush_s:
            self.sync()

    def sync(self) -> None:
        """Copies the JSONL and TensorBoard files to the run's metrics folder."""
        if self.tensorboard is not None:
            self.tensorboard.flush()
        for path in sorted(self.local.rglob("*")):
            if path.is_file() and path.name != OWNER_FILE:
                storage.put_file(str(path), storage.join(self.metrics_url, str(path.relative_to(self.local))))
        self.synced = time.monotonic()

    def close(self) -> None:
        """At the end of the run: everything to the run folder, the sinks ended, the local copy removed."""
        try:
            self.sync()
            if self.wandb is not None:
                self.wandb.finish()
                # and wait for W&B's service to write everything out: its own atexit hook does that, but it
                # is "not reliable" (wandb.teardown's words) in processes like Ray's workers
                wandb_module().teardown()
        finally:
            self.discard()

    def discard(self) -> None:
        """The TensorBoard writer ended and the local copy removed; alone, after a failed attempt (a worker
        process outlives many attempts): the run folder keeps what was synced, and the attempt that resumes
        from the last checkpoint purges what came after it."""
        if self.tensorboard is not None:
            self.tensorboard.close()
        shutil.rmtree(self.local, ignore_errors=True)
        if self._held >= 0:
            os.close(self._held)
            self._held = -1


def purge_events(folder: str, last_step: int) -> None:
    """Rewrites every TensorBoard events file under `folder` (any storage) without the events of steps
    after `last_step`; a file left with no scalars is removed."""
    from tensorboard.backend.event_processing.event_file_loader import RawEventFileLoader
    from tensorboard.compat.proto.event_pb2 import Event
    from tensorboard.summary.writer.record_writer import RecordWriter

    for name in storage.list_names(folder):
        if not name.startswith("events.out.tfevents."):
            continue
        url = storage.join(folder, name)
        with tempfile.NamedTemporaryFile(suffix=name) as local:
            local.write(storage.read_bytes(url))
            local.flush()
            records = list(RawEventFileLoader(local.name).Load())
        kept = [record for record in records if Event.FromString(record).step <= last_step]
        if len(kept) == len(records):
            continue
        if not any(Event.FromString(record).HasField("summary") for record in kept):
            storage.remove(url)
            continue
        out = io.BytesIO()
        writer = RecordWriter(out)
        for record in kept:
            writer.write(record)
        storage.write_bytes(url, out.getvalue())


def wandb_module() -> Any:
    """The wandb package, or ConfigError saying how to install it (train.report_to asks for it)."""
    try:
        import wandb
    except ImportError:
        raise ConfigError(
            "train.report_to: 'wandb' needs the wandb package in every worker's environment: "
            "pip install 'kitdist[wandb]' (or pip install wandb), or leave wandb out of train.report_to",
            key="train.report_to",
        ) from None
    return wandb


def open_wandb(cfg: RunConfig, metrics_url: str) -> Any:
    """The run's W&B run (rank 0): project train.wandb_project, named after storage.run_name, its id kept
    in the metrics folder so that a resumed run continues it. W&B reads its key, mode (WANDB_MODE=offline)
    and folder (WANDB_DIR) from the worker's environment."""
    from kitdist.config import to_dict

    wandb = wandb_module()
    id_url = storage.join(metrics_url, WANDB_ID_FILE)
    if storage.exists(id_url):
        run_id = storage.read_text(id_url).strip()
    else:
        run_id = uuid.uuid4().hex[:12]
        storage.write_text(id_url, run_id)
    return wandb.init(
        project=cfg.train.wandb_project,
        name=cfg.storage.run_name,
        id=run_id,
        resume="allow",
        config=to_dict(cfg),
        allow_val_change=True,  # a run resumed with storage.on_existing=resume_with_changes
        settings=wandb.Settings(console="off"),  # the run's console is the driver's, not captured twice
    )
