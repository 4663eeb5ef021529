"""Tuning aid for gemm_heuristics.h: decode-GEMM time of the decode tile (config 1, "c1") per
forced split-K factor, from DRAM (CUDA-graph replay over copies of the weight that together
exceed the L2), next to dense F.linear and to what the heuristic picks; INT8 likewise, per split;
where the GPU runs the wgmma tile, the decode tile fed by TMA (config 4, "c4") at the heuristic's
split and at c1's best; and the compress / decompress kernels.

    python bench/decode_sweep.py

Of the tiles that split K, the decode tile is the one for these M (config 6, the wgmma tile split,
is bench/mid_m_sweep.py's). The other decode-tile candidates of
bench/results/2026-11-26-H200-run5/sweep.txt were timed by a script that is gone.
bench/ab_sweep.sh runs this for two trees on one GPU.
"""
import argparse

import torch

import sparsegemm
from sparsegemm import _C, ops, quant
from sparsegemm import format as fmt

from sparsegemm.bench import replay_ms

ROTATE_BYTES = 400 << 20  # weight copies per shape: several times any L2
SPLITS = (1, 2, 3, 4, 6, 8)
DECODE, DECODE_TMA = 1, 4  # GemmConfig::decode, decode_tma


def _scratch(scratch_fn, *shape_and_config) -> tuple[torch.Tensor, torch.Tensor]:
    """(workspace, uint64 tile counters) as _C.<scratch_fn> asks for them, unfilled: a counter word
    that does not carry a launch's token counts as no arrivals (gemm_sp.cuh arrived_last)."""
    workspace_bytes, counters = scratch_fn(*shape_and_config)
    return (torch.empty(max(workspace_bytes, 16), dtype=torch.uint8, device="cuda"),
            torch.empty(max(counters, 1), dtype=torch.int64, device="cuda"))


def config_runs(scratch_fn, config: int) -> bool:
    """Whether the GPU runs tile `config` when forced (_C.<scratch_fn>'s plan refuses the mid-M tile
    where a block may not have its shared memory, and the wgmma / TMA tiles off sm_90a)."""
    try:
        scratch_fn(64, 128, 256, config, 0)
    except ValueError:
        return False
    return True


def main() -> None:
    argparse.ArgumentParser(description=__doc__.splitlines()[0]).parse_args()
    torch.manual_seed(0)
    f16 = fmt.DTYPE_CODES[torch.float16]
    # 22016 x 4096: Llama-2-7B's gate and up projections fused (SparseGatedMLP), 172 blocks of the
    # decode tile: more than one per SM, fewer than two, so the one-wave split rule leaves it unsplit.
    for n, k in [(11008, 4096), (4096, 11008), (8192, 8192), (22016, 4096)]:
        w = sparsegemm.prune_2to4(torch.randn(n, k, device="cuda").half())
        copies = max(2, ROTATE_BYTES // (n * k))
        sws = [sparsegemm.compress(w) for _ in range(copies)]
        metas = [sw.kernel_meta("cuda") for sw in sws]
        sw8s = [quant.quantize_weight(w) for _ in range(copies)]
        meta8s = [sw.kernel_meta("cuda") for sw in sw8s]
        dense = [w.clone() for _ in range(max(2, ROTATE_BYTES // (2 * n * k)))]
        for m in (1, 16):
            x = torch.randn(m, k, device="cuda").half()
            y = torch.empty(m, n, device="cuda", dtype=torch.float16)
            x_q, x_scale = quant.quantize_activations(x)

            def fp16_us(config, split):
                ws, counters = _scratch(_C.cuda_gemm_scratch, m, n, k, config, split)
                # The stream is read at each call: inside graph capture it is the capture stream.
                return 1e3 * replay_ms([lambda sw=sw, me=me: _C.cuda_gemm(
                    m, n, k, x.data_ptr(), k, sw.values.data_ptr(), me.data_ptr(), 0, y.data_ptr(), n, f16, 0,
                    ws.data_ptr(), counters.data_ptr(), config, split, ops._stream(x))
                    for sw, me in zip(sws, metas)], reps=40)

            def int8_us(config, split):
                ws, counters = _scratch(_C.cuda_gemm_s8_scratch, m, n, k, config, split)
                return 1e3 * replay_ms([lambda sw=sw, me=me: _C.cuda_gemm_s8(
                    m, n, k, x_q.data_ptr(), k, sw.values.data_ptr(), me.data_ptr(), sw.scale.data_ptr(),
                    x_scale.data_ptr(), 0, y.data_ptr(), n, f16, 0, ws.data_ptr(), counters.data_ptr(), config, split,
                    ops._stream(x)) for sw, me in zip(sw8s, meta8s)], reps=40)

            io = (m * k + m * n) * 2
            sparse_bytes, int8_bytes = sws[0].nbytes + io, sw8s[0].nbytes + m * k + m * n * 2
            td = 1e3 * replay_ms([lambda d=d: torch.nn.functional.linear(x, d) for d in dense], reps=40)
            th = fp16_us(-1, 0)
            out = [f"M={m:2d} N={n} K={k}: dense {td:.1f}us ({(2 * n * k + io) / td / 1e3:.0f} GB/s)",
                   f"heuristic {th:.1f}us ({sparse_bytes / th / 1e3:.0f} GB/s {td / th:.2f}x)"]
            times = {s: fp16_us(DECODE, s) for s in SPLITS}
            best = min(times, key=times.get)
            out.append(f"c1 best s{best} {times[best]:.1f}us ({sparse_bytes / times[best] / 1e3:.0f} GB/s) ["
                       + " ".join(f"{s}:{t:.0f}" for s, t in times.items()) + "]")
            tma = _C.cuda_large_m_uses_wgmma()
            if tma:
                t4, t4_best = fp16_us(DECODE_TMA, 0), fp16_us(DECODE_TMA, best)
                out.append(f"c4 (TMA) {t4:.1f}us ({sparse_bytes / t4 / 1e3:.0f} GB/s), s{best} {t4_best:.1f}us")
            t8 = int8_us(-1, 0)
            out.append(f"int8 heuristic {t8:.1f}us ({int8_bytes / t8 / 1e3:.0f} GB/s {td / t8:.2f}x)")
            times = {s: int8_us(DECODE, s) for s in SPLITS}
            out.append("int8 c1 [" + " ".join(f"{s}:{t:.1f}" for s, t in times.items()) + "]")
            if tma:
                t8_tma = int8_us(DECODE_TMA, 0)
                out.append(f"int8 c4 (TMA) {t8_tma:.1f}us ({int8_bytes / t8_tma / 1e3:.0f} GB/s)")
            print(" | ".join(out), flush=True)
    for dtype in (torch.float16, torch.bfloat16):
        ws = [torch.randn(8192, 8192, device="cuda").to(dtype) for _ in range(3)]
        tc = 1e3 * replay_ms([lambda w=w: sparsegemm.compress(w, prune=True) for w in ws], reps=12)
        sw = sparsegemm.compress(ws[0], prune=True)
        tdc = 1e3 * replay_ms(lambda: sparsegemm.decompress(sw), reps=12)
        nbytes = 8192 * 8192 * 2 + 8192 * 4096 * 2 + 8192 * 1024  # W, Wc, E
        print(f"compress {dtype}: prune=True {tc:.1f}us ({nbytes / tc / 1e3:.0f} GB/s) | "
              f"decompress {tdc:.1f}us ({nbytes / tdc / 1e3:.0f} GB/s)", flush=True)


if __name__ == "__main__":
    main()
