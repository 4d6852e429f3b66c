"""`python -m kitdist.coordinator run|status|cancel`: the fault-tolerant pre-train -> fine-tune -> evaluate
pipeline, driven through Ray's job API."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence

from kitdist import storage
from kitdist.config import ConfigError
from kitdist.coordinator.cluster import ClusterError
from kitdist.coordinator.plan import PlanError
from kitdist.coordinator.state import State, StateError, StateStore

EPILOG = """\
pipelines that ship:
  configs/pipeline/kit.yaml    the paper's recipe at scale: ImageNet pre-training, then SIDD, GoPro,
                               Rain13k and REDS fine-tunes, each evaluated on its test set
  configs/pipeline/demo.yaml   the same shape in a few minutes on a CPU (builds its data once)

run: checks every stage (configs, datasets, model sizes, storage) before submitting anything, then runs
  the stages as Ray jobs on the cluster at $RAY_ADDRESS (else on a local one it starts on 127.0.0.1),
  writing the state document (<state>/state.json) after every change. Failed jobs are resubmitted and
  resume from their latest checkpoint (max_attempts, backoff_s). Run it again after a crash (of a job,
  of the coordinator, of the machine): finished stages are kept, running jobs re-attached.
status: where every stage stands. cancel: stops the pipeline's jobs; `run --continue-cancelled` resumes.
S3 endpoint and credentials come from AWS_* environment variables. Jobs get the endpoint and region
through Ray's runtime environment; credentials never pass through Ray or the state document: a job reads
them from its node's environment (a local cluster started here inherits this one's; remote clusters: see
cluster/README.md). A job that fails with an error no retry can fix is not resubmitted.
Ray token auth: RAY_AUTH_TOKEN or ~/.ray/auth_token.
"""


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m kitdist.coordinator",
        description="Pre-train KiT, fine-tune it per task, evaluate each, tabulate: a pipeline of Ray jobs.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="run (or continue) a pipeline")
    run.add_argument("pipeline", help="PIPELINE.yaml")
    run.add_argument("--continue-cancelled", action="store_true", help="resume a cancelled pipeline")
    run.add_argument("--check", action="store_true", help="only check the pipeline; submit nothing")
    for name, what in (("status", "print where every stage stands"), ("cancel", "stop the pipeline's jobs")):
        sub = commands.add_parser(name, help=what)
        sub.add_argument("target", metavar="PIPELINE_OR_STATE_URL", help="PIPELINE.yaml or its state folder")
    commands.choices["cancel"].add_argument(
        "--wait", type=float, default=60.0, help="seconds to wait for a running coordinator to acknowledge"
    )
    return parser.parse_args(argv)


def state_folder(target: str) -> str:
    """The state folder of a PIPELINE.yaml, or the folder (or state.json URL) given."""
    if target.endswith((".yaml", ".yml")):
        from kitdist.coordinator.spec import load_pipeline

        return load_pipeline(target).state
    return target


def command_run(args: argparse.Namespace) -> int:
    from kitdist.coordinator.pipeline import Coordinator
    from kitdist.coordinator.plan import make_plan
    from kitdist.coordinator.spec import load_pipeline

    spec = load_pipeline(args.pipeline)
    if spec.demo_data:
        from kitdist.coordinator.demo import ensure_demo_shards, with_embedded_weights

        ensure_demo_shards(spec.demo_data)
        spec = with_embedded_weights(spec)
    plan = make_plan(spec)
    print(f"pipeline {spec.name}: {len(plan.stage_kinds())} stages checked", flush=True)
    if args.check:
        return 0
    state = Coordinator(
        plan, say=lambda line: print(f"[{time.strftime('%H:%M:%S')}] {line}", flush=True)
    ).run(continue_cancelled=args.continue_cancelled)
    print_results(spec.state)
    return 0 if state.status == "succeeded" else 1


def print_results(state_folder: str) -> None:
    """Each evaluated task in one line: the test inputs' PSNR, the restored one's, where the grids are."""
    import json

    results = storage.join(state_folder, "results.json")
    if not storage.exists(results):
        return
    print("results on the test images (PSNR / SSIM on RGB; the full table in results.md beside it):")
    for row in json.loads(storage.read_text(results))["rows"]:
        if row.get("psnr_rgb") is None:
            print(f"  {row['task']:<8} {row['status']}")
            continue
        evaluation = storage.join(state_folder, "eval", row["stage"])
        inputs = json.loads(storage.read_text(storage.join(evaluation, "results.json"))).get("input_psnr_rgb")
        before = f"input {inputs:.2f} dB -> " if inputs is not None else ""
        print(
            f"  {row['task']:<8} {before}{row['psnr_rgb']:.2f} dB, SSIM {row['ssim_rgb']:.4f}; "
            f"grids: {storage.join(evaluation, 'grids')}"
        )


def load_state(target: str) -> tuple[StateStore, State]:
    store = StateStore(state_folder(target))
    state = store.load()
    if state is None:
        raise StateError(f"{store.url}: no pipeline state here (has the pipeline been run?)")
    return store, state


def command_status(args: argparse.Namespace) -> int:
    from kitdist.coordinator.report import status_text

    _, state = load_state(args.target)
    print(status_text(state))
    return 0


def command_cancel(args: argparse.Namespace) -> int:
    """Marks the pipeline cancelled and stops its jobs; a running coordinator sees the mark and exits."""
    import os

    from kitdist.coordinator.cluster import LocalCluster
    from kitdist.coordinator.jobs import JobClient
    from kitdist.coordinator.state import live_owner

    store, state = load_state(args.target)
    if state.status != "running":
        print(f"pipeline {state.pipeline} has already {state.status}")
        return 0
    store.request_cancel()
    if live_owner(state, stale_after_s=600):
        deadline = time.monotonic() + args.wait
        while time.monotonic() < deadline and state.status == "running":
            time.sleep(1.0)
            state = store.load() or state
    if state.status == "running":  # no coordinator acknowledged: stop the jobs from here
        from kitdist.coordinator.pipeline import cancel_jobs

        address = os.environ.get("RAY_ADDRESS") or state.cluster.get("address", "")
        try:
            jobs = JobClient(address, {}) if address else None
        except ClusterError as err:  # its cluster is gone, and its jobs with it
            print(f"warning: {err}")
            jobs = None
        cancel_jobs(state, store, jobs, print)
        if state.cluster.get("local"):
            LocalCluster(state.cluster["address"], state.cluster["pid"], state.cluster["temp_dir"]).stop()
    print(f"pipeline {state.pipeline}: cancelled")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    commands = {"run": command_run, "status": command_status, "cancel": command_cancel}
    try:
        return commands[args.command](args)
    except (ConfigError, PlanError, StateError, ClusterError, storage.StorageError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
