"""report.md of the GPU battery: the figures of report.json as short tables, one part per section; a
section that timed out or failed shows the rows it had written."""

from __future__ import annotations

import json
from typing import Any


def markdown(report: dict[str, Any]) -> str:
    call = f", call {report['call']}" if report.get("call") else ""
    lines = [f"# kitdist GPU battery ({report['mode']} mode{call}, {report['started']}, "
             f"{report.get('seconds', '?')} s)", ""]  # fmt: skip
    for name, entry in report["sections"].items():
        status = "ok" if entry.get("ok") else f"FAILED: {entry.get('error', 'see battery.log')}"
        lines += [f"## {name}: {status} ({entry.get('seconds', 0)} s)", ""]
        lines += RENDERERS.get(name, _as_json)(entry)
        if entry.get("not_on_gpu_machines"):
            lines.append(f"- imported, neither on the GPU image nor carried: {entry['not_on_gpu_machines']}")
        if entry.get("processes_ended"):
            lines.append(f"- processes ended after it: {entry['processes_ended']}")
        lines.append("")
    return "\n".join(lines)


def _device(entry: dict) -> list[str]:
    keys = ("name", "torch", "cuda", "python", "capability", "memory_gib", "peak_bf16_tflops", "peak_source",
            "packages")  # fmt: skip
    return [f"- {key}: {entry[key]}" for key in keys if key in entry]


def _tests(entry: dict) -> list[str]:
    if "passed" not in entry:
        return []
    counts = ", ".join(f"{entry[key]} {key}" for key in ("passed", "failed", "skipped"))
    lines = [f"`pytest -m gpu`: {counts}", *[f"- failing: {name}" for name in entry.get("failing", [])]]
    if entry.get("running"):
        lines.append(f"- running when it ended: {entry['running']}")
    return lines


def _attention(entry: dict) -> list[str]:
    measured = [row for row in entry.get("rows", []) if "case" in row and "first_ms" not in row]
    if not measured:
        return _as_json(entry)
    lines = ["| shape | case | ms | peak MiB | error |", "|---|---|---|---|---|"]
    for row in measured:
        lines.append(f"| {row['shape']} | {row['case']} | {_num(row.get('ms'), '.2f')} | "
                     f"{_num(row.get('peak_mb'), '.0f')} | {row.get('error', '')} |")  # fmt: skip
    for row in entry.get("rows", []):
        if "ratios" in row:
            ratios = ", ".join(f"{name} {value:.2f}x" for name, value in row["ratios"].items())
            lines.append(f"- {row['shape']}: {ratios or 'no ratio (a case failed)'}")
    return lines


def _restore(entry: dict) -> list[str]:
    lines = [f"- {key}: {entry[key]}" for key in ("model", "image") if key in entry]
    restored = [row for row in entry.get("rows", []) if "precision" in row]
    if restored:
        lines += [
            "",
            "| precision | image | first call s | s | peak MiB | error |",
            "|---|---|---|---|---|---|",
        ]
        lines += [f"| {row['precision']} | {row.get('image')} | {_num(row.get('first_s'), '.2f')} | "
                  f"{_num(row.get('seconds'), '.2f')} | {_num(row.get('peak_mib'), '.0f')} | "
                  f"{row.get('error', '')} |" for row in restored]  # fmt: skip
    return lines


def _train(entry: dict) -> list[str]:
    variants = [row for row in entry.get("rows", []) if "engine" in row]
    if not variants:
        return []
    lines = [
        f"{entry.get('model')} at {entry.get('crop')}x{entry.get('crop')}, global batch {entry.get('batch')};"
        f" MFU against {entry.get('peak_source')}",
        "",
        "| engine | precision | act. ckpt | step ms | x DDP | images/s | MFU | peak MiB | activations MiB"
        " | host syncs/step | error |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in variants:
        lines.append(
            f"| {row['engine']} | {row.get('precision')} | {row['checkpointing']} | "
            f"{_num(row.get('step_ms'), '.1f')} | {_num(row.get('x_ddp'), '.2f')} | "
            f"{_num(row.get('images_per_s'), '.1f')} | {_num(row.get('mfu'), '.1%')} | "
            f"{_num(row.get('peak_mib'), '.0f')} | {_num(row.get('activation_mib'), '.0f')} | "
            f"{_num(row.get('syncs_per_step'), '.1f')} | {row.get('error', '')} |"
        )
    for key in ("checkpointing_memory", "checkpointing_time"):
        if key in entry:
            lines.append(f"- {key.replace('_', ' ')} (on/off, DDP): {entry[key]:.2f}")
    return lines


def _loader(entry: dict) -> list[str]:
    lines = []
    if "rates" in entry:
        lines += [f"{entry.get('samples')} PNG tiles of {entry.get('tile')} px, {entry.get('workers')} workers",
                  "", "| measure | samples/s (median of rounds) |", "|---|---|"]  # fmt: skip
        lines += [f"| {name} | {rate:.0f} |" for name, rate in entry["rates"].items()]
        lines.append(f"- pipeline / decode-only: {entry['pipeline_over_decode']:.0%}")
    else:
        lines += [f"- {row['measure']}, round {row['round']}: {row['samples_per_s']} samples/s"
                  for row in entry.get("rows", []) if "measure" in row]  # fmt: skip
    return lines


def _growth(entry: dict) -> list[str]:
    sides = [row for row in entry.get("rows", []) if "side" in row]
    if not sides:
        return []
    lines = [f"{entry.get('model')} eval forward, {entry.get('dtype')}, whole images", "",
             "| side | first call ms | ms | ms/MP | peak MiB | note |", "|---|---|---|---|---|---|"]  # fmt: skip
    for row in sides:
        note = row.get("error") or row.get("skipped") or ""
        lines.append(f"| {row['side']} | {_num(row.get('first_ms'), '.0f')} | {_num(row.get('ms'), '.1f')} | "
                     f"{_num(row.get('ms_per_mp'), '.0f')} | {_num(row.get('peak_mib'), '.0f')} | {note} |")  # fmt: skip
    return lines


def _resume(entry: dict) -> list[str]:
    keys = ("model", "train_s", "resume_s", "resumed_from", "losses", "restore", "checkpoint_files")
    lines = [f"- {key}: {entry[key]}" for key in keys if key in entry]
    if not lines:
        lines = [f"- {row}" for row in entry.get("rows", [])]
    return lines


def _as_json(entry: dict) -> list[str]:
    shown = {
        key: value for key, value in entry.items() if key not in ("ok", "seconds", "returncode", "imports")
    }
    text = json.dumps(shown, indent=1, default=str)
    if len(text) > 4000:
        text = text[:4000] + "\n... (report.json has the rest)"
    return ["```json", text, "```"]


def _num(value: Any, fmt: str) -> str:
    return format(value, fmt) if isinstance(value, (int, float)) else "-"


RENDERERS = {"device": _device, "tests": _tests, "attention": _attention, "restore": _restore,
             "train": _train, "loader": _loader, "growth": _growth, "resume": _resume}  # fmt: skip
