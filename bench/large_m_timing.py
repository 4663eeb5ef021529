"""Large-M GEMM time (the compute-bound LargeM tile) of whichever sparsegemm is on the path, next
to dense F.linear: fp16 and INT8 at M = N = K = 8192 (and what --shape gives), by
sparsegemm.bench.Timer (CUDA events, median of 20 calls after warm-up). Public API only, so that
bench/ab_sweep.sh can run it against the build of an earlier tree too.

    python bench/large_m_timing.py [--shape M N K]
"""
import argparse

import torch

import sparsegemm
from sparsegemm import quant
from sparsegemm.bench import Timer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", type=int, nargs=3, default=[8192, 8192, 8192], metavar=("M", "N", "K"))
    m, n, k = parser.parse_args().shape
    torch.manual_seed(0)
    w = sparsegemm.prune_2to4(torch.randn(n, k, device="cuda").half())
    x = torch.randn(m, k, device="cuda").half()
    sw, sw8 = sparsegemm.compress(w), quant.quantize_weight(w)
    flops = 2 * m * n * k
    median_ms = Timer(torch.device("cuda"), warmup=3, repeats=20)
    dense = median_ms(lambda: torch.nn.functional.linear(x, w))
    sparse = median_ms(lambda: sparsegemm.linear(x, sw))
    int8 = median_ms(lambda: quant.linear_int8(x, sw8))
    print(f"large M {m} x {n} x {k}: dense fp16 {dense:.3f} ms ({flops / dense / 1e9:.0f} TFLOP/s) | "
          f"2:4 fp16 {sparse:.3f} ms ({dense / sparse:.2f}x) | 2:4 INT8 {int8:.3f} ms ({dense / int8:.2f}x)",
          flush=True)


if __name__ == "__main__":
    main()
