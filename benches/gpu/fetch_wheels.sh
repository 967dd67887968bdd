#!/usr/bin/env bash
# Run HERE (a machine with PyPI), before a GPU session: the GPU machines of this workplace reach no
# package registry, and their image (Python 3.12, torch, triton, scipy, pytest, pybind11,
# scikit-build-core, cmake, ninja, timm, einops, tqdm) lacks MONAI, nibabel and nnU-Net's
# dynamic-network-architectures. Saves their wheels (pure Python, ~5 MB) in .whl/ (git-ignored via
# .git/info/exclude); name .whl in the device call's `carry`, and benches/gpu/run.sh installs them.
set -euo pipefail
cd "$(dirname "$0")/../.."
ex=$(git rev-parse --git-path info/exclude)
mkdir -p "$(dirname "$ex")"
grep -qx '/.whl/' "$ex" 2>/dev/null || echo '/.whl/' >> "$ex"
mkdir -p .whl
for p in monai==1.6.1 nibabel==5.4.2 dynamic-network-architectures==0.4.4; do
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .whl "$p"
done
ls -la .whl
