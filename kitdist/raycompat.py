"""Every use kitdist makes of Ray's private API, in one place, for the Ray series it was tested with.

Ray Train 2.60 offers no public hook to end a run on an error no retry can fix, to tell the user in one
line why a worker group restarts, to route the driver's printing of worker output, or to bound how long a
finished run waits for its placement-group watchdog: `kitdist.failures`, `kitdist.console` and
`kitdist.launch` use the DeveloperAPI callbacks of Train's controller, its worker-group types, Ray's
printer of worker output and the trainer's default callbacks, through the names below only. tests/test_raycompat.py fails, naming the
symbol, when the installed Ray lacks one of them or is not of the TESTED_WITH series.
"""

from __future__ import annotations

from typing import Any

import ray
from ray.exceptions import RayActorError
from ray.train.torch import TorchTrainer
from ray.train.v2._internal.callbacks.placement_group_callback import PlacementGroupCleanerCallback
from ray.train.v2._internal.exceptions import WorkerHealthCheckFailedError, WorkerHealthCheckTimeoutError
from ray.train.v2._internal.execution.callback import ControllerCallback, ReportCallback, WorkerGroupCallback
from ray.train.v2._internal.execution.failure_handling import FailureDecision
from ray.train.v2._internal.logging.logging import SessionFileHandler

TESTED_WITH = "2.60"  # the major.minor series this module's names were read from and tested with

# The printer of worker output on a driver (`ray._private.ray_logging`), the name under which Ray
# registers its own printer there, and the `pid` Ray's records give the raylet.
STDSTREAM_DISPATCHER = "ray._private.ray_logging.global_worker_stdstream_dispatcher"
RAY_PRINTER = "ray_print_logs"
RAYLET = "raylet"  # the `pid` of the raylet's error messages (a worker died, a node ran out of memory)

# The callback hooks kitdist's callbacks override: a renamed hook would never be called, silently.
HOOKS = {
    WorkerGroupCallback: ("after_worker_group_start", "after_worker_group_poll_status"),
    ControllerCallback: ("after_controller_start", "before_controller_execute_failure_decision"),
    ReportCallback: ("after_report",),
}

# How long a finished run's controller waits for Ray Train's PlacementGroupCleaner to stop. Ray's default
# (2 x its 1 s check + its 10 s State API timeout = 12 s) is spent in full on every run wherever the cleaner's
# State API query hangs (it looks the dashboard up through GCS with retries; seen on local clusters with
# and without a dashboard): 12 of the 16 s between a run's last checkpoint and its end (RESULTS, "The end of
# a run"). The cleaner only matters while the run lives (its controller dying with the driver still up);
# placement groups of a job whose driver ended go with the job.
CLEANER_STOP_TIMEOUT_S = 1.0

__all__ = [
    "ControllerCallback",
    "FailureDecision",
    "PlacementGroupCleanerCallback",
    "RayActorError",
    "ReportCallback",
    "SessionFileHandler",
    "TorchTrainer",
    "WorkerGroupCallback",
    "WorkerHealthCheckFailedError",
    "WorkerHealthCheckTimeoutError",
]


def ray_series() -> str:
    return ".".join(ray.__version__.split(".")[:2])


def stdstream_dispatcher() -> Any:
    """Ray's dispatcher of worker output on this driver (`handlers`, `add_handler`, `remove_handler`)."""
    from ray._private.ray_logging import global_worker_stdstream_dispatcher

    return global_worker_stdstream_dispatcher


def route_raylet_messages(printer: Any) -> None:
    """Sends the raylet's error messages (a worker died, a node ran out of memory) to `printer` too: the
    driver prints them through `ray._private.worker.print_to_stdstream` directly, not through the
    dispatcher (`listen_error_messages`). Ray's own printer of worker output holds the original function
    and is not affected."""
    from ray._private import worker

    original = worker.print_to_stdstream
    if getattr(original, "kitdist", False):
        return

    def routed(data: dict[str, Any], ignore_prefix: bool) -> None:
        if data.get("pid") == RAYLET:
            printer(data)
        else:
            original(data, ignore_prefix=ignore_prefix)

    routed.kitdist = True
    worker.print_to_stdstream = routed


def worker_processes(worker_group: Any) -> dict[int, tuple[int, str]]:
    """{world rank: (pid, node IP)} of a started worker group (`WorkerGroup.get_workers()`)."""
    return {
        worker.distributed_context.world_rank: (worker.metadata.pid, worker.metadata.node_ip)
        for worker in worker_group.get_workers()
    }


def poll_errors(worker_group_status: Any) -> dict[int, BaseException]:
    """{world rank: error} of a worker-group poll (`WorkerGroupPollStatus.errors`)."""
    return dict(worker_group_status.errors)


def actor_death(error: BaseException) -> RayActorError | None:
    """The actor death behind a worker's error, when the worker died rather than raised."""
    if isinstance(error, WorkerHealthCheckFailedError):
        error = error.health_check_failure
    return error if isinstance(error, RayActorError) else None


def reported_checkpoint_path(training_report: Any) -> str | None:
    """The path of the checkpoint in a report the controller registered (`_TrainingReport.checkpoint`)."""
    checkpoint = training_report.checkpoint
    return None if checkpoint is None else checkpoint.path


class PromptTorchTrainer(TorchTrainer):
    """Ray Train's TorchTrainer whose placement-group watchdog is told to stop within
    CLEANER_STOP_TIMEOUT_S at the end of a run (it still watches the controller while the run lives)."""

    def _create_default_callbacks(self) -> list[Any]:
        return [
            PlacementGroupCleanerCallback(stop_timeout=CLEANER_STOP_TIMEOUT_S)
            if isinstance(callback, PlacementGroupCleanerCallback)
            else callback
            for callback in super()._create_default_callbacks()
        ]
