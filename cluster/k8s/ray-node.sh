#!/usr/bin/env bash
# The container command of every kitdist Ray pod on KubeRay (head and workers): runs the `ray start ... --block`
# command KubeRay generated for the pod, and turns the pod's SIGTERM (eviction, `kubectl drain`, deletion)
# into kitdist's checkpoint path before Ray goes down: it stops every running Ray job of the cluster with
# `ray job stop` semantics (the job's driver gets SIGTERM, so kitdist's workers checkpoint at the next step
# boundary and the run stops), waits for the jobs to end, then stops this pod's Ray node. A worker pod does
# the same as the head (a lost node would otherwise cost the steps since the last periodic checkpoint),
# except that it leaves a pipeline's coordinator running: the coordinator resubmits the stopped stages,
# which resume from those checkpoints once KubeRay has replaced the pod.
# Contains no training logic: see cluster/README.md ("Eviction and drain").
#
# Knobs (environment):
#   KUBERAY_GEN_RAY_START_CMD  the pod's `ray start` command (set by KubeRay; the RayCluster's pod templates
#                              carry the annotation ray.io/overwrite-container-cmd so that KubeRay runs this
#                              script instead of that command)
#   KITDIST_JOB_API            the cluster's job API (default http://$FQ_RAY_IP:8265 on a worker, where KubeRay
#                              sets FQ_RAY_IP to the head's Service; http://127.0.0.1:8265 on the head)
#   KITDIST_DRAIN_WAIT         seconds to wait for the stopped jobs to end (default 270): more than the head's
#                              RAY_JOB_STOP_WAIT_TIME_S (after which Ray SIGKILLs a driver), less than the pod's
#                              terminationGracePeriodSeconds (after which Kubernetes SIGKILLs the pod)
set -uo pipefail

START=${KUBERAY_GEN_RAY_START_CMD:?KUBERAY_GEN_RAY_START_CMD is not set: run this script in a KubeRay pod}
JOB_API=${KITDIST_JOB_API:-http://${FQ_RAY_IP:-127.0.0.1}:8265}
DRAIN_WAIT=${KITDIST_DRAIN_WAIT:-270}

log() { echo "[ray-node.sh $(date +%H:%M:%S)] $*"; }

ulimit -n "${RAY_START_ULIMIT_OPEN_FILES:-65536}"
# Ray 2.60 drains a node on its own SIGTERM for up to this long (default 30 s; ray/_private/node.py), waiting
# for its leases to end. By then this script has stopped the jobs already: the wait would only eat into the
# pod's grace period.
export RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S=${RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S:-0}
# In the background so that this shell can take SIGTERM (Kubernetes signals only the container's first
# process); `exec` makes the Ray node this child itself. Globbing off: the command is KubeRay's, word for word.
( set -f; eval "exec $START" ) &
RAY_NODE=$!

if [[ " $START " == *" --head "* ]]; then SPARE=""; else SPARE="kitdist.coordinator"; fi

stop_jobs() {
    python - "$JOB_API" "$DRAIN_WAIT" "$SPARE" <<'PY'
import sys
import time

from ray.job_submission import JobSubmissionClient

api, wait_s, spare = sys.argv[1], float(sys.argv[2]), sys.argv[3]
try:
    client = JobSubmissionClient(api)
    running = [
        job.submission_id
        for job in client.list_jobs()
        if job.submission_id and not job.status.is_terminal() and not (spare and spare in job.entrypoint)
    ]
    for submission_id in running:
        client.stop_job(submission_id)
    print(f"asked {len(running)} running job(s) to stop: {' '.join(running) or '-'}", flush=True)
    deadline = time.monotonic() + wait_s
    while running and time.monotonic() < deadline:
        time.sleep(2)
        running = [s for s in running if not client.get_job_status(s).is_terminal()]
    if running:
        print(f"still running after {wait_s:.0f} s: {' '.join(running)}", flush=True)
except Exception as err:  # the head is gone or not up yet: nothing left to stop through it
    print(f"cannot reach the job API at {api}: {err}", flush=True)
PY
}

on_sigterm() {
    log "SIGTERM: stopping the cluster's running Ray jobs (they checkpoint first), up to ${DRAIN_WAIT}s"
    stop_jobs
    log "stopping this Ray node"
    kill -TERM "$RAY_NODE" 2>/dev/null
    wait "$RAY_NODE"
    exit 0
}
trap on_sigterm TERM

wait "$RAY_NODE"
status=$?
log "the Ray node exited with status $status"
exit "$status"
