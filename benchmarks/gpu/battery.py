"""The GPU battery's driver: runs each section in its own process group under its own time limit, keeps
the rows a section wrote as it went (rows.py) whatever becomes of it, rewrites OUTDIR/report.json and
report.md after every section, and leaves no process, lock or cache behind.

    benchmarks/gpu/run.sh OUTDIR --call 1      # run.sh sets PYTHONPATH and installs carried wheels first
    benchmarks/gpu/run.sh OUTDIR --call 2
    benchmarks/gpu/run.sh OUTDIR --cpu         # every section, tiny shapes, on a CPU
    python benchmarks/gpu/battery.py --check-imports   # what each section imports against what the GPU
                                                       # machines have (README.md) and carry (wheels.sh)

Two calls of a lent GPU machine, most important first: call 1 is device, tests (`pytest -m gpu`),
attention (KLA against window attention at `kit`'s training shapes) and restore (a 1920x1080 photograph);
call 2 is train (engines, precisions, activation checkpointing), loader, growth (the model's forward on
growing images, up to what fits) and resume (the torchrun command line, checkpoint and resume) in what
time is left. A section that fails or runs out of time is recorded with its rows and error; the next runs.
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import rows
from report import markdown

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]


@dataclass(frozen=True)
class Section:
    call: int  # which prepared call of a lent GPU machine runs it (README.md)
    limit_s: float  # at most, on a GPU
    keep_s: float  # kept for it by the sections before it in the same call (on a GPU)
    cpu_limit_s: float  # at most, in --cpu mode


SECTIONS = {
    "device": Section(1, 25, 0, 60),
    "tests": Section(1, 170, 0, 120),  # compiles the Flex kernels and a whole model: what the call can spare
    "attention": Section(1, 60, 45, 150),
    "restore": Section(1, 40, 30, 90),
    "train": Section(2, 150, 0, 300),
    "loader": Section(2, 35, 25, 90),
    "growth": Section(2, 45, 30, 90),
    "resume": Section(2, 90, 0, 200),  # what call 2 has left
}
MIN_SECTION_S = 10  # a section given less is recorded as not run
CALL_BUDGET_S = 235  # one call's sections on a GPU; run.sh and the wheels fit in the call's timeout_s (300)
CPU_BUDGET_S = 540  # every section in --cpu mode
TESTS = ("tests/test_attention_gpu.py", "tests/test_gpu_training.py")  # the files with `gpu` tests
# the tests load the plugins they name and no other: what each machine happens to have installed (the GPU
# image has pytest-xdist, -cov, -benchmark, ...) changes nothing
SECTION_ENV = {"tests": {"PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1"}}


def commands(name: str, cpu: bool, result: Path, scratch: Path) -> list[str]:
    """The command that runs section `name`, writing its summary as JSON to `result`."""
    python = sys.executable
    if name == "tests":  # rows per test (pytest_rows.py); output uncaptured at the fd level (conftest's
        # time limit dumps the stacks of a stuck test there); no plugin but ours (SECTION_ENV)
        return [python, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider", "-p", "pytest_rows",
                "--capture=sys", "--continue-on-collection-errors", *(str(REPO / path) for path in TESTS)]  # fmt: skip
    mode = ["--cpu"] if cpu else []
    if name == "train":
        launcher = [
            python,
            "-m",
            "torch.distributed.run",
            "--nproc-per-node",
            "1",
            "--master-port",
            free_port(),
        ]
        return [*launcher, str(HERE / "sections.py"), "train", str(result), str(scratch), *mode]
    return [python, str(HERE / "sections.py"), name, str(result), str(scratch), *mode]


def free_port() -> str:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return str(probe.getsockname()[1])


# --- scratch: caches and temporary files of one run, removed at its end --------------------------------


def make_scratch() -> Path:
    """A folder for this run's data, caches and temporary files (outside OUTDIR, which comes back from the
    GPU machine with a limit on its files). Compile caches are this run's own: a section killed while
    compiling leaves its lock (DeepSpeed's JIT builds wait on torch's lock file forever) with the folder."""
    scratch = Path(tempfile.mkdtemp(prefix="kitdist-battery-"))
    for folder in ("tmp", "cache", "torch_extensions", "triton", "inductor", "cuda"):
        (scratch / folder).mkdir()
    seed_extensions(scratch / "torch_extensions")
    return scratch


def scratch_env(scratch: Path) -> dict[str, str]:
    return {
        "TMPDIR": str(scratch / "tmp"),
        "XDG_CACHE_HOME": str(scratch / "cache"),
        "TORCH_EXTENSIONS_DIR": str(scratch / "torch_extensions"),
        "TRITON_CACHE_DIR": str(scratch / "triton"),
        "TORCHINDUCTOR_CACHE_DIR": str(scratch / "inductor"),
        "CUDA_CACHE_PATH": str(scratch / "cuda"),
        "MPLCONFIGDIR": str(scratch / "cache"),
    }


def seed_extensions(target: Path) -> None:
    """Copies this Python's finished torch extension builds (DeepSpeed's CPU communication op: ~40 s to
    build on a small CPU) into the run's own folder. Only read: a build in progress or left locked stays
    where it is, and nothing is written back."""
    tag = f"py{sys.version_info.major}{sys.version_info.minor}{getattr(sys, 'abiflags', '')}_"
    if os.environ.get("TORCH_EXTENSIONS_DIR"):
        roots = [Path(os.environ["TORCH_EXTENSIONS_DIR"])]
    else:
        cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "torch_extensions"
        roots = sorted(cache.glob(f"{tag}*"))
    if len(roots) != 1 or not roots[0].is_dir():
        return  # none, or builds for several torch builds (CPU, CUDA): which is ours is torch's to say
    for build in roots[0].iterdir():
        if build.is_dir() and not (build / "lock").exists() and any(build.glob("*.so")):
            shutil.copytree(build, target / build.name, symlinks=True)


# --- one section ---------------------------------------------------------------------------------------


def run_section(name: str, command: list[str], limit: float, env: dict, log, rows_path: Path,
                result: Path) -> dict:  # fmt: skip
    """Runs one section's command in a process group of its own; past `limit` the group and every
    descendant are ended. Its summary (`result`), its rows and how it ended. Never raises."""
    log.write(f"\n===== {name}: {' '.join(command)} (limit {limit:.0f} s)\n")
    log.flush()
    env = {
        **env,
        **SECTION_ENV.get(name, {}),
        rows.SECTION_ENV: name,
        rows.ROWS_ENV: str(rows_path),
        "KITDIST_BATTERY_DEADLINE": str(time.time() + limit),
    }
    started = time.perf_counter()
    process = subprocess.Popen(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                               start_new_session=True)  # fmt: skip
    try:
        code = process.wait(timeout=limit)
    except subprocess.TimeoutExpired:
        code = None
    finally:
        ended = end_processes(process)
    entry = summary_of(name, result, rows.read(rows_path, name))
    entry.update(seconds=round(time.perf_counter() - started, 1), returncode=code)
    if ended:
        entry["processes_ended"] = ended
    if code is None:
        running = f" (running: {entry['running']})" if entry.get("running") else ""
        entry.update(ok=False, error=f"timed out after {limit:.0f} s{running}")
    elif code != 0 and entry.get("ok", True):
        entry.update(ok=False, error=entry.get("error") or f"exit status {code}")
    entry.setdefault("ok", code == 0)
    return entry


def end_processes(process: subprocess.Popen, grace_s: float = 5.0) -> int:
    """Ends what is left of a section: its process group (DataLoader workers, compile workers) and every
    descendant in another session (torchrun starts its workers in sessions of their own). SIGTERM first,
    so that torchrun stops its workers; SIGKILL after `grace_s`. How many processes were still there."""
    family = left_of(process)
    if not family:
        process.wait()
        return 0
    signal_all(family, signal.SIGTERM)
    try:
        process.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        pass
    family |= left_of(process)
    signal_all(family, signal.SIGKILL)
    process.wait()
    deadline = time.monotonic() + grace_s
    while any(alive(pid) for pid in family) and time.monotonic() < deadline:
        time.sleep(0.05)
    return len(family)


def signal_all(pids: set[int], sig: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except (ProcessLookupError, PermissionError):
            pass


def left_of(process: subprocess.Popen) -> set[int]:
    """The section's process if it runs, the living members of its process group (its id is the
    section's pid: start_new_session) and the living descendants of either."""
    table = process_table()
    found = {pid for pid, (_, group) in table.items() if group == process.pid}
    if process.poll() is None:
        found.add(process.pid)
    children: dict[int, list[int]] = {}
    for pid, (parent, _) in table.items():
        children.setdefault(parent, []).append(pid)
    todo = [process.pid, *found]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return {pid for pid in found if alive(pid)}


