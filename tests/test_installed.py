"""kitdist as a user installs it: the wheel holds every shipped config and recipe, and an installed (not
editable) kitdist finds them from a folder outside the repository."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import yaml

from kitdist.config import load_config, to_dict

ROOT = Path(__file__).resolve().parents[1]
PIP = [sys.executable, "-m", "pip", "-q", "--disable-pip-version-check"]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The wheel built from a copy of this checkout (as `pip wheel .` builds it), without its tests."""
    tmp = tmp_path_factory.mktemp("wheel")
    source = tmp / "source"
    ignore = shutil.ignore_patterns(".git", "runs", "build", "*.egg-info", "__pycache__", ".*cache", "tests")
    shutil.copytree(ROOT, source, symlinks=True, ignore=ignore)
    subprocess.run([*PIP, "wheel", "--no-deps", "--no-build-isolation", "-w", tmp, source], check=True)
    (built,) = tmp.glob("kitdist-*.whl")
    return built


def test_the_wheel_holds_every_shipped_config_and_recipe(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    configs = sorted(ROOT.glob("configs/*/*.yaml"))
    recipes = sorted(ROOT.glob("shards/*.yaml"))
    assert configs and recipes
    missing = [
        f"kitdist/{path.relative_to(ROOT)}"
        for path in configs
        if f"kitdist/{path.relative_to(ROOT)}" not in names
    ]
    missing += [
        f"kitdist/recipes/{path.name}" for path in recipes if f"kitdist/recipes/{path.name}" not in names
    ]
    assert missing == []


PROBE = """
import kitdist, yaml
from kitdist.config import load_config, to_dict
from kitdist.pretrain import EMBEDDED_CONFIG
from kitdist.shards.recipes import available_recipes, load_recipe

print(yaml.safe_dump({
    "file": kitdist.__file__,
    "embedded": str(EMBEDDED_CONFIG),
    "debug": to_dict(load_config("pretrain/debug")),
    "recipes": available_recipes(),
    "folder": load_recipe("folder").kind,
}))
"""


def test_an_installed_kitdist_finds_its_configs_and_recipes_from_another_folder(wheel, tmp_path):
    """Installed from the wheel (not editable), run from an empty folder: a shipped config loads by the name
    --help prints, the embedded default and the `folder` recipe are found inside the installed package."""
    site = tmp_path / "site"
    subprocess.run([*PIP, "install", "--no-deps", "--target", site, wheel], check=True)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {**os.environ, "PYTHONPATH": str(site)}  # the installed copy, not this checkout
    run = dict(cwd=elsewhere, env=env, capture_output=True, text=True, check=True)
    found = yaml.safe_load(subprocess.run([sys.executable, "-c", PROBE], **run).stdout)
    assert found["file"].startswith(str(site)) and found["embedded"].startswith(str(site))
    assert found["debug"] == to_dict(load_config(ROOT / "configs/pretrain/debug.yaml"))
    assert found["recipes"] == sorted(path.stem for path in ROOT.glob("shards/*.yaml"))
    assert found["folder"] == "clean"
    help_text = subprocess.run([sys.executable, "-m", "kitdist.pretrain", "--help"], **run).stdout
    assert "\n  pretrain/debug\n" in help_text
