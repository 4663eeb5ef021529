"""The built module's GEMM really runs on the sparse tensor cores: every compiled architecture's
gemm_sp_kernel contains HMMA.SP.16832 (fp16 and bf16 instantiations, the GEMM's row-major X loader
and the implicit-GEMM convolution's NHWC loader) or, for the int8 policy, IMMA.SP.16864 (s8,
saturating); on SM 90 (built as sm_90a) the wgmma tile's contain the warpgroup forms
HGMMA.SP.64x128x32 / IGMMA.SP.64x128x64, and the TMA pipelines' kernels (wgmma and decode tiles)
TMA loads (UTMALDG) with no thread copying; elsewhere those kernels are only a trap. Read back from the
SASS with cuobjdump (PyPI: nvidia-cuda-cuobjdump, installed under site-packages/nvidia/cu13/bin)."""
import pathlib
import re
import shutil
import subprocess
import sysconfig

import pytest

from sparsegemm import _C


def find_tool(name):
    bundled = pathlib.Path(sysconfig.get_paths()["purelib"]) / "nvidia" / "cu13" / "bin" / name
    if bundled.is_file():
        return str(bundled)
    return shutil.which(name)


def cubin_arch(arch):
    """The cubin's target for a built SM: CMakeLists.txt builds SM 90 as sm_90a (wgmma)."""
    return "sm_90a" if arch == "90" else f"sm_{arch}"


def sass_functions(tool, module_path, arch):
    """{mangled function name: SASS text} of one architecture's cubin in the module."""
    out = subprocess.run([tool, "-sass", "-arch", cubin_arch(arch), module_path], check=True, capture_output=True,
                         text=True).stdout
    functions = {}
    for chunk in re.split(r"\n\s*Function : ", out)[1:]:
        name, _, body = chunk.partition("\n")
        functions[name.strip()] = body
    return functions


@pytest.fixture(scope="module")
def cuobjdump():
    if not _C.build_info()["cuda_built"]:
        pytest.skip("sparsegemm._C was built without CUDA code (SPARSEGEMM_CUDA=0 or no nvcc)")
    tool = find_tool("cuobjdump")
    if tool is None:
        pytest.skip("cuobjdump not found: pip install nvidia-cuda-cuobjdump")
    return tool


def built_archs():
    archs = _C.build_info()["cuda_archs"]
    return [a for a in archs.split(",") if a] or ["none"]


WGMMA_TILE = "gemm_tiles11WgmmaLargeM"  # the mangled tile argument of the wgmma tile's kernels
WIDE_WGMMA_TILE = "gemm_tiles15WgmmaWideLargeM"  # the 256-row wgmma tile's (config 5, TMA only)
SPLIT_WGMMA_TILE = "gemm_tiles11WgmmaSplitK"  # the wgmma tile with K split (config 6, TMA, 16-bit only)
WGMMA_TILES = (WGMMA_TILE, WIDE_WGMMA_TILE, SPLIT_WGMMA_TILE)
TMA_LOADER = "TmaRowMajorX"  # the loader of its TMA pipeline (configs 3 to 6)
GROUPED_LOADER = "GroupedRowMajorX"  # the grouped GEMM's (checked on its own below)


def split_wgmma(kernels):
    """(the warp-level tiles' kernels with cp.async copies, the wgmma tile's with cp.async copies, the
    wgmma tiles' with TMA (128 and 256 W rows, K split), the decode tile's with TMA) of a {name: SASS}
    dict."""
    def select(wgmma, tma):
        return {name: body for name, body in kernels.items()
                if any(tile in name for tile in WGMMA_TILES) == wgmma and (TMA_LOADER in name) == tma}
    return select(False, False), select(True, False), select(True, True), select(False, True)