def process_table() -> dict[int, tuple[int, int]]:
    """pid -> (parent pid, process group) of every process, from /proc."""
    table = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        fields = text[text.rindex(")") + 2 :].split()
        table[int(stat.parent.name)] = (int(fields[1]), int(fields[2]))
    return table


def alive(pid: int) -> bool:
    """Running, or not yet reaped but not a zombie."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return text[text.rindex(")") + 2] not in "ZX"


def summary_of(name: str, result: Path, section_rows: list[dict]) -> dict:
    """A section's report entry: its summary (tests: counted from its rows), its rows, the distributions
    its process loaded and those of them the GPU machines neither have nor carry."""
    imports = [row["imports"] for row in section_rows if "imports" in row]
    section_rows = [row for row in section_rows if "imports" not in row]
    if name == "tests":
        entry = test_counts(section_rows)
    elif result.is_file():
        try:
            entry = json.loads(result.read_text())
        except json.JSONDecodeError as err:
            entry = {"ok": False, "error": f"{result.name} is not JSON: {err}"}
    else:
        entry = {}
    entry["rows"] = section_rows
    if imports:
        entry["imports"] = imports[-1]
        entry["not_on_gpu_machines"] = sorted(set(imports[-1]) - available_distributions())
    return entry


def test_counts(section_rows: list[dict]) -> dict:
    """pytest's outcome per test from the tests section's rows: counts, the failing tests, the one that
    was running when the section ended (if any)."""
    outcomes: dict[str, str] = {}
    errors: dict[str, str] = {}
    for row in section_rows:
        test, outcome = row.get("test"), row.get("outcome")
        if test is None or outcome is None:
            continue
        if outcome == "started" or outcomes.get(test) != "failed":
            outcomes[test] = outcome
        if "error" in row:
            errors.setdefault(test, row["error"])
    counts = {
        key: sum(value == key for value in outcomes.values()) for key in ("passed", "failed", "skipped")
    }
    failing = [f"{test}: {errors.get(test, '')}" for test, value in outcomes.items() if value == "failed"]
    running = [test for test, value in outcomes.items() if value == "started"]
    entry = {"ok": bool(outcomes) and not failing and not running, **counts, "failing": failing}
    if running:
        entry["running"] = running[0]
    if not outcomes:
        entry["error"] = "pytest reported no test"
    return entry


# --- what the GPU machines have and carry --------------------------------------------------------------


def image_packages() -> set[str]:
    """The Python distributions on the GPU machines' image, from README.md's list."""
    text = (HERE / "README.md").read_text()
    block = re.search(r"<!-- image packages -->\s*```text\n(.*?)```", text, re.S)
    if block is None:
        raise RuntimeError(
            "benchmarks/gpu/README.md lists no image packages (the <!-- image packages --> block)"
        )
    return {rows.normalise(name) for name in block.group(1).replace(",", " ").split()}


def carried_packages() -> set[str]:
    """The distributions wheels.sh puts into .whl/ (name==version arguments)."""
    text = (HERE / "wheels.sh").read_text()
    return {rows.normalise(name) for name in re.findall(r"\b([A-Za-z][\w.-]*)==\d", text)}


def available_distributions() -> set[str]:
    return image_packages() | carried_packages()


# (importing module, imported module): imports that sit in code no section runs
NOT_RUN = {
    ("kitdist.launch", "ray"): "the Ray launcher; the battery launches with torchrun",
    ("kitdist.launch", "kitdist.failures"): "the Ray launcher's failure handling (kitdist.raycompat: Ray)",
    ("kitdist.launch", "kitdist.raycompat"): "the Ray launcher's trainer (Ray)",
    ("kitdist.console", "kitdist.failures"): "the Ray driver's console (Ray's worker output)",
    ("kitdist.console", "kitdist.raycompat"): "the Ray driver's console (Ray's worker output)",
    ("kitdist.train.session", "ray"): "reports to a Ray Train session; torchrun runs have none",
    ("kitdist.train.recorder", "wandb"): "train.report_to=wandb; the battery does not ask for it",
    ("kitdist.model.kit", "apex"): "model.fused_layernorm=true only (and apex optional there)",
    ("kitdist.train.optim", "apex"): "train.fused_optimizer=true only (and apex optional there)",
    ("kitdist.shards.verify", "webdataset"): "`shards verify --deep` only",
    ("loader", "shardkit"): "benchmarks/loader.py's shard sets; the loader section uses kitdist's builder",
    ("loader", "s3server"): "benchmarks/loader.py's S3 measures; the loader section reads local shards",
}
# what each section runs: modules (all their imports, and those of the repository's modules they import)
# or a function of sections.py (its own imports and those of the sections.py functions it names)
ENTRIES = {
    "device": ("sections:device_section",),
    "tests": ("conftest", "pytest_rows", *(Path(path).stem for path in TESTS)),
    "attention": ("sections:attention_section",),
    "restore": ("sections:restore_section",),
    "train": ("sections:train_section", "torch.distributed.run"),
    "loader": ("sections:loader_section",),
    "growth": ("sections:growth_section",),
    "resume": ("sections:resume_section", "kitdist.torchrun", "kitdist.pretrain"),
}
SEARCH_PATH = (REPO, REPO / "tests", REPO / "benchmarks", HERE)


def static_imports(section: str) -> dict[str, set[str]]:
    """Top-level third-party modules a section's code imports, read from the source (every import, at
    module level or in a function; NOT_RUN left out) -> the repository modules that import them."""
    found: dict[str, set[str]] = {}
    seen: set[str] = set()
    todo: list[tuple[str, str]] = []
    for entry in ENTRIES[section]:
        module, _, function = entry.partition(":")
        if function:
            for name in function_imports(HERE / f"{module}.py", function):
                todo.append((module, name))
        else:
            todo.append(("", module))
    while todo:
        importer, name = todo.pop()
        top = name.split(".")[0]
        if not_run(importer, name) or name in seen:
            continue
        path = local_module(name)
        if path is None:
            if local_module(top) is None and top not in sys.stdlib_module_names:
                found.setdefault(top, set()).add(importer)
            continue
        seen.add(name)
        parts = name.split(".")
        todo += [(importer, ".".join(parts[:i])) for i in range(1, len(parts))]  # parent packages
        todo += [(name, imported) for imported in module_imports(path, name)]
    return found


def not_run(importer: str, name: str) -> bool:
    return any(importer == where and (name == what or name.startswith(f"{what}.")) for where, what in NOT_RUN)


def local_module(name: str) -> Path | None:
    for root in SEARCH_PATH:
        for path in (root / f"{name.replace('.', '/')}.py", root / name.replace(".", "/") / "__init__.py"):
            if path.is_file():
                return path
    return None


def module_imports(path: Path, name: str) -> set[str]:
    """Every module `path` imports, anywhere in it (relative imports resolved against `name`)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    return imports_in(ast.parse(path.read_text()), package)


