"""`python -m kitdist.finetune --config FILE`: fine-tune pre-trained KiT weights on a paired dataset
(input/target shards, e.g. SIDD, GoPro, Rain13K), or on clean shards with a synthetic degradation drawn
afresh each step (`data.kind: clean` + `degrade.*`, e.g. Gaussian denoising at one sigma). It is
`python -m kitdist.pretrain`'s code path (same keys, cluster, checkpoints and resume) with fine-tuning's
requirements, checked before any worker starts (`kitdist.preflight`): a --config, a
restoration to learn and `train.init_weights` naming the pre-trained weights.safetensors (any storage
URL)."""

from __future__ import annotations

import sys
from collections.abc import Sequence

from kitdist.cli import TrainCommand
from kitdist.pretrain import run_command

FINETUNE = TrainCommand(
    prog="python -m kitdist.finetune",
    description="Fine-tune KiT from pre-trained weights on paired input/target shards: the training of\n"
    "`python -m kitdist.pretrain` (same keys, cluster, checkpoints and resume) that requires --config,\n"
    "data.kind: paired (or clean shards with a degrade.* drawn afresh each step, e.g. Gaussian noise of\n"
    "one sigma) and train.init_weights (the pre-trained weights.safetensors, any storage URL).",
    configs="finetune",
    default_config=None,
    fine_tune=True,
)


def main(argv: Sequence[str] | None = None) -> None:
    run_command(argv, FINETUNE)


if __name__ == "__main__":
    main(sys.argv[1:])