def check_hopper_kernels(arch, kernels, instruction, tma=False, count=2):
    """The wgmma tile's and the TMA pipelines' kernels: `instruction` on sm_90a (fed by TMA loads and
    no thread's copies, for a TMA pipeline), a bare trap anywhere else. count: two dtypes (or two int8
    output dtypes), times the TMA wgmma tiles (two for int8, three for 16-bit)."""
    assert len(kernels) == count, sorted(kernels)
    for name, body in kernels.items():
        if arch == "90":
            assert instruction in body, f"{name} on sm_90a has no {instruction}"
            if "GMMA" in instruction:
                assert "HMMA.SP" not in body and "IMMA.SP" not in body, name
            else:
                assert "GMMA" not in body, name
            assert ("UTMALDG.2D" in body) == tma and ("LDGSTS" in body) != tma, name
        else:
            assert "BPT.TRAP" in body and "MMA" not in body and "LDGSTS" not in body and "UTMA" not in body, name


@pytest.mark.parametrize("arch", built_archs())
def test_gemm_uses_sparse_hmma(cuobjdump, arch):
    functions = sass_functions(cuobjdump, _C.__file__, arch)
    # The 16-bit policy (Mma16); the int8 one (MmaS8) is checked below.
    gemms, wgmma, wgmma_tma, decode_tma = split_wgmma({name: body for name, body in functions.items()
                                                       if "gemm_sp_kernel" in name and "Mma16" in name and
                                                       "RowMajorX" in name and GROUPED_LOADER not in name})
    # Two dtypes x three warp-level tile configurations (kernels_dispatch.cuh: large M, decode,
    # mid-M), the wgmma tile with either loader, the decode tile with TMA.
    assert len(gemms) == 6, sorted(functions)
    check_hopper_kernels(arch, wgmma, "HGMMA.SP.64x128x32.F32")
    check_hopper_kernels(arch, wgmma_tma, "HGMMA.SP.64x128x32.F32", tma=True, count=6)
    check_hopper_kernels(arch, decode_tma, "HMMA.SP.16832.F32", tma=True)
    if arch == "90":
        assert all(("HGMMA.SP.64x128x32.F32.BF16" in body) == ("DTypeE2" in name)
                   for name, body in {**wgmma, **wgmma_tma}.items())
        assert all(("HMMA.SP.16832.F32.BF16" in body) == ("DTypeE2" in name) for name, body in decode_tma.items())
    for name, body in gemms.items():
        assert "HMMA.SP.16832.F32" in body, f"{name} on sm_{arch} has no sparse HMMA"
        is_bf16 = "DTypeE2" in name  # DType::bf16 == 2 in the mangled template argument
        assert ("HMMA.SP.16832.F32.BF16" in body) == is_bf16, name
        assert "LDSM" in body, f"{name} on sm_{arch}: operands are expected to come through ldmatrix"


@pytest.mark.parametrize("arch", built_archs())
def test_conv_uses_sparse_hmma_and_cp_async(cuobjdump, arch):
    functions = sass_functions(cuobjdump, _C.__file__, arch)
    convs, wgmma, wgmma_tma, decode_tma = split_wgmma({name: body for name, body in functions.items()
                                                       if "gemm_sp_kernel" in name and "NhwcConvX" in name})
    assert not wgmma_tma and not decode_tma  # the convolution has no TMA pipeline
    # The implicit-GEMM convolution: two dtypes x two tile configurations (kernels_dispatch.cuh conv2d).
    assert len(convs) == 4, sorted(functions)
    check_hopper_kernels(arch, wgmma, "HGMMA.SP.64x128x32.F32")
    for name, body in convs.items():
        assert "HMMA.SP.16832.F32" in body, f"{name} on sm_{arch} has no sparse HMMA"
        assert ("HMMA.SP.16832.F32.BF16" in body) == ("DTypeE2" in name), name
        assert "LDSM" in body, f"{name} on sm_{arch}: operands are expected to come through ldmatrix"
        # The NHWC chunks stream through cp.async (LDGSTS), with no im2col buffer in between.
        assert "LDGSTS" in body, f"{name} on sm_{arch}: the NHWC loader is expected to use cp.async"


