#!/usr/bin/env bash
# Submit kitdist pre-training (or any kitdist entry point) to SLURM with the knobs users change.
#
#   cluster/slurm/submit.sh --nodes 8 --gpus-per-node 8 --config configs/pretrain/kit-imagenet-64gpu.yaml \
#       --storage s3://my-bucket/runs --time 2-00:00:00 [--partition gpu] [--account proj] [-- key=value ...]
#
# One Ray Train worker per GPU: dist.num_workers = nodes x GPUs per node (dist.use_gpu=true when GPUs > 0),
# for the training entry points; `--entrypoint "python -m kitdist.coordinator run PIPELINE.yaml"` runs a pipeline.
# Everything after `--` is passed to the entry point as config overrides. S3 endpoint and credentials are
# read from the environment (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY), which sbatch
# forwards to every node; they are never written into the job script or its arguments.
set -euo pipefail

usage() { sed -n '2,10p' "$0" | sed 's/^# \{0,1\}//'; exit "${1:-0}"; }

NODES=2 GPUS=0 CONFIG= STORAGE= TIME=24:00:00 PARTITION= ACCOUNT= ENTRY="python -m kitdist.pretrain" DRY_RUN=0
while (( $# )); do
    case "$1" in
        --nodes) NODES=$2; shift 2 ;;
        --gpus-per-node) GPUS=$2; shift 2 ;;
        --config) CONFIG=$2; shift 2 ;;
        --storage) STORAGE=$2; shift 2 ;;
        --time) TIME=$2; shift 2 ;;
        --partition) PARTITION=$2; shift 2 ;;
        --account) ACCOUNT=$2; shift 2 ;;
        --entrypoint) ENTRY=$2; shift 2 ;;
        --dry-run) DRY_RUN=1; shift ;;
        -h|--help) usage 0 ;;
        --) shift; break ;;
        *) echo "submit.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
    esac
done
[[ "$NODES" =~ ^[1-9][0-9]*$ ]] || { echo "submit.sh: --nodes must be a positive integer, got '$NODES'" >&2; exit 2; }
[[ "$GPUS" =~ ^[0-9]+$ ]] || { echo "submit.sh: --gpus-per-node must be an integer, got '$GPUS'" >&2; exit 2; }
if [[ -n "$CONFIG" && ! -f "$CONFIG" ]]; then echo "submit.sh: config file not found: $CONFIG" >&2; exit 2; fi

ARGS=()
[[ -n "$CONFIG" ]] && ARGS+=(--config "$CONFIG")
# Worker count and storage are training settings; another entry point (the coordinator) gets them from its
# pipeline file, so they are added only for kitdist.pretrain / kitdist.finetune.
if [[ "$ENTRY" == *kitdist.pretrain* || "$ENTRY" == *kitdist.finetune* ]]; then
    if (( GPUS > 0 )); then ARGS+=("dist.num_workers=$((NODES * GPUS))" dist.use_gpu=true); fi
    [[ -n "$STORAGE" ]] && ARGS+=("storage.root=$STORAGE")
fi
ARGS+=("$@")

SBATCH=(sbatch --parsable --nodes="$NODES" --time="$TIME")
(( GPUS > 0 )) && SBATCH+=(--gpus-per-node="$GPUS")
[[ -n "$PARTITION" ]] && SBATCH+=(--partition="$PARTITION")
[[ -n "$ACCOUNT" ]] && SBATCH+=(--account="$ACCOUNT")
SBATCH+=("$(dirname "$0")/kitdist.sbatch")

export KITDIST_ENTRYPOINT="$ENTRY" KITDIST_ARGS="${ARGS[*]}"
if (( DRY_RUN )); then
    echo "KITDIST_ENTRYPOINT=$KITDIST_ENTRYPOINT KITDIST_ARGS=$KITDIST_ARGS ${SBATCH[*]}"
    exit 0
fi
job=$("${SBATCH[@]}")
echo "submitted job $job: $ENTRY $KITDIST_ARGS"
echo "watch: squeue -j $job; tail -f kitdist-$job.out; the Ray dashboard on the head node, port 8265"
