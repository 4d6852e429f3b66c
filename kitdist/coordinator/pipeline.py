"""The coordinator's loop: pre-train, fan out the fine-tunes, evaluate each, write the results table.

Each pass looks at every stage and moves it on: a pending stage whose inputs are ready is submitted as a
Ray job; a running one is watched; a failed job is resubmitted (the training entry points resume from
their run's latest checkpoint) after a backoff, until `max_attempts` failures fail the stage and the
stages depending on it are skipped; the others go on. The state is saved after every change, and an
attempt is recorded *before* its submit call under a fixed submission id, so a coordinator killed between
the two re-attaches to the job instead of starting a second one.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable

from kitdist import storage
from kitdist.checkpoints import TRAIN_STATE, WEIGHTS, latest_checkpoint, weights_file
from kitdist.coordinator.cluster import ClusterError, LocalCluster, reachable
from kitdist.coordinator.jobs import JobClient, JobSpec, JobView, job_env
from kitdist.coordinator.plan import PRETRAIN, Plan
from kitdist.coordinator.report import write_results
from kitdist.coordinator.state import (
    ACTIVE,
    TERMINAL,
    Attempt,
    Stage,
    State,
    StateError,
    StateStore,
    live_owner,
    new_state,
    this_owner,
)

RESUMES = {
    "pretrain": " (resumes from its latest checkpoint)",
    "finetune": " (resumes from its latest checkpoint)",
}
CLUSTER_PATIENCE_S = 600.0  # how long the job API may keep failing before the coordinator gives up
RESULT_KEYS = ("psnr_rgb", "ssim_rgb", "psnr_y", "ssim_y", "convention", "params", "macs")


class Coordinator:
    """Drives one pipeline's state to the end (or until cancelled)."""

    def __init__(self, plan: Plan, say: Callable[[str], None] = print) -> None:
        self.plan = plan
        self.spec = plan.spec
        self.store = StateStore(plan.spec.state)
        self.say = say
        self.jobs: JobClient | None = None
        self.local: LocalCluster | None = None
        self._trouble_since = 0.0

    # --- the loop ------------------------------------------------------------------------------------

    def run(self, continue_cancelled: bool = False) -> State:
        state = self._load_or_create(continue_cancelled)
        if state.status != "running":
            self.say(f"pipeline {state.pipeline} has already {state.status}; nothing to do")
            return state
        self.jobs = self._connect(state)
        while not self._all_terminal(state):
            if self.store.cancel_requested():
                cancel_jobs(state, self.store, self.jobs, self.say)
                break
            self._advance_all(state)
            state.owner = this_owner()
            self.store.save(state)
            if not self._all_terminal(state):
                time.sleep(self.spec.poll_s)
        return self._finish(state)

    def _advance_all(self, state: State) -> None:
        """One pass over the stages; cluster hiccups (an agent not up yet, a dashboard restart) are
        retried on the next pass, until they have lasted CLUSTER_PATIENCE_S."""
        try:
            for stage in list(state.stages.values()):
                self._advance(state, stage)
            self._trouble_since = 0.0
        except ClusterError as err:
            self._trouble_since = self._trouble_since or time.monotonic()
            if time.monotonic() - self._trouble_since > CLUSTER_PATIENCE_S:
                raise
            self.say(f"cluster trouble, retrying: {err}")

    def _load_or_create(self, continue_cancelled: bool) -> State:
        state = self.store.load()
        if state is None:
            state = new_state(self.spec.name, self.plan.stage_kinds())
            self.say(f"new pipeline {self.spec.name}: state at {self.store.url}")
        elif state.pipeline != self.spec.name:
            raise StateError(f"{self.store.url} holds pipeline {state.pipeline!r}, not {self.spec.name!r}")
        other = live_owner(state, stale_after_s=3 * self.spec.poll_s + 60)
        if other:
            raise StateError(f"{self.store.url}: another coordinator ({other}) is running this pipeline")
        for name, kind in self.plan.stage_kinds().items():  # stages added to the pipeline since
            state.stages.setdefault(name, Stage(name=name, kind=kind))  # type: ignore[arg-type]
        if state.status == "cancelled" and continue_cancelled:
            self._uncancel(state)
        state.owner = this_owner()
        self.store.save(state)
        return state

    def _uncancel(self, state: State) -> None:
        self.store.clear_cancel()
        state.status = "running"
        for stage in state.stages.values():
            if stage.status == "cancelled":
                stage.status = "pending"
        self.say("continuing the cancelled pipeline (runs resume from their checkpoints)")

    def _connect(self, state: State) -> JobClient:
        """The cluster at RAY_ADDRESS; else the local one this pipeline started (if it still runs); else
        a new local one, recorded in the state so that a re-run coordinator finds it."""
        address = os.environ.get("RAY_ADDRESS", "")
        recorded = state.cluster
        if not address and recorded.get("local") and reachable(recorded["address"]):
            address = recorded["address"]
            self.local = LocalCluster(recorded["address"], recorded["pid"], recorded["temp_dir"])
        elif not address:
            num_cpus = self.spec.local_cluster_cpus or os.cpu_count() or 1
            self.say(f"starting a local Ray cluster ({num_cpus} CPUs) ...")
            self.local = LocalCluster.start(num_cpus=num_cpus)
            address = self.local.address
            state.cluster = {
                "address": address,
                "local": True,
                "pid": self.local.pid,
                "temp_dir": self.local.temp_dir,
            }
        if not state.cluster or state.cluster.get("address") != address:
            state.cluster = {"address": address, "local": False}
        self.store.save(state)
        self.say(f"Ray cluster: {address} (jobs show in `ray job list --address {address}`)")
        return JobClient(address, job_env(self.spec.forward_env))

    def _finish(self, state: State) -> State:
        if state.status == "running":
            failed = any(stage.status != "succeeded" for stage in state.stages.values())
            state.status = "failed" if failed else "succeeded"
        state.results = write_results(state, self.plan, self.store.folder)
        state.owner = {}
        self.store.save(state)
        self.say(f"pipeline {state.pipeline} {state.status}; results: {state.results.get('markdown', '-')}")
        if self.local is not None:
            self.say("stopping the local Ray cluster")
            self.local.stop()
        return state

    @staticmethod
    def _all_terminal(state: State) -> bool:
        return state.status != "running" or all(s.status in TERMINAL for s in state.stages.values())

    # --- one stage -----------------------------------------------------------------------------------

    def _advance(self, state: State, stage: Stage) -> None:
        if stage.status in TERMINAL:
            return
        if stage.status in ACTIVE:
            self._watch(state, stage)
            return
        ready, weights, blocked = self._inputs(state, stage)
        if blocked:
            self._set(state, stage, "skipped", error=blocked)
        elif ready and time.time() >= stage.next_try_at and self._has_room(state):
            self._submit(state, stage, weights)

    def _inputs(self, state: State, stage: Stage) -> tuple[bool, str, str]:
        """(ready, the weights it starts from or evaluates, why it can never run)."""
        if stage.kind == "pretrain":
            return True, "", ""
        if stage.kind == "finetune" and self.plan.pretrain is None:
            return True, self.spec.pretrain.weights, ""
        name = stage.name.split("/", 1)[1]
        if stage.kind == "finetune":
            upstream = state.stages[PRETRAIN]
        else:
            upstream = state.stages[f"finetune/{self.plan.evaluations[name].task.stage}"]
        if upstream.status == "succeeded":
            return True, upstream.weights, ""
        if upstream.status in TERMINAL:
            return False, "", f"{upstream.name} {upstream.status}"
        return False, "", ""

    def _has_room(self, state: State) -> bool:
        limit = self.spec.max_concurrent_jobs
        return not limit or sum(s.status in ACTIVE for s in state.stages.values()) < limit

    def job_for(self, stage: Stage, weights: str) -> JobSpec:
        if stage.kind == "pretrain":
            assert self.plan.pretrain is not None
            return self.plan.pretrain.job()
        task = stage.name.split("/", 1)[1]
        if stage.kind == "finetune":
            return self.plan.finetunes[task].job(init_weights=weights)
        return self.plan.evaluations[task].job(weights)

    def _submit(self, state: State, stage: Stage, weights: str) -> None:
        number = len(stage.attempts) + 1
        job_id = f"kd-{state.pipeline}-{state.nonce}-{stage.name.replace('/', '-')}-{number}"
        stage.attempts.append(Attempt(job_id=job_id, submitted=time.time(), weights=weights))
        stage.status = "submitting"
        self.store.save(state)  # before the submit: a re-run finds the id and re-attaches
        self._send(state, stage)

    def _send(self, state: State, stage: Stage) -> None:
        attempt = stage.current
        assert attempt is not None and self.jobs is not None
        job = self.job_for(stage, attempt.weights)
        metadata = {"kitdist_pipeline": state.pipeline, "kitdist_stage": stage.name}
        self.jobs.submit(attempt.job_id, job, metadata)
        attempt.status = "PENDING"
        self._set(state, stage, "running")
        self.say(
            f"{stage.name}: job {attempt.job_id} submitted (attempt {len(stage.attempts)}): {job.command}"
        )

    def _watch(self, state: State, stage: Stage) -> None:
        attempt = stage.current
        assert attempt is not None and self.jobs is not None
        if attempt.status == "SUBMITTING":
            self._send(state, stage)
            return
        view = self.jobs.view(attempt.job_id)
        if (view.status, view.started, view.ended) != (attempt.status, attempt.started, attempt.ended):
            attempt.status, attempt.started, attempt.ended = view.status, view.started, view.ended
            attempt.message = view.message[-500:]
            self.store.save(state)
        if view.status == "SUCCEEDED":
            self._collect(state, stage)
        elif view.status == "LOST":
            self.say(f"{stage.name}: job {attempt.job_id} is gone from the cluster; resubmitting")
            self._set(state, stage, "pending")
        elif view.terminal:
            self._failed(state, stage, view)

    def _failed(self, state: State, stage: Stage, view: JobView) -> None:
        assert self.jobs is not None and stage.current is not None
        tail = self.jobs.log_tail(stage.current.job_id)
        first_line = (view.message.splitlines() or [""])[0]
        reason = f"job {stage.current.job_id} {view.status}: {first_line}".strip()
        fatal = no_retry_error(tail)
        if fatal:
            self.say(f"{stage.name}: {fatal}; not resubmitted")
            self._set(state, stage, "failed", error=f"{reason}\n{fatal}"[-3000:])
            return
        if stage.failures >= self.spec.max_attempts:
            self.say(f"{stage.name}: failed {stage.failures} times; giving up. Last log lines:\n{tail}")
            self._set(state, stage, "failed", error=f"{reason}\n{tail}"[-3000:])
            return
        wait = self.spec.backoff_s * 2 ** (stage.failures - 1)
        self.say(f"{stage.name}: {reason}; resubmitting in {wait:.0f} s{RESUMES.get(stage.kind, '')}")
        stage.next_try_at = time.time() + wait
        self._set(state, stage, "pending", error=reason)

    def _collect(self, state: State, stage: Stage) -> None:
        """What a finished job left: a checkpoint (training) or results.json (evaluation)."""
        try:
            if stage.kind == "evaluate":
                stage.results = read_results(self.plan.evaluations[stage.name.split("/", 1)[1]].out)
            else:
                plan = self.plan.pretrain if stage.kind == "pretrain" else self.plan.finetunes[stage.name[9:]]
                assert plan is not None
                stage.run = plan.run_url
                stage.checkpoint = finished_checkpoint(plan.run_url)
                stage.weights = weights_file(stage.checkpoint)
        except (OSError, ValueError, KeyError) as err:
            self._failed(state, stage, JobView("FAILED", f"finished, but its output is unusable: {err}"))
            return
        self._set(state, stage, "succeeded", error="")
        self.say(f"{stage.name}: succeeded ({stage.weights or stage.results.get('psnr_rgb')})")

    def _set(self, state: State, stage: Stage, status: str, error: str | None = None) -> None:
        stage.status = status  # type: ignore[assignment]
        if error is not None:
            stage.error = error
        self.store.save(state)


