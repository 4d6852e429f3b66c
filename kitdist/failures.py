"""Errors no retry can fix, and how one raised in a Ray Train worker ends the run at once.

Ray Train restarts the worker group after any worker error, up to `dist.max_failures` times. That is
right for a dead worker, a lost node or a storage hiccup, and wrong for a bad setting, a missing data set
or weights file, or weights of another shape: each restart fails the same way and prints its traceback.
So a worker turns those errors into `Unrecoverable` (one line, no traceback), and `StopOnUnrecoverable`,
a callback in Ray Train's controller, turns the controller's RETRY into the end of the run; the same
callback keeps their tracebacks off the console (Ray's log files keep them). The driver prints the line.

Ray Train 2.60 has no public hook for this: the callback uses its DeveloperAPI callback interfaces
(`WorkerGroupCallback.after_worker_group_poll_status`, which sees each worker's error before the failure
policy decides, and `ControllerCallback.before_controller_execute_failure_decision`, where an exception
is a controller error, which the policy never retries).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

from ray.train.v2._internal.execution.callback import ControllerCallback, WorkerGroupCallback
from ray.train.v2._internal.execution.failure_handling import FailureDecision
from ray.train.v2._internal.logging.logging import SessionFileHandler

from kitdist.config import ConfigError

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
        if not isinstance(handler, SessionFileHandler) and not known:
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
