"""The GPU battery (benchmarks/gpu/) checked where no GPU is: every module its sections import is on the
GPU machines' image or carried; its driver keeps the rows of a section it ends at its limit, ends that
section's children (those in other sessions too), rewrites the report after every section and leaves no
scratch behind; and its --cpu mode runs every section end to end, KLA's Flex path included, so that what
the next GPU machine runs has not rotted."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
HERE = REPO / "benchmarks" / "gpu"
sys.path.insert(0, str(HERE))

import battery  # noqa: E402

SECTIONS = ("device", "tests", "attention", "restore", "train", "loader", "growth", "resume")


def test_every_module_a_section_imports_is_on_the_gpu_machines_or_carried():
    found = battery.check_imports()
    assert tuple(found) == SECTIONS
    assert {section: entry["missing"] for section, entry in found.items() if entry["missing"]} == {}
    assert "deepspeed" in found["train"]["imports"] and "pytest" in found["tests"]["imports"]
    assert {"deepspeed", "pydantic", "hjson"} <= battery.carried_packages()
    assert {"torch", "triton", "scikit-image", "safetensors"} <= battery.image_packages()
    assert not {"webdataset", "braceexpand", "ray"} & battery.available_distributions()
    for importer, name in battery.NOT_RUN:  # each exemption still names an import that is there
        imported = battery.module_imports(battery.local_module(importer), importer)
        assert any(battery.not_run(importer, module) for module in imported), (importer, name)


FAKE = {
    # a section that measures and ends
    "first": """
        rows.record({"value": 1})
    """,
    # a section that writes two rows, starts a child in its own session (as torchrun does) and one in its
    # process group, then hangs past its limit
    "stuck": """
        import subprocess, time
        rows.record({"value": 2})
        sleeper = [sys.executable, "-c", "import time; time.sleep(600)"]
        children = [subprocess.Popen(sleeper, start_new_session=True), subprocess.Popen(sleeper)]
        Path(sys.argv[1]).write_text(json.dumps([child.pid for child in children]))
        rows.record({"value": 3})
        time.sleep(600)
    """,
    # a section that reads the report as the driver left it before starting it
    "last": """
        report = json.loads((Path(sys.argv[2]) / "report.json").read_text())
        rows.record({"seen": {name: entry.get("error", "ok") for name, entry in report["sections"].items()}})
    """,
}


def test_a_section_past_its_limit_is_ended_with_its_children_and_keeps_its_rows(tmp_path, monkeypatch):
    out, pids = tmp_path / "out", tmp_path / "pids.json"
    preamble = "import json, sys\nfrom pathlib import Path\nimport rows\n"

    def fake_command(name, cpu, result, scratch):
        return [sys.executable, "-c", preamble + textwrap.dedent(FAKE[name]), str(pids), str(out)]

    limits = {"first": 10, "stuck": 2, "last": 10}
    monkeypatch.setattr(
        battery, "SECTIONS", {name: battery.Section(1, s, 0, s) for name, s in limits.items()}
    )
    monkeypatch.setattr(battery, "commands", fake_command)
    monkeypatch.setattr(battery, "MIN_SECTION_S", 1)
    report = battery.run(battery.parse_args([str(out), "--cpu"]))

    sections = report["sections"]
    assert list(sections) == ["first", "stuck", "last"]
    assert sections["first"]["ok"] and sections["first"]["rows"] == [{"value": 1}]
    stuck = sections["stuck"]
    assert not stuck["ok"] and stuck["error"].startswith("timed out after 2 s")
    assert stuck["rows"] == [{"value": 2}, {"value": 3}]
    children = json.loads(pids.read_text())
    assert stuck["processes_ended"] == 3  # the section's process and its two children
    assert not any(battery.alive(pid) for pid in children)
    # the report on disk before "last" started already held the two sections before it
    assert sections["last"]["rows"] == [{"seen": {"first": "ok", "stuck": stuck["error"], "last": "running "
                                                  "(the call ended during it)"}}]  # fmt: skip
    assert report["scratch_removed"]
    on_disk = json.loads((out / "report.json").read_text())
    assert on_disk["sections"] == json.loads(json.dumps(sections))
    assert "## stuck: FAILED: timed out" in (out / "report.md").read_text()


@pytest.mark.slow
def test_cpu_battery_runs_every_section(tmp_path):
    out = tmp_path / "battery"
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    done = subprocess.run(
        ["bash", str(HERE / "run.sh"), str(out), "--cpu"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    log = (out / "battery.log").read_text()[-3000:] if (out / "battery.log").exists() else ""
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:] + log
    report = json.loads((out / "report.json").read_text())
    assert report["mode"] == "cpu" and tuple(report["sections"]) == SECTIONS and report["scratch_removed"]
    sections = report["sections"]
    for name in SECTIONS:
        assert sections[name]["ok"], (name, sections[name], log)
        # what the section's process loaded is on the GPU machines or carried
        assert sections[name]["imports"] and sections[name]["not_on_gpu_machines"] == [], name
    assert "deepspeed" in sections["train"]["imports"]
    tests = sections["tests"]
    assert tests["skipped"] > 0 and tests["failed"] == 0 and tests["passed"] == 0  # no CUDA here
    measured = {(row["shape"], row["case"]): row for row in sections["attention"]["rows"] if "ms" in row}
    assert {case for _, case in measured} >= {"kla_flex_b1", "kla_flex_b2", "window_flex", "window_sdpa"}
    assert all(row["ms"] > 0 for row in measured.values())
    assert all(row["ratios"] for row in sections["attention"]["rows"] if "ratios" in row)
    assert sections["restore"]["restore"]["fp32"]["shape"] == [96, 128, 3]
    train = [row for row in sections["train"]["rows"] if "engine" in row]
    assert [(row["engine"], row["precision"], row["checkpointing"]) for row in train] == [
        *((engine, "fp32", setting) for setting in ("off", "on") for engine in ("DDP", "ZeRO-1", "ZeRO-2")),
        ("DDP", "bf16", "off"),
    ]
    assert all(row["step_ms"] > 0 and row["images_per_s"] > 0 for row in train)
    assert sections["loader"]["rates"]["pipeline"] > 0
    assert [row["side"] for row in sections["growth"]["rows"] if "ms" in row] == [16, 32]
    resume = sections["resume"]
    assert resume["resumed_from"] == 4 and len(resume["losses"]) == 6
    assert "weights.safetensors" in resume["checkpoint_files"]
    markdown = (out / "report.md").read_text()
    assert all(f"## {name}: ok" in markdown for name in SECTIONS)


def test_a_gpu_test_past_its_own_limit_fails_alone(tmp_path):
    """tests/conftest.py's limit on tests marked `gpu`: the test fails naming its limit, the next runs."""
    (tmp_path / "conftest.py").write_text((REPO / "tests" / "conftest.py").read_text())
    (tmp_path / "test_limits.py").write_text(
        textwrap.dedent("""
            import time
            import pytest

            @pytest.mark.gpu(timeout_s=1)
            def test_stuck():
                time.sleep(60)

            @pytest.mark.gpu
            def test_next():
                pass
        """)
    )
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-W", "ignore::pytest.PytestUnknownMarkWarning",
         str(tmp_path)], cwd=tmp_path, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert "1 failed, 1 passed" in done.stdout, done.stdout[-2000:]
    assert "GpuTestTimeout" in done.stdout and "test_stuck ran past its limit of 1 s" in done.stdout
