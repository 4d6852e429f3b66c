"""`build_shards`: a recipe and a raw dataset folder -> WebDataset shards + manifest.json per split.

The build is planned before anything is written: sources are listed and sorted, shuffled with a fixed
seed (so no shard holds a single class), probed (sizes, tiles) and assigned to shards. Shard i's content
is then a pure function of the inputs and options, so a re-run skips every shard whose sidecar matches
its plan and writes the rest; the manifest is written last, from the sidecars.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
import sys
from collections import deque
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from tqdm import tqdm

import kitdist
from kitdist import storage
from kitdist.shards.manifest import MANIFEST_NAME, Manifest, ManifestError, Reject, ShardInfo, read_manifest
from kitdist.shards.manifest import write_manifest as _write_manifest
from kitdist.shards.parallel import WorkerPool
from kitdist.shards.recipes import Recipe, SourceItem, list_split, load_recipe
from kitdist.shards.samples import EncodeOptions, ProbedItem, RejectError, probe
from kitdist.shards.writer import (
    BUILD_DIR,
    ShardResult,
    ShardTask,
    publish_staged,
    read_sidecar,
    remove_partials,
    write_shard,
)

DEFAULT_SHARD_BYTES = 256 * 10**6
_UPLOAD_THREADS = 4  # concurrent shard uploads to an object store; also the most shards staged locally


class BuildError(ValueError):
    """The build cannot start (bad source, destination, recipe or options); the message names it."""


@dataclass(frozen=True)
class BuildOptions:
    samples_per_shard: int | None = None  # a shard closes at this many samples or at shard_bytes
    shard_bytes: int = DEFAULT_SHARD_BYTES
    encode: EncodeOptions = EncodeOptions()
    seed: int = 0  # order of sources across shards; part of the plan, so of the shards' bytes
    workers: int = 1
    overwrite: bool = False  # replace a finished shard set built with other inputs or options
    progress: bool = True
    # per-split tiling, split -> (tile, stride); tile 0 stores that split whole. Splits not named here
    # are tiled as `encode` says, except the recipe's `whole: true` (test) splits, which stay whole.
    split_tiles: dict[str, tuple[int, int | None]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _check_tiling(self.encode.tile, self.encode.stride, "")
        for split, (tile, stride) in self.split_tiles.items():
            _check_tiling(tile or None, stride, f"{split}=")
        if self.samples_per_shard is not None and self.samples_per_shard < 1:
            raise BuildError(f"--samples-per-shard must be >= 1, got {self.samples_per_shard}")
        if self.shard_bytes < 1:
            raise BuildError(f"--shard-size must be positive, got {self.shard_bytes}")
        if self.workers < 1:
            raise BuildError(f"--workers must be >= 1, got {self.workers}")

    def for_split(self, recipe: Recipe, split: str) -> BuildOptions:
        """These options with the tiling that applies to `split`."""
        if split in self.split_tiles:
            tile, stride = self.split_tiles[split]
        elif recipe.splits[split].whole or recipe.splits[split].blocks:
            tile, stride = None, None
        else:
            return self
        return replace(self, encode=replace(self.encode, tile=tile or None, stride=stride if tile else None))


def _check_tiling(tile: int | None, stride: int | None, prefix: str) -> None:
    if tile is not None and tile < 1 or stride is not None and (tile is None or not 0 < stride <= tile):
        raise BuildError(
            f"--tile {prefix}N must be >= 1 and 0 < --stride {prefix}N <= the tile, got tile={tile} "
            f"stride={stride}"
        )


def parse_size(text: str) -> int:
    """'256MB' -> 256_000_000; also B, KB, GB, KiB, MiB, GiB."""
    units = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", text)
    if match is None or match.group(2).upper() not in units:
        raise BuildError(f"--shard-size {text!r}: expected a size like 256MB, 1GB or 512MiB")
    return int(float(match.group(1)) * units[match.group(2).upper()])


def split_url(out: str, recipe: Recipe | str, split: str) -> str:
    """Where a split's shards and manifest go: OUT itself for flat recipes, else OUT/<split>."""
    recipe = load_recipe(recipe) if isinstance(recipe, str) else recipe
    return out.rstrip("/") if recipe.flat else storage.join(out, split)


