"""What a person sees in the console of a training command: Ray's and DeepSpeed's internal chatter kept
out (real warnings still pass), the training workers' own lines without Ray's prefixes, a failure as one
line (the summary at the end is `kitdist.summary`'s).

Everything the workers, Ray Train's controller and the raylet print also goes, as Ray printed it, to the
run's console log (`console_log`: `<run>/logs/console-<UTC time>.log`); their tracebacks and failure
reports (the error output of Ray Train's processes, the raylet's notes on dead workers) go there only, and
the console says where. A restart of the workers is one line (`RunConsole.restart_line`).

The driver side hooks Ray's printer of worker output (a private Ray API, `kitdist.raycompat`; where it is
missing, Ray's own printer stays and only the worker-side settings apply).
"""

from __future__ import annotations

import logging
import os
import re
import threading
import warnings
from datetime import datetime, timezone
from typing import IO, Any

from kitdist import storage
from kitdist.checkpoints import run_url
from kitdist.config import RunConfig

# Lines of Ray's and DeepSpeed's bookkeeping that need no action from anyone; matched anywhere in a line.
CHATTER = re.compile(
    "|".join(
        [
            r"Failed to query Ray Train Controller actor state",  # PlacementGroupCleaner polling the State API
            r"'PreemptionWatcher'.*max_restarts > 0",  # Ray Train's own actor, an internal note
            r"Checkpoint successfully created at: ",  # ours says "checkpoint step-N saved" once
            r"Reporting training result \d+: TrainingReport\(",
            r"Requesting resources: \{",
            r"Attempting to start training worker group of size",
            r"Started training worker group of size",
            r"^- \(ip=[^)]*\) world_rank=\d+",
            r"Setting up process group for: ",
            r"deepspeed_shm_comm_op built successfully",
        ]
    )
)
# Notes that Ray follows with a traceback although they need no action: the traceback goes with them.
NOISY_TRACEBACKS = re.compile(
    "|".join(
        [
            r"Failed to send resource request for train-",  # Ray Train's autoscaling hint timed out (busy CPU)
            # the controller's shutdown of the watchdog below timed out (seen when the run joins a cluster
            # started beforehand); the watchdog goes away with its controller anyway
            r"Failed to stop PlacementGroupCleaner gracefully",
            # Ray Train's drain watcher polling the State API while its process shuts down after a stop
            # ("Ray has not been started yet"); a drain it did see would reach the run as a preemption
            r"PreemptionWatcher poll failed",
        ]
    )
)
TRACEBACK_BODY = re.compile(r"^(\s|Traceback \(most recent call last\)|\^)")
# Ray Train's watchdog that removes a dead controller's placement group; it polls the State API, which
# a cluster without the dashboard does not serve (and it cannot tell two clusters on one machine apart),
# so all it ever prints is its own failure. Training never depends on it.
SILENT_ACTORS = {"PlacementGroupCleaner"}
TRAIN_WORKER = "RayTrainWorker"
TRAIN_CONTROLLER = "TrainController"
RAYLET = "raylet"
AUTOSCALER = "autoscaler"
# The raylet's notes on a worker it lost (the restart line says it; the log keeps them).
RAYLET_DEATH_NOTES = re.compile(
    r"A worker died or was killed|low on memory|Worker exit type|node .*(has died|was terminated|is dead)"
)
# Error output of Ray Train's processes that still shows on the console: warnings and notes.
SHOWN_ERROR_OUTPUT = re.compile(r"warn|^note: ", re.IGNORECASE)
# DeepSpeed (0.19) calls the deprecated name; the warning asks nothing of the user
DEPRECATED_GATHER = r"`torch.distributed.all_gather_into_tensor` is deprecated"


def is_chatter(line: str) -> bool:
    return CHATTER.search(line) is not None


