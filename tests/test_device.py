"""Which device a worker runs on, decided from the launcher's facts alone (no GPU needed): torchrun's one
process per GPU, Ray's CUDA_VISIBLE_DEVICES assignment, one and several visible GPUs, and the errors."""

from __future__ import annotations

import pytest
import torch

from kitdist.distributed.env import DeviceError, LauncherFacts, choose_device


def cuda(index: int) -> torch.device:
    return torch.device("cuda", index)


@pytest.mark.parametrize(
    "facts, expected",
    [
        # torchrun, every GPU of the node visible: the process of local rank r takes GPU r
        (LauncherFacts(visible_gpus=8, local_rank=0), cuda(0)),
        (LauncherFacts(visible_gpus=8, local_rank=5), cuda(5)),
        (LauncherFacts(visible_gpus=4, cuda_visible_devices="0,1,2,3", local_rank=3), cuda(3)),
        # a launcher (SLURM's per-task binding, Ray with one GPU per worker) isolated one GPU: cuda:0,
        # whatever the local rank
        (LauncherFacts(visible_gpus=1, cuda_visible_devices="3", local_rank=3), cuda(0)),
        (LauncherFacts(visible_gpus=1, cuda_visible_devices="3", local_rank=3, ray_gpu_ids=["3"]), cuda(0)),
        # Ray lists the GPUs of all workers on the node; the worker's own is at its position in that list,
        # which LOCAL_RANK need not match (Ray's docs: "2,3" and ids [2] -> cuda:0)
        (LauncherFacts(visible_gpus=2, cuda_visible_devices="2,3", local_rank=1, ray_gpu_ids=["2"]), cuda(0)),
        (
            LauncherFacts(visible_gpus=4, cuda_visible_devices="0,1,2,3", local_rank=0, ray_gpu_ids=["2"]),
            cuda(2),
        ),
        (LauncherFacts(visible_gpus=4, cuda_visible_devices="0,1,2,3", ray_gpu_ids=["2", "3"]), cuda(2)),
        (LauncherFacts(visible_gpus=4, cuda_visible_devices=None, local_rank=0, ray_gpu_ids=["1"]), cuda(1)),
        # several GPUs and no launcher (restore, evaluate by hand): the first
        (LauncherFacts(visible_gpus=2), cuda(0)),
    ],
)
def test_gpu_worker_gets_the_gpu_its_launcher_meant(facts, expected):
    assert choose_device(True, facts) == expected


def test_cpu_runs_ignore_gpus():
    assert choose_device(False, LauncherFacts(visible_gpus=8, local_rank=3)) == torch.device("cpu")


@pytest.mark.parametrize(
    "facts, words",
    [
        (LauncherFacts(visible_gpus=0, cuda_visible_devices=""), "sees no CUDA GPU"),
        (LauncherFacts(visible_gpus=2, cuda_visible_devices="0,1", local_rank=2), "LOCAL_RANK 2"),
        (LauncherFacts(visible_gpus=2, cuda_visible_devices="0,1", ray_gpu_ids=["5"]), "GPU 5"),
    ],
)
def test_impossible_assignments_fail_naming_the_facts(facts, words):
    with pytest.raises(DeviceError, match=words) as info:
        choose_device(True, facts)
    assert "CUDA_VISIBLE_DEVICES" in str(info.value)


def test_facts_of_this_process_read_the_environment():
    facts = LauncherFacts.of_this_process({"LOCAL_RANK": "1", "CUDA_VISIBLE_DEVICES": "4,5"})
    assert (facts.local_rank, facts.cuda_visible_devices) == (1, "4,5")
    assert facts.visible_gpus == (torch.cuda.device_count() if torch.cuda.is_available() else 0)
    assert LauncherFacts.of_this_process({}).local_rank is None


FAULTS_OF_REUSE = """
import resource, statistics, torch
from kitdist.distributed.env import use_device

def faults_per_reuse():
    faults = []
    for _ in range(24):  # a 64 MB block made and freed at once, again and again
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        torch.ones(64 << 18)
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    return statistics.median(faults[16:])  # the heap settles within the first few (up to 5 seen)

default = faults_per_reuse()
use_device(torch.device("cpu"))
print(default, faults_per_reuse())
"""


def test_a_cpu_process_keeps_freed_memory_instead_of_faulting_it_back_in():
    """Page faults, not time: glibc by default returns a freed 64 MB block to the kernel, and the next one
    of that size faults its 16,384 pages back in; after `use_device(cpu)` the block is reused (once the heap
    has grown to hold it: the median over the later reuses, which was 0 in 30 runs out of 30)."""
    import platform
    import subprocess
    import sys

    if platform.libc_ver()[0] != "glibc":
        pytest.skip("the allocator switches are glibc's")
    result = subprocess.run(
        [sys.executable, "-c", FAULTS_OF_REUSE], capture_output=True, text=True, check=True
    )
    default, kept = (float(value) for value in result.stdout.split())
    assert default > 10_000 and kept < 100
