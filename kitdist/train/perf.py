"""Throughput figures for the logs: model FLOP utilisation (MFU) and peak memory.

MFU = (3 x forward MACs x 2 FLOP/MAC per sample) x samples/s per device / the device's peak FLOP/s.
Forward MACs come from `kitdist.model.profile.count_macs` (counted on the meta device); "x3" is the
usual training estimate (backward ~ 2x forward). Hashing, sorting and gathering cost time but no MACs.
"""

from __future__ import annotations

import resource

import torch

from kitdist.config import RunConfig

# Dense bf16 peaks (tensor cores), as used for MFU by nanochat / torchtitan.
GPU_PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 70e12}
# CPU: an assumption, stated in every record: AVX2 with two FMA units, 8 fp32 lanes x 2 FLOP x 2 units
# at 2.5 GHz = 80 GFLOP/s per core.
CPU_PEAK_FLOPS_PER_CORE = 80e9


def peak_flops(cfg: RunConfig, device: torch.device) -> tuple[float | None, str]:
    """The peak FLOP/s of one worker's device and where the figure comes from."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, value in GPU_PEAK_FLOPS.items():
            if key in name:
                return value, f"{name}: dense bf16 peak {value / 1e12:.0f} TFLOP/s"
        return None, f"{name}: peak unknown, MFU not reported"
    cores = cfg.dist.cpus_per_worker
    value = CPU_PEAK_FLOPS_PER_CORE * cores
    return value, f"CPU, assumed {CPU_PEAK_FLOPS_PER_CORE / 1e9:.0f} GFLOP/s per core x {cores} core(s)"


def training_flops_per_sample(cfg: RunConfig) -> float:
    from kitdist.model.profile import count_macs

    macs = count_macs(cfg.model, cfg.data.crop_size, cfg.data.crop_size)
    return 3 * 2 * float(macs)


def peak_memory_mb(device: torch.device) -> float:
    """Peak allocated device memory (CUDA) or the process's peak resident set size (CPU), in MiB."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
