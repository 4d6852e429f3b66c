"""Recipe probes for the embedded default: the same model, data, optimiser, schedule and loss as
`python -m kitdist.pretrain`, in one plain process (no Ray, no DeepSpeed), so a recipe's quality can be
seen in minutes; each run's PSNR at sigma 25 on the held-out photographs is measured exactly as
`benchmarks/denoise_quality.py` measures it (centre 256 px crops, its seeds, RGB, 8-bit rounded).

    python benchmarks/recipe.py --threads 1 --eval 600,1200 train.max_steps=1200 train.lr=4e-3

Overrides (`section.key=value`) apply on top of `kitdist.pretrain.EMBEDDED_CONFIG`. One process with the global
batch is the same optimisation as the embedded default's 2 data-parallel workers (each rank draws its own
LSH rotations there); its step time is not theirs: compare recipes' seconds per step with each other.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from denoise_quality import centre_crop, held_out_photos  # noqa: E402

from kitdist.config import load_config  # noqa: E402
from kitdist.pretrain import EMBEDDED_CONFIG, ensure_photo_shards  # noqa: E402
from kitdist.train.validation import image_metrics, to_uint8  # noqa: E402

SIGMA = 25
NLM_SIGMA25_DB = 35.54  # benchmarks/RESULTS.md, "Restoration quality"


def noisy_photos(crop: int = 256) -> list[tuple[np.ndarray, np.ndarray]]:
    """(noisy float HWC, clean uint8 HWC) per held-out photo, seeded as denoise_quality.py seeds them."""
    pairs = []
    for index, path in enumerate(held_out_photos()):
        clean = centre_crop(np.asarray(Image.open(path).convert("RGB")), crop)
        rng = np.random.default_rng(1000 * index + SIGMA)
        pairs.append((clean / 255.0 + rng.normal(0.0, SIGMA / 255.0, clean.shape), clean))
    return pairs


@torch.no_grad()
def held_out_psnr(model: torch.nn.Module, pairs: list[tuple[np.ndarray, np.ndarray]]) -> float:
    model.eval()
    values = []
    for noisy, clean in pairs:
        x = torch.from_numpy(noisy.astype(np.float32)).permute(2, 0, 1)[None]
        output = model(x)[0].permute(1, 2, 0).numpy()
        values.append(image_metrics(to_uint8(output), clean)["psnr_rgb"])
    model.train()
    return float(np.mean(values))


def probe(overrides: list[str], evals: set[int]) -> None:
    from kitdist.data import TrainStream
    from kitdist.model import build_model
    from kitdist.train.losses import LOSSES
    from kitdist.train.optim import build_optimizer, build_scheduler

    train_url, val_url = ensure_photo_shards()
    cfg = load_config(
        EMBEDDED_CONFIG, [f"data.train_shards={train_url}", f"data.val_shards={val_url}", *overrides]
    )
    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg.model).train()
    optimizer = build_optimizer(model.parameters(), cfg.train)
    scheduler = build_scheduler(optimizer, cfg.train)
    loss_fn, pairs = LOSSES[cfg.train.loss], noisy_photos()
    batches, seconds = iter(TrainStream(cfg, 0, 1)), []
    for step in range(1, cfg.train.max_steps + 1):
        batch, started = next(batches), time.perf_counter()
        loss = loss_fn(model(batch["input"]), batch["target"])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
        optimizer.step()
        scheduler.step()
        seconds.append(time.perf_counter() - started)
        if step in evals or step == cfg.train.max_steps:
            db = held_out_psnr(model, pairs)
            print(f"step {step} | loss {loss.item():.4f} | s/step (median) {statistics.median(seconds):.3f} | "
                  f"sigma-25 PSNR {db:.2f} dB ({db - NLM_SIGMA25_DB:+.2f} vs NLM)", flush=True)  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1, as one worker)")
    parser.add_argument("--eval", default="", help="comma-separated steps to measure at (and the last)")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"recipe: {' '.join(args.overrides) or '(embedded default)'}; threads {args.threads}", flush=True)
    probe(args.overrides, {int(s) for s in args.eval.split(",") if s})


if __name__ == "__main__":
    main()
