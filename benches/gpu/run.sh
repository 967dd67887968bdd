#!/usr/bin/env bash
# Everything a GPU machine can check: build with CUDA, the GPU tests, and the benchmarks against
# MONAI, saved as benches/results/<device>-<date>.json.
# Usage (from the repository root): bash benches/gpu/run.sh [OUT_DIR] [STAGES]
#   OUT_DIR (default: benches/results) also receives the build and test logs;
#   STAGES (default "build gpu-tests bench"; also "cpu-tests") picks steps, so that each device call
#   fits its 10-minute limit, e.g. "build gpu-tests" in one call and "bench" in the next (the build
#   stays installed while the machine is warm; a bench stage on a fresh machine rebuilds first).
# The machine reaches no package registry: run benches/gpu/fetch_wheels.sh here first and carry .whl;
# without it the MONAI / nnU-Net comparisons are skipped. BENCH_ARGS adds options to fastmed bench.
set -euo pipefail
cd "$(dirname "$0")/../.."
out="${1:-benches/results}"
stages="${2:-build gpu-tests bench}"
mkdir -p "$out"
PY="${PYTHON:-$(command -v python3 || command -v python)}"
export PYTHONUNBUFFERED=1
if ls .whl/*.whl >/dev/null 2>&1; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/fastmed-site .whl/*.whl
  export PYTHONPATH="/tmp/fastmed-site${PYTHONPATH:+:$PYTHONPATH}"
else
  echo "no .whl/: MONAI, nibabel and dynamic-network-architectures only if already installed" >&2
fi
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$out/gpu.txt"
built() { "$PY" -c "import fastmed, sys; sys.exit(0 if fastmed.build_info().get('cuda') else 1)" 2>/dev/null; }
if [[ " $stages " == *" build "* ]] || ! built; then
  t0=$(date +%s)
  FASTMED_CUDA=ON "$PY" -m pip install -v --no-build-isolation --no-deps --force-reinstall . > "$out/build.log" 2>&1 \
    || { tail -50 "$out/build.log"; exit 1; }
  echo "build: $(( $(date +%s) - t0 )) s"
  "$PY" -c "import fastmed, json; print(json.dumps(fastmed.build_info(), indent=1))"
fi
if [[ " $stages " == *" gpu-tests "* ]]; then
  "$PY" -m pytest tests -m gpu -q -p no:cacheprovider 2>&1 | tee "$out/pytest-gpu.txt" | tail -40 || echo "GPU tests FAILED (see $out/pytest-gpu.txt)"
fi
if [[ " $stages " == *" cpu-tests "* ]]; then
  "$PY" -m pytest tests -q -m "not gpu" -p no:cacheprovider 2>&1 | tail -3 | tee "$out/pytest-cpu.txt"
fi
if [[ " $stages " == *" bench "* ]]; then
  dev=$("$PY" -c "import torch; print(''.join(c if c.isalnum() else '-' for c in torch.cuda.get_device_name(0)).strip('-').lower())")
  day=$(date -u +%Y-%m-%d)
  res="$out/${dev}-${day}.json"
  i=2; while [ -e "$res" ]; do res="$out/${dev}-${day}-$i.json"; i=$((i+1)); done
  "$PY" -m fastmed.cli bench --device cuda --out "$res" ${BENCH_ARGS:-}
  echo "results: $res"
fi
