"""Shared test helpers: 2:4 weights with every index pattern, integer-valued data."""
import itertools
import os
import subprocess
import sys

import pytest
import torch

PAIRS = list(itertools.combinations(range(4), 2))  # the six legal (i0, i1)
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
ISAS = ["generic", "avx2", "avx512"]  # the CPU kernels' ISA levels (csrc/cpu/dispatch.cpp)


def sparse_weight(n: int, k: int, dtype=torch.float16, *, seed: int = 0, integer: bool = False,
                  zero_groups: bool = True) -> torch.Tensor:
    """A 2:4 weight [n, k] cycling through all six patterns (plus all-zero and one-non-zero groups)."""
    gen = torch.Generator().manual_seed(seed)
    kp = (k + 3) // 4 * 4
    g = kp // 4
    if integer:
        vals = torch.randint(1, 4, (n, g, 2), generator=gen).float() * (torch.randint(0, 2, (n, g, 2), generator=gen) * 2 - 1)
    else:
        vals = torch.randn(n, g, 2, generator=gen)
        vals = torch.where(vals.abs() < 1e-3, torch.full_like(vals, 0.5), vals)
    w = torch.zeros(n, g, 4)
    choice = torch.randint(0, len(PAIRS) + (2 if zero_groups else 0), (n, g), generator=gen)
    for r in range(n):
        for q in range(g):
            c = int(choice[r, q])
            if c < len(PAIRS):
                i0, i1 = PAIRS[c]
                w[r, q, i0], w[r, q, i1] = vals[r, q, 0], vals[r, q, 1]
            elif c == len(PAIRS):
                w[r, q, int(q % 4)] = vals[r, q, 0]  # one non-zero
    w = w.reshape(n, kp)[:, :k]
    return w.to(dtype).contiguous()


def integer_input(m: int, k: int, dtype, seed: int = 1) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(-3, 4, (m, k), generator=gen).to(dtype)


@pytest.fixture(params=DTYPES, ids=lambda d: str(d).replace("torch.", ""))
def dtype(request):
    return request.param


@pytest.fixture(params=ISAS)
def isa(request):
    """Runs the test with the CPU dispatcher switched to each ISA this CPU supports (the in-process
    twin of the SPARSEGEMM_CPU_ISA environment variable), restored afterwards."""
    from sparsegemm import _C

    if not _C.cpu_isa_supported(request.param):
        pytest.skip(f"this CPU/build cannot run {request.param}")
    previous = _C.cpu_isa_name()
    _C.cpu_set_isa(request.param)
    yield request.param
    _C.cpu_set_isa(previous)


def run_cli(*args, cwd):
    """``python -m sparsegemm ARGS`` from ``cwd`` (not the source tree, which `-m` would import
    first), with the package the tests import first on the path."""
    import sparsegemm

    root = os.path.dirname(os.path.dirname(os.path.abspath(sparsegemm.__file__)))
    env = {**os.environ, "PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.run([sys.executable, "-m", "sparsegemm", *args], check=True, capture_output=True, text=True,
                          cwd=cwd, env=env)


@pytest.fixture
def shuffled_block_orders():
    """Emulator block-order seeds (_C.simt_set_block_order) to run a launch under: 0 is the default
    increasing order, the others shuffle the blocks. The default is restored afterwards."""
    from sparsegemm import _C

    yield [0, 1, 2, 3]
    _C.simt_set_block_order(0)


@pytest.fixture(params=["simt", "cuda"])
def kernels(request):
    """The CUDA kernels through one backend (test_kernels_simt.KernelBackend): "simt", the emulator,
    always; "cuda" where the build has the device kernels and torch sees a GPU."""
    import test_kernels_simt  # the adapter sits beside the oracles and the dtype / activation codes it uses

    if request.param == "cuda" and not test_kernels_simt.cuda_kernels_available():
        pytest.skip("needs a CUDA build of sparsegemm._C and a CUDA GPU (torch.cuda.is_available())")
    return test_kernels_simt.KernelBackend(request.param)
