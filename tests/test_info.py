"""Import, info() and the CLI work without a GPU and without touching CUDA at import."""
import json
import os
import subprocess
import sys

import pytest

import sparsegemm
from sparsegemm import ops
from conftest import run_cli


def test_info_fields():
    info = sparsegemm.info()
    for key in ("version", "cuda_built", "cuda_archs", "gpus", "gpu_available", "cpu_isa", "cpu_flags", "torch"):
        assert key in info
    assert info["version"] == sparsegemm.__version__
    assert info["cpu_isa"] in ("avx512", "avx2", "generic")
    if info["cuda_built"]:
        assert info["cuda_archs"] and all(int(a) >= 80 for a in info["cuda_archs"])
    assert info["cuda_large_m_tile"] in (("wgmma.sp", "mma.sp") if info["gpu_available"] else (None,))
    paths = info["cpu_large_m_gemm"]
    assert set(paths) == {"float32", "float16", "bfloat16", "int8"}
    assert set(paths.values()) <= {"dense tiles", "sparse kernel",
                                   f"dense tiles below K = {ops.CPU_FP32_KERNEL_MIN_K}, else sparse kernel"}
    assert paths["float32"].startswith("dense tiles")


def test_import_does_not_initialise_cuda():
    code = ("import sys, torch, sparsegemm; "
            "sys.exit(1 if torch.cuda.is_initialized() else 0)")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=os.path.dirname(os.path.dirname(sparsegemm.__file__)))


def test_cli_info_prints_json(tmp_path):
    out = run_cli("info", cwd=tmp_path)
    assert json.loads(out.stdout)["version"] == sparsegemm.__version__


def test_cli_demo_small(tmp_path):
    out = run_cli("demo", "--size", "256", "--tokens", "1", "70", "--repeats", "2", cwd=tmp_path)
    assert "compressed" in out.stdout and "speedup" in out.stdout


def test_extension_links_no_torch_or_cuda_library():
    """One wheel serves every torch version: the module needs only the C/C++ runtime (the CUDA
    runtime is linked statically)."""
    import shutil

    from sparsegemm import _C

    if shutil.which("readelf") is None:
        import pytest
        pytest.skip("readelf (binutils) is not installed")
    out = subprocess.run(["readelf", "-d", _C.__file__], check=True, capture_output=True, text=True).stdout
    needed = [line.split("[")[1].rstrip("]") for line in out.splitlines() if "(NEEDED)" in line]
    allowed = ("libstdc++", "libm.", "libgcc_s", "libc.", "ld-linux", "libpthread", "libdl", "librt")
    assert needed and all(lib.startswith(allowed) for lib in needed), needed


def test_cli_bench_refuses_float32_on_cuda(tmp_path):
    with pytest.raises(subprocess.CalledProcessError) as failed:
        run_cli("bench", "--device", "cuda", "--dtype", "float32", cwd=tmp_path)
    assert failed.value.returncode == 2 and "float32 runs on the CPU backend only" in failed.value.stderr
