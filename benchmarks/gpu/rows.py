"""The GPU battery's rows on disk: each section appends what it measured, one JSON line at a time, to the
battery's rows.jsonl (KITDIST_BATTERY_ROWS), so that a section that times out or is killed keeps what it
had measured; and the third-party distributions a section's process loaded (its `imports` row), which the
battery checks against what the GPU machines carry and have.
"""

from __future__ import annotations

import json
import os
import sys
import sysconfig
import time
from pathlib import Path

ROWS_ENV = "KITDIST_BATTERY_ROWS"  # the rows file; unset: rows are only printed
SECTION_ENV = "KITDIST_BATTERY_SECTION"  # the section the rows belong to
REPO = Path(__file__).resolve().parents[2]


def record(row: dict) -> None:
    """Appends `row` (tagged with this process's section) to the rows file, and prints it."""
    line = json.dumps({"section": os.environ.get(SECTION_ENV, "?"), "at": time.strftime("%H:%M:%S"), **row},
                      default=str)  # fmt: skip
    print(line, flush=True)
    path = os.environ.get(ROWS_ENV)
    if path:
        # one write of a whole line to a file opened for appending: lines of several processes never mix
        with open(path, "a") as rows:
            rows.write(line + "\n")


def read(path: Path, section: str) -> list[dict]:
    """The rows `section` wrote to `path` (without the section and the time of day, which rows.jsonl
    keeps); a line cut short by a kill is skipped."""
    if not path.is_file():
        return []
    found = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict) and row.pop("section", None) == section:
            row.pop("at", None)
            found.append(row)
    return found


def record_imports() -> None:
    """Records the third-party distributions this process has loaded (at the end of a section)."""
    record({"imports": loaded_distributions()})


def loaded_distributions() -> list[str]:
    """Distributions (normalised names) of every module loaded so far that is neither the standard library
    nor this repository's; a module is its distribution's by the folder it was loaded from (a vendored
    copy inside setuptools is setuptools'), "module NAME" where no installed distribution owns it."""
    from importlib import metadata

    owners = metadata.packages_distributions()
    standard = {Path(sysconfig.get_path(key)).resolve() for key in ("stdlib", "platstdlib")}
    standard |= {folder / "lib-dynload" for folder in standard}
    roots = {Path(entry).resolve() for entry in sys.path if entry}
    found = set()
    for name in {module.split(".")[0] for module in list(sys.modules)}:
        where = getattr(sys.modules.get(name), "__file__", None)
        if name in sys.stdlib_module_names or name.startswith("__") or not where:
            continue  # the standard library, __main__, import hooks (an editable install's finder)
        path = Path(where).resolve()
        if path.is_relative_to(REPO):
            continue
        holding = [root for root in roots if path.is_relative_to(root)]
        if holding and all(root in standard for root in holding):
            continue
        # the outermost folder on sys.path that holds it (a package's vendored folder may be on it too)
        root = min(
            (root for root in holding if root not in standard), key=lambda root: len(root.parts), default=None
        )
        folder = path.relative_to(root).parts[0].split(".")[0] if root else name  # numpy/, six.py, _x.*.so
        names = owners.get(folder) or owners.get(name)
        if names:
            found.update(normalise(owner) for owner in names)
        else:
            found.add(f"module {name}")
    return sorted(found)


def normalise(distribution: str) -> str:
    """A distribution's name as PEP 503 compares them."""
    return distribution.lower().replace("_", "-").replace(".", "-")
