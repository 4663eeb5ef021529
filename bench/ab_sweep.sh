#!/usr/bin/env bash
# A/B of the decode kernels on one GPU: this tree against BASE_TREE (another source tree of the
# package, e.g. made before the device call with `git worktree add .ab/base <rev>`), each built for
# the present GPU only and timed by its own bench/decode_sweep.py, one after the other on the same
# machine (timings of different machines do not compare). Writes OUTDIR/sweep_{base,this}.txt.
#   Usage: bench/ab_sweep.sh BASE_TREE OUTDIR
set -euo pipefail
BASE=$(cd "${1:?usage: bench/ab_sweep.sh BASE_TREE OUTDIR}" && pwd)
mkdir -p "${2:?usage: bench/ab_sweep.sh BASE_TREE OUTDIR}"
OUT=$(cd "$2" && pwd)
PY=${PYTHON:-python3}
THIS=$(cd "$(dirname "$0")/.." && pwd)
ARCH=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader | head -1 | tr -d ' .')

build() {  # tree build-dir: the extension lands in tree/sparsegemm
  cmake -S "$1" -B "$2" -GNinja -DCMAKE_BUILD_TYPE=Release -DPython_EXECUTABLE="$(command -v "$PY")" \
    -Dpybind11_DIR="$("$PY" -m pybind11 --cmakedir)" -DSPARSEGEMM_CUDA=ON -DSPARSEGEMM_CUDA_ARCHS="$ARCH" \
    -DCMAKE_LIBRARY_OUTPUT_DIRECTORY="$1/sparsegemm" > "$2.log" 2>&1
  cmake --build "$2" >> "$2.log" 2>&1 || { tail -30 "$2.log"; return 1; }
}
# One build directory per base tree: CMake refuses a cache made for another source directory.
BASE_BUILD=/tmp/ab_base_$(printf %s "$BASE" | md5sum | cut -c1-8)
build "$BASE" "$BASE_BUILD" & base_build=$!
build "$THIS" /tmp/ab_this
wait "$base_build"
for side in base this; do
  tree=$BASE; [ "$side" = this ] && tree=$THIS
  (cd "$tree" && PYTHONPATH="$tree" "$PY" bench/decode_sweep.py > "$OUT/sweep_$side.txt" 2>&1)
  # Large M through the public API, with this tree's script against either build.
  (cd "$tree" && PYTHONPATH="$tree" "$PY" "$THIS/bench/large_m_timing.py" >> "$OUT/sweep_$side.txt" 2>&1)
done
# Side by side, us at the heuristic's split: shape, base fp16, base INT8, this fp16, this INT8.
paste <(grep -o "^M=[^:]*\|heuristic [0-9.]*us" "$OUT/sweep_base.txt" | paste - - - ) \
      <(grep -o "heuristic [0-9.]*us" "$OUT/sweep_this.txt" | paste - - ) | sed 's/heuristic //g'
grep -h "^large M" "$OUT/sweep_base.txt" "$OUT/sweep_this.txt"
