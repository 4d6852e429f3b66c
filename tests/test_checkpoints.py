"""The run folder's format (kitdist.checkpoints): checkpoint names, which checkpoints are complete, how a
weights URL (a file, a checkpoint, a run; local or S3) resolves, and that a checkpoint written by the code
before the format had one owner (tests/data/checkpoint-cae7b4d, made by write_checkpoint_cae7b4d.py) still
loads: its weights, its training state, its RNG states, and as a model to restore with."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save

from kitdist import checkpoints, storage
from kitdist.checkpoints import (
    TRAIN_STATE,
    WEIGHTS,
    TrainState,
    WeightsError,
    WeightsNotFoundError,
    checkpoint_name,
    checkpoint_names,
    complete_checkpoints,
    latest_checkpoint,
    load_weights_url,
    newest_weights,
    read_resume_info,
    read_weights,
    step_of,
    weights_url,
)
from kitdist.config import ModelConfig, load_config
from kitdist.model import build_model

LEGACY_RUN = Path(__file__).parent / "data" / "checkpoint-cae7b4d"
LEGACY = LEGACY_RUN / "step-00000001"


RNG = "rng"  # write_checkpoint_files: every rank's RNG file of a two-worker run


def write_checkpoint_files(folder: str, step: int, *names: str, ranks: tuple[int, ...] = (0, 1)) -> str:
    """A checkpoint folder of a two-worker run holding the named files (tiny stand-ins: a one-tensor
    weights file; RNG: the RNG files of `ranks`)."""
    for name in names:
        if name == WEIGHTS:
            path = storage.join(folder, WEIGHTS)
            storage.write_bytes(path, save({"w": torch.full((2,), float(step))}))
        elif name == TRAIN_STATE:
            state = TrainState(step, 2, "deepspeed", 2, [{}, {}], {})
            storage.write_text(storage.join(folder, TRAIN_STATE), state.to_json())
        elif name == RNG:
            for rank in ranks:
                storage.write_bytes(checkpoints.rng_file(folder, rank), b"rng")
        else:
            storage.write_text(storage.join(folder, name), "{}")
    return folder


def a_run(root: str) -> str:
    """A run folder as a crash leaves it: complete step 2 and 3, step 4 without its training state,
    step 5 without its weights, step 6 without rank 1's RNG file (rank 1 died before its part was all
    uploaded), plus the run's other files."""
    run = storage.join(root, "run")
    write_checkpoint_files(storage.join(run, checkpoint_name(2)), 2, WEIGHTS, TRAIN_STATE, RNG)
    write_checkpoint_files(storage.join(run, checkpoint_name(3)), 3, WEIGHTS, TRAIN_STATE, RNG)
    write_checkpoint_files(storage.join(run, checkpoint_name(4)), 4, WEIGHTS, RNG)
    write_checkpoint_files(storage.join(run, checkpoint_name(5)), 5, TRAIN_STATE, RNG)
    write_checkpoint_files(storage.join(run, checkpoint_name(6)), 6, TRAIN_STATE, RNG, ranks=(0,))
    storage.write_text(storage.join(run, "latest"), checkpoint_name(3))
    storage.write_text(storage.join(run, "metrics", "metrics.jsonl"), "")
    return run


def test_names_and_steps_round_trip():
    assert checkpoint_name(600) == "step-00000600"
    assert [step_of(checkpoint_name(step)) for step in (0, 7, 123_456_789)] == [0, 7, 123_456_789]
    assert step_of("s3://bucket/runs/r/step-00000042/") == 42
    assert [step_of(name) for name in ("latest", "metrics", "step-", "step-12a", "xstep-1")] == [None] * 5


def test_checkpoints_are_ordered_by_step_not_by_name(tmp_path):
    """Past 10^8 steps the names grow a digit: "step-100000000" sorts before "step-99999999" as text."""
    run = str(tmp_path / "run")
    for step in (99_999_999, 100_000_000, 5):
        write_checkpoint_files(storage.join(run, checkpoint_name(step)), step, WEIGHTS, TRAIN_STATE, RNG)
    assert checkpoint_names(run) == [checkpoint_name(s) for s in (5, 99_999_999, 100_000_000)]
    assert latest_checkpoint(run) == storage.join(run, checkpoint_name(100_000_000))


