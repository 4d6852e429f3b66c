"""`python -m kitdist.finetune --config FILE`: fine-tune pre-trained KiT weights on a paired dataset
(input/target shards, e.g. SIDD, GoPro, Rain13K), with the same Ray Train + DeepSpeed machinery as
pre-training. `train.init_weights` names the pre-trained weights.safetensors (any storage URL)."""

from __future__ import annotations

import sys
from collections.abc import Sequence

from kitdist.cli import config_or_exit, parser


def main(argv: Sequence[str] | None = None) -> None:
    args = parser(
        "python -m kitdist.finetune",
        "Fine-tune KiT from pre-trained weights (train.init_weights) on paired input/target shards.",
        "finetune",
    ).parse_args(argv)
    if args.config is None:
        sys.exit("error: --config: fine-tuning needs a config naming the paired dataset (see --help)")
    cfg = config_or_exit(args.config, args.overrides)
    from kitdist.launch import run_or_exit

    run_or_exit(cfg, paired=True)


if __name__ == "__main__":
    main(sys.argv[1:])
