"""The config schema: YAML + overrides load into typed sections; bad input fails naming key and source."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from kitdist.config import ConfigError, RunConfig, dump_yaml, from_dict, load_config, to_dict
from kitdist.config_loader import as_overrides, override, replace_values

ROOT = Path(__file__).parent.parent
DATA = Path(__file__).parent / "data"
# Run configs; configs/pipeline/ holds coordinator pipelines, checked by the coordinator's tests.
CONFIGS = sorted(path for path in ROOT.joinpath("configs").rglob("*.yaml") if path.parent.name != "pipeline")
# Every config under configs/ as main resolved it before the embedded default became a file (cae7b4d).
BEFORE = yaml.safe_load((DATA / "configs-cae7b4d.yaml").read_text())


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


def test_a_shipped_config_loads_by_name_from_any_folder_and_a_users_file_wins(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    debug = load_config(ROOT / "configs/pretrain/debug.yaml")
    for name in ("pretrain/debug", "pretrain/debug.yaml", "configs/pretrain/debug.yaml"):
        assert load_config(name) == debug
    (tmp_path / "pretrain").mkdir()
    (tmp_path / "pretrain/debug.yaml").write_text("train:\n  max_steps: 7\n")
    assert load_config("pretrain/debug.yaml").train.max_steps == 7  # the user's own file
    with pytest.raises(ConfigError, match=r"^pretrain/nope: config file not found.*pretrain/debug, "):
        load_config("pretrain/nope")


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
    from kitdist.pretrain import EMBEDDED_CONFIG

    cfg = load_config(EMBEDDED_CONFIG, ["train.max_steps=6"])
    again = load_config(EMBEDDED_CONFIG, ["train.max_steps=6"])
    assert cfg.train.warmup_steps == again.train.warmup_steps == 6
    assert from_dict(RunConfig, to_dict(cfg)) == cfg  # what travels to the workers says nothing more
    notes = [line for line in capsys.readouterr().err.splitlines() if "train.warmup_steps" in line]
    assert len(notes) == 1 and "train.max_steps=6" in notes[0]
    with pytest.raises(ConfigError, match="train.warmup_steps: must be >= 0"):
        load_config(None, ["train.warmup_steps=-1"])


def same_keys(tree, like):
    """`tree` cut down to the keys `like` has (keys added to the schema since do not count)."""
    if isinstance(like, list) and isinstance(tree, list) and len(like) == len(tree):
        return [same_keys(item, like_item) for item, like_item in zip(tree, like, strict=True)]
    if not isinstance(like, dict):
        return tree
    return {key: same_keys(tree.get(key), value) for key, value in like.items()}


def meaning(cfg: RunConfig) -> dict:
    """The config as a run reads it: `train.grad_accum_steps` 0 (derived, the default since issue 15)
    counts as the accumulation it derives, so an old config's 1 compares equal where it derives 1."""
    from kitdist.batching import plan_run

    tree = to_dict(cfg)
    tree["train"]["grad_accum_steps"] = plan_run(cfg, cfg.dist.num_workers)[0].grad_accum
    return tree


@pytest.mark.parametrize("name", sorted(BEFORE))
def test_configs_mean_what_they_meant(name):
    """Every config that shipped before still loads, to the same values (pipelines through the
    coordinator's loader, which shares the strict one)."""
    from kitdist.coordinator.spec import load_pipeline

    path = ROOT / name
    now = to_dict(load_pipeline(path)) if path.parent.name == "pipeline" else meaning(load_config(path))
    assert same_keys(now, BEFORE[name]) == BEFORE[name]


