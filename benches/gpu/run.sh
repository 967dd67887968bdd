#!/usr/bin/env bash
# Everything a GPU machine can check, in one call: build with CUDA, the GPU tests, the full test
# suite, and the benchmarks against MONAI, saved as benches/results/<device>-<date>.json.
# Usage (from the repository root): bash benches/gpu/run.sh [OUT_DIR]
# OUT_DIR (default: benches/results) also receives the build and test logs.
set -euo pipefail
cd "$(dirname "$0")/../.."
out="${1:-benches/results}"
mkdir -p "$out"
python -m pip install -q "torch>=2.4" numpy nibabel monai scipy pytest pytest-benchmark pybind11 "scikit-build-core>=0.10" cmake ninja 2>&1 | tail -2 || true
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$out/gpu.txt"
FASTMED_CUDA=ON python -m pip install -v --no-build-isolation --no-deps --force-reinstall . > "$out/build.log" 2>&1 \
  || { tail -50 "$out/build.log"; exit 1; }
python -c "import fastmed, json; print(json.dumps(fastmed.build_info(), indent=1))"
python -m pytest tests -m gpu -q 2>&1 | tee "$out/pytest-gpu.txt"
python -m pytest tests -q -m "not gpu" 2>&1 | tail -3 | tee "$out/pytest-cpu.txt"
dev=$(python -c "import torch; print(''.join(c if c.isalnum() else '-' for c in torch.cuda.get_device_name(0)).strip('-').lower())")
day=$(date -u +%Y-%m-%d)
res="$out/${dev}-${day}.json"
i=2; while [ -e "$res" ]; do res="$out/${dev}-${day}-$i.json"; i=$((i+1)); done
fastmed bench --device cuda --out "$res"
echo "results: $res"
