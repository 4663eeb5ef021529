"""Public functional API: mask, prune, compress, decompress, linear, grouped_linear.

Weights are ``W[N, K]`` (``nn.Linear.weight``'s shape) and 2:4 runs along K, the last dim.
``backend`` is None (pick by device: "cpu" for CPU tensors, "cuda" for CUDA tensors), "cpu",
"cuda", or "simt" (the CUDA kernels run on the CPU by the SIMT emulator: slow, for verification).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import format as fmt
from . import ops
from .tensor import SparseTensor24

__all__ = ["mask_2to4", "prune_2to4", "compress", "decompress", "linear", "grouped_linear", "ACTIVATIONS"]

ACTIVATIONS = fmt.ACTIVATIONS


def _check_weight(op: str, w: Tensor, dtypes) -> None:
    if not isinstance(w, Tensor):
        raise TypeError(f"{op}: w must be a torch.Tensor, got {type(w).__name__}")
    ops.check_2d(op, "w", w)
    ops.check_dtype(op, "w", w, dtypes)
    if w.shape[0] == 0 or w.shape[1] == 0:
        raise ValueError(f"{op}: w must be non-empty, got shape {tuple(w.shape)}")


def mask_2to4(w: Tensor) -> Tensor:
    """Boolean mask of the magnitude 2:4 pattern of ``w [N, K]``.

    In every aligned group of 4 along K the two largest ``|w|`` are kept. NaN counts as larger
    than any number, so a NaN is never silently dropped; ties go to the lower index (so the
    result is deterministic). When K is not a multiple of 4 the last group is padded with zeros.
    """
    _check_weight("sparsegemm.mask_2to4", w, ops.FLOAT_DTYPES)
    return ops.call(ops._mask_2to4, w)


def prune_2to4(w: Tensor) -> Tensor:
    """``w`` with everything outside :func:`mask_2to4` set to zero (NaN outside the mask too)."""
    return torch.where(mask_2to4(w), w, torch.zeros((), dtype=w.dtype, device=w.device))


def compress(w: Tensor, *, prune: bool = False, backend: Optional[str] = None,
             dtype: Optional[torch.dtype] = None) -> SparseTensor24:
    """Compress a 2:4 weight ``w [N, K]`` into a :class:`SparseTensor24`.

    Strict by default: a weight with more than two non-zeros in any group raises ValueError
    naming the first such row and group. ``prune=True`` applies the magnitude mask first.
    K need not be a multiple of 4: the last group is padded with zeros and the true K kept.
    ``dtype=torch.int8`` quantizes the kept values per output channel
    (:func:`sparsegemm.quant.quantize_weight`); None keeps w's dtype.
    """
    op = "sparsegemm.compress"
    _check_weight(op, w, ops.FLOAT_DTYPES)
    if not isinstance(prune, bool):
        raise TypeError(f"{op}: prune must be True or False, got {prune!r}")
    if dtype is not None and dtype != w.dtype:
        if dtype != torch.int8:
            raise ValueError(f"{op}: dtype must be None, w's dtype or torch.int8, got {dtype}")
        from .quant import quantize_weight

        return quantize_weight(w, prune=prune, backend=backend)
    backend = ops.resolve_backend(op, backend, w.device)
    values, meta = ops.call(ops._compress, w.detach(), prune, backend)  # which checks w's dtype and size
    return SparseTensor24(values, ops.versioned(meta), tuple(w.shape), validate=False)


def decompress(sw: SparseTensor24, *, backend: Optional[str] = None) -> Tensor:
    """The exact dense weight ``[N, K]`` (zeros where nothing is kept)."""
    op = "sparsegemm.decompress"
    if not isinstance(sw, SparseTensor24):
        raise TypeError(f"{op}: sw must be a SparseTensor24, got {type(sw).__name__}")
    if sw.dtype == torch.int8:
        raise TypeError(f"{op}: int8 weights decompress with sparsegemm.quant.dequantize (they need the scale)")
    backend = ops.resolve_backend(op, backend, sw.device)
    if backend != "cpu":
        ops.check_dtype(op, "sw.values", sw.values, ops.KERNEL_DTYPES)
        ops.check_32bit(op, **{"N*K": sw.shape[0] * sw.shape[1]})
    return ops.call(ops._decompress, sw.values, sw.meta, sw.shape[1], backend)


def linear(x: Tensor, sw: SparseTensor24, bias: Optional[Tensor] = None, *, activation: Optional[str] = None,
           backend: Optional[str] = None) -> Tensor:
    """``activation(x @ W^T + bias)`` with W given compressed; x is ``[..., K]``, the result ``[..., N]``.

    Accumulation is fp32 and the result is rounded once to x's dtype, after the bias and the
    activation ("relu", "gelu" (exact erf form), "silu" or None).

    Gated activations ("swiglu", "geglu", "reglu") fuse a GLU: W holds the gate and up
    projections interleaved by :func:`sparsegemm.format.interleave_gate_up` (bias likewise), N a
    multiple of 16, and the result is ``act(x @ gate^T + b_gate) * (x @ up^T + b_up)``, ``[..., N / 2]``,
    in one GEMM (act = silu, gelu, relu).

    An int8 ``sw`` (:func:`sparsegemm.quant.quantize_weight`) runs the INT8 GEMM: x is quantized
    per token here (or given as ``(x_q, x_scale)``); see :func:`sparsegemm.quant.linear_int8`.

    x and bias may also be any DLPack producer (a CuPy or NumPy array): they are used without a
    copy (but for arrays with negative strides, which torch cannot view: those are copied), and the
    result comes back as the same kind of array.
    """
    if not isinstance(sw, SparseTensor24):
        raise TypeError(f"sparsegemm.linear: sw must be a SparseTensor24, got {type(sw).__name__}")
    foreign = _foreign_array_module(x)
    if foreign is not None:
        x = _tensor_of(x, "x")
    if bias is not None and not isinstance(bias, Tensor):
        if not hasattr(bias, "__dlpack__"):
            raise TypeError(f"sparsegemm.linear: bias must be a torch.Tensor or a DLPack array, got "
                            f"{type(bias).__name__}")
        bias = _tensor_of(bias, "bias")
    if sw.dtype == torch.int8:
        from .quant import linear_int8

        y = linear_int8(x, sw, bias, activation=activation, backend=backend)
    else:
        if isinstance(x, tuple):  # what the INT8 GEMM takes, where "x must be a tensor" said too little
            raise TypeError(f"sparsegemm.linear: x as (x_q, x_scale), pre-quantized activations, needs an int8 "
                            f"weight (compress(w, prune=True, dtype=torch.int8)), got a {sw.dtype} one")
        y = linear_parts(x, sw.values, sw.meta, sw.shape, bias, activation=activation, backend=backend,
                         kernel_meta=sw.kernel_meta)
    return y if foreign is None else foreign.from_dlpack(y)


def grouped_linear(x: Tensor, row_offsets: Tensor, weights, bias=None, *, activation: Optional[str] = None,
                   input_scale=None, max_rows: Optional[int] = None, backend: Optional[str] = None) -> Tensor:
    """Many linear layers of one shape, each on its own run of rows of ``x [M, K]``: for every group
    g, with ``o = row_offsets`` (int64 ``[G + 1]``, non-decreasing, from ``o[0] >= 0`` to ``o[G] <= M``),
    ``y[o[g]:o[g + 1]] = linear(x[o[g]:o[g + 1]], weights[g], bias[g], activation=activation)``; rows
    of x outside every group give zero rows of y. What a mixture of experts computes on its tokens
    sorted by expert.

    ``weights``: G :class:`SparseTensor24` of one shape ``[N, K]`` and dtype (int8 ones quantize x per
    token, as :func:`linear` does); ``bias``: None or G tensors ``[N]``. ``input_scale`` (int8
    weights): None, or G static activation scales (positive numbers or one-element float tensors,
    as :func:`sparsegemm.quant.linear_int8` takes), group g's rows quantized with scale g. On the CUDA and SIMT
    backends this is one kernel launch (per 128 groups) that reads the offsets on the device: no
    host synchronisation, so a CUDA graph can capture it, with the routing it replays. There
    ``max_rows`` (default M) must bound every group's row count: it sizes the launch and picks the
    tile (up to 16: the decode tile), and a group beyond it gets only its first max_rows rows
    computed; the CPU and SIMT backends read the offsets and raise instead. INT8 weights on the
    kernels need K % 4 == 0. A custom op like the others (torch.compile traces it whole). Gradients
    (16-bit weights): x, each weight's kept values and each bias get what each group's
    :func:`linear` gives its rows (the backward reads the offsets on the host); with INT8 weights x and
    the biases get each group's straight-through gradient, as from :func:`linear`.
    """
    op = "sparsegemm.grouped_linear"
    weights = list(weights) if isinstance(weights, (list, tuple)) else weights
    if not isinstance(weights, list) or not weights or not all(isinstance(w, SparseTensor24) for w in weights):
        raise TypeError(f"{op}: weights must be a non-empty list of SparseTensor24, got {type(weights).__name__}"
                        + (f" of {sorted({type(w).__name__ for w in weights})}" if isinstance(weights, list) else ""))
    first = weights[0]
    n, k = first.shape
    for g, w in enumerate(weights):
        if w.shape != first.shape or w.dtype != first.dtype or w.device != first.device:
            raise ValueError(f"{op}: every weight must match weights[0] ({n} x {k}, {first.dtype}, {first.device}), "
                             f"got weights[{g}] {w.shape[0]} x {w.shape[1]}, {w.dtype}, {w.device}")
    groups = len(weights)
    if bias is not None:
        bias = list(bias)
        if len(bias) != groups:
            raise ValueError(f"{op}: bias must be None or {groups} tensors (one per weight), got {len(bias)} items")
        for g, b in enumerate(bias):
            if not isinstance(b, Tensor):
                raise ValueError(f"{op}: bias must be None or {groups} tensors (one per weight), got "
                                 f"{type(b).__name__} at bias[{g}] (a bias for some groups only: zeros for the rest)")
        for g, b in enumerate(bias):
            if tuple(b.shape) != (n,) or b.dtype != bias[0].dtype:
                raise ValueError(f"{op}: bias[{g}] must have shape ({n},) and bias[0]'s dtype {bias[0].dtype}, got "
                                 f"{tuple(b.shape)} {b.dtype}")
    if not isinstance(x, Tensor) or x.dim() != 2 or x.shape[1] != k:
        raise ValueError(f"{op}: x must be a [M, {k}] tensor (the weights are {n} x {k}), got "
                         f"{tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__}")
    if not isinstance(row_offsets, Tensor) or row_offsets.dtype != torch.int64 or tuple(row_offsets.shape) != (
            groups + 1,):
        raise ValueError(f"{op}: row_offsets must be an int64 tensor of shape ({groups + 1},) (one more than the "
                         f"weights), got " + (f"{row_offsets.dtype} {tuple(row_offsets.shape)}"
                                              if isinstance(row_offsets, Tensor) else type(row_offsets).__name__))
    code = ops.activation_code(op, activation, n)
    int8 = first.dtype == torch.int8
    if int8:
        ops.check_dtype(op, "x", x, ops.FLOAT_DTYPES)
        if bias is not None:  # converted to the output's dtype, as linear does with an int8 weight
            ops.check_dtype(op, "bias[0]", bias[0], ops.FLOAT_DTYPES)
            bias = [b.to(x.dtype) for b in bias]
    else:
        ops.check_x_matches_weight(op, x, first.values, ops.FLOAT_DTYPES, None if bias is None else bias[0])
    ops.check_same_device(op, x=x, row_offsets=row_offsets, **{"weights[0].values": first.values},
                          bias=None if bias is None else bias[0])
    if bias is not None:
        ops.check_same_device(op, **{f"bias[{g}]": b for g, b in enumerate(bias)})
    m = x.shape[0]
    if max_rows is not None and (not isinstance(max_rows, int) or isinstance(max_rows, bool) or max_rows < 0):
        raise ValueError(f"{op}: max_rows must be a non-negative int, got {max_rows!r}")
    max_rows = m if max_rows is None else min(max_rows, m)  # no group has more rows than x
    backend = ops.resolve_backend(op, backend, x.device)
    kernel_meta = []
    if backend != "cpu":
        ops.check_dtype(op, "x", x, ops.KERNEL_DTYPES)
        ops.check_gemm_32bit(op, m, n, k)
        if int8:
            ops.require_int8_kernels(op, backend)
            if k % 4:
                raise ValueError(f"{op}: INT8 weights on the {backend} kernels need K % 4 == 0, got K = {k}")
        kernel_meta = [w.kernel_meta(backend) for w in weights]  # each reorder on its tensor's GPU
    scales = []
    if input_scale is not None:
        from .quant import _static_scale_tensor

        if not int8:
            raise ValueError(f"{op}: input_scale (static INT8 activations) needs int8 weights, got {first.dtype}")
        input_scale = list(input_scale) if isinstance(input_scale, (list, tuple)) else input_scale
        if not isinstance(input_scale, list) or len(input_scale) != groups:
            raise ValueError(f"{op}: input_scale must be None or {groups} scales (one per weight), got "
                             + (f"{len(input_scale)} items" if isinstance(input_scale, list)
                                else type(input_scale).__name__))
        scales = [_static_scale_tensor(f"{op} (input_scale[{g}])", s, x.device) for g, s in enumerate(input_scale)]
    # Contiguous for the op (a column of a table is a valid argument here; the op takes rows as stored).
    none = ops.no_tensors(x, groups)
    return ops.call(ops._grouped_linear, x, row_offsets.contiguous(), [w.values for w in weights],
                    [w.meta for w in weights], kernel_meta or none, k, bias or none,
                    [w.scale for w in weights] if int8 else none, scales or none, code, max_rows, backend)


def _check_linear_args(op: str, x, values: Tensor, n: int, k: int, bias, activation) -> None:
    """Raise the error that names what is wrong with linear's arguments."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{op}: x must be a torch.Tensor, got {type(x).__name__}")
    ops.activation_code(op, activation, n)
    if x.dim() < 1 or x.shape[-1] != k:
        raise ValueError(f"{op}: x must have K = {k} features in its last dim (the weight is {n} x {k}), "
                         f"got shape {tuple(x.shape)}")
    ops.check_x_matches_weight(op, x, values, ops.FLOAT_DTYPES, bias)
    if bias is not None and tuple(bias.shape) != (n,):
        raise ValueError(f"{op}: bias must have shape ({n},), got {tuple(bias.shape)}")
    ops.check_same_device(op, x=x, **{"sw.values": values}, bias=bias)


