"""Configs that cannot run fail on the driver, before any worker starts, with one message naming the key
(or the URL)."""

from __future__ import annotations

import pytest
import yaml

from kitdist.config import load_config
from kitdist.finetune import main as finetune_main
from kitdist.pretrain import main as pretrain_main


def fails_with(main, args: list[str]) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert isinstance(exit_info.value.code, str), "expected an error message, not a bare exit status"
    return exit_info.value.code


@pytest.mark.parametrize(
    "override, key",
    [
        ("data.crop_size=48", "data.crop_size"),
        ("data.global_batch_size=3", "data.global_batch_size"),
        ("dist.zero_stage=4", "dist.zero_stage"),
        ("train.precision=fp16", "train.precision"),
        ("train.losss=l1", "train.losss"),
    ],
)
def test_bad_config_names_the_key(override, key):
    message = fails_with(pretrain_main, ["data.train_shards=/nowhere", override])
    assert key in message and "command line" in message


def test_missing_dataset_url(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("train:\n  max_steps: 20\n")
    message = fails_with(pretrain_main, ["--config", str(config)])
    assert "data.train_shards" in message


def test_dataset_without_manifest_names_the_url(tmp_path):
    message = fails_with(pretrain_main, [f"data.train_shards={tmp_path}/none"])
    assert f"{tmp_path}/none/manifest.json" in message


def test_finetune_needs_pretrained_weights_and_a_restoration_to_learn(tmp_path, capsys):
    """Pairs, or clean shards with a degradation drawn each step (a Gaussian denoiser at one sigma); clean
    shards with every degradation off would teach the identity, and are refused before any worker."""
    from safetensors.torch import save_file

    from kitdist.model import build_model
    from kitdist.pretrain import ensure_photo_shards

    train_url, _ = ensure_photo_shards(str(tmp_path / "shards"))
    weights = tmp_path / "weights.safetensors"
    save_file(build_model(load_config(None, ["model.size=debug"]).model).state_dict(), str(weights))
    config = tmp_path / "ft.yaml"
    config.write_text(f"model:\n  size: debug\ndata:\n  train_shards: {train_url}\n  kind: clean\n")
    base = ["--config", str(config), f"storage.root={tmp_path / 'runs'}"]
    assert "train.init_weights" in fails_with(finetune_main, base)
    base.append(f"train.init_weights={weights}")
    message = fails_with(finetune_main, [*base, "degrade.noise_prob=0"])
    assert message.startswith("error: data.kind:") and "degrade.noise_prob" in message
    finetune_main(["--check", *base, "degrade.noise_sigma=[25,25]"])
    assert "  noise_sigma:\n  - 25.0\n  - 25.0\n" in capsys.readouterr().out  # the resolved config


def test_unreachable_storage_fails_fast_naming_the_url(tmp_path, monkeypatch):
    import time

    from s3server import free_port

    from kitdist.pretrain import ensure_photo_shards

    train_url, _ = ensure_photo_shards(str(tmp_path / "shards"))
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "x")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "y")
    start = time.monotonic()
    message = fails_with(pretrain_main, [f"data.train_shards={train_url}", "storage.root=s3://nobucket/runs"])
    assert "s3://nobucket/runs" in message
    assert time.monotonic() - start < 120


def test_help_lists_the_shipped_configs_by_names_that_load(capsys):
    with pytest.raises(SystemExit):
        pretrain_main(["--help"])
    out = capsys.readouterr().out
    assert "\n  pretrain/debug\n" in out and "section.key=value" in out
    assert load_config("pretrain/debug").model.size == "debug"


def test_no_arguments_run_the_embedded_default_as_before(tmp_path, monkeypatch):
    """`python -m kitdist.pretrain` with no arguments builds the photographs' shards under the working
    directory and hands the launcher the config that main resolved before the embedded default became
    configs/pretrain/embedded.yaml (tests/data/embedded-config-cae7b4d.yaml, written by that code)."""
    from test_config import DATA, meaning, same_keys

    launched = []
    monkeypatch.setattr(
        "kitdist.launch.run_or_exit", lambda cfg, fine_tune, **_: launched.append((cfg, fine_tune))
    )
    monkeypatch.chdir(tmp_path)
    pretrain_main([])
    (cfg, fine_tune), before = (
        launched[0],
        yaml.safe_load((DATA / "embedded-config-cae7b4d.yaml").read_text()),
    )
    assert same_keys(meaning(cfg), before) == before and not fine_tune
    assert (tmp_path / cfg.data.train_shards / "manifest.json").is_file()
    assert (tmp_path / cfg.data.val_shards / "manifest.json").is_file()
    pretrain_main(["data.val_shards=", "train.max_steps=60"])  # the user's overrides still win
    assert launched[1][0].data.val_shards == "" and launched[1][0].train.max_steps == 60


def test_finetune_is_the_training_command_with_its_requirements(capsys):
    with pytest.raises(SystemExit):
        finetune_main(["--help"])
    out = capsys.readouterr().out
    assert "python -m kitdist.pretrain" in out and "\n  finetune/sidd\n" in out
    assert "data.kind: paired" in out and "train.init_weights" in out
    assert "--config" in fails_with(finetune_main, ["train.max_steps=5"])


def test_torchrun_says_where_check_is():
    from kitdist.torchrun import main as torchrun_main

    assert "kitdist.pretrain --check" in fails_with(torchrun_main, ["--check"])