class ChatterFilter:
    """Drops chatter lines, and the traceback after a note in NOISY_TRACEBACKS, per process."""

    def __init__(self) -> None:
        self.in_traceback: set[str] = set()

    def keep(self, source: str, lines: list[str]) -> list[str]:
        kept = []
        for line in lines:
            if source in self.in_traceback:
                if TRACEBACK_BODY.match(line):
                    continue
                self.in_traceback.discard(source)
                if re.match(r"[\w.]+(Error|Exception)\b", line):  # the traceback's last line
                    continue
            if NOISY_TRACEBACKS.search(line):
                self.in_traceback.add(source)
            elif not is_chatter(line):
                kept.append(line)
        return kept


def quiet_worker() -> None:
    """In a training worker: warnings about library internals off (real ones still show)."""
    warnings.filterwarnings("ignore", message=DEPRECATED_GATHER, category=FutureWarning)


# Ray 2.60 turns token auth on for every new local cluster and says so with a WARNING each time; for a
# cluster of our own that lives for one run that needs no action (its errors still show).
RAY_AUTH_SETUP_LOGGER = "ray._private.authentication.authentication_token_setup"


def quiet_ray_init() -> dict[str, Any]:
    """ray.init arguments for a local cluster of our own: its INFO notes (start, token written) off, and
    Ray's warning that it chose token auth."""
    logging.getLogger(RAY_AUTH_SETUP_LOGGER).setLevel(logging.ERROR)
    return {"logging_level": logging.WARNING}


def log_only(data: dict[str, Any], line: str) -> bool:
    """Whether a line of a Ray process goes to the run's console log only: Ray Train's processes' error
    output (tracebacks, failure reports; warnings and notes still show) and the raylet's death notes."""
    if data.get("pid") == RAYLET:
        return RAYLET_DEATH_NOTES.search(line) is not None
    if data.get("actor_name") in (TRAIN_WORKER, TRAIN_CONTROLLER) and data.get("is_err"):
        return SHOWN_ERROR_OUTPUT.search(line) is None
    return False


def ray_prefix(data: dict[str, Any]) -> str:
    """How Ray names the process a line came from, e.g. "(RayTrainWorker pid=7194, stderr)"."""
    if data.get("pid") == RAYLET:
        return f"({RAYLET})"
    name = data.get("actor_name") or data.get("task_name") or ""
    stream = ", stderr" if data.get("is_err") else ""
    return f"({name}{' ' if name else ''}pid={data.get('pid')}{stream})"


LOG_LINE = re.compile(r"^\((?:(raylet)|(\w*) ?pid=(\S+?)(, stderr)?)\) (.*)$")


def record_of(log_line: str) -> tuple[dict[str, Any], str] | None:
    """A line of the console log as the record Ray's printer received and the line (None: the driver's)."""
    match = LOG_LINE.match(log_line)
    if match is None:
        return None
    raylet, name, pid, err, line = match.groups()
    if raylet:
        return {"pid": RAYLET, "is_err": False}, line
    return {"pid": pid, "actor_name": name or None, "is_err": bool(err)}, line


def console_log(cfg: RunConfig, started: datetime) -> str:
    """Where the console log of a command goes: `<run>/logs/console-<UTC>.log` for a local run folder;
    for remote storage a local file under ./kitdist-logs/<run name>/, uploaded to `<run>/logs/` at the end."""
    name = f"console-{started.strftime('%Y%m%dT%H%M%SZ')}.log"
    if storage.is_local(cfg.storage.root):
        return storage.join(storage.absolute(run_url(cfg)), "logs", name)
    return os.path.abspath(os.path.join("kitdist-logs", cfg.storage.run_name, name))


