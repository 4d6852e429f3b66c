"""The GPU battery's measured sections, one per process: `python sections.py SECTION RESULT SCRATCH [--cpu]`
writes RESULT (JSON, with "ok"). `train` runs under torchrun (one process per GPU); the driver is
battery.py, the figures it reports are explained in benchmarks/gpu/README.md.
"""

from __future__ import annotations

import gc
import json
import os
import re
import subprocess
import sys
import time
import traceback
import warnings
from itertools import cycle
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
# model size, crop, global batch, warm-up steps, timed steps, precision (fp32 on a CPU: its bf16 is slow
# without AMX, and --cpu only checks that the battery runs)
TRAIN_SHAPE = {"gpu": ("kit", 256, 16, 3, 10, "bf16"), "cpu": ("debug", 32, 2, 1, 2, "fp32")}
ENGINES = {
    "DDP": ["dist.strategy=ddp", "dist.zero_stage=0"],
    "ZeRO-1": ["dist.strategy=deepspeed", "dist.zero_stage=1"],
    "ZeRO-2": ["dist.strategy=deepspeed", "dist.zero_stage=2"],
}


def device_section(scratch: Path, cpu: bool) -> dict:
    from kitdist.config import load_config
    from kitdist.train.perf import peak_flops

    info = {"torch": torch.__version__, "cuda": torch.version.cuda, "packages": package_versions()}
    if cpu:
        return {"ok": True, "name": f"CPU, {os.cpu_count()} cores", **info}
    if not torch.cuda.is_available():
        return {"ok": False, "error": "torch sees no CUDA GPU", **info}
    props = torch.cuda.get_device_properties(0)
    peak, source = peak_flops(load_config(None, ["dist.use_gpu=true"]), torch.device("cuda", 0))
    return {
        "ok": True, "name": props.name, "capability": f"{props.major}.{props.minor}",
        "memory_gib": round(props.total_memory / 2**30, 1), "multiprocessors": props.multi_processor_count,
        "peak_bf16_tflops": peak / 1e12 if peak else None, "peak_source": source, **info,
    }  # fmt: skip


def package_versions() -> dict[str, str]:
    from importlib import metadata

    found = {}
    for name in ("deepspeed", "triton", "safetensors", "webdataset", "pydantic", "hjson", "scikit-image"):
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = "missing"
    return found


# --- train: engines and activation checkpointing, in one torchrun process --------------------------------


def train_section(scratch: Path, cpu: bool) -> dict:
    import torch.distributed as dist

    from kitdist.config import load_config
    from kitdist.distributed.env import device_for
    from kitdist.train.perf import peak_flops, training_flops_per_sample

    model, crop, batch, warmup, steps, precision = TRAIN_SHAPE["cpu" if cpu else "gpu"]
    base = [f"model.size={model}", f"data.crop_size={crop}", f"data.global_batch_size={batch}",
            "dist.num_workers=1", f"dist.use_gpu={str(not cpu).lower()}", f"train.precision={precision}",
            "train.warmup_steps=1"]  # fmt: skip
    cfg = load_config(None, base)
    device = device_for(cfg.dist)
    dist.init_process_group("gloo" if cpu else "nccl")
    flops, (peak, source) = training_flops_per_sample(cfg), peak_flops(cfg, device)
    # The process's first steps pay one-time costs (kernel choice, allocator growth): not any engine's.
    measure_engine(load_config(None, [*base, *ENGINES["DDP"]]), device, warmup, 1, flops, peak)
    rows = []
    for checkpointing in (False, True):
        for engine, extra in ENGINES.items():
            overrides = [*base, *extra, f"model.checkpoint_activations={str(checkpointing).lower()}"]
            row = {"engine": engine, "checkpointing": "on" if checkpointing else "off"}
            row.update(measure_engine(load_config(None, overrides), device, warmup, steps, flops, peak))
            rows.append(row)
            print(json.dumps(row), flush=True)
    dist.destroy_process_group()
    result = {"ok": all("error" not in row for row in rows), "model": model, "crop": crop, "batch": batch,
              "precision": precision, "peak_source": source, "variants": rows}  # fmt: skip
    return {**result, **relative_figures(rows)}


