"""A real SLURM for tests: munge, one slurmctld and two slurmd (node1, node2) on this machine, loopback only.

Uses Debian's `slurm-wlm` packages (slurmctld, slurmd, slurm-client, munge); installs them with apt-get when
they are missing and the machine allows it. Every daemon gets its own free port, its own files under one
folder, and is stopped (with every job cancelled) by `stop()`.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

from s3server import free_port

PACKAGES = ("slurmctld", "slurmd", "slurm-client", "munge")
NODES = ("node1", "node2")


class SlurmUnavailable(RuntimeError):
    """SLURM cannot run here (packages missing and not installable, not root, ...)."""


def ensure_installed() -> None:
    if all(shutil.which(tool) for tool in ("slurmctld", "slurmd", "sbatch", "munged")):
        return
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        raise SlurmUnavailable("SLURM is not installed and apt-get as root is not available to install it")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for command in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", *PACKAGES]):
        result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
        if result.returncode != 0:
            raise SlurmUnavailable(f"`{' '.join(command)}` failed: {result.stderr.strip()[-500:]}")


class SlurmCluster:
    """munged + slurmctld + two slurmd, each node with `cpus_per_node` CPUs, all on 127.0.0.1."""

    def __init__(self, folder: Path, cpus_per_node: int = 1) -> None:
        self.folder = Path(folder)
        self.cpus_per_node = cpus_per_node
        self.conf_path = self.folder / "slurm.conf"
        self.munge_socket = self.folder / "munge" / "munge.sock"
        self.daemons: list[subprocess.Popen] = []

    @property
    def env(self) -> dict[str, str]:
        return {**os.environ, "SLURM_CONF": str(self.conf_path)}

    def start(self, timeout: float = 60.0) -> None:
        ensure_installed()
        for sub in ("state", "log", "munge", *(f"spool/{node}" for node in NODES)):
            (self.folder / sub).mkdir(parents=True, exist_ok=True)
        self._start_munge()
        self.conf_path.write_text(self._slurm_conf())
        self._spawn(["slurmctld", "-D", "-f", str(self.conf_path)])
        for node in NODES:
            self._spawn(["slurmd", "-D", "-f", str(self.conf_path), "-N", node])
        self._wait_idle(timeout)

    def stop(self) -> None:
        """Cancels every job and waits for it to end (so its Ray nodes shut down), then stops the daemons."""
        subprocess.run(["scancel", "--full", "--user", "root"], env=self.env, capture_output=True, timeout=30)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and self._jobs_left():
            time.sleep(1)
        for process in reversed(self.daemons):
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in self.daemons:
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()
        self.daemons.clear()
        pid_file = self.folder / "munge" / "munged.pid"
        if pid_file.exists():
            try:
                os.kill(int(pid_file.read_text().strip()), signal.SIGTERM)
            except (ValueError, ProcessLookupError):
                pass

    def _jobs_left(self) -> bool:
        result = subprocess.run(["squeue", "-h"], env=self.env, capture_output=True, text=True, timeout=30)
        return result.returncode == 0 and bool(result.stdout.strip())

    def run(self, *command: str, timeout: float = 60) -> str:
        """Runs a SLURM client command against this cluster; returns its stdout."""
        result = subprocess.run(command, env=self.env, capture_output=True, text=True, timeout=timeout)
        if result.returncode != 0:
            raise RuntimeError(f"{' '.join(command)} failed ({result.returncode}): {result.stderr.strip()}")
        return result.stdout

    def job_field(self, job_id: str, field: str) -> str:
        """One `Key=value` field of `scontrol show job`, e.g. JobState or Restarts."""
        text = self.run("scontrol", "show", "job", job_id)
        for token in text.split():
            if token.startswith(f"{field}="):
                return token.split("=", 1)[1]
        raise KeyError(f"{field} not in scontrol output for job {job_id}")

    def wait_for_state(self, job_id: str, states: set[str], timeout: float) -> str:
        deadline = time.monotonic() + timeout
        state = ""
        while time.monotonic() < deadline:
            state = self.job_field(job_id, "JobState")
            if state in states:
                return state
            time.sleep(2)
        raise TimeoutError(
            f"job {job_id} still {state} after {timeout:.0f}s, expected one of {sorted(states)}"
        )

    def _start_munge(self) -> None:
        key = self.folder / "munge" / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        munge_dir = self.folder / "munge"
        subprocess.run(
            [
                "munged",
                f"--key-file={key}",
                f"--socket={self.munge_socket}",
                f"--pid-file={munge_dir / 'munged.pid'}",
                f"--log-file={munge_dir / 'munged.log'}",
                f"--seed-file={munge_dir / 'seed'}",
                "--force",
            ],
            check=True,
            capture_output=True,
            timeout=30,
        )

    def _spawn(self, command: list[str]) -> None:
        log = open(self.folder / "log" / f"{command[0]}-{len(self.daemons)}.out", "ab")
        self.daemons.append(subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=self.env))
        log.close()

    def _wait_idle(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        output = ""
        while time.monotonic() < deadline:
            result = subprocess.run(
                ["sinfo", "-h", "-o", "%N %t"], env=self.env, capture_output=True, text=True, timeout=30
            )
            output = result.stdout.strip()
            if result.returncode == 0 and output.endswith("idle") and "node[1-2]" in output:
                return
            time.sleep(1)
        self.stop()
        raise SlurmUnavailable(
            f"SLURM nodes not idle after {timeout:.0f}s (sinfo: {output!r}); logs in {self.folder}/log"
        )

    def _slurm_conf(self) -> str:
        folder = self.folder
        ctld_port, slurmd_port = free_port(), free_port()
        nodes = "\n".join(
            f"NodeName={node} NodeHostname=localhost NodeAddr=127.0.0.1 Port={free_port()} "
            f"CPUs={self.cpus_per_node} RealMemory=4000 State=UNKNOWN"
            for node in NODES
        )
        return f"""ClusterName=kitdisttest
SlurmctldHost=localhost
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={self.munge_socket}
StateSaveLocation={folder}/state
SlurmdSpoolDir={folder}/spool/%n
SlurmctldPidFile={folder}/slurmctld.pid
SlurmdPidFile={folder}/spool/slurmd-%n.pid
SlurmctldLogFile={folder}/log/slurmctld.log
SlurmdLogFile={folder}/log/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
MpiDefault=none
ReturnToService=2
JobRequeue=1
SwitchType=switch/none
JobCompType=jobcomp/none
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
SchedulerType=sched/backfill
InactiveLimit=0
KillWait=10
MinJobAge=600
{nodes}
PartitionName=debug Nodes=node[1-2] Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
"""
