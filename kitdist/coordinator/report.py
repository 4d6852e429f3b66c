"""The results table of a pipeline (Markdown and JSON, beside the state) and the `status` printout."""

from __future__ import annotations

import json
import time
from typing import Any

from kitdist import storage
from kitdist.coordinator.state import State


def result_rows(state: State, plan: Any) -> list[dict[str, Any]]:
    """One row per test set of each fine-tuning task: what it was trained on, how it scores on the
    benchmark's own protocol (kitdist.benchmarks) beside the paper's number, where its weights are."""
    rows = []
    for name, task_plan in plan.evaluations.items():
        finetune = state.stages.get(f"finetune/{task_plan.task.stage}")
        evaluate = state.stages.get(f"evaluate/{name}")
        results = evaluate.results if evaluate else {}
        rows.append(
            {
                "task": task_plan.task.task,
                "stage": name,
                "dataset": task_plan.task.dataset,
                **_headline(task_plan.benchmark, results),
                "test_shards": task_plan.test_shards,
                "psnr_rgb": results.get("psnr_rgb"),
                "ssim_rgb": results.get("ssim_rgb"),
                "psnr_y": results.get("psnr_y"),
                "ssim_y": results.get("ssim_y"),
                "convention": results.get("convention"),
                "images": results.get("images"),
                "params": results.get("params"),
                "macs": results.get("macs"),
                "checkpoint": finetune.checkpoint if finetune else "",
                "train_wall_s": round(finetune.wall_s, 1) if finetune else None,
                "eval_wall_s": round(evaluate.wall_s, 1) if evaluate else None,
                "status": _row_status(finetune, evaluate),
            }
        )
    return rows


def _headline(benchmark: str, results: dict[str, Any]) -> dict[str, Any]:
    """The numbers a paper would print for this test set: its benchmark's colour space (RGB without
    one), BM3D's on the same inputs in that space (evaluate's --bm3d-sigma), the KiT paper's published
    number where there is one, and the protocol in words."""
    from kitdist.benchmarks import get_benchmark

    protocol = get_benchmark(benchmark) if benchmark else None
    psnr_key, ssim_key = (protocol.psnr_key, protocol.ssim_key) if protocol else ("psnr_rgb", "ssim_rgb")
    paper = protocol.paper() if protocol else None
    bm3d = results.get("bm3d") or {}
    return {
        "benchmark": benchmark or "",
        "psnr": results.get(psnr_key),
        "ssim": results.get(ssim_key),
        "bm3d_psnr": bm3d.get(psnr_key),
        "bm3d_ssim": bm3d.get(ssim_key),
        "bm3d_method": bm3d.get("method", ""),
        "bm3d_error": bm3d.get("error", ""),
        "paper_psnr": paper.psnr if paper else None,
        "paper_ssim": paper.ssim if paper else None,
        "paper_method": f"{paper.method}, {paper.source}" if paper else "",
        "protocol": protocol.convention()
        if protocol
        else "RGB, border 0 px, 8-bit rounded (no benchmark named)",
    }


def _row_status(finetune: Any, evaluate: Any) -> str:
    if finetune is None or finetune.status != "succeeded":
        return f"fine-tune {finetune.status if finetune else 'missing'}"
    if evaluate is None:
        return "evaluation missing"
    return "done" if evaluate.status == "succeeded" else f"evaluation {evaluate.status}"


def markdown_table(state: State, rows: list[dict[str, Any]]) -> str:
    head = "| task | dataset | benchmark | PSNR | SSIM | BM3D PSNR / SSIM | paper PSNR / SSIM | protocol | params | MACs | checkpoint | train time | status |"
    lines = [f"# Results of pipeline {state.pipeline}", "", head, "|" + " --- |" * 13]
    for row in rows:
        paper = row["paper_psnr"] is not None
        cells = [
            row["task"],
            row["dataset"],
            row["benchmark"] or "-",
            _number(row["psnr"], "{:.2f}"),
            _number(row["ssim"], "{:.4f}"),
            _bm3d_cell(row),
            f"{row['paper_psnr']:.2f} / {row['paper_ssim']:.3f} ({row['paper_method']})" if paper else "-",
            row["protocol"],
            _number(row["params"] and row["params"] / 1e6, "{:.2f} M"),
            _number(row["macs"] and row["macs"] / 1e9, "{:.2f} G"),
            f"`{row['checkpoint']}`" if row["checkpoint"] else "-",
            _duration(row["train_wall_s"]),
            row["status"],
        ]
        lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        f"Written {time.strftime('%Y-%m-%d %H:%M:%S')}; PSNR in dB, SSIM on [0, 1], in each benchmark's "
        "protocol (kitdist/benchmarks.py); results.json has RGB and Y for every row. BM3D: the classical "
        "denoiser told the true sigma, on the same inputs and in the same protocol, where a task's "
        "eval_args ask for it (--bm3d-sigma).",
    ]
    return "\n".join(lines) + "\n"


def write_results(state: State, plan: Any, folder: str) -> dict[str, str]:
    """Writes results.md and results.json into the state folder; returns their URLs."""
    rows = result_rows(state, plan)
    urls = {"markdown": storage.join(folder, "results.md"), "json": storage.join(folder, "results.json")}
    storage.write_text(urls["markdown"], markdown_table(state, rows))
    body = {"pipeline": state.pipeline, "status": state.status, "rows": rows}
    storage.write_text(urls["json"], json.dumps(body, indent=1))
    return urls


def status_text(state: State) -> str:
    """Where every stage stands, one line each, plus the cluster and the results."""
    lines = [f"pipeline {state.pipeline}: {state.status} (cluster {state.cluster.get('address', '-')})"]
    for stage in state.stages.values():
        attempt = stage.current
        job = f"job {attempt.job_id} {attempt.status}" if attempt else "no job yet"
        extra = stage.weights or (f"PSNR {stage.results['psnr_rgb']:.2f} dB" if stage.results else "")
        line = f"  {stage.name:<28} {stage.status:<10} attempts {len(stage.attempts)}  {job}  {extra}"
        lines.append(line.rstrip())
        if stage.error and stage.status != "succeeded":
            lines.append(f"      last error: {stage.error.splitlines()[0][:200]}")
    if state.results:
        lines.append(f"results: {state.results.get('markdown')}")
    return "\n".join(lines)


def _bm3d_cell(row: dict[str, Any]) -> str:
    if row["bm3d_error"]:
        return row["bm3d_error"]
    if row["bm3d_psnr"] is None:
        return "-"
    return f"{row['bm3d_psnr']:.2f} / {row['bm3d_ssim']:.4f}"


def _number(value: Any, fmt: str) -> str:
    return fmt.format(value) if isinstance(value, (int, float)) and value is not None else "-"


def _duration(seconds: Any) -> str:
    if not seconds:
        return "-"
    return f"{seconds / 3600:.1f} h" if seconds >= 3600 else f"{seconds:.0f} s"
