"""The command line shared by `python -m kitdist.pretrain`, `python -m kitdist.finetune` and
`kitdist.torchrun`: the parser, the names of the configs that ship, a config or a one-line error."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kitdist.config import ConfigError, RunConfig, load_config
from kitdist.package_data import config_names


@dataclass(frozen=True)
class TrainCommand:
    """One of the training commands: they share one code path and differ only in what is stated here."""

    prog: str
    description: str
    configs: str  # the folder under configs/ whose files --help lists
    default_config: Path | None  # run without --config: the embedded default; None: --config is required
    fine_tune: bool  # the run must start from train.init_weights and learn a restoration (preflight.check_fine_tune_data)


def parser(prog: str, description: str, kind: str) -> argparse.ArgumentParser:
    shipped = "\n  ".join(config_names(kind)) or "(none found)"
    epilog = (
        f"configs that ship with kitdist (--config NAME, from any folder; your own file's path also works):"
        f"\n  {shipped}\n\n"
        "Overrides are section.key=value (YAML values), e.g. train.max_steps=200 dist.num_workers=8;\n"
        "sections and keys: model, data, degrade, train, dist, storage (see kitdist/config.py).\n"
        "Runs on the Ray cluster at dist.ray_address or $RAY_ADDRESS, else on a local one.\n"
        "S3 endpoint and credentials come from AWS_ENDPOINT_URL / AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY.\n"
        "Running the same command again with the same storage.run_name resumes from its latest checkpoint."
    )
    result = argparse.ArgumentParser(
        prog=prog,
        description=description,
        epilog=epilog,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    result.add_argument("--config", help="YAML run config: a shipped one's name (below) or your own file")
    result.add_argument(
        "--check",
        action="store_true",
        help="run every check, print the resolved config, the run name's state (new, resumed and what changed,"
        " restarted), the batches and the memory estimate, and exit without starting Ray",
    )
    result.add_argument("overrides", nargs="*", metavar="section.key=value", help="config overrides")
    return result


def config_or_exit(
    config: str | Path | None, overrides: Sequence[str], values: Mapping[str, Any] = {}
) -> RunConfig:
    """The run config, or a one-line error (naming the key and its source) and exit status 2."""
    try:
        return load_config(config, overrides, values)
    except ConfigError as err:
        sys.exit(f"error: {err}")
