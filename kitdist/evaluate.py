"""`python -m kitdist.evaluate`: PSNR and SSIM of trained weights over a test shard set, with figures.

    python -m kitdist.evaluate --weights runs/embedded --shards runs/data/skimage-photos/val --out runs/eval
    >>> from kitdist.evaluate import evaluate
    >>> results = evaluate("runs/embedded", "runs/data/skimage-photos/val", out_url="runs/eval")

Paired shard sets are evaluated on their own inputs; clean ones get the data pipeline's deterministic
validation degradation (`kitdist.data.val`: a generator drawn from each sample's key, with the `degrade`
settings of the run that trained the weights, overridable here), so every run sees the same inputs.
Every image is restored whole or in tiles (as `python -m kitdist.restore` does), rounded to 8 bits like a
saved file, and measured on RGB and on BT.601 luma. `--benchmark NAME` (`kitdist.benchmarks`: SIDD, GoPro,
HIDE, REDS, Rain100H, ...) measures as papers do on that test set and reports its headline PSNR/SSIM (RGB
or Y) beside the KiT paper's published number where there is one. `--self-ensemble` restores every image
in its 8 orientations and averages them (`kitdist.inference`; the results say so). `--bm3d-sigma S` also
denoises every input with BM3D told the noise sigma S and scores it the same way (`kitdist.bm3d_reference`).
Written to --out: `results.json` (means, per-image values, the convention of every number, model size,
params, MACs), `results.md` (the same as tables), `grids/<key>.png` (input | restored | target with a
zoomed detail) and `chart.png` (PSNR vs GMACs).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
from tqdm import tqdm

from kitdist import storage
from kitdist.benchmarks import BENCHMARKS, Benchmark, get_benchmark
from kitdist.bm3d_reference import bm3d_denoiser, bm3d_line, bm3d_summary, score_bm3d
from kitdist.config import ConfigError, ModelConfig, RunConfig, to_dict
from kitdist.config_loader import override, replace_values
from kitdist.inference import (
    DEFAULT_OVERLAP,
    DEFAULT_TILE,
    DIHEDRAL_ORIENTATIONS,
    Restorer,
    WeightsError,
    add_self_ensemble_argument,
    load_restorer,
    recorded_run_config,
)
from kitdist.shards.manifest import ManifestError, read_manifest
from kitdist.train.validation import METRICS, Scored, conventions, restore_and_score, score_unrestored


def eval_config(restorer: Restorer, shards_url: str, overrides: Sequence[str], max_images: int) -> RunConfig:
    """The run config validation would use: the training run's own (degradations included) if its
    config.yaml is beside the weights, pointed at `shards_url`, whole images, then the user's overrides."""
    recorded = recorded_run_config(restorer.weights_url)
    base = recorded or RunConfig(model=ModelConfig(size=restorer.size_name))
    kind = read_manifest(shards_url).kind
    if kind == "input":
        raise ValueError(
            f"{shards_url}: holds degraded inputs without targets (a benchmark whose ground truth is "
            "withheld): nothing to score; restore them with `python -m kitdist.restore`"
        )
    evaluated = {
        "data.val_shards": shards_url,
        "data.kind": kind,
        "data.val_crop_size": 0,
        "data.num_workers": 0,
        "data.max_val_samples": max_images,
    }
    return override(replace_values(base, evaluated), overrides)


