"""Where the TMA pipelines (configs 3 and 5) differ from the cp.async wgmma tile (config 2) on the
GPU, and which TMA box case faults: run18's suite saw wrong results at large shapes and illegal
instructions. Usage: diag_tma.py box SWIZZLE | gemm CONFIG | s8 CONFIG (one process each: a fault
is sticky, so a crash ends only its own list)."""
import os
import sys

import numpy as np
import torch

sys.path[:0] = [".", "tests"]
from test_kernels_simt import KernelBackend, random_gemm_operands  # noqa: E402
from test_simt_emulator import run_tma_box, tma_box_reference  # noqa: E402

BACKEND = os.environ.get("DIAG_BACKEND", "cuda")  # simt: a smoke test on the CPU
kernels = KernelBackend(BACKEND)


def box(swizzle):
    cols = {0: 48, 32: 32, 64: 64, 128: 128}[swizzle]
    for c0, c1 in [(0, 0), (16, 3), (-16, -2), (40, 13)]:
        rng = np.random.default_rng(swizzle + c0 + 2 * c1 + 64)
        src = rng.integers(1, 256, (20, 150), dtype=np.uint8)
        out = run_tma_box(0, src, 160, cols, 16, swizzle, c0, c1, BACKEND)
        ref = tma_box_reference(src, c0, c1, cols, 16, swizzle)
        bad = np.flatnonzero(out != ref)
        print(f"box swizzle {swizzle} cols {cols} at ({c0},{c1}): {len(bad)} bytes differ"
              + (f", first at {bad[:8].tolist()} got {out[bad[:8]].tolist()} want {ref[bad[:8]].tolist()}" if len(bad) else ""),
              flush=True)


def compare(tag, y, ref, block_m, block_n):
    diff = (y.float() - ref.float()).abs()
    if torch.equal(y, ref):
        print(f"{tag}: equal", flush=True)
        return
    m, n = y.shape
    tiles = {}
    for mi in range(0, m, block_m):
        for ni in range(0, n, block_n):
            d = diff[mi:mi + block_m, ni:ni + block_n]
            bad = int((d > 0).sum())
            if bad:
                rows = torch.nonzero((d > 0).any(1)).flatten()
                cols = torch.nonzero((d > 0).any(0)).flatten()
                tiles[(mi // block_m, ni // block_n)] = (bad, rows.min().item(), rows.max().item(), cols.min().item(),
                                                         cols.max().item())
    total_tiles = ((m + block_m - 1) // block_m) * ((n + block_n - 1) // block_n)
    nans = int(y.isnan().sum()) if y.dtype.is_floating_point else 0
    print(f"{tag}: {int((diff > 0).sum())} of {m * n} differ (max {diff.max().item():.3g}, NaN {nans}), "
          f"{len(tiles)} of {total_tiles} tiles; first tiles (m,n): (count, local rows lo-hi, cols lo-hi) "
          + str(sorted(tiles.items())[:12]), flush=True)


SHAPES = [(130, 304, 1024), (128, 128, 64), (128, 128, 1056), (777, 3000, 64), (128, 16384, 64), (256, 16384, 64),
          (128, 33792, 64), (777, 3000, 1056), (4096, 4096, 512)]


def gemm(config):
    block_n = 256 if config == 5 else 128
    for m, n, k in SHAPES[:int(os.environ.get("DIAG_SHAPES", len(SHAPES)))]:
        x, values, meta, bias = random_gemm_operands(kernels, m, n, k, torch.float16, m + n + k)
        x, values, meta, bias = (kernels.to_device(t) for t in (x, values, meta, bias))
        y = kernels.gemm(x, values, meta, n, k, bias=bias, config=config)
        ref = kernels.gemm(x, values, meta, n, k, bias=bias, config=2)
        y2 = kernels.gemm(x, values, meta, n, k, bias=bias, config=config)
        compare(f"config {config} {m}x{n}x{k} ({(m + 127) // 128 * ((n + block_n - 1) // block_n)} blocks)", y, ref,
                128, block_n)
        print(f"   same config twice equal: {torch.equal(y, y2)}", flush=True)


def s8(config):
    from test_int8_kernels_simt import assert_gemm_s8_activation_close
    for m, n, k in [(33, 272, 320), (130, 304, 2048)]:
        gen = torch.Generator().manual_seed(m + n + k + config)
        try:
            assert_gemm_s8_activation_close(kernels, torch.float16, "relu", m, n, k, config, 0, gen, with_bias=True)
            print(f"s8 config {config} {m}x{n}x{k}: equal", flush=True)
        except AssertionError as e:
            print(f"s8 config {config} {m}x{n}x{k}: differs {str(e)[:200]}", flush=True)


{"box": lambda a: box(int(a)), "gemm": lambda a: gemm(int(a)), "s8": lambda a: s8(int(a))}[sys.argv[1]](sys.argv[2])