def imports_in(tree: ast.AST, package: str) -> set[str]:
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{parent}.{base}".strip(".")
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)  # submodules, if they are
    return found


def function_imports(path: Path, function: str) -> set[str]:
    """What a function of `path` needs: the module's top-level imports, the function's own, and those of
    the module's functions and classes it names (transitively)."""
    tree = ast.parse(path.read_text())
    defined = {node.name: node for node in tree.body if isinstance(node, ast.FunctionDef | ast.ClassDef)}
    found = set()
    for node in tree.body:
        if isinstance(node, ast.Import | ast.ImportFrom):
            found |= imports_in(node, "")
    todo, done = [function], set()
    while todo:
        name = todo.pop()
        if name in done or name not in defined:
            continue
        done.add(name)
        found |= imports_in(defined[name], "")
        todo += [node.id for node in ast.walk(defined[name]) if isinstance(node, ast.Name)]
    return found


def check_imports() -> dict[str, dict[str, list[str]]]:
    """Per section: every third-party distribution its code imports, and those the GPU machines neither
    have nor carry (with the modules that import them)."""
    from importlib import metadata

    owners = metadata.packages_distributions()
    available = available_distributions()
    report = {}
    for section in SECTIONS:
        imported = static_imports(section)
        distributions, missing = set(), {}
        for top, importers in imported.items():
            names = {rows.normalise(owner) for owner in owners.get(top, [])} or {
                f"{top} (not installed here)"
            }
            distributions |= names
            if not names & available:
                missing[f"{'/'.join(sorted(names))} (import {top})"] = sorted(importers)
        report[section] = {"imports": sorted(distributions), "missing": missing}
    return report


