"""A pytest plugin for the GPU battery's tests section (`-p pytest_rows`): one row per test as it starts
and as it ends (rows.py), so that a run killed at the section's limit still says which tests passed,
which failed and which one was running; at the end, the distributions the test process loaded."""

from __future__ import annotations

import rows


def pytest_runtest_logstart(nodeid, location):
    rows.record({"test": nodeid, "outcome": "started"})


def pytest_runtest_logreport(report):
    # one row per test: its call, or the setup / teardown that failed or skipped it
    if report.when == "call" or report.outcome != "passed":
        row = {"test": report.nodeid, "outcome": report.outcome, "when": report.when,
               "seconds": round(report.duration, 2)}  # fmt: skip
        if report.outcome == "failed":
            row["error"] = str(report.longrepr).strip().splitlines()[-1][:300]
        rows.record(row)


def pytest_sessionfinish(session, exitstatus):
    rows.record_imports()
