"""DeepSpeed behind the Strategy interface: ZeRO stage 0-3, bf16 / fp16 (dynamic loss scaling) / fp32.

Mixed precision is DeepSpeed's `torch_autocast` over fp32 weights, as DDP's: the network's input, global
residual and output stay fp32 (DeepSpeed's `bf16` / `fp16` sections would cast the whole model, rounding
the restored image itself), fp16 gets DeepSpeed's dynamic loss scaler (a torch GradScaler), and
gradients are reduced in fp32 unless `train.grad_reduce_dtype` names the precision's dtype (then the
weights of Linear and Conv layers are reduced in it, DeepSpeed's default for autocast).

DeepSpeed is imported here only, lazily. On CPU it runs with DS_ACCELERATOR=cpu over the gloo process
group that the launcher (Ray Train or torchrun) already initialised; on GPU the same code runs on CUDA
and NCCL. The world-size-independent `full_state` uses DeepSpeed's tensor-fragment API
(`safe_get_full_*` / `safe_set_full_*`), which assembles the fp32 master weights and Adam moments from
the ZeRO partitions online.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from kitdist.config import RunConfig
from kitdist.distributed.env import world_size
from kitdist.distributed.strategy import (
    ADAM_MOMENTS,
    FullState,
    Strategy,
    first_batching,
    load_scheduler_state,
    optimizer_step_of,
    set_loss_scale,
    set_optimizer_step,
    snapshot,
)

NATIVE_TAG = "deepspeed"
GRAD_SCALER_FILE = "grad_scaler.pt"  # fp16's loss scale, beside DeepSpeed's own files
AUTOCAST_DTYPES = {"bf16": "bfloat16", "fp16": "float16"}


def deepspeed_config(cfg: RunConfig, num_workers: int) -> dict[str, Any]:
    """The DeepSpeed JSON config for this run (batch sizes, ZeRO stage, precision, clipping)."""
    train = cfg.train
    micro_batch, grad_accum = first_batching(cfg, num_workers)
    config: dict[str, Any] = {
        "train_batch_size": micro_batch * grad_accum * num_workers,
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": grad_accum,
        "gradient_clipping": train.grad_clip,
        "zero_optimization": {"stage": cfg.dist.zero_stage},
        "zero_allow_untested_optimizer": True,  # torch AdamW is fine with ZeRO; the check is for exotic ones
        "steps_per_print": 10**9,  # our loop does the logging
        "wall_clock_breakdown": False,
    }
    if train.precision in AUTOCAST_DTYPES:
        config["torch_autocast"] = {"enabled": True, "dtype": AUTOCAST_DTYPES[train.precision]}
        if train.grad_reduce_dtype == "fp32":  # no layer marked safe to reduce in lower precision
            config["torch_autocast"]["lower_precision_safe_modules"] = []
    return config


class DeepSpeedStrategy(Strategy):
    name = "deepspeed"

    def __init__(
        self,
        cfg: RunConfig,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler: torch.optim.lr_scheduler.LRScheduler,
    ) -> None:
        import deepspeed

        super().__init__(cfg, model)
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=model,
            optimizer=optimizer,
            lr_scheduler=scheduler,
            config=deepspeed_config(cfg, world_size()),
            dist_init_required=False,
        )
        self.grad_accum = self.engine.gradient_accumulation_steps()

    @property
    def module(self) -> nn.Module:
        return self.engine.module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.engine(x)

    def set_batching(self, micro_batch: int, grad_accum: int) -> None:
        """DeepSpeed's supported way to change both between updates: the micro-batch, then the global
        batch (which sets the accumulation); each micro-batch's loss is then scaled by 1 / grad_accum."""
        super().set_batching(micro_batch, grad_accum)
        self.engine.set_train_micro_batch_size(micro_batch)
        self.engine.set_train_batch_size(micro_batch * grad_accum * self.engine.dp_world_size)

    def backward(self, loss: torch.Tensor, last_micro_batch: bool) -> None:
        # The boundary is said explicitly: DeepSpeed's own count of micro-steps assumes one accumulation
        # for the whole run, and a phase may change it.
        self.engine.set_gradient_accumulation_boundary(last_micro_batch)
        self.engine.backward(loss)  # scales by 1/grad_accum itself
        if not last_micro_batch:
            self.engine.step()  # only counts the micro-batch; the update happens at the boundary

    def step(self) -> torch.Tensor | float | None:
        self.engine.step()
        return self.engine.get_global_grad_norm()

    def _grad_scaler(self) -> torch.amp.GradScaler | None:
        """fp16's dynamic loss scaler: the engine's without ZeRO, the ZeRO optimizer's with it."""
        return getattr(self.engine, "torch_autocast_z0_gradscaler", None) or getattr(
            self.optimizer, "torch_autocast_gradscaler", None
        )

    def lr(self) -> float:
        return self.engine.get_lr()[0]

    def train(self, mode: bool = True) -> None:
        self.engine.train(mode)

    def _base_optimizer(self) -> torch.optim.Optimizer:
        """The torch optimizer under DeepSpeed's ZeRO / bf16 wrapper (the optimizer itself at stage 0 fp32)."""
        return getattr(self.optimizer, "optimizer", self.optimizer)

    def _ensure_optimizer_state(self) -> None:
        """Creates zero Adam moments where the first step has not yet (torch and DeepSpeed init lazily),
        and links DeepSpeed's per-parameter views to them, so that moments can be set before step 1."""
        base = self._base_optimizer()
        # ZeRO-3 swaps its flat fp32 partitions in and out of the param groups, so ask it for them.
        flats = getattr(self.optimizer, "fp32_partitioned_groups_flat", None)
        if flats is None:
            flats = [param for group in base.param_groups for param in group["params"]]
        for flat in flats:
            state = base.state[flat]  # a defaultdict: created empty if missing
            state.setdefault("step", torch.tensor(0.0))
            for key in ADAM_MOMENTS:
                state.setdefault(key, torch.zeros_like(flat))
        link = getattr(self.optimizer, "_lazy_init_hp_params_optimizer_state", None)
        if link is not None:
            link()

    def _flat_group_views(self) -> dict[int, dict[str, torch.Tensor]]:
        """For DeepSpeed's non-ZeRO bf16/fp16 wrappers (fp32 masters kept per group, no tensor-fragment
        API): id(param) -> views of its fp32 master and Adam moments. The fused wrapper keeps one flat
        master per group, the unfused one a master per parameter."""
        groups = getattr(self.optimizer, "fp16_groups", None)
        masters = getattr(self.optimizer, "fp32_groups_flat", None) or getattr(
            self.optimizer, "fp32_groups", None
        )
        if groups is None or masters is None:
            return {}
        state = self._base_optimizer().state
        views: dict[int, dict[str, torch.Tensor]] = {}
        for params, master in zip(groups, masters, strict=True):
            flat_pieces = _split_flat(master, params) if torch.is_tensor(master) else None
            for index, param in enumerate(params):
                owner = master if flat_pieces is not None else master[index]
                sources = {"master": owner, **{key: state.get(owner, {}).get(key) for key in ADAM_MOMENTS}}
                views[id(param)] = {
                    key: (flat_pieces[index](src) if flat_pieces is not None else src)
                    for key, src in sources.items()
                    if src is not None
                }
        return views

    def full_state(self) -> FullState:
        from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

        base = self._base_optimizer()
        flat_views = self._flat_group_views()
        weights = {name: snapshot(t) for name, t in self.module.named_buffers()}
        moments = {}
        for name, param in self.module.named_parameters():
            views = flat_views.get(id(param)) or {"master": safe_get_full_fp32_param(param)}
            for key in ADAM_MOMENTS:
                views.setdefault(key, safe_get_full_optimizer_state(param, key))
                if views[key] is None:  # stage 0 fp32: the torch optimizer holds the parameter itself
                    views[key] = base.state.get(param, {}).get(key)
                if views[key] is not None:
                    moments[f"{key}/{name}"] = snapshot(views[key])
            master = views["master"] if views["master"] is not None else param.detach()
            weights[name] = snapshot(master)
        ordered = {name: weights[name] for name in self.module.state_dict()}
        meta = {
            "optimizer_step": optimizer_step_of(base),
            "scheduler": self.scheduler.state_dict(),
            "loss_scale": self._grad_scaler().get_scale() if self._grad_scaler() is not None else None,
            "global_steps": self.engine.global_steps,
        }
        return FullState(weights=ordered, moments=moments, meta=meta)

    def load_full_state(self, state: FullState) -> None:
        from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

        self._ensure_optimizer_state()
        base = self._base_optimizer()
        flat_views = self._flat_group_views()
        for name, param in self.module.named_parameters():
            values = {"master": state.weights[name]}
            values.update({key: state.moments[f"{key}/{name}"] for key in ADAM_MOMENTS})
            values = {key: value.to(self.device) for key, value in values.items()}
            if id(param) in flat_views:
                for key, view in flat_views[id(param)].items():
                    with torch.no_grad():
                        view.copy_(values[key])
            elif hasattr(param, "ds_id"):
                for key in ("master", *ADAM_MOMENTS):
                    _set_zero3_partition(param, values[key], None if key == "master" else key)
            elif hasattr(param, "_hp_mapping"):
                safe_set_full_fp32_param(param, values["master"])
                for key in ADAM_MOMENTS:
                    safe_set_full_optimizer_state(param, values[key], key)
            else:  # stage 0 fp32: the weights were loaded before wrapping
                for key in ADAM_MOMENTS:
                    base.state[param][key].copy_(values[key])
        set_optimizer_step(base, int(state.meta.get("optimizer_step", 0)))
        load_scheduler_state(self.scheduler, state.meta["scheduler"])
        self.engine.global_steps = int(state.meta.get("global_steps", 0))
        if state.meta.get("loss_scale") and self._grad_scaler() is not None:
            set_loss_scale(self._grad_scaler(), state.meta["loss_scale"])

    def save_native(self, folder: str) -> bool:
        self.engine.save_checkpoint(folder, tag=NATIVE_TAG, save_latest=False)
        scaler = self._grad_scaler()
        if scaler is not None:  # DeepSpeed's checkpoint leaves the autocast loss scaler out
            torch.save(scaler.state_dict(), Path(folder, NATIVE_TAG, GRAD_SCALER_FILE))
        return True

    def load_native(self, folder: str) -> None:
        path, _ = self.engine.load_checkpoint(
            folder, tag=NATIVE_TAG, load_optimizer_states=True, load_lr_scheduler_states=True
        )
        if path is None:
            raise FileNotFoundError(f"{folder}: no DeepSpeed checkpoint (tag {NATIVE_TAG!r})")
        scaler, saved = self._grad_scaler(), Path(folder, NATIVE_TAG, GRAD_SCALER_FILE)
        if scaler is not None and saved.is_file():
            scaler.load_state_dict(torch.load(saved, weights_only=True))


def _split_flat(flat: torch.Tensor, params: list[torch.Tensor]) -> list:
    """Functions that cut each param's slice (shaped like the param) out of a flat buffer like `flat`."""
    cutters, offset = [], 0
    for param in params:
        cutters.append(lambda t, o=offset, p=param: t.narrow(0, o, p.numel()).view_as(p))
        offset += param.numel()
    return cutters


def _set_zero3_partition(param: torch.Tensor, value: torch.Tensor, state_key: str | None) -> None:
    """Writes this rank's slice of a full fp32 value (master weight or Adam moment) into ZeRO-3's
    partition. DeepSpeed's own `safe_set_full_*` fails for parameters whose size does not split evenly
    over the ranks (it slices the unpadded value), so the padding is handled here."""
    zero3 = param._z3_optimizer
    partition, _ = zero3._get_fp32_opt_state_partition(
        param, release_swap_buffers=False, optim_state_key=state_key
    )
    start = partition.numel() * zero3._get_param_partition_rank(param)
    piece = value.flatten()[start : start + partition.numel()]
    with torch.no_grad():
        partition.zero_()
        partition[: piece.numel()].copy_(piece)
