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


# Page faults of reusing a freed 64 MB block: glibc by default returns it to the kernel and the next one of
# that size faults its 16,384 pages back in; a process that keeps freed memory reuses it (once the heap has
# grown to hold it: the median over the later reuses, which was 0 in 30 runs out of 30).
FAULTS_OF_REUSE = """
import resource, statistics, torch

def faults_per_reuse():
    faults = []
    for _ in range(24):  # a 64 MB block made and freed at once, again and again
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        torch.ones(64 << 18)
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    return statistics.median(faults[16:])  # the heap settles within the first few (up to 5 seen)
"""
AFTER_LIBRARY_CALLS = """
import sys
from safetensors.torch import save_model
from kitdist.config import ModelConfig
from kitdist.distributed.env import keep_freed_memory_in_this_program
from kitdist.inference import load_restorer
from kitdist.model import build_model

save_model(build_model(ModelConfig(size="debug")), sys.argv[1])
load_restorer(sys.argv[1], "debug", "cpu").restore(torch.rand(64, 64, 3).numpy())
library = faults_per_reuse()
keep_freed_memory_in_this_program()  # what restore's, evaluate's and torchrun's __main__ do first
print(library, faults_per_reuse())
"""


def test_library_calls_leave_the_allocator_alone_and_processes_started_by_kitdist_keep_freed_memory(tmp_path):
    """Importing kitdist and `load_restorer(...).restore(...)` (a notebook's calls) leave glibc's defaults;
    a program's `__main__` setting, and a process started with a CPU worker's environment (the launcher's,
    which glibc reads at start), keep a freed block for reuse."""
    import os
    import platform
    import subprocess
    import sys

    from kitdist.config import DistConfig
    from kitdist.distributed.env import CPU_ALLOCATOR_ENV, worker_env_vars

    if platform.libc_ver()[0] != "glibc":
        pytest.skip("the allocator switches are glibc's")
    plain = {name: value for name, value in os.environ.items() if name not in CPU_ALLOCATOR_ENV}
    weights = str(tmp_path / "weights.safetensors")
    run = dict(capture_output=True, text=True, check=True)
    found = subprocess.run(
        [sys.executable, "-c", FAULTS_OF_REUSE + AFTER_LIBRARY_CALLS, weights], env=plain, **run
    )
    library, program = (float(value) for value in found.stdout.split())
    worker_env = worker_env_vars(DistConfig())
    assert worker_env.items() >= CPU_ALLOCATOR_ENV.items()
    started = subprocess.run(
        [sys.executable, "-c", FAULTS_OF_REUSE + "print(faults_per_reuse())"], env=plain | worker_env, **run
    )
    assert library > 10_000 and program < 100 and float(started.stdout) < 100
    assert not set(CPU_ALLOCATOR_ENV) & set(worker_env_vars(DistConfig(use_gpu=True)))
