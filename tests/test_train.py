"""End-to-end training on one shared local Ray cluster with real DeepSpeed (CPU, gloo) and real shards
built from scikit-image's photographs: the embedded default stopped by SIGTERM, losing a worker right
after a checkpoint, its driver SIGKILLed, and each time continued (against an uninterrupted run, ZeRO-2
fp32), ZeRO-3 bf16 on the S3 server resumed as ZeRO-0 bf16, DDP following DeepSpeed. Few steps, small
crops: Ray's start-up per run is most of the cost, so each run is made to check as much as it can."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest
import torch
from s3server import cluster_node_env

from kitdist import storage
from kitdist.config import load_config

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
BASE = [
    "model.size=debug",
    "data.crop_size=32",
    "data.global_batch_size=4",
    "data.val_crop_size=64",
    "data.max_val_samples=2",
    "data.num_workers=0",
    "train.warmup_steps=1",
    "train.log_every=1",
    "train.checkpoint_every=2",
    "train.lr=1e-3",
    "dist.num_workers=2",
    "dist.cpus_per_worker=1",
    "dist.max_failures=0",
]
# The embedded default with fewer steps, a checkpoint every 8 and on a stop request.
# Long enough that a SIGTERM sent when step 1 is printed reaches the workers well before step 14 (with 6
# steps a quiet machine finished the run before the stop request arrived; it stops near step 8).
SHORT_STEPS = 24
EMBEDDED_SHORT = [
    f"train.max_steps={SHORT_STEPS}",
    "train.warmup_steps=2",
    "train.log_every=1",
    "train.checkpoint_every=8",
]


@pytest.fixture(scope="session")
def photo_shards(tmp_path_factory) -> tuple[str, str]:
    from kitdist.pretrain import ensure_photo_shards

    return ensure_photo_shards(str(tmp_path_factory.mktemp("photo-shards")))


@pytest.fixture(scope="session")
def ray_temp_dir() -> str:
    """The test cluster's own temp folder (short: Ray puts Unix sockets under it): its session folder
    is searched for secrets, and no other cluster's logs are."""
    folder = tempfile.mkdtemp(prefix="kdray-", dir="/tmp")
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="session")
def ray_address(request, ray_temp_dir) -> str:
    """One local Ray cluster for every training test (starting one costs many seconds); its address is
    handed to runs in subprocesses through RAY_ADDRESS. Its processes have the S3 server's endpoint and
    credentials in their environment, as a remote cluster's nodes do: nothing hands them over through Ray."""
    ray = pytest.importorskip("ray")
    with cluster_node_env(request):
        ray.init(
            address="local", num_cpus=4, include_dashboard=False, log_to_driver=False, _temp_dir=ray_temp_dir
        )
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


def files_holding(folder: str, secret: str) -> list[str]:
    """Every regular file under `folder` whose bytes contain `secret`."""
    found = []
    for path in Path(folder).rglob("*"):
        if path.is_file() and not path.is_symlink() and secret.encode() in path.read_bytes():
            found.append(str(path))
    return found


def train(root: str, run: str, shards: tuple[str, str], *overrides: str) -> list[dict]:
    """Runs kitdist training through Ray Train in this process; returns the run's metrics records."""
    from kitdist.launch import launch

    train_url, val_url = shards
    extra = [f"data.train_shards={train_url}", f"data.val_shards={val_url}"]
    cfg = load_config(None, [*BASE, *extra, f"storage.root={root}", f"storage.run_name={run}", *overrides])
    result = launch(cfg)
    assert result.error is None, repr(result.error)
    return records_of(root, run)


def records_of(root: str, run: str) -> list[dict]:
    text = storage.read_text(storage.join(root, run, "metrics", "metrics.jsonl"))
    return [json.loads(line) for line in text.splitlines()]


def losses(records: list[dict]) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in records if "loss" in r}


def weights_at(root: str, run: str, step: int) -> dict[str, torch.Tensor]:
    from safetensors.torch import load

    return load(storage.read_bytes(storage.join(root, run, f"step-{step:08d}", "weights.safetensors")))


