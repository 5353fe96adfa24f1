#!/usr/bin/env bash
# Download (here, where PyPI is reachable) the wheels scripts/gpu_check.sh installs on a GPU machine that
# cannot reach a package registry: the pins in scripts/gpu_wheels.txt, for CPython 3.12 on x86-64 Linux,
# into .whl/ (git-ignored). The device tool carries at most 64 MiB per call, so the total must stay under
# 60 MiB. Usage: bash scripts/gpu_wheelhouse.sh
set -euo pipefail
cd "$(dirname "$0")/.."
LIMIT_MIB=60
mkdir -p .whl
grep -vE '^\s*(#|$)' scripts/gpu_wheels.txt | while read -r pin; do
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        --platform any -d .whl "$pin"
done
total=$(du -sb .whl | cut -f1)
echo "wheelhouse .whl/: $(ls .whl | wc -l) wheels, $((total / 1024)) KiB"
ls -1 .whl
if (( total > LIMIT_MIB * 1024 * 1024 )); then
    echo "error: .whl/ holds $((total / 1048576)) MiB, over ${LIMIT_MIB} MiB (the device tool carries <= 64 MiB); remove wheels the GPU image already has" >&2
    exit 2
fi
