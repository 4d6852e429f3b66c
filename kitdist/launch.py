"""Ray Train glue: checks a run before any worker starts, connects to (or starts) a Ray cluster, and
runs the per-worker loop under a `TorchTrainer`, one worker per GPU (or per CPU slot).

Checkpoints go through Ray Train (`ray.train.report` with a Checkpoint; `RunConfig.storage_path` /
`storage_filesystem` point at the run's storage, local or s3://), which keeps the newest
`train.keep_checkpoints` and restarts failed workers (`dist.max_failures`); restarted workers, and the same
command run again with the same run name, resume from the newest complete checkpoint in the run folder
(kitdist.checkpoints.resume_from). A restart is one line on the console, Ray's tracebacks go to the run's
console log (kitdist.console); errors no retry can fix end the run at once instead (kitdist.failures).
Workers get no credentials from here: they read them from their own environment (kitdist.credentials).
The loop reaches Ray only through `kitdist.train.session.RaySession`.
"""

from __future__ import annotations

import dataclasses
import os
import time
import traceback
from typing import Any

from kitdist import rerun, storage
from kitdist.checkpoints import run_url
from kitdist.config import ConfigError, RunConfig, from_dict, to_dict
from kitdist.console import RunConsole, filter_worker_output, quiet_ray_init, quiet_worker
from kitdist.credentials import passed_on_env
from kitdist.distributed.env import worker_env_vars
from kitdist.preflight import check_launchable, check_report, describe_batches
from kitdist.summary import print_summary
from kitdist.train import stop
from kitdist.train.session import FAULT_ENV

LOCAL_START_ATTEMPTS = 3  # a port Ray chose free can be taken by another process before it binds it
# What Ray raises (a plain Exception) when its raylet has not registered within 30 s: a busy machine, tried again
NODE_START_TIMEOUT = "timed out during startup"


def _train_fn(config: dict[str, Any]) -> None:
    from kitdist.failures import unrecoverable_as_one_line
    from kitdist.train.loop import train_worker
    from kitdist.train.session import RaySession

    quiet_worker()
    use_assigned_cpus()
    cfg = from_dict(RunConfig, config)
    with unrecoverable_as_one_line():  # ends the run at once instead of max_failures restarts
        train_worker(cfg, RaySession(run_url(cfg)))


# A local cluster lives for one run: no idle workers started ahead (ours need their own runtime
# environment, so prestarted ones only take CPU while the run starts), and no pre-emption watcher (this
# machine is never drained; a SIGTERM to the command is how a local run is stopped).
LOCAL_CLUSTER_ENV = {
    "RAY_enable_worker_prestart": "0",
    "RAY_prestart_worker_first_driver": "0",
    "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",
}


def use_assigned_cpus() -> int:
    """In a Ray worker: torch threads = the CPUs Ray reserved for it (Ray's own OMP_NUM_THREADS is set too
    late for torch, which may be imported first); returns the thread count."""
    import ray
    import torch

    cpus = max(1, int(ray.get_runtime_context().get_assigned_resources().get("CPU", 1)))
    torch.set_num_threads(cpus)
    return cpus