def _tensor_of(array, name: str) -> Tensor:
    """A torch view of DLPack array ``name`` (no copy), or of a contiguous copy where its strides are
    negative (a reversed NumPy / CuPy view): torch's from_dlpack aborts the process on those."""
    strides = getattr(array, "strides", None)
    if strides is not None and any(stride < 0 for stride in strides):
        array = _array_module(array).ascontiguousarray(array)
    try:
        return torch.from_dlpack(array)
    except (BufferError, TypeError, RuntimeError) as exc:  # a dtype or byte order DLPack cannot carry
        raise TypeError(f"sparsegemm.linear: {name} ({type(array).__name__} of dtype "
                        f"{getattr(array, 'dtype', '?')}) cannot be shared through DLPack: {exc}") from exc


def _array_module(array):
    """The top-level module (numpy, cupy, ...) that defines ``array``'s type."""
    import importlib

    return importlib.import_module(type(array).__module__.split(".")[0])


def _foreign_array_module(x):
    """The array module (cupy, numpy, ...) of a non-torch DLPack producer, or None for a Tensor."""
    if isinstance(x, Tensor) or not hasattr(x, "__dlpack__"):
        return None
    module = _array_module(x)
    if not hasattr(module, "from_dlpack"):
        raise TypeError(f"sparsegemm.linear: x is a {type(x).__name__} whose module has no from_dlpack")
    return module


