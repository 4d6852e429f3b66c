"""Shard building: raw dataset folders -> WebDataset tars + manifest.json on any fsspec URL.

`python -m kitdist.shards build|verify|stats --help` is the command line; `build_shards` the Python API.
"""

from __future__ import annotations

from kitdist.shards.build import BuildError, BuildOptions, build_shards, split_url
from kitdist.shards.recipes import RecipeError, load_recipe
from kitdist.shards.samples import EncodeOptions

__all__ = [
    "BuildError",
    "BuildOptions",
    "EncodeOptions",
    "RecipeError",
    "build_shards",
    "load_recipe",
    "split_url",
]