def evaluate(
    weights_url: str,
    shards_url: str,
    *,
    out_url: str | None = None,
    model_size: str | None = None,
    overrides: Sequence[str] = (),
    benchmark: str | None = None,
    crop_border: int | None = None,
    max_images: int = 0,
    num_grids: int = 4,
    save_images: bool = False,
    tile: int = DEFAULT_TILE,
    overlap: int = DEFAULT_OVERLAP,
    device: str = "auto",
    progress: bool = True,
    bm3d_sigma: float | None = None,
    self_ensemble: bool = False,
) -> dict[str, Any]:
    """Measures the weights on the shard set; writes the reports under `out_url` when given.

    `benchmark` names the test set's protocol (kitdist.benchmarks); its border crop applies unless
    `crop_border` is given (0 without a benchmark). `bm3d_sigma` (0-255 scale) scores BM3D on the same
    inputs too (results["bm3d"]), or records why it could not."""
    from kitdist.data.val import val_batches
    from kitdist.model.profile import count_macs, count_params

    protocol = get_benchmark(benchmark) if benchmark else None
    crop_border = _border(protocol, crop_border)
    bm3d = bm3d_denoiser(bm3d_sigma) if bm3d_sigma is not None else None
    restorer = load_restorer(weights_url, model_size, device, self_ensemble=self_ensemble)
    cfg = eval_config(restorer, shards_url, overrides, max_images)
    total = read_manifest(shards_url).total_samples
    total = min(total, max_images) if max_images else total
    records, started = [], time.perf_counter()
    for index, batch in enumerate(
        tqdm(val_batches(cfg, 0, 1), total=total, unit="image", disable=not progress)
    ):
        record, scored = _score(restorer, batch, tile, overlap, crop_border)
        if bm3d is not None:
            record.update(score_bm3d(bm3d, batch, crop_border))
        records.append(record)
        if out_url is not None:
            degraded = batch["input"][0].permute(1, 2, 0).numpy()
            _write_figures(out_url, record, degraded, scored, index < num_grids, save_images)
    if not records:
        raise ValueError(f"{shards_url}: no readable test images")
    results = _summary(restorer, cfg, shards_url, records, crop_border)
    if bm3d_sigma is not None:
        results["bm3d"] = bm3d_summary(bm3d_sigma, records if bm3d is not None else None)
    if protocol is not None:
        results["benchmark"] = benchmark_summary(protocol, results)
    # macs: what restoring a 256x256 image costs as evaluated (the x8 ensemble runs 8 forwards)
    forwards = DIHEDRAL_ORIENTATIONS if restorer.self_ensemble else 1
    macs = forwards * count_macs(restorer.model_cfg, 256, 256)
    results.update(params=count_params(restorer.model), macs=macs)
    results["seconds"] = round(time.perf_counter() - started, 2)
    if out_url is not None:
        write_reports(out_url, results)
    return results


def _border(protocol: Benchmark | None, crop_border: int | None) -> int:
    """The border to crop: the benchmark's own unless given (0 without one); another than its own is an
    error, not a silent change of protocol."""
    if crop_border is None:
        return protocol.crop_border if protocol else 0
    if protocol and crop_border != protocol.crop_border:
        raise ValueError(
            f"--crop-border {crop_border}: benchmark {protocol.name} is measured with border "
            f"{protocol.crop_border} px; leave --crop-border out"
        )
    return crop_border


def _score(restorer: Restorer, batch: dict, tile: int, overlap: int, crop_border: int) -> tuple[dict, Scored]:
    """One validation batch (one image) restored and scored: its report record, and the 8-bit images."""
    degraded, target = batch["input"][0], batch["target"][0]
    scored = restore_and_score(
        restorer.forward,
        degraded.to(restorer.device),
        target,
        tile=tile,
        overlap=overlap,
        crop_border=crop_border,
    )
    record = {
        "key": batch["keys"][0],
        "height": target.shape[-2],
        "width": target.shape[-1],
        **scored.metrics,
    }
    record["input_psnr_rgb"] = score_unrestored(degraded, target, crop_border)["psnr_rgb"]
    return record, scored


def _summary(restorer: Restorer, cfg: RunConfig, shards_url: str, records: list, crop_border: int) -> dict:
    means = {name: float(np.mean([r[name] for r in records])) for name in (*METRICS, "input_psnr_rgb")}
    described = conventions(crop_border)
    if cfg.data.kind == "clean":
        source = (
            f"clean images degraded by kitdist.data.val (per-key generator), degrade = {to_dict(cfg.degrade)}"
        )
    else:
        source = "the shard set's own input images"
    return {
        **means,
        "convention": f"mean over images of per-image values; {described['psnr_rgb']} (Y: BT.601 luma)",
        "conventions": described,
        "inputs": source,
        "images": len(records),
        "model_size": restorer.size_name,
        "self_ensemble": restorer.self_ensemble,
        "weights": restorer.weights_url,
        "shards": shards_url,
        "device": str(restorer.device),
        "per_image": records,
    }


