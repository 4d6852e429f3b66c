"""Stopping a run early but cleanly (pre-emption): checkpoint at the next step boundary, then exit.

Two ways a stop request reaches the workers:
- the driver (`python -m kitdist.pretrain`) gets SIGTERM, e.g. from `ray job stop` or a scheduler's
  pre-emption notice, and writes a marker file `<run>/stop-requested` on the run's storage, which
  rank 0 polls (every few seconds at most, so a remote store sees one HEAD request per poll);
- a worker process gets SIGTERM itself (torchrun under SLURM signals every rank).
The ranks agree (one tiny all-reduce) on whether any of them saw a request, so they all stop after the
same step: on an accelerator at logging steps only (`train.log_every`), so other steps never wait for the
host; on CPU, where reading the result costs no synchronisation, after every step. Re-running the
same command removes the marker and resumes from that checkpoint.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable

import torch

from kitdist import storage
from kitdist.distributed.env import all_reduce_sum

STOP_MARKER = "stop-requested"
# Exit status of a driver that stopped early on request: 128 + SIGTERM, what a shell reports for it.
STOPPED_EXIT_CODE = 128 + signal.SIGTERM
POLL_SECONDS = 2.0


def marker_url(run_url: str) -> str:
    return storage.join(run_url, STOP_MARKER)


def clear_request(run_url: str) -> None:
    """Removes a request left by an earlier, stopped attempt of this run."""
    storage.remove(marker_url(run_url))


def request_stop_on_sigterm(run_url: str, announce: Callable[[str], None] = print) -> Callable[[], bool]:
    """Driver side: the first SIGTERM writes the marker (training goes on to the next step boundary,
    checkpoints and returns); a second one ends the process at once. Returns "was a stop requested?"."""
    requested = threading.Event()

    def on_sigterm(signum: int, frame: object) -> None:
        if requested.is_set():
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGTERM)
            return
        requested.set()
        announce("SIGTERM: the workers checkpoint after the current step and stop (SIGTERM again: exit now)")
        storage.write_text(marker_url(run_url), "stop after the current step\n")

    signal.signal(signal.SIGTERM, on_sigterm)
    return requested.is_set


class StopWatch:
    """Worker side: `should_stop()` is collective, called by every rank after the same steps."""

    def __init__(self, run_url: str, rank: int, device: torch.device) -> None:
        self.url = marker_url(run_url)
        self.rank = rank
        self.device = device
        self.signalled = threading.Event()
        self.next_poll = 0.0
        if threading.current_thread() is threading.main_thread():  # Ray runs the loop in another thread
            signal.signal(signal.SIGTERM, lambda signum, frame: self.signalled.set())

    def _seen_here(self) -> bool:
        if self.signalled.is_set():
            return True
        if self.rank != 0 or time.monotonic() < self.next_poll:
            return False
        self.next_poll = time.monotonic() + POLL_SECONDS
        return storage.exists(self.url)

    def agrees_after(self, step: int, log_every: int) -> bool:
        """Whether the ranks compare their requests after `step` (the same answer on every rank)."""
        return self.device.type == "cpu" or step % log_every == 0

    def should_stop(self) -> bool:
        return all_reduce_sum([float(self._seen_here())], self.device)[0] > 0