@pytest.mark.parametrize("arch", built_archs())
def test_int8_gemm_uses_sparse_imma(cuobjdump, arch):
    functions = sass_functions(cuobjdump, _C.__file__, arch)
    gemms, wgmma, wgmma_tma, decode_tma = split_wgmma({name: body for name, body in functions.items()
                                                       if "gemm_sp_kernel" in name and "MmaS8" in name and
                                                       GROUPED_LOADER not in name})
    # Two output dtypes x three warp-level tile configurations (kernels_dispatch.cuh: large M,
    # decode, mid-M), the wgmma tile with either loader, the decode tile with TMA.
    assert len(gemms) == 6, sorted(functions)
    check_hopper_kernels(arch, wgmma, "IGMMA.SP.64x128x64.S8.S8.SAT")
    check_hopper_kernels(arch, wgmma_tma, "IGMMA.SP.64x128x64.S8.S8.SAT", tma=True, count=4)
    check_hopper_kernels(arch, decode_tma, "IMMA.SP.16864.S8.S8.SAT", tma=True)
    for name, body in gemms.items():
        assert "IMMA.SP.16864.S8.S8.SAT" in body, f"{name} on sm_{arch} has no saturating sparse s8 IMMA"
        assert "HMMA" not in body, name
        assert "LDSM" in body, f"{name} on sm_{arch}: operands are expected to come through ldmatrix"
    assert any("quantize_rows_kernel" in name for name in functions)
    assert any("reorder_meta_s8_kernel" in name for name in functions)


@pytest.mark.parametrize("arch", built_archs())
def test_grouped_gemms_use_the_sparse_tensor_cores(cuobjdump, arch):
    # The grouped GEMM (GroupedRowMajorX): per policy, two dtypes x the two warp-level tiles and the
    # wgmma tile, all with cp.async copies.
    functions = sass_functions(cuobjdump, _C.__file__, arch)
    for policy, mma, gmma in (("Mma16", "HMMA.SP.16832.F32", "HGMMA.SP.64x128x32.F32"),
                              ("MmaS8", "IMMA.SP.16864.S8.S8.SAT", "IGMMA.SP.64x128x64.S8.S8.SAT")):
        gemms, wgmma, wgmma_tma, decode_tma = split_wgmma({name: body for name, body in functions.items()
                                                           if "gemm_sp_kernel" in name and policy in name and
                                                           GROUPED_LOADER in name})
        assert len(gemms) == 4 and not wgmma_tma and not decode_tma, sorted(gemms)
        check_hopper_kernels(arch, wgmma, gmma)
        for name, body in gemms.items():
            assert mma in body and "LDSM" in body and "LDGSTS" in body, f"{name} on sm_{arch}"


def resource_usage(tool, module_path, arch):
    """{mangled function name: {"REG": n, "STACK": n, "LOCAL": n, ...}} of one architecture's cubin."""
    out = subprocess.run([tool, "-res-usage", "-arch", cubin_arch(arch), module_path], check=True,
                         capture_output=True, text=True).stdout
    usage = {}
    for name, fields in re.findall(r"Function (\S+):\n\s*(.*)", out):
        usage[name] = {key: int(value) for key, value in re.findall(r"(\w+(?:\[\d+\])?):(\d+)", fields)}
    return usage


@pytest.mark.parametrize("arch", built_archs())
def test_kernels_use_no_local_memory(cuobjdump, arch):
    # A stack frame means an array nvcc could not keep in registers (the compress kernels once had
    # one, from selecting kept values by computed index): slow, and a spill in all but name.
    usage = resource_usage(cuobjdump, _C.__file__, arch)
    assert usage, "no kernels found"
    heavy = {name: u for name, u in usage.items() if u.get("STACK", 0) or u.get("LOCAL", 0)}
    assert not heavy, heavy


@pytest.mark.parametrize("arch", [pytest.param(a, marks=() if a in built_archs() else
                                               pytest.mark.skip(reason=f"sm_{a} not in this build"))
                                  for a in ("80", "90")])