def benchmark_summary(protocol: Benchmark, results: dict[str, Any]) -> dict[str, Any]:
    """The benchmark's headline numbers (in its colour space) beside the paper's, with its protocol."""
    paper = protocol.paper()
    return {
        "name": protocol.name,
        "psnr": results[protocol.psnr_key],
        "ssim": results[protocol.ssim_key],
        "space": protocol.space,
        "convention": protocol.convention(),
        "expected_images": protocol.images,
        "paper": None if paper is None else dataclasses.asdict(paper),
    }


def _write_figures(out_url, record, degraded, scored: Scored, grid: bool, save_images: bool) -> None:
    from kitdist.report import comparison_grid

    key = record["key"]
    restored, target = scored.images()
    if save_images:
        from kitdist.restore import encode_png

        storage.write_bytes(
            storage.join(out_url, "restored", f"{key}.png"), encode_png(restored / 255.0, False)
        )
    if grid:
        panels = [
            (f"input {record['input_psnr_rgb']:.2f} dB", np.clip(degraded, 0, 1)),
            (f"restored {record['psnr_rgb']:.2f} dB / {record['ssim_rgb']:.4f}", restored / 255.0),
            ("target", target / 255.0),
        ]
        storage.write_bytes(storage.join(out_url, "grids", f"{key}.png"), comparison_grid(panels))


def markdown(results: dict[str, Any]) -> str:
    """The results as Markdown tables: means with their conventions, then every image."""
    ensemble = " with x8 self-ensemble (8 orientations averaged)" if results.get("self_ensemble") else ""
    lines = [
        f"# Evaluation of `{results['weights']}`",
        "",
        f"Test set `{results['shards']}`: "
        f"{results['images']} images; inputs: {results['inputs']}. Model `{results['model_size']}`{ensemble}, "
        f"{results['params'] / 1e6:.3f} M parameters, {results['macs'] / 1e9:.3f} GMACs at 256x256.",
        "",
        "| metric | mean | convention |",
        "|---|---|---|",
    ]
    for name in METRICS:
        value = f"{results[name]:.4f}" if name.startswith("ssim") else f"{results[name]:.2f} dB"
        lines.append(f"| {name} | {value} | {results['conventions'][name]} |")
    bench = results.get("benchmark")
    if bench:
        paper = bench["paper"]
        published = (
            f"{paper['psnr']:.2f} dB / {paper['ssim']:.3f} ({paper['method']}, {paper['source']})"
            if paper
            else "no published number"
        )
        headline = f"{bench['psnr']:.2f} dB / {bench['ssim']:.4f} ({bench['convention']})"
        lines[3:3] = ["", f"Benchmark {bench['name']}: {headline}; paper: {published}."]
    lines.append(f"| input psnr_rgb | {results['input_psnr_rgb']:.2f} dB | the degraded input itself |")
    bm3d = results.get("bm3d")
    if bm3d:
        lines += ["", f"{bm3d['method']} on the same inputs, same conventions: {bm3d_line(bm3d)}."]
    scored_bm3d = bool(bm3d) and "error" not in bm3d
    lines += [
        "",
        "| image | size | input PSNR | PSNR RGB | SSIM RGB | PSNR Y | SSIM Y |"
        + (" BM3D PSNR RGB |" * scored_bm3d),
        "|---|---|---|---|---|---|---|" + ("---|" * scored_bm3d),
    ]
    for r in results["per_image"]:
        lines.append(
            f"| {r['key']} | {r['width']}x{r['height']} | {r['input_psnr_rgb']:.2f} | {r['psnr_rgb']:.2f} | "
            f"{r['ssim_rgb']:.4f} | {r['psnr_y']:.2f} | {r['ssim_y']:.4f} |"
            + (f" {r['bm3d_psnr_rgb']:.2f} |" if scored_bm3d else "")
        )
    return "\n".join(lines) + "\n"  # fmt: skip


