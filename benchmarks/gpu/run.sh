#!/usr/bin/env bash
# The GPU battery: one command that proves kitdist's GPU path and measures it, in under 8 minutes on one
# GPU (see benchmarks/gpu/README.md for the device-tool call a session uses).
#
#   benchmarks/gpu/run.sh OUTDIR          # on a CUDA machine
#   benchmarks/gpu/run.sh OUTDIR --cpu    # the same sections with tiny shapes on a CPU (tests/test_gpu_battery.py)
#
# Writes OUTDIR/report.json (one entry per section: device, tests, attention, train, restore, loader),
# OUTDIR/report.md and OUTDIR/battery.log. Wheels found in .whl/ (benchmarks/gpu/wheels.sh builds them)
# are installed first into a private folder, for machines without a package registry.
set -u
OUT=${1:?usage: benchmarks/gpu/run.sh OUTDIR [--cpu]}
shift
REPO=$(cd "$(dirname "$0")/../.." && pwd)
PYTHON=${PYTHON:-python3}
mkdir -p "$OUT"
if compgen -G "$REPO/.whl/*.whl" >/dev/null; then
    SITE=${KITDIST_WHEEL_SITE:-/tmp/kitdist-wheels}
    if "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target "$SITE" "$REPO"/.whl/*.whl >"$OUT/wheels.log" 2>&1; then
        export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
    else
        echo "installing the carried wheels failed (see $OUT/wheels.log); going on without them"
    fi
fi
export PYTHONPATH="$REPO:$REPO/tests:$REPO/benchmarks${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
exec "$PYTHON" "$REPO/benchmarks/gpu/battery.py" "$OUT" "$@"