def build_shards(
    recipe: str,
    src: str | Path,
    out: str,
    *,
    splits: Sequence[str] | None = None,
    options: BuildOptions | None = None,
    **option_values,
) -> dict[str, Manifest]:
    """Builds (or finishes) the shards of each split; returns their manifests keyed by split.

    Options are a BuildOptions or its fields as keywords (tile/stride/png_level/decode_check go to
    EncodeOptions), e.g. `build_shards("folder", photos, "/tmp/shards", samples_per_shard=4, tile=256)`.
    """
    options = _options(options, option_values)
    the_recipe, source, selected = _check_inputs(recipe, src, out, splits)
    unknown = sorted(set(options.split_tiles) - set(the_recipe.splits))
    if unknown:
        raise BuildError(
            f"--tile/--stride {unknown[0]}=...: no split {unknown[0]!r} in recipe {the_recipe.name} "
            f"(splits: {', '.join(the_recipe.splits)})"
        )
    manifests = {}
    with WorkerPool(options.workers) as pool:
        for split, (items, list_rejects) in selected.items():
            target = split_url(out, the_recipe, split)
            split_options = options.for_split(the_recipe, split)
            if the_recipe.splits[split].whole and split_options.encode.tile is None and options.encode.tile:
                print(f"note: split {split} is a test split: stored whole, not tiled", file=sys.stderr)
            manifests[split] = _build_split(
                the_recipe, source, split, target, items, list_rejects, split_options, pool
            )
    return manifests


def _options(options: BuildOptions | None, values: dict) -> BuildOptions:
    options = options or BuildOptions()
    encode_names = set(asdict(EncodeOptions()))
    encode_values = {key: values.pop(key) for key in list(values) if key in encode_names}
    try:
        return replace(options, encode=replace(options.encode, **encode_values), **values)
    except TypeError as err:
        raise BuildError(f"build_shards: {err}") from err


def _check_inputs(recipe_name: str, src: str | Path, out: str, splits: Sequence[str] | None):
    """Every check that can fail before work starts: recipe, source, splits, destination."""
    recipe = load_recipe(recipe_name)
    source = Path(src)
    if not source.is_dir():
        raise BuildError(f"--src {source}: no such folder")
    unknown = [split for split in splits or () if split not in recipe.splits]
    if unknown:
        raise BuildError(
            f"split {unknown[0]!r} is not in recipe {recipe.name} (splits: {', '.join(recipe.splits)})"
        )
    selected = {split: list_split(recipe, source, split) for split in splits or recipe.splits}
    found = {split: listed for split, listed in selected.items() if listed[0] or listed[1]}
    missing = [split for split in selected if split not in found]
    if not found or splits and missing:
        rule = recipe.splits[(missing or list(selected))[0]]
        raise BuildError(
            f"--src {source}: no files match {rule.describe()!r} (recipe {recipe.name}, {recipe.path}); layout:\n{recipe.layout}"
        )
    for split in missing:
        print(f"note: split {split} has no files under {source}; skipped", file=sys.stderr)
    try:
        storage.check_writable(out)
    except (OSError, FileNotFoundError) as err:  # StorageError, or a local parent that is missing
        raise BuildError(f"--out {out}: cannot write there ({err})") from err
    return recipe, source, found


def _build_split(recipe, source, split, target, items, list_rejects, options, pool) -> Manifest:
    probed, probe_rejects = _probe_all(items, source, options, pool, split)
    # blocks keep their array order (SIDD's submission layout); other sources are shuffled across shards
    shuffle = recipe.splits[split].blocks is None
    tasks = _plan(recipe.name, source, target, split, probed, options, shuffle)
    plan_fingerprint = _sha256([task.fingerprint for task in tasks])
    finished = _finished_manifest(target, plan_fingerprint, options)
    if finished is not None:
        return finished
    remove_partials(target)
    results = _run_tasks(tasks, pool, options, split)
    rejects = [Reject(path, reason) for path, reason in list_rejects + probe_rejects]
    rejects += [Reject(path, reason) for result in results for path, reason in result.rejects]
    shards = tuple(ShardInfo(r.name, r.samples, r.bytes, r.sha256) for r in results if r.samples)
    manifest = Manifest(
        dataset=recipe.name,
        recipe=recipe.path,
        split=split,
        kind=recipe.split_kind(split),
        shards=shards,
        builder_version=kitdist.__version__,
        options=_recorded_options(source, options, plan_fingerprint),
        rejects=tuple(sorted(rejects, key=lambda reject: reject.path)),
    )
    _write_manifest(target, manifest)
    storage.remove(storage.join(target, BUILD_DIR), recursive=True)
    remove_partials(target, finished=True)
    _print_summary(target, manifest)
    return manifest


def _probe_all(items: list[SourceItem], source: Path, options: BuildOptions, pool: WorkerPool, split: str):
    probed, rejects = [], []
    jobs = [(item, source, options.encode) for item in items]
    bar = _bar(options, len(jobs), f"{split}: probing", "file")
    for item, outcome in zip(items, pool.map(_probe_one, jobs), strict=True):
        bar.update(1)
        if isinstance(outcome, str):
            rejects.append((item.paths[0][1], outcome))
        else:
            probed.append(outcome)
    bar.close()
    return probed, rejects


def _probe_one(job: tuple[SourceItem, Path, EncodeOptions]) -> ProbedItem | str:
    try:
        return probe(*job)
    except RejectError as err:
        return str(err)


