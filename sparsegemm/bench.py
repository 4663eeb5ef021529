"""GEMM microbenchmarks: sparsegemm vs dense and vs torch's own 2:4 path, on CPU and CUDA.

Protocol: warm-up, then the median of many timed calls, each after a cache flush (:class:`CacheFlush`:
the GPU's L2, or the CPU's last-level cache, so no call finds its weight left there by the call
before, as a layer of a real model would not); on CUDA each call is timed with CUDA events. TFLOP/s
use the dense-equivalent 2*M*N*K; GB/s the bytes each method actually reads and writes.

dtype "int8" rows (:func:`bench_int8_shape`): the dense float linear, dense INT8 through
``torch._int_mm`` (where this torch runs it; activations pre-quantized, so it is the bare GEMM),
and sparsegemm's INT8 2:4 linear from float activations (quantization included), whose row also
records its relative error against the fp32 2:4 linear on the same random normal data.
"""
from __future__ import annotations

import copy
import csv
import glob
import json
import os
import platform
import statistics
import time
from dataclasses import asdict, dataclass
from typing import Callable, Optional

import torch

import sparsegemm
from sparsegemm._progress import progress_bar

# Real model shapes (N, K) = (out_features, in_features) of the big projections.
MODEL_SHAPES = {
    "llama2-7b.qkv_o": (4096, 4096),
    "llama2-7b.gate_up": (11008, 4096),
    "llama2-7b.down": (4096, 11008),
    "llama3-8b.gate_up": (14336, 4096),
    "llama3-8b.down": (4096, 14336),
}
M_SWEEP = (1, 4, 16, 64, 256, 1024, 4096, 8192)


# Peak dense fp16 tensor TFLOP/s and DRAM GB/s of GPUs we compare against (datasheet figures;
# matched by the first key the device name contains, so a variant's key comes before its family's:
# "NVIDIA H100 NVL" is no SXM part, "NVIDIA GH200 480GB" no H200). Unknown GPUs get no share-of-peak
# figure.
GPU_PEAKS = {
    "GH200 144G": (989.0, 4900.0),
    "GH200": (989.0, 4000.0),
    "H200": (989.0, 4800.0),
    "H100 PCIe": (756.0, 2000.0),
    "H100 NVL": (835.0, 3900.0),
    "H100": (989.0, 3350.0),
    "A100-SXM4-80GB": (312.0, 2039.0),
    "A100 80GB PCIe": (312.0, 1935.0),
    "A100": (312.0, 1555.0),
    "L40S": (362.0, 864.0),
    "L4": (121.0, 300.0),
    "RTX 4090": (165.0, 1008.0),
    "A10": (125.0, 600.0),
}


