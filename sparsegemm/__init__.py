"""sparsegemm: 2:4 structured sparsity that pays off, on sparse tensor cores and on any CPU.

Contract: ``Y[M, N] = X[M, K] @ W[N, K]^T (+ bias[N])``, W 2:4 sparse along K (see DESIGN.md and
:mod:`sparsegemm.format`). Importing never touches CUDA.
"""
from . import format, oracle, prune
from .attention import SparseMultiheadAttention
from ._info import info
from .functional import compress, decompress, grouped_linear, linear, mask_2to4, prune_2to4
from .convert import SparsifyReport, sparsify
from .interop import from_cutlass, to_cutlass
from .io import init_empty_weights, load, save
from .nn import SparseConv1d, SparseConv2d, SparseExperts, SparseGatedMLP, SparseLinear, broadcast_compressed
from .tensor import SparseTensor24

__version__ = "0.1.0"

# Submodules imported on first use (``sparsegemm.quant.quantize_weight(...)`` after a plain
# ``import sparsegemm``): INT8 and the benchmark tools are not every program's.
_LAZY_SUBMODULES = ("bench", "quant", "targets")


def __getattr__(name: str):
    if name in _LAZY_SUBMODULES:
        import importlib

        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list:
    return sorted([*globals(), *_LAZY_SUBMODULES])


__all__ = [
    "SparseConv1d",
    "SparseConv2d",
    "SparseExperts",
    "SparseGatedMLP",
    "SparseLinear",
    "SparseMultiheadAttention",
    "SparseTensor24",
    "SparsifyReport",
    "broadcast_compressed",
    "compress",
    "decompress",
    "format",
    "from_cutlass",
    "grouped_linear",
    "info",
    "init_empty_weights",
    "linear",
    "load",
    "mask_2to4",
    "oracle",
    "prune",
    "prune_2to4",
    "save",
    "sparsify",
    "to_cutlass",
]