def cancel_jobs(state: State, store: StateStore, jobs: JobClient | None, say: Callable[[str], None]) -> None:
    """Stops every active job of the pipeline and marks its unfinished stages cancelled."""
    for stage in state.stages.values():
        if stage.status in ACTIVE and stage.current is not None and jobs is not None:
            stopped = jobs.stop(stage.current.job_id)
            say(f"{stage.name}: job {stage.current.job_id} {'stopped' if stopped else 'was not running'}")
        if stage.status not in TERMINAL:
            stage.status = "cancelled"
    state.status = "cancelled"
    store.save(state)


def no_retry_error(log_tail: str) -> str:
    """The error line of a job that ended with an error no retry can fix (kitdist.failures), or ""."""
    from kitdist.failures import NO_RETRY_MARK

    lines = [line for line in log_tail.splitlines() if line.startswith("error:") and NO_RETRY_MARK in line]
    return lines[-1] if lines else ""


def finished_checkpoint(run_url: str) -> str:
    """The newest complete checkpoint a finished training job left in its run folder."""
    folder = latest_checkpoint(run_url)
    if folder is None:
        raise FileNotFoundError(
            f"{run_url}: no complete checkpoint (step-* with {WEIGHTS}, {TRAIN_STATE} and every rank's RNG file)"
        )
    return folder


def read_results(out: str) -> dict:
    url = storage.join(out, "results.json")
    results = json.loads(storage.read_text(url))
    missing = [key for key in RESULT_KEYS if key not in results]
    if missing:
        raise KeyError(f"{url} lacks {', '.join(missing)}")
    return results