def gpu_peak(device: torch.device) -> tuple:
    """(dense fp16 TFLOP/s, GB/s) of the GPU, or (nan, nan) when unknown or on the CPU."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, peak in GPU_PEAKS.items():
            if key in name:
                return peak
    return float("nan"), float("nan")


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
    speedup_vs_dense: float = float("nan")
    rel_error: float = float("nan")  # int8 rows: ||y - y_fp32_2:4|| / ||y_fp32_2:4||; conv rows: vs float64
    pct_peak_flops: float = float("nan")  # of the GPU's dense fp16 peak (int8: of twice that)
    pct_peak_bw: float = float("nan")     # of the GPU's DRAM bandwidth, on the bytes moved
    note: str = ""                        # why a baseline has no timing (this torch / GPU cannot run it)


def environment(device: torch.device) -> dict:
    """What the numbers were measured on."""
    env = {"sparsegemm": sparsegemm.__version__, "torch": torch.__version__, "python": platform.python_version(),
           "cpu": platform.processor() or platform.machine(), "cpu_isa": sparsegemm.info()["cpu_isa"],
           "threads": torch.get_num_threads()}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update({"gpu": props.name, "capability": f"{props.major}.{props.minor}", "sm_count":
                    props.multi_processor_count, "cuda": torch.version.cuda,
                    "driver": _nvidia_smi("driver_version"), "clocks_mhz": _nvidia_smi("clocks.sm,clocks.mem"),
                    "peak": gpu_peak(device)})
    return env


def _nvidia_smi(query: str) -> str:
    import subprocess

    try:
        return subprocess.run(["nvidia-smi", f"--query-gpu={query}", "--format=csv,noheader"], capture_output=True,
                              text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _cpu_last_level_cache_bytes() -> int:
    """The size of the CPU's largest cache, from Linux's sysfs; 32 MiB where that does not say."""
    sizes = []
    for index in glob.glob("/sys/devices/system/cpu/cpu0/cache/index*/size"):
        try:
            with open(index) as f:
                text = f.read().strip()
        except OSError:
            continue
        units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
        if text[:-1].isdigit() and text[-1] in units:
            sizes.append(int(text[:-1]) * units[text[-1]])
        elif text.isdigit():
            sizes.append(int(text))
    return max(sizes, default=32 << 20)


class CacheFlush:
    """Streams a buffer twice the size of the device's last-level cache (at least 64 MiB) through
    it: called before a timed call, it leaves none of the previous call's operands cached. Without
    it the CPU rows flattered the 2:4 weight, which fits a 32 MiB L3 where its dense original does
    not. The GPU's L2 is flushed by writing the buffer; the CPU's by reading it, because a large
    memset uses non-temporal stores that bypass the cache (measured on the 2-core EPYC VM: int8
    4096^2 torch._int_mm at M = 1 took 0.47 ms after a zeroing, 0.68 ms after a read)."""

    def __init__(self, device: torch.device):
        self.device = device
        if device.type == "cuda":
            cache = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 50 << 20)
        else:
            cache = _cpu_last_level_cache_bytes()
        self.buffer = torch.empty(max(2 * cache, 64 << 20), dtype=torch.uint8, device=device)
        if device.type != "cuda":
            self.buffer.zero_()  # the pages exist before the first timed call

    def __call__(self) -> None:
        if self.device.type == "cuda":
            self.buffer.zero_()
        else:
            self.buffer.sum()


class Timer:
    """Median time of a callable, each call after a :class:`CacheFlush`; on CUDA with events."""

    def __init__(self, device: torch.device, warmup: int, repeats: int):
        self.device, self.warmup, self.repeats = device, warmup, repeats
        self.flush = CacheFlush(device)

    def __call__(self, fn: Callable[[], object]) -> float:
        for _ in range(self.warmup):
            fn()
        samples = []
        if self.device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            for _ in range(self.repeats):
                self.flush()
                start.record()
                fn()
                end.record()
                end.synchronize()
                samples.append(start.elapsed_time(end))
        else:
            for _ in range(self.repeats):
                self.flush()
                t0 = time.perf_counter()
                fn()
                samples.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(samples)


def _torch_24_methods(w: torch.Tensor) -> dict:
    """torch.sparse.to_sparse_semi_structured with each backend: {name: converted weight, or the
    exception that this torch / GPU raised for it} (CUDA only)."""
    from torch.sparse import SparseSemiStructuredTensor, to_sparse_semi_structured

    methods = {}
    for name, force_cutlass in (("torch-2:4 cuSPARSELt", False), ("torch-2:4 CUTLASS", True)):
        try:
            SparseSemiStructuredTensor._FORCE_CUTLASS = force_cutlass
            methods[name] = to_sparse_semi_structured(w)
        except (RuntimeError, ValueError, NotImplementedError) as exc:
            methods[name] = exc
        finally:
            SparseSemiStructuredTensor._FORCE_CUTLASS = False
    return methods


class _Rows:
    """Collects the timed rows of one shape; a baseline that this torch / device / shape cannot
    run gets a row without timing that says why, instead of stopping the sweep."""

    def __init__(self, device: torch.device, dtype: str, label: str, m: int, n: int, k: int, timer: Timer,
                 peak_flops_scale: float = 1.0):
        self.device, self.dtype, self.label, self.m, self.n, self.k, self.timer = device, dtype, label, m, n, k, timer
        peak_flops, self.peak_bw = gpu_peak(device)
        self.peak_flops = peak_flops * peak_flops_scale
        self.rows = []

    def add(self, method: str, fn, io_bytes: int, rel_error: float = float("nan"), baseline: bool = False) -> None:
        try:
            ms = self.timer(fn)
        except (RuntimeError, NotImplementedError, ValueError) as exc:
            if not baseline:
                raise
            self.skip(method, exc)
            return
        tflops = 2.0 * self.m * self.n * self.k / ms / 1e9
        gbps = io_bytes / ms / 1e6
        self.rows.append(Row(self.device.type, self.dtype, self.label, self.m, self.n, self.k, method, ms, tflops,
                             gbps, rel_error=rel_error, pct_peak_flops=100 * tflops / self.peak_flops,
                             pct_peak_bw=100 * gbps / self.peak_bw))

    def skip(self, method: str, exc: Exception) -> None:
        nan = float("nan")
        self.rows.append(Row(self.device.type, self.dtype, self.label, self.m, self.n, self.k, method, nan, nan, nan,
                             note=f"{type(exc).__name__}: {str(exc).splitlines()[0][:120]}"))

    def finish(self) -> list:
        dense_ms = self.rows[0].ms
        for r in self.rows:
            r.speedup_vs_dense = dense_ms / r.ms
        return self.rows


def bench_shape(device: torch.device, dtype: torch.dtype, label: str, m: int, n: int, k: int,
                timer: Timer) -> list:
    """Float rows: dense F.linear, sparsegemm.linear, and torch's 2:4 backends on CUDA."""
    gen = torch.Generator(device).manual_seed(0)  # data made where it is used: big shapes stay fast
    w = sparsegemm.prune_2to4(torch.randn(n, k, generator=gen, device=device).to(dtype))
    x = torch.randn(m, k, generator=gen, device=device).to(dtype)
    sw = sparsegemm.compress(w)
    item = w.element_size()
    io_sparse = sw.nbytes + (m * k + m * n) * item
    rows = _Rows(device, str(dtype).replace("torch.", ""), label, m, n, k, timer)
    rows.add("dense", lambda: torch.nn.functional.linear(x, w), (n * k + m * k + m * n) * item)
    rows.add("sparsegemm", lambda: sparsegemm.linear(x, sw), io_sparse)
    if device.type == "cuda":
        for name, wt in _torch_24_methods(w).items():
            if isinstance(wt, Exception):
                rows.skip(name, wt)
            else:
                rows.add(name, lambda wt=wt: torch.mm(wt, x.T), io_sparse, baseline=True)
    return rows.finish()


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
    item = x.element_size()
    # INT8 tensor cores run at twice the fp16 rate: the share of peak is of that.
    rows = _Rows(device, "int8", label, m, n, k, timer, peak_flops_scale=2.0)
    rows.add("dense", lambda: torch.nn.functional.linear(x, w), (n * k + m * k + m * n) * item)
    x_q, _ = quant.quantize_activations(x)
    # The same int8 weight, dense: [K, N] as a transposed view of [N, K] (what _int_mm wants on CUDA).
    kp = fmt.padded_k(k)
    w_q = torch.zeros(n, kp, dtype=torch.int8, device=device)
    w_q[ops.meta_to_mask(sw.meta, kp)] = sw.values.reshape(-1)
    w_q = w_q[:, :k].contiguous()
    rows.add("dense int8 (torch._int_mm)", lambda: torch._int_mm(x_q, w_q.T), n * k + m * k + 4 * m * n,
             baseline=True)
    if device.type == "cuda" and hasattr(torch, "_cslt_compress"):
        try:
            wc = torch._cslt_compress(w_q)
        except (RuntimeError, NotImplementedError) as exc:
            rows.skip("torch-2:4 cuSPARSELt int8", exc)
        else:
            rows.add("torch-2:4 cuSPARSELt int8", lambda: torch._cslt_sparse_mm(wc, x_q.T, out_dtype=torch.float16),
                     sw.nbytes + m * k + 2 * m * n, baseline=True)
    y = sparsegemm.linear(x, sw).float().cpu()
    ref = torch.nn.functional.linear(x32, w32)
    rel = float((y - ref).norm() / ref.norm())
    rows.add("sparsegemm int8", lambda: sparsegemm.linear(x, sw), sw.nbytes + m * k * item + m * n * item, rel)
    # Static (calibrated) activations: one scale for the tensor, here from this x's own max, as
    # quant.Int8Calibrator would set it.
    input_scale = torch.tensor(float(x.abs().max()) / quant.QMAX, device=device)
    y = quant.linear_int8(x, sw, input_scale=input_scale).float().cpu()
    rows.add("sparsegemm int8, static scale", lambda: quant.linear_int8(x, sw, input_scale=input_scale),
             sw.nbytes + m * k * item + m * n * item, float((y - ref).norm() / ref.norm()))
    return rows.finish()