# --- the run -------------------------------------------------------------------------------------------


def write_report(out: Path, report: dict) -> None:
    for name, text in (("report.json", json.dumps(report, indent=1, default=str) + "\n"),
                       ("report.md", markdown(report))):  # fmt: skip
        partial = out / f".{name}.partial"
        partial.write_text(text)
        os.replace(partial, out / name)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "out", nargs="?", help="folder for report.json, report.md, rows.jsonl and battery.log"
    )
    parser.add_argument("--cpu", action="store_true", help="every section with tiny shapes on the CPU")
    parser.add_argument("--call", type=int, choices=(1, 2), help="the sections of one prepared GPU call")
    parser.add_argument("--sections", nargs="+", choices=list(SECTIONS), help="these sections, in this order")
    parser.add_argument("--limit", action="append", default=[], metavar="SECTION=SECONDS",
                        help="a section's time limit (e.g. tests=400 to rerun the tests alone)")  # fmt: skip
    parser.add_argument("--check-imports", action="store_true",
                        help="list what each section imports against README.md's image and wheels.sh")  # fmt: skip
    args = parser.parse_args(argv)
    if not args.check_imports and not args.out:
        parser.error("OUTDIR is required")
    return args


def chosen_sections(args: argparse.Namespace) -> list[str]:
    if args.sections:
        return args.sections
    return [name for name, section in SECTIONS.items() if args.call in (None, section.call)]


