"""The per-worker training loop: build, restore, step, log, validate, checkpoint. Explicit, no callbacks.

It runs the same under Ray Train and torchrun: the launcher is reached only through a `Session`
(report metrics, hand over a checkpoint folder, find the latest one), and the engine only through a
`Strategy` (DeepSpeed or DDP).
"""

from __future__ import annotations

import random
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from kitdist import storage
from kitdist.config import SPATIAL_MULTIPLE, RunConfig
from kitdist.dist.env import all_gather_objects, all_reduce_sum, device_for, print0
from kitdist.dist.strategy import Strategy, as_float
from kitdist.train import checkpoint as ckpt
from kitdist.train.engine import build_strategy
from kitdist.train.losses import LOSSES
from kitdist.train.metrics import MetricConvention, psnr, ssim
from kitdist.train.perf import peak_flops, peak_memory_mb, training_flops_per_sample
from kitdist.train.recorder import MetricsRecorder
from kitdist.train.session import Session
from kitdist.train.stop import StopWatch

VAL_CONVENTIONS = {"rgb": MetricConvention("rgb", 0, 1.0), "y": MetricConvention("y", 0, 1.0)}


def run_url(cfg: RunConfig) -> str:
    return storage.join(cfg.storage.root, cfg.storage.run_name)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def train_worker(cfg: RunConfig, session: Session) -> dict[str, Any]:
    """Trains until `train.max_steps`, resuming from the session's latest checkpoint if there is one."""
    from kitdist.data import TrainStream

    device = device_for(cfg.dist)
    strategy, start_step, data_states = _build(cfg, session, device)
    stream = TrainStream(cfg, session.rank, session.world_size, resume=data_states, device=strategy.device)
    recorder = (
        MetricsRecorder(storage.join(run_url(cfg), "metrics"), start_step) if session.rank == 0 else None
    )
    print0(
        f"training steps {start_step}..{cfg.train.max_steps} on {session.world_size} worker(s), {strategy.name}"
    )
    last = _train_steps(cfg, session, strategy, stream, recorder, start_step)
    if recorder is not None:
        recorder.close()
    return last


def _build(cfg: RunConfig, session: Session, device: torch.device) -> tuple[Strategy, int, list | None]:
    """Model + strategy, restored from the latest checkpoint or initialised (init_weights or seed)."""
    from kitdist.model import build_model

    seed_everything(cfg.train.seed)  # identical initial weights on every rank
    model = build_model(cfg.model)
    with session.latest_checkpoint() as folder:
        if folder is None:
            if cfg.train.init_weights:
                model.load_state_dict(load_weights_url(cfg.train.init_weights))
                print0(f"initial weights: {cfg.train.init_weights}")
            strategy = build_strategy(cfg, model, device)
            seed_everything(cfg.train.seed + 1000 * (session.rank + 1))  # per-rank LSH draws
            return strategy, 0, None
        info = ckpt.read_resume_info(folder)
        model.load_state_dict(ckpt.read_weights(folder))
        strategy = build_strategy(cfg, model, device)
        how = ckpt.restore_strategy(folder, cfg, strategy, session.world_size)
        if not ckpt.restore_rng(folder, session.rank):
            seed_everything(cfg.train.seed + 1000 * (session.rank + 1) + info.step)
        print0(f"resumed from step {info.step} ({how} state, saved by {info.world_size} worker(s))")
        return strategy, info.step, info.data_states


def load_weights_url(url: str) -> dict[str, torch.Tensor]:
    """A weights.safetensors (or a checkpoint folder holding one) at any storage URL."""
    from safetensors.torch import load

    if not url.endswith(".safetensors"):
        url = storage.join(url, ckpt.WEIGHTS)
    return load(storage.read_bytes(url))


