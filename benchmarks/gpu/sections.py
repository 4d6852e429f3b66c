"""The GPU battery's measured sections, one per process: `python sections.py SECTION RESULT SCRATCH [--cpu]`
records its rows as it measures them (rows.py) and writes its summary to RESULT (JSON, with "ok"). `train`
runs under torchrun (one process per GPU); the driver is battery.py, the figures are explained in
benchmarks/gpu/README.md. `--cpu` runs every section with tiny shapes, KLA's Flex path included (torch's
dense Flex reference, its backward let through torch's CPU device check as tests/test_flex_cpu.py does).
"""

from __future__ import annotations

import contextlib
import gc
import json
import os
import re
import statistics
import subprocess
import sys
import time
import traceback
import warnings
from itertools import cycle
from pathlib import Path

import rows
import torch

REPO = Path(__file__).resolve().parents[2]
DEADLINE_ENV = "KITDIST_BATTERY_DEADLINE"  # epoch seconds at which the driver stops this section
# model size, crop, global batch, warm-up steps, timed steps, precision (fp32 on a CPU: its bf16 is slow
# without AMX, and --cpu only checks that the battery runs)
TRAIN_SHAPE = {"gpu": ("kit", 256, 16, 3, 10, "bf16"), "cpu": ("debug", 32, 2, 1, 2, "fp32")}
ENGINES = {
    "DDP": ["dist.strategy=ddp", "dist.zero_stage=0"],
    "ZeRO-1": ["dist.strategy=deepspeed", "dist.zero_stage=1"],
    "ZeRO-2": ["dist.strategy=deepspeed", "dist.zero_stage=2"],
}
# the other precisions, DDP without checkpointing (the engines above run in the shape's precision)
OTHER_PRECISIONS = {"gpu": ("fp16", "fp32"), "cpu": ("bf16",)}
# one process runs several runs' Flex shapes (precisions, checkpointing, image sides): more graphs than
# one training process's plan (kitdist.model.flex.FLEX_GRAPH_BUDGET)
SECTION_FLEX_GRAPHS = 48


def seconds_left() -> float:
    """Until the driver stops this section (no limit when run by hand)."""
    deadline = os.environ.get(DEADLINE_ENV)
    return float(deadline) - time.time() if deadline else float("inf")


def device_section(scratch: Path, cpu: bool) -> dict:
    from kitdist.config import load_config
    from kitdist.train.perf import peak_flops

    info = {"torch": torch.__version__, "cuda": torch.version.cuda, "python": sys.version.split()[0],
            "packages": package_versions()}  # fmt: skip
    if cpu:
        found = {"ok": True, "name": f"CPU, {os.cpu_count()} cores", **info}
    elif not torch.cuda.is_available():
        found = {"ok": False, "error": "torch sees no CUDA GPU", **info}
    else:
        props = torch.cuda.get_device_properties(0)
        peak, source = peak_flops(load_config(None, ["dist.use_gpu=true"]), torch.device("cuda", 0))
        found = {
            "ok": True, "name": props.name, "capability": f"{props.major}.{props.minor}",
            "memory_gib": round(props.total_memory / 2**30, 1), "multiprocessors": props.multi_processor_count,
            "peak_bf16_tflops": peak / 1e12 if peak else None, "peak_source": source, **info,
        }  # fmt: skip
    rows.record(found)
    return found


def package_versions() -> dict[str, str]:
    from importlib import metadata

    found = {}
    for name in ("deepspeed", "triton", "safetensors", "pydantic", "hjson", "scikit-image", "pytest"):
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = "missing"
    return found


# --- attention: KLA against window attention at the shapes `kit` trains on ----------------------------


