"""`python -m kitdist.pretrain`: pre-train KiT on clean images with synthetic degradations.

With no --config it is the embedded default: a local Ray cluster on this machine, CPU, the `debug`-size
KiT, trained for about 10 minutes on 2 idle cores (0.15 s a step) on shards built once (cached under
./runs/data) from the photographs that scikit-image ships, two of them held out for validation. With a
config and a cluster the same code path runs on many GPUs.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

from kitdist import storage
from kitdist.cli import config_or_exit, parser

# The embedded default run; every key can still be overridden on the command line (`train.max_steps=60`
# makes it a smoke run). 3600 steps of 8 crops of 64 px at lr 3e-3 (cosine, 20 warm-up steps) train a
# denoiser that beats non-local means at sigma 25 on the held-out photographs (benchmarks/RESULTS.md,
# "The embedded default after issue 16": +0.36 dB, 10 min on 2 idle cores; 3000 steps: +0.10 to +0.20 dB,
# 2400: -0.07 dB; a higher lr (5e-3) was behind at the same step in the recipe probes). fp32, not bf16: without AMX, bf16 matmuls on CPU run
# about 5x slower than fp32 ones (measured on the 2-core dev box); GPU configs use bf16. The two workers
# share the machine's cores (dist.cpus_per_worker=0, the default).
EMBEDDED = [
    "model.size=debug",
    "data.crop_size=64",
    "data.global_batch_size=8",
    "data.val_crop_size=128",
    "data.num_workers=0",
    "train.max_steps=3600",
    "train.warmup_steps=20",
    "train.lr=3e-3",
    "train.log_every=100",
    "train.checkpoint_every=600",
    "train.precision=fp32",
    "dist.strategy=deepspeed",
    "dist.zero_stage=2",
    "dist.num_workers=2",
    "storage.root=runs",
    "storage.run_name=embedded",
]
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


def main(argv: Sequence[str] | None = None) -> None:
    args = parser(
        "python -m kitdist.pretrain",
        "Pre-train KiT on clean images (synthetic noise/blur/JPEG) with Ray Train + DeepSpeed.\n"
        "No --config: the embedded default (local Ray, CPU, debug-size KiT, scikit-image photographs).",
        "pretrain",
    ).parse_args(argv)
    if args.config is None:
        cfg = config_or_exit(None, args.overrides, base=EMBEDDED)
        if not cfg.data.train_shards:
            try:
                train_url, val_url = ensure_photo_shards()
            except RuntimeError as err:
                sys.exit(f"error: {err}")
            extra = [f"data.train_shards={train_url}", f"data.val_shards={val_url}"]
            cfg = config_or_exit(None, [*extra, *args.overrides], base=EMBEDDED)
    else:
        cfg = config_or_exit(args.config, args.overrides)
    from kitdist.launch import run_or_exit

    run_or_exit(cfg, paired=False)


if __name__ == "__main__":
    main(sys.argv[1:])
