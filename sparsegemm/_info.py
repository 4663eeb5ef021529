"""sparsegemm.info(): what was built and what this machine offers."""
from __future__ import annotations

import platform

from . import _C


def _cpu_flags() -> list[str]:
    """The vector extensions the CPU advertises that the CPU backend can use."""
    wanted = ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_bf16", "avx512vbmi",
              "avx512_vnni", "avx512_fp16", "avx_vnni")
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    have = set(line.split(":", 1)[1].split())
                    return [w for w in wanted if w in have]
    except OSError:
        pass
    return []


def info() -> dict:
    """Version, CUDA build (archs), usable GPUs (name, compute capability), CPU features used."""
    import torch

    from . import __version__, ops

    built = _C.build_info()
    archs = [a for a in built["cuda_archs"].split(",") if a]
    gpus = _C.list_gpus() if built["cuda_built"] else []
    return {
        "version": __version__,
        "cuda_built": built["cuda_built"],
        "cuda_archs": archs,
        "cuda_runtime": built.get("cuda_runtime_version"),
        "gpus": [{"name": g["name"], "capability": tuple(g["capability"]), "sm_count": g["sm_count"]} for g in gpus],
        "gpu_available": bool(gpus),
        # The large-M GEMM on the current GPU: warpgroup wgmma.mma_async.sp on compute capability
        # 9.0 with an sm_90a build (unless SPARSEGEMM_WGMMA=0 or CUDA_FORCE_PTX_JIT is set),
        # warp-level mma.sp elsewhere.
        "cuda_large_m_tile": (("wgmma.sp" if _C.cuda_large_m_uses_wgmma() else "mma.sp") if gpus else None),
        "cpu": platform.processor() or platform.machine(),
        "cpu_isa": built["cpu_isa"],
        "cpu_flags": _cpu_flags(),
        "cpu_threads": torch.get_num_threads(),
        # "openmp:<runtime path>": the CPU kernels run on that (torch's) OpenMP team; "threads": their own pool.
        "cpu_threading": _C.cpu_threading(),
        # Per dtype, the CPU GEMM from ops.CPU_DENSE_TILE_MIN_M rows of X (INT8: CPU_DENSE_TILE_MIN_M_S8):
        # "dense tiles" (torch's dense GEMM on W decompressed a tile at a time, where that is faster
        # on this CPU and ISA) or "sparse kernel".
        "cpu_large_m_gemm": ops.cpu_large_m_gemm(),
        "torch": torch.__version__,
        "simt_emulator": hasattr(_C, "simt_gemm"),
    }