def test_latest_complete_checkpoint_skips_folders_cut_short(tmp_path):
    run = a_run(str(tmp_path))
    assert checkpoint_names(run) == [checkpoint_name(step) for step in (2, 3, 4, 5, 6)]
    assert complete_checkpoints(run) == [storage.join(run, checkpoint_name(step)) for step in (2, 3)]
    assert latest_checkpoint(run) == storage.join(run, checkpoint_name(3))
    assert newest_weights(run) == storage.join(run, checkpoint_name(4), WEIGHTS)  # weights are all it needs


def test_a_run_resumes_from_its_newest_complete_checkpoint_whatever_ray_registered(tmp_path):
    """One rule after a restart and a rerun: the run folder's newest complete checkpoint; Ray's
    registered one only when newer (a folder listing behind) or when the folder cannot be read."""
    run = a_run(str(tmp_path))
    newest = storage.join(run, checkpoint_name(3))
    assert checkpoints.resume_from(run) == newest
    assert checkpoints.resume_from(run, registered=storage.join(run, checkpoint_name(2))) == newest
    assert checkpoints.resume_from(run, registered=storage.join(run, checkpoint_name(9))).endswith(
        "step-00000009"
    )
    assert checkpoints.resume_from(str(tmp_path / "none")) is None
    assert (
        checkpoints.resume_from(str(tmp_path / "none"), registered="/r/step-00000002") == "/r/step-00000002"
    )
    assert (
        checkpoints.resume_from("nosuchscheme://x/run", registered="/r/step-00000002") == "/r/step-00000002"
    )
    assert (
        checkpoints.checkpoint_in_run("s3://b/runs/r", "b/runs/r/step-00000003")
        == f"s3://b/runs/r/{checkpoint_name(3)}"
    )


def test_a_run_without_checkpoints_has_no_latest(tmp_path):
    assert latest_checkpoint(str(tmp_path / "absent")) is None and newest_weights(str(tmp_path)) == ""


def test_weights_url_of_a_file_a_checkpoint_and_a_run(tmp_path):
    run = a_run(str(tmp_path))
    bare = str(tmp_path / "bare.safetensors")
    assert weights_url(bare) == bare  # a file is taken as it is (its absence shows when it is read)
    assert weights_url(storage.join(run, checkpoint_name(4))) == storage.join(
        run, checkpoint_name(4), WEIGHTS
    )
    assert weights_url(run) == storage.join(run, checkpoint_name(4), WEIGHTS)
    assert load_weights_url(run)["w"].tolist() == [4.0, 4.0]


def test_missing_and_damaged_weights_name_the_url(tmp_path):
    with pytest.raises(
        WeightsNotFoundError, match=f"{tmp_path}/nothing: no weights.safetensors here"
    ) as info:
        weights_url(str(tmp_path / "nothing"))
    assert isinstance(info.value, FileNotFoundError)  # the launcher's "no retry can fix it"
    with pytest.raises(WeightsNotFoundError, match="gone.safetensors: weights file not found"):
        load_weights_url(str(tmp_path / "gone.safetensors"))
    damaged = tmp_path / "damaged.safetensors"
    damaged.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}......")
    with pytest.raises(WeightsError, match="damaged.safetensors: not a readable safetensors file"):
        load_weights_url(str(damaged))


@pytest.mark.s3
def test_run_on_s3_resolves_and_loads(s3_env):
    run = a_run(s3_env)
    assert latest_checkpoint(run) == f"{s3_env}/run/{checkpoint_name(3)}"
    assert load_weights_url(run)["w"].tolist() == [4.0, 4.0]
    assert read_weights(latest_checkpoint(run))["w"].tolist() == [3.0, 3.0]


def test_run_url_is_the_root_and_the_run_name():
    cfg = load_config(None, ["storage.root=s3://bucket/runs/", "storage.run_name=r1"])
    assert checkpoints.run_url(cfg) == "s3://bucket/runs/r1"


def test_train_state_round_trips_and_names_a_bad_file(tmp_path):
    state = TrainState(7, 2, "deepspeed", 2, [{"rank": 0}, {"rank": 1}], {"optimizer_step": 7})
    assert TrainState.from_json(state.to_json(), source="x") == state
    (tmp_path / TRAIN_STATE).write_text('{"step": 1}')
    with pytest.raises(ValueError, match=f"{tmp_path}/{TRAIN_STATE}: not a kitdist train_state.json"):
        read_resume_info(tmp_path)