def test_embedded_default_resolves_as_before():
    """configs/pretrain/embedded.yaml with the photo shards the command adds resolves to what the
    key=value list it replaced resolved to, and the config.yaml that code wrote beside its checkpoints
    loads to the same config (the command itself: test_train_config.py)."""
    from kitdist.pretrain import EMBEDDED_CONFIG, EMBEDDED_DATA

    before_text = (DATA / "embedded-config-cae7b4d.yaml").read_text()
    before = yaml.safe_load(before_text)
    assert not load_config(EMBEDDED_CONFIG).data.train_shards  # what makes the command add the shards
    shards = {f"data.{split}_shards": f"{EMBEDDED_DATA}/{split}" for split in ("train", "val")}
    cfg = load_config(EMBEDDED_CONFIG, values=shards)
    assert same_keys(meaning(cfg), before) == before
    assert meaning(from_dict(RunConfig, before)) == meaning(cfg)
    with pytest.raises(ConfigError, match=r"^command line: train.lr"):  # the user's overrides come last
        load_config(EMBEDDED_CONFIG, ["train.lr=fast"], values=shards)


def test_typed_changes_are_checked_and_name_the_key():
    cfg = load_config(None, ["train.max_steps=30"])
    changed = replace_values(cfg, {"data.kind": "paired", "degrade.noise_sigma": (25, 25)})
    assert changed.data.kind == "paired" and changed.degrade.noise_sigma == (25.0, 25.0)
    assert changed.train == cfg.train and cfg.data.kind == "clean"  # frozen: the original is unchanged
    with pytest.raises(ConfigError, match=r"^data.crop_size: must be a positive multiple of 32"):
        replace_values(cfg, {"data.crop_size": 48})
    with pytest.raises(ConfigError, match=r"^command line: train.lr: expected float"):
        override(cfg, ["train.lr=fast"])
    with pytest.raises(ConfigError, match="data.colour: unknown key"):
        replace_values(cfg, {"data.colour": "red"})


def test_overrides_written_from_values_read_back_as_those_values():
    values = {
        "storage.root": "/tmp/a: b #c",  # YAML-special characters stay one string
        "storage.run_name": "123",  # looks like a number, stays a string
        "data.train_shards": "s3://bucket/set/train",
        "degrade.noise_sigma": (25.0, 25.0),
        "train.lr": 3e-3,
        "model.look_back": None,
        "train.init_weights": "",
    }
    cfg = load_config(None, as_overrides(values))
    assert cfg == replace_values(load_config(), values)
    assert cfg.storage.run_name == "123" and cfg.storage.root == "/tmp/a: b #c"


def test_evaluation_config_is_the_training_runs_own_changed_by_value(tmp_path, photo_paths):
    """`kitdist.evaluate` measures with the config.yaml beside the weights (its degradations), pointed
    at the test shards, whole images; the user's overrides come last and their errors name the command
    line. Bare weights get the default config of their model size."""
    from safetensors.torch import save_model

    from kitdist.evaluate import eval_config
    from kitdist.inference import load_restorer
    from kitdist.model import build_model
    from kitdist.shards import build_shards

    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / photo_paths[0].name).symlink_to(photo_paths[0])
    shards = str(tmp_path / "shards")
    build_shards("folder", tmp_path / "photos", shards, progress=False)
    trained = load_config(None, ["degrade.blur_prob=0.5", "data.val_crop_size=64", "data.num_workers=2"])
    save_model(build_model(trained.model), str(tmp_path / "weights.safetensors"))
    (tmp_path / "config.yaml").write_text(dump_yaml(trained))

    cfg = eval_config(load_restorer(str(tmp_path), None, "cpu"), shards, ["degrade.noise_sigma=[25,25]"], 3)
    assert cfg.degrade.blur_prob == 0.5 and cfg.degrade.noise_sigma == (25.0, 25.0)
    assert (cfg.data.val_shards, cfg.data.kind, cfg.data.val_crop_size) == (shards, "clean", 0)
    assert (cfg.data.num_workers, cfg.data.max_val_samples) == (0, 3)
    with pytest.raises(ConfigError, match=r"^command line: degrade.noise_sigma"):
        eval_config(load_restorer(str(tmp_path), None, "cpu"), shards, ["degrade.noise_sigma=25"], 0)
    (tmp_path / "config.yaml").unlink()
    bare = eval_config(load_restorer(str(tmp_path), None, "cpu"), shards, [], 0)
    assert bare == load_config(
        None, [f"data.val_shards={shards}", "data.val_crop_size=0", "data.num_workers=0"]
    )