def with_worker_cpus(cfg: RunConfig, cpus: float | list[float], workers: int = 0) -> RunConfig:
    """dist.cpus_per_worker=0 resolved: the most CPUs per worker such that `workers` (default: all of
    the run's) fit on nodes with `cpus` each (one number: one node), at least 1."""
    if cfg.dist.cpus_per_worker:
        return cfg
    nodes = [int(n) for n in (cpus if isinstance(cpus, list) else [cpus])]
    wanted = workers or cfg.dist.num_workers
    fits = [
        share for share in range(1, max(nodes, default=1) + 1) if sum(n // share for n in nodes) >= wanted
    ]
    share = max(fits, default=1)
    return dataclasses.replace(cfg, dist=dataclasses.replace(cfg.dist, cpus_per_worker=share))


def node_cpus() -> list[float]:
    """The CPUs of each live node of the connected Ray cluster (GPU runs: of the nodes with GPUs)."""
    import ray

    nodes = [node["Resources"] for node in ray.nodes() if node.get("Alive")]
    with_gpus = [node for node in nodes if node.get("GPU", 0) > 0]
    return [node.get("CPU", 0.0) for node in with_gpus or nodes]


def ray_storage(url: str) -> tuple[str, Any]:
    """`RunConfig.storage_path` and `storage_filesystem` for a storage root (local folder or any fsspec
    URL; remote ones go through kitdist.storage, so S3 settings come from the environment)."""
    if storage.is_local(url):
        return storage.absolute(url), None
    filesystem, path = storage.arrow_filesystem(url)
    return path, filesystem


def with_absolute_paths(cfg: RunConfig) -> RunConfig:
    """Local relative paths made absolute: Ray workers run in another working directory."""
    absolute = storage.absolute
    data = dataclasses.replace(
        cfg.data, train_shards=absolute(cfg.data.train_shards), val_shards=absolute(cfg.data.val_shards)
    )
    train = dataclasses.replace(cfg.train, init_weights=absolute(cfg.train.init_weights))
    store = dataclasses.replace(cfg.storage, root=absolute(cfg.storage.root))
    return dataclasses.replace(cfg, data=data, train=train, storage=store)


def connect_ray(cfg: RunConfig) -> RunConfig:
    """Joins the cluster at dist.ray_address / RAY_ADDRESS, else starts a local one on this machine;
    then checks the cluster can hold the workers (Ray would otherwise wait for them forever). Returns the
    config with dist.cpus_per_worker resolved against the cluster."""
    import ray

    address = cfg.dist.ray_address or os.environ.get("RAY_ADDRESS", "")
    if not ray.is_initialized():
        if address:
            ray.init(address=address, log_to_driver=True)
        else:
            _start_local_ray(max(os.cpu_count() or 1, cfg.dist.num_workers * cfg.dist.cpus_per_worker))
    filter_worker_output()
    resources = ray.cluster_resources()
    cfg = with_worker_cpus(cfg, node_cpus())
    _check_resources(cfg, resources)
    return cfg


def _start_local_ray(num_cpus: int) -> None:
    """A new cluster of our own ("local": never whichever one this machine happens to run). Its processes
    are this one's children and inherit its environment, S3 credentials included; a start that fails
    (a port taken between Ray choosing and binding it, a raylet slower than Ray waits for) is tried
    again, on fresh ports."""
    import ray

    for name, value in LOCAL_CLUSTER_ENV.items():
        os.environ.setdefault(name, value)  # read by the raylet and Train controller we start
    for attempt in range(LOCAL_START_ATTEMPTS):
        try:
            ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, **quiet_ray_init())
            return
        except Exception as err:
            retried = isinstance(
                err, (ValueError, RuntimeError, ConnectionError)
            ) or NODE_START_TIMEOUT in str(err)
            ray.shutdown()
            if not retried or attempt == LOCAL_START_ATTEMPTS - 1:
                raise


def _check_resources(cfg: RunConfig, resources: dict[str, float]) -> None:
    dist = cfg.dist
    if dist.use_gpu and resources.get("GPU", 0) < dist.num_workers:
        raise ConfigError(
            f"dist.num_workers: {dist.num_workers} GPU workers requested, the Ray cluster has "
            f"{resources.get('GPU', 0):g} GPUs"
        )
    if resources.get("CPU", 0) < dist.num_workers * dist.cpus_per_worker:
        raise ConfigError(
            f"dist.num_workers: {dist.num_workers} workers x dist.cpus_per_worker={dist.cpus_per_worker} CPUs"
            f" requested, the Ray cluster has {resources.get('CPU', 0):g} CPUs"
        )


