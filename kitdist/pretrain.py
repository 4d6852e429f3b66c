"""`python -m kitdist.pretrain`: pre-train KiT on clean images with synthetic degradations.

With no --config it is the embedded default (`configs/pretrain/embedded.yaml`): a local Ray cluster on
this machine, CPU, the `debug`-size KiT, trained for about 10 minutes on 2 idle cores (0.15 s a step) on
shards built once (cached under ./runs/data) from the photographs that scikit-image ships, two of them held
out for validation (unless data.train_shards is given). With a config and a cluster the same code path
runs on many GPUs; `python -m kitdist.finetune` is this same command with fine-tuning's requirements.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

from kitdist import storage
from kitdist.cli import TrainCommand, config_or_exit, parser
from kitdist.package_data import CONFIG_ROOT

# The embedded default run (its settings and why: the file's comments).
EMBEDDED_CONFIG = CONFIG_ROOT / "pretrain" / "embedded.yaml"
EMBEDDED_DATA = "runs/data/skimage-photos"
NUM_VAL_PHOTOS = 2
TRAIN_TILE = 128


def photo_paths() -> list[Path]:
    """scikit-image's colour photographs of at least 256 px a side, in name order."""
    from PIL import Image

    try:
        import skimage
    except ImportError:
        raise RuntimeError(
            "the embedded default trains on scikit-image's photographs: install kitdist with its `dist` "
            "extra (tools/install-cpu) or `pip install scikit-image`"
        ) from None

    paths = []
    for path in sorted((Path(skimage.__file__).parent / "data").glob("*")):
        if path.suffix.lower() in (".png", ".jpg"):
            with Image.open(path) as image:
                if image.mode == "RGB" and min(image.size) >= 256:
                    paths.append(path)
    return paths


def ensure_photo_shards(out: str = EMBEDDED_DATA) -> tuple[str, str]:
    """Builds (once; later calls find the manifests) train and validation shards from the photographs:
    the last NUM_VAL_PHOTOS photos are held out whole for validation, the rest cut into tiles."""
    from kitdist.shards import build_shards

    train_url, val_url = storage.join(out, "train"), storage.join(out, "val")
    if storage.exists(storage.join(train_url, "manifest.json")) and storage.exists(
        storage.join(val_url, "manifest.json")
    ):
        return train_url, val_url
    photos = photo_paths()
    if len(photos) <= NUM_VAL_PHOTOS:
        raise RuntimeError("scikit-image's photographs were not found; is scikit-image installed?")
    source = Path(out) / "source"
    for split, chosen in (("train", photos[:-NUM_VAL_PHOTOS]), ("val", photos[-NUM_VAL_PHOTOS:])):
        (source / split).mkdir(parents=True, exist_ok=True)
        for path in chosen:
            target = source / split / path.name
            if not target.exists():
                target.symlink_to(path)
    print(f"building shards from {len(photos)} scikit-image photographs under {out} (once)", flush=True)
    tiles = build_shards(
        "folder", source / "train", train_url, samples_per_shard=16, tile=TRAIN_TILE, progress=False
    )
    build_shards("folder", source / "val", val_url, samples_per_shard=16, progress=False)
    count = sum(manifest.total_samples for manifest in tiles.values())
    print(
        f"  training: {count} tiles of {TRAIN_TILE} px; validation: {NUM_VAL_PHOTOS} whole photographs held out"
    )
    return train_url, val_url


PRETRAIN = TrainCommand(
    prog="python -m kitdist.pretrain",
    description="Pre-train KiT on clean images (synthetic noise/blur/JPEG) with Ray Train + DeepSpeed.\n"
    "No --config: the embedded default (configs/pretrain/embedded.yaml: local Ray, CPU, debug-size KiT,\n"
    "scikit-image photographs).",
    configs="pretrain",
    default_config=EMBEDDED_CONFIG,
    fine_tune=False,
)


def run_command(argv: Sequence[str] | None, command: TrainCommand) -> None:
    """The training commands' one code path: parse, load the config, check, train, summarise."""
    args = parser(command.prog, command.description, command.configs).parse_args(argv)
    if args.config is None and command.default_config is None:
        sys.exit("error: --config: fine-tuning needs a config naming its dataset (see --help)")
    cfg = config_or_exit(args.config or command.default_config, args.overrides)
    if args.config is None and not cfg.data.train_shards:
        cfg = config_or_exit(command.default_config, args.overrides, values=embedded_shards())
    from kitdist.launch import run_or_exit

    run_or_exit(cfg, fine_tune=command.fine_tune, check_only=args.check)


def embedded_shards() -> dict[str, str]:
    """The embedded default's data: the photographs' shards (built once), as typed config values."""
    try:
        train_url, val_url = ensure_photo_shards()
    except RuntimeError as err:
        sys.exit(f"error: {err}")
    return {"data.train_shards": train_url, "data.val_shards": val_url}


def main(argv: Sequence[str] | None = None) -> None:
    run_command(argv, PRETRAIN)


if __name__ == "__main__":
    main(sys.argv[1:])
