"""The one typed schema of a kitdist run: its sections as dataclasses, their defaults and validation.

A run is a `RunConfig` made of sections (`model`, `data`, `degrade`, `train`, `dist`, `storage`). YAML files
under `configs/` hold values; the dataclasses below are the only place that says what may be set, with
which type and default. `kitdist.config_loader` reads files and overrides into them (and changes built
configs by key); every error names the key and the file (or the command line) it came from:

    >>> cfg = load_config("configs/pretrain/debug.yaml", ["train.lr=1e-4", "data.crop_size=64"])

A config shipped with kitdist loads by its name from any folder (`load_config("pretrain/debug")`:
`kitdist.package_data`); a file of the user's at that path wins.

Validation that needs one section lives in its `__post_init__`; validation across sections (a batch that
must split over workers, a crop that must suit the model) lives in `RunConfig.__post_init__`.
"""

from __future__ import annotations

import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from kitdist.config_loader import ConfigError, dump_yaml, from_dict, load, to_dict
from kitdist.config_loader import fail as _fail
from kitdist.config_loader import note as _note
from kitdist.package_data import config_names, shipped_config

__all__ = [
    "SPATIAL_MULTIPLE", "MIN_PREFETCH_BYTES", "ConfigError", "ModelConfig", "DegradeConfig", "DataConfig",
    "TrainConfig", "DistConfig", "StorageConfig", "RunConfig", "load_config", "from_dict", "to_dict",
    "dump_yaml",
]  # fmt: skip

# Inputs are padded to, and training crops must be, a multiple of this: patch size r=4 times 2^3 from the
# three 2x downsamplings of the U-net.
SPATIAL_MULTIPLE = 32
MIN_PREFETCH_BYTES = 64 << 10  # smaller ranged requests cost more in requests than they save in memory


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """Which KiT to build. `size` picks a row of the named-size table in `kitdist.model`; the fields set
    to a value here override that row (None keeps the size's own value)."""

    size: str = "debug"
    # the grouped-attention kernel: "auto" = FlexAttention on CUDA, "explicit" elsewhere; "reference" is
    # the plain autograd ground truth; "sdpa" folds bias and lse into one fused SDPA call (no fp16 merge)
    attention_impl: Literal["auto", "explicit", "reference", "sdpa", "flex"] = "auto"
    # keys shared by a query's chunks in several hash rounds: "count" weighs them once per round (the
    # plain merge), "once" counts every key of the union once (Reformer's correction)
    duplicate_keys: Literal["count", "once"] = "count"
    checkpoint_activations: bool = False
    patch_size: int | None = None  # r: a patch is r x r pixels
    chunk_size: int | None = None  # k: patches per group (encoder/decoder stages)
    hash_rounds: int | None = None  # b: independent LSH rounds, merged by log-sum-exp
    num_buckets: int | None = None  # LSH buckets per round; None = N / k (rounded to even); 1 = no hashing
    look_back: bool | None = None  # also attend to the previous chunk (Reformer's look-one-back)
    # order of patches inside an LSH bucket: "similarity" (one more random projection) or "position"
    bucket_order: Literal["similarity", "position"] = "similarity"
    eval_hash_seed: int = 0  # evaluation draws its rotations from this seed, so it is deterministic
    fused_layernorm: bool = False  # apex FusedLayerNorm when importable

    def __post_init__(self) -> None:
        for name in ("patch_size", "chunk_size", "hash_rounds", "num_buckets"):
            value = getattr(self, name)
            if value is not None and value < 1:
                _fail(f"model.{name}", f"must be >= 1, got {value}")
        if self.attention_impl == "sdpa" and self.duplicate_keys == "once":
            _fail("model.duplicate_keys", "'once' needs a kernel that adds a patch-pair bias; "
                  "model.attention_impl=sdpa cannot (use auto, explicit, reference or flex)")  # fmt: skip
        if self.num_buckets is not None and self.num_buckets % 2 and self.num_buckets != 1:
            _fail(
                "model.num_buckets",
                f"angular LSH needs an even bucket count (or 1: no hashing), got {self.num_buckets}",
            )


