#!/usr/bin/env bash
# Puts into .whl/ (ignored by git) every wheel the GPU battery needs that the lent GPU machines lack
# (they have Python 3.12, a CUDA torch, Triton, scikit-image, tensorboard... and no package registry;
# README.md lists their packages, and `battery.py --check-imports` checks every section against that list
# and the name==version arguments below): DeepSpeed, built here from its source package, and its
# pure-Python or manylinux needs, downloaded for CPython 3.12 on x86_64. run.sh installs them with
# `pip install --no-index --no-deps --target`.
#
#   benchmarks/gpu/wheels.sh          # once, where PyPI is reachable; then carry .whl (README.md)
#
# Versions are those this project is tested with; pydantic-core must match pydantic exactly.
set -euo pipefail
REPO=$(cd "$(dirname "$0")/../.." && pwd)
DEST=${1:-$REPO/.whl}
LIMIT_MIB=50  # the device tool carries at most 64 MiB per call, the working tree included
PYTHON=${PYTHON:-python3}
mkdir -p "$DEST"
PLATFORMS=(--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
"$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${PLATFORMS[@]}" -d "$DEST" \
    pydantic==2.13.4 pydantic-core==2.46.4 annotated-types==0.7.0 typing-inspection==0.4.2 hjson==3.1.0
if ! compgen -G "$DEST/deepspeed-0.19.8-*.whl" >/dev/null; then
    # DeepSpeed publishes a source package only; its CUDA ops compile at first use, so the wheel is
    # pure Python (DS_BUILD_OPS=0) and works with whichever torch the GPU machine has.
    DS_BUILD_OPS=0 "$PYTHON" -m pip wheel -q --no-deps --no-build-isolation -w "$DEST" deepspeed==0.19.8
fi
TOTAL=$(du -sm "$DEST" | cut -f1)
ls -l "$DEST"
echo "total ${TOTAL} MiB in $DEST"
if [ "$TOTAL" -gt "$LIMIT_MIB" ]; then
    echo "error: the wheels take ${TOTAL} MiB, more than ${LIMIT_MIB} MiB of the 64 MiB a call may carry" >&2
    exit 1
fi