class Pretrain:
    """`python -m kitdist.pretrain ARGS` in a subprocess of its own process group (cwd `folder`, `env`
    added to the environment), output collected line by line."""

    def __init__(self, folder: Path, address: str, *args: str, env: dict[str, str] | None = None) -> None:
        env = {
            **os.environ,
            "PYTHONPATH": str(REPO),
            "RAY_ADDRESS": address,
            "DS_ACCELERATOR": "cpu",
            **(env or {}),
        }
        self.process = subprocess.Popen(
            [sys.executable, "-m", "kitdist.pretrain", *args],
            cwd=folder,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        self.lines: list[str] = []
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        for line in self.process.stdout:
            self.lines.append(line.rstrip("\n"))

    def wait_for(self, text: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not any(text in line for line in self.lines):
            assert self.process.poll() is None, "\n".join(self.lines[-30:])
            assert time.monotonic() < deadline, f"no {text!r} after {timeout}s:\n" + "\n".join(
                self.lines[-30:]
            )
            time.sleep(0.2)

    def finish(self, timeout: float = 400) -> int:
        code = self.process.wait(timeout=timeout)
        self.reader.join(timeout=10)
        return code

    def progress(self) -> list[str]:
        """The progress lines ("step 3/6 | loss ..."), as the driver printed them (Ray prefixes them)."""
        return [line.split("step ", 1)[1] for line in self.lines if " | loss " in line]


def test_embedded_default_stopped_killed_and_rerun_ends_as_the_uninterrupted_run(tmp_path, ray_address):
    """The embedded default (ZeRO-2 fp32, 2 workers), shortened, through every way a run is cut short:
    1. SIGTERM after the first logged step -> a checkpoint at the step it stopped, exit 143;
    2. the same command again resumes from it; worker 1 dies (SIGKILL) right after its report of the
       next checkpoint (step F = 8 or 16) returns, before Ray Train registers it -> the workers restart
       from step F (not from Ray's older registered one), said in one console line whose log file holds
       the traceback; the whole driver process group is SIGKILLed two steps later;
    3. the same command again resumes from step F, the newest complete checkpoint, and ends with the
       losses and weights of a run that was never interrupted."""
    from kitdist.train.session import FAULT_ENV

    first = Pretrain(tmp_path, ray_address, *EMBEDDED_SHORT)
    first.wait_for(f"step 1/{SHORT_STEPS} |", timeout=400)
    first.process.send_signal(signal.SIGTERM)
    assert first.finish() == 143, "\n".join(first.lines[-30:])
    run = tmp_path / "runs" / "embedded"
    stopped = sorted(path.name for path in run.glob("step-*"))
    step = int(stopped[-1].removeprefix("step-"))
    assert any(f"stopped on request after step {step}" in line for line in first.lines), stopped
    fault = (step // 8 + 1) * 8  # the next checkpoint: 8 or 16 (a quiet machine runs ~7 steps past SIGTERM)
    assert fault + 2 < SHORT_STEPS, f"the stop request came after step {step}"

    second = Pretrain(tmp_path, ray_address, *EMBEDDED_SHORT, env={FAULT_ENV: f"1:{fault}"})
    second.wait_for(f"step {fault + 2}/{SHORT_STEPS} |", timeout=400)
    os.killpg(second.process.pid, signal.SIGKILL)
    second.finish()
    assert any(f"resumed from step {step} (native state" in line for line in second.lines)
    assert f"run embedded: resuming from step {step}, settings unchanged" in second.lines
    assert_one_restart_line(second.lines, tmp_path, rank=1, resumed=f"step-{fault:08d}", attempts=3)
    assert any(f"resumed from step {fault} (native state" in line for line in second.lines)

    third = Pretrain(tmp_path, ray_address, *EMBEDDED_SHORT)
    assert third.finish() == 0, "\n".join(third.lines[-30:])
    assert f"run embedded: resuming from step {fault}, settings unchanged" in third.lines, third.lines
    assert any(f"resumed from step {fault} (native state" in line for line in third.lines), third.lines
    printed = third.progress()
    assert len(printed) == len(set(printed)) == SHORT_STEPS - fault, "each progress line is printed once"
    assert_readable_console(first.lines + third.lines, tmp_path)
    records = records_of(str(tmp_path / "runs"), "embedded")
    assert sorted(losses(records)) == list(range(1, SHORT_STEPS + 1))
    assert 10 < records[-1]["val_psnr_rgb"] < 60

    from kitdist.pretrain import EMBEDDED_CONFIG

    data = tmp_path / "runs" / "data" / "skimage-photos"
    cfg = load_config(
        EMBEDDED_CONFIG,
        [*EMBEDDED_SHORT, f"data.train_shards={data / 'train'}", f"data.val_shards={data / 'val'}"]
        + [f"storage.root={tmp_path / 'runs'}", "storage.run_name=straight"],
    )
    from kitdist.launch import launch

    launch(cfg)
    straight = records_of(str(tmp_path / "runs"), "straight")
    for number, loss in losses(straight).items():
        assert losses(records)[number] == pytest.approx(loss, rel=1e-5, abs=1e-7), number
    resumed, uninterrupted = (
        weights_at(str(run.parent), "embedded", SHORT_STEPS),
        weights_at(str(run.parent), "straight", SHORT_STEPS),
    )
    for name, value in uninterrupted.items():
        torch.testing.assert_close(resumed[name], value, rtol=1e-5, atol=1e-7, msg=name)


def assert_one_restart_line(lines: list[str], folder: Path, rank: int, resumed: str, attempts: int) -> None:
    """A dead worker costs the console one line (plus the raylet's one-line note at most) naming the
    worker, its pid, what happened, the checkpoint the restart resumes from, the attempt and the full
    log, which holds Ray's tracebacks; no traceback, Ray Train failure report or worker info on it."""
    text = "\n".join(lines)
    said = [line for line in lines if line.startswith(f"worker {rank} (pid ")]
    assert len(said) == 1, text
    assert re.search(
        rf"; restarting from {resumed} \(attempt 1 of {attempts}\); full log: \S+\.log$", said[0]
    )
    assert "killed (its process ended without exiting" in said[0], said[0]
    for report in (
        "Traceback",
        "FailurePolicy",
        "WorkerGroupError",
        "ActorDiedError",
        "Worker info",
        "raylet",
    ):
        assert report not in text, f"{report!r} on the console:\n{text}"
    log = Path(folder, said[0].rsplit("full log: ", 1)[1])  # relative to the command's working directory
    log_text = log.read_text()
    assert "Traceback (most recent call last)" in log_text and "[FailurePolicy] RETRY" in log_text


# What the console of a run must not show: Ray's and DeepSpeed's bookkeeping (issue 16's list).
CHATTER = (
    "PlacementGroupCleaner",
    "Failed to query Ray Train Controller actor state",
    "PreemptionWatcher",
    "all_gather_into_tensor",
    "Checkpoint successfully created",
    "TrainingReport(",
)


def assert_readable_console(lines: list[str], folder: Path) -> None:
    """No chatter; progress lines with step, loss, samples/s and ETA, unprefixed; each checkpoint
    reported once; a summary naming loadable weights, validation against the input, a grid PNG that
    exists, and the next commands."""
    text = "\n".join(lines)
    for chatter in CHATTER:
        assert chatter not in text, f"{chatter!r} in the console:\n{text}"
    progress = [line for line in lines if line.startswith("step ") and " | loss " in line]
    assert progress and all("/s" in line for line in progress), text
    assert any(" | ETA " in line for line in progress), text
    saved = [line for line in lines if line.startswith("checkpoint step-")]
    assert len(saved) == len(set(saved)), saved
    summary = {line.split(":", 1)[0]: line.split(":", 1)[1].strip() for line in lines if ":  " in line}
    assert Path(folder, summary["weights"]).is_file(), text
    assert re.search(r"[\d.]+ dB PSNR .* their inputs: [\d.]+ dB", summary["validation"]), text
    grid = Path(folder, summary["comparison"].split(" (")[0])
    assert grid.suffix == ".png" and grid.stat().st_size > 0, text
    for command in ("kitdist.restore", "kitdist.evaluate", "tensorboard --logdir"):
        assert any(line.startswith(f"  {command}") or f" -m {command}" in line for line in lines), command


def test_workers_get_an_even_share_of_the_cores_as_torch_threads_at_nice_0(ray_address):
    """dist.cpus_per_worker=0 (the embedded default's) splits the machine's cores over the workers; in a
    Ray worker holding that many CPUs and the launcher's environment, torch runs as many threads, at
    nice 0, and glibc keeps freed memory (the tunables took effect when Ray started the worker)."""
    import ray
    from test_device import FAULTS_OF_REUSE

    from kitdist.distributed.env import worker_env_vars
    from kitdist.launch import use_assigned_cpus, with_worker_cpus
    from kitdist.pretrain import EMBEDDED_CONFIG

    cores = os.cpu_count()
    dist = with_worker_cpus(load_config(EMBEDDED_CONFIG), cores).dist
    assert dist.num_workers * dist.cpus_per_worker == cores - cores % dist.num_workers

    def settings() -> tuple[int, int, int, bool]:
        scope: dict = {}
        exec(FAULTS_OF_REUSE, scope)
        return use_assigned_cpus(), torch.get_num_threads(), os.nice(0), scope["faults_per_reuse"]() < 100

    worker = ray.remote(num_cpus=dist.cpus_per_worker, runtime_env={"env_vars": worker_env_vars(dist)})(
        settings
    )
    found = ray.get([worker.remote() for _ in range(dist.num_workers)])
    assert found == [(dist.cpus_per_worker, dist.cpus_per_worker, 0, True)] * dist.num_workers


def test_cpus_per_worker_0_picks_the_largest_share_that_places_every_worker():
    """On uneven nodes the share is what every worker can get on some node, not total / workers."""
    from kitdist.launch import with_worker_cpus

    cfg = load_config(None, ["dist.num_workers=4"])
    shares = {
        nodes: with_worker_cpus(cfg, list(nodes)).dist.cpus_per_worker
        for nodes in [(16,), (12, 4), (6, 1), (2,)]
    }
    assert shares == {(16,): 4, (12, 4): 4, (6, 1): 1, (2,): 1}
    assert with_worker_cpus(load_config(None, ["dist.cpus_per_worker=3"]), [64]).dist.cpus_per_worker == 3


def val_psnr_of_weights(cfg, weights: dict[str, torch.Tensor]) -> float:
    """Mean RGB PSNR of a fresh `build_model` holding `weights`, on the run's validation images, scored
    as the run's own validation and `kitdist.evaluate` score (fp32 weights and input, bf16 autocast)."""
    from kitdist.data import val_batches
    from kitdist.model import build_model
    from kitdist.train.validation import restore_and_score

    model = build_model(cfg.model)
    model.load_state_dict(weights, strict=True)
    model = model.eval()

    def forward(x: torch.Tensor) -> torch.Tensor:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return model(x).float()

    values = []
    with torch.no_grad():
        for batch in val_batches(cfg, 0, 1):
            values.append(
                restore_and_score(forward, batch["input"][0], batch["target"][0]).metrics["psnr_rgb"]
            )
    return sum(values) / len(values)


def test_zero3_on_s3_resumes_on_one_worker_and_exports_loadable_weights(
    s3_env, ray_address, ray_temp_dir, photo_shards, capfd
):
    """ZeRO-3 bf16 on 2 workers with checkpoints and metrics on the S3 server; the same run continued as
    ZeRO-0 bf16 on ONE worker (the world-size- and stage-independent state read back from S3, the data
    position re-split); its weights.safetensors, loaded into a fresh model without DeepSpeed, gives the
    validation PSNR the run reported. The S3 secret key is in no file under Ray's session folder, no
    object the run wrote and no console output: the workers found it in their own environment."""
    train(s3_env, "zero3", photo_shards, "train.max_steps=2", "dist.zero_stage=3")
    names = storage.list_names(storage.join(s3_env, "zero3", "step-00000002"))
    assert {"weights.safetensors", "optimizer.safetensors", "train_state.json", "config.yaml"} <= set(names)
    records = train(
        s3_env, "zero3", photo_shards, "train.max_steps=3", "dist.zero_stage=0", "dist.num_workers=1"
    )
    assert sorted(losses(records)) == [1, 2, 3]
    state = json.loads(storage.read_text(storage.join(s3_env, "zero3", "step-00000003", "train_state.json")))
    assert state["zero_stage"] == 0 and len(state["data_states"]) == 1

    secret = os.environ["AWS_SECRET_ACCESS_KEY"]
    assert files_holding(ray_temp_dir, secret) == []
    fs, prefix = storage.url_to_fs(s3_env)
    written = fs.find(prefix)
    assert len(written) > 10 and not [path for path in written if secret.encode() in fs.cat_file(path)]
    console = capfd.readouterr()
    assert secret not in console.out + console.err
    assert "run zero3: resuming from step 2, with changed settings (checkpoint -> now):" in console.out
    assert "  dist.zero_stage: 3 -> 0\n  dist.num_workers: 2 -> 1\n" in console.out

    cfg = load_config(None, [*BASE, f"data.val_shards={photo_shards[1]}"])
    reported = records[-1]["val_psnr_rgb"]
    torch.set_num_threads(1)  # as in the Ray worker (1 CPU): the same reduction order
    assert val_psnr_of_weights(cfg, weights_at(s3_env, "zero3", 3)) == pytest.approx(reported, abs=0.02)


# A progressive recipe (issue 15): crops of 32 and a global batch of 4 for 3 steps, then 64 and 2; a
# constant lr, so that runs of different lengths share their steps.
PROGRESSIVE = [
    "data.schedule=[{step: 0, crop_size: 32, global_batch_size: 4}, {step: 3, crop_size: 64, global_batch_size: 2}]",
    "train.warmup_steps=0",
    "train.min_lr=1e-3",
]


def torchrun_records(root: str, run: str, shards: tuple[str, str], *overrides: str) -> list[dict]:
    """The same loop on ONE process under torchrun (no Ray); returns the run's metrics records."""
    from s3server import free_port

    cli = [*BASE, f"data.train_shards={shards[0]}", f"storage.root={root}", f"storage.run_name={run}"]
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "1"]
    env = {**os.environ, "PYTHONPATH": str(REPO), "DS_ACCELERATOR": "cpu"}
    command = [*launcher, "--master-port", str(free_port()), "-m", "kitdist.torchrun", *cli, *overrides]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return records_of(root, run)


def test_one_recipe_on_two_workers_and_resumed_on_one_across_a_change_point(
    tmp_path, ray_address, photo_shards, capfd
):
    """The progressive recipe on 2 workers x accumulation 1 (Ray, steps 1-2) gives the losses of 1 worker
    x accumulation 2 (torchrun, capped at micro-batch 2): the same micro-batches and model draws. Resumed
    on ONE worker (elastic), the micro-batch stays 2 and the accumulation doubles (global batch 4), and
    across the change to crops of 64 the run equals the uninterrupted one-worker run: same losses, same
    data position. The driver prints each phase's decisions before the workers start."""
    root = str(tmp_path)
    reference = torchrun_records(
        root,
        "one",
        photo_shards,
        *PROGRESSIVE,
        "train.max_steps=5",
        "dist.num_workers=1",
        "train.max_micro_batch=2",
    )
    first = train(root, "elastic", photo_shards, *PROGRESSIVE, "train.max_steps=2")
    second = train(root, "elastic", photo_shards, *PROGRESSIVE, "train.max_steps=5", "dist.num_workers=1")
    decided = {
        r["step"]: (r["micro_batch"], r["grad_accum"], r["crop_size"], r["global_batch_size"])
        for r in first + second
    }
    assert decided == {
        1: (2, 1, 32, 4),
        2: (2, 1, 32, 4),
        3: (2, 2, 32, 4),
        4: (2, 1, 64, 2),
        5: (2, 1, 64, 2),
    }
    assert [r["grad_accum"] for r in reference] == [2, 2, 2, 1, 1]
    expected = losses(reference)
    for number, loss in {**losses(first), **losses(second)}.items():
        assert loss == pytest.approx(expected[number], rel=1e-3), number
    states = [
        json.loads(Path(root, run, "step-00000005", "train_state.json").read_text())
        for run in ("one", "elastic")
    ]
    assert states[0]["data_states"] == states[1]["data_states"]
    assert states[1]["batching"] == {
        "micro_batch": 2,
        "grad_accum": 1,
        "crop_size": 64,
        "global_batch_size": 2,
    }
    printed = capfd.readouterr().out
    assert "steps 1..2: crop 32, global batch 4 = micro-batch 2 x accumulation 1 x 2 worker(s)" in printed
    assert "steps 1..3: crop 32, global batch 4 = micro-batch 2 x accumulation 2 x 1 worker(s)" in printed
    assert "steps 4..5: crop 64, global batch 2 = micro-batch 2 x accumulation 1 x 1 worker(s)" in printed


ZERO0 = ("train.max_steps=5", "train.precision=fp32", "dist.zero_stage=0")


@pytest.fixture(scope="module")
def zero0_run(tmp_path_factory, ray_address, photo_shards) -> tuple[Path, list[dict]]:
    """A finished DeepSpeed ZeRO-0 fp32 run of 5 steps (run name "ds"): its root and metrics records.
    Two tests read it, one run fewer to start (Ray's start-up is most of a run's cost here)."""
    root = tmp_path_factory.mktemp("zero0")
    return root, train(str(root), "ds", photo_shards, *ZERO0, "dist.strategy=deepspeed")


def test_ddp_follows_deepspeed(tmp_path, zero0_run, photo_shards):
    """DDP fp32 on 2 workers gives the losses of DeepSpeed ZeRO-0 fp32 on the same batches. (A killed
    worker's restart is the embedded default's test above.)"""
    deepspeed = losses(zero0_run[1])
    ddp = losses(train(str(tmp_path), "ddp", photo_shards, *ZERO0, "dist.strategy=ddp"))
    assert deepspeed.keys() == ddp.keys() == {1, 2, 3, 4, 5}
    for step in deepspeed:
        assert ddp[step] == pytest.approx(deepspeed[step], rel=1e-4)


def worker_group_starts(ray_temp_dir: str) -> int:
    """How many times Ray Train's controllers on the test cluster started a worker group (from their
    log files, which each controller writes as it goes)."""
    logs = Path(ray_temp_dir, "session_latest", "logs", "train")
    texts = [path.read_text(errors="replace") for path in logs.glob("ray-train-app-controller-*.log")]
    return sum(text.count("Attempting to start training worker group") for text in texts)


def test_error_no_retry_can_fix_ends_the_run_at_once_in_one_line(
    tmp_path, ray_address, ray_temp_dir, photo_shards, zero0_run
):
    """A run resumed with another train.seed (storage.on_existing=resume_with_changes: the driver refuses it
    otherwise, tests/test_rerun.py): its saved data position cannot fit, and the workers find that out. With dist.max_failures=3 the run still ends after the first attempt:
    one worker group started, one error line naming the mismatch, no traceback of it, exit status 1.
    (The other side, a killed worker's group being restarted, is the embedded default's test.)
    The run resumed is a copy of the finished ZeRO-0 run (a run folder moves with its storage root)."""
    root = str(tmp_path / "runs")
    shutil.copytree(zero0_run[0] / "ds", Path(root) / "ds")
    train_url, val_url = photo_shards
    args = [*BASE, f"data.train_shards={train_url}", f"data.val_shards={val_url}", f"storage.root={root}"]
    args += [*ZERO0, "dist.strategy=deepspeed", "storage.run_name=ds"]
    args += ["train.max_steps=7", "train.seed=1", "dist.max_failures=3"]
    args += ["storage.on_existing=resume_with_changes"]  # else the driver refuses the new seed
    starts = worker_group_starts(ray_temp_dir)
    again = Pretrain(tmp_path, ray_address, *args)
    assert again.finish() == 1, "\n".join(again.lines[-30:])
    assert worker_group_starts(ray_temp_dir) == starts + 1, "\n".join(again.lines[-30:])
    assert "  train.seed: 0 -> 1" in again.lines
    errors = [line for line in again.lines if line.startswith("error:")]
    assert len(errors) == 1 and "seed" in errors[0] and "not retried" in errors[0], again.lines[-30:]
    ours = [
        line for line in again.lines if "Unrecoverable" in line or 'File "/' in line and "kitdist" in line
    ]
    assert not ours, "\n".join(again.lines)
