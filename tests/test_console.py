"""The console filter and summary pieces on their own (the whole console of a real embedded run is checked
in tests/test_train.py): Ray's and DeepSpeed's bookkeeping goes, real warnings and tracebacks stay; a
killed worker (a real run's output, replayed) is one line on the console and all of it in the run's log."""

from __future__ import annotations

from pathlib import Path

from kitdist.config import load_config
from kitdist.console import ChatterFilter, RunConsole, WorkerOutput, record_of
from kitdist.failures import what_happened
from kitdist.raycompat import WorkerHealthCheckFailedError
from kitdist.summary import next_commands, panel_names, python_command, summary_lines
from kitdist.train.progress import duration

# Everything Ray handed the driver's printer during an embedded run (Ray 2.60, DeepSpeed 0.19, 2 workers)
# whose worker 1 was SIGKILLed after "checkpoint step-00000004 saved", as the run's console log holds it:
# the raylet's note, Ray Train's failure report, tracebacks, RestartNotice's line, the restarted group.
KILLED_WORKER_LOG = Path(__file__).parent / "data" / "console-killed-worker-ray2.60.log"

# Lines as Ray 2.60 / DeepSpeed 0.19 print them during an embedded run (issue 16).
CHATTER_LINES = [
    "Failed to query Ray Train Controller actor state. State API may be temporarily unavailable. "
    "Continuing to monitor.",
    "[2026-11-27 14:36:58,892 E 9330 9391] core_worker.cc:2465: Actor with class name: 'PreemptionWatcher' "
    "and ID: '2c58' has constructor arguments in the object store and max_restarts > 0. If",
    "Checkpoint successfully created at: Checkpoint(filesystem=local, path=/tmp/r/step-00000060)",
    "Reporting training result 1: TrainingReport(checkpoint=Checkpoint(filesystem=local, path=/x), "
    "metrics={'step': 60})",
    "DeepSpeed deepspeed.ops.comm.deepspeed_shm_comm_op built successfully",
    "Setting up process group for: env:// [rank=0, world_size=2]",
]
TIMEOUT_TRACEBACK = [
    "Failed to send resource request for train-528e. If this only happens transiently during network "
    "partition or CPU being overloaded, it's safe to ignore this error.",
    "Traceback (most recent call last):",
    '  File "/ray/autoscaling_coordinator_client.py", line 58, in send_resource_request',
    "    ray.get(",
    "           ^^^^^^^^^^^^^^^^^^^",
    "ray.exceptions.GetTimeoutError: Get timed out: some object(s) not ready.",
]
CLEANER_SHUTDOWN_TRACEBACK = [  # the controller's, at the end of a run that joined an existing cluster
    "Failed to stop PlacementGroupCleaner gracefully.",
    "Traceback (most recent call last):",
    '  File "/ray/train/v2/_internal/callbacks/placement_group_callback.py", line 126, in _stop_cleaner',
    "    ray.get(self._cleaner.stop.remote(), timeout=self._stop_timeout)",
    "ray.exceptions.GetTimeoutError: Get timed out: some object(s) not ready.",
]
WATCHER_SHUTDOWN_TRACEBACK = [  # Ray Train's drain watcher, polling once more after a stopped run
    "PreemptionWatcher poll failed",
    "Traceback (most recent call last):",
    '  File "/ray/train/v2/_internal/execution/preemption.py", line 175, in _poll_once',
    "    drained = _get_draining_nodes() or {}",
    "              ^^^^^^^^^^^^^^^^^^^^^",
    "ray.exceptions.RaySystemError: System error: Ray has not been started yet. Trying to use state API "
    "before ray.init() has been called.",
]
REAL = [
    "step 10/60 | loss 0.0898 | lr 1.65e-03 | samples_per_s 17.8/s | ETA 1m00s | data-wait 2%",
    "UserWarning: the learning rate scheduler was stepped before the optimizer",
    "Traceback (most recent call last):",
    '  File "/kitdist/train/loop.py", line 120, in _train_steps',
    "RuntimeError: shapes do not match",
]


def test_chatter_goes_and_real_lines_stay():
    lines = CHATTER_LINES + TIMEOUT_TRACEBACK + CLEANER_SHUTDOWN_TRACEBACK + WATCHER_SHUTDOWN_TRACEBACK + REAL
    kept = ChatterFilter().keep("worker-1", lines)
    assert kept == REAL


def test_a_harmless_traceback_is_dropped_only_for_its_own_process():
    lines = ChatterFilter()
    assert lines.keep("controller", TIMEOUT_TRACEBACK[:2]) == []
    assert lines.keep("worker", REAL[2:]) == REAL[2:]  # another process's traceback, at the same time
    assert lines.keep("controller", TIMEOUT_TRACEBACK[2:] + REAL[:1]) == REAL[:1]


def test_duration_reads_like_a_clock():
    assert [duration(s) for s in (4.4, 65, 3599, 3720)] == ["4s", "1m05s", "59m59s", "1h02m"]


def test_summary_names_panels_and_next_commands_for_the_run():
    cfg = load_config(None, ["data.val_shards=runs/data/x/val", "storage.root=runs", "storage.run_name=r"])
    assert panel_names(cfg) == ("noisy", "restored", "clean")
    assert panel_names(load_config(None, ["degrade.blur_prob=0.5"]))[0] == "input"
    commands = next_commands(cfg, "runs/r")
    python = python_command()  # this suite's own Python: CI runs it from a venv it does not activate
    assert commands[0].startswith(f"{python} -m kitdist.restore --weights runs/r ")
    assert "--shards runs/data/x/val" in commands[1] and commands[2] == "tensorboard --logdir runs/r/metrics"