def attention_section(scratch: Path, cpu: bool) -> dict:
    """benchmarks/attention.py's cases (KLA's Flex path, b = 1 and 2, against window attention with the
    same bias) at the levels of `kit` at 256x256 crops, micro-batch 8, bf16; one row per case and shape as
    it is measured. --cpu: the same cases at 16x16 and 8x8, fp32, Flex eagerly (tests' device bypass)."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    from attention import ratios, step
    from attention_cases import CUDA_CASES, build_case

    from kitdist.model import SIZES

    kit = SIZES["kit"]
    device, dtype = ("cpu", torch.float32) if cpu else ("cuda", torch.bfloat16)
    batch, sides, repeats = (1, (16, 8), 1) if cpu else (8, (256, 128), 3)
    found = {"ok": True, "dtype": str(dtype).removeprefix("torch."), "shapes": []}
    with flex_on_cpu() if cpu else contextlib.nullcontext():
        for level, side in enumerate(sides, start=1):
            channels = kit.channels * 2 ** (level - 1)
            label = f"kit level {level}, {side}^2 x {batch}"
            shape = (batch, side, channels, channels // kit.head_dim)
            measured = time_cases(label, shape, CUDA_CASES, build_case, step, device, dtype, repeats)
            timed = {case: row for case, row in measured.items() if "ms" in row}
            summary = {"shape": label, "dims": list(shape), "ratios": ratios(timed)}
            rows.record(summary)
            found["shapes"].append(summary)
            found["ok"] &= len(timed) == len(measured)
    return found


def time_cases(label, shape, cases, build_case, step, device, dtype, repeats) -> dict[str, dict]:
    """Forward+backward of each case, interleaved round-robin: a row per case after its first call
    (compiling) and after the timed rounds (median ms, peak MiB above the input on CUDA). A case that
    fails is recorded and left out of the rounds."""
    batch, side, channels, heads = shape
    torch.manual_seed(0)
    x = torch.randn(batch, side, side, channels, device=device, dtype=dtype, requires_grad=True)
    live, failed, times, peaks = {}, {}, {}, {}
    for case in cases:
        try:
            live[case] = build_case(case, channels, heads).to(device, dtype).train()
        except Exception as err:
            failed[case] = {"error": f"{type(err).__name__}: {str(err)[:200]}"}
    for repeat in range(repeats + 1):  # round 0 compiles, and is not timed
        for case, module in list(live.items()):
            try:
                synchronize(device)
                if device == "cuda":
                    torch.cuda.reset_peak_memory_stats()
                    base = torch.cuda.memory_allocated()
                start = time.perf_counter()
                step(module, x)
                synchronize(device)
                ms = (time.perf_counter() - start) * 1e3
            except Exception as err:  # one case failing (out of memory, a compile error) leaves the others
                traceback.print_exc()
                failed[case] = {"error": f"{type(err).__name__}: {str(err)[:200]}"}
                rows.record({"shape": label, "case": case, **failed[case]})
                del live[case]
                x.grad = None
                continue
            if device == "cuda":
                peaks[case] = (torch.cuda.max_memory_allocated() - base) / 2**20
            x.grad = None
            if repeat == 0:
                rows.record({"shape": label, "case": case, "first_ms": round(ms, 2)})
            else:
                times.setdefault(case, []).append(ms)
    measured = dict(failed)
    for case in live:
        measured[case] = {"ms": statistics.median(times[case]), "peak_mb": peaks.get(case)}
        rows.record({"shape": label, "case": case, **measured[case]})
    return measured


@contextlib.contextmanager
def flex_on_cpu():
    """KLA's Flex path on CPU, forward and backward: torch's dense Flex reference with its backward let
    through torch's CPU device check (as tests/test_flex_cpu.py's `flex_backward_on_cpu`), and the window
    case's Flex run eagerly rather than compiled by inductor (a C++ build per shape on a CPU)."""
    from torch.nn.attention import flex_attention as torch_flex

    from kitdist.model import flex

    assert hasattr(torch_flex, "_validate_device"), "torch moved Flex's device check: update flex_on_cpu"
    saved = torch_flex._validate_device, flex.compiled_flex
    torch_flex._validate_device = lambda *tensors: None
    flex.compiled_flex = lambda backend="inductor": torch_flex.flex_attention
    try:
        yield
    finally:
        torch_flex._validate_device, flex.compiled_flex = saved


# --- restore: one 1920x1080 photograph through kitdist.inference --------------------------------------


