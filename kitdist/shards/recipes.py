"""Dataset recipes: a declarative YAML file per dataset (top-level `shards/`, shipped as package data:
`kitdist.package_data`) and the code that reads it.

A recipe says which files under `--src` make up each split and, for paired datasets, how a degraded
input's relative path maps to its target's. Listing a split yields `SourceItem`s in sorted order, plus
the rejects found by listing alone (a missing pair partner).
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml

from kitdist.package_data import RECIPE_ROOT, recipe_names, recipe_path
from kitdist.shards.items import RecipeError, SourceItem
from kitdist.shards.matblocks import list_blocks, parse_source

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".ppm")


@dataclass(frozen=True)
class SplitRule:
    """Which files form one split: `files`, the clean (or input) glob relative to --src, or `blocks`, the
    MATLAB arrays of image blocks per role (`kitdist.shards.matblocks`: SIDD's validation/benchmark)."""

    files: str = ""
    target: tuple[str, str] | None = None  # (regex, replacement) on the input's relative path
    target_files: str | None = None  # glob of all targets, to report targets that have no input
    extensions: tuple[str, ...] = IMAGE_EXTENSIONS  # kept suffixes, case-insensitive
    blocks: dict[str, str] | None = None  # role (input, target) -> "FILE.mat:VARIABLE"; stored whole
    whole: bool = False  # a test split: images stored whole, the global --tile does not apply
    kind: Literal["input"] | None = None  # "input": degraded inputs without targets (a benchmark's)

    def describe(self) -> str:
        """What the split reads, for messages."""
        return self.files or ", ".join((self.blocks or {}).values())


@dataclass(frozen=True)
class Recipe:
    name: str
    kind: Literal["clean", "paired"]
    splits: dict[str, SplitRule]
    layout: str = ""  # the raw layout the recipe expects, for --help and docs
    classes_from: str | None = None  # folder whose sorted sub-folder names are the class index (ImageNet)
    flat: bool = False  # one split whose shards go directly under --out (no OUT/<split>/)
    path: str = ""

    def __post_init__(self) -> None:
        if self.kind not in ("clean", "paired"):
            raise RecipeError(f"{self.path}: kind must be 'clean' or 'paired', got {self.kind!r}")
        if not self.splits:
            raise RecipeError(f"{self.path}: `splits` is empty")
        if self.flat and len(self.splits) != 1:
            raise RecipeError(f"{self.path}: `flat: true` needs exactly one split")
        for split, rule in self.splits.items():
            if bool(rule.files) == bool(rule.blocks):
                raise RecipeError(f"{self.path}: splits.{split} needs either `files: <glob>` or `blocks:`")
            if rule.kind == "input" and self.kind != "paired":
                raise RecipeError(f"{self.path}: splits.{split}.kind: input is for splits of paired recipes")
            roles = ("input", "target") if self.split_kind(split) == "paired" else ("input",)
            if rule.blocks is not None and set(rule.blocks) != set(roles):
                raise RecipeError(f"{self.path}: splits.{split}.blocks needs exactly {' and '.join(roles)}")
            if rule.files and (rule.target is None) == (self.split_kind(split) == "paired"):
                raise RecipeError(f"{self.path}: splits.{split}.target is required exactly for paired splits")

    def split_kind(self, split: str) -> str:
        """The samples a split's shards hold (its manifest's kind): clean, paired or input."""
        return self.splits[split].kind or self.kind


def available_recipes() -> list[str]:
    return recipe_names()


def load_recipe(name_or_path: str) -> Recipe:
    """A recipe by name (`shards/<name>.yaml`) or by path to a YAML file."""
    path = Path(name_or_path)
    if not (path.suffix in (".yaml", ".yml") and path.is_file()):
        path = recipe_path(name_or_path)
    if path is None:
        raise RecipeError(
            f"unknown recipe {name_or_path!r}: known recipes are {', '.join(available_recipes())} "
            f"(in {RECIPE_ROOT}), or pass a path to a recipe .yaml file"
        )
    try:
        body = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise RecipeError(f"{path}: not valid YAML ({err})") from err
    return _recipe_from_dict(body, str(path))


def _recipe_from_dict(body: Any, path: str) -> Recipe:
    if not isinstance(body, dict):
        raise RecipeError(f"{path}: a recipe is a mapping with keys name, kind, splits")
    _no_unknown_keys(body, Recipe, path, "")
    splits = body.get("splits") or {}
    rules = {}
    for split, rule in splits.items():
        if not isinstance(rule, dict) or not ("files" in rule or "blocks" in rule):
            raise RecipeError(f"{path}: splits.{split} needs at least `files: <glob>` (or `blocks:`)")
        _no_unknown_keys(rule, SplitRule, path, f"splits.{split}.")
        if "blocks" in rule:
            _check_blocks(rule["blocks"], path, f"splits.{split}.blocks")
        if "target" in rule:
            if not (isinstance(rule["target"], list) and len(rule["target"]) == 2):
                raise RecipeError(f"{path}: splits.{split}.target must be [regex, replacement]")
            rule = {**rule, "target": tuple(rule["target"])}
        if "extensions" in rule:
            rule = {**rule, "extensions": tuple(ext.lower() for ext in rule["extensions"])}
        rules[str(split)] = SplitRule(**rule)
    try:
        return Recipe(**{**body, "splits": rules, "path": path})
    except TypeError as err:
        raise RecipeError(f"{path}: {err}") from err


def _check_blocks(blocks: Any, path: str, key: str) -> None:
    if not isinstance(blocks, dict):
        raise RecipeError(f"{path}: {key} must map roles to FILE.mat:VARIABLE, got {blocks!r}")
    for role, source in blocks.items():
        parse_source(str(source), f"{path}: {key}.{role}")


def _no_unknown_keys(body: dict, cls: type, path: str, prefix: str) -> None:
    known = {field.name for field in dataclasses.fields(cls)} - {"path"}
    for key in body:
        if key not in known:
            raise RecipeError(f"{path}: unknown key {prefix}{key!r} (known: {', '.join(sorted(known))})")


def sample_key(relative_path: str) -> str:
    """`train/n01/x.JPEG` -> `train__n01__x`: no dots (WebDataset splits a name at its first dot)."""
    stem = relative_path.rsplit(".", 1)[0] if "." in relative_path.rsplit("/", 1)[-1] else relative_path
    return re.sub(r"[^A-Za-z0-9_\-]", "_", stem.replace("/", "__"))


def list_split(recipe: Recipe, src: Path, split: str) -> tuple[list[SourceItem], list[tuple[str, str]]]:
    """Sorted source items of one split, and (path, reason) for files rejected while listing."""
    rule = recipe.splits[split]
    if rule.blocks is not None:
        return list_blocks(rule.blocks, src, split)
    files = _glob(src, rule.files, rule.extensions)
    names = class_names(recipe, src)
    classes = None if names is None else {name: index for index, name in enumerate(names)}
    items: list[SourceItem] = []
    rejects: list[tuple[str, str]] = []
    first_with_key: dict[str, str] = {}
    for relative in files:
        paths: tuple[tuple[str, str], ...] = (("clean", relative),)
        if rule.target is not None:
            target = re.sub(rule.target[0], rule.target[1], relative)
            if target == relative or not (src / target).is_file():
                rejects.append((relative, f"missing target (expected {target})"))
                continue
            paths = (("input", relative), ("target", target))
        label, cls = _label(relative, classes)
        if classes is not None and cls is None:
            rejects.append(
                (relative, f"class folder {label!r} is not one of the {recipe.classes_from}/ classes")
            )
            continue
        key = sample_key(relative)
        if key in first_with_key:  # e.g. x.png beside x.jpg: keys must be unique, so the second one goes
            rejects.append((relative, f"duplicate key {key} (already used by {first_with_key[key]})"))
            continue
        first_with_key[key] = relative
        items.append(SourceItem(key=key, paths=paths, label=label, cls=cls))
    if rule.target and rule.target_files:
        expected = {re.sub(rule.target[0], rule.target[1], path) for path in files}
        for target in _glob(src, rule.target_files, rule.extensions):
            if target not in expected:
                rejects.append((target, "missing input (no input maps to this target)"))
    return items, rejects


def class_names(recipe: Recipe, src: Path) -> list[str] | None:
    if recipe.classes_from is None:
        return None
    folder = src / recipe.classes_from
    if not folder.is_dir():
        raise RecipeError(f"{folder}: class folder missing (recipe {recipe.name} takes classes from it)")
    return sorted(entry.name for entry in folder.iterdir() if entry.is_dir())


def _label(relative: str, classes: dict[str, int] | None) -> tuple[str | None, int | None]:
    if classes is None:
        return None, None
    label = relative.split("/")[-2] if "/" in relative else ""
    return label, classes.get(label)


def _glob(src: Path, pattern: str, extensions: tuple[str, ...]) -> list[str]:
    found = (path for path in src.glob(pattern) if path.is_file())
    relative = (path.relative_to(src).as_posix() for path in found)
    return sorted(path for path in relative if Path(path).suffix.lower() in extensions)
