#!/usr/bin/env bash
# Submit kitdist pre-training (or any kitdist entry point) to SLURM with the knobs users change.
#
#   cluster/slurm/submit.sh --nodes 8 --gpus-per-node 8 --config configs/pretrain/kit-imagenet-64gpu.yaml \
#       --storage s3://my-bucket/runs --time 2-00:00:00 [--partition gpu] [--account proj] [-- key=value ...]
#
# Nodes: whole nodes by default (--exclusive --mem=0: every CPU and all memory of each node, so Ray sees
# them all); --cpus-per-node N and --mem SIZE ask for less, --shared shares nodes (then --cpus-per-node is
# required: a cluster's default may be 1 CPU per task). --output FILE: the job's log (kitdist-%j.out).
# One Ray Train worker per GPU: dist.num_workers = nodes x GPUs per node (dist.use_gpu=true when GPUs > 0),
# for the training entry points; `--entrypoint "python -m kitdist.coordinator run PIPELINE.yaml"` runs a pipeline.
# Everything after `--` is passed to the entry point as config overrides, each exactly as given (spaces,
# brackets, braces, glob characters). S3 endpoint and credentials are read from the environment
# (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY), which sbatch forwards to every node; they are
# never written into the job script or its arguments.
set -euo pipefail

usage() { sed -n '2,16p' "$0" | sed 's/^# \{0,1\}//'; exit "${1:-0}"; }

NODES=2 GPUS=0 CPUS= MEM= SHARED=0 OUTPUT= CONFIG= STORAGE= TIME=24:00:00 PARTITION= ACCOUNT=
ENTRY="python -m kitdist.pretrain" DRY_RUN=0
while (( $# )); do
    case "$1" in
        --nodes) NODES=$2; shift 2 ;;
        --gpus-per-node) GPUS=$2; shift 2 ;;
        --cpus-per-node) CPUS=$2; shift 2 ;;
        --mem) MEM=$2; shift 2 ;;
        --shared) SHARED=1; shift ;;
        --output) OUTPUT=$2; shift 2 ;;
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
if [[ -n "$CPUS" && ! "$CPUS" =~ ^[1-9][0-9]*$ ]]; then
    echo "submit.sh: --cpus-per-node must be a positive integer, got '$CPUS'" >&2; exit 2
fi
if (( SHARED )) && [[ -z "$CPUS" ]]; then
    echo "submit.sh: --shared needs --cpus-per-node N (a cluster's default may be 1 CPU per task)" >&2; exit 2
fi
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

# One task per node (kitdist.sbatch): the Ray node, with the node's CPUs (all of them unless --cpus-per-node).
SBATCH=(sbatch --parsable --nodes="$NODES" --time="$TIME")
(( GPUS > 0 )) && SBATCH+=(--gpus-per-node="$GPUS")
[[ -n "$CPUS" ]] && SBATCH+=(--cpus-per-task="$CPUS")
(( SHARED )) || SBATCH+=(--exclusive)
if [[ -n "$MEM" ]]; then SBATCH+=(--mem="$MEM"); elif (( ! SHARED )); then SBATCH+=(--mem=0); fi
[[ -n "$OUTPUT" ]] && SBATCH+=(--output="$OUTPUT")
[[ -n "$PARTITION" ]] && SBATCH+=(--partition="$PARTITION")
[[ -n "$ACCOUNT" ]] && SBATCH+=(--account="$ACCOUNT")
SBATCH+=("$(dirname "$0")/kitdist.sbatch")

# The overrides travel as one shell-quoted string (printf %q) that kitdist.sbatch reads back into the same
# words: no word splitting, globbing or brace expansion on the way.
KITDIST_ARGS=""
(( ${#ARGS[@]} )) && KITDIST_ARGS=$(printf '%q ' "${ARGS[@]}")
export KITDIST_ENTRYPOINT="$ENTRY" KITDIST_ARGS
if (( DRY_RUN )); then
    printf 'KITDIST_ENTRYPOINT=%q KITDIST_ARGS=%q' "$KITDIST_ENTRYPOINT" "$KITDIST_ARGS"
    printf ' %q' "${SBATCH[@]}"
    echo
    exit 0
fi
job=$("${SBATCH[@]}")
job=${job%%;*}
echo "submitted job $job: $ENTRY ${KITDIST_ARGS}"
output=${OUTPUT:-kitdist-%j.out}
echo "watch: squeue -j $job; tail -f ${output//%j/$job}; the Ray dashboard on the head node, port 8265"
