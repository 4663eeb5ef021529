"""Tuning aid for gemm_heuristics.h's mid-size M (17 to 1024 rows: batched decode, short prefill),
where the heuristic leaves the decode tile for a large-M tile: fp16 GEMM time of each tile the GPU
runs at M = 16 .. 1024, from DRAM (CUDA-graph replay over copies of the weight that together
exceed the L2, split-K scratch made once before capture), next to dense F.linear and to what
the heuristic picks.

Tiles: "c1" the decode tile (16 X rows a block, K split by the heuristic's cost rule), "c7" the
mid-M tile (the decode tile's streaming for 64 X rows a block, K split by the same rule over its
blocks; forced only until this sweep has timed it), "c0" the warp-level large-M tile, and where
the GPU runs wgmma "c2" (cp.async), "c3" (TMA, the default for
large M), "c5" (the 256-row TMA tile) and "c6" (config 3's tile with K split over blocks, by its
own rule: "s" gives the split; "c6/2", "c6/4", "c6/8" forced to 2, 4 and 8 splits, to fit the
rule). H200 -run21: at M = 256, 4096 x 4096 ran 0.38-0.40x cuBLAS on the wgmma tile (64 blocks
for 132 SMs), so the crossover wants measuring. Each line ends with the INT8 GEMM (activations
quantized beforehand): its heuristic, the decode tile, the mid-M tile and config 3, to fit its
own mid-M plan.

    python bench/mid_m_sweep.py
"""
import argparse

import torch

import sparsegemm
from sparsegemm import _C, ops, quant
from sparsegemm import format as fmt
from sparsegemm.bench import replay_ms

from decode_sweep import ROTATE_BYTES, _scratch, config_runs

MS = (16, 32, 64, 128, 256, 512, 1024)
# Llama-2-7B's attention / MLP projections (N x K).
SHAPES = ((4096, 4096), (11008, 4096), (4096, 11008))


def main() -> None:
    argparse.ArgumentParser(description=__doc__.splitlines()[0]).parse_args()
    torch.manual_seed(0)
    f16 = fmt.DTYPE_CODES[torch.float16]
    mid_m, mid_m_int8 = config_runs(_C.cuda_gemm_scratch, 7), config_runs(_C.cuda_gemm_s8_scratch, 7)
    configs = [1] + ([7] if mid_m else []) + [0] + ([2, 3, 5, 6] if _C.cuda_large_m_uses_wgmma() else [])
    for n, k in SHAPES:
        w = sparsegemm.prune_2to4(torch.randn(n, k, device="cuda").half())
        copies = max(2, ROTATE_BYTES // (n * k))
        sws = [sparsegemm.compress(w) for _ in range(copies)]
        metas = [sw.kernel_meta("cuda") for sw in sws]
        sw8s = [quant.quantize_weight(w) for _ in range(copies)]
        meta8s = [sw.kernel_meta("cuda") for sw in sw8s]
        dense = [w.clone() for _ in range(max(2, ROTATE_BYTES // (2 * n * k)))]
        for m in MS:
            x = torch.randn(m, k, device="cuda").half()
            y = torch.empty(m, n, device="cuda", dtype=torch.float16)

            def sparse_us(config, split=0):
                ws, counters = _scratch(_C.cuda_gemm_scratch, m, n, k, config, split)
                return 1e3 * replay_ms([lambda sw=sw, me=me: _C.cuda_gemm(
                    m, n, k, x.data_ptr(), k, sw.values.data_ptr(), me.data_ptr(), 0, y.data_ptr(), n, f16, 0,
                    ws.data_ptr(), counters.data_ptr(), config, split, ops._stream(x))
                    for sw, me in zip(sws, metas)], reps=40)

            x_q, x_scale = quant.quantize_activations(x)

            def int8_us(config):
                ws, counters = _scratch(_C.cuda_gemm_s8_scratch, m, n, k, config, 0)
                return 1e3 * replay_ms([lambda sw=sw, me=me: _C.cuda_gemm_s8(
                    m, n, k, x_q.data_ptr(), k, sw.values.data_ptr(), me.data_ptr(), sw.scale.data_ptr(),
                    x_scale.data_ptr(), 0, y.data_ptr(), n, f16, 0, ws.data_ptr(), counters.data_ptr(), config, 0,
                    ops._stream(x)) for sw, me in zip(sw8s, meta8s)], reps=40)

            td = 1e3 * replay_ms([lambda d=d: torch.nn.functional.linear(x, d) for d in dense], reps=40)
            times = {"heuristic": sparse_us(-1), **{f"c{c}": sparse_us(c) for c in configs}}
            # The INT8 GEMM (activations quantized beforehand), to fit its own mid-M rule: the plan
            # keeps its large-M tile above 16 rows (gemm_heuristics.h kMidMDecodeCostPerWgmmaKTile).
            int8 = {"int8 heuristic": int8_us(-1), "int8 c1": int8_us(1),
                    **({"int8 c7": int8_us(7)} if mid_m_int8 else {}),
                    **({"int8 c3": int8_us(3)} if 3 in configs else {})}
            if mid_m:
                workspace_bytes, _ = _C.cuda_gemm_scratch(m, n, k, 7, 0)
                times[f"c7 s{max(1, workspace_bytes // (4 * m * n))}"] = times.pop("c7")
            if 6 in configs:
                workspace_bytes, _ = _C.cuda_gemm_scratch(m, n, k, 6, 0)
                times[f"c6 s{max(1, workspace_bytes // (4 * m * n))}"] = times.pop("c6")
                times.update({f"c6/{split}": sparse_us(6, split) for split in (2, 4, 8)})
            best = min(times, key=times.get)
            print(f"M={m:4d} N={n} K={k}: dense {td:.1f}us | " +
                  " | ".join(f"{name} {t:.1f}us ({td / t:.2f}x)" for name, t in times.items()) +
                  f" | best {best} | " + " | ".join(f"{name} {t:.1f}us" for name, t in int8.items()), flush=True)


if __name__ == "__main__":
    main()
