"""The per-worker training loop: build, restore, step, log, validate, checkpoint. Explicit, no callbacks.

It runs the same under Ray Train and torchrun: the launcher is reached only through a `Session`
(report metrics, hand over a checkpoint folder, find the latest one), and the engine only through a
`Strategy` (DeepSpeed or DDP). What the steps share (config, session, strategy, data stream, metrics
recorder, logging window, stop watch, MFU inputs) is one `Trainer`.

Guarantees: a resumed run is the run that would have happened (the data position, RNG states and
optimiser state come back; validation leaves every RNG as it found it); every rank takes part in the
same collectives in the same order (the log-step reductions, validation, checkpoints, the stop vote).
"""

from __future__ import annotations

import random
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from kitdist.batching import BatchPlan, describe_plans, micro_batch_seed, phase_config, plan_at, plan_run
from kitdist.checkpoints import TrainState, load_weights_url, run_url
from kitdist.config import RunConfig
from kitdist.data.stream_state import stream_of
from kitdist.distributed.env import all_gather_objects, all_reduce_sum, device_for, print0
from kitdist.distributed.strategy import Strategy, as_float
from kitdist.memory import budget_bytes, estimator
from kitdist.train import checkpoint as ckpt
from kitdist.train.engine import build_strategy
from kitdist.train.losses import LOSSES
from kitdist.train.perf import peak_flops, peak_memory_mb, training_flops_per_sample
from kitdist.train.progress import progress_line
from kitdist.train.recorder import MetricsRecorder
from kitdist.train.session import Session
from kitdist.train.stop import StopWatch
from kitdist.train.validation import validate

if TYPE_CHECKING:
    from kitdist.data import TrainStream


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def train_worker(cfg: RunConfig, session: Session) -> dict[str, Any]:
    """Trains until `train.max_steps`, resuming from the session's latest checkpoint if there is one."""
    trainer = Trainer.start(cfg, session)
    try:
        last = trainer.run()
    except BaseException:
        if trainer.recorder is not None:
            trainer.recorder.discard()
        raise
    if trainer.recorder is not None:
        trainer.recorder.close()
    return last


def _build(cfg: RunConfig, session: Session, device: torch.device) -> tuple[Strategy, TrainState | None]:
    """Model + strategy, restored from the latest checkpoint (whose training state is returned) or
    initialised (init_weights or seed)."""
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
            return strategy, None
        info = ckpt.read_resume_info(folder)
        model.load_state_dict(ckpt.read_weights(folder))
        strategy = build_strategy(cfg, model, device)
        how = ckpt.restore_strategy(folder, cfg, strategy, session.world_size)
        if not ckpt.restore_rng(folder, session.rank):
            seed_everything(cfg.train.seed + 1000 * (session.rank + 1) + info.step)
        print0(f"resumed from step {info.step} ({how} state, saved by {info.world_size} worker(s))")
        return strategy, info


class LogWindow:
    """Sums over the steps since the last log line. The loss sum and the last grad norm stay where the
    engine left them (on the GPU) until a logging step reads them: no host synchronisation per step."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.start = time.perf_counter()
        self.steps, self.samples, self.data_wait = 0, 0, 0.0
        self.loss_sum: torch.Tensor | float = 0.0
        self.grad_norm: torch.Tensor | float | None = None


def train_step(
    cfg: RunConfig, strategy: Strategy, batches, window: LogWindow, micro_batches: int, seeds=None
) -> None:
    """One optimiser update over `micro_batches` micro-batches, adding to `window`; `seeds`: one per
    micro-batch, for the model's random draws (`kitdist.batching.micro_batch_seed`). It reads nothing
    back from the device (the GPU battery counts its synchronisations)."""
    loss_fn = LOSSES[cfg.train.loss]
    for micro in range(micro_batches):
        waited = time.perf_counter()
        batch = next(batches)
        window.data_wait += time.perf_counter() - waited
        if seeds is not None:
            torch.manual_seed(seeds[micro])
        x = batch["input"].to(strategy.device, strategy.input_dtype, non_blocking=True)
        y = batch["target"].to(strategy.device, torch.float32, non_blocking=True)
        loss = loss_fn(strategy.forward(x).float(), y)
        strategy.backward(loss, last_micro_batch=micro == micro_batches - 1)
        window.loss_sum = window.loss_sum + loss.detach().double() / micro_batches
    window.grad_norm = strategy.step()
    window.steps += 1
    window.samples += cfg.data.global_batch_size


@dataclass
class MfuInputs:
    """Training FLOPs per sample and the device's peak FLOP/s; None where either is unknown."""

    flops_per_sample: float | None
    peak_flops: float | None

    @classmethod
    def of(cls, cfg: RunConfig, device: torch.device) -> MfuInputs:
        peak, source = peak_flops(cfg, device)
        try:
            flops = training_flops_per_sample(cfg)
        except Exception as err:  # MFU is a figure for the logs, never a reason to stop training
            print0(f"MFU not reported: counting MACs failed ({err})")
            return cls(None, None)
        per_crop = f"{flops / 6e9:.3f} GMAC per {cfg.data.crop_size}^2 crop"
        print0(f"MFU convention: 3 x forward MACs ({per_crop}) / {source}")
        return cls(flops, peak)

    def mfu(self, samples_per_s_per_worker: float) -> float | None:
        if self.flops_per_sample is None or self.peak_flops is None:
            return None
        return self.flops_per_sample * samples_per_s_per_worker / self.peak_flops


