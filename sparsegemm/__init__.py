"""sparsegemm: 2:4 structured sparsity that pays off, on sparse tensor cores and on any CPU.

Contract: ``Y[M, N] = X[M, K] @ W[N, K]^T (+ bias[N])``, W 2:4 sparse along K (see DESIGN.md and
:mod:`sparsegemm.format`). Importing never touches CUDA.
"""
from . import format, oracle
from ._info import info
from .functional import compress, decompress, linear, mask_2to4, prune_2to4
from .interop import from_cutlass, to_cutlass
from .tensor import SparseTensor24

__version__ = "0.1.0"

__all__ = [
    "SparseTensor24",
    "compress",
    "decompress",
    "format",
    "from_cutlass",
    "info",
    "linear",
    "mask_2to4",
    "oracle",
    "prune_2to4",
    "to_cutlass",
]
