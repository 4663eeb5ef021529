"""Sparse GEMM on the GPU vs dense torch.matmul (cuBLAS) and PyTorch's own 2:4 path
(to_sparse_semi_structured: cuSPARSELt and CUTLASS). CUDA events, warm-up, L2 flushed before
every timed call, median of --iters. Writes JSON (one record per shape/dtype/backend).
INT8 (dtype "s8"): our quantize + s8 GEMM (and the GEMM alone) vs dense torch._int_mm and
cuSPARSELt's int8 2:4 matmul (torch._cslt_sparse_mm), where this torch/GPU supports them.

    python bench/bench_gemm_cuda.py --out results.json
    python bench/bench_gemm_cuda.py --smoke        # a few small calls, no timing (for sanitizers)
"""
import argparse
import json
import statistics

import torch

from sparsegemm import _C

DTYPES = {"f16": (torch.float16, 1), "bf16": (torch.bfloat16, 2)}
# (M, N, K): decode (M <= 16: bandwidth bound) and prefill (compute bound), LLM-like N and K.
SHAPES = [(1, 4096, 4096), (16, 4096, 4096), (1, 14336, 4096), (1, 4096, 14336),
          (2048, 4096, 4096), (4096, 14336, 4096), (4096, 4096, 14336)]
SMOKE_SHAPES = [(1, 40, 36), (17, 136, 100), (130, 260, 264)]