def test_large_m_gemm_fits_two_blocks_per_sm(cuobjdump, arch):
    # 256 threads x 128 registers x 2 blocks = the 64K registers of an SM: above 128, one block per
    # SM and half the warps to hide latency (a refactor once took it to 160 on sm_90: 0.43x -> 0.29x
    # cuBLAS). sm_80 (A100, 164 KiB of shared memory: room for two 75-78 KiB blocks) held 159 until
    # the metadata copies were set up once; sm_86 / sm_89 fit one block by shared memory anyway.
    usage = resource_usage(cuobjdump, _C.__file__, arch)
    large_m = {name: u["REG"] for name, u in usage.items() if "gemm_sp_kernel" in name and "tiles6LargeM" in name
               and GROUPED_LOADER not in name}  # grouped: one block an SM (gemm_sp.cuh)
    assert len(large_m) == 6, sorted(usage)  # fp16, bf16 x GEMM, conv; int8 x two outputs
    assert max(large_m.values()) <= 128, large_m
    # The grouped decode tile keeps the decode tile's two blocks an SM (256 threads each).
    grouped_decode = {name: u["REG"] for name, u in usage.items() if GROUPED_LOADER in name and "tiles6Decode" in name}
    assert len(grouped_decode) == 4 and max(grouped_decode.values()) <= 128, grouped_decode
    # The mid-M tile (config 7: two blocks an SM on H100 / H200, gemm_heuristics.h MidM): fp16,
    # bf16; int8 x two outputs. Its split-K tail spilled until it summed two A tiles at a time (of four).
    mid_m = {name: u["REG"] for name, u in usage.items() if "gemm_sp_kernel" in name and "tiles4MidM" in name}
    assert len(mid_m) == 4 and max(mid_m.values()) <= 128, mid_m


@pytest.mark.skipif("90" not in built_archs(), reason="sm_90 not in this build")
def test_wgmma_gemm_fits_two_blocks_per_sm_without_serialising(cuobjdump):
    # The wgmma tile's launch bound (2 blocks of 256 threads) caps it at 128 registers; ptxas would
    # rather spill than exceed it, and test_kernels_use_no_local_memory forbids that. Each k-tile's
    # two wgmma ops must stay back to back, one wait for both: a WARPGROUP.DEPBAR after each (ptxas
    # serialises wgmma it cannot prove safe) would leave the tensor cores idle between them. The TMA
    # pipeline's SS form keeps one k-tile's ops in flight while waiting for the next stage's
    # mbarrier, and retires them (wait_group 0) before loading the metadata registers they read.
    usage = resource_usage(cuobjdump, _C.__file__, "90")
    wgmma = {name: u["REG"] for name, u in usage.items() if WGMMA_TILE in name and GROUPED_LOADER not in name}
    # fp16, bf16 x GEMM, convolution, TMA GEMM; int8 x two outputs x GEMM, TMA GEMM
    assert len(wgmma) == 10 and max(wgmma.values()) <= 128, wgmma
    # The 256-row tile (512 threads, one block an SM): fp16, bf16; int8 x two outputs.
    wide = {name: u["REG"] for name, u in usage.items() if WIDE_WGMMA_TILE in name}
    assert len(wide) == 4 and max(wide.values()) <= 128, wide
    # The K-split tile (fp16, bf16): its split-K tail sums into registers the accumulators leave.
    split = {name: u["REG"] for name, u in usage.items() if SPLIT_WGMMA_TILE in name}
    assert len(split) == 2 and max(split.values()) <= 128, split
    for name, body in sass_functions(cuobjdump, _C.__file__, "90").items():
        if any(tile in name for tile in WGMMA_TILES) and TMA_LOADER in name:
            # The SS form: wait_group 0 in the loop, after the mbarrier wait, and after it.
            assert body.count("GMMA.SP.") == 2 and body.count("WARPGROUP.DEPBAR.LE gsb0, 0x0") == 2, name
            assert body.count("WARPGROUP.DEPBAR") == 2 and "LDSM" not in body, name
            assert body.index("SYNCS.PHASECHK.TRANS64.TRYWAIT") < body.index("WARPGROUP.DEPBAR"), name
        elif WGMMA_TILE in name:
            assert body.count("GMMA.SP.") == 2 and body.count("WARPGROUP.DEPBAR") == 1, name
