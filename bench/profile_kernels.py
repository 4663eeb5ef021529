"""One call each of the decode and large-M sparse GEMMs (fp16) and the compress kernel, for Nsight
Compute:  ncu --section SpeedOfLight --section MemoryWorkloadAnalysis --section WarpStateStats \
              --section Occupancy python bench/profile_kernels.py
(on Hopper the large-M GEMM takes its TMA pipeline; SPARSEGEMM_TMA=0 in the environment the cp.async
one, SPARSEGEMM_TMA=1 the TMA pipelines of both).
"""
import torch

import sparsegemm


def main() -> None:
    torch.manual_seed(0)
    for m, n, k in ((1, 8192, 8192), (4096, 4096, 4096)):
        w = torch.randn(n, k, device="cuda").half()
        sw = sparsegemm.compress(w, prune=True)
        x = torch.randn(m, k, device="cuda").half()
        sparsegemm.linear(x, sw)
    torch.cuda.synchronize()


if __name__ == "__main__":
    main()