def linear_parts(x: Tensor, values: Tensor, meta: Tensor, shape, bias: Optional[Tensor] = None, *,
                 activation: Optional[str] = None, backend: Optional[str] = None, kernel_meta=None,
                 op: str = "sparsegemm.linear") -> Tensor:
    """:func:`linear` on the parts of a compressed weight (what SparseLinear holds).

    ``kernel_meta`` is a callable ``backend -> Tensor`` giving the reordered metadata for the CUDA
    and SIMT backends (cached by the caller), or None for the CPU backend. ``op`` names the caller
    in error messages.
    """
    n, k = shape
    # The common case in one cheap test (the decode path is host bound); anything it does not
    # clear goes through the checks that name what is wrong.
    code = ops.usable_activation_code(activation, n)
    if not ops.plain_linear_args(x, values, n, k, bias, code):
        _check_linear_args(op, x, values, n, k, bias, activation)
    if backend is None and x.is_cuda and ops._CUDA_BUILT:
        backend = "cuda"
    else:
        backend = ops.resolve_backend(op, backend, x.device)
    lead = x.shape[:-1]
    m = x.numel() // k
    reordered = None
    if backend != "cpu":  # checked before x is reshaped, which may copy
        ops.check_dtype(op, "x", x, ops.KERNEL_DTYPES)
        ops.check_gemm_32bit(op, m, n, k)
        reordered = kernel_meta(backend) if kernel_meta is not None else ops.reorder_meta(meta, k, backend)
    x2 = x if len(lead) == 1 else x.reshape(-1, k)
    y = ops.call(ops._linear, x2, values, meta, reordered, k, bias, code, backend)
    return y if len(lead) == 1 else y.reshape(*lead, ops.out_features(n, code))
