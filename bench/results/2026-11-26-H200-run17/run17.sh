#!/usr/bin/env bash
# A/B of the wgmma large-M tile: v0 = 17269b3 (plain block order, wgmma ops retired each stage), v1 = raster
# bands, v2 = raster + one stage's wgmma ops in flight (working tree). Builds in parallel, GPU kernel tests
# of v2, large-M timings, decode sweep, sanitizers, ncu of v2's wgmma tile, then the full suite on v2.
# Its build and env.json steps, inline when it ran, now call bench/gpu_build.sh and bench/gpu_env.py (the same commands).
set -u
S=/tmp/suite; mkdir -p "$S"
T0=$(date +%s)
pack() { tar czf "$OUT/suite.tgz" -C "$S" . ; }
log() { echo "$(( $(date +%s) - T0 ))s $*" | tee -a "$S/progress.txt"; }
lim() { local l=$(( 400 - ($(date +%s) - T0) )); (( $1 < l )) && echo "$1" || echo "$(( l > 1 ? l : 1 ))"; }
export PYTHONUNBUFFERED=1
PY=python3
ROOT=$PWD
build() {  # tree name
  bench/gpu_build.sh "$1" "/tmp/b_$2" "$S/build_$2.log" > /dev/null && echo "$2 built" || echo "$2 BUILD FAILED"
}
build "$ROOT/.ab/v0" v0 & build "$ROOT/.ab/v1" v1 & build "$ROOT" v2 & wait
log "builds done"; grep -i "performance loss" "$S"/build_v*.log | head -5
PYTHONPATH=$ROOT $PY bench/gpu_env.py "$S/env.json"
export PYTHONPATH=$ROOT
timeout 90 $PY -m pytest -q -n 15 tests/test_kernels_cuda.py tests/test_kernels_simt.py tests/test_int8_kernels_simt.py \
  tests/test_conv_kernels.py -k "cuda or raster" > "$S/tests_kernels.log" 2>&1; log "v2 kernel tests rc=$?"
grep -E "^(FAILED|ERROR)" "$S/tests_kernels.log" | head -20; tail -2 "$S/tests_kernels.log"; pack
for v in v0 v1 v2; do
  d=$ROOT/.ab/$v; [[ $v == v2 ]] && d=$ROOT
  PYTHONPATH=$d timeout 60 $PY bench/large_m_timing.py > "$S/large_m_$v.txt" 2>&1; log "large_m $v rc=$?"; cat "$S/large_m_$v.txt"
done
for v in v0 v2; do
  d=$ROOT/.ab/$v; [[ $v == v2 ]] && d=$ROOT
  SPARSEGEMM_WGMMA=0 PYTHONPATH=$d timeout 60 $PY bench/large_m_timing.py > "$S/large_m_mma_$v.txt" 2>&1; log "large_m_mma $v rc=$?"; cat "$S/large_m_mma_$v.txt"
done
pack
timeout "$(lim 45)" $PY bench/decode_sweep.py > "$S/sweep.txt" 2>&1; log "sweep rc=$?"; grep -E "^M=" "$S/sweep.txt" | cut -c1-110; pack
for tool in memcheck racecheck; do
  timeout "$(lim 60)" compute-sanitizer --tool $tool --error-exitcode 1 $PY bench/sanitizer_smoke.py > "$S/sanitizer_$tool.log" 2>&1
  log "$tool rc=$?"; tail -1 "$S/sanitizer_$tool.log"; pack
done
cat > /tmp/one.py <<'PYEOF'
import torch, sparsegemm
torch.manual_seed(0)
w = sparsegemm.prune_2to4(torch.randn(8192, 8192, device="cuda").half())
sw = sparsegemm.compress(w)
x = torch.randn(8192, 8192, device="cuda").half()
for _ in range(3): sparsegemm.linear(x, sw)
torch.cuda.synchronize()
PYEOF
timeout "$(lim 90)" ncu --kernel-name regex:gemm_sp_kernel --launch-skip 2 --launch-count 1 --section SpeedOfLight \
  --section ComputeWorkloadAnalysis --section MemoryWorkloadAnalysis --section WarpStateStats --section Occupancy \
  --section LaunchStats $PY /tmp/one.py > "$S/ncu_wgmma.txt" 2>&1; log "ncu rc=$?"; pack
timeout "$(lim 200)" $PY -m pytest -q -n 15 tests --junitxml="$S/tests.xml" > "$S/tests.log" 2>&1; log "tests rc=$?"
grep -E "^(FAILED|ERROR)" "$S/tests.log" | head -20; tail -2 "$S/tests.log"; pack
grep -E "Duration|Throughput|Pipe|Bank|Stall|Warp Cycles|Achieved Occ|Registers|Shared Memory Config|Block Limit" "$S/ncu_wgmma.txt" | head -40
