"""GEMM microbenchmarks: sparsegemm vs dense and vs torch's own 2:4 path, on CPU and CUDA.

Protocol: warm-up, then the median of many timed calls; on CUDA each call is timed with CUDA
events and the L2 cache is flushed (a buffer larger than L2 is overwritten) before it. TFLOP/s
use the dense-equivalent 2*M*N*K; GB/s the bytes each method actually reads and writes.

dtype "int8" rows (:func:`bench_int8_shape`): the dense float linear, dense INT8 through
``torch._int_mm`` (where this torch runs it; activations pre-quantized, so it is the bare GEMM),
and sparsegemm's INT8 2:4 linear from float activations (quantization included), whose row also
records its relative error against the fp32 2:4 linear on the same random normal data.
"""
from __future__ import annotations

import csv
import json
import platform
import statistics
import time
from dataclasses import asdict, dataclass
from typing import Callable, Optional

import torch

import sparsegemm

# Real model shapes (N, K) = (out_features, in_features) of the big projections.
MODEL_SHAPES = {
    "llama2-7b.qkv_o": (4096, 4096),
    "llama2-7b.gate_up": (11008, 4096),
    "llama2-7b.down": (4096, 11008),
    "llama3-8b.gate_up": (14336, 4096),
    "llama3-8b.down": (4096, 14336),
}
M_SWEEP = (1, 4, 16, 64, 256, 1024, 4096, 8192)


@dataclass
class Row:
    device: str
    dtype: str
    shape: str
    M: int
    N: int
    K: int
    method: str
    ms: float
    tflops: float
    gbps: float
    speedup_vs_dense: float = 0.0
    rel_error: float = float("nan")  # int8 rows: ||y - y_fp32_2:4|| / ||y_fp32_2:4||


def environment(device: torch.device) -> dict:
    """What the numbers were measured on."""
    env = {"sparsegemm": sparsegemm.__version__, "torch": torch.__version__, "python": platform.python_version(),
           "cpu": platform.processor() or platform.machine(), "cpu_isa": sparsegemm.info()["cpu_isa"],
           "threads": torch.get_num_threads()}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update({"gpu": props.name, "capability": f"{props.major}.{props.minor}", "sm_count":
                    props.multi_processor_count, "cuda": torch.version.cuda,
                    "driver": _nvidia_smi("driver_version"), "clocks_mhz": _nvidia_smi("clocks.sm,clocks.mem")})
    return env


def _nvidia_smi(query: str) -> str:
    import subprocess

    try:
        return subprocess.run(["nvidia-smi", f"--query-gpu={query}", "--format=csv,noheader"], capture_output=True,
                              text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"


class Timer:
    """Median time of a callable; on CUDA with events and an L2 flush before every call."""

    def __init__(self, device: torch.device, warmup: int, repeats: int):
        self.device, self.warmup, self.repeats = device, warmup, repeats
        self.flush = None
        if device.type == "cuda":
            l2 = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 50 << 20)
            self.flush = torch.empty(max(2 * l2, 64 << 20), dtype=torch.uint8, device=device)

    def __call__(self, fn: Callable[[], object]) -> float:
        for _ in range(self.warmup):
            fn()
        samples = []
        if self.device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            for _ in range(self.repeats):
                self.flush.zero_()
                start.record()
                fn()
                end.record()
                end.synchronize()
                samples.append(start.elapsed_time(end))
        else:
            for _ in range(self.repeats):
                t0 = time.perf_counter()
                fn()
                samples.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(samples)


def _torch_24_methods(w: torch.Tensor) -> dict:
    """torch.sparse.to_sparse_semi_structured with each backend this torch offers (CUDA only)."""
    from torch.sparse import SparseSemiStructuredTensor, to_sparse_semi_structured

    methods = {}
    for name, force_cutlass in (("torch-2:4 cuSPARSELt", False), ("torch-2:4 CUTLASS", True)):
        try:
            SparseSemiStructuredTensor._FORCE_CUTLASS = force_cutlass
            methods[name] = to_sparse_semi_structured(w)
        except (RuntimeError, ValueError, NotImplementedError):
            continue
        finally:
            SparseSemiStructuredTensor._FORCE_CUTLASS = False
    return methods


def bench_shape(device: torch.device, dtype: torch.dtype, label: str, m: int, n: int, k: int,
                timer: Timer) -> list:
    gen = torch.Generator().manual_seed(0)
    w = sparsegemm.prune_2to4(torch.randn(n, k, generator=gen).to(dtype)).to(device)
    x = torch.randn(m, k, generator=gen).to(dtype).to(device)
    sw = sparsegemm.compress(w)
    item = w.element_size()
    flops = 2.0 * m * n * k
    io_dense = (n * k + m * k + m * n) * item
    io_sparse = sw.nbytes + (m * k + m * n) * item
    rows = []

    def add(method: str, fn, io_bytes: int):
        ms = timer(fn)
        rows.append(Row(device.type, str(dtype).replace("torch.", ""), label, m, n, k, method, ms,
                        flops / ms / 1e9, io_bytes / ms / 1e6))

    add("dense", lambda: torch.nn.functional.linear(x, w), io_dense)
    add("sparsegemm", lambda: sparsegemm.linear(x, sw), io_sparse)
    if device.type == "cuda":
        for name, wt in _torch_24_methods(w).items():
            add(name, lambda wt=wt: torch.mm(wt, x.T), io_sparse)
    dense_ms = rows[0].ms
    for r in rows:
        r.speedup_vs_dense = dense_ms / r.ms
    return rows