class SparseGemm:
    """Our kernel with the weight prepared once (compress + metadata reorder), as a layer would."""

    def __init__(self, w, dtype_code):
        n, k = w.shape
        self.n, self.k, self.dtype_code = n, k, dtype_code
        stream = torch.cuda.current_stream().cuda_stream
        kp = (k + 3) // 4 * 4
        self.values = torch.empty((n, kp // 2), dtype=w.dtype, device="cuda")
        meta = torch.empty((n, (kp // 4 + 1) // 2), dtype=torch.uint8, device="cuda")
        bad = torch.empty(1, dtype=torch.int64, device="cuda")
        _C.cuda_compress(n, k, w.data_ptr(), w.stride(0), self.values.data_ptr(), meta.data_ptr(), dtype_code,
                         True, bad.data_ptr(), stream)
        self.logical_meta = meta
        self.meta = torch.empty(_C.cuda_kernel_meta_bytes(n, k), dtype=torch.uint8, device="cuda")
        _C.cuda_reorder_meta(meta.data_ptr(), self.meta.data_ptr(), n, k, stream)

    def __call__(self, x, y, workspace):
        _C.cuda_gemm(x.shape[0], self.n, self.k, x.data_ptr(), x.stride(0), self.values.data_ptr(),
                     self.meta.data_ptr(), 0, y.data_ptr(), y.stride(0), self.dtype_code, 0,
                     workspace.data_ptr(), -1, 0, torch.cuda.current_stream().cuda_stream)


class SparseGemmS8:
    """Our INT8 path with the weight prepared once: Wq int8 2:4 (values, metadata reorder) and
    w_scale; a call quantizes X per token and runs the s8 GEMM into Y (f16)."""

    def __init__(self, wq, w_scale):
        n, k = wq.shape
        self.n, self.k = n, k
        stream = torch.cuda.current_stream().cuda_stream
        groups = wq.view(n, k // 4, 4)
        order = torch.sort(torch.topk(groups.abs().float(), 2, dim=2).indices, dim=2).values
        self.values = torch.gather(groups, 2, order).reshape(n, k // 2).contiguous()
        nib = (order[..., 0] | (order[..., 1] << 2)).to(torch.uint8)
        if nib.shape[1] % 2:  # odd group count: the canonical 0x4 fills the last high nibble
            nib = torch.cat([nib, torch.full((n, 1), 0x4, dtype=torch.uint8, device="cuda")], dim=1)
        meta = (nib[:, 0::2] | (nib[:, 1::2] << 4)).contiguous()
        self.meta = torch.empty(_C.cuda_kernel_meta_bytes_s8(n, k), dtype=torch.uint8, device="cuda")
        _C.cuda_reorder_meta_s8(meta.data_ptr(), self.meta.data_ptr(), n, k, stream)
        self.w_scale = w_scale

    def quantize(self, x, x_q, x_scale):
        _C.cuda_quantize_rows(x.shape[0], self.k, x.data_ptr(), x.stride(0), 1, x_q.data_ptr(), x_scale.data_ptr(),
                              torch.cuda.current_stream().cuda_stream)

    def gemm(self, x_q, x_scale, y, workspace):
        _C.cuda_gemm_s8(x_q.shape[0], self.n, self.k, x_q.data_ptr(), x_q.stride(0), self.values.data_ptr(),
                        self.meta.data_ptr(), self.w_scale.data_ptr(), x_scale.data_ptr(), 0, y.data_ptr(),
                        y.stride(0), 1, 0, workspace.data_ptr(), -1, 0, torch.cuda.current_stream().cuda_stream)


def time_ms(fn, iters, flush):
    for _ in range(3):
        fn()
    times = []
    for _ in range(iters):
        flush.zero_()  # evicts the operands from L2: every timed call starts cold
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def torch_sparse_fn(w, x, backend):
    from torch.sparse import SparseSemiStructuredTensor, to_sparse_semi_structured
    SparseSemiStructuredTensor._FORCE_CUTLASS = backend == "cutlass"
    ws = to_sparse_semi_structured(w)
    return lambda: torch.nn.functional.linear(x, ws)


def run_case(m, n, k, dtype_name, iters, flush):
    dtype, code = DTYPES[dtype_name]
    gen = torch.Generator(device="cuda").manual_seed(0)
    w = torch.randn(n, k, generator=gen, device="cuda").to(dtype)
    x = torch.randn(m, k, generator=gen, device="cuda").to(dtype)
    ours = SparseGemm(w, code)
    y = torch.empty((m, n), dtype=dtype, device="cuda")
    workspace = torch.empty(max(_C.cuda_gemm_workspace_bytes(m, n, k), 4), dtype=torch.uint8, device="cuda")
    w_pruned = torch.empty_like(w)  # the same 2:4 weight for every backend
    _C.cuda_decompress(n, k, ours.values.data_ptr(), ours.logical_meta.data_ptr(), w_pruned.data_ptr(), code,
                       torch.cuda.current_stream().cuda_stream)
    elt = 2
    sparse_bytes = n * k // 2 * elt + n * k // 8 + (m * k + m * n) * elt
    dense_bytes = (n * k + m * k + m * n) * elt
    backends = {"sparsegemm": (lambda: ours(x, y, workspace), sparse_bytes),
                "dense_cublas": (lambda: torch.matmul(x, w_pruned.T), dense_bytes)}
    for backend in ("cusparselt", "cutlass"):
        try:
            backends[f"torch_2to4_{backend}"] = (torch_sparse_fn(w_pruned, x, backend), sparse_bytes)
        except (RuntimeError, NotImplementedError, ImportError) as exc:
            backends[f"torch_2to4_{backend}"] = (exc, sparse_bytes)
    return measure_backends(backends, m, n, k, dtype_name, iters, flush)


def measure_backends(backends, m, n, k, dtype_name, iters, flush, rate="tflops"):
    """backends: {name: (callable or the exception that prevented building it, bytes moved)}.
    One record each: ms, the dense-equivalent rate 2MNK (`rate`: tflops, or tops for int8), GB/s."""
    records = []
    for name, (fn, nbytes) in backends.items():
        rec = {"op": "gemm", "M": m, "N": n, "K": k, "dtype": dtype_name, "backend": name}
        if isinstance(fn, Exception):
            rec["error"] = f"{type(fn).__name__}: {fn}"
        else:
            try:
                ms = time_ms(fn, iters, flush)
                rec.update({"ms": ms, rate: 2 * m * n * k / ms / 1e9, "gbps": nbytes / ms / 1e6})
            except (RuntimeError, NotImplementedError) as exc:  # e.g. an M the torch path refuses
                rec["error"] = f"{type(exc).__name__}: {exc}"
        records.append(rec)
    return records


def run_case_s8(m, n, k, iters, flush):
    gen = torch.Generator(device="cuda").manual_seed(0)
    wq = torch.randint(-127, 128, (n, k // 4, 4), generator=gen, device="cuda", dtype=torch.int32)
    wq[..., 1::2] = 0  # a 2:4 weight: two zeros in every group of four
    wq = wq.to(torch.int8).reshape(n, k)
    w_scale = torch.rand(n, generator=gen, device="cuda") * 1e-2
    x = torch.randn(m, k, generator=gen, device="cuda").to(torch.float16)
    ours = SparseGemmS8(wq, w_scale)
    x_q = torch.empty((m, k), dtype=torch.int8, device="cuda")
    x_scale = torch.empty(m, dtype=torch.float32, device="cuda")
    y = torch.empty((m, n), dtype=torch.float16, device="cuda")
    workspace = torch.empty(max(_C.cuda_gemm_s8_workspace_bytes(m, n, k), 4), dtype=torch.uint8, device="cuda")
    ours.quantize(x, x_q, x_scale)
    sparse_bytes = n * k // 2 + n * k // 8 + m * k + m * n * 2
    dense_bytes = n * k + m * k + m * n * 4

    def quantized_linear():
        ours.quantize(x, x_q, x_scale)
        ours.gemm(x_q, x_scale, y, workspace)

    backends = {"sparsegemm_s8": (lambda: ours.gemm(x_q, x_scale, y, workspace), sparse_bytes),
                "sparsegemm_s8_with_quantize": (quantized_linear, sparse_bytes + m * k * 2),
                "dense_int_mm": (lambda: torch._int_mm(x_q, wq.T), dense_bytes)}
    try:
        wc = torch._cslt_compress(wq)
        backends["torch_2to4_cusparselt_s8"] = (lambda: torch._cslt_sparse_mm(wc, x_q.T, out_dtype=torch.int32),
                                                sparse_bytes + m * n * 2)
    except (RuntimeError, NotImplementedError, AttributeError) as exc:
        backends["torch_2to4_cusparselt_s8"] = (exc, sparse_bytes)
    return measure_backends(backends, m, n, k, "s8", iters, flush, rate="tops")


def compress_case(n, k, dtype_name, iters, flush):
    """Prune + compress bandwidth: reads W, writes Wc and E (target: >= 70% of DRAM bandwidth)."""
    dtype, code = DTYPES[dtype_name]
    w = torch.randn(n, k, device="cuda").to(dtype)
    values = torch.empty((n, k // 2), dtype=dtype, device="cuda")
    meta = torch.empty((n, k // 8), dtype=torch.uint8, device="cuda")
    bad = torch.empty(1, dtype=torch.int64, device="cuda")
    stream = torch.cuda.current_stream().cuda_stream
    ms = time_ms(lambda: _C.cuda_compress(n, k, w.data_ptr(), k, values.data_ptr(), meta.data_ptr(), code, True,
                                          bad.data_ptr(), stream), iters, flush)
    nbytes = n * k * 2 + n * k // 2 * 2 + n * k // 8
    return {"op": "compress", "N": n, "K": k, "dtype": dtype_name, "ms": ms, "gbps": nbytes / ms / 1e6}


def smoke():
    for m, n, k in SMOKE_SHAPES:
        for name, (dtype, code) in DTYPES.items():
            w = torch.randn(n, k, device="cuda").to(dtype)
            x = torch.randn(m, k, device="cuda").to(dtype)
            op = SparseGemm(w, code)
            for config, split_k in ((0, 0), (1, 0), (1, 3)):
                y = torch.empty((m, n), dtype=dtype, device="cuda")
                ws = torch.empty(max(_C.cuda_gemm_workspace_bytes(m, n, k, config, split_k), 4), dtype=torch.uint8,
                                 device="cuda")
                _C.cuda_gemm(m, n, k, x.data_ptr(), k, op.values.data_ptr(), op.meta.data_ptr(), 0, y.data_ptr(), n,
                             code, 2, ws.data_ptr(), config, split_k, torch.cuda.current_stream().cuda_stream)
        kp = (k + 3) // 4 * 4
        wq = torch.randint(-127, 128, (n, kp // 4, 4), device="cuda", dtype=torch.int32)
        wq[..., ::2] = 0
        op = SparseGemmS8(wq.to(torch.int8).reshape(n, kp), torch.rand(n, device="cuda"))
        x = torch.randn(m, kp, device="cuda").to(torch.float16)
        x_q = torch.empty((m, kp), dtype=torch.int8, device="cuda")
        x_scale = torch.empty(m, dtype=torch.float32, device="cuda")
        op.quantize(x, x_q, x_scale)
        for config, split_k in ((0, 0), (1, 0), (1, 3)):
            y = torch.empty((m, n), dtype=torch.float16, device="cuda")
            ws = torch.empty(max(_C.cuda_gemm_s8_workspace_bytes(m, n, kp, config, split_k), 4), dtype=torch.uint8,
                             device="cuda")
            _C.cuda_gemm_s8(m, n, kp, x_q.data_ptr(), kp, op.values.data_ptr(), op.meta.data_ptr(),
                            op.w_scale.data_ptr(), x_scale.data_ptr(), 0, y.data_ptr(), n, 1, 2, ws.data_ptr(),
                            config, split_k, torch.cuda.current_stream().cuda_stream)
    torch.cuda.synchronize()
    print("smoke: ok")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="bench_gemm_cuda.json")
    parser.add_argument("--iters", type=int, default=50)
    parser.add_argument("--smoke", action="store_true")
    args = parser.parse_args()
    if args.smoke:
        smoke()
        return
    flush = torch.empty(512 * 1024 * 1024, dtype=torch.uint8, device="cuda")  # larger than any L2
    records = []
    for m, n, k in SHAPES:
        for dtype_name in DTYPES:
            for rec in run_case(m, n, k, dtype_name, args.iters, flush):
                records.append(rec)
                print(json.dumps(rec))
        for rec in run_case_s8(m, n, k, args.iters, flush):
            records.append(rec)
            print(json.dumps(rec))
    for dtype_name in DTYPES:
        records.append(compress_case(8192, 8192, dtype_name, args.iters, flush))
        print(json.dumps(records[-1]))
    props = torch.cuda.get_device_properties(0)
    out = {"gpu": props.name, "sm_count": props.multi_processor_count, "torch": torch.__version__,
           "cuda": torch.version.cuda, "sparsegemm": _C.build_info(), "results": records}
    with open(args.out, "w") as f:
        json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
