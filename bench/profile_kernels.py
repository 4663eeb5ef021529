"""One call each of the decode and large-M sparse GEMMs (fp16) and the compress kernel, for Nsight
Compute:  ncu --section SpeedOfLight --section MemoryWorkloadAnalysis --section WarpStateStats \
              --section Occupancy python bench/profile_kernels.py
(on Hopper the large-M GEMM takes its TMA pipeline; SPARSEGEMM_TMA=0 in the environment the cp.async
one, SPARSEGEMM_TMA=1 the TMA pipelines of both).

--mid-m instead profiles the tiles at 64 x 4096 x 4096 (batched decode), each forced: the decode
tile, the mid-M tile (config 7) and config 3 and config 6 split 4 ways, each where the GPU runs it.
Why: on the H200 (bench/results/2026-11-27-H200-run22/mid_m.txt) config 3 took 43.8 us there for
64 blocks of 64 k-tiles, and config 6 no less with 4x the blocks and a quarter of the k-tiles
each (40-58 us at 16 to 64 rows), so its time is not its k-tiles' latency; the profile should say
what it is.
"""
import argparse

import torch

import sparsegemm
from sparsegemm import _C, ops
from sparsegemm import format as fmt

from decode_sweep import _scratch, config_runs


def mid_m_calls() -> None:
    m, n, k = 64, 4096, 4096
    w = sparsegemm.compress(torch.randn(n, k, device="cuda").half(), prune=True)
    meta = w.kernel_meta("cuda")
    x = torch.randn(m, k, device="cuda").half()
    y = torch.empty(m, n, device="cuda", dtype=torch.float16)
    forced = [(1, 0), (7, 0), (3, 0), (6, 4)]
    for config, split in [(c, s) for c, s in forced if config_runs(_C.cuda_gemm_scratch, c)]:
        workspace, counters = _scratch(_C.cuda_gemm_scratch, m, n, k, config, split)
        _C.cuda_gemm(m, n, k, x.data_ptr(), k, w.values.data_ptr(), meta.data_ptr(), 0, y.data_ptr(), n,
                     fmt.DTYPE_CODES[torch.float16], 0, workspace.data_ptr(), counters.data_ptr(), config, split,
                     ops._stream(x))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mid-m", action="store_true", help="the mid-size M tiles instead (see above)")
    args = parser.parse_args()
    torch.manual_seed(0)
    if args.mid_m:
        mid_m_calls()
    else:
        for m, n, k in ((1, 8192, 8192), (4096, 4096, 4096)):
            w = torch.randn(n, k, device="cuda").half()
            sw = sparsegemm.compress(w, prune=True)
            x = torch.randn(m, k, device="cuda").half()
            sparsegemm.linear(x, sw)
    torch.cuda.synchronize()


if __name__ == "__main__":
    main()
