"""The speed targets this package is held to (the CUDA, INT8 and modules issues), each measured the
way its issue states and judged, in one run: ``python -m sparsegemm targets``.

- Decode GEMMs (M in {1, 4, 16}; INT8 M in {1, 16}; N, K in {4096, 11008, 14336}): at least 80% of
  the GPU's DRAM bandwidth on the bytes actually read (compressed weight, metadata, scales,
  activations) and the output written. Kernel time from DRAM: the call replayed from a CUDA graph
  over copies of the weight that together exceed the L2 (:class:`bench.ReplayTimer`), since an
  eager call of 10-40 us is bound by the host's launch cost, not by the kernel.
- M = N = K = 8192: at least 1.5x dense (fp16 / bf16: cuBLAS through F.linear; INT8: torch._int_mm)
  on A100-class GPUs (compute capability 8.0); elsewhere the ratio is reported, beside torch's
  cuSPARSELt 2:4 path. CUDA events, L2 flushed (:class:`bench.Timer`).
- compress (prune=True, 8192 x 8192): at least 70% of DRAM bandwidth on W read, Wc and E written.
- The Llama-7B MLP block (4096 -> 11008 -> 4096) with SparseLinear: at least 1.3x nn.Linear at 16 x
  2048 tokens in fp16 (eager) and at least 1.5x at 1 and 16 tokens (replayed from CUDA graphs, as
  decode is served); INT8 reported.
- INT8 accuracy: the relative error of the INT8 2:4 linear against the fp32 2:4 linear, reported.

On the CPU every figure is reported (the targets are GPU figures, and no CPU peak is known).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Callable, Optional

import torch

import sparsegemm
from sparsegemm import bench, quant
from sparsegemm._progress import progress_bar

DECODE_BANDWIDTH = 80.0   # % of DRAM peak, decode GEMMs (fp16, bf16, INT8)
COMPRESS_BANDWIDTH = 70.0  # % of DRAM peak, compress
LARGE_M_SPEEDUP = 1.5     # x dense at M = N = K = 8192, A100-class GPUs only
MLP_PREFILL_SPEEDUP = 1.3  # x nn.Linear, fp16, 16 x 2048 tokens
MLP_DECODE_SPEEDUP = 1.5   # x nn.Linear, fp16, 1 to 16 tokens
ROTATE_BYTES = 400 << 20   # weight copies per decode case: several times any GPU's L2


@dataclass(frozen=True)
class Cases:
    """What to measure: the issues' cases by default, :meth:`quick` a small subset."""
    decode_sides: tuple = (4096, 11008, 14336)
    decode_ms: tuple = (1, 4, 16)
    decode_ms_int8: tuple = (1, 16)
    large_side: int = 8192
    compress_side: int = 8192
    mlp_prefill_tokens: int = 16 * 2048
    mlp_decode_tokens: tuple = (1, 16)
    dtypes: tuple = ("float16", "bfloat16")
    mlp_dtypes: tuple = ("float16", "int8")

    @classmethod
    def quick(cls, device: torch.device) -> "Cases":
        """A few cases of each target: a minute or two. On the CPU smaller prefill shapes (its dense
        fp16 MLP block at 2048 tokens took 38 s a call on the 2-core VM: 8.5 minutes of a 14-minute
        run)."""
        cpu = device.type == "cpu"
        return cls(decode_sides=(4096,), decode_ms=(1, 16), decode_ms_int8=(1,), large_side=2048 if cpu else 4096,
                   compress_side=4096, mlp_prefill_tokens=64 if cpu else 2048, mlp_decode_tokens=(1,))


@dataclass
class Verdict:
    issue: str        # which issue's target
    target: str       # what is asked, with its threshold
    case: str         # dtype and shape
    value: float      # the figure judged (NaN: could not be measured, see detail)
    unit: str
    threshold: float  # NaN: reported only
    verdict: str      # "met", "missed", "reported" or "not measured"
    detail: str = ""  # the times and ratios behind the figure
    rows: list = field(default_factory=list, repr=False)  # the bench rows it came from


def judge(value: float, threshold: float) -> str:
    """The verdict on ``value``: met or missed against ``threshold``, reported where there is no
    threshold (NaN), not measured where the value is NaN."""
    if value != value:
        return "not measured"
    if threshold != threshold:
        return "reported"
    return "met" if value >= threshold else "missed"


def _method(rows: list, prefix: str):
    """The first row whose method starts with ``prefix`` and that was timed, or None."""
    return next((r for r in rows if r.method.startswith(prefix) and not r.note), None)


