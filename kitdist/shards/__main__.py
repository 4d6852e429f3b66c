"""`python -m kitdist.shards build|verify|stats`: build WebDataset shards from a raw dataset, check them, describe them."""

from __future__ import annotations

import argparse
import sys

from kitdist.storage import StorageError

BUILD_HELP = """\
Builds WebDataset shards (+ manifest.json) from a raw dataset folder laid out as RECIPE expects.

RECIPE is a name (imagenet, folder, sidd, gopro, rain13k, reds: the recipes that ship with kitdist, the
repository's shards/ folder, document each raw layout) or a path to a recipe .yaml. A recipe with splits writes one shard set
per split, OUT/<split>/ (e.g. OUT/train/, OUT/test/), each with its own manifest.json; the folder recipe
writes directly into OUT.

Samples: `clean.<ext>` (+ `cls` for ImageNet) or `input.<ext>` + `target.<ext>`, and `json` provenance;
__key__ comes from the relative source path (+ tile position). Untiled JPEG/PNG files are stored
byte-for-byte; tiles and other formats are stored as PNG.

Bad files (unreadable, corrupt, empty, missing pair partner, size mismatch) are rejected with a reason
recorded in the manifest; the build goes on. The build is resumable: after a crash or Ctrl-C, run the
same command again and it finishes the shards that are missing. Same inputs and options give
byte-identical shards. S3 endpoint and credentials come from the environment (AWS_ENDPOINT_URL,
AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY), never from arguments.
"""


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return args.run(args)
    except KeyboardInterrupt:
        print("interrupted: run the same command again to resume", file=sys.stderr)
        return 130
    except (ValueError, StorageError) as err:  # BuildError, RecipeError, ManifestError, StorageError
        print(f"error: {err}", file=sys.stderr)
        return 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m kitdist.shards", description=__doc__)
    commands = parser.add_subparsers(required=True, metavar="{build,verify,stats}")
    _add_build(commands)
    _add_verify_and_stats(commands)
    return parser


def _add_build(commands) -> None:
    build = commands.add_parser(
        "build",
        help="raw dataset -> shards",
        description=BUILD_HELP,
        epilog=_recipe_layouts(),
        formatter_class=argparse.RawTextHelpFormatter,
    )
    build.add_argument("recipe", help="recipe name or path to a recipe .yaml")
    build.add_argument("--src", required=True, help="local folder holding the raw dataset")
    build.add_argument(
        "--out", required=True, help="destination URL: a local folder, file://... or s3://bucket/prefix"
    )
    build.add_argument(
        "--split", action="append", help="build only this split (repeatable; default: every split found)"
    )
    build.add_argument(
        "--shard-size", default="256MB", help="target bytes per shard, e.g. 256MB, 1GB (default 256MB)"
    )
    build.add_argument("--samples-per-shard", type=int, help="close a shard at this many samples (as well)")
    build.add_argument(
        "--tile",
        action="append",
        default=[],
        metavar="[SPLIT=]N",
        help="cut each image into N x N tiles (input and target alike); a plain N applies to every split "
        "but the recipe's test splits (`whole: true`, stored whole), SPLIT=N to that split alone "
        "(SPLIT=0: whole); repeatable",
    )
    build.add_argument(
        "--stride",
        action="append",
        default=[],
        metavar="[SPLIT=]N",
        help="step between tiles (default: the tile, no overlap); SPLIT=N for one split; repeatable",
    )
    build.add_argument("--workers", type=int, default=1, help="worker processes (default 1)")
    build.add_argument("--seed", type=int, default=0, help="order of sources across shards (default 0)")
    build.add_argument(
        "--png-level",
        type=int,
        default=1,
        choices=range(10),
        metavar="0-9",
        help="zlib level of written PNGs (default 1)",
    )
    build.add_argument(
        "--decode-check",
        action="store_true",
        help="decode every copied image too (slower; also catches damage inside JPEG data)",
    )
    build.add_argument(
        "--overwrite",
        action="store_true",
        help="replace a finished shard set built from other inputs/options",
    )
    build.add_argument("--no-progress", action="store_true", help="no progress bars")
    build.set_defaults(run=_build)


