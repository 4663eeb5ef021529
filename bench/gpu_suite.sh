#!/usr/bin/env bash
# One GPU check (DESIGN.md "Verification on a GPU"): build for the present GPU only, GPU tests,
# compute-sanitizer memcheck + racecheck on small cases, the benchmark, the graph-replay sweep and the
# eager host time; everything lands in OUTDIR (env.json, junit XML, sanitizer logs,
# bench.json/.csv/.md/.png, sweep.txt, host_overhead.txt, large_m.txt). Usage: bench/gpu_suite.sh OUTDIR
# PYTHON (default: python3) must have a CUDA torch, pybind11, pytest; nvcc and compute-sanitizer on PATH.
# Knobs: BENCH_ARGS, PYTEST_WORKERS, TESTS_TIMEOUT / BENCH_TIMEOUT / SANITIZER_TIMEOUT / SWEEP_TIMEOUT (seconds).
set -euo pipefail
OUT=${1:?usage: bench/gpu_suite.sh OUTDIR}
PY=${PYTHON:-python3}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
cd "$ROOT"
# Scripts under bench/ (run by compute-sanitizer) import the package built into the source tree.
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"

ARCH=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader | head -1 | tr -d ' .')
BUILD=${BUILD_DIR:-/tmp/sparsegemm_gpu_build}
cmake -S . -B "$BUILD" -GNinja -DCMAKE_BUILD_TYPE=Release -DPython_EXECUTABLE="$(command -v "$PY")" \
  -Dpybind11_DIR="$("$PY" -m pybind11 --cmakedir)" -DSPARSEGEMM_CUDA=ON -DSPARSEGEMM_CUDA_ARCHS="$ARCH" \
  -DSPARSEGEMM_PTXAS_VERBOSE=ON -DCMAKE_LIBRARY_OUTPUT_DIRECTORY="$ROOT/sparsegemm" > "$OUT/cmake.log"
cmake --build "$BUILD" > "$OUT/build.log" 2>&1

"$PY" - "$OUT/env.json" <<'PYEOF'
import json, subprocess, sys, torch
from sparsegemm import _C
q = "name,driver_version,clocks.sm,clocks.max.sm,clocks.mem,clocks.max.mem,power.limit"
smi = subprocess.run(["nvidia-smi", f"--query-gpu={q}", "--format=csv,noheader"], capture_output=True, text=True)
env = {"nvidia_smi": dict(zip(q.split(","), [v.strip() for v in smi.stdout.splitlines()[0].split(",")])),
       "torch": torch.__version__, "torch_cuda": torch.version.cuda, "sparsegemm": _C.build_info(),
       "gpus": _C.list_gpus()}
json.dump(env, open(sys.argv[1], "w"), indent=1)
PYEOF

status=0
# The whole suite: on a GPU the cuda backends run beside the CPU and emulator ones.
XDIST=$("$PY" -c 'import xdist' 2>/dev/null && echo "-n ${PYTEST_WORKERS:-8}" || true)
# Every step after the build has a time limit: a hung step must not eat a short device lease (a
# killed one fails the suite and leaves what it wrote).
# shellcheck disable=SC2086
timeout "${TESTS_TIMEOUT:-600}" "$PY" -m pytest -q $XDIST tests --junitxml="$OUT/tests.xml" > "$OUT/tests.log" 2>&1 \
  || status=1
# BENCH_ARGS narrows the sweep when device time is short (e.g. "--shapes square-8192 --m 1 16 8192").
# shellcheck disable=SC2086
timeout "${BENCH_TIMEOUT:-900}" "$PY" -m sparsegemm bench --device cuda --dtype float16 bfloat16 int8 --no-progress \
  --json "$OUT/bench.json" --csv "$OUT/bench.csv" --plot "$OUT/bench.png" ${BENCH_ARGS:-} > "$OUT/bench.md" 2>&1 \
  || status=1
for tool in memcheck racecheck; do
  timeout "${SANITIZER_TIMEOUT:-240}" compute-sanitizer --tool "$tool" --error-exitcode 1 "$PY" bench/sanitizer_smoke.py \
    > "$OUT/sanitizer_$tool.log" 2>&1 || status=1
done
# Kernel time without launch cost (decode GEMM per split, compress / decompress; CUDA-graph replay
# from DRAM) and the host time of one eager call: the two halves of a decode layer's time.
timeout "${SWEEP_TIMEOUT:-120}" "$PY" bench/decode_sweep.py > "$OUT/sweep.txt" 2>&1 || status=1
timeout "${SWEEP_TIMEOUT:-120}" "$PY" bench/host_overhead.py > "$OUT/host_overhead.txt" 2>&1 || status=1
# Large M against cuBLAS: the tile the heuristic takes (wgmma on Hopper), then the warp-level one.
for wgmma in 1 0; do
  SPARSEGEMM_WGMMA=$wgmma timeout "${SWEEP_TIMEOUT:-120}" "$PY" bench/large_m_timing.py >> "$OUT/large_m.txt" 2>&1 \
    || status=1
done
tail -n 3 "$OUT/tests.log" "$OUT"/sanitizer_*.log
exit $status
