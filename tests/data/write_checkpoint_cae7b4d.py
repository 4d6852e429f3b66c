"""How tests/data/checkpoint-cae7b4d/ was made: a checkpoint written by the code of commit cae7b4d (before
the run-folder format moved to kitdist.checkpoints), kept to prove that later code still reads it.

    PYTHONPATH=<checkout at cae7b4d>:<that checkout>/tests python tests/data/write_checkpoint_cae7b4d.py OUT

A `debug` KiT after one DDP step on a real stream's first batch (tiles of scikit-image's photographs),
written by that commit's own `write_checkpoint` with the stream's real state; the shards are removed.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import shardkit
import torch

from kitdist.config import load_config
from kitdist.data import TrainStream
from kitdist.distributed.ddp_strategy import DDPStrategy
from kitdist.model import build_model
from kitdist.pretrain import photo_paths
from kitdist.train.checkpoint import checkpoint_name, write_checkpoint
from kitdist.train.metrics import charbonnier_loss


def main(out: Path) -> None:
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as shards:
        shardkit.write_set(shards, photo_paths(), [8, 8], tile=64)
        overrides = ["model.size=debug", "dist.strategy=ddp", "dist.zero_stage=0", "dist.num_workers=1"]
        overrides += ["train.precision=fp32", "data.global_batch_size=2", "data.num_workers=0"]
        overrides += [f"data.train_shards={shards}", "data.crop_size=32", "storage.run_name=legacy"]
        cfg = load_config(None, overrides)
        stream = TrainStream(cfg, 0, 1, resume=None, device="cpu")
        batch = next(iter(stream))
        strategy = DDPStrategy(cfg, build_model(cfg.model), torch.device("cpu"))
        strategy.train(True)
        loss = charbonnier_loss(strategy.forward(batch["input"]), batch["target"])
        strategy.backward(loss, last_micro_batch=True)
        strategy.step()
        write_checkpoint(out / checkpoint_name(1), cfg, strategy, 1, [stream.state_dict()], 0, 1)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
