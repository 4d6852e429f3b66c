#!/usr/bin/env bash
# The GPU battery in two prepared calls of a lent GPU machine, or every section on a CPU (see
# benchmarks/gpu/README.md for the calls a session makes):
#
#   benchmarks/gpu/run.sh OUTDIR --call 1    # device, tests, attention, restore
#   benchmarks/gpu/run.sh OUTDIR --call 2    # train, loader, growth, resume
#   benchmarks/gpu/run.sh OUTDIR --cpu       # every section, tiny shapes (tests/test_gpu_battery.py)
#
# Writes OUTDIR/report.json and report.md (rewritten after every section), rows.jsonl (what each section
# measured, as it went) and battery.log. On a GPU machine the wheels in .whl/ (benchmarks/gpu/wheels.sh)
# are installed first into a private folder: those machines have no package registry. --cpu uses what
# this machine has (the wheels are for the GPU machines' Python).
set -u
OUT=${1:?usage: benchmarks/gpu/run.sh OUTDIR [--call 1|2] [--cpu] [battery.py options]}
shift
REPO=$(cd "$(dirname "$0")/../.." && pwd)
PYTHON=${PYTHON:-python3}
mkdir -p "$OUT"
case " $* " in
*" --cpu "*) ;;
*)
    if compgen -G "$REPO/.whl/*.whl" >/dev/null; then
        SITE=${KITDIST_WHEEL_SITE:-/tmp/kitdist-wheels}
        if "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
            --target "$SITE" "$REPO"/.whl/*.whl >"$OUT/wheels.log" 2>&1; then
            export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
        else
            echo "installing the carried wheels failed (see $OUT/wheels.log); going on without them"
        fi
    fi
    ;;
esac
export PYTHONPATH="$REPO:$REPO/tests:$REPO/benchmarks${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
exec "$PYTHON" "$REPO/benchmarks/gpu/battery.py" "$OUT" "$@"
