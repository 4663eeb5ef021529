#!/usr/bin/env bash
# Session 7 GPU check: build, wgmma instruction self-test, large-M tiles (wgmma vs warp-level) against cuBLAS,
# full tests, sanitizers, decode sweep, host overhead, a narrow benchmark. Packed after every step.
# Its build and env.json steps, inline when it ran, now call bench/gpu_build.sh and bench/gpu_env.py (the same commands).
set -u
S=/tmp/suite; mkdir -p "$S"
T0=$(date +%s)
pack() { tar czf "$OUT/suite.tgz" -C "$S" . ; }
log() { echo "$(( $(date +%s) - T0 ))s $*" | tee -a "$S/progress.txt"; }
left() { echo $(( 470 - ($(date +%s) - T0) )); }
lim() { local l; l=$(left); (( $1 < l )) && echo "$1" || echo "$l"; }
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
PY=python3
log "nproc $(nproc) $(git rev-parse --short HEAD 2>/dev/null)"
bench/gpu_build.sh . /tmp/b "$S/build.log" || { log "BUILD FAILED"; pack; exit 1; }
log "built"
$PY bench/gpu_env.py "$S/env.json"
timeout 60 $PY -m pytest -q tests/test_kernels_cuda.py -k "wgmma" > "$S/tests_wgmma.log" 2>&1; log "wgmma tests rc=$?"; tail -25 "$S/tests_wgmma.log"; pack
timeout 60 $PY bench/large_m_timing.py > "$S/large_m.txt" 2>&1; log "large_m rc=$?"; cat "$S/large_m.txt"; pack
SPARSEGEMM_WGMMA=0 timeout 60 $PY bench/large_m_timing.py > "$S/large_m_mma.txt" 2>&1; log "large_m_mma rc=$?"; cat "$S/large_m_mma.txt"; pack
timeout "$(lim 190)" $PY -m pytest -q -n 15 tests --junitxml="$S/tests.xml" > "$S/tests.log" 2>&1; log "tests rc=$?"
grep -E "^(FAILED|ERROR)" "$S/tests.log" | head -30; tail -3 "$S/tests.log"; pack
for tool in memcheck racecheck; do
  timeout "$(lim 60)" compute-sanitizer --tool $tool --error-exitcode 1 $PY bench/sanitizer_smoke.py > "$S/sanitizer_$tool.log" 2>&1
  log "$tool rc=$?"; tail -2 "$S/sanitizer_$tool.log"; pack
done
timeout "$(lim 45)" $PY bench/decode_sweep.py > "$S/sweep.txt" 2>&1; log "sweep rc=$?"; pack
timeout "$(lim 30)" $PY bench/host_overhead.py > "$S/host_overhead.txt" 2>&1; log "host rc=$?"; pack
timeout "$(lim 60)" $PY -m sparsegemm bench --device cuda --dtype float16 bfloat16 int8 --no-progress --json "$S/bench.json" \
  --csv "$S/bench.csv" --plot "$S/bench.png" --shapes square-8192 llama2-7b.down llama2-7b.gate_up --m 1 16 8192 > "$S/bench.md" 2>&1
log "bench rc=$?"; pack
grep -E "^M=" "$S/sweep.txt" | head -30; cat "$S/host_overhead.txt" | tail -8
