"""Errors no retry can fix, and how one raised in a Ray Train worker ends the run at once; what a worker's
failure was, in a few words, and the one line the console shows when Ray Train restarts the workers.

Ray Train restarts the worker group after any worker error, up to `dist.max_failures` times. That is
right for a dead worker, a lost node or a storage hiccup, and wrong for a bad setting, a missing data set
or weights file, or weights of another shape: each restart fails the same way and prints its traceback.
So a worker turns those errors into `Unrecoverable` (one line, no traceback), and `StopOnUnrecoverable`,
a callback in Ray Train's controller, turns the controller's RETRY into the end of the run; the same
callback keeps their tracebacks off the console (Ray's log files keep them). The driver prints the line.

`RestartNotice`, a callback in the same controller, tells the driver when the workers are restarted: which
worker, what happened to it (killed, out of memory, node lost, or the error it raised), the checkpoint they
resume from (`kitdist.checkpoints.resume_from`, the rule the workers follow) and the attempt; the driver
prints it as one line (`kitdist.console`) and Ray's tracebacks go to the run's console log.

Ray Train 2.60 has no public hook for this: the callbacks use its DeveloperAPI callback interfaces
(`WorkerGroupCallback.after_worker_group_poll_status`, which sees each worker's error before the failure
policy decides, and `ControllerCallback.before_controller_execute_failure_decision`, where an exception
is a controller error, which the policy never retries), reached through `kitdist.raycompat`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
from collections.abc import Iterator
from typing import Any

from kitdist import raycompat, storage
from kitdist.checkpoints import checkpoint_in_run, resume_from
from kitdist.config import ConfigError
from kitdist.raycompat import ControllerCallback, FailureDecision, ReportCallback, WorkerGroupCallback

# Ends the error line of a run that failed this way, so that a caller reading its log (the coordinator)
# does not start it again either.
NO_RETRY_MARK = "not retried: no retry can fix it"


class Unrecoverable(Exception):
    """An error a retry cannot fix, raised in a worker; its message is the one line the user sees."""


UNRECOVERABLE_NAME = f"{Unrecoverable.__module__}.{Unrecoverable.__qualname__}:"
STATE_DICT_REFUSED = "Error(s) in loading state_dict"  # how torch's load_state_dict names a mismatch


def no_retry_errors() -> tuple[type[BaseException], ...]:
    """Bad settings, missing or unreadable data sets and weights, a saved state that does not fit
    (weights of another shape are a RuntimeError of torch's, told apart by `weights_mismatch`)."""
    from kitdist.data.stream_state import ResumeError
    from kitdist.shards.manifest import ManifestError

    return (ConfigError, ManifestError, FileNotFoundError, ResumeError)


@contextlib.contextmanager
def unrecoverable_as_one_line() -> Iterator[None]:
    """In a worker: re-raises the errors no retry can fix as Unrecoverable, their message only."""
    hide_from_console(_HideUnrecoverable())  # Ray Train logs the worker's traceback before raising it
    try:
        yield
    except no_retry_errors() as err:
        raise Unrecoverable(one_line(err)) from None
    except RuntimeError as err:
        mismatch = weights_mismatch(err)
        if not mismatch:
            raise
        raise Unrecoverable(mismatch) from None


def weights_mismatch(err: RuntimeError) -> str:
    """One line about the first parameter when `err` is torch refusing weights of another shape ("")."""
    text = str(err)
    if not text.startswith(STATE_DICT_REFUSED):
        return ""
    details = [line.strip() for line in text.splitlines()[1:] if line.strip()] or [text]
    first = next((line for line in details if line.startswith("size mismatch")), details[0])
    first = first if len(first) <= 200 else f"{first[:200]}..."
    return f"the weights do not fit the model (model.size and model.* must be the saved model's): {first}"


def one_line(err: BaseException) -> str:
    text = " ".join(str(err).split()) or type(err).__name__
    return f"{type(err).__name__}: {text}" if type(err).__module__ == "builtins" else text


def unrecoverable_in(error: BaseException | None) -> Unrecoverable | None:
    """The Unrecoverable inside what Ray Train raised (a controller or worker-group error), if any."""
    seen: set[int] = set()
    pending = [error]
    while pending:
        current = pending.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, Unrecoverable):
            return current
        pending.append(getattr(current, "controller_failure", None))
        pending.extend(getattr(current, "worker_failures", {}).values())
        pending.extend([current.__cause__, getattr(current, "_base_exc", None)])
    return None


class _HideUnrecoverable(logging.Filter):
    """Drops the records that carry an Unrecoverable's traceback (as exc_info, or as text)."""

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        return unrecoverable_in(error) is None and UNRECOVERABLE_NAME not in record.getMessage()


def hide_from_console(log_filter: logging.Filter) -> None:
    """Adds `log_filter` to the console handlers of Ray Train's logger in this process (its log files
    keep every record)."""
    for handler in logging.getLogger("ray.train").handlers:
        known = any(type(present) is type(log_filter) for present in handler.filters)
        if not isinstance(handler, raycompat.SessionFileHandler) and not known:
            handler.addFilter(log_filter)


