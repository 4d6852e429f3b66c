"""report.md of the GPU battery: the figures of report.json as short tables, one part per section."""

from __future__ import annotations

import json
from typing import Any


def markdown(report: dict[str, Any]) -> str:
    lines = [f"# kitdist GPU battery ({report['mode']} mode, {report['started']}, {report['seconds']} s)", ""]
    for name, entry in report["sections"].items():
        status = "ok" if entry.get("ok") else f"FAILED: {entry.get('error', 'see battery.log')}"
        lines += [f"## {name}: {status} ({entry.get('seconds', 0)} s)", ""]
        lines += RENDERERS.get(name, _as_json)(entry)
        lines.append("")
    return "\n".join(lines)


def _device(entry: dict) -> list[str]:
    keys = (
        "name",
        "torch",
        "cuda",
        "capability",
        "memory_gib",
        "peak_bf16_tflops",
        "peak_source",
        "packages",
    )
    return [f"- {key}: {entry[key]}" for key in keys if key in entry]


def _tests(entry: dict) -> list[str]:
    if "tests" not in entry:
        return []
    counts = ", ".join(f"{entry[key]} {key}" for key in ("passed", "failures", "errors", "skipped"))
    return [f"`pytest -m gpu`: {counts}", *[f"- failing: {name}" for name in entry.get("failing", [])]]


def _train(entry: dict) -> list[str]:
    rows = entry.get("variants", [])
    if not rows:
        return []
    lines = [
        f"{entry.get('model')} at {entry.get('crop')}x{entry.get('crop')}, global batch {entry.get('batch')},"
        f" {entry.get('precision')}; MFU against {entry.get('peak_source')}",
        "",
        "| engine | act. ckpt | step ms | x DDP | images/s | MFU | peak MiB | activations MiB | host syncs/step"
        " | error |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row['engine']} | {row['checkpointing']} | {_num(row.get('step_ms'), '.1f')} | "
            f"{_num(row.get('x_ddp'), '.2f')} | {_num(row.get('images_per_s'), '.1f')} | "
            f"{_num(row.get('mfu'), '.1%')} | {_num(row.get('peak_mib'), '.0f')} | "
            f"{_num(row.get('activation_mib'), '.0f')} | {_num(row.get('syncs_per_step'), '.1f')} | "
            f"{row.get('error', '')} |"
        )
    for key in ("checkpointing_memory", "checkpointing_time"):
        if key in entry:
            lines.append(f"- {key.replace('_', ' ')} (on/off, DDP): {entry[key]:.2f}")
    return lines


def _restore(entry: dict) -> list[str]:
    keys = ("model", "train_s", "resume_s", "resumed_from", "losses", "image", "restore", "checkpoint_files")
    return [f"- {key}: {entry[key]}" for key in keys if key in entry]


def _loader(entry: dict) -> list[str]:
    if "rates" not in entry:
        return []
    lines = [
        f"{entry.get('samples')} PNG tiles of {entry.get('tile')} px, {entry.get('workers')} workers",
        "",
    ]
    lines += ["| measure | samples/s |", "|---|---|"]
    lines += [f"| {name} | {rate:.0f} |" for name, rate in entry["rates"].items()]
    if "pipeline_over_decode" in entry:
        lines.append(f"- pipeline / decode-only: {entry['pipeline_over_decode']:.0%}")
    return lines


def _as_json(entry: dict) -> list[str]:
    shown = {key: value for key, value in entry.items() if key not in ("ok", "seconds", "returncode")}
    text = json.dumps(shown, indent=1)
    if len(text) > 4000:
        text = text[:4000] + "\n... (report.json has the rest)"
    return ["```json", text, "```"]


def _num(value: Any, fmt: str) -> str:
    return format(value, fmt) if isinstance(value, (int, float)) else "-"


RENDERERS = {"device": _device, "tests": _tests, "train": _train, "restore": _restore, "loader": _loader}
