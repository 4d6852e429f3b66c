"""The pipeline's state: one JSON document on the run's storage, rewritten whole and atomically after every
change, so that a coordinator killed at any moment leaves a document a new one can continue from.

    <state>/state.json     stages, their jobs (attempts), checkpoints, results, the cluster, the owner
    <state>/cancel         present when `cancel` asked the pipeline to stop
    <state>/results.md, results.json, eval/<task>/results.json

Secrets never enter it: job environments (S3 credentials) are passed to Ray, not recorded here.
"""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Literal

from kitdist import storage

STATE_FILE = "state.json"
CANCEL_FILE = "cancel"
VERSION = 1

StageStatus = Literal["pending", "submitting", "running", "succeeded", "failed", "skipped", "cancelled"]
ACTIVE = ("submitting", "running")
TERMINAL = ("succeeded", "failed", "skipped", "cancelled")


@dataclass
class Attempt:
    """One submission of a stage's job to Ray."""

    job_id: str
    status: str = "SUBMITTING"  # Ray's JobStatus name, or SUBMITTING (recorded before the submit call), LOST
    submitted: float = 0.0
    started: float = 0.0  # as Ray reports it (seconds since the epoch)
    ended: float = 0.0
    message: str = ""
    weights: str = ""  # what the job starts from (fine-tune) or evaluates; "" for pre-training

    @property
    def counts_as_failure(self) -> bool:
        return self.status in ("FAILED", "STOPPED")

    @property
    def wall_s(self) -> float:
        return max(self.ended - self.started, 0.0) if self.started and self.ended else 0.0


@dataclass
class Stage:
    """One job-running step of the pipeline: pretrain, finetune/<task> or evaluate/<task>."""

    name: str
    kind: Literal["pretrain", "finetune", "evaluate"]
    status: StageStatus = "pending"
    attempts: list[Attempt] = field(default_factory=list)
    run: str = ""  # the training run's folder (checkpoints, metrics)
    checkpoint: str = ""  # the newest complete checkpoint folder
    weights: str = ""  # its weights.safetensors
    results: dict[str, Any] = field(default_factory=dict)  # evaluate: the evaluator's results.json
    error: str = ""
    next_try_at: float = 0.0

    @property
    def failures(self) -> int:
        return sum(attempt.counts_as_failure for attempt in self.attempts)

    @property
    def current(self) -> Attempt | None:
        return self.attempts[-1] if self.attempts else None

    @property
    def wall_s(self) -> float:
        return sum(attempt.wall_s for attempt in self.attempts)


@dataclass
class State:
    """The whole document."""

    pipeline: str
    nonce: str  # distinguishes this pipeline run's Ray submission ids from an earlier run's
    stages: dict[str, Stage]
    status: Literal["running", "succeeded", "failed", "cancelled"] = "running"
    cluster: dict[str, Any] = field(default_factory=dict)  # address, and pid/temp_dir of a local one
    owner: dict[str, Any] = field(default_factory=dict)  # host, pid, heartbeat of the coordinator
    results: dict[str, str] = field(default_factory=dict)  # URLs of the results table
    created: float = field(default_factory=time.time)
    updated: float = 0.0
    version: int = VERSION

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=1, sort_keys=False)

    @classmethod
    def from_json(cls, text: str, source: str) -> State:
        try:
            tree = json.loads(text)
            stages = {
                name: Stage(**{**body, "attempts": [Attempt(**a) for a in body["attempts"]]})
                for name, body in tree.pop("stages").items()
            }
            return cls(**tree, stages=stages)
        except (ValueError, TypeError, KeyError) as err:
            raise StateError(f"{source}: not a kitdist pipeline state ({err})") from err


class StateError(RuntimeError):
    """A state document that cannot be read, or that belongs to another pipeline."""


def new_state(pipeline: str, stage_kinds: dict[str, str]) -> State:
    stages = {name: Stage(name=name, kind=kind) for name, kind in stage_kinds.items()}  # type: ignore[arg-type]
    return State(pipeline=pipeline, nonce=uuid.uuid4().hex[:6], stages=stages)


class StateStore:
    """Reads and writes the state document (and the cancel marker) in one storage folder."""

    def __init__(self, folder: str) -> None:
        self.folder = folder.removesuffix("/" + STATE_FILE).removesuffix(STATE_FILE) or folder
        self.url = storage.join(self.folder, STATE_FILE)

    def load(self) -> State | None:
        if not storage.exists(self.url):
            return None
        return State.from_json(storage.read_text(self.url), self.url)

    def save(self, state: State) -> None:
        state.updated = time.time()
        storage.write_text(self.url, state.to_json())

    def cancel_requested(self) -> bool:
        return storage.exists(storage.join(self.folder, CANCEL_FILE))

    def request_cancel(self) -> None:
        storage.write_text(storage.join(self.folder, CANCEL_FILE), f"cancel requested at {time.time():.0f}\n")

    def clear_cancel(self) -> None:
        storage.remove(storage.join(self.folder, CANCEL_FILE))


def this_owner() -> dict[str, Any]:
    return {"host": socket.gethostname(), "pid": os.getpid(), "heartbeat": time.time()}


def live_owner(state: State, stale_after_s: float) -> str:
    """Describes another coordinator that still drives this state ("" when none does).

    On this host the owner's pid tells; elsewhere a heartbeat older than `stale_after_s` means it died."""
    owner = state.owner
    if not owner or (owner.get("host") == socket.gethostname() and owner.get("pid") == os.getpid()):
        return ""
    if owner.get("host") == socket.gethostname():
        try:
            os.kill(int(owner["pid"]), 0)
        except (ProcessLookupError, PermissionError):
            return ""
        return f"pid {owner['pid']} on this host"
    age = time.time() - float(owner.get("heartbeat", 0))
    return f"pid {owner['pid']} on {owner['host']} ({age:.0f} s ago)" if age < stale_after_s else ""
