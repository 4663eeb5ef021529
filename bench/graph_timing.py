"""Decode-regime timing without Python overhead: each method captured 50 times in a CUDA graph and
replayed (warm L2 across the replays of one graph: an upper bound on speed, the launch cost
excluded). The host time of an eager call is bench/host_overhead.py's.

    python bench/graph_timing.py
"""
import torch

import sparsegemm
from sparsegemm import quant
from sparsegemm.bench import cuda_graphed


def graph_ms(fns, reps: int = 50) -> float:
    """Milliseconds per call of ``fns`` (a callable, or a list of callables taken in turn: e.g. the
    same GEMM on copies of the weight that together exceed the L2, so each call reads DRAM), from
    ``reps`` calls captured in one CUDA graph and replayed (best of three replays)."""
    fns = fns if isinstance(fns, (list, tuple)) else [fns]

    def calls():
        for i in range(reps):
            fns[i % len(fns)]()

    replay = cuda_graphed(calls)
    replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    best = float("inf")
    for _ in range(3):
        start.record()
        replay()
        end.record()
        end.synchronize()
        best = min(best, start.elapsed_time(end) / reps)
    return best


def main() -> None:
    torch.manual_seed(0)
    for n, k in [(4096, 4096), (11008, 4096), (4096, 11008), (14336, 4096), (8192, 8192)]:
        for m in (1, 4, 16):
            w = sparsegemm.prune_2to4(torch.randn(n, k, device="cuda").half())
            x = torch.randn(m, k, device="cuda").half()
            sw, sw8 = sparsegemm.compress(w), quant.quantize_weight(w)
            td = graph_ms(lambda: torch.nn.functional.linear(x, w))
            ts = graph_ms(lambda: sparsegemm.linear(x, sw))
            t8 = graph_ms(lambda: sparsegemm.linear(x, sw8))
            io = (m * k + m * n) * 2
            print(f"M={m} N={n} K={k}: dense {td * 1e3:.1f} us ({(2 * n * k + io) / td / 1e6:.0f} GB/s) | "
                  f"fp16 2:4 {ts * 1e3:.1f} us ({(sw.nbytes + io) / ts / 1e6:.0f} GB/s, {td / ts:.2f}x) | "
                  f"int8 2:4 {t8 * 1e3:.1f} us ({(sw8.nbytes + io) / t8 / 1e6:.0f} GB/s, {td / t8:.2f}x)", flush=True)


if __name__ == "__main__":
    main()