def _add_verify_and_stats(commands) -> None:
    verify = commands.add_parser(
        "verify",
        help="check shards against the manifest",
        description="Checks every shard's size, sha256 and sample count against manifest.json (and keys "
        "unique across shards). Exit status 1 on any mismatch. URL: a shard folder, its manifest.json, "
        "or a build's OUT with split sub-folders.",
    )
    verify.add_argument("url")
    verify.add_argument(
        "--deep",
        action="store_true",
        help="also decode every image, check each sample's fields and read the shard back through webdataset",
    )
    verify.set_defaults(run=_verify)
    stats = commands.add_parser(
        "stats",
        help="summarise a shard set",
        description="Prints a readable summary of each manifest at URL.",
    )
    stats.add_argument("url")
    stats.set_defaults(run=_stats)


def _recipe_layouts() -> str:
    from kitdist.shards.recipes import available_recipes, load_recipe

    lines = ["recipes and the raw layouts they expect:"]
    for name in available_recipes():
        recipe = load_recipe(name)
        splits = "OUT" if recipe.flat else ", ".join(f"OUT/{split}" for split in recipe.splits)
        lines.append(f"  {name} ({recipe.kind}; writes {splits}):")
        lines += [f"    {line}" for line in recipe.layout.strip().splitlines()]
    return "\n".join(lines)


def _build(args: argparse.Namespace) -> int:
    from kitdist.shards.build import BuildError, BuildOptions, build_shards, parse_size
    from kitdist.shards.samples import EncodeOptions

    tile, split_tile = _per_split(args.tile, "--tile")
    stride, split_stride = _per_split(args.stride, "--stride")
    unpaired = sorted(set(split_stride) - set(split_tile))
    if unpaired:
        raise BuildError(f"--stride {unpaired[0]}=...: give that split's tile too (--tile {unpaired[0]}=N)")
    encode = EncodeOptions(tile=tile, stride=stride, png_level=args.png_level, decode_check=args.decode_check)
    options = BuildOptions(
        split_tiles={split: (size, split_stride.get(split)) for split, size in split_tile.items()},
        samples_per_shard=args.samples_per_shard,
        shard_bytes=parse_size(args.shard_size),
        encode=encode,
        seed=args.seed,
        workers=args.workers,
        overwrite=args.overwrite,
        progress=not args.no_progress,
    )
    tiling = f", tiles of {tile} px (stride {stride or tile})" if tile else ""
    tiling += "".join(f", {split}: {size or 'whole'}" for split, size in split_tile.items())
    print(
        f"building {args.recipe} shards from {args.src} into {args.out} with {args.workers} worker(s){tiling}",
        file=sys.stderr,
    )
    manifests = build_shards(args.recipe, args.src, args.out, splits=args.split, options=options)
    print(_next_steps(args.recipe, args.out, list(manifests)), file=sys.stderr)
    return 0


def _per_split(values: list[str], flag: str) -> tuple[int | None, dict[str, int]]:
    """`--tile 256 --tile test=0` -> (256, {"test": 0})."""
    from kitdist.shards.build import BuildError

    every, by_split = None, {}
    for value in values:
        split, _, number = value.rpartition("=")
        if not number.isdigit():
            raise BuildError(f"{flag} {value!r}: expected N or SPLIT=N (N a whole number of pixels)")
        if split:
            by_split[split] = int(number)
        else:
            every = int(number)
    return every, by_split


def _next_steps(recipe: str, out: str, splits: list[str]) -> str:
    """What to do with the shards just built: check them, then train on them."""
    from kitdist.shards import split_url

    urls = [split_url(out, recipe, split) for split in splits]
    lines = ["next: check them, then name them in a run config (data.train_shards=URL, data.val_shards=URL)"]
    return "\n".join(lines + [f"  python -m kitdist.shards verify {url} --deep" for url in urls])


def _verify(args: argparse.Namespace) -> int:
    from kitdist.shards.verify import find_manifests, verify

    problems = verify(args.url, deep=args.deep)
    for problem in problems:
        print(problem)
    folders = ", ".join(find_manifests(args.url))
    print(f"{'FAILED' if problems else 'OK'}: {len(problems)} problems in {folders}", file=sys.stderr)
    return 1 if problems else 0


def _stats(args: argparse.Namespace) -> int:
    from kitdist.shards.verify import stats

    print(stats(args.url))
    return 0


if __name__ == "__main__":
    sys.exit(main())
