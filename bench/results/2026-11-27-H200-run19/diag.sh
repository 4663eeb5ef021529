#!/usr/bin/env bash
# run19: the TMA diagnostics after run18's failures (diag_tma.py), each list in its own process,
# in parallel; then compute-sanitizer on the first faulting case of each kind. Usage (repo root):
#   bash bench/results/2026-11-27-H200-run19/diag.sh OUT
OUT=${1:?}; mkdir -p "$OUT"; D=bench/results/2026-11-27-H200-run19
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
T0=$SECONDS
bench/gpu_build.sh "$PWD" /tmp/b19 "$OUT/build.log" || exit 1
echo "built $((SECONDS - T0)) s" > "$OUT/diag.txt"
for a in "box 0" "box 32" "box 64" "box 128" "gemm 3" "gemm 5" "s8 5" "s8 3"; do
  (timeout 50 python3 $D/diag_tma.py $a > "$OUT/d_${a/ /_}.txt" 2>&1; echo "rc=$?" >> "$OUT/d_${a/ /_}.txt") &
done
wait
for f in "$OUT"/d_*.txt; do echo "== $f"; grep -v "^ *$" "$f" | grep -vE "^\s+(File|\^|~)" | tail -25; done >> "$OUT/diag.txt"
echo "diag done $((SECONDS - T0)) s" >> "$OUT/diag.txt"
timeout 30 compute-sanitizer --tool memcheck --show-backtrace device python3 $D/diag_tma.py box 0 > "$OUT/san_box.txt" 2>&1
timeout 40 compute-sanitizer --tool memcheck --show-backtrace device python3 $D/diag_tma.py s8 5 > "$OUT/san_s8.txt" 2>&1
echo "sanitizers done $((SECONDS - T0)) s" >> "$OUT/diag.txt"
