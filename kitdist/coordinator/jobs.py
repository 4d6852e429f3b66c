"""Ray jobs of a pipeline: what each runs (entrypoint, resources, environment) and the calls to Ray's job
API that submit, watch and stop them. They show in `ray job list` and the dashboard like any other job."""

from __future__ import annotations

import shlex
from dataclasses import dataclass

from kitdist.coordinator.cluster import ClusterError, job_client
from kitdist.coordinator.spec import Resources
from kitdist.credentials import STORAGE_ENV, passed_on_env


@dataclass(frozen=True)
class JobSpec:
    """A job as submitted: the command and what it reserves."""

    entrypoint: list[str]  # argv; quoted into one shell line for Ray
    resources: Resources

    @property
    def command(self) -> str:
        return shlex.join(self.entrypoint)


@dataclass(frozen=True)
class JobView:
    """What Ray says about one job."""

    status: str  # PENDING, RUNNING, SUCCEEDED, FAILED, STOPPED; LOST when Ray does not know the id
    message: str = ""
    started: float = 0.0
    ended: float = 0.0

    @property
    def terminal(self) -> bool:
        return self.status in ("SUCCEEDED", "FAILED", "STOPPED", "LOST")


def job_env(forward: list[str]) -> dict[str, str]:
    """Environment variables for the jobs: the object store's settings (never its credentials: a job's
    driver takes them from its node's environment, as the training workers do) and the names in
    `forward`, those that are set; a credential among them is refused (ConfigError naming forward_env)."""
    return passed_on_env([*STORAGE_ENV, *forward], key="forward_env")


class JobClient:
    """Ray's JobSubmissionClient, with the errors a coordinator has to tell apart."""

    def __init__(self, address: str, env: dict[str, str]) -> None:
        self.address = address
        self.env = env
        self._client = job_client(address)

    def submit(self, job_id: str, job: JobSpec, metadata: dict[str, str]) -> None:
        """Submits under `job_id`; an id Ray already knows (the submit went through before a crash) is kept."""
        try:
            self._client.submit_job(
                entrypoint=job.command,
                submission_id=job_id,
                runtime_env={"env_vars": self.env} if self.env else None,
                entrypoint_num_cpus=job.resources.num_cpus,
                entrypoint_num_gpus=job.resources.num_gpus,
                metadata=metadata,
            )
        except RuntimeError as err:
            if "already exists" not in str(err):
                raise ClusterError(f"{self.address}: submitting job {job_id} failed: {err}") from err

    def view(self, job_id: str) -> JobView:
        try:
            info = self._client.get_job_info(job_id)
        except RuntimeError as err:
            if "does not exist" in str(err) or "404" in str(err):
                return JobView("LOST", f"Ray has no job {job_id} (its cluster was restarted?)")
            raise ClusterError(f"{self.address}: reading job {job_id} failed: {err}") from err
        return JobView(
            status=str(info.status.value if hasattr(info.status, "value") else info.status),
            message=info.message or "",
            started=(info.start_time or 0) / 1000.0,
            ended=(info.end_time or 0) / 1000.0,
        )

    def stop(self, job_id: str) -> bool:
        """Asks Ray to stop the job (SIGTERM, then SIGKILL after Ray's grace period); False if unknown."""
        try:
            return bool(self._client.stop_job(job_id))
        except RuntimeError:
            return False

    def log_tail(self, job_id: str, chars: int = 1500) -> str:
        try:
            return self._client.get_job_logs(job_id)[-chars:]
        except RuntimeError:
            return ""

    def list_ids(self) -> set[str]:
        return {job.submission_id for job in self._client.list_jobs() if job.submission_id}
