"""kitdist's uses of Ray's private API (kitdist/raycompat.py) against the installed Ray: each test fails
naming the symbol that moved, so that a Ray upgrade breaks here, loudly, and not as a restart that
silently says nothing or a console that floods again."""

from __future__ import annotations

import dataclasses
import inspect

import ray
from ray.train.v2._internal.execution.worker_group import Worker, WorkerGroup, WorkerGroupPollStatus
from ray.train.v2._internal.execution.worker_group.worker import ActorMetadata
from ray.train.v2.api.exceptions import ControllerError, WorkerGroupError

from kitdist import raycompat
from kitdist.failures import RestartNotice, StopOnUnrecoverable


def test_installed_ray_is_the_series_kitdist_was_tested_with():
    assert raycompat.ray_series() == raycompat.TESTED_WITH, (
        f"Ray {ray.__version__} is installed; kitdist/raycompat.py was written for and tested with Ray "
        f"{raycompat.TESTED_WITH}.x: check every name in it against this Ray, then move TESTED_WITH"
    )


def test_the_callback_hooks_kitdist_overrides_still_exist():
    for base, hooks in raycompat.HOOKS.items():
        for hook in hooks:
            assert callable(getattr(base, hook, None)), f"{base.__name__}.{hook} is gone from this Ray"
    overridden = {hook for hooks in raycompat.HOOKS.values() for hook in hooks}
    ours = {
        name for cls in (RestartNotice, StopOnUnrecoverable) for name in vars(cls) if not name.startswith("_")
    }
    assert ours <= overridden, f"hooks not listed in raycompat.HOOKS: {ours - overridden}"


def test_the_worker_group_types_have_the_fields_kitdist_reads():
    fields = {field.name for field in dataclasses.fields(ActorMetadata)}
    assert {"pid", "node_ip"} <= fields, f"ActorMetadata fields: {fields}"
    fields = {field.name for field in dataclasses.fields(Worker)}
    assert {"metadata", "distributed_context"} <= fields, f"Worker fields: {fields}"
    assert callable(getattr(WorkerGroup, "get_workers", None)), "WorkerGroup.get_workers"
    assert isinstance(getattr(WorkerGroupPollStatus, "errors", None), property), (
        "WorkerGroupPollStatus.errors"
    )
    assert "failure" in inspect.signature(raycompat.WorkerHealthCheckFailedError).parameters
    error = raycompat.WorkerHealthCheckFailedError("health check failed", ValueError("x"))
    assert isinstance(error.health_check_failure, ValueError), (
        "WorkerHealthCheckFailedError.health_check_failure"
    )
    assert hasattr(raycompat.FailureDecision, "RETRY"), "FailureDecision.RETRY"
    assert "worker_failures" in inspect.signature(WorkerGroupError).parameters, (
        "WorkerGroupError.worker_failures"
    )
    assert "controller_failure" in inspect.signature(ControllerError).parameters, "ControllerError"


def test_rays_printer_of_worker_output_is_where_the_console_hooks_it():
    dispatcher = raycompat.stdstream_dispatcher()
    for name in ("handlers", "add_handler", "remove_handler"):
        assert hasattr(dispatcher, name), f"{raycompat.STDSTREAM_DISPATCHER}.{name}"
    from ray._private import ray_logging, worker

    assert raycompat.RAY_PRINTER in inspect.getsource(worker), (
        f"Ray's printer is no longer {raycompat.RAY_PRINTER!r}"
    )
    assert ray_logging.global_worker_stdstream_dispatcher is dispatcher


def test_the_raylets_messages_reach_the_driver_where_the_console_routes_them():
    from ray._private import worker

    source = inspect.getsource(worker.listen_error_messages)
    assert "print_to_stdstream(" in source and '"pid": "raylet"' in source, (
        "ray._private.worker.listen_error_messages no longer prints the raylet's messages through "
        "print_to_stdstream with pid 'raylet' (kitdist.raycompat.route_raylet_messages)"
    )


def test_the_prompt_trainer_changes_only_the_placement_group_cleaners_stop_timeout():
    from ray.train import ScalingConfig

    from kitdist.raycompat import CLEANER_STOP_TIMEOUT_S, PlacementGroupCleanerCallback, PromptTorchTrainer

    def build(trainer_cls):
        trainer = trainer_cls(lambda: None, scaling_config=ScalingConfig(num_workers=1))
        return trainer._create_default_callbacks()

    ours, rays = build(PromptTorchTrainer), build(raycompat.TorchTrainer)
    assert [type(callback) for callback in ours] == [type(callback) for callback in rays]
    cleaners = [callback for callback in ours if isinstance(callback, PlacementGroupCleanerCallback)]
    assert len(cleaners) == 1, "Ray Train no longer adds a PlacementGroupCleanerCallback by default"
    (ray_cleaner,) = [callback for callback in rays if isinstance(callback, PlacementGroupCleanerCallback)]
    assert cleaners[0]._stop_timeout == CLEANER_STOP_TIMEOUT_S < ray_cleaner._stop_timeout
    assert cleaners[0]._check_interval_s == ray_cleaner._check_interval_s