def bench_compress(device: torch.device, dtype: torch.dtype, n: int, k: int, timer: Timer) -> Row:
    """Prune + compress throughput: reads W, writes Wc and E (GB/s of those bytes)."""
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(0)).to(dtype).to(device)
    rows = _Rows(device, str(dtype).replace("torch.", ""), f"compress-{n}x{k}", 0, n, k, timer)
    item = w.element_size()
    rows.add("compress (prune=True)", lambda: sparsegemm.compress(w, prune=True), n * k * item + n * k // 2 * item
             + n * k // 8)
    return rows.rows[0]


class _LlamaMLP(torch.nn.Module):
    """Llama-2-7B's MLP block as transformers writes it: down_proj(act_fn(gate_proj(x)) * up_proj(x)),
    4096 -> 11008 -> 4096, act_fn SiLU."""

    def __init__(self, dim: int = 4096, hidden: int = 11008):
        super().__init__()
        self.gate_proj = torch.nn.Linear(dim, hidden, bias=False)
        self.up_proj = torch.nn.Linear(dim, hidden, bias=False)
        self.down_proj = torch.nn.Linear(hidden, dim, bias=False)
        self.act_fn = torch.nn.SiLU()

    def forward(self, x):
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


def cuda_graphed(fn: Callable[[], object]) -> Callable[[], object]:
    """``fn`` captured once in a CUDA graph (after warm-up calls on a side stream, as capture
    requires); returns the replay. Decode serving runs this way, with no per-call host cost."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def replay_ms(fns, reps: int = 50) -> float:
    """Milliseconds per call of ``fns`` (a callable, or a list of callables taken in turn: e.g. the
    same GEMM on copies of the weight that together exceed the L2, so each call reads DRAM), from
    ``reps`` calls captured in one CUDA graph and replayed (best of three replays): kernel time
    without the host's launch cost."""
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


class ReplayTimer:
    """A timer (as :class:`Timer`, for :class:`_Rows`) of kernel time: on CUDA :func:`replay_ms` of
    ``fns`` (one callable or several taken in turn); the CPU has no graphs and no launch cost to
    remove, so there it is a :class:`Timer` (cache flush, median) of the first callable."""

    def __init__(self, device: torch.device, reps: int = 40):
        self.device, self.reps = device, reps
        self.cpu_timer = None if device.type == "cuda" else Timer(device, warmup=2, repeats=10)

    def __call__(self, fns) -> float:
        if self.cpu_timer is None:
            return replay_ms(fns, self.reps)
        return self.cpu_timer(fns[0] if isinstance(fns, (list, tuple)) else fns)


def bench_mlp(device: torch.device, dtype: str, tokens, timer: Timer) -> list:
    """The Llama-7B MLP block with nn.Linear vs SparseLinear ("float16"/"bfloat16", or "int8"
    weights with activations in fp16 on CUDA, bf16 on the CPU). The rows' N counts the three
    projections (3 x 11008) so that TFLOP/s stays 2 * M * N * K."""
    act = getattr(torch, dtype) if dtype != "int8" else (torch.float16 if device.type == "cuda" else torch.bfloat16)
    torch.manual_seed(0)
    dense = _LlamaMLP().to(act).to(device)
    sparse = _LlamaMLP().to(act).to(device)
    sparse.load_state_dict(dense.state_dict())
    quantize = "int8" if dtype == "int8" else None
    sparsegemm.sparsify(sparse, quantize=quantize, progress=False)
    # The same block with gate_proj + up_proj as one SparseLinear whose epilogue is SwiGLU
    # (SparseGatedMLP): two GEMM launches per block instead of three GEMMs and two elementwise kernels.
    mlp = _LlamaMLP().to(act).to(device)
    mlp.load_state_dict(dense.state_dict())
    fused = sparsegemm.SparseGatedMLP.from_dense(mlp, quantize=quantize)
    sparsegemm.sparsify(fused, quantize=quantize, progress=False)  # its down_proj
    rows = []
    for m in tokens:
        x = torch.randn(m, 4096, dtype=act, device=device)
        r = _Rows(device, dtype, "llama2-7b.mlp", m, 3 * 11008, 4096, timer)
        dense_bytes = 3 * 4096 * 11008 * x.element_size()
        sparse_bytes = sum(t.nbytes for t in sparse.buffers()) + sum(t.nbytes for t in sparse.parameters())
        with torch.no_grad():
            r.add("dense nn.Linear", lambda: dense(x), dense_bytes)
            r.add("SparseLinear", lambda: sparse(x), sparse_bytes)
            # Same pruned weights as the unfused block: its output is the reference (the fused one
            # rounds once where the unfused one rounds gate, up and their product).
            ref, got = sparse(x).float(), fused(x).float()
            fused_error = float((got - ref).norm() / ref.norm().clamp_min(1e-30))
            r.add("SparseLinear, gate/up fused (SwiGLU)", lambda: fused(x), sparse_bytes, rel_error=fused_error)
        rows.extend(r.finish())
        if device.type == "cuda" and m <= 16:
            # Decode without the host, as a decode step's graph runs its blocks: each block captured
            # many times over in one CUDA graph (ReplayTimer), so that a block's time holds no graph
            # launch. Every block streams its weights from DRAM: a block's (dense fp16 270 MB, 2:4
            # 150 MB, 2:4 INT8 85 MB) exceed an H100 / H200's 50 MB L2. (One graph replay per timed
            # call, up to bench/results/2026-11-27-H200-run22, added the graph's launch to both
            # sides' 55-90 us: dense 92 us there, against ~80 us of its kernels in that run's sweeps.)
            g = _Rows(device, dtype, "llama2-7b.mlp (CUDA graph)", m, 3 * 11008, 4096, ReplayTimer(device))
            with torch.no_grad():
                g.add("dense nn.Linear", lambda: dense(x), dense_bytes)
                g.add("SparseLinear", lambda: sparse(x), sparse_bytes)
                g.add("SparseLinear, gate/up fused (SwiGLU)", lambda: fused(x), sparse_bytes)
            rows.extend(g.finish())
    return rows


def bench_encoder(device: torch.device, dtype: str, shapes, timer: Timer) -> list:
    """ViT-B/16's encoder layer as torch builds it: nn.TransformerEncoderLayer (768 wide, 12 heads,
    3072 hidden, GELU, pre-norm), dense vs sparsified (its nn.MultiheadAttention
    a SparseMultiheadAttention, its two Linear SparseLinear), inference, on x [batch, sequence, 768]
    for each (batch, sequence) of ``shapes`` (197 tokens: one 224 x 224 image). The rows' M is
    batch x sequence and N counts the six projections as K = 768 GEMMs (4 x 768 + 2 x 3072), so that
    TFLOP/s is that of the projections; the attention itself is torch's either way."""
    act = getattr(torch, dtype) if dtype != "int8" else (torch.float16 if device.type == "cuda" else torch.bfloat16)
    torch.manual_seed(0)
    layer = torch.nn.TransformerEncoderLayer(768, 12, 3072, dropout=0.0, activation="gelu", batch_first=True,
                                             norm_first=True)
    dense = layer.to(act).to(device).eval()
    sparse = copy.deepcopy(dense)
    sparsegemm.sparsify(sparse, quantize="int8" if dtype == "int8" else None, progress=False)
    dense_bytes = (4 * 768 * 768 + 2 * 768 * 3072) * torch.finfo(act).bits // 8
    sparse_bytes = sum(t.nbytes for t in sparse.buffers()) + sum(t.nbytes for t in sparse.parameters()) - sum(
        t.nbytes for mod in (sparse.norm1, sparse.norm2) for t in mod.parameters())
    rows = []
    for batch, sequence in shapes:
        x = torch.randn(batch, sequence, 768, dtype=act, device=device)
        r = _Rows(device, dtype, "vit-b.encoder-layer", batch * sequence, 4 * 768 + 2 * 3072, 768, timer)
        with torch.no_grad():
            r.add("dense nn.TransformerEncoderLayer", lambda: dense(x), dense_bytes)
            r.add("sparsified (SparseMultiheadAttention, SparseLinear)", lambda: sparse(x), sparse_bytes)
        rows.extend(r.finish())
    return rows


# ResNet-50 convolutions (Cin, Cout, kernel, H = W), batch 8: a 3 x 3 layer of each stage's size
# and a 1 x 1 expansion. Their GEMM's M (batch x output pixels) is large at any batch.
CONV_LAYERS = {
    "resnet50.conv2_3x3": (64, 64, 3, 56),
    "resnet50.conv4_3x3": (256, 256, 3, 14),
    "resnet50.conv3_1x1": (128, 512, 1, 28),
}


def bench_conv(device: torch.device, dtype: torch.dtype, label: str, batch: int, timer: Timer) -> list:
    """Dense F.conv2d (oneDNN / cuDNN) on the pruned weight vs SparseConv2d, channels_last input,
    inference mode. The rows' M, N, K are those of the convolution's GEMM."""
    cin, cout, kernel, side = CONV_LAYERS[label]
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(cin, cout, kernel, padding=kernel // 2).to(dtype).to(device)
    sparse = sparsegemm.SparseConv2d.from_dense(conv)
    w = sparse.dense_weight()
    x = torch.randn(batch, cin, side, side, dtype=dtype, device=device).to(memory_format=torch.channels_last)
    item = x.element_size()
    m, k = batch * side * side, cin * kernel * kernel
    io = (x.numel() + m * cout) * item
    rows = _Rows(device, str(dtype).replace("torch.", ""), label, m, cout, k, timer)
    with torch.inference_mode():
        ref = torch.nn.functional.conv2d(x.double(), w.double(), conv.bias.double(), padding=kernel // 2)
        rel = float((sparse(x).double() - ref).norm() / ref.norm())
        rows.add("dense F.conv2d", lambda: torch.nn.functional.conv2d(x, w, conv.bias, padding=kernel // 2),
                 io + cout * k * item)
        rows.add("SparseConv2d", lambda: sparse(x), io + sparse.sparse_weight().nbytes, rel_error=rel)
    return rows.finish()


def select_shapes(names) -> dict:
    """``{name: (N, K)}`` of the named GEMM shapes (MODEL_SHAPES, "square-8192", "square-4096");
    ValueError naming the unknown ones."""
    known = dict(MODEL_SHAPES, **{"square-8192": (8192, 8192), "square-4096": (4096, 4096)})
    unknown = [name for name in names if name not in known]
    if unknown:
        raise ValueError(f"bench: unknown shape(s) {unknown}; known: {sorted(known)}")
    return {name: known[name] for name in names}


def run(device: str = "cpu", dtypes=("bfloat16",), quick: bool = False, progress: bool = True,
        shapes_filter=None, ms_override=None) -> tuple:
    """The GEMM sweep, then the compress kernel, the Llama-7B MLP block, a ViT encoder layer and
    ResNet-50 convolutions; ``shapes_filter`` (names of MODEL_SHAPES / "square-8192" /
    "square-4096") and ``ms_override`` (M values) narrow the run to those GEMMs alone."""
    dev = torch.device(device)
    if quick:
        shapes = {"square-4096": (4096, 4096)}
        ms = (1, 16, 256) if dev.type == "cpu" else (1, 16, 256, 4096)
        timer = Timer(dev, warmup=2, repeats=5 if dev.type == "cpu" else 20)
    else:
        shapes = dict(MODEL_SHAPES, **{"square-8192": (8192, 8192)})
        ms = M_SWEEP if dev.type == "cuda" else (1, 4, 16, 64, 256, 1024)
        timer = Timer(dev, warmup=3, repeats=10 if dev.type == "cpu" else 50)
    if shapes_filter:
        shapes = select_shapes(shapes_filter)
    if ms_override:
        ms = tuple(ms_override)
    # Each dtype and M once, in the order asked (`--m 1 16 1` measured M = 1 twice, in two rows).
    dtypes, ms = dict.fromkeys(dtypes), dict.fromkeys(ms)
    jobs = [(getattr(torch, dt), label, m, n, k) for dt in dtypes for label, (n, k) in shapes.items() for m in ms]
    rows = []
    for dtype, label, m, n, k in progress_bar(jobs, "bench", "shape", progress):
        if dtype == torch.int8:
            rows.extend(bench_int8_shape(dev, label, m, n, k, timer))
        else:
            rows.extend(bench_shape(dev, dtype, label, m, n, k, timer))
    if shapes_filter or ms_override:  # asked for these GEMMs: the sections below ran at their own sizes
        return environment(dev), rows
    # The compress kernel's throughput, and the Llama-7B MLP block with SparseLinear (issue targets:
    # 16 x 2048 tokens and 1..16 tokens).
    side = 4096 if quick else 8192
    tokens = (1,) if quick else ((1, 16, 16 * 2048) if dev.type == "cuda" else (1, 16))
    conv_layers = ("resnet50.conv3_1x1",) if quick else tuple(CONV_LAYERS)
    encoder_shapes = ((1, 1),) if quick else ((1, 1), (1, 16), (1, 197)) + (((64, 197),) if dev.type == "cuda" else ())
    for dt in dtypes:
        if dt != "int8" and (dev.type == "cpu" or dt != "float32"):
            rows.append(bench_compress(dev, getattr(torch, dt), side, side, timer))
        rows.extend(bench_mlp(dev, dt, tokens, timer))
        rows.extend(bench_encoder(dev, dt, encoder_shapes, timer))
        if dt != "int8" and (dev.type == "cpu" or dt != "float32"):
            for label in conv_layers:
                rows.extend(bench_conv(dev, getattr(torch, dt), label, 8, timer))
    return environment(dev), rows


def markdown(rows: list) -> str:
    """The rows as a markdown table (a skipped row shows its note)."""
    out = ["| device | dtype | shape | M | N | K | method | ms | TFLOP/s | GB/s | vs dense | % peak FLOP/s | "
           "% peak BW | rel. error |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]

    def fmt(v: float, spec: str) -> str:
        return "" if v != v else format(v, spec)

    for r in rows:
        if r.note:
            out.append(f"| {r.device} | {r.dtype} | {r.shape} | {r.M} | {r.N} | {r.K} | {r.method} | skipped: "
                       f"{r.note} | | | | | | |")
            continue
        out.append(f"| {r.device} | {r.dtype} | {r.shape} | {r.M} | {r.N} | {r.K} | {r.method} | {r.ms:.3f} | "
                   f"{r.tflops:.2f} | {r.gbps:.1f} | {fmt(r.speedup_vs_dense, '.2f')}{'x' if r.speedup_vs_dense == r.speedup_vs_dense else ''} | "
                   f"{fmt(r.pct_peak_flops, '.1f')} | {fmt(r.pct_peak_bw, '.1f')} | {fmt(r.rel_error, '.2e')} |")
    return "\n".join(out)


def write_json(path: str, document) -> None:
    """``document`` as strict JSON: a figure that does not apply (no peak known for this GPU, no error
    measured) is NaN in the rows and the environment, and null here: NaN is not JSON, strict parsers
    (JavaScript's, jq) refuse the file."""
    def strict(value):
        if isinstance(value, float) and value != value:
            return None
        if isinstance(value, dict):
            return {key: strict(item) for key, item in value.items()}
        if isinstance(value, (list, tuple)):
            return [strict(item) for item in value]
        return value

    # Written aside, then renamed over the file: a run killed mid-write (the GPU suite's time limit on
    # targets, which rewrites the file at every verdict) leaves the last whole document.
    text = json.dumps(strict(document), indent=1, allow_nan=False)
    partial = f"{path}.partial"
    with open(partial, "w") as f:
        f.write(text)
    os.replace(partial, path)


def write_outputs(env: dict, rows: list, json_path: Optional[str], csv_path: Optional[str],
                  plot_path: Optional[str]) -> None:
    """The rows (JSON with the environment, CSV) and the speedup plot, to each path given (None: skip)."""
    if json_path:
        write_json(json_path, {"environment": env, "rows": [asdict(r) for r in rows]})
    if csv_path:
        with open(csv_path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(asdict(rows[0]).keys()))
            writer.writeheader()
            writer.writerows(asdict(r) for r in rows)
    if plot_path:
        plot(rows, plot_path, env.get("peak", (float("nan"), float("nan"))))


def plot(rows: list, path: str, peak: tuple = (float("nan"), float("nan"))) -> None:
    """Two panels, if matplotlib is installed: sparsegemm's speedup vs M per shape, and a roofline
    (TFLOP/s against arithmetic intensity 2MNK / bytes moved, with the GPU's peaks when known)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("bench: matplotlib is not installed; no plot written")
        return
    timed = [r for r in rows if not r.note and r.M > 0]
    fig, (ax, roof) = plt.subplots(1, 2, figsize=(12, 4.5))
    for (shape, dtype) in sorted({(r.shape, r.dtype) for r in timed}):
        pts = sorted((r.M, r.speedup_vs_dense) for r in timed
                     if r.shape == shape and r.dtype == dtype and r.method.startswith("sparsegemm"))
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=f"{shape} {dtype}")
    ax.set_xscale("log", base=2)
    ax.axhline(1.0, color="grey", lw=0.8)
    ax.set_xlabel("M (tokens)")
    ax.set_ylabel("speedup vs dense")
    ax.legend(fontsize=6)
    for method in sorted({r.method for r in timed}):
        pts = [(r.tflops * 1e3 / r.gbps, r.tflops) for r in timed if r.method == method and r.gbps > 0]
        roof.scatter([p[0] for p in pts], [p[1] for p in pts], s=10, label=method)
    peak_flops, peak_bw = peak
    if peak_flops == peak_flops and peak_bw == peak_bw:
        intensity = [2.0 ** e for e in range(-2, 14)]
        roof.plot(intensity, [min(peak_flops, i * peak_bw / 1e3) for i in intensity], color="black", lw=1,
                  label="roofline (dense fp16 peak)")
    roof.set_xscale("log", base=2)
    roof.set_yscale("log")
    roof.set_xlabel("FLOP per byte moved")
    roof.set_ylabel("TFLOP/s (dense-equivalent)")
    roof.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
