"""The command line shared by `python -m kitdist.pretrain` and `python -m kitdist.finetune`."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from kitdist.config import ConfigError, RunConfig, load_config

CONFIG_ROOT = Path(__file__).resolve().parents[1] / "configs"


def shipped_configs(kind: str) -> list[str]:
    folder = CONFIG_ROOT / kind
    return sorted(str(path.relative_to(CONFIG_ROOT.parent)) for path in folder.glob("*.yaml"))


def parser(prog: str, description: str, kind: str) -> argparse.ArgumentParser:
    shipped = "\n  ".join(shipped_configs(kind)) or "(none found)"
    epilog = (
        f"config files that ship:\n  {shipped}\n\n"
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
    result.add_argument("--config", help="YAML run config (one of those below, or your own)")
    result.add_argument("overrides", nargs="*", metavar="section.key=value", help="config overrides")
    return result


def config_or_exit(config: str | None, overrides: Sequence[str], base: Sequence[str] = ()) -> RunConfig:
    """The run config, or a one-line error (naming the key and its source) and exit status 2."""
    try:
        return load_config(config, [*base, *overrides])
    except ConfigError as err:
        sys.exit(f"error: {err}")