class RunConsole:
    """One command's console: the log file every line of the run goes to (opened once the run has passed
    its checks), the last step printed, and the restarts (one line each). The printer of worker output
    writes to the open one."""

    current: RunConsole | None = None

    def __init__(self, cfg: RunConfig) -> None:
        self.run = run_url(cfg)
        self.path = console_log(cfg, datetime.now(timezone.utc))
        self.file: IO[str] | None = None
        self.lock = threading.Lock()
        self.last_step = 0
        self.restarts: list[str] = []

    def open(self) -> None:
        with self.lock:
            if self.file is None:
                os.makedirs(os.path.dirname(self.path), exist_ok=True)
                self.file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 (closed by close())
        RunConsole.current = self

    def write(self, lines: list[str]) -> None:
        with self.lock:
            if self.file is not None:
                self.file.writelines(f"{line}\n" for line in lines)
                self.file.flush()

    def saw_progress(self, lines: list[str]) -> None:
        for line in lines:
            step = re.match(r"step (\d+)/\d+ \|", line)
            self.last_step = int(step.group(1)) if step else self.last_step

    def restart_line(self, notice: dict[str, Any]) -> str:
        """The console's line for a RestartNotice, e.g. "worker 1 (pid 7331) killed (...) after step 4;
        restarting from step-00000004 (attempt 1 of 4); full log: runs/embedded/logs/console-...log"."""
        pid = f" (pid {notice['pid']})" if notice.get("pid") else ""
        where = notice["resume"] or "the start (no complete checkpoint yet)"
        failed = f"worker {notice['rank']}{pid} {notice['what']} after step {self.last_step}"
        self.restarts.append(f"{failed}; resumed from {where}")
        return (
            f"{failed}; restarting from {where} (attempt {notice['attempt']} of {notice['max']}); "
            f"full log: {shown(self.path)}"
        )

    def close(self) -> None:
        """Closes the log (remote run folders: uploads it to `<run>/logs/`)."""
        with self.lock:
            if self.file is None:
                return
            self.file.close()
            self.file = None
        if RunConsole.current is self:
            RunConsole.current = None
        if not storage.is_local(self.run):
            storage.put_file(self.path, storage.join(self.run, "logs", os.path.basename(self.path)))


class WorkerOutput:
    """The driver's printer of worker output, in place of Ray's (`ray_printer`): every line to the open
    run's console log; on the console chatter dropped, the training workers' own stdout printed as it is
    (one progress display), a restart as one line, tracebacks and failure reports not at all
    (`log_only`), everything else as Ray prints it."""

    kitdist = True  # marks the printer as installed

    def __init__(self, ray_printer: Any) -> None:
        self.ray_printer = ray_printer
        self.chatter = ChatterFilter()

    def __call__(self, data: dict[str, Any]) -> None:
        from kitdist.failures import restart_notice

        run = RunConsole.current
        if run is not None and data.get("pid") != AUTOSCALER:  # its status table, every few seconds
            run.write([f"{ray_prefix(data)} {line}" for line in data.get("lines", [])])
        if data.get("actor_name") in SILENT_ACTORS:
            return
        notices, lines = [], []
        for line in self.chatter.keep(f"{data.get('pid')}-{data.get('is_err')}", data.get("lines", [])):
            notice = restart_notice(line)
            if notice is not None:
                notices.append(notice)
            elif not log_only(data, line):
                lines.append(line)
        if run is not None and notices:
            said = [run.restart_line(notice) for notice in notices]
            run.write(said)
            print("\n".join(said), flush=True)
        if not lines:
            return
        if data.get("actor_name") == TRAIN_WORKER and not data.get("is_err"):
            if run is not None:
                run.saw_progress(lines)
            print("\n".join(lines), flush=True)
        else:
            self.ray_printer({**data, "lines": lines})


def filter_worker_output() -> bool:
    """Puts WorkerOutput in place of Ray's printer of worker output on this driver, and routes the
    raylet's messages through it. Returns False (Ray's printer kept) where this Ray version has no such
    hook."""
    try:
        from kitdist import raycompat

        dispatcher = raycompat.stdstream_dispatcher()
    except ImportError:
        return False
    ray_printer = dict(dispatcher.handlers).get(raycompat.RAY_PRINTER)
    if ray_printer is None or getattr(ray_printer, "kitdist", False):
        return ray_printer is not None
    printer = WorkerOutput(ray_printer)
    dispatcher.remove_handler(raycompat.RAY_PRINTER)
    dispatcher.add_handler(raycompat.RAY_PRINTER, printer)
    raycompat.route_raylet_messages(printer)
    return True


def shown(url: str) -> str:
    """A local path relative to the working directory when it lies below it; other URLs as they are."""
    if storage.is_local(url):
        path = storage.absolute(url)
        relative = os.path.relpath(path)
        return path if relative.startswith("..") else relative
    return url
