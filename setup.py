"""Thin shim: setuptools hands the one extension, sparsegemm._C, to CMake (Ninja generator).

Environment knobs (see README):
  SPARSEGEMM_CUDA=0            build CPU-only even when nvcc is found
  SPARSEGEMM_CUDA_ARCHS        ;- or ,-separated list, default "80;86;89;90"
  MAX_JOBS / CMAKE_BUILD_PARALLEL_LEVEL   build parallelism
  SPARSEGEMM_BUILD_TYPE        CMake build type, default Release
"""
import os
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext


class CMakeExtension(Extension):
    def __init__(self, name: str):
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    def build_extension(self, ext: Extension) -> None:
        import pybind11

        root = Path(__file__).resolve().parent
        out_dir = Path(self.get_ext_fullpath(ext.name)).resolve().parent
        build_dir = Path(self.build_temp).resolve() / ext.name
        build_dir.mkdir(parents=True, exist_ok=True)
        # A ';' list inside a -D define broke the Ninja command line (DESIGN.md): pass ','-joined.
        archs = os.environ.get("SPARSEGEMM_CUDA_ARCHS", "80;86;89;90").replace(";", ",")
        cfg = os.environ.get("SPARSEGEMM_BUILD_TYPE", "Release")
        cmake_args = [
            f"-S{root}",
            f"-B{build_dir}",
            "-GNinja",
            f"-DCMAKE_BUILD_TYPE={cfg}",
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={out_dir}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
            f"-DSPARSEGEMM_CUDA={os.environ.get('SPARSEGEMM_CUDA', 'AUTO')}",
            f"-DSPARSEGEMM_CUDA_ARCHS={archs}",
        ]
        # pip builds in a throwaway environment whose ninja a cached CMAKE_MAKE_PROGRAM would still
        # name on the next `pip install .` of this checkout (CMake then fails in project()).
        ninja = shutil.which("ninja")
        if ninja:
            cmake_args.append(f"-DCMAKE_MAKE_PROGRAM={ninja}")
        subprocess.run(["cmake", *cmake_args], check=True)
        jobs = os.environ.get("MAX_JOBS") or os.environ.get("CMAKE_BUILD_PARALLEL_LEVEL") or str(os.cpu_count() or 1)
        subprocess.run(["cmake", "--build", str(build_dir), "--parallel", jobs], check=True)


setup(ext_modules=[CMakeExtension("sparsegemm._C")], cmdclass={"build_ext": CMakeBuild})