@dataclass(frozen=True, kw_only=True)
class DegradeConfig:
    """Synthetic degradations for pre-training on clean images. Each enabled kind is applied with its
    probability; sigma and quality are drawn per sample from the ranges."""

    noise_prob: float = 1.0
    noise_sigma: tuple[float, float] = (0.0, 50.0)  # Gaussian noise std on the 0-255 scale
    blur_prob: float = 0.0
    blur_sigma: tuple[float, float] = (0.5, 3.0)  # Gaussian blur std in pixels
    jpeg_prob: float = 0.0
    jpeg_quality: tuple[int, int] = (30, 95)

    def __post_init__(self) -> None:
        for name in ("noise_prob", "blur_prob", "jpeg_prob"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                _fail(f"degrade.{name}", f"is a probability in [0, 1], got {value}")
        for name in ("noise_sigma", "blur_sigma", "jpeg_quality"):
            low, high = getattr(self, name)
            if low < 0 or high < low:
                _fail(f"degrade.{name}", f"needs 0 <= low <= high, got [{low}, {high}]")
        if self.jpeg_quality[1] > 100 or self.jpeg_quality[0] < 1:
            _fail("degrade.jpeg_quality", f"JPEG quality lies in [1, 100], got {list(self.jpeg_quality)}")


@dataclass(frozen=True, kw_only=True)
class SchedulePoint:
    """One point of `data.schedule` (progressive training, `kitdist.batching`): from the update after
    `step` on, crops of `crop_size` and `global_batch_size` samples a step (0: the previous phase's)."""

    step: int = 0
    crop_size: int = 0
    global_batch_size: int = 0


@dataclass(frozen=True, kw_only=True)
class DataConfig:
    """Where training and validation samples come from and how they are cut into batches.

    Shard URLs point at a folder (or its `manifest.json`) written by `python -m kitdist.shards build`.
    """

    train_shards: str = ""
    val_shards: str = ""
    kind: Literal["clean", "paired"] = "clean"  # clean: degrade on the fly; paired: input/target shards
    crop_size: int = 64
    global_batch_size: int = 8
    num_workers: int = 1  # DataLoader processes per training worker
    shuffle_buffer: int = 64
    mode: Literal["epoch", "resampled"] = "epoch"  # resampled: shards drawn with replacement, stateless
    val_crop_size: int = 0  # 0: validate on whole images as they are (the model pads them)
    max_val_samples: int = 0  # 0: all
    read_retries: int = 8  # retries of a failed read request, before the shard counts as unreadable
    read_retry_max_wait_s: float = 10.0  # longest pause between attempts (they back off from 0.5 s)
    # object stores: shards are read in ranged requests of this many bytes, each fetched in the background
    # while the one before is decoded (the first of the next shard too); 0: no read-ahead, 16 MiB requests
    # made when needed. Local files need none.
    prefetch_bytes: int = 16 << 20
    # progressive training: [{step, crop_size, global_batch_size}, ...] from step 0 (kitdist.batching);
    # empty: one phase of crop_size and global_batch_size
    schedule: list[SchedulePoint] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._check_schedule()
        if self.read_retries < 0 or self.read_retry_max_wait_s < 0:
            _fail("data.read_retries", "read_retries and read_retry_max_wait_s must be >= 0")
        if self.max_val_samples < 0:
            _fail("data.max_val_samples", f"must be >= 0, got {self.max_val_samples}")
        if self.crop_size < SPATIAL_MULTIPLE or self.crop_size % SPATIAL_MULTIPLE:
            _fail(
                "data.crop_size", f"must be a positive multiple of {SPATIAL_MULTIPLE}, got {self.crop_size}"
            )
        if self.val_crop_size % SPATIAL_MULTIPLE or self.val_crop_size < 0:
            _fail(
                "data.val_crop_size",
                f"must be 0 or a multiple of {SPATIAL_MULTIPLE}, got {self.val_crop_size}",
            )
        if self.global_batch_size < 1:
            _fail("data.global_batch_size", f"must be >= 1, got {self.global_batch_size}")
        if self.num_workers < 0:
            _fail("data.num_workers", f"must be >= 0, got {self.num_workers}")
        if self.shuffle_buffer < 1:
            _fail("data.shuffle_buffer", f"must be >= 1, got {self.shuffle_buffer}")
        if self.prefetch_bytes < 0 or 0 < self.prefetch_bytes < MIN_PREFETCH_BYTES:
            _fail(
                "data.prefetch_bytes",
                f"must be 0 (no read-ahead) or at least {MIN_PREFETCH_BYTES} bytes, got {self.prefetch_bytes}",
            )

    def _check_schedule(self) -> None:
        previous = -1
        for index, point in enumerate(self.schedule):
            key = f"data.schedule[{index}]"
            if index == 0 and point.step != 0:
                _fail(f"{key}.step", f"the first phase starts at step 0, got {point.step}")
            if point.step <= previous:
                _fail(f"{key}.step", f"steps must increase, got {point.step} after {previous}")
            previous = point.step
            if point.crop_size < 0 or point.crop_size % SPATIAL_MULTIPLE:
                _fail(
                    f"{key}.crop_size",
                    f"must be a multiple of {SPATIAL_MULTIPLE} (0: the previous phase's), got {point.crop_size}",
                )
            if point.global_batch_size < 0:
                _fail(
                    f"{key}.global_batch_size",
                    f"must be >= 1 (0: the previous phase's), got {point.global_batch_size}",
                )


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """The optimisation: steps, schedule, loss, precision, logging and checkpoint cadence."""

    max_steps: int = 100
    lr: float = 2e-4
    min_lr: float = 1e-6
    warmup_steps: int = 10
    weight_decay: float = 0.02
    betas: tuple[float, float] = (0.9, 0.999)
    grad_clip: float = 1.0  # max global grad norm; 0 disables clipping
    grad_accum_steps: int = 0  # 0: derived per phase (kitdist.batching); > 0: fixed
    loss: Literal["charbonnier", "l1"] = "charbonnier"
    # bf16 / fp16: autocast over fp32 weights; the network's input, global residual and output stay fp32
    precision: Literal["bf16", "fp16", "fp32"] = "bf16"
    # dtype of the gradient all-reduce under bf16/fp16 (fp32: exact sums of fp32 gradients; the precision's
    # own dtype halves the bytes sent)
    grad_reduce_dtype: Literal["fp32", "bf16", "fp16"] = "fp32"
    fused_optimizer: bool = (
        False  # apex FusedAdam when importable (on CUDA torch's fused AdamW is the default)
    )
    compile: bool = False  # torch.compile the model (in place: parameter names and checkpoints unchanged)
    seed: int = 0
    log_every: int = 10
    val_every: int = 0  # 0: validate only at the end
    checkpoint_every: int = 50
    keep_checkpoints: int = 3
    init_weights: str = ""  # URL of weights.safetensors to start from (fine-tuning)
    # micro-batch and accumulation (kitdist.batching): the largest micro-batch that divides the global
    # batch per worker, is at most max_micro_batch (0: no cap) and fits memory_budget_gb GiB per worker
    # (0: none on CPU, a share of the GPU's memory on CUDA); lr_scaling: the lr rule when a schedule
    # changes the global batch (none, or linear / sqrt in the ratio to the first phase's)
    max_micro_batch: int = 0
    memory_budget_gb: float = 0.0
    lr_scaling: Literal["none", "linear", "sqrt"] = "none"
    # where metrics go besides <run>/metrics/metrics.jsonl (kitdist.train.recorder): TensorBoard events in
    # <run>/metrics/tensorboard, Weights & Biases (rank 0; the `wandb` extra) in project wandb_project;
    # the files reach the run folder every metrics_flush_s seconds (at the next logged step) and at checkpoints
    report_to: list[Literal["tensorboard", "wandb"]] = field(default_factory=lambda: ["tensorboard"])
    wandb_project: str = "kitdist"
    metrics_flush_s: float = 60.0

    def __post_init__(self) -> None:
        if len(set(self.report_to)) != len(self.report_to):
            _fail("train.report_to", f"names a sink twice: {self.report_to}")
        if self.metrics_flush_s < 0:
            _fail(
                "train.metrics_flush_s", f"must be >= 0 (0: at every logged step), got {self.metrics_flush_s}"
            )
        positive = ("max_steps", "log_every", "checkpoint_every", "keep_checkpoints")
        for name in positive:
            if getattr(self, name) < 1:
                _fail(f"train.{name}", f"must be >= 1, got {getattr(self, name)}")
        if self.lr <= 0 or self.min_lr < 0 or self.min_lr > self.lr:
            _fail("train.lr", f"needs 0 <= min_lr <= lr and lr > 0, got lr={self.lr} min_lr={self.min_lr}")
        if self.warmup_steps < 0:
            _fail("train.warmup_steps", f"must be >= 0, got {self.warmup_steps}")
        if self.warmup_steps > self.max_steps:
            # A short run (train.max_steps=6) of a recipe with a longer warm-up is what the user asked
            # for: the warm-up follows it, and the one note says so.
            _note(
                f"note: train.warmup_steps={self.warmup_steps} is longer than train.max_steps="
                f"{self.max_steps}; warming up over all {self.max_steps} steps instead"
            )
            object.__setattr__(self, "warmup_steps", self.max_steps)
        if self.grad_clip < 0:
            _fail("train.grad_clip", f"must be >= 0, got {self.grad_clip}")
        if not all(0.0 <= beta < 1.0 for beta in self.betas):
            _fail("train.betas", f"each beta lies in [0, 1), got {list(self.betas)}")
        if self.grad_reduce_dtype not in ("fp32", self.precision):
            _fail(
                "train.grad_reduce_dtype",
                f"is fp32 or the training precision (train.precision={self.precision}), got {self.grad_reduce_dtype}",
            )


@dataclass(frozen=True, kw_only=True)
class DistConfig:
    """How the work is spread: engine, ZeRO stage, workers and their resources, failure handling."""

    strategy: Literal["deepspeed", "ddp"] = "deepspeed"
    zero_stage: int = 1
    num_workers: int = 2
    use_gpu: bool = False
    # CPUs Ray reserves for each worker, and its torch threads; 0: the largest equal share that places every
    # worker on some node (a local cluster: this machine's cores split evenly)
    cpus_per_worker: int = 0
    max_failures: int = 3  # worker-group restarts Ray Train may do before the run fails
    ray_address: str = ""  # "" = RAY_ADDRESS from the environment, else a local cluster

    def __post_init__(self) -> None:
        if self.zero_stage not in (0, 1, 2, 3):
            _fail("dist.zero_stage", f"DeepSpeed ZeRO stages are 0, 1, 2 and 3, got {self.zero_stage}")
        if self.num_workers < 1:
            _fail("dist.num_workers", f"must be >= 1, got {self.num_workers}")
        if self.cpus_per_worker < 0:
            _fail(
                "dist.cpus_per_worker",
                f"must be >= 0 (0: an even share of the CPUs), got {self.cpus_per_worker}",
            )
        if self.max_failures < 0:
            _fail("dist.max_failures", f"must be >= 0, got {self.max_failures}")


@dataclass(frozen=True, kw_only=True)
class StorageConfig:
    """Where a run keeps its checkpoints and metrics. Credentials and endpoints never live here: S3 reads
    AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY from the environment."""

    root: str = "runs"  # a local folder, file:// or s3://bucket/prefix
    run_name: str = "kit"
    # a run name that already has checkpoints (kitdist.rerun): resume (refusing changed settings that are
    # not safe to change), resume_with_changes (any change, printed), restart (the old run folder moved
    # aside to <run_name>.replaced-<UTC time>, a fresh run under the name)
    on_existing: Literal["resume", "resume_with_changes", "restart"] = "resume"

    def __post_init__(self) -> None:
        if not self.root:
            _fail("storage.root", "must name a folder or URL")
        if not self.run_name or "/" in self.run_name:
            _fail("storage.run_name", f"must be a non-empty name without '/', got {self.run_name!r}")


@dataclass(frozen=True, kw_only=True)
class RunConfig:
    """A whole run: every section, with checks that span sections."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    degrade: DegradeConfig = field(default_factory=DegradeConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    dist: DistConfig = field(default_factory=DistConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)

    def __post_init__(self) -> None:
        from kitdist.batching import check_recipe  # the one home of micro-batch arithmetic

        check_recipe(self)
        if self.train.precision == "fp16" and not self.dist.use_gpu:
            _fail("train.precision", "fp16 needs a GPU (dist.use_gpu=true); use bf16 or fp32 on CPU")
        if self.train.grad_reduce_dtype != "fp32" and self.dist.strategy == "ddp" and not self.dist.use_gpu:
            # torch's compressed-gradient hooks for DDP run on NCCL only: gloo would fail when DDP is built.
            _fail(
                "train.grad_reduce_dtype",
                "a bf16/fp16 all-reduce with dist.strategy=ddp needs GPUs; use fp32 on CPU",
            )
        from kitdist.model.kernels import check_placement, check_precision  # the model knows its kernels

        problem = check_precision(self.train.precision, self.model.attention_impl, self.model.hash_rounds)
        if problem:
            _fail("train.precision", problem)
        problem = check_placement(self.model.attention_impl, self.dist.use_gpu)
        if problem:
            _fail("model.attention_impl", problem)
        if self.dist.strategy == "ddp" and self.dist.zero_stage > 0:
            _fail(
                "dist.zero_stage", "ZeRO is a DeepSpeed feature; set dist.zero_stage=0 with dist.strategy=ddp"
            )


def load_config(
    path: str | Path | None = None,
    overrides: typing.Sequence[str] = (),
    values: typing.Mapping[str, typing.Any] = {},
) -> RunConfig:
    """Builds a RunConfig from an optional YAML file, typed `values` by dotted key (`{"data.kind": "paired"}`)
    and `section.key=value` overrides (YAML values), each over the one before (`config_loader.load`).
    `path` is a file or the name of a shipped config (`pretrain/debug`)."""
    return load(RunConfig, None if path is None else config_file(path), overrides, values)


def config_file(name: str | Path) -> Path:
    """The file a --config argument means: the user's own file where one exists at that path, else the
    shipped config of that name (`pretrain/debug`, `configs/pretrain/debug.yaml`)."""
    if Path(name).is_file():
        return Path(name)
    shipped = shipped_config(name)
    if shipped is None:
        raise ConfigError(
            f"{name}: config file not found, and no shipped config has that name "
            f"(shipped: {', '.join(config_names('pretrain') + config_names('finetune'))})"
        )
    return shipped