@dataclass
class Trainer:
    """One worker's training run: what every step shares. `start` builds it (restoring the latest
    checkpoint), `run` trains to `train.max_steps` or a stop request.

    Each step's crop, global batch, micro-batch and accumulation come from `plans` (`kitdist.batching`,
    one per phase of `data.schedule`); `phase_cfg` is the run's config as the current phase runs it. At a
    change of phase every rank's data position is gathered and the stream rebuilt from it, as a run
    resumed at that step would: the uninterrupted and the resumed run read the same samples."""

    cfg: RunConfig
    session: Session
    strategy: Strategy
    stream: TrainStream
    recorder: MetricsRecorder | None  # rank 0 only
    stop: StopWatch
    mfu: MfuInputs
    start_step: int
    plans: list[BatchPlan]
    plan: BatchPlan
    phase_cfg: RunConfig  # phase_config(cfg, plan), made once per phase
    window: LogWindow = field(default_factory=LogWindow)

    @classmethod
    def start(cls, cfg: RunConfig, session: Session) -> Trainer:
        strategy, resumed = _build(cfg, session, device_for(cfg.dist))
        start_step = resumed.step if resumed is not None else 0
        kept = (start_step, resumed.batching["micro_batch"]) if resumed and resumed.batching else None
        budget, workers = budget_bytes(cfg, strategy.device), session.world_size
        estimate = estimator(cfg, workers) if budget is not None else None
        plans = plan_run(cfg, workers, budget, kept, estimate)
        plan = plan_at(plans, start_step + 1)
        data_states = resumed.data_states if resumed is not None else None
        stream = open_stream(cfg, plan, session, data_states, strategy)
        recorder = MetricsRecorder(cfg, start_step) if session.rank == 0 else None
        steps = f"{start_step}..{cfg.train.max_steps}"
        print0(f"training steps {steps} on {session.world_size} worker(s), {strategy.name}")
        stop = StopWatch(run_url(cfg), session.rank, strategy.device)
        phase_cfg = phase_config(cfg, plan)
        mfu = MfuInputs.of(phase_cfg, strategy.device)
        return cls(cfg, session, strategy, stream, recorder, stop, mfu, start_step, plans, plan, phase_cfg)

    def seeds(self, step: int) -> list[int]:
        """The random-draw seed of each micro-batch this rank runs in update `step` (by stream)."""
        streams = [
            stream_of(self.session.rank, self.plan.grad_accum, micro)[0]
            for micro in range(self.plan.grad_accum)
        ]
        return [micro_batch_seed(self.cfg.train.seed, step, stream) for stream in streams]

    def run(self) -> dict[str, Any]:
        """Steps until `train.max_steps` or an agreed stop request; returns the last record made."""
        batches, last, final = iter(self.stream), {}, self.cfg.train.max_steps
        self.strategy.train(True)
        for step in range(self.start_step + 1, final + 1):
            if step > self.plan.phase.last:
                batches = self.next_phase(step, batches)
            accum = self.plan.grad_accum
            train_step(self.phase_cfg, self.strategy, batches, self.window, accum, self.seeds(step))
            last = self.after_step(step) or last
            if (
                step < final
                and self.stop.agrees_after(step, self.cfg.train.log_every)
                and self.stop.should_stop()
            ):
                if step % self.cfg.train.checkpoint_every:
                    self.save_checkpoint(step, {})
                print0(f"stopped on request after step {step}; the same command again resumes from there")
                break
        return last

    def next_phase(self, step: int, batches) -> Any:
        """Collective: the plan of the phase `step` opens; the stream rebuilt from every rank's position."""
        data_states = all_gather_objects(self.stream.state_dict())
        batches.close()  # the old stream's DataLoader workers end with it
        self.plan = plan_at(self.plans, step)
        self.phase_cfg = phase_config(self.cfg, self.plan)
        self.stream = open_stream(self.cfg, self.plan, self.session, data_states, self.strategy)
        self.mfu = MfuInputs.of(self.phase_cfg, self.strategy.device)
        print0(f"phase from step {step}: {describe_plans([self.plan])}")
        return iter(self.stream)

    def batching(self) -> dict[str, int]:
        """The current step's decisions, as logged and stored in checkpoints."""
        plan = self.plan
        return {
            "micro_batch": plan.micro_batch,
            "grad_accum": plan.grad_accum,
            "crop_size": plan.phase.crop_size,
            "global_batch_size": plan.phase.global_batch_size,
        }

    def after_step(self, step: int) -> dict[str, Any] | None:
        """Logging, validation and checkpointing due after `step`; returns the record if one was made."""
        train, final = self.cfg.train, step == self.cfg.train.max_steps
        record = None
        if step % train.log_every == 0 or final:
            record = self.log_record()
            self.window.reset()
        if (train.val_every and step % train.val_every == 0) or final:
            record = {
                **(record or {}),
                **validate(self.cfg, self.strategy, self.session.rank, self.session.world_size),
            }
        if record is not None and self.recorder is not None:
            self.recorder.log(step, record)
            print0(progress_line(self.phase_cfg, step, record))
        if step % train.checkpoint_every == 0 or final:
            self.save_checkpoint(step, record or {})
            if self.recorder is not None:
                self.recorder.sync()
        return record

    def log_record(self) -> dict[str, Any]:
        """Collective: the window's means over ranks."""
        window, workers = self.window, self.session.world_size
        # Reading the loss waits for the device's queued work: the time taken after it is the window's own.
        loss_sum, wait_sum = all_reduce_sum([window.loss_sum, window.data_wait], self.strategy.device)
        elapsed = time.perf_counter() - window.start
        samples_per_s = window.samples / elapsed
        record = {
            "loss": loss_sum / workers / window.steps,
            "lr": self.strategy.lr(),
            "grad_norm": as_float(window.grad_norm),
            "samples_per_s": samples_per_s,
            "data_wait_share": wait_sum / workers / elapsed,
            "peak_memory_mb": peak_memory_mb(self.strategy.device),
            **self.batching(),
        }
        mfu = self.mfu.mfu(samples_per_s / workers)
        return record if mfu is None else {**record, "mfu": mfu}

    def save_checkpoint(self, step: int, metrics: dict[str, Any]) -> None:
        """Collective: all ranks write their parts locally and hand them to the session."""
        data_states = all_gather_objects(self.stream.state_dict())
        local = Path(tempfile.mkdtemp(prefix="kitdist-ckpt-"))
        rank, world_size = self.session.rank, self.session.world_size
        try:
            ckpt.write_checkpoint(
                local, self.cfg, self.strategy, step, data_states, rank, world_size, self.batching()
            )
            self.session.report({"step": step, **metrics}, local, ckpt.checkpoint_name(step))
        finally:
            shutil.rmtree(local, ignore_errors=True)
        print0(f"checkpoint {ckpt.checkpoint_name(step)} saved")


def open_stream(
    cfg: RunConfig, plan: BatchPlan, session: Session, data_states: list | None, strategy: Strategy
) -> TrainStream:
    """The data stream of `plan`'s phase from the given position, and the engine set to its batching."""
    from kitdist.data import TrainStream

    strategy.set_batching(plan.micro_batch, plan.grad_accum)
    return TrainStream(
        phase_config(cfg, plan),
        session.rank,
        session.world_size,
        resume=data_states,
        device=strategy.device,
        micro_batch=plan.micro_batch,
        grad_accum=plan.grad_accum,
    )
