"""Image blocks stored in MATLAB files: SIDD's validation and benchmark sets as its authors distribute them.

SIDD ships its sRGB validation and benchmark data as MATLAB v5 `.mat` files, one array per file
(`ValidationNoisyBlocksSrgb`, `ValidationGtBlocksSrgb`, `BenchmarkNoisyBlocksSrgb`), each
[images, blocks, height, width, 3] uint8 (40 x 32 x 256 x 256 x 3). A recipe split names its sources as
`FILE.mat:VARIABLE` per role; every (image, block) becomes one sample keyed `<split>__image<ii>__block<bb>`,
so results map back to SIDD's submission layout (the same [image, block] array). The arrays are read
with scipy.io.loadmat, as the reference implementations read them, once per process.
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np

from kitdist.shards.items import RecipeError, SourceItem

SOURCE_FORMAT = "FILE.mat:VARIABLE"


def parse_source(source: str, where: str) -> tuple[str, str]:
    """`ValidationGtBlocksSrgb.mat:ValidationGtBlocksSrgb` -> (file relative to --src, variable)."""
    file, _, variable = source.rpartition(":")
    if not file.endswith(".mat") or not variable.isidentifier():
        raise RecipeError(f"{where}: expected {SOURCE_FORMAT}, got {source!r}")
    return file, variable


def block_shape(src: Path, source: str) -> tuple[int, int, int, int]:
    """(images, blocks, height, width) of a block array, from the file's header (nothing is loaded)."""
    file, variable = parse_source(source, "blocks")
    try:
        found = _variables(str(src / file), _stamp(src / file))
    except NotImplementedError as err:  # MATLAB v7.3 (HDF5) files
        raise RecipeError(
            f"{src / file}: not a MATLAB v5 file readable by scipy.io.loadmat ({err})"
        ) from None
    except (OSError, ValueError) as err:
        raise RecipeError(f"{src / file}: not a readable MATLAB file ({err})") from None
    if variable not in found:
        raise RecipeError(f"{src / file}: no variable {variable!r} (it holds {', '.join(found) or 'none'})")
    shape, dtype = found[variable]
    if len(shape) != 5 or shape[4] != 3 or dtype != "uint8":
        raise RecipeError(
            f"{src / file}: {variable} is {dtype} {list(shape)}; expected uint8 [images, blocks, height, "
            "width, 3] (SIDD: [40, 32, 256, 256, 3])"
        )
    return shape[:4]


def list_blocks(
    sources: dict[str, str], src: Path, split: str
) -> tuple[list[SourceItem], list[tuple[str, str]]]:
    """One item per (image, block) in block order; no items when the input file is absent (the split is
    then skipped like a split without files). Files of different shapes are an error."""
    if not (src / parse_source(sources["input"], "blocks.input")[0]).is_file():
        return [], []
    shapes = {role: block_shape(src, source) for role, source in sources.items()}
    if len(set(shapes.values())) > 1:
        shown = ", ".join(f"{sources[role]} {list(shape)}" for role, shape in shapes.items())
        raise RecipeError(f"{src}: the block arrays of split {split} differ in shape: {shown}")
    images, blocks = shapes["input"][:2]
    paths = tuple(sources.items())
    return [
        SourceItem(key=f"{split}__image{image:02d}__block{block:02d}", paths=paths, block=(image, block))
        for image in range(images)
        for block in range(blocks)
    ], []


@functools.lru_cache(maxsize=8)
def _variables(path: str, stamp: tuple[int, int]) -> dict[str, tuple[tuple[int, ...], str]]:
    import scipy.io

    return {name: (shape, dtype) for name, shape, dtype in scipy.io.whosmat(path)}


def _stamp(path: Path) -> tuple[int, int]:
    """(size, mtime): part of the caches' keys, so that a rewritten file is read anew."""
    stat = path.stat()
    return stat.st_size, stat.st_mtime_ns


def block_pixels(src: Path, source: str, block: tuple[int, int]) -> np.ndarray:
    """One [height, width, 3] uint8 block (C-contiguous)."""
    stamp = _stamp(src / parse_source(source, "blocks")[0])
    return np.ascontiguousarray(_load(str(src), source, stamp)[block])


@functools.lru_cache(maxsize=2)  # a split's input and target array, per worker process
def _load(src: str, source: str, stamp: tuple[int, int]) -> np.ndarray:
    """The whole array (SIDD: 252 MB)."""
    import scipy.io

    file, variable = parse_source(source, "blocks")
    return scipy.io.loadmat(Path(src) / file, variable_names=[variable])[variable]
