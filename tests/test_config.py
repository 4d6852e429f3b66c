"""The config schema: YAML + overrides load into typed sections; bad input fails naming key and source."""

from __future__ import annotations

from pathlib import Path

import pytest

from kitdist.config import ConfigError, RunConfig, dump_yaml, from_dict, load_config, to_dict

# Run configs; configs/pipeline/ holds coordinator pipelines, checked by the coordinator's tests.
CONFIGS = sorted(
    path
    for path in Path(__file__).parent.parent.joinpath("configs").rglob("*.yaml")
    if path.parent.name != "pipeline"
)


def test_defaults_load_and_round_trip():
    cfg = load_config()
    assert isinstance(cfg, RunConfig)
    assert from_dict(RunConfig, to_dict(cfg)) == cfg


def test_overrides_are_typed(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("train:\n  lr: 1.0e-3\n  max_steps: 20\nmodel:\n  size: kit\n")
    cfg = load_config(path, ["train.lr=5e-4", "degrade.noise_sigma=[10, 20]", "model.look_back=true"])
    assert cfg.train.lr == 5e-4 and cfg.train.max_steps == 20
    assert cfg.degrade.noise_sigma == (10.0, 20.0)
    assert cfg.model.size == "kit" and cfg.model.look_back is True


@pytest.mark.parametrize(
    "override, key",
    [
        ("data.crop_size=50", "data.crop_size"),
        ("model.chunk_size=0", "model.chunk_size"),
        ("dist.zero_stage=4", "dist.zero_stage"),
        ("train.lr=fast", "train.lr"),
        ("train.max_steps=1.5", "train.max_steps"),
        ("model.attention_impl=flash", "model.attention_impl"),
        ("model.colour=red", "model.colour"),
        ("data.global_batch_size=3", "data.global_batch_size"),
        ("train.precision=fp16", "train.precision"),
    ],
)
def test_bad_override_names_key_and_source(override, key):
    with pytest.raises(ConfigError) as info:
        load_config(None, [override])
    assert str(info.value).startswith(f"command line: {key}:")


def test_bad_file_value_names_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("data:\n  crop_size: 48\n")
    with pytest.raises(ConfigError, match=rf"^{path}: data.crop_size: must be a positive multiple of 32"):
        load_config(path)


def test_unknown_section_and_missing_file(tmp_path):
    path = tmp_path / "typo.yaml"
    path.write_text("trian:\n  lr: 1\n")
    with pytest.raises(ConfigError, match="trian: unknown key"):
        load_config(path)
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "absent.yaml")


def test_malformed_override():
    with pytest.raises(ConfigError, match="expected section.key=value"):
        load_config(None, ["train.lr"])


@pytest.mark.parametrize("path", CONFIGS, ids=[f"{p.parent.name}/{p.name}" for p in CONFIGS])
def test_shipped_configs_load(path):
    cfg = load_config(path)
    assert load_config(None, []) is not cfg
    assert dump_yaml(cfg)


def test_warmup_longer_than_a_short_run_follows_max_steps_and_says_so_once(capsys):
    """The embedded default's warm-up (20 steps) with `train.max_steps=6`: the run warms up over its 6
    steps, and one note on stderr says so (not once per config built in the process)."""
    from kitdist.pretrain import EMBEDDED

    cfg = load_config(None, [*EMBEDDED, "train.max_steps=6"])
    again = load_config(None, [*EMBEDDED, "train.max_steps=6"])
    assert cfg.train.warmup_steps == again.train.warmup_steps == 6
    assert from_dict(RunConfig, to_dict(cfg)) == cfg  # what travels to the workers says nothing more
    notes = [line for line in capsys.readouterr().err.splitlines() if "train.warmup_steps" in line]
    assert len(notes) == 1 and "train.max_steps=6" in notes[0]
    with pytest.raises(ConfigError, match="train.warmup_steps: must be >= 0"):
        load_config(None, ["train.warmup_steps=-1"])