# --- a checkpoint written before the change (commit cae7b4d) ----------------------------------------------


def test_checkpoint_written_before_the_change_still_loads():
    state = read_resume_info(LEGACY)
    assert (state.step, state.world_size, state.strategy, state.zero_stage) == (1, 1, "ddp", 0)
    assert state.data_states[0]["format"] == "kitdist-stream/1" and state.optimizer["optimizer_step"] == 1
    legacy = json.loads((LEGACY / TRAIN_STATE).read_text())
    assert json.loads(state.to_json()) == {**legacy, "batching": {}}  # nothing dropped (batching: issue 15)
    model = build_model(ModelConfig(size="debug_v1"))  # `debug` before the paper's skeleton
    model.load_state_dict(read_weights(LEGACY), strict=True)
    assert latest_checkpoint(str(LEGACY_RUN)) == str(LEGACY) and weights_url(str(LEGACY_RUN)).endswith(
        "step-00000001/weights.safetensors"
    )


def test_checkpoint_written_before_the_change_restores_rng_and_images():
    from kitdist.inference import load_restorer
    from kitdist.train.checkpoint import restore_rng

    torch.manual_seed(123)
    assert restore_rng(LEGACY, rank=0) and not restore_rng(LEGACY, rank=1)
    restorer = load_restorer(str(LEGACY_RUN), device="cpu")  # config.yaml says debug, the shapes debug_v1
    assert restorer.size_name == "debug_v1" and restorer.weights_url == str(LEGACY / WEIGHTS)
    restored = restorer.restore(torch.rand(40, 48, 3).numpy())
    assert restored.shape == (40, 48, 3)


@pytest.fixture(scope="module")
def written_now(tmp_path_factory):
    """A checkpoint written by today's code after one step of a `debug` KiT, and the engine that wrote it."""
    from kitdist.train.checkpoint import write_checkpoint
    from kitdist.train.engine import build_strategy

    cfg = load_config(None, ["model.size=debug", "dist.strategy=ddp", "dist.zero_stage=0"])
    torch.manual_seed(0)
    trained = build_strategy(cfg, build_model(cfg.model), torch.device("cpu"))
    trained.train(True)
    images = torch.rand(2, 3, 32, 32)
    trained.backward((trained.forward(images) - images).abs().mean(), last_micro_batch=True)
    trained.step()
    folder = tmp_path_factory.mktemp("now") / checkpoint_name(1)
    write_checkpoint(folder, cfg, trained, 1, [{"rank": 0}], rank=0, world_size=1)
    return cfg, folder, trained


def test_checkpoint_written_now_has_the_format_of_before(written_now):
    _, folder, _ = written_now
    files = {path.relative_to(folder).as_posix() for path in folder.rglob("*") if path.is_file()}
    before = {path.relative_to(LEGACY).as_posix() for path in LEGACY.rglob("*") if path.is_file()}
    assert files == before | {"optimizer.safetensors"}  # the fixture leaves its 3.5 MB of Adam moments out
    written, legacy = (json.loads((f / TRAIN_STATE).read_text()) for f in (folder, LEGACY))
    assert list(written) == [*legacy, "batching"]  # the step's micro-batch, accumulation, crop: issue 15
    assert list(written["optimizer"]) == list(legacy["optimizer"])
    assert read_weights(folder).keys() == read_weights(LEGACY).keys()


def test_checkpoint_written_now_restores_the_whole_training_state(written_now):
    """Weights into the model, then the optimizer and schedule into the engine: the state written is the
    state restored (the world-size-independent path, as after a change of world size or engine)."""
    from kitdist.train.checkpoint import restore_strategy
    from kitdist.train.engine import build_strategy

    cfg, folder, trained = written_now
    model = build_model(cfg.model)
    model.load_state_dict(read_weights(folder))
    restored = build_strategy(cfg, model, torch.device("cpu"))
    assert restore_strategy(folder, cfg, restored, world_size=1) == "full"
    before, after = trained.full_state(), restored.full_state()
    for name, tensor in [*before.weights.items(), *before.moments.items()]:
        assert torch.equal(tensor, {**after.weights, **after.moments}[name]), name
    assert after.meta == before.meta and read_resume_info(folder).data_states == [{"rank": 0}]