def run(args: argparse.Namespace) -> dict:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    names = chosen_sections(args)
    overrides = {name: float(value) for name, _, value in (item.partition("=") for item in args.limit)}
    calls = {SECTIONS[name].call for name in names}
    budget = max(CPU_BUDGET_S if args.cpu else CALL_BUDGET_S * len(calls), sum(overrides.values()))
    deadline = time.monotonic() + budget
    rows_path = out / "rows.jsonl"
    rows_path.write_text("")
    report: dict = {"mode": "cpu" if args.cpu else "gpu", "call": args.call, "budget_s": budget,
                    "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "sections": {}}  # fmt: skip
    scratch = make_scratch()
    env = {**os.environ, **scratch_env(scratch), "DS_ACCELERATOR": "cpu" if args.cpu else "cuda",
           "PYTHONPATH": os.pathsep.join([str(HERE), *filter(None, [os.environ.get("PYTHONPATH")])])}  # fmt: skip
    if args.cpu:  # one thread per process: on a small shared CPU, spinning OpenMP threads of several
        # processes stall each other (steps 40x slower at a load of 6 on 2 cores); --cpu times nothing
        env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    started, name = time.monotonic(), None
    try:
        with open(out / "battery.log", "w") as log:
            for index, name in enumerate(names):
                section = SECTIONS[name]
                kept = 0 if args.cpu else sum(SECTIONS[later].keep_s for later in names[index + 1 :]
                                              if SECTIONS[later].call == section.call)  # fmt: skip
                limit = overrides.get(name, section.cpu_limit_s if args.cpu else section.limit_s)
                limit = min(limit, deadline - time.monotonic() - kept)
                if limit < MIN_SECTION_S:
                    report["sections"][name] = {"ok": False, "error": "not run: the call's time was spent"}
                    continue
                report["sections"][name] = {"ok": False, "error": "running (the call ended during it)"}
                write_report(out, report)
                result = scratch / f"{name}.json"
                command = commands(name, args.cpu, result, scratch)
                report["sections"][name] = run_section(name, command, limit, env, log, rows_path, result)
                entry = report["sections"][name]
                print(f"{name}: {'ok' if entry['ok'] else 'FAILED'} ({entry['seconds']} s)", flush=True)
                report["seconds"] = round(time.monotonic() - started, 1)
                write_report(out, report)
    finally:
        if name is not None and report["sections"][name].get("error", "").startswith("running"):
            # stopped itself (SIGTERM) during a section, which run_section has ended: keep its rows
            stopped = summary_of(name, scratch / f"{name}.json", rows.read(rows_path, name))
            report["sections"][name] = {**stopped, "ok": False, "error": "the battery was stopped during it"}
        shutil.rmtree(scratch, ignore_errors=True)
        report["seconds"] = round(time.monotonic() - started, 1)
        report["scratch_removed"] = not scratch.exists()
        write_report(out, report)
    return report


def stop_on_sigterm(signum, frame) -> None:
    raise SystemExit(128 + signum)  # the finally blocks end the running section and write the report


def main() -> None:
    args = parse_args()
    if args.check_imports:
        found = check_imports()
        for section, entry in found.items():
            print(f"{section}: {', '.join(entry['imports'])}")
            for name, importers in entry["missing"].items():
                print(f"  MISSING on the GPU machines: {name}, imported by {', '.join(importers)}")
        sys.exit(1 if any(entry["missing"] for entry in found.values()) else 0)
    signal.signal(signal.SIGTERM, stop_on_sigterm)
    report = run(args)
    print((Path(args.out) / "report.md").read_text())
    sys.exit(0 if report["sections"] else 1)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