def restore_section(scratch: Path, cpu: bool) -> dict:
    """A `kit` model (seeded weights, written as weights.safetensors and loaded by `load_restorer`)
    restores a 1920x1080 photograph in 512-pixel tiles, bf16 then fp32: the first call (compiling) and a
    second one timed, with peak memory. --cpu: the debug size, a 128x96 photograph, fp32."""
    from safetensors.torch import save_file

    from kitdist.config import ModelConfig
    from kitdist.model import build_model

    size = "debug" if cpu else "kit"
    torch.manual_seed(0)
    weights = scratch / f"{size}.safetensors"
    save_file(build_model(ModelConfig(size=size)).state_dict(), str(weights))
    image = (128, 96) if cpu else (1920, 1080)
    found = restore_photograph(str(weights), size, image, ("fp32",) if cpu else ("bf16", "fp32"), cpu)
    return {"ok": bool(found) and all("error" not in row for row in found.values()), "model": size,
            "image": "x".join(map(str, image)), "restore": found}  # fmt: skip


def restore_photograph(weights: str, size: str | None, image: tuple[int, int], precisions, cpu: bool) -> dict:
    """Restores a photograph resized to `image` (width, height) in each precision, twice (the first call
    compiles); a row per precision as it is done."""
    import numpy as np
    from PIL import Image

    from kitdist.inference import load_restorer
    from kitdist.pretrain import photo_paths

    with Image.open(photo_paths()[0]) as photo:
        pixels = np.asarray(photo.convert("RGB").resize(image, Image.BICUBIC), dtype=np.float32) / 255.0
    found = {}
    for precision in precisions:
        if found and seconds_left() < 3 * max(row.get("first_s", 0) for row in found.values()):
            break  # the next precision would not finish before the section's limit
        row = {"precision": precision, "image": "x".join(map(str, image))}
        try:
            restorer = load_restorer(weights, size, device="cpu" if cpu else "cuda", precision=precision)
            start = time.perf_counter()
            restorer.restore(pixels)
            row["first_s"] = round(time.perf_counter() - start, 3)
            if restorer.device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(restorer.device)
            start = time.perf_counter()
            restored = restorer.restore(pixels)  # a host array: the GPU has finished
            row["seconds"] = round(time.perf_counter() - start, 3)
            row["shape"] = list(restored.shape)
            if restorer.device.type == "cuda":
                row["peak_mib"] = round(torch.cuda.max_memory_allocated(restorer.device) / 2**20)
            del restorer
            release(None)
        except Exception as err:
            traceback.print_exc()
            row["error"] = f"{type(err).__name__}: {str(err)[:200]}"
        rows.record(row)
        found[precision] = row
    return found


# --- train: engines, precisions and activation checkpointing, in one torchrun process -----------------


def train_section(scratch: Path, cpu: bool) -> dict:
    import torch.distributed as dist

    from kitdist.config import load_config
    from kitdist.distributed.env import device_for
    from kitdist.model import flex
    from kitdist.train.perf import peak_flops, training_flops_per_sample

    flex.FLEX_GRAPH_BUDGET = SECTION_FLEX_GRAPHS
    mode = "cpu" if cpu else "gpu"
    model, crop, batch, warmup, steps, precision = TRAIN_SHAPE[mode]
    base = [f"model.size={model}", f"data.crop_size={crop}", f"data.global_batch_size={batch}",
            "dist.num_workers=1", f"dist.use_gpu={str(not cpu).lower()}", "train.warmup_steps=1"]  # fmt: skip
    cfg = load_config(None, [*base, f"train.precision={precision}"])
    device = device_for(cfg.dist)
    dist.init_process_group("gloo" if cpu else "nccl")
    flops, (peak, source) = training_flops_per_sample(cfg), peak_flops(cfg, device)
    variants = [(engine, precision, checkpointing) for checkpointing in (False, True) for engine in ENGINES]
    variants += [("DDP", other, False) for other in OTHER_PRECISIONS[mode]]
    # The process's first steps pay one-time costs (kernel choice, allocator growth): not any engine's.
    measure_engine(load_config(None, [*base, *ENGINES["DDP"], f"train.precision={precision}"]), device,
                   warmup, 1, flops, peak)  # fmt: skip
    found = []
    for engine, chosen, checkpointing in variants:
        overrides = [*base, *ENGINES[engine], f"train.precision={chosen}",
                     f"model.checkpoint_activations={str(checkpointing).lower()}"]  # fmt: skip
        row = {"engine": engine, "precision": chosen, "checkpointing": "on" if checkpointing else "off"}
        row.update(measure_engine(load_config(None, overrides), device, warmup, steps, flops, peak))
        ddp = [other for other in found if other["engine"] == "DDP" and other["precision"] == chosen
               and other["checkpointing"] == row["checkpointing"] and "step_ms" in other]  # fmt: skip
        if ddp and "step_ms" in row:  # DDP comes first among the engines of a precision and setting
            row["x_ddp"] = row["step_ms"] / ddp[0]["step_ms"]
        found.append(row)
        if int(os.environ.get("RANK", "0")) == 0:
            rows.record(row)
    dist.destroy_process_group()
    return {"ok": all("error" not in row for row in found), "model": model, "crop": crop, "batch": batch,
            "precision": precision, "peak_source": source, **relative_figures(found)}  # fmt: skip


