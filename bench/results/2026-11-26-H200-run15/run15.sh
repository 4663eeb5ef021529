#!/usr/bin/env bash
# Programmatic dependent launch: build, chain tests, A/B (SPARSEGEMM_PDL=0 vs on) of the decode sweep and MLP block, full tests, sanitizers.
set -u
S=/tmp/suite; mkdir -p "$S"
T0=$(date +%s)
pack() { tar czf "$OUT/suite.tgz" -C "$S" . ; }
log() { echo "$(( $(date +%s) - T0 ))s $*" | tee -a "$S/progress.txt"; }
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
PY=python3
ARCH=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader | head -1 | tr -d ' .')
log "arch $ARCH"
cmake -S . -B /tmp/b -GNinja -DCMAKE_BUILD_TYPE=Release -DPython_EXECUTABLE="$(command -v $PY)" \
  -Dpybind11_DIR="$($PY -m pybind11 --cmakedir)" -DSPARSEGEMM_CUDA=ON -DSPARSEGEMM_CUDA_ARCHS="$ARCH" \
  -DSPARSEGEMM_PTXAS_VERBOSE=ON -DCMAKE_LIBRARY_OUTPUT_DIRECTORY="$PWD/sparsegemm" > "$S/cmake.log" 2>&1
cmake --build /tmp/b > "$S/build.log" 2>&1 || { log "BUILD FAILED"; grep -m5 -B2 -A10 error "$S/build.log"; pack; exit 1; }
log "built"
timeout 60 $PY -m pytest -q -x tests/test_kernels_cuda.py > "$S/tests_cuda.log" 2>&1; log "cuda tests rc=$?"; tail -15 "$S/tests_cuda.log"; pack
for pdl in 0 1; do
  SPARSEGEMM_PDL=$pdl timeout 45 $PY bench/decode_sweep.py > "$S/sweep_pdl$pdl.txt" 2>&1; log "sweep pdl=$pdl rc=$?"
  SPARSEGEMM_PDL=$pdl timeout 45 $PY .devrun/mlp_ab.py > "$S/mlp_pdl$pdl.txt" 2>&1; log "mlp pdl=$pdl rc=$?"; pack
done
for pdl in 0 1; do grep -E "^M=" "$S/sweep_pdl$pdl.txt" | sed -E 's/\| c1 best.*\| int8 heuristic/| int8/; s/\| int8 c1.*//'; cat "$S/mlp_pdl$pdl.txt"; done
timeout 170 $PY -m pytest -q -n 15 tests --junitxml="$S/tests.xml" > "$S/tests.log" 2>&1; log "tests rc=$?"; tail -3 "$S/tests.log"; pack
for tool in memcheck racecheck; do
  timeout 50 compute-sanitizer --tool $tool --error-exitcode 1 $PY bench/sanitizer_smoke.py > "$S/sanitizer_$tool.log" 2>&1
  log "$tool rc=$?"; tail -2 "$S/sanitizer_$tool.log"; pack
done