def measure_engine(cfg, device: torch.device, warmup: int, steps: int, flops: float, peak) -> dict:
    """Median-free timing of `steps` training steps after `warmup`, on synthetic batches already on the
    device (the engine alone, no data loading); peak memory of the timed steps; host syncs per step."""
    from kitdist.model import build_model
    from kitdist.train.engine import build_strategy
    from kitdist.train.loop import LogWindow, train_step

    strategy = None
    try:
        torch.manual_seed(0)
        strategy = build_strategy(cfg, build_model(cfg.model), device)
        batches, window = synthetic_batches(cfg, device), LogWindow()
        for _ in range(warmup):
            train_step(cfg, strategy, batches, window, strategy.grad_accum)
        synchronize(device)
        resident = torch.cuda.memory_allocated(device) / 2**20 if device.type == "cuda" else None
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        start = time.perf_counter()
        with SyncCount(device) as syncs:
            for _ in range(steps):
                train_step(cfg, strategy, batches, window, strategy.grad_accum)
        synchronize(device)
        seconds = (time.perf_counter() - start) / steps
        figures = step_figures(cfg, seconds, flops, peak, device, syncs.count, steps)
        if resident is not None:  # above what lives between steps (weights, optimizer state, batches)
            figures["activation_mib"] = figures["peak_mib"] - resident
        return figures
    except Exception as err:  # one variant failing (e.g. out of memory) must not stop the others
        traceback.print_exc()
        return {"error": f"{type(err).__name__}: {str(err)[:200]}"}
    finally:
        release(strategy)


def step_figures(cfg, seconds: float, flops: float, peak, device, syncs, steps: int) -> dict:
    from kitdist.train.perf import peak_memory_mb

    images = cfg.data.global_batch_size / seconds
    return {
        "step_ms": seconds * 1e3,
        "images_per_s": images,
        "mfu": flops * images / peak if peak else None,
        "peak_mib": peak_memory_mb(device),
        "syncs_per_step": syncs / steps if syncs is not None else None,
    }


def relative_figures(rows: list[dict]) -> dict:
    """Each engine's step time over DDP's (same checkpointing), and checkpointing's cost for DDP."""
    by_key = {(row["engine"], row["checkpointing"]): row for row in rows}
    for row in rows:
        ddp = by_key.get(("DDP", row["checkpointing"]), {})
        if "step_ms" in row and "step_ms" in ddp:
            row["x_ddp"] = row["step_ms"] / ddp["step_ms"]
    off, on = by_key.get(("DDP", "off"), {}), by_key.get(("DDP", "on"), {})
    if "step_ms" not in off or "step_ms" not in on:
        return {}
    memory = "activation_mib" if "activation_mib" in off else "peak_mib"  # peak RSS on a CPU
    return {
        "checkpointing_memory": on[memory] / off[memory],
        "checkpointing_time": on["step_ms"] / off["step_ms"],
    }


def synthetic_batches(cfg, device: torch.device):
    """Two noisy/clean batches of the micro-batch size, on the device, repeated."""
    generator = torch.Generator().manual_seed(0)
    from kitdist.batching import plan_run

    size = plan_run(cfg, 1)[0].micro_batch  # one process
    shape = (size, 3, cfg.data.crop_size, cfg.data.crop_size)
    made = []
    for _ in range(2):
        target = torch.rand(shape, generator=generator)
        noisy = target + 0.1 * torch.randn(shape, generator=generator)
        made.append({"input": noisy.to(device), "target": target.to(device)})
    return cycle(made)


