#!/usr/bin/env bash
# A/B of the decode and large-M GEMMs on one GPU: this tree against BASE_TREE (another source tree
# of the package, e.g. made before the device call with `git worktree add .ab/base <rev>`), each
# built for the present GPU only (bench/gpu_build.sh) and timed by its own bench/decode_sweep.py and
# this tree's bench/large_m_timing.py, one after the other on the same machine (timings of different
# machines do not compare). Writes OUTDIR/sweep_{base,this}.txt.
#   Usage: bench/ab_sweep.sh BASE_TREE OUTDIR
set -euo pipefail
BASE=$(cd "${1:?usage: bench/ab_sweep.sh BASE_TREE OUTDIR}" && pwd)
mkdir -p "${2:?usage: bench/ab_sweep.sh BASE_TREE OUTDIR}"
OUT=$(cd "$2" && pwd)
PY=${PYTHON:-python3}
THIS=$(cd "$(dirname "$0")/.." && pwd)

# One build directory per base tree: CMake refuses a cache made for another source directory.
BASE_BUILD=/tmp/ab_base_$(printf %s "$BASE" | md5sum | cut -c1-8)
"$THIS/bench/gpu_build.sh" "$BASE" "$BASE_BUILD" "$BASE_BUILD.log" & base_build=$!
"$THIS/bench/gpu_build.sh" "$THIS" /tmp/ab_this /tmp/ab_this.log
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