def launch(
    cfg: RunConfig, fine_tune: bool = False, stop_on_sigterm: bool = False, console: RunConsole | None = None
) -> Any:
    """Checks, connects and runs training to the end; returns Ray Train's Result.

    stop_on_sigterm: a SIGTERM to this process makes the workers checkpoint after their current step
    and stop (the command line's behaviour; see kitdist.train.stop). console: the command's, which the
    caller closes (default: one of the run's own, closed at the end)."""
    import ray.train

    from kitdist.failures import RestartNotice, StopOnUnrecoverable
    from kitdist.raycompat import PromptTorchTrainer

    own_console, console = console is None, console or RunConsole(cfg)
    cfg = with_absolute_paths(cfg)
    rerun.proceed(
        cfg, check_launchable(cfg, fine_tune=fine_tune), announce=lambda text: print(text, flush=True)
    )
    print(describe_batches(cfg), flush=True)  # the batches each phase trains on, or the key that cannot run
    cfg = connect_ray(cfg)
    print(
        f"{cfg.dist.num_workers} workers x {cfg.dist.cpus_per_worker} CPU(s), as many torch threads",
        flush=True,
    )
    run = run_url(cfg)
    console.open()
    stop.clear_request(run)
    if stop_on_sigterm:  # after ray.init, which installs a SIGTERM handler of its own
        stop.request_stop_on_sigterm(run, announce=lambda text: print(text, flush=True))
    storage_path, filesystem = ray_storage(cfg.storage.root)
    run_config = ray.train.RunConfig(
        name=cfg.storage.run_name,
        storage_path=storage_path,
        storage_filesystem=filesystem,
        failure_config=ray.train.FailureConfig(max_failures=cfg.dist.max_failures),
        checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.train.keep_checkpoints),
        # no secrets: kitdist.credentials; FAULT_ENV only where a test set it
        worker_runtime_env={"env_vars": worker_env_vars(cfg.dist) | passed_on_env((FAULT_ENV,))},
        callbacks=[StopOnUnrecoverable(), RestartNotice(run, cfg.dist.max_failures)],
    )
    resources = {"CPU": cfg.dist.cpus_per_worker} | ({"GPU": 1} if cfg.dist.use_gpu else {})
    trainer = PromptTorchTrainer(
        _train_fn,
        train_loop_config=to_dict(cfg),
        scaling_config=ray.train.ScalingConfig(
            num_workers=cfg.dist.num_workers, use_gpu=cfg.dist.use_gpu, resources_per_worker=resources
        ),
        run_config=run_config,
    )
    try:
        return trainer.fit()
    finally:
        if own_console:
            console.close()


def run_or_exit(cfg: RunConfig, fine_tune: bool, check_only: bool = False) -> None:
    """`launch` for the command line (or only its checks: `check_only`): a bad config, dataset or storage
    URL ends in one error line."""
    import sys

    from kitdist.console import shown
    from kitdist.failures import NO_RETRY_MARK, one_line, training_failure, unrecoverable_in
    from kitdist.shards.manifest import ManifestError

    started = time.monotonic()
    console = RunConsole(cfg)
    try:
        if check_only:  # --check: the checks and what a launch prints first; no Ray, no workers
            print(check_report(with_absolute_paths(cfg), fine_tune=fine_tune), flush=True)
            return
        result = launch(cfg, fine_tune=fine_tune, stop_on_sigterm=True, console=console)
    except (ConfigError, ManifestError, storage.StorageError, FileNotFoundError) as err:
        sys.exit(f"error: {one_line(err)}")
    except Exception as err:  # Ray Train's TrainingFailedError: one line, its traceback in the log
        fatal = unrecoverable_in(err)
        if fatal is not None:
            sys.exit(f"error: {fatal} (raised in a training worker; {NO_RETRY_MARK})")
        failure = training_failure(err)
        if failure is None or console.file is None:
            raise
        console.write(traceback.format_exception(err))
        restarts = f"after {len(console.restarts)} restart(s)" if console.restarts else "no restart"
        sys.exit(f"error: training failed, {restarts}: {failure}; full log: {shown(console.path)}")
    finally:
        console.close()
    reached = (result.metrics or {}).get("step", cfg.train.max_steps)
    if reached < cfg.train.max_steps:
        print(f"stopped early at step {reached} of {cfg.train.max_steps}; run the same command to resume")
        sys.exit(stop.STOPPED_EXIT_CODE)
    print_summary(with_absolute_paths(cfg), result, started, console.restarts)