def _copies(make, device: torch.device, limit: int) -> list:
    """``make()``'s results (tensors or SparseTensor24), enough that together they exceed the L2 (on
    CUDA, up to ``limit``: the calls a replay takes; one on the CPU, where the timer flushes the
    caches instead)."""
    first = make()
    count = min(limit, max(2, ROTATE_BYTES // first.nbytes)) if device.type == "cuda" else 1
    return [first] + [make() for _ in range(count - 1)]


def decode_rows(device: torch.device, dtype: str, m: int, n: int, k: int, timer) -> list:
    """Dense F.linear then the 2:4 linear (``dtype`` "int8": INT8 weights, fp16 activations on CUDA,
    bf16 on the CPU, quantized in the call), each over its own weight copies, captured as a user's
    CUDA graph would capture them (each call's split-K scratch from the graph's memory, ops.py
    _scratch)."""
    int8 = dtype == "int8"
    act = (torch.float16 if device.type == "cuda" else torch.bfloat16) if int8 else getattr(torch, dtype)
    gen = torch.Generator(device).manual_seed(0)
    w = sparsegemm.prune_2to4(torch.randn(n, k, generator=gen, device=device).to(act))
    x = torch.randn(m, k, generator=gen, device=device).to(act)
    item = x.element_size()
    sparse = _copies(lambda: quant.quantize_weight(w) if int8 else sparsegemm.compress(w), device, timer.reps)
    dense = _copies(w.clone, device, timer.reps)
    io = (m * k + m * n) * item
    rows = bench._Rows(device, dtype, "decode", m, n, k, timer)
    rows.add("dense", [lambda d=d: torch.nn.functional.linear(x, d) for d in dense], n * k * item + io)
    rows.add("sparsegemm", [lambda s=s: sparsegemm.linear(x, s) for s in sparse], sparse[0].nbytes + io)
    return rows.finish()


def compress_row(device: torch.device, dtype: str, side: int, timer):
    """compress(prune=True) over copies of a ``side`` x ``side`` weight: W read, Wc and E written."""
    gen = torch.Generator(device).manual_seed(0)
    w = torch.randn(side, side, generator=gen, device=device).to(getattr(torch, dtype))
    ws = _copies(w.clone, device, timer.reps)
    rows = bench._Rows(device, dtype, f"compress-{side}x{side}", 0, side, side, timer)
    rows.add("compress (prune=True)", [lambda w=w: sparsegemm.compress(w, prune=True) for w in ws],
             w.nbytes + w.nbytes // 2 + side * side // 8)
    return rows.rows[0]


def _a100_class(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.get_device_capability(device) == (8, 0)


def measure(device: torch.device, cases: Cases = Cases(), progress: bool = True,
            on_verdict: Optional[Callable[[Verdict], None]] = None) -> list:
    """Every target's verdicts (:class:`Verdict`), in the issues' order; ``on_verdict`` is called
    with each as it is judged (the CLI prints it then, so that a run cut short by a time limit
    still leaves what it measured)."""
    replay = bench.ReplayTimer(device)
    events = bench.Timer(device, warmup=3, repeats=20 if device.type == "cuda" else 5)
    large_threshold = LARGE_M_SPEEDUP if _a100_class(device) else float("nan")
    where = "A100-class" if _a100_class(device) else "reported off A100-class GPUs"
    verdicts = []

    def judged(*new: Verdict) -> None:
        verdicts.extend(new)
        if on_verdict is not None:
            for verdict in new:
                on_verdict(verdict)

    jobs = [("decode", dt, m, n, k) for dt in cases.dtypes for m in cases.decode_ms
            for n in cases.decode_sides for k in cases.decode_sides]
    jobs += [("decode", "int8", m, n, k) for m in cases.decode_ms_int8 for n in cases.decode_sides
             for k in cases.decode_sides]
    jobs += [("large", dt, 0, 0, 0) for dt in (*cases.dtypes, "int8")]
    jobs += [("compress", dt, 0, 0, 0) for dt in cases.dtypes]
    jobs += [("mlp", dt, 0, 0, 0) for dt in cases.mlp_dtypes]

    def large_target(dtype: str) -> str:
        return f"{cases.large_side}^3 >= {LARGE_M_SPEEDUP}x dense{' INT8' if dtype == 'int8' else ''} ({where})"

    # Each kind's target as its verdicts name it (a case that raised is reported under it too).
    target_of = {"decode": lambda dtype: _bandwidth_target("decode", DECODE_BANDWIDTH), "large": large_target,
               "compress": lambda dtype: _bandwidth_target("compress", COMPRESS_BANDWIDTH),
               "mlp": lambda dtype: "MLP block vs nn.Linear"}

    def measure_one(kind: str, dtype: str, m: int, n: int, k: int) -> None:
        if kind == "decode":
            rows = decode_rows(device, dtype, m, n, k, replay)
            dense, sparse = rows
            detail = (f"{sparse.ms * 1e3:.1f} us, {sparse.gbps:.1f} GB/s; dense {dense.ms * 1e3:.1f} us: "
                      f"{sparse.speedup_vs_dense:.2f}x")
            judged(_bandwidth_verdict(_issue(kind, dtype), "decode", DECODE_BANDWIDTH, f"{dtype} {m} x {n} x {k}",
                                      sparse, detail, rows))
        elif kind == "large":
            side = cases.large_side
            if dtype == "int8":
                rows = bench.bench_int8_shape(device, f"square-{side}", side, side, side, events)
                ours, dense = _method(rows, "sparsegemm int8"), _method(rows, "dense int8")
                slt = _method(rows, "torch-2:4 cuSPARSELt")
                dense_fp = rows[0]
                value = dense.ms / ours.ms if dense else float("nan")
                detail = (f"{ours.ms:.3f} ms; torch._int_mm {dense.ms:.3f} ms" if dense else
                          f"{ours.ms:.3f} ms; torch._int_mm not run here") + (
                    f"; dense {'fp16' if device.type == 'cuda' else 'bf16'} {dense_fp.ms:.3f} ms "
                    f"({dense_fp.ms / ours.ms:.2f}x)")
                judged(Verdict("4 INT8", large_target(dtype),
                               f"int8 {side}^3", value, "x torch._int_mm", large_threshold,
                               judge(value, large_threshold),
                               detail + (f"; cuSPARSELt int8 {slt.ms:.3f} ms ({slt.ms / ours.ms:.2f}x)"
                                         if slt else ""), rows),
                       Verdict("4 INT8", "accuracy: INT8 2:4 vs fp32 2:4 linear (relative error)",
                               f"int8 {side}^3, random normal", ours.rel_error, "rel. error",
                               float("nan"), judge(ours.rel_error, float("nan")), "", rows))
            else:
                rows = bench.bench_shape(device, getattr(torch, dtype), f"square-{side}", side, side, side, events)
                dense, ours, slt = rows[0], _method(rows, "sparsegemm"), _method(rows, "torch-2:4 cuSPARSELt")
                detail = f"{ours.ms:.3f} ms; dense {dense.ms:.3f} ms" + (
                    f"; cuSPARSELt {slt.ms:.3f} ms ({slt.ms / ours.ms:.2f}x)" if slt else "")
                judged(Verdict("3 CUDA", large_target(dtype),
                               f"{dtype} {side}^3", ours.speedup_vs_dense, "x dense", large_threshold,
                               judge(ours.speedup_vs_dense, large_threshold), detail, rows))
        elif kind == "compress":
            row = compress_row(device, dtype, cases.compress_side, replay)
            judged(_bandwidth_verdict("3 CUDA", "compress", COMPRESS_BANDWIDTH, f"{dtype} {cases.compress_side}^2",
                                      row, f"{row.ms * 1e3:.1f} us, {row.gbps:.1f} GB/s", [row]))
        else:
            judged(*_mlp_verdicts(device, dtype, cases, events))

    def not_measured(kind: str, dtype: str, m: int, n: int, k: int, why: str) -> None:
        case = f"{dtype} {m} x {n} x {k}" if kind == "decode" else dtype
        judged(Verdict(_issue(kind, dtype), target_of[kind](dtype), case, float("nan"), "", float("nan"),
                       "not measured", why, []))

    fault = None
    for kind, dtype, m, n, k in progress_bar(jobs, "targets", "case", progress):
        if fault is not None:  # every later launch of this process would fail too
            not_measured(kind, dtype, m, n, k, f"not run: an earlier case's CUDA fault ({fault})")
            continue
        try:
            measure_one(kind, dtype, m, n, k)
        except Exception as exc:  # one case's failure (out of memory, a capture refused) must not cost the rest
            not_measured(kind, dtype, m, n, k, f"{type(exc).__name__}: {exc}")
            if _sticky_cuda_error(str(exc)):
                fault = f"{type(exc).__name__}: {exc}"
    return verdicts


def _sticky_cuda_error(message: str) -> bool:
    """Whether an error's text is a CUDA fault that poisons the context (not an out-of-memory,
    after which the next case may well run): torch's "CUDA error: ..." and the extension's launch
    errors say it in the runtime's words."""
    message = message.lower()
    return "out of memory" not in message and any(fault in message for fault in (
        "illegal memory access", "illegal instruction", "misaligned address", "unspecified launch failure",
        "device-side assert", "hardware stack error", "invalid program counter", "cuda error"))


def _issue(kind: str, dtype: str) -> str:
    """The issue a kind of case answers to (INT8 decode and large-M cases: issue 4)."""
    return "4 INT8" if dtype == "int8" and kind in ("decode", "large") else {"mlp": "5 modules"}.get(kind, "3 CUDA")


def _bandwidth_target(what: str, threshold: float) -> str:
    return f"{what} >= {threshold:.0f}% of DRAM bandwidth"


def _bandwidth_verdict(issue: str, what: str, threshold: float, case: str, row, detail: str, rows: list) -> Verdict:
    """A share-of-bandwidth target judged on ``row``; where no DRAM peak is known (the CPU, a GPU not
    in bench.GPU_PEAKS) its GB/s, reported."""
    target = _bandwidth_target(what, threshold)
    if row.pct_peak_bw != row.pct_peak_bw:
        return Verdict(issue, target, case, row.gbps, "GB/s (no peak known)", float("nan"), "reported", detail, rows)
    return Verdict(issue, target, case, row.pct_peak_bw, "% of peak", threshold, judge(row.pct_peak_bw, threshold),
                   detail, rows)


def _mlp_verdicts(device: torch.device, dtype: str, cases: Cases, timer) -> list:
    """The MLP block's verdicts: prefill eager, decode from CUDA graphs (eager on the CPU); per token
    count one for SparseLinear and one for the gate/up-fused block (bench.bench_mlp's rows)."""
    tokens = (*cases.mlp_decode_tokens, cases.mlp_prefill_tokens)
    rows = bench.bench_mlp(device, dtype, tokens, timer)
    out = []
    for m in tokens:
        decode = m in cases.mlp_decode_tokens
        shape = "llama2-7b.mlp (CUDA graph)" if decode and device.type == "cuda" else "llama2-7b.mlp"
        group = [r for r in rows if r.M == m and r.shape == shape]
        judged = dtype == "float16" and device.type == "cuda"  # the targets are fp16 GPU figures
        threshold = (MLP_DECODE_SPEEDUP if decode else MLP_PREFILL_SPEEDUP) if judged else float("nan")
        target = f"MLP block >= {threshold}x nn.Linear" if judged else "MLP block vs nn.Linear"
        timing = "CUDA graph" if shape.endswith("(CUDA graph)") else "eager"
        for method, label in (("SparseLinear", "SparseLinear"), ("SparseLinear, gate/up fused", "gate/up fused")):
            r = _method(group, method)
            if r is None:  # bench_mlp times every method: a missing row would be a bug there
                raise RuntimeError(f"targets: bench_mlp gave no {method!r} row for {m} tokens")
            out.append(Verdict("5 modules", target, f"{dtype} {m} tokens, {label}, {timing}", r.speedup_vs_dense,
                               "x nn.Linear", threshold, judge(r.speedup_vs_dense, threshold),
                               f"{r.ms:.3f} ms; dense {group[0].ms:.3f} ms", group))
    return out


def markdown_header() -> str:
    """The head of the verdicts' markdown table (:func:`markdown_row` gives each row)."""
    return "| issue | target | case | measured | verdict | detail |\n|---|---|---|---|---|---|"


def markdown_row(v: Verdict) -> str:
    """One verdict as a row of the table :func:`markdown_header` starts."""
    value = "n/a" if v.value != v.value else (f"{v.value:.2e}" if v.unit == "rel. error" else f"{v.value:.2f}")
    return f"| {v.issue} | {v.target} | {v.case} | {value} {v.unit} | {v.verdict} | {v.detail} |"


def markdown_summary(verdicts: list) -> str:
    """A count of verdicts per target."""
    out = []
    for target in dict.fromkeys(v.target for v in verdicts):
        group = [v for v in verdicts if v.target == target]
        counts = {word: sum(v.verdict == word for v in group) for word in ("met", "missed", "reported", "not measured")}
        out.append(f"- {target}: " + ", ".join(f"{count} {word}" for word, count in counts.items() if count))
    return "\n".join(out)


def markdown(verdicts: list) -> str:
    """One table: issue, target, case, figure, verdict, detail; then a count per target."""
    return "\n".join([markdown_header(), *map(markdown_row, verdicts), "", markdown_summary(verdicts)])


def write_json(env: dict, verdicts: list, path: str) -> None:
    """The verdicts with their bench rows and the environment (bench.write_json: NaN as null)."""
    bench.write_json(path, {"environment": env, "verdicts": [asdict(v) for v in verdicts]})


def run(device: Optional[str] = None, quick: bool = False, progress: bool = True,
        on_environment: Optional[Callable[[dict], None]] = None,
        on_verdict: Optional[Callable[[Verdict], None]] = None) -> tuple:
    """(environment, verdicts) on ``device`` (default: cuda when available); the callbacks get the
    environment before anything is measured, and each verdict as it is judged."""
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    env = bench.environment(dev)
    if on_environment is not None:
        on_environment(env)
    return env, measure(dev, Cases.quick(dev) if quick else Cases(), progress, on_verdict)
