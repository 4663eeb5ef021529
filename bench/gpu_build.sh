#!/usr/bin/env bash
# Builds the extension of the source tree TREE for the present GPU only (its compute capability;
# 9.0 as sm_90a, for the wgmma tile), with ptxas's register and spill report, into TREE/sparsegemm,
# so that PYTHONPATH=TREE imports it. cmake's and the build's output go to LOG; on failure its tail
# is printed and the exit status is 1. The one build recipe of gpu_suite.sh, ab_sweep.sh and the
# device scripts kept under bench/results/.
#   Usage: bench/gpu_build.sh TREE BUILD_DIR LOG      (PYTHON: default python3)
set -euo pipefail
TREE=$(cd "${1:?usage: bench/gpu_build.sh TREE BUILD_DIR LOG}" && pwd)
BUILD=${2:?usage: bench/gpu_build.sh TREE BUILD_DIR LOG}
LOG=${3:?usage: bench/gpu_build.sh TREE BUILD_DIR LOG}
PY=${PYTHON:-python3}
ARCH=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader | head -1 | tr -d ' .')
if ! { cmake -S "$TREE" -B "$BUILD" -GNinja -DCMAKE_BUILD_TYPE=Release -DPython_EXECUTABLE="$(command -v "$PY")" \
         -Dpybind11_DIR="$("$PY" -m pybind11 --cmakedir)" -DSPARSEGEMM_CUDA=ON -DSPARSEGEMM_CUDA_ARCHS="$ARCH" \
         -DSPARSEGEMM_PTXAS_VERBOSE=ON -DCMAKE_LIBRARY_OUTPUT_DIRECTORY="$TREE/sparsegemm" &&
       cmake --build "$BUILD"; } > "$LOG" 2>&1; then
  tail -30 "$LOG"
  exit 1
fi
