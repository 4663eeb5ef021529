"""Tuning aid for gemm_heuristics.h: decode-GEMM time (CUDA-graph replay, launch cost excluded)
for forced split-K factors, fp16 and int8, next to what the heuristic picks (split 0).

    python bench/splitk_sweep.py
"""
import torch

import sparsegemm
from sparsegemm import _C, quant
from sparsegemm import format as fmt

from graph_timing import graph_ms

DECODE = 1


def main() -> None:
    torch.manual_seed(0)
    stream = lambda: torch.cuda.current_stream().cuda_stream  # noqa: E731
    for n, k in [(4096, 4096), (11008, 4096), (4096, 11008), (8192, 8192)]:
        for m in (1, 16):
            w = sparsegemm.prune_2to4(torch.randn(n, k, device="cuda").half())
            x = torch.randn(m, k, device="cuda").half()
            sw, sw8 = sparsegemm.compress(w), quant.quantize_weight(w)
            meta, meta8 = sw.kernel_meta("cuda"), sw8.kernel_meta("cuda")
            x_q, x_scale = quant.quantize_activations(x)
            y = torch.empty(m, n, device="cuda", dtype=torch.float16)
            row = []
            for split in (0, 1, 2, 4, 6, 8, 12, 16):
                ws = torch.empty(max(16, _C.cuda_gemm_workspace_bytes(m, n, k, DECODE, split)), dtype=torch.uint8,
                                 device="cuda")
                ws8 = torch.empty(max(16, _C.cuda_gemm_s8_workspace_bytes(m, n, k, DECODE, split)), dtype=torch.uint8,
                                  device="cuda")
                t16 = graph_ms(lambda: _C.cuda_gemm(m, n, k, x.data_ptr(), k, sw.values.data_ptr(), meta.data_ptr(), 0,
                                                    y.data_ptr(), n, fmt.DTYPE_CODES[torch.float16], 0, ws.data_ptr(),
                                                    DECODE, split, stream()))
                t8 = graph_ms(lambda: _C.cuda_gemm_s8(m, n, k, x_q.data_ptr(), k, sw8.values.data_ptr(),
                                                      meta8.data_ptr(), sw8.scale.data_ptr(), x_scale.data_ptr(), 0,
                                                      y.data_ptr(), n, 1, 0, ws8.data_ptr(), DECODE, split, stream()))
                row.append(f"s{split}: {t16 * 1e3:.1f}/{t8 * 1e3:.1f}")
            print(f"M={m} N={n} K={k} (fp16/int8 us): " + "  ".join(row), flush=True)


if __name__ == "__main__":
    main()
