"""What listing a recipe's split yields (`SourceItem`) and the error a recipe or its sources raise.

Its own module so that the readers of particular source formats (`matblocks`) and the recipe reader
(`recipes`), which dispatches to them, both use these without importing each other.
"""

from __future__ import annotations

from dataclasses import dataclass


class RecipeError(ValueError):
    """A recipe that cannot be found or read, or a source that does not fit it; the message names it."""


@dataclass(frozen=True)
class SourceItem:
    """One source image (clean) or input/target pair, before it is read."""

    key: str  # the sample's stable `__key__` (tile coordinates are appended when tiled)
    paths: tuple[tuple[str, str], ...]  # (role, path relative to --src); roles: clean | input, target
    label: str | None = None  # class folder name (ImageNet wnid)
    cls: int | None = None
    block: tuple[int, int] | None = None  # (image, block) in the `paths`' MATLAB arrays (matblocks)
