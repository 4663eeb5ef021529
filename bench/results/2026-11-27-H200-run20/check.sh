#!/usr/bin/env bash
# run20: run18's failing GPU tests after the fix (TMA wgmma loop retires a k-tile's ops before the
# next metadata loads; TMA box starts at whole 16 bytes), then the TMA tiles' large-M timing.
# Usage (repo root): bash bench/results/2026-11-27-H200-run20/check.sh OUT
OUT=${1:?}; mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
T0=$SECONDS
bench/gpu_build.sh "$PWD" /tmp/b20 "$OUT/build.log" || exit 1
echo "built $((SECONDS - T0)) s" > "$OUT/progress.txt"
timeout 100 python3 -m pytest -q -n 14 -p no:cacheprovider tests/test_kernels_cuda.py tests/test_kernels_simt.py \
  tests/test_int8_kernels_simt.py tests/test_simt_emulator.py -k cuda > "$OUT/tests.log" 2>&1
echo "tests rc=$? $((SECONDS - T0)) s" >> "$OUT/progress.txt"
SPARSEGEMM_TMA=1 timeout 25 python3 bench/large_m_timing.py > "$OUT/large_m_tma.txt" 2>&1
SPARSEGEMM_TMA=wide timeout 25 python3 bench/large_m_timing.py > "$OUT/large_m_tma_wide.txt" 2>&1
echo "timing $((SECONDS - T0)) s" >> "$OUT/progress.txt"
