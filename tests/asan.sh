#!/usr/bin/env bash
# fastmed's kernel tests under AddressSanitizer, on this machine (not part of CI, which runs only the
# emulated CUDA kernels with it: tests/test_cuda_emulated.py). About 10 minutes on 2 cores.
#   - fastmed._C (the C++ CPU kernels, every instruction-set build) rebuilt with -fsanitize=address
#     in build/asan: a vector load or store past the end of a tensor fails, tails included;
#   - the Triton kernels under TRITON_INTERPRET=1: the interpreter copies every loaded and stored
#     element with memcpy, which ASan checks, so an unmasked access outside a tensor fails;
#   - the CUDA C++ kernels in fmemu, built with ASan (as in CI).
# The editable install points at the ASan build meanwhile; the normal build is put back at the end.
# Extra arguments go to pytest (e.g. -x, or test files instead of the default set).
set -euo pipefail
cd "$(dirname "$0")/.."
cxx=${CXX:-c++}
asan=$("$cxx" -print-file-name=libasan.so)
stdcxx=$("$cxx" -print-file-name=libstdc++.so)
if [[ "$asan" != /* || ! -e "$asan" ]]; then
  echo "no AddressSanitizer runtime for $cxx" >&2
  exit 2
fi
pipi() { python -m pip install -q --no-build-isolation --no-deps -e . "$@"; }
trap 'echo "restoring the normal build" >&2; pipi' EXIT
pipi -Ccmake.define.FASTMED_CUDA=OFF -Cbuild-dir=build/asan \
  -Ccmake.define.CMAKE_CXX_FLAGS="-fsanitize=address -fno-omit-frame-pointer" \
  -Ccmake.define.CMAKE_MODULE_LINKER_FLAGS=-fsanitize=address
files=(tests/test_dice_ce.py tests/test_dice_ce_isa.py tests/test_sliding_window.py tests/test_resample.py
       tests/test_norm_act.py tests/test_upconv.py tests/test_transforms.py tests/test_conv_norm_act.py
       tests/test_optimize.py tests/test_norm_act_triton.py tests/test_conv_norm_act_triton.py)
args=("$@")
[[ ${#args[@]} -eq 0 || "${args[0]}" == -* ]] && args=("${files[@]}" "${args[@]}")
# libstdc++ preloaded too, so that ASan's __cxa_throw interceptor finds it (C++ exceptions in torch)
LD_PRELOAD="$asan $stdcxx" ASAN_OPTIONS=detect_leaks=0:halt_on_error=1 FMEMU_ASAN=1 \
  python -m pytest -q -p no:cacheprovider "${args[@]}"