class SyncCount:
    """Host synchronisations CUDA reports while active (`torch.cuda.set_sync_debug_mode("warn")`);
    None on a CPU, where there is nothing to synchronise with."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.count = device, None

    def __enter__(self) -> SyncCount:
        if self.device.type == "cuda":
            self._caught = warnings.catch_warnings(record=True)
            self._records = self._caught.__enter__()
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.set_sync_debug_mode("default")
            self._caught.__exit__(*exc)
            self.count = sum("synchroniz" in str(record.message) for record in self._records)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def release(strategy) -> None:
    engine = getattr(strategy, "engine", None)
    if engine is not None and hasattr(engine, "destroy"):
        engine.destroy()
    del strategy, engine
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# --- restore: torchrun training, checkpoint, resume, then restoring a photograph ------------------------


def restore_section(scratch: Path, cpu: bool) -> dict:
    from kitdist.pretrain import ensure_photo_shards

    train_url, val_url = ensure_photo_shards(str(scratch / "photo-shards"))
    model = "debug" if cpu else "kit"
    overrides = [
        f"model.size={model}", f"data.crop_size={32 if cpu else 128}", f"data.global_batch_size={2 if cpu else 8}",
        f"data.num_workers={0 if cpu else 4}", f"data.train_shards={train_url}", f"data.val_shards={val_url}",
        "data.max_val_samples=2", f"data.val_crop_size={64 if cpu else 0}", "train.warmup_steps=1",
        "train.log_every=1", "train.checkpoint_every=2", f"train.precision={'fp32' if cpu else 'bf16'}",
        "dist.num_workers=1",
        f"dist.use_gpu={str(not cpu).lower()}", "dist.strategy=deepspeed", "dist.zero_stage=2",
        f"storage.root={scratch / 'runs'}", "storage.run_name=battery",
    ]  # fmt: skip
    first_s, _ = torchrun_training([*overrides, "train.max_steps=4"])
    resume_s, output = torchrun_training([*overrides, "train.max_steps=6"])
    resumed = re.search(r"resumed from step (\d+)", output)
    run = scratch / "runs" / "battery"
    records = [json.loads(line) for line in (run / "metrics" / "metrics.jsonl").read_text().splitlines()]
    result = {
        "model": model, "train_s": round(first_s, 1), "resume_s": round(resume_s, 1),
        "resumed_from": int(resumed.group(1)) if resumed else None,
        "losses": [round(r["loss"], 5) for r in records if "loss" in r],
        "checkpoint_files": sorted(path.name for path in (run / "step-00000006").iterdir()),
    }  # fmt: skip
    result["restore"] = restore_photograph(run, (128, 96) if cpu else (1920, 1080), cpu)
    result["image"] = "x".join(map(str, (128, 96) if cpu else (1920, 1080)))
    result["ok"] = result["resumed_from"] == 4 and len(result["losses"]) == 6
    return result


def torchrun_training(overrides: list[str]) -> tuple[float, str]:
    from battery import free_port

    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "1", "--master-port",
               free_port(), "-m", "kitdist.torchrun", *overrides]  # fmt: skip
    start = time.perf_counter()
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    print(done.stdout[-4000:], done.stderr[-4000:], flush=True)
    if done.returncode != 0:
        raise RuntimeError(f"kitdist.torchrun failed with status {done.returncode}")
    return time.perf_counter() - start, done.stdout + done.stderr


def restore_photograph(run: Path, size: tuple[int, int], cpu: bool) -> dict:
    """Restores a photograph of `size` (width, height) with the run's newest weights.safetensors."""
    import numpy as np
    from PIL import Image

    from kitdist.inference import load_restorer
    from kitdist.pretrain import photo_paths

    with Image.open(photo_paths()[0]) as photo:
        pixels = np.asarray(photo.convert("RGB").resize(size, Image.BICUBIC), dtype=np.float32) / 255.0
    figures = {}
    for precision in ("fp32",) if cpu else ("fp32", "bf16"):
        restorer = load_restorer(str(run), device="cpu" if cpu else "auto", precision=precision)
        if restorer.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(restorer.device)
        start = time.perf_counter()
        restored = restorer.restore(pixels)  # returns a host array: the GPU has finished
        seconds = time.perf_counter() - start
        peak = (
            torch.cuda.max_memory_allocated(restorer.device) / 2**20
            if restorer.device.type == "cuda"
            else None
        )
        figures[precision] = {"seconds": round(seconds, 3), "peak_mib": peak, "shape": list(restored.shape)}
    return figures


# --- loader: the training pipeline against decode-only, same tiles -------------------------------------


def loader_section(scratch: Path, cpu: bool) -> dict:
    import statistics

    import shardkit
    from loader import decode_only_rate, pipeline_rate

    from kitdist.pretrain import photo_paths

    samples, per_shard, workers, tile, batch = (64, 8, 2, 64, 4) if cpu else (960, 20, 12, 256, 8)
    folder = str(scratch / "loader-shards")
    shardkit.write_set(folder, photo_paths(), [per_shard] * (samples // per_shard), tile=tile, repeat=True)
    rounds = {"decode-only": [], "pipeline": []}
    for _ in range(2):  # interleaved, so that a slow spell hits both
        rounds["decode-only"].append(decode_only_rate(folder, workers)[1])
        rounds["pipeline"].append(pipeline_rate(folder, workers, tile, batch)[1])
    rates = {name: statistics.median(found) for name, found in rounds.items()}
    return {"ok": True, "samples": samples, "tile": tile, "workers": workers, "batch": batch, "rates": rates,
            "pipeline_over_decode": rates["pipeline"] / rates["decode-only"]}  # fmt: skip


SECTIONS = {"device": device_section, "train": train_section, "restore": restore_section,
            "loader": loader_section}  # fmt: skip


def main() -> None:
    name, result, scratch = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
    cpu = "--cpu" in sys.argv[4:]
    if cpu:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    try:
        found = SECTIONS[name](scratch, cpu)
    except Exception as err:
        traceback.print_exc()
        found = {"ok": False, "error": f"{type(err).__name__}: {str(err)[:300]}"}
    if int(os.environ.get("RANK", "0")) == 0:
        result.write_text(json.dumps(found, indent=1, default=str) + "\n")


if __name__ == "__main__":
    main()