class StopOnUnrecoverable(WorkerGroupCallback, ControllerCallback):
    """Ends the run, instead of restarting the worker group, when a worker raised Unrecoverable."""

    def __init__(self) -> None:
        self.error: Unrecoverable | None = None

    def after_controller_start(self, train_run_context: object) -> None:
        hide_from_console(_HideUnrecoverable())

    def after_worker_group_poll_status(self, worker_group_status: object) -> None:
        for error in worker_group_status.errors.values():  # type: ignore[attr-defined]
            self.error = self.error or unrecoverable_in(error)

    def before_controller_execute_failure_decision(self, failure_decision: FailureDecision) -> None:
        if self.error is not None and failure_decision == FailureDecision.RETRY:
            raise self.error


# --- a worker's failure in a few words, and the restart notice -----------------------------------------

# Starts the line RestartNotice prints in the controller; the driver's printer turns it into the console's
# line (kitdist.console.RunConsole) and never shows it as it is.
RESTART_MARK = "kitdist-restart: "
MEMORY_FIGURE = re.compile(r"(\d+(?:\.\d+)?\s*[KMGT]i?B\s*/\s*\d+(?:\.\d+)?\s*[KMGT]i?B)")
EXIT_CODE = re.compile(r"exit(?:ed|s)? with (?:an )?exit code (-?\d+)", re.IGNORECASE)


def what_happened(error: BaseException) -> str:
    """A worker's failure in a few words: killed, out of memory (with Ray's memory figure), its node lost,
    an exit code, a health check that hung, or the error it raised (one line)."""
    if isinstance(error, raycompat.WorkerHealthCheckTimeoutError):
        return "stopped answering (Ray's health check timed out)"
    death = raycompat.actor_death(error)
    if death is None:
        text = one_line(error)
        return f"failed: {text if len(text) <= 160 else text[:160] + '...'}"
    text = str(death)
    if "low on memory" in text or "OUT_OF_MEMORY" in text:
        figure = MEMORY_FIGURE.search(text)
        return "killed out of memory" + (f" (node memory {figure.group(1)})" if figure else "")
    if "node has died" in text or "node was terminated" in text or "NodeDiedError" in text:
        ip = re.search(r"\bip: (\S+)", text)
        return "lost with its node" + (f" {ip.group(1)}" if ip else "")
    code = EXIT_CODE.search(text)
    if code:
        return f"exited with code {code.group(1)}"
    # Ray does not learn how a process it did not stop ended: no exit message means a signal or a crash
    return "killed (its process ended without exiting: a signal such as SIGKILL, or a crash)"


def first_cause(errors: dict[int, BaseException]) -> tuple[int, BaseException] | None:
    """The (rank, error) that explains a worker group's failure: a worker that died, before the others'
    errors (which a dead peer causes: a collective's "Connection closed by peer"); else the lowest rank."""
    if not errors:
        return None
    dead = [rank for rank, error in sorted(errors.items()) if raycompat.actor_death(error) is not None]
    rank = dead[0] if dead else min(errors)
    return rank, errors[rank]


def training_failure(error: BaseException) -> str | None:
    """What ended a run Ray Train gave up on, in a few words (None when `error` is not Ray Train's)."""
    workers = getattr(error, "worker_failures", None)
    if workers:
        rank, cause = first_cause(workers)
        return f"worker {rank} {what_happened(cause)}"
    controller = getattr(error, "controller_failure", None)
    return None if controller is None else f"Ray Train's controller {what_happened(controller)}"


def restart_notice(line: str) -> dict[str, Any] | None:
    """The fields of a RESTART_MARK line (None for any other line)."""
    return json.loads(line[len(RESTART_MARK) :]) if line.startswith(RESTART_MARK) else None


class RestartNotice(WorkerGroupCallback, ControllerCallback, ReportCallback):
    """In Ray Train's controller: before the worker group is restarted, prints one RESTART_MARK line with
    the failed worker (rank, pid), what happened to it, the checkpoint the new group resumes from and the
    attempt out of `max_failures`."""

    def __init__(self, run: str, max_failures: int) -> None:
        self.run = run
        self.max_failures = max_failures
        self.attempt = 0
        self.processes: dict[int, tuple[int, str]] = {}
        self.errors: dict[int, BaseException] = {}
        self.registered: str | None = None

    def after_worker_group_start(self, worker_group: object) -> None:
        self.processes = raycompat.worker_processes(worker_group)

    def after_worker_group_poll_status(self, worker_group_status: object) -> None:
        self.errors = raycompat.poll_errors(worker_group_status) or self.errors

    def after_report(self, training_report: object, metrics: list) -> None:
        path = raycompat.reported_checkpoint_path(training_report)
        self.registered = checkpoint_in_run(self.run, path) if path else self.registered

    def before_controller_execute_failure_decision(self, failure_decision: FailureDecision) -> None:
        cause = first_cause(self.errors)
        if failure_decision != FailureDecision.RETRY or cause is None:
            return
        self.attempt += 1
        rank, error = cause
        resume = resume_from(self.run, self.registered)
        fields = {
            "rank": rank,
            "pid": self.processes.get(rank, (None, ""))[0],
            "what": what_happened(error),
            "resume": storage.name_of(resume) if resume else None,
            "attempt": self.attempt,
            "max": self.max_failures,
        }
        print(RESTART_MARK + json.dumps(fields), flush=True)
        self.errors = {}
