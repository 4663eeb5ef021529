"""CPU sparse GEMM kernel (sparsegemm._C.cpu_gemm, called directly: the C++ kernel at every M,
without ops.py's large-M routing) against torch's dense F.linear on the pruned weight.

Same dtype, same thread count for both (torch.set_num_threads and cpu_set_num_threads). Times are
the median of many calls after warm-up, sparse and dense calls alternating, each after a flush of
the last-level cache; "GB/s" counts the bytes each call must read (weight, X)
and write (Y), so the M = 1 rows show how close each side gets to memory bandwidth.

    python bench/bench_cpu.py                      # default sweep, bf16, all threads
    python bench/bench_cpu.py --dtype f16 --m 1 16 --isa avx2 --threads 1
"""
import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F

import sparsegemm
from sparsegemm import _C
from sparsegemm.__main__ import _positive
from sparsegemm.bench import CacheFlush

DTYPE_CODES = {"f32": (0, torch.float32), "f16": (1, torch.float16), "bf16": (2, torch.bfloat16)}


def median_seconds(fns, min_time=1.0, min_reps=10):
    """Median seconds per call of each function, timed in alternation so that load from other
    processes on a shared machine hits all of them alike, each call after a flush of the
    last-level cache (sparsegemm.bench.CacheFlush): no call finds its weight cached."""
    flush = CacheFlush(torch.device("cpu"))
    for fn in fns:
        for _ in range(3):
            fn()
    samples = [[] for _ in fns]
    start = time.perf_counter()
    while len(samples[0]) < min_reps or time.perf_counter() - start < min_time * len(fns):
        for fn, times in zip(fns, samples):
            flush()
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return [statistics.median(times) for times in samples]


def bench_shape(M, N, K, dtype_name, min_time):
    code, tdtype = DTYPE_CODES[dtype_name]
    gen = torch.Generator().manual_seed(0)
    w_dense = torch.randn(N, K, generator=gen).to(tdtype)
    sw = sparsegemm.compress(w_dense, prune=True)
    values, meta = sw.values, sw.meta
    w_pruned = sparsegemm.decompress(sw)
    x = torch.randn(M, K, generator=gen).to(tdtype)
    y = torch.empty(M, N, dtype=tdtype)

    def sparse():
        _C.cpu_gemm(M, N, K, x.data_ptr(), x.stride(0), values.data_ptr(), meta.data_ptr(), 0, y.data_ptr(),
                    y.stride(0), code, 0, 0, 0)

    def dense():
        F.linear(x, w_pruned)

    sparse()
    ref = F.linear(x.float(), w_pruned.float())
    rel_err = ((y.float() - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()

    t_sparse, t_dense = median_seconds([sparse, dense], min_time)
    elem = w_dense.element_size()
    io_bytes = M * K * elem + M * N * elem
    sparse_bytes = values.numel() * elem + meta.numel() + io_bytes
    dense_bytes = N * K * elem + io_bytes
    flops = 2.0 * M * N * K  # dense-equivalent
    return {
        "M": M, "N": N, "K": K, "dtype": dtype_name,
        "sparse_ms": t_sparse * 1e3, "dense_ms": t_dense * 1e3, "speedup": t_dense / t_sparse,
        "sparse_GBps": sparse_bytes / t_sparse / 1e9, "dense_GBps": dense_bytes / t_dense / 1e9,
        "sparse_GFLOPs": flops / t_sparse / 1e9, "dense_GFLOPs": flops / t_dense / 1e9,
        "max_rel_err": rel_err,
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtype", choices=DTYPE_CODES, default="bf16")
    parser.add_argument("--m", type=_positive, nargs="+", default=[1, 16, 128, 512])
    parser.add_argument("--n", type=_positive, default=4096)
    parser.add_argument("--k", type=_positive, default=4096)
    parser.add_argument("--threads", type=_positive, default=torch.get_num_threads())
    parser.add_argument("--isa", choices=["generic", "avx2", "avx512"], help="force the CPU ISA (default: best)")
    parser.add_argument("--min-time", type=float, default=1.0, help="seconds of timed calls per measurement")
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    _C.cpu_set_num_threads(args.threads)
    if args.isa:
        _C.cpu_set_isa(args.isa)
    header = {"isa": _C.cpu_isa_name(), "threads": args.threads, "torch": torch.__version__,
              "torch_cpu_capability": torch.backends.cpu.get_cpu_capability()}
    print(json.dumps(header))
    print(f"{'M':>5} {'N':>6} {'K':>6} {'dtype':>5} | {'sparse ms':>10} {'dense ms':>10} {'speedup':>8} | "
          f"{'sp GB/s':>8} {'dn GB/s':>8} | {'sp GFLOP/s':>10} {'dn GFLOP/s':>10} | rel err")
    rows = []
    for M in args.m:
        r = bench_shape(M, args.n, args.k, args.dtype, args.min_time)
        rows.append(r)
        print(f"{M:>5} {r['N']:>6} {r['K']:>6} {r['dtype']:>5} | {r['sparse_ms']:>10.3f} {r['dense_ms']:>10.3f} "
              f"{r['speedup']:>7.2f}x | {r['sparse_GBps']:>8.1f} {r['dense_GBps']:>8.1f} | "
              f"{r['sparse_GFLOPs']:>10.1f} {r['dense_GFLOPs']:>10.1f} | {r['max_rel_err']:.1e}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({**header, "results": rows}, f, indent=2)


if __name__ == "__main__":
    main()