def write_reports(out_url: str, results: dict[str, Any]) -> None:
    """results.json, results.md and chart.png under `out_url`."""
    from kitdist.report import MeasuredPoint, draw_chart

    storage.write_text(storage.join(out_url, "results.json"), json.dumps(results, indent=1) + "\n")
    storage.write_text(storage.join(out_url, "results.md"), markdown(results))
    try:
        chart = draw_chart([MeasuredPoint.from_results(results)])
    except ImportError:  # matplotlib is the optional `viz` extra; the numbers do not need it
        print("note: chart.png not drawn (matplotlib missing: pip install 'kitdist[viz]')", file=sys.stderr)
        return
    storage.write_bytes(storage.join(out_url, "chart.png"), chart)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m kitdist.evaluate",
        description="PSNR/SSIM (RGB and Y) of trained KiT weights over a test shard set; with --out also "
        "results.json, results.md, comparison grids and the PSNR-vs-GMACs chart.",
        epilog="Clean shard sets are degraded as validation does (per-key generator, the training run's "
        "degrade settings); change them with overrides, e.g. 'degrade.noise_sigma=[25,25]'. "
        "Weights: a weights.safetensors, a checkpoint folder or a run folder (newest step-*).",
    )
    parser.add_argument("--weights", required=True, help="URL of the weights")
    parser.add_argument("--shards", required=True, help="test shard set (folder or manifest.json URL)")
    parser.add_argument("--out", help="folder URL for results.json, results.md, grids/, chart.png")
    parser.add_argument("--model", help="model size of a bare weights file")
    parser.add_argument(
        "--benchmark",
        help="the test set's protocol, as papers measure it: "
        f"{', '.join(BENCHMARKS)} (kitdist/benchmarks.py); reports its headline PSNR/SSIM beside the paper's",
    )
    parser.add_argument(
        "--crop-border", type=int, help="pixels cut from every side before measuring (0; a benchmark's own)"
    )
    parser.add_argument("--max-images", type=int, default=0, help="evaluate the first N images only (0: all)")
    parser.add_argument("--grids", type=int, default=4, help="comparison grids for the first N images (4)")
    parser.add_argument("--save-images", action="store_true", help="also write restored/<key>.png")
    parser.add_argument("--tile", type=int, default=DEFAULT_TILE, help=f"tile side ({DEFAULT_TILE})")
    parser.add_argument(
        "--overlap", type=int, default=DEFAULT_OVERLAP, help=f"tile overlap ({DEFAULT_OVERLAP})"
    )
    parser.add_argument(
        "--bm3d-sigma",
        type=float,
        metavar="SIGMA",
        help="also score BM3D told this noise sigma (0-255) on the same inputs (needs `pip install bm3d`)",
    )
    add_self_ensemble_argument(parser)
    parser.add_argument("--device", default="auto", help="auto (GPU when there is one), cpu, cuda")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.add_argument(
        "overrides", nargs="*", metavar="section.key=value", help="e.g. degrade.noise_sigma=[25,25]"
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        if (args.crop_border or 0) < 0 or args.max_images < 0:
            raise ValueError("--crop-border and --max-images must be >= 0")
        results = evaluate(
            args.weights, args.shards, out_url=args.out, model_size=args.model, overrides=args.overrides,
            benchmark=args.benchmark, crop_border=args.crop_border, max_images=args.max_images, num_grids=args.grids,
            save_images=args.save_images, tile=args.tile, overlap=args.overlap, device=args.device,
            progress=not args.quiet, bm3d_sigma=args.bm3d_sigma, self_ensemble=args.self_ensemble,
        )  # fmt: skip
    except (ValueError, WeightsError, ConfigError, ManifestError, storage.StorageError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for name in METRICS:
        print(f"{name}: {results[name]:.4f}  [{results['conventions'][name].split(';')[0]}]")
    bench = results.get("benchmark")
    if bench:
        paper = bench["paper"]
        published = f"paper {paper['psnr']:.2f} dB / {paper['ssim']:.3f} ({paper['method']})" if paper else ""
        print(
            f"{bench['name']}: {bench['psnr']:.2f} dB / {bench['ssim']:.4f} [{bench['convention']}] {published}"
        )
    if "bm3d" in results:
        print(f"{results['bm3d']['method']}: {bm3d_line(results['bm3d'])}")
    ensemble = ", x8 self-ensemble" if results["self_ensemble"] else ""
    print(
        f"{results['images']} images, model {results['model_size']}{ensemble}, "
        f"{results['macs'] / 1e9:.3f} GMACs at 256x256"
    )
    if args.out:
        print(f"reports: {storage.join(args.out, 'results.json')}, results.md, grids/, chart.png")
    return 0


if __name__ == "__main__":
    from kitdist.distributed.env import keep_freed_memory_in_this_program

    keep_freed_memory_in_this_program()  # this program's process, not the library's (see there)
    sys.exit(main(sys.argv[1:]))
