"""The GPU battery's driver: runs each section in its own process with its own time limit, records a
section that fails (with the end of its output) and goes on, then writes OUTDIR/report.json and report.md.

    benchmarks/gpu/run.sh OUTDIR [--cpu]     # run.sh sets PYTHONPATH and installs carried wheels first

Sections: device (what the machine is), tests (`pytest -m gpu`), attention (benchmarks/attention.py in
bf16), train (kit at 256x256 bf16: DDP, ZeRO-1, ZeRO-2, activation checkpointing off/on, under torchrun),
restore (a short torchrun run, checkpoint, resume, weights.safetensors restoring a 1920x1080 photograph),
loader (the training pipeline with 12 workers against decode-only). `--cpu` runs them all with tiny shapes.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from report import markdown

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
TOTAL_BUDGET_S = {"gpu": 460, "cpu": 600}  # the whole battery; each section also has its own limit
# section -> (limit on a GPU, limit in --cpu mode), seconds
LIMITS = {
    "device": (40, 60),
    "tests": (90, 120),
    "attention": (70, 120),
    "train": (140, 200),
    "restore": (120, 200),
    "loader": (50, 120),
}


def commands(name: str, cpu: bool, result: Path, scratch: Path) -> list[str]:
    """The command that runs section `name`, writing its figures as JSON to `result`."""
    python = sys.executable
    mode = ["--cpu"] if cpu else []
    if name == "tests":  # --cpu: this battery's own GPU tests only (collecting every test file is slow here)
        where = [str(REPO / "tests" / "test_gpu_training.py")] if cpu else [str(REPO / "tests")]
        return [python, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider", "--continue-on-collection-errors",
                f"--junitxml={scratch / 'tests.xml'}", *where]  # fmt: skip
    if name == "attention":
        shape = ["--device", "cpu", "--quick"] if cpu else ["--device", "cuda", "--dtype", "bf16"]
        return [python, str(REPO / "benchmarks" / "attention.py"), *shape, "--json", str(result)]
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


def run_section(name: str, cpu: bool, scratch: Path, limit: float, log) -> dict:
    """Runs one section; its JSON result, or what went wrong. Never raises."""
    result = scratch / f"{name}.json"
    command = commands(name, cpu, result, scratch)
    log.write(f"\n===== {name}: {' '.join(command)} (limit {limit:.0f} s)\n")
    log.flush()
    started = time.perf_counter()
    # tests/conftest.py defaults DeepSpeed to its CPU accelerator; the GPU tests need CUDA's
    env = {**os.environ, "DS_ACCELERATOR": "cpu" if cpu else "cuda"}
    try:
        done = subprocess.run(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, timeout=limit)
        code = done.returncode
    except subprocess.TimeoutExpired:
        code = None
    seconds = round(time.perf_counter() - started, 1)
    entry = read_result(name, result, scratch)
    entry.update(seconds=seconds, returncode=code)
    if code is None:
        entry.update(ok=False, error=f"timed out after {limit:.0f} s")
    elif code != 0 and entry.get("ok", True) and name != "tests":
        entry.update(ok=False, error=f"exit status {code}")
    entry.setdefault("ok", code == 0)
    return entry


def read_result(name: str, result: Path, scratch: Path) -> dict:
    if name == "tests":
        return test_counts(scratch / "tests.xml")
    if not result.is_file():
        return {}
    try:
        data = json.loads(result.read_text())
    except json.JSONDecodeError as err:
        return {"ok": False, "error": f"{result.name} is not JSON: {err}"}
    return data if isinstance(data, dict) and "ok" in data else {"ok": True, "results": data}


def test_counts(junit: Path) -> dict:
    """pytest's counts from its JUnit XML: passed, failed, errors, skipped, and the failing tests."""
    import xml.etree.ElementTree as ElementTree

    if not junit.is_file():
        return {"ok": False, "error": "pytest wrote no report"}
    suite = ElementTree.parse(junit).getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    counts = {key: int(suite.get(key, 0)) for key in ("tests", "failures", "errors", "skipped")}
    failing = [f"{case.get('classname')}::{case.get('name')}" for case in suite.iter("testcase")
               if case.find("failure") is not None or case.find("error") is not None]  # fmt: skip
    counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    return {"ok": not failing, **counts, "failing": failing}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("out", help="folder for report.json, report.md and battery.log")
    parser.add_argument(
        "--cpu", action="store_true", help="tiny shapes on the CPU (checks the script itself)"
    )
    parser.add_argument("--sections", nargs="*", default=list(LIMITS), help="a subset, in this order")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix="kitdist-battery-"))
    mode = "cpu" if args.cpu else "gpu"
    deadline = time.monotonic() + TOTAL_BUDGET_S[mode]
    report: dict = {"mode": mode, "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "sections": {}}
    with open(out / "battery.log", "w") as log:
        for name in args.sections:
            left = deadline - time.monotonic()
            limit = min(LIMITS[name][args.cpu], left)
            if limit < 10:
                report["sections"][name] = {"ok": False, "error": "not run: the battery's time was spent"}
                continue
            report["sections"][name] = run_section(name, args.cpu, scratch, limit, log)
            print(f"{name}: {'ok' if report['sections'][name]['ok'] else 'FAILED'} "
                  f"({report['sections'][name].get('seconds', 0)} s)", flush=True)  # fmt: skip
    report["seconds"] = round(TOTAL_BUDGET_S[mode] - (deadline - time.monotonic()), 1)
    (out / "report.json").write_text(json.dumps(report, indent=1) + "\n")
    (out / "report.md").write_text(markdown(report))
    print((out / "report.md").read_text())


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