class _Window:
    """Sums over the steps since the last log line. The loss sum and the last grad norm stay where the
    engine left them (on the GPU) until a logging step reads them: no host synchronisation per step."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.start = time.perf_counter()
        self.steps, self.data_wait = 0, 0.0
        self.loss_sum: torch.Tensor | float = 0.0
        self.grad_norm: torch.Tensor | float | None = None


def train_step(cfg: RunConfig, strategy: Strategy, batches, window: _Window) -> None:
    """One optimiser update over `train.grad_accum_steps` micro-batches, adding to `window`. It reads
    nothing back from the device (the GPU battery counts its synchronisations)."""
    loss_fn = LOSSES[cfg.train.loss]
    for micro in range(cfg.train.grad_accum_steps):
        waited = time.perf_counter()
        batch = next(batches)
        window.data_wait += time.perf_counter() - waited
        x = batch["input"].to(strategy.device, strategy.input_dtype, non_blocking=True)
        y = batch["target"].to(strategy.device, torch.float32, non_blocking=True)
        loss = loss_fn(strategy.forward(x).float(), y)
        strategy.backward(loss, last_micro_batch=micro == cfg.train.grad_accum_steps - 1)
        window.loss_sum = window.loss_sum + loss.detach().double() / cfg.train.grad_accum_steps
    window.grad_norm = strategy.step()
    window.steps += 1


def _train_steps(cfg, session, strategy, stream, recorder, start_step) -> dict[str, Any]:
    flops, peak = _mfu_inputs(cfg, strategy.device)
    batches = iter(stream)
    window, last = _Window(), {}
    stop = StopWatch(run_url(cfg), session.rank, strategy.device)
    strategy.train(True)
    for step in range(start_step + 1, cfg.train.max_steps + 1):
        train_step(cfg, strategy, batches, window)
        last = _after_step(cfg, session, strategy, stream, recorder, step, window, flops, peak) or last
        if step < cfg.train.max_steps and stop.agrees_after(step, cfg.train.log_every) and stop.should_stop():
            if step % cfg.train.checkpoint_every:
                save_checkpoint(cfg, session, strategy, stream, step, {})
            print0(f"stopped on request after step {step}; the same command again resumes from there")
            break
    return last


def _after_step(cfg, session, strategy, stream, recorder, step, window, flops, peak) -> dict[str, Any] | None:
    """Logging, validation and checkpointing due after `step`; returns the record if one was made."""
    final = step == cfg.train.max_steps
    record = None
    if step % cfg.train.log_every == 0 or final:
        record = _log_record(cfg, session, strategy, step, window, flops, peak)
        window.reset()
    if (cfg.train.val_every and step % cfg.train.val_every == 0) or final:
        record = {**(record or {}), **validate(cfg, strategy, session)}
    if record is not None and recorder is not None:
        recorder.log(step, record)
        print0(_progress_line(cfg, step, record))
    if step % cfg.train.checkpoint_every == 0 or final:
        save_checkpoint(cfg, session, strategy, stream, step, record or {})
        if recorder is not None:
            recorder.sync()
    return record


def _log_record(cfg, session, strategy, step, window, flops, peak) -> dict[str, Any]:
    # Reading the loss waits for the device's queued work: the time taken after it is the window's own.
    loss_sum, wait_sum = all_reduce_sum([window.loss_sum, window.data_wait], strategy.device)
    elapsed = time.perf_counter() - window.start
    samples_per_s = cfg.data.global_batch_size * window.steps / elapsed
    record = {
        "loss": loss_sum / session.world_size / window.steps,
        "lr": strategy.lr(),
        "grad_norm": as_float(window.grad_norm),
        "samples_per_s": samples_per_s,
        "data_wait_share": wait_sum / session.world_size / elapsed,
        "peak_memory_mb": peak_memory_mb(strategy.device),
    }
    if flops is not None and peak is not None:
        record["mfu"] = flops * samples_per_s / session.world_size / peak
    return record


def _mfu_inputs(cfg: RunConfig, device: torch.device) -> tuple[float | None, float | None]:
    peak, source = peak_flops(cfg, device)
    try:
        flops = training_flops_per_sample(cfg)
    except Exception as err:  # MFU is a figure for the logs, never a reason to stop training
        print0(f"MFU not reported: counting MACs failed ({err})")
        return None, None
    print0(
        f"MFU convention: 3 x forward MACs ({flops / 6e9:.3f} GMAC per {cfg.data.crop_size}^2 crop) / {source}"
    )
    return flops, peak


def _progress_line(cfg: RunConfig, step: int, record: dict[str, Any]) -> str:
    parts = [f"step {step}/{cfg.train.max_steps}"]
    for key, fmt in (("loss", "{:.4f}"), ("lr", "{:.2e}"), ("samples_per_s", "{:.1f}/s")):
        if key in record:
            parts.append(f"{key} " + fmt.format(record[key]))
    if record.get("samples_per_s") and step < cfg.train.max_steps:
        from kitdist.console import duration  # at the pace of the last window

        left = (cfg.train.max_steps - step) * cfg.data.global_batch_size / record["samples_per_s"]
        parts.append(f"ETA {duration(left)}")
    if "data_wait_share" in record:
        parts.append(f"data-wait {record['data_wait_share']:.0%}")
    if "mfu" in record:
        parts.append(f"MFU {record['mfu']:.2%}")
    if "val_psnr_rgb" in record:
        parts.append(f"val PSNR {record['val_psnr_rgb']:.2f} dB / SSIM {record['val_ssim_rgb']:.4f} (RGB)")
    return " | ".join(parts)


def save_checkpoint(cfg, session, strategy, stream, step: int, metrics: dict[str, Any]) -> None:
    """Collective: all ranks write their parts locally and hand them to the session."""
    data_states = all_gather_objects(stream.state_dict())
    local = Path(tempfile.mkdtemp(prefix="kitdist-ckpt-"))
    try:
        ckpt.write_checkpoint(local, cfg, strategy, step, data_states, session.rank, session.world_size)
        session.report({"step": step, **metrics}, local, ckpt.checkpoint_name(step))
    finally:
        shutil.rmtree(local, ignore_errors=True)
    print0(f"checkpoint {ckpt.checkpoint_name(step)} saved")


def validate(cfg: RunConfig, strategy: Strategy, session: Session) -> dict[str, Any]:
    """PSNR/SSIM over each rank's part of the validation set, summed over ranks. RNG states are left as
    they were, so validating (or not, e.g. at the end of a shorter run) never changes the training that
    follows: a resumed run stays the run that would have happened."""
    if not cfg.data.val_shards:
        return {}
    python_state, numpy_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[strategy.device] if strategy.device.type == "cuda" else []):
        result = _validate(cfg, strategy, session)
    random.setstate(python_state)
    np.random.set_state(numpy_state)
    return result


@torch.no_grad()
def _validate(cfg: RunConfig, strategy: Strategy, session: Session) -> dict[str, Any]:
    from kitdist.data import val_batches

    strategy.train(False)
    images = list(val_batches(cfg, session.rank, session.world_size))
    # ZeRO-3 gathers parameters inside forward, a collective: every rank runs as many forwards as the
    # rank with the most images (a rank with fewer runs a small blank image and ignores the result).
    most = max(all_gather_objects(len(images)))
    blank = torch.zeros(1, 3, SPATIAL_MULTIPLE, SPATIAL_MULTIPLE)
    sums = [0.0] * 4
    for index in range(most):
        batch = images[index] if index < len(images) else None
        output = _restore_padded(strategy, batch["input"] if batch is not None else blank)
        if batch is None:
            continue
        target = batch["target"].to(strategy.device, torch.float32)
        for slot, (fn, space) in enumerate(((psnr, "rgb"), (ssim, "rgb"), (psnr, "y"), (ssim, "y"))):
            sums[slot] += fn(output, target, VAL_CONVENTIONS[space]).sum().item()
    strategy.train(True)
    totals = all_reduce_sum(sums + [float(len(images))], strategy.device)
    count = max(totals[4], 1.0)
    return {
        "val_psnr_rgb": totals[0] / count,
        "val_ssim_rgb": totals[1] / count,
        "val_psnr_y": totals[2] / count,
        "val_ssim_y": totals[3] / count,
        "val_images": int(totals[4]),
        "val_convention": "PSNR/SSIM on RGB and on Y (BT.601), crop 0px, data range 1, whole images",
    }


def _restore_padded(strategy: Strategy, image: torch.Tensor) -> torch.Tensor:
    """The model's output for a whole image, reflect-padded up to a multiple of 32 and cropped back."""
    height, width = image.shape[-2:]
    pad_h, pad_w = (-height) % SPATIAL_MULTIPLE, (-width) % SPATIAL_MULTIPLE
    x = image.to(strategy.device, torch.float32)
    if pad_h or pad_w:
        x = F.pad(x, (0, pad_w, 0, pad_h), mode="replicate")
    output = strategy.forward(x.to(strategy.input_dtype)).float()
    return output[..., :height, :width].clamp(0, 1)