def test_next_commands_name_the_python_of_a_virtual_environment_that_is_not_activated(tmp_path, monkeypatch):
    import sys

    cfg = load_config(None, ["storage.root=runs", "storage.run_name=r"])
    venv = tmp_path / ".venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "python").symlink_to(sys.executable)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "prefix", str(venv))
    monkeypatch.setattr(sys, "base_prefix", "/usr")
    monkeypatch.setenv("PATH", "/usr/bin:/bin")  # not activated
    assert next_commands(cfg, "runs/r")[0].startswith(".venv/bin/python -m kitdist.restore ")
    monkeypatch.setenv("PATH", f"{venv / 'bin'}:/usr/bin:/bin")  # `. .venv/bin/activate`
    assert next_commands(cfg, "runs/r")[0].startswith("python -m kitdist.restore ")
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    assert next_commands(cfg, "runs/r")[0].startswith(f"{venv}/bin/python -m kitdist.restore ")
    monkeypatch.setattr(sys, "prefix", "/usr")  # no virtual environment: `python`, wherever it is run
    assert next_commands(cfg, "runs/r")[0].startswith("python -m kitdist.restore ")


def test_a_local_cluster_of_our_own_starts_with_token_auth_and_without_a_word_from_ray():
    import subprocess
    import sys

    code = (
        "import os, ray\n"
        "from kitdist.launch import _start_local_ray\n"
        "_start_local_ray(1)\n"
        "print('auth mode:', os.environ.get('RAY_AUTH_MODE'))\n"
        "ray.shutdown()\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "auth mode: token" in done.stdout
    printed = done.stdout + done.stderr
    assert "Token authentication" not in printed and "WARNING" not in printed, printed


def test_summary_names_only_the_metric_sinks_of_report_to():
    cfg = load_config(None, ["storage.root=runs", "storage.run_name=r", "train.report_to=[wandb]"])
    lines = summary_lines(cfg, {"step": 5}, "runs/r/step-00000005", 3.0)
    assert "metrics:     runs/r/metrics (metrics.jsonl)" in lines
    assert "W&B:         project kitdist, run r" in lines
    assert not [line for line in lines if "tensorboard" in line.lower()], lines


def replay(log: Path) -> list[dict]:
    """The records of a console log, as Ray's printer received them (consecutive lines of one source)."""
    records: list[dict] = []
    for text in log.read_text().splitlines():
        parsed = record_of(text)
        assert parsed is not None, text
        data, line = parsed
        if records and all(records[-1].get(key) == data.get(key) for key in ("pid", "actor_name", "is_err")):
            records[-1]["lines"].append(line)
        else:
            records.append({**data, "lines": [line]})
    return records


def test_a_killed_worker_is_one_line_on_the_console_and_all_of_it_in_the_log(tmp_path, capsys):
    cfg = load_config(None, [f"storage.root={tmp_path}", "storage.run_name=r"])
    console = RunConsole(cfg)
    console.open()
    shown_by_ray: list[str] = []
    printer = WorkerOutput(lambda data: shown_by_ray.extend(data["lines"]))
    try:
        for data in replay(KILLED_WORKER_LOG):
            printer(data)
    finally:
        console.close()
    printed = capsys.readouterr().out.splitlines() + shown_by_ray
    progress = [
        line for line in printed if line.startswith(("step ", "checkpoint ", "training steps", "MFU"))
    ]
    about_it = [line for line in printed if line not in progress and not line.startswith("resumed from")]
    assert about_it == [
        "worker 1 (pid 22645) killed (its process ended without exiting: a signal such as SIGKILL, or a crash) "
        "after step 4; restarting from step-00000004 (attempt 1 of 4); full log: "
        f"{console.path}"
    ], "\n".join(printed)
    assert console.restarts == [about_it[0].split("; restarting")[0] + "; resumed from step-00000004"]
    log = Path(console.path).read_text()
    assert Path(console.path).parent == tmp_path / "r" / "logs"
    assert "Traceback (most recent call last)" in log and "[FailurePolicy] RETRY" in log
    assert "(raylet) A worker died or was killed" in log and about_it[0] in log
    assert len(log.splitlines()) == len(KILLED_WORKER_LOG.read_text().splitlines()) + 1
    summary = summary_lines(cfg, {"step": 8}, str(tmp_path / "r" / "step-00000008"), 9, console.restarts)
    assert summary[1] == f"restart 1:   {console.restarts[0]}"


def test_what_happened_to_a_worker_in_a_few_words():
    from ray.exceptions import ActorDiedError

    def died(detail: str) -> WorkerHealthCheckFailedError:
        death = ActorDiedError()
        death.error_msg = f"The actor died unexpectedly before finishing this task.\n\tip: 10.0.0.7\n{detail}"
        return WorkerHealthCheckFailedError("A worker health check failed.", death)

    oom = died(
        "Task was killed due to the node running low on memory. Memory on the node (IP: 10.0.0.7) where the "
        "lease was running was 7.21GB / 7.53GB (0.957), which exceeds the memory usage threshold of 0.95."
    )
    assert what_happened(oom) == "killed out of memory (node memory 7.21GB / 7.53GB)"
    lost = died("The actor died because its node has died. Node Id: 3f2a")
    assert what_happened(lost) == "lost with its node 10.0.0.7"
    assert what_happened(died("Worker exits with an exit code 3.")) == "exited with code 3"
    assert what_happened(ValueError("bad\nvalue")) == "failed: ValueError: bad value"
