"""Everything about a run that can be checked on the driver, before Ray starts: the model (built once on
the meta device from the resolved config, and run on one crop there), the data sets and the batches they
give, the weights a run starts from or resumes, and the storage it writes to.

A run that fails here costs a second and one line naming the key, file or URL; the same run failing in
the workers would cost a cluster start and the worker group's restarts.
"""

from __future__ import annotations

import json
import struct

from kitdist import storage
from kitdist.batching import batches_per_epoch, describe_plans, phases, plan_run
from kitdist.checkpoints import latest_checkpoint, newest_weights, read_resume_info, run_url, weights_url
from kitdist.config import ConfigError, ModelConfig, RunConfig
from kitdist.credentials import check_credentials_file
from kitdist.memory import budget_bytes, estimator
from kitdist.rerun import Rerun, check_rerun
from kitdist.rerun import describe as describe_rerun
from kitdist.train.recorder import wandb_module

MAX_HEADER_BYTES = 100_000_000  # safetensors' own limit


def check_fine_tune_data(cfg: RunConfig) -> None:
    """A fine-tune has a restoration to learn: paired shards (input/target), or clean ones with a synthetic
    degradation drawn afresh every step (e.g. Gaussian noise of one sigma: a denoiser for that sigma,
    without the overfitting of noise drawn once, when the shards were built)."""
    degrade = cfg.degrade
    if cfg.data.kind == "clean" and not (degrade.noise_prob or degrade.blur_prob or degrade.jpeg_prob):
        raise ConfigError(
            "data.kind: a fine-tune on clean shards learns to undo the degradation drawn for each sample, "
            "but degrade.noise_prob, blur_prob and jpeg_prob are all 0; enable one or set data.kind=paired"
        )


def check_launchable(cfg: RunConfig, fine_tune: bool = False) -> Rerun | None:
    """Raises ConfigError, ManifestError or StorageError naming the key or URL of the first problem.
    Returns what the run name already holds (`kitdist.rerun`; None for a new name)."""
    from kitdist.shards.manifest import read_manifest_of_kind

    if not cfg.data.train_shards:
        raise ConfigError("data.train_shards: missing; set it to a shard folder URL (with manifest.json)")
    if fine_tune:
        if not cfg.train.init_weights:
            raise ConfigError(
                "train.init_weights: fine-tuning starts from pre-trained weights; give their URL"
            )
        check_fine_tune_data(cfg)
    check_credentials_file()
    if "wandb" in cfg.train.report_to:
        wandb_module()
    shapes = check_model(cfg)
    manifest = read_manifest_of_kind(cfg.data.train_shards, cfg.data.kind, "data.train_shards")
    check_batches(cfg, manifest.total_samples)
    if cfg.data.val_shards:
        read_manifest_of_kind(cfg.data.val_shards, cfg.data.kind, "data.val_shards")
    if cfg.train.init_weights:
        check_weights("train.init_weights", cfg.train.init_weights, shapes, cfg.model)
    run = run_url(cfg)
    rerun = check_rerun(cfg)  # before the writability probe below creates the run's folder
    resumed = newest_weights(run) if cfg.storage.on_existing != "restart" else ""
    if resumed:
        check_weights(f"storage.run_name={cfg.storage.run_name} (resuming)", resumed, shapes, cfg.model)
    storage.check_writable(run)
    return rerun


def check_report(cfg: RunConfig, fine_tune: bool = False) -> str:
    """`--check`: every check of `check_launchable`, and what a launch would print before starting Ray:
    the resolved config, what happens to the run name, the batches and memory of each phase."""
    from kitdist.config import dump_yaml

    rerun = check_launchable(cfg, fine_tune=fine_tune)
    return "\n".join(
        ["resolved config:", dump_yaml(cfg).rstrip(), describe_rerun(cfg, rerun), describe_batches(cfg)]
    )


def check_model(cfg: RunConfig) -> dict[str, tuple[int, ...]]:
    """Builds the model on the meta device and runs one training crop (and one validation crop) through
    it there: every model setting is exercised without memory or time. Returns the parameter shapes."""
    import torch

    from kitdist.model import build_model

    crops = {*(phase.crop_size for phase in phases(cfg)), cfg.data.val_crop_size or cfg.data.crop_size}
    try:
        with torch.device("meta"), torch.no_grad():
            model = build_model(cfg.model)
            for crop in sorted(crops):
                model(torch.zeros(1, 3, crop, crop))
    except ConfigError:
        raise
    except (ValueError, RuntimeError, AssertionError, TypeError) as err:
        raise ConfigError(
            f"model: size {cfg.model.size!r} with these model.* settings cannot run on "
            f"{max(crops)}x{max(crops)} crops: {err}",
            key="model",
        ) from None
    return {name: tuple(tensor.shape) for name, tensor in model.state_dict().items()}


