"""A training command run again under a run name that has checkpoints (kitdist.rerun), through the real
command line: an unchanged rerun resumes, a change that is safe is printed, any other change is refused
before any worker starts naming its keys, unless storage.on_existing asks to resume with the changes or
to restart (the old run moved aside). And `--check`: every check and what a launch would print, in a
subprocess that never imports Ray."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from kitdist import rerun, storage
from kitdist.checkpoints import CONFIG, TRAIN_STATE, WEIGHTS, TrainState, rng_file, run_url
from kitdist.config import dump_yaml, load_config, to_dict
from kitdist.launch import with_absolute_paths
from kitdist.pretrain import EMBEDDED_CONFIG
from kitdist.pretrain import main as pretrain_main

REPO = Path(__file__).resolve().parents[1]
SMALL = ["data.crop_size=32", "data.global_batch_size=4", "dist.num_workers=2", "train.max_steps=2"]


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> str:
    from kitdist.pretrain import ensure_photo_shards

    return ensure_photo_shards(str(tmp_path_factory.mktemp("rerun-shards")))[0]


def args_for(root: Path, shards: str, *overrides: str) -> list[str]:
    return [*SMALL, f"data.train_shards={shards}", f"storage.root={root}", "storage.run_name=r", *overrides]


def write_checkpoint(root: Path, shards: str, step: int = 2) -> Path:
    """A checkpoint of run `r` at `step` as the workers write it (the files the driver reads: the
    resolved config, the training state and weights of the model it builds; each rank's RNG file, which
    makes it complete)."""
    import torch
    from safetensors.torch import save_file

    from kitdist.model import build_model

    overrides = args_for(root, shards, "dist.cpus_per_worker=1")
    cfg = with_absolute_paths(load_config(EMBEDDED_CONFIG, overrides))
    folder = Path(run_url(cfg)) / f"step-{step:08d}"
    folder.mkdir(parents=True)
    torch.manual_seed(0)
    save_file({k: v.contiguous() for k, v in build_model(cfg.model).state_dict().items()}, folder / WEIGHTS)
    (folder / TRAIN_STATE).write_text(TrainState(step, 2, "deepspeed", 1, [], {}).to_json())
    (folder / CONFIG).write_text(dump_yaml(cfg))
    for rank in range(2):
        Path(rng_file(str(folder), rank)).parent.mkdir(exist_ok=True)
        Path(rng_file(str(folder), rank)).write_bytes(b"rng")
    return folder


def rerun_of(root: Path, shards: str, *overrides: str) -> rerun.Rerun | None:
    """What a launch finds for run `r` (check_rerun: ConfigError when it refuses), as it prints it."""
    cfg = with_absolute_paths(load_config(EMBEDDED_CONFIG, args_for(root, shards, *overrides)))
    found = rerun.check_rerun(cfg)
    print(rerun.describe(cfg, found))
    return found


def test_differences_name_keys_old_and_new_values():
    before = to_dict(load_config(None, ["dist.cpus_per_worker=4"])) | {"gone": {"key": 1}}
    del before["train"]["report_to"]  # a checkpoint written before the key existed
    changes = rerun.differences(before, to_dict(load_config(None, ["train.lr=1e-4"])))
    assert changes == {"train.lr": (2e-4, 1e-4)}, "absent keys count as defaults; cpus 0 is resolved later"
    assert [rerun.is_safe_to_change(key) for key in ("train.max_steps", "dist.zero_stage", "train.lr")] == [
        True,
        True,
        False,
    ]


def test_a_longer_run_keeps_a_warmup_that_max_steps_shortened():
    assert rerun.same_warmup_asked((2, 10), (2, 10))  # warmup 20 asked, shortened both times
    assert rerun.same_warmup_asked((2, 10), (2, 5))  # warmup 5 asked
    assert not rerun.same_warmup_asked((20, 30), (5, 10))  # warmup 5, then 10


def test_rerun_resumes_and_prints_safe_changes_and_asked_for_ones(tmp_path, shards, capsys):
    write_checkpoint(tmp_path, shards)
    assert rerun_of(tmp_path, shards).changes == {}
    assert "run r: resuming from step 2, settings unchanged\n" == capsys.readouterr().out

    rerun_of(tmp_path, shards, "train.max_steps=10", "dist.num_workers=1")
    out = capsys.readouterr().out
    assert out.startswith("run r: resuming from step 2, with changed settings (checkpoint -> now):\n")
    assert "  train.max_steps: 2 -> 10\n" in out and "  dist.num_workers: 2 -> 1\n" in out

    rerun_of(tmp_path, shards, "train.lr=1e-4", "storage.on_existing=resume_with_changes")
    assert "(checkpoint -> now):\n  train.lr: 0.003 -> 0.0001\n" in capsys.readouterr().out


def test_other_changes_are_refused_by_the_command_before_any_worker(tmp_path, shards):
    """Through the command line: the launch and its --check refuse, naming each key with its old and
    new value and the ways on; nothing is written to the run."""
    write_checkpoint(tmp_path, shards)
    changes = ("train.lr=1e-4", "degrade.noise_prob=0.5", "model.hash_rounds=2")
    for check in ([], ["--check"]):
        with pytest.raises(SystemExit) as exit_info:
            pretrain_main([*check, *args_for(tmp_path, shards, *changes)])
        message = str(exit_info.value.code)
        assert message.startswith("error: storage.run_name=r: resuming "), message
        for change in ("train.lr (0.003 -> 0.0001)", "degrade.noise_prob (1.0 -> 0.5)", "model.hash_rounds"):
            assert change in message, message
        assert "on_existing=resume_with_changes" in message and "storage.on_existing=restart" in message
    assert sorted(p.name for p in (tmp_path / "r").iterdir()) == ["step-00000002"]


def test_restart_moves_the_old_run_aside_and_starts_afresh(tmp_path, shards, capsys):
    """What launch does first with storage.on_existing=restart: the old run moves to
    <name>.replaced-<UTC time>, after which the name is new (a model of another shape is no problem)."""
    write_checkpoint(tmp_path, shards)
    restart = ("storage.on_existing=restart", "model.hash_rounds=2")
    cfg = with_absolute_paths(load_config(EMBEDDED_CONFIG, args_for(tmp_path, shards, *restart)))
    rerun.proceed(cfg, rerun.check_rerun(cfg), announce=print)
    (moved,) = tmp_path.glob("r.replaced-*")
    assert (moved / "step-00000002" / WEIGHTS).is_file()
    out = capsys.readouterr().out
    assert out.startswith("run r: restarting (storage.on_existing=restart): the old run moves to r.replaced-")
    assert f"the old run is now {moved}" in out
    assert rerun.check_rerun(cfg) is None and storage.list_names(str(tmp_path / "r")) == []


def test_check_prints_config_batches_and_memory_and_never_starts_ray(tmp_path, shards):
    """`--check` in a subprocess: exit 0, the resolved config, the run name's state, each phase's batches
    and memory estimate; no Ray cluster is started or joined. (A failing check: the refusal test above.)"""
    script = (
        "import sys, runpy; sys.argv[0] = 'kitdist.pretrain'; "
        "runpy.run_module('kitdist.pretrain', run_name='__main__'); "
        "print('ray started:', 'ray' in sys.modules and sys.modules['ray'].is_initialized())"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run(
        [sys.executable, "-c", script, "--check", *args_for(tmp_path, shards)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert out.startswith("resolved config:\nmodel:\n  size: debug\n"), out
    assert f"  train_shards: {shards}\n" in out and "  on_existing: resume\n" in out
    assert "run r: new\n" in out
    assert "steps 1..2: crop 32, global batch 4 = micro-batch 2 x accumulation 1 x 2 worker(s), ~" in out
    assert "MiB per worker" in out and out.endswith("ray started: False\n")