def measure_engine(cfg, device: torch.device, warmup: int, steps: int, flops: float, peak) -> dict:
    """Mean time of `steps` training steps after `warmup`, on synthetic batches already on the device (the
    engine alone, no data loading); peak memory of the timed steps; host syncs per step."""
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


def relative_figures(found: list[dict]) -> dict:
    """Activation checkpointing's cost for DDP in the main precision: memory and time, on over off."""
    main = found[0]["precision"] if found else None
    by_key = {(row["engine"], row["precision"], row["checkpointing"]): row for row in found}
    off, on = by_key.get(("DDP", main, "off"), {}), by_key.get(("DDP", main, "on"), {})
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


def synchronize(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def release(strategy) -> None:
    engine = getattr(strategy, "engine", None)
    if engine is not None and hasattr(engine, "destroy"):
        engine.destroy()
    del strategy, engine
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# --- growth: the model's eval forward on growing images, up to what fits -------------------------------


def growth_section(scratch: Path, cpu: bool) -> dict:
    """`kit`'s eval forward (bf16) on whole images of doubling side, a row per side, until one runs out
    of memory or the next would not finish in the section's time (each side compiles its own graphs).
    --cpu: the debug size at 16 and 32 px, fp32."""
    from kitdist.config import ModelConfig
    from kitdist.model import build_model, flex

    flex.FLEX_GRAPH_BUDGET = SECTION_FLEX_GRAPHS
    size, sides, dtype = ("debug", (16, 32), torch.float32) if cpu else ("kit", (256, 512, 1024, 2048, 4096),
                                                                        torch.bfloat16)  # fmt: skip
    device = "cpu" if cpu else "cuda"
    torch.manual_seed(0)
    model = build_model(ModelConfig(size=size)).to(device).eval()
    found, last_s = [], 0.0
    for side in sides:
        if last_s and seconds_left() < 5 * last_s:  # 4x the pixels, and its own compile
            rows.record({"side": side, "skipped": "the section's time would run out"})
            break
        row, start = {"side": side}, time.perf_counter()
        try:
            image = torch.rand(1, 3, side, side, device=device)
            precision = (
                torch.autocast(device, dtype=dtype) if dtype != torch.float32 else contextlib.nullcontext()
            )
            with torch.no_grad(), precision:
                model(image)  # compiles this side's graphs
                synchronize(device)
                row["first_ms"] = round((time.perf_counter() - start) * 1e3, 1)
                if device == "cuda":
                    torch.cuda.reset_peak_memory_stats()
                times = []
                for _ in range(2):
                    begun = time.perf_counter()
                    model(image)
                    synchronize(device)
                    times.append((time.perf_counter() - begun) * 1e3)
            row["ms"] = round(min(times), 1)
            row["ms_per_mp"] = round(row["ms"] / (side * side / 1e6), 1)
            if device == "cuda":
                row["peak_mib"] = round(torch.cuda.max_memory_allocated() / 2**20)
        except torch.cuda.OutOfMemoryError as err:
            row["error"] = f"out of memory: {str(err)[:160]}"
        except Exception as err:
            traceback.print_exc()
            row["error"] = f"{type(err).__name__}: {str(err)[:200]}"
        last_s = time.perf_counter() - start
        rows.record(row)
        found.append(row)
        release(None)
        if "error" in row:
            break
    fitted = [row["side"] for row in found if "ms" in row]
    return {"ok": bool(fitted), "model": size, "dtype": str(dtype).removeprefix("torch."),
            "largest_side": max(fitted) if fitted else None}  # fmt: skip


# --- loader: the training pipeline against decode-only, same tiles -------------------------------------


def loader_section(scratch: Path, cpu: bool) -> dict:
    """PNG tiles of scikit-image's photographs in shards built by kitdist's own builder: `TrainStream`
    against decode-only, same shards and workers, interleaved rounds, a row per measure and round."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    from loader import decode_only_rate, pipeline_rate

    from kitdist.pretrain import photo_paths
    from kitdist.shards import build_shards

    tile, stride, per_shard, workers, batch = (64, 64, 8, 2, 4) if cpu else (256, 64, 20, 12, 8)
    source = scratch / "loader-photos"
    source.mkdir(parents=True, exist_ok=True)
    for path in photo_paths()[:3] if cpu else photo_paths():  # --cpu: ~150 tiles
        if not (source / path.name).exists():
            (source / path.name).symlink_to(path)
    folder = str(scratch / "loader-shards")
    built = build_shards("folder", source, folder, samples_per_shard=per_shard, tile=tile, stride=stride,
                         workers=1 if cpu else 8, progress=False)  # fmt: skip
    samples = sum(manifest.total_samples for manifest in built.values())
    rates: dict[str, list[float]] = {"decode-only": [], "pipeline": []}
    for round_ in range(2):  # interleaved, so that a slow spell hits both
        for name in rates:
            rate = decode_only_rate(folder, workers)[1] if name == "decode-only" else \
                pipeline_rate(folder, workers, tile, batch)[1]  # fmt: skip
            rates[name].append(rate)
            rows.record({"measure": name, "round": round_, "samples_per_s": round(rate, 1)})
    medians = {name: statistics.median(found) for name, found in rates.items()}
    return {"ok": True, "samples": samples, "tile": tile, "workers": workers, "batch": batch, "rates": medians,
            "pipeline_over_decode": medians["pipeline"] / medians["decode-only"]}  # fmt: skip


# --- resume: the torchrun command line, checkpoints, resume, the run's weights restoring a photograph ---


def resume_section(scratch: Path, cpu: bool) -> dict:
    """`torchrun -m kitdist.torchrun`: `kit`, ZeRO-2 bf16, crops 128, 4 steps with checkpoints, then the same
    command to 6 steps (it resumes from 4); the run's weights.safetensors restores a 256x192 photograph."""
    from kitdist.pretrain import ensure_photo_shards

    train_url, val_url = ensure_photo_shards(str(scratch / "photo-shards"))
    model = "debug" if cpu else "kit"
    overrides = [
        f"model.size={model}", f"data.crop_size={32 if cpu else 128}", f"data.global_batch_size={2 if cpu else 8}",
        f"data.num_workers={0 if cpu else 4}", f"data.train_shards={train_url}", f"data.val_shards={val_url}",
        "data.max_val_samples=2", "data.val_crop_size=64", "train.warmup_steps=1",
        "train.log_every=1", "train.checkpoint_every=2", f"train.precision={'fp32' if cpu else 'bf16'}",
        "dist.num_workers=1", f"dist.cpus_per_worker={1 if cpu else 0}",  # --cpu: one thread (battery.py)
        f"dist.use_gpu={str(not cpu).lower()}", "dist.strategy=deepspeed", "dist.zero_stage=2",
        f"storage.root={scratch / 'runs'}", "storage.run_name=battery",
    ]  # fmt: skip
    first_s, _ = torchrun_training([*overrides, "train.max_steps=4"])
    rows.record({"run": "first", "steps": 4, "seconds": round(first_s, 1)})
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
    rows.record(
        {"run": "resumed", "steps": 6, "seconds": result["resume_s"], "resumed_from": result["resumed_from"]}
    )
    image = (128, 96) if cpu else (256, 192)
    result["restore"] = restore_photograph(str(run), None, image, ("fp32" if cpu else "bf16",), cpu)
    result["ok"] = (
        result["resumed_from"] == 4
        and len(result["losses"]) == 6
        and all("error" not in row for row in result["restore"].values())
    )
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


SECTIONS = {"device": device_section, "attention": attention_section, "restore": restore_section,
            "train": train_section, "loader": loader_section, "growth": growth_section,
            "resume": resume_section}  # fmt: skip


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
        rows.record_imports()
        result.write_text(json.dumps(found, indent=1, default=str) + "\n")


if __name__ == "__main__":
    main()