def model_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Parameter shapes of the model `cfg` builds, on the meta device (no memory, no time)."""
    import torch

    from kitdist.model import build_model

    with torch.device("meta"):
        model = build_model(cfg)
    return {name: tuple(tensor.shape) for name, tensor in model.state_dict().items()}


def size_with_shapes(shapes: dict[str, tuple[int, ...]]) -> str | None:
    """The named size whose parameter names and shapes are exactly `shapes`, if any."""
    from kitdist.model import SIZES

    return next((name for name in SIZES if model_shapes(ModelConfig(size=name)) == shapes), None)


def check_batches(cfg: RunConfig, samples: int) -> None:
    """Every rank needs a batch per epoch for each of its data workers (the rule TrainStream applies)."""
    if cfg.data.mode != "epoch":
        return
    batches_per_rank = batches_per_epoch(cfg, samples)
    slots = max(1, cfg.data.num_workers)
    if batches_per_rank < slots:
        raise ConfigError(
            f"data.train_shards: {cfg.data.train_shards} holds {samples} samples: {batches_per_rank} batch(es)"
            f" per rank and epoch of data.global_batch_size={cfg.data.global_batch_size} over dist.num_workers="
            f"{cfg.dist.num_workers}, fewer than data.num_workers={slots}; use a larger set or smaller batches",
            key="data.train_shards",
        )


def weights_shapes(url: str) -> dict[str, tuple[int, ...]]:
    """Tensor shapes from a safetensors header (its first bytes; the tensors are not read).
    A missing file raises FileNotFoundError naming it; an unreadable one ConfigError."""
    try:
        with storage.open_read(url) as handle:
            (length,) = struct.unpack("<Q", handle.read(8))
            if length > MAX_HEADER_BYTES:
                raise ValueError(f"a header of {length} bytes")
            header = json.loads(handle.read(length))
    except FileNotFoundError:
        raise FileNotFoundError(f"{url}: no such weights file") from None
    except (struct.error, ValueError, UnicodeDecodeError) as err:
        raise ConfigError(f"{url}: not a readable safetensors file ({err})") from None
    return {name: tuple(entry["shape"]) for name, entry in header.items() if name != "__metadata__"}


def first_difference(ours: dict[str, tuple[int, ...]], theirs: dict[str, tuple[int, ...]]) -> str | None:
    """The first parameter (by name) that one side lacks or that differs in shape; None if they match."""
    if ours == theirs:
        return None
    missing = sorted(set(ours) ^ set(theirs))
    return missing[0] if missing else sorted(n for n in ours if ours[n] != theirs[n])[0]


def check_weights(what: str, url: str, shapes: dict[str, tuple[int, ...]], cfg: ModelConfig) -> None:
    """The weights at `url` (a file, a checkpoint or a run folder) must exist and fit the model parameter
    by parameter; FileNotFoundError or ConfigError naming `what` and the URL otherwise."""
    try:
        url = weights_url(url)
        found = weights_shapes(url)
    except FileNotFoundError as err:
        raise FileNotFoundError(f"{what}: {err}") from None
    name = first_difference(shapes, found)
    if name is None:
        return
    fitting = size_with_shapes(found)
    hint = f"; they fit model.size={fitting!r}" if fitting else ""
    raise ConfigError(
        f"{what}: {url} does not fit model.size={cfg.size!r} (and the model.* settings): parameter {name} "
        f"is {found.get(name, 'absent')} there, {shapes.get(name, 'absent')} in the model{hint}",
        key="model.size",
    )


def describe_batches(cfg: RunConfig) -> str:
    """What the driver prints before any worker starts: per phase, the crop, global batch, micro-batch x
    accumulation x workers and the memory estimate (`kitdist.batching`), from the run's latest checkpoint
    when it resumes. Raises ConfigError naming train.memory_budget_gb when one sample does not fit it."""
    resumed = _resumed_batching(run_url(cfg)) if cfg.storage.on_existing != "restart" else None
    workers = cfg.dist.num_workers
    plans = plan_run(cfg, workers, budget_bytes(cfg), resumed, estimator(cfg, workers))
    if resumed is not None:
        plans = [plan for plan in plans if plan.phase.last > resumed[0]]
    note = ""
    if cfg.dist.use_gpu and not cfg.train.memory_budget_gb and not cfg.train.grad_accum_steps:
        note = " (at most: each worker fits it to its GPU's memory)"
    return describe_plans(plans, note)


def _resumed_batching(run: str) -> tuple[int, int] | None:
    """(step, micro-batch) of the run's latest checkpoint, if it has one that stored its micro-batch."""
    latest = latest_checkpoint(run) if storage.exists(run) else None
    if latest is None:
        return None
    state = read_resume_info(latest)
    return (state.step, state.batching["micro_batch"]) if state.batching else None