def _plan(
    dataset, source, target, split, probed: list[ProbedItem], options: BuildOptions, shuffle: bool
) -> list[ShardTask]:
    """Deterministic assignment of items to shards; a shard closes at the sample or byte target."""
    order = sorted(probed, key=lambda p: p.item.key)
    if shuffle:
        random.Random(options.seed).shuffle(order)
    groups: list[list[ProbedItem]] = [[]]
    samples = size = 0
    for item in order:
        full = (
            options.samples_per_shard is not None and samples + item.num_samples > options.samples_per_shard
        )
        if groups[-1] and (full or size + item.estimated_bytes() > options.shard_bytes):
            groups.append([])
            samples = size = 0
        groups[-1].append(item)
        samples, size = samples + item.num_samples, size + item.estimated_bytes()
    encode = asdict(options.encode)
    return [
        ShardTask(
            split_url=target,
            name=f"{split}-{index:06d}.tar",
            fingerprint=_sha256([dataset, encode, [_describe(item) for item in group]]),
            items=tuple(group),
            src=str(source),
            dataset=dataset,
            encode=options.encode,
        )
        for index, group in enumerate(groups)
        if group
    ]


def _describe(probed: ProbedItem) -> list:
    item = probed.item
    return [item.key, item.paths, item.cls, probed.file_bytes, probed.boxes]


def _sha256(value) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=list).encode()).hexdigest()


def _finished_manifest(target: str, plan_fingerprint: str, options: BuildOptions) -> Manifest | None:
    """The existing manifest when it describes this very plan; an error when it describes another."""
    if not storage.exists(storage.join(target, MANIFEST_NAME)):
        return None
    try:
        existing = read_manifest(target)
    except ManifestError:
        existing = None
    if existing is not None and existing.options.get("plan_sha256") == plan_fingerprint:
        print(f"{target}: already built with these inputs and options; nothing to do", file=sys.stderr)
        return existing
    if not options.overwrite:
        raise BuildError(
            f"--out {target} already holds a shard set built from other inputs or options; "
            "choose another --out or pass --overwrite"
        )
    storage.remove(storage.join(target, MANIFEST_NAME))
    return None


def _run_tasks(
    tasks: list[ShardTask], pool: WorkerPool, options: BuildOptions, split: str
) -> list[ShardResult]:
    """Writes the shards not yet published; uploads to object stores overlap with encoding."""
    done = {task.name: read_sidecar(task) for task in tasks}
    todo = [task for task in tasks if done[task.name] is None]
    if len(todo) < len(tasks):
        print(
            f"{split}: resuming: {len(tasks) - len(todo)} of {len(tasks)} shards already published",
            file=sys.stderr,
        )
    progress = _WriteProgress(options, todo, split)
    with ThreadPoolExecutor(max_workers=_UPLOAD_THREADS) as uploader:
        uploads: deque = deque()
        for result, staged in pool.bounded(write_shard, todo, ahead=2 * options.workers):
            if staged is None:
                done[result.name] = progress.finished(result)
            else:
                uploads.append(uploader.submit(publish_staged, todo[0].split_url, result, staged))
            while uploads and (uploads[0].done() or len(uploads) > _UPLOAD_THREADS):
                result = uploads.popleft().result()
                done[result.name] = progress.finished(result)
        for upload in uploads:
            done[upload.result().name] = progress.finished(upload.result())
    progress.close()
    return [done[task.name] for task in tasks]


class _WriteProgress:
    """Samples/s, MB/s and ETA of the shards being written (to stderr)."""

    def __init__(self, options: BuildOptions, todo: list[ShardTask], split: str) -> None:
        self.planned = {task.name: sum(item.num_samples for item in task.items) for task in todo}
        self.bar = _bar(options, sum(self.planned.values()), f"{split}: writing", "sample")
        self.bytes = 0

    def finished(self, result: ShardResult) -> ShardResult:
        self.bytes += result.bytes
        self.bar.update(self.planned[result.name])  # rejected samples count as done: the ETA stays honest
        elapsed = max(self.bar.format_dict["elapsed"], 1e-9)
        self.bar.set_postfix_str(f"{self.bytes / elapsed / 1e6:.1f} MB/s")
        return result

    def close(self) -> None:
        self.bar.close()


def _recorded_options(source: Path, options: BuildOptions, plan_fingerprint: str) -> dict:
    return {
        "source": str(source.resolve()),
        "samples_per_shard": options.samples_per_shard,
        "shard_bytes": options.shard_bytes,
        "seed": options.seed,
        **asdict(options.encode),
        "plan_sha256": plan_fingerprint,
    }


def _print_summary(target: str, manifest: Manifest) -> None:
    print(
        f"{target}: {len(manifest.shards)} shards, {manifest.total_samples} samples, "
        f"{manifest.total_bytes / 1e6:.1f} MB, {len(manifest.rejects)} rejected",
        file=sys.stderr,
    )


def _bar(options: BuildOptions, total: int, description: str, unit: str) -> tqdm:
    return tqdm(
        total=total, desc=description, unit=unit, file=sys.stderr, disable=not options.progress, smoothing=0.1
    )
