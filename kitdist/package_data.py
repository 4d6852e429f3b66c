"""The files kitdist ships beside its code: run configs (`configs/`) and dataset recipes (`shards/`).

Both are package data, found next to this module whether kitdist runs from a checkout (where
`kitdist/configs` and `kitdist/recipes` are links to the repository's `configs/` and `shards/`) or from an
installed wheel (which holds them as real files), so they never depend on the working directory. A shipped
config has a name that works from any folder, `pretrain/debug`; `configs/pretrain/debug.yaml`, the path
the repository's docs use, names the same file.
"""

from __future__ import annotations

from pathlib import Path

PACKAGE_ROOT = Path(__file__).resolve().parent
CONFIG_ROOT = PACKAGE_ROOT / "configs"
RECIPE_ROOT = PACKAGE_ROOT / "recipes"


def config_names(kind: str = "*") -> list[str]:
    """Names of the shipped configs (`pretrain/debug`, ...), of one kind (a folder: pretrain, finetune,
    pipeline) or of all."""
    return sorted(path.relative_to(CONFIG_ROOT).with_suffix("").as_posix() for path in _configs(kind))


def shipped_config(name: str | Path) -> Path | None:
    """The shipped config that `name` means: `pretrain/debug`, `pretrain/debug.yaml` or
    `configs/pretrain/debug.yaml`; None when it names none."""
    text = Path(name).as_posix().removeprefix("./").removeprefix("configs/").removesuffix(".yaml")
    return CONFIG_ROOT / f"{text}.yaml" if text in config_names() else None


def recipe_names() -> list[str]:
    return sorted(path.stem for path in RECIPE_ROOT.glob("*.yaml"))


def recipe_path(name: str) -> Path | None:
    """The shipped recipe `name` (`folder`, `sidd`, ...); None when there is none of that name."""
    return RECIPE_ROOT / f"{name}.yaml" if name in recipe_names() else None


def _configs(kind: str) -> list[Path]:
    return list(CONFIG_ROOT.glob(f"{kind}/*.yaml"))
