"""Everything checkable on the driver is checked there, before Ray starts: one test per class of error
(a model setting, weights that do not fit the model, missing weights, a checkpoint of another model in the
run being resumed, a data set too small for its batches), each naming the key, file or URL."""

from __future__ import annotations

import pytest
import shardkit
import torch
from safetensors.torch import save_file

from kitdist.config import ConfigError, ModelConfig, load_config
from kitdist.model import build_model
from kitdist.preflight import check_launchable


@pytest.fixture(scope="module")
def shards(tmp_path_factory, photo_paths) -> str:
    folder = str(tmp_path_factory.mktemp("preflight-shards"))
    shardkit.write_set(folder, photo_paths, [8, 8], tile=64)
    return folder


def run_config(tmp_path, shards: str, *overrides: str):
    base = [f"data.train_shards={shards}", f"storage.root={tmp_path / 'runs'}", "storage.run_name=r"]
    return load_config(None, [*base, "data.num_workers=0", "data.global_batch_size=4", *overrides])


def weights_of(size: str, path) -> str:
    save_file({k: v.contiguous() for k, v in build_model(ModelConfig(size=size)).state_dict().items()}, path)
    return str(path)


def test_a_good_run_passes(tmp_path, shards):
    check_launchable(
        run_config(tmp_path, shards, "train.init_weights=" + weights_of("debug", tmp_path / "w.safetensors"))
    )


def test_model_setting_only_the_model_checks_fails_on_the_driver(tmp_path, shards):
    """`model.size=huge` used to be refused only inside the workers, after Ray had started, 4 times."""
    with pytest.raises(ConfigError, match=r"model\.size: unknown size 'huge'"):
        check_launchable(run_config(tmp_path, shards, "model.size=huge"))


def test_model_setting_is_refused_by_the_command_before_ray_starts(tmp_path, shards):
    ray = pytest.importorskip("ray")
    from kitdist.pretrain import main

    was_up = ray.is_initialized()
    with pytest.raises(SystemExit) as info:
        main([f"data.train_shards={shards}", f"storage.root={tmp_path}", "model.size=huge"])
    assert str(info.value.code).startswith("error: ") and "model.size" in str(info.value.code)
    assert "\n" not in str(info.value.code) and ray.is_initialized() == was_up


def test_init_weights_of_another_shape_name_the_file_and_a_parameter(tmp_path, shards):
    url = weights_of("small", tmp_path / "small.safetensors")
    with pytest.raises(ConfigError) as info:
        check_launchable(run_config(tmp_path, shards, f"train.init_weights={url}"))
    message = str(info.value)
    assert message.startswith("train.init_weights:") and url in message and "parameter " in message
    assert message.endswith("they fit model.size='small'")  # the size to ask for instead


def test_missing_init_weights_name_the_url(tmp_path, shards):
    with pytest.raises(
        FileNotFoundError, match=f"train.init_weights: .*{tmp_path}/absent/weights.safetensors"
    ):
        check_launchable(run_config(tmp_path, shards, f"train.init_weights={tmp_path / 'absent'}"))


def test_resuming_a_run_of_another_model_is_refused(tmp_path, shards):
    step = tmp_path / "runs" / "r" / "step-00000004"
    step.mkdir(parents=True)
    weights_of("small", step / "weights.safetensors")
    with pytest.raises(ConfigError, match=r"storage.run_name=r \(resuming\).*step-00000004"):
        check_launchable(run_config(tmp_path, shards))
    check_launchable(run_config(tmp_path, shards, "model.size=small"))  # the same model resumes


def test_data_set_too_small_for_its_batches_names_the_set(tmp_path, shards):
    """16 samples in global batches of 16 give each of the 2 ranks one batch per epoch, but its 2 data
    workers each need one: the workers would refuse the set; the driver does first."""
    cfg = run_config(tmp_path, shards, "data.global_batch_size=16", "data.num_workers=2")
    with pytest.raises(ConfigError, match=rf"data.train_shards: {shards} holds 16 samples"):
        check_launchable(cfg)


def test_weights_header_is_read_without_the_tensors(tmp_path):
    from kitdist.preflight import weights_shapes

    path = tmp_path / "w.safetensors"
    save_file({"a": torch.zeros(3, 4), "b": torch.zeros(2)}, str(path))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 40])  # the tensors cut short: the header is all that is read
    assert weights_shapes(str(path)) == {"a": (3, 4), "b": (2,)}
    path.write_bytes(b"not safetensors")
    with pytest.raises(ConfigError, match="not a readable safetensors"):
        weights_shapes(str(path))


def test_errors_no_retry_can_fix_become_one_line_in_a_worker(tmp_path):
    """What a worker raises for them (kitdist.failures): a ConfigError keeps its message, torch refusing
    weights of another shape becomes one line naming the first parameter, other errors pass unchanged
    (Ray Train restarts the workers for those)."""
    from kitdist.failures import Unrecoverable, unrecoverable_as_one_line

    with pytest.raises(Unrecoverable, match=r"^model\.size: unknown size 'huge'"):
        with unrecoverable_as_one_line():
            check_launchable(run_config(tmp_path, "/nowhere", "model.size=huge"))
    with pytest.raises(Unrecoverable) as info:
        with unrecoverable_as_one_line():
            small = build_model(ModelConfig(size="small")).state_dict()
            build_model(ModelConfig(size="debug")).load_state_dict(small)
    assert "\n" not in str(info.value) and "the weights do not fit the model" in str(info.value)
    assert "size mismatch for " in str(info.value) and len(str(info.value)) < 400
    with pytest.raises(ConnectionError):
        with unrecoverable_as_one_line():
            raise ConnectionError("a storage hiccup: retried")
