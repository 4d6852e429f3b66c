"""kitdist's imports read top-down (lazy, in-function imports included, as `tools/code_figures.py` finds
them): no module imports one that imports it back, the strategies (`kitdist.distributed`) know nothing of the
training package that builds them, and training reaches no entry point (console, launch, CLIs)."""

from __future__ import annotations

import runpy
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FIGURES = runpy.run_path(str(REPO / "tools" / "code_figures.py"))
ENTRY_POINTS = (
    "console",
    "summary",
    "launch",
    "pretrain",
    "finetune",
    "evaluate",
    "restore",
    "sidd_submit",
    "torchrun",
    "cli",
)


def test_no_module_imports_one_that_imports_it_back():
    graph = FIGURES["import_graph"](REPO)
    assert "kitdist.train.loop" in graph and graph["kitdist.train.loop"]  # the graph was read
    assert FIGURES["cycles"](graph) == []


def test_strategies_and_training_import_downwards_only():
    graph = FIGURES["import_graph"](REPO)
    for module, targets in graph.items():
        if module.startswith("kitdist.distributed"):
            assert not [t for t in targets if t.startswith("kitdist.train")], module
        if module.startswith("kitdist.train"):
            assert not [t for t in targets if t.removeprefix("kitdist.") in ENTRY_POINTS], module


def test_cycles_are_found():
    assert FIGURES["cycles"]({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_type_only_imports_are_no_edges(tmp_path):
    """`if TYPE_CHECKING:` imports never run (kitdist.batching names kitdist.config's RunConfig so)."""
    package = tmp_path / "kitdist"
    package.mkdir()
    (package / "a.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from kitdist.b import B\n"
    )
    (package / "b.py").write_text("from kitdist.a import A\n")
    assert FIGURES["import_graph"](tmp_path) == {"kitdist.a": set(), "kitdist.b": {"kitdist.a"}}
