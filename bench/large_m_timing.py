"""Large-M GEMM time (the compute-bound tiles) of whichever sparsegemm is on the path, next to dense
F.linear (and torch._int_mm for INT8): fp16, bf16 and INT8 (dynamic activation quantization
included) at M = N = K = 8192 and Llama-7B's MLP projections at 16 x 2048 tokens (or the shapes
--shape gives), by sparsegemm.bench.Timer (CUDA events, median of 20 calls after warm-up). Public
API only, so that bench/ab_sweep.sh can run it against the build of an earlier tree too; on
Hopper, the wgmma tile with its stages copied by TMA (config 3), or with SPARSEGEMM_TMA=0 in the
environment by cp.async (config 2), with SPARSEGEMM_TMA=wide the 256-row TMA variant (config 5);
SPARSEGEMM_WGMMA=0 times the warp-level tile instead. The label says what the setting means to this
tree (in builds before 2026-11-27, which ab_sweep.sh may time, unset meant config 2).

    python bench/large_m_timing.py [--shape M N K [--shape M N K ...]]
"""
import argparse
import os

import torch

import sparsegemm
from sparsegemm import _C, quant
from sparsegemm.bench import Timer

SHAPES = [[8192, 8192, 8192], [32768, 11008, 4096], [32768, 4096, 11008]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", type=int, nargs=3, action="append", metavar=("M", "N", "K"),
                        help=f"repeatable; default {SHAPES}")
    shapes = parser.parse_args().shape or SHAPES
    torch.manual_seed(0)
    tile = "warp-level mma.sp"
    if _C.cuda_large_m_uses_wgmma():
        tile = {"0": "wgmma, cp.async", "wide": "wgmma 256 rows, TMA"}.get(os.environ.get("SPARSEGEMM_TMA"),
                                                                           "wgmma, TMA")
    median_ms = Timer(torch.device("cuda"), warmup=3, repeats=20)
    for m, n, k in shapes:
        w = sparsegemm.prune_2to4(torch.randn(n, k, device="cuda").half())
        x = torch.randn(m, k, device="cuda").half()
        sw8 = quant.quantize_weight(w)
        flops = 2 * m * n * k
        parts = []
        for dtype in (torch.float16, torch.bfloat16):
            w_t, x_t = w.to(dtype), x.to(dtype)
            sw = sparsegemm.compress(w_t)
            dense = median_ms(lambda: torch.nn.functional.linear(x_t, w_t))
            sparse = median_ms(lambda: sparsegemm.linear(x_t, sw))
            parts.append(f"dense {str(dtype)[6:]} {dense:.3f} ms ({flops / dense / 1e9:.0f} TFLOP/s) | "
                         f"2:4 {str(dtype)[6:]} {sparse:.3f} ms ({dense / sparse:.2f}x)")
            if dtype == torch.float16:
                # Dense INT8 as issue 4 compares: torch._int_mm on int8 operands already quantized
                # (int32 out, no epilogue), against the 2:4 INT8 layer with its activation quantize.
                # The weight [N, K] as a transposed view, the operand order cuBLASLt's int8 GEMM wants.
                x8 = torch.randint(-127, 128, (m, k), device="cuda", dtype=torch.int8)
                w8 = torch.randint(-127, 128, (n, k), device="cuda", dtype=torch.int8)
                dense_int8 = median_ms(lambda: torch._int_mm(x8, w8.T))
                int8 = median_ms(lambda: quant.linear_int8(x, sw8))
                parts.append(f"2:4 INT8 {int8:.3f} ms ({dense / int8:.2f}x dense fp16, "
                             f"{dense_int8 / int8:.2f}x torch._int_mm {dense_int8:.3f} ms)")
        print(f"large M {m} x {n} x {k} ({tile} tile): " + " | ".join(parts), flush=True)


if __name__ == "__main__":
    main()
