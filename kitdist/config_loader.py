"""The strict loader under every kitdist config: YAML files and `section.key=value` overrides into frozen
dataclasses, and typed changes to a config already built. Every error names the key and where it came
from (the file or the command line); nothing here knows a run's schema (that is `kitdist.config`).

    >>> cfg = load(RunConfig, "configs/pretrain/debug.yaml", ["train.lr=1e-4"])
    >>> cfg = replace_values(cfg, {"data.val_shards": "s3://b/val", "data.num_workers": 0})

A config crosses a process boundary as a file or as command-line overrides; `as_overrides` writes the
latter from typed values (YAML-quoted, so they read back as the same values).
"""

from __future__ import annotations

import dataclasses
import sys
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, Union

import yaml

COMMAND_LINE = "command line"  # the source named by errors in overrides


class ConfigError(ValueError):
    """A config that cannot run; the message names the key and where it came from."""

    def __init__(self, message: str, key: str = "") -> None:
        super().__init__(message)
        self.key = key


def fail(key: str, message: str) -> typing.NoReturn:
    raise ConfigError(f"{key}: {message}", key=key)


_NOTED: set[str] = set()


def note(message: str) -> None:
    """Tells the user (on stderr, once per process) about a value the config adjusted for them."""
    if message not in _NOTED:
        _NOTED.add(message)
        print(message, file=sys.stderr, flush=True)


def load(
    cls: type, path: str | Path | None = None, overrides: Sequence[str] = (), values: Mapping[str, Any] = {}
) -> Any:
    """Builds dataclass `cls` from an optional YAML file, then typed `values` by dotted key (what a program
    adds to a file), then `section.key=value` overrides (YAML values: the user's, so they win)."""
    tree = read_yaml(Path(path)) if path is not None else {}
    _set_values(tree, values)
    overridden = {_apply_override(tree, item) for item in overrides}
    return _build(cls, tree, overridden, str(path) if path is not None else COMMAND_LINE)


def override(cfg: Any, overrides: Sequence[str]) -> Any:
    """`cfg` with command-line `section.key=value` overrides applied; errors name the command line."""
    tree = to_dict(cfg)
    overridden = {_apply_override(tree, item) for item in overrides}
    return _build(type(cfg), tree, overridden, COMMAND_LINE)


def replace_values(cfg: Any, values: Mapping[str, Any]) -> Any:
    """`cfg` with typed values set by dotted key (`{"data.kind": "paired"}`), checked like a file's."""
    tree = to_dict(cfg)
    _set_values(tree, values)
    return from_dict(type(cfg), tree)


def as_overrides(values: Mapping[str, Any]) -> list[str]:
    """Command-line overrides that `load` reads back as exactly these values."""
    return [f"{dotted}={_yaml_scalar(_plain(value))}" for dotted, value in values.items()]


def from_dict(cls: type, tree: dict[str, Any], prefix: str = "") -> Any:
    """Turns a nested dict into dataclass `cls`, failing on unknown keys and wrong types."""
    if not isinstance(tree, dict):
        fail(prefix.rstrip(".") or "<top>", f"expected a mapping, got {type(tree).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(tree) - names)
    if unknown:
        fail(f"{prefix}{unknown[0]}", f"unknown key (known keys: {', '.join(sorted(names))})")
    values = {name: _coerce(hints[name], value, f"{prefix}{name}") for name, value in tree.items()}
    return cls(**values)


def to_dict(cfg: Any) -> dict[str, Any]:
    """The plain-data form of a config (tuples as lists), as written beside every checkpoint."""
    return _plain(dataclasses.asdict(cfg))


def dump_yaml(cfg: Any) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        tree = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    if not isinstance(tree, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections")
    return tree


def _build(cls: type, tree: dict[str, Any], overridden: set[str], source: str) -> Any:
    try:
        return from_dict(cls, tree)
    except ConfigError as err:
        where = COMMAND_LINE if err.key in overridden else source
        raise ConfigError(f"{where}: {err}", key=err.key) from None


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _yaml_scalar(value: Any) -> str:
    text = yaml.safe_dump(value, default_flow_style=True, width=2**31)
    return text.strip().removesuffix("...").strip()


def _apply_override(tree: dict[str, Any], item: str) -> str:
    """Sets one `a.b=value` in the nested tree; returns the dotted key."""
    if "=" not in item:
        raise ConfigError(f"override {item!r}: expected section.key=value")
    dotted, raw = item.split("=", 1)
    keys = dotted.strip().split(".")
    if not all(keys):
        raise ConfigError(f"override {item!r}: empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    _set(tree, keys, value, f"override {item!r}")
    return ".".join(keys)


def _set_values(tree: dict[str, Any], values: Mapping[str, Any]) -> None:
    for dotted, value in values.items():
        _set(tree, dotted.split("."), _plain(value), dotted)


def _set(tree: dict[str, Any], keys: list[str], value: Any, label: str) -> None:
    node = tree
    for key in keys[:-1]:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise ConfigError(f"{label}: {key} is not a section")
    node[keys[-1]] = value


def _coerce(hint: Any, value: Any, key: str) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if dataclasses.is_dataclass(hint):
        return from_dict(hint, value, f"{key}.")
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(arg, value, key)
            except ConfigError:
                continue
        fail(key, f"expected {_type_name(hint)}, got {value!r}")
    if origin is Literal:
        if value not in args:
            fail(key, f"must be one of {', '.join(map(repr, args))}, got {value!r}")
        return value
    if origin is tuple:
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            fail(key, f"expected a list of {len(args)} values, got {value!r}")
        return tuple(
            _coerce(arg, item, f"{key}[{i}]") for i, (arg, item) in enumerate(zip(args, value, strict=True))
        )
    if origin is list:
        if not isinstance(value, (list, tuple)):
            fail(key, f"expected a list, got {value!r}")
        return [_coerce(args[0], item, f"{key}[{i}]") for i, item in enumerate(value)]
    return _coerce_scalar(hint, value, key)


def _coerce_scalar(hint: Any, value: Any, key: str) -> Any:
    if hint is bool:
        if isinstance(value, bool):
            return value
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "1e-4" as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif hint is str:
        if isinstance(value, str):
            return value
    elif hint is Any:
        return value
    fail(key, f"expected {_type_name(hint)}, got {value!r} ({type(value).__name__})")


def _type_name(hint: Any) -> str:
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")
