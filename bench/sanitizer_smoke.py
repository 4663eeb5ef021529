"""A few small calls of every CUDA kernel and tile configuration (the grouped GEMM's too), for
compute-sanitizer (memcheck, racecheck): no timing. Weights are prepared through the public API; the GEMM entry
points are called directly so that every configuration and split-K path runs.

    compute-sanitizer --tool memcheck python bench/sanitizer_smoke.py
"""
import torch

import sparsegemm
from sparsegemm import _C, ops, quant
from sparsegemm import format as fmt

from decode_sweep import _scratch, config_runs

# The fourth takes the copies with precomputed pointers (whole 128-row blocks of Wc and of X,
# 16-byte rows) and then a stage across K; it and the last run the TMA pipelines too. Where N % 16 == 0
# the gated (SwiGLU) epilogue runs too.
SHAPES = [(1, 40, 36), (17, 144, 100), (130, 260, 264), (130, 256, 1056), (33, 144, 160)]
SILU, SWIGLU = fmt.ACTIVATION_CODES["silu"], fmt.ACTIVATION_CODES["swiglu"]
# (config, split_k): large-M tile, decode tile, decode tile with a forced 3-way split of K, the
# mid-M tile (config 7: its own split, and 3 ways; where a block may have its shared memory), and
# the wgmma large-M tile where the GPU runs it (compute capability 9.0, sm_90a build), with
# cp.async copies and, where Wc rows are whole 16 bytes (K % 32 == 0 for int8), the wgmma tiles
# (128 and 256 W rows) and the decode tile fed by TMA (the decode one also split 3 ways); for fp16
# / bf16 also the wgmma tile with K split (config 6: its own split, and 3 ways).
CONFIGS = [(0, 0), (1, 0), (1, 3), (7, 0), (7, 3)]
WGMMA_CONFIG, TMA_CONFIGS = (2, 0), [(3, 0), (4, 0), (4, 3), (5, 0)]
SPLIT_WGMMA_CONFIGS = [(6, 0), (6, 3)]


def _runs(n: int, k: int, int8: bool = False) -> list:
    """((config, split_k), activation code) pairs: every configuration (of the int8 GEMM with
    ``int8``) with silu, and gated where N allows."""
    scratch = _C.cuda_gemm_s8_scratch if int8 else _C.cuda_gemm_scratch
    configs = [c for c in CONFIGS if config_runs(scratch, c[0])]
    if _C.cuda_large_m_uses_wgmma():
        configs = configs + [WGMMA_CONFIG] + (TMA_CONFIGS if k % 32 == 0 else [])
        configs += SPLIT_WGMMA_CONFIGS if k % 32 == 0 and not int8 else []
    return [(c, act) for c in configs for act in ((SILU, SWIGLU) if n % (2 * fmt.GATE_ROWS) == 0 else (SILU,))]


def main() -> None:
    stream = torch.cuda.current_stream().cuda_stream
    for m, n, k in SHAPES:
        for dtype in (torch.float16, torch.bfloat16):
            w = torch.randn(n, k, device="cuda").to(dtype)
            x = torch.randn(m, k, device="cuda").to(dtype)
            bias = torch.randn(n, device="cuda").to(dtype)
            sw = sparsegemm.compress(w, prune=True)
            sparsegemm.decompress(sw)
            meta = sw.kernel_meta("cuda")
            for (config, split_k), act in _runs(n, k):
                cols = ops.out_features(n, act)
                y = torch.empty((m, cols), dtype=dtype, device="cuda")
                ws, counters = _scratch(_C.cuda_gemm_scratch, m, n, k, config, split_k)
                _C.cuda_gemm(m, n, k, x.data_ptr(), k, sw.values.data_ptr(), meta.data_ptr(), bias.data_ptr(),
                             y.data_ptr(), cols, fmt.DTYPE_CODES[dtype], act, ws.data_ptr(), counters.data_ptr(),
                             config, split_k, stream)
        sw8 = quant.quantize_weight(torch.randn(n, k, device="cuda").half())
        x = torch.randn(m, k, device="cuda").half()
        x_q, x_scale = quant.quantize_activations(x)
        # Both quantize kernels on rows off the 16-byte grid too (ldx = K + 1: element loads), the
        # static one with a scale per group of rows (three groups, the last row past them).
        x_odd = torch.randn(m, k + 1, device="cuda").half()
        x_q_odd = torch.empty(m, k, dtype=torch.int8, device="cuda")
        x_scale_odd, group_scales = torch.empty(m, device="cuda"), torch.rand(3, device="cuda") + 0.01
        offsets = torch.tensor([0, m // 2, m // 2, max(m - 1, 0)], device="cuda")
        _C.cuda_quantize_rows(m, k, x_odd.data_ptr(), k + 1, 1, x_q_odd.data_ptr(), x_scale_odd.data_ptr(), stream)
        _C.cuda_quantize_rows_static(m, k, x_odd.data_ptr(), k + 1, 1, group_scales.data_ptr(), offsets.data_ptr(), 3,
                                     x_q_odd.data_ptr(), x_scale_odd.data_ptr(), stream)
        meta8 = sw8.kernel_meta("cuda")
        for (config, split_k), act in _runs(n, k, int8=True):
            cols = ops.out_features(n, act)
            y = torch.empty((m, cols), dtype=torch.float16, device="cuda")
            ws, counters = _scratch(_C.cuda_gemm_s8_scratch, m, n, k, config, split_k)
            _C.cuda_gemm_s8(m, n, k, x_q.data_ptr(), x_q.stride(0), sw8.values.data_ptr(), meta8.data_ptr(),
                            sw8.scale.data_ptr(), x_scale.data_ptr(), 0, y.data_ptr(), cols, 1, act, ws.data_ptr(),
                            counters.data_ptr(), config, split_k, stream)
    grouped()
    torch.cuda.synchronize()
    print("smoke: ok")


def grouped() -> None:
    """The grouped GEMM (16-bit and INT8) on every tile it takes (the decode tile split 3 ways too):
    three groups (one empty) of rows with gaps between them, offsets past M and a group longer than
    max_rows (clamped by the kernel)."""
    stream = torch.cuda.current_stream().cuda_stream
    configs = [0, 1] + ([2] if _C.cuda_large_m_uses_wgmma() else [])
    for m, n, k in [(40, 144, 96), (300, 272, 264)]:
        x = torch.randn(m, k, device="cuda").half()
        for int8 in (False, True):
            weights = [(quant.quantize_weight(w) if int8 else sparsegemm.compress(w, prune=True))
                       for w in torch.randn(3, n, k, device="cuda").half()]
            table = ops.grouped_weights([w.values for w in weights], [w.kernel_meta("cuda") for w in weights],
                                        [torch.randn(n, device="cuda").half() for _ in weights],
                                        [w.scale for w in weights] if int8 else None, k)
            for offsets in ([1, m // 3, m // 3, m - 2], [0, 5, m + 7, 10 ** 9]):
                for config, split_k in [(c, 0) for c in configs] + [(1, 3)]:
                    y = torch.zeros(m, n // 2, device="cuda").half()
                    ops.launch_grouped("cuda_", stream, x, torch.tensor(offsets, device="cuda"), m // 2, table,
                                       SWIGLU, y, config, split_k)


if __name__ == "__main__":
    main()