def bench_int8_shape(device: torch.device, label: str, m: int, n: int, k: int, timer: Timer) -> list:
    """INT8 rows for one shape; activations in bf16 on the CPU, fp16 on CUDA."""
    from . import format as fmt
    from . import ops, quant

    act_dtype = torch.float16 if device.type == "cuda" else torch.bfloat16
    gen = torch.Generator().manual_seed(0)
    w32 = sparsegemm.prune_2to4(torch.randn(n, k, generator=gen))
    x32 = torch.randn(m, k, generator=gen)
    w, x = w32.to(act_dtype).to(device), x32.to(act_dtype).to(device)
    sw = quant.quantize_weight(w)
    flops = 2.0 * m * n * k
    item = x.element_size()
    rows = []

    def add(method: str, fn, io_bytes: int, rel_error: float = float("nan")):
        ms = timer(fn)
        rows.append(Row(device.type, "int8", label, m, n, k, method, ms, flops / ms / 1e9, io_bytes / ms / 1e6,
                        rel_error=rel_error))

    add("dense", lambda: torch.nn.functional.linear(x, w), (n * k + m * k + m * n) * item)
    x_q, _ = quant.quantize_activations(x)
    # The same int8 weight, dense: [K, N] as a transposed view of [N, K] (what _int_mm wants on CUDA).
    kp = fmt.padded_k(k)
    w_q = torch.zeros(n, kp, dtype=torch.int8, device=device)
    w_q[ops.meta_to_mask(sw.meta, kp)] = sw.values.reshape(-1)
    w_q_t = w_q[:, :k].contiguous().T
    try:
        torch._int_mm(x_q, w_q_t)
    except (RuntimeError, NotImplementedError):
        pass  # this torch / device / shape has no _int_mm: no baseline row
    else:
        add("dense int8 (torch._int_mm)", lambda: torch._int_mm(x_q, w_q_t), n * k + m * k + 4 * m * n)
    y = sparsegemm.linear(x, sw).float().cpu()
    ref = torch.nn.functional.linear(x32, w32)
    rel = float((y - ref).norm() / ref.norm())
    add("sparsegemm int8", lambda: sparsegemm.linear(x, sw), sw.nbytes + m * k * item + m * n * item, rel)
    dense_ms = rows[0].ms
    for r in rows:
        r.speedup_vs_dense = dense_ms / r.ms
    return rows


def run(device: str = "cpu", dtypes=("bfloat16",), quick: bool = False, progress: bool = True) -> tuple:
    dev = torch.device(device)
    if quick:
        shapes = {"square-4096": (4096, 4096)}
        ms = (1, 16, 256) if dev.type == "cpu" else (1, 16, 256, 4096)
        timer = Timer(dev, warmup=2, repeats=5 if dev.type == "cpu" else 20)
    else:
        shapes = dict(MODEL_SHAPES, **{"square-8192": (8192, 8192)})
        ms = M_SWEEP if dev.type == "cuda" else (1, 4, 16, 64, 256, 1024)
        timer = Timer(dev, warmup=3, repeats=10 if dev.type == "cpu" else 50)
    jobs = [(getattr(torch, dt), label, m, n, k) for dt in dtypes for label, (n, k) in shapes.items() for m in ms]
    if progress:
        try:
            from tqdm import tqdm
            jobs = tqdm(jobs, desc="bench", unit="shape")
        except ImportError:
            pass
    rows = []
    for dtype, label, m, n, k in jobs:
        if dtype == torch.int8:
            rows.extend(bench_int8_shape(dev, label, m, n, k, timer))
        else:
            rows.extend(bench_shape(dev, dtype, label, m, n, k, timer))
    return environment(dev), rows


def markdown(rows: list) -> str:
    out = ["| device | dtype | shape | M | N | K | method | ms | TFLOP/s | GB/s | vs dense | rel. error |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        err = "" if r.rel_error != r.rel_error else f"{r.rel_error:.2e}"
        out.append(f"| {r.device} | {r.dtype} | {r.shape} | {r.M} | {r.N} | {r.K} | {r.method} | {r.ms:.3f} | "
                   f"{r.tflops:.2f} | {r.gbps:.1f} | {r.speedup_vs_dense:.2f}x | {err} |")
    return "\n".join(out)


def write_outputs(env: dict, rows: list, json_path: Optional[str], csv_path: Optional[str],
                  plot_path: Optional[str]) -> None:
    if json_path:
        with open(json_path, "w") as f:
            json.dump({"environment": env, "rows": [asdict(r) for r in rows]}, f, indent=1)
    if csv_path:
        with open(csv_path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(asdict(rows[0]).keys()))
            writer.writeheader()
            writer.writerows(asdict(r) for r in rows)
    if plot_path:
        plot(rows, plot_path)


def plot(rows: list, path: str) -> None:
    """Speedup vs M per shape (sparsegemm vs dense), if matplotlib is installed."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("bench: matplotlib is not installed; no plot written")
        return
    fig, ax = plt.subplots(figsize=(7, 4))
    for (shape, dtype) in sorted({(r.shape, r.dtype) for r in rows}):
        pts = sorted((r.M, r.speedup_vs_dense) for r in rows
                     if r.shape == shape and r.dtype == dtype and r.method == "sparsegemm")
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=f"{shape} {dtype}")
    ax.set_xscale("log", base=2)
    ax.axhline(1.0, color="grey", lw=0.8)
    ax.set_xlabel("M (tokens)")
    ax.set_ylabel("speedup vs dense")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
