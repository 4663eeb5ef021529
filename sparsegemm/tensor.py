"""SparseTensor24: a compressed 2:4 weight (values + logical metadata, optional per-row scale)."""
from __future__ import annotations

import operator
from typing import Optional

import torch

from . import format as fmt

_VALUE_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.int8)


def _dense_shape(shape) -> tuple:
    """``shape`` as the (N, K) pair of ints it must be (a longer or fractional one is refused, not cut).
    Integers of any kind: Python's, NumPy's, integer tensors (operator.index takes them all)."""
    try:
        # A bool (or bool tensor) passes operator.index; NumPy's bool does not.
        dims = [operator.index(d) for d in shape
                if not (isinstance(d, bool) or (isinstance(d, torch.Tensor) and d.dtype == torch.bool))]
        whole = len(dims) == len(shape) == 2
    except TypeError:  # not a sequence, or an element that is no integer
        whole = False
    if not whole:
        raise ValueError(f"SparseTensor24: shape must be (N, K), two integers, got {shape!r}")
    return dims[0], dims[1]


def check_metadata(op: str, meta: torch.Tensor, k: int) -> None:
    """ValueError naming the first nibble of logical metadata ``meta`` (uint8 ``[N, ceil(Kp/8)]``)
    that is not an ordered pair of distinct indices (a host read of the data)."""
    from . import ops

    bad = ops.find_invalid_meta(meta, k)
    if bad is not None:
        row, group = bad
        nib = (int(meta[row, group // 2]) >> (4 * (group % 2))) & 0xF
        raise ValueError(f"{op}: corrupt metadata at row {row}, group {group}: nibble 0x{nib:X} is not an ordered "
                         f"pair of distinct indices (legal: 0x4 0x8 0x9 0xC 0xD 0xE"
                         f"{', padding 0x4' if group >= fmt.num_groups(k) else ''})")


def check_padding_values(op: str, values: torch.Tensor, meta: torch.Tensor, k: int) -> None:
    """ValueError where a row keeps a nonzero value in the zero padding of K (K % 4 != 0: the last
    group's columns from K on), which compression never makes. The likely cause is a weight made
    for more input features whose storage has the same size (K = 64 loaded as K = 62), whose last
    columns would then be dropped silently. ``meta``: legal logical metadata (check_metadata)."""
    if k % 4 == 0 or values.numel() == 0:
        return
    group = fmt.num_groups(k) - 1
    nibble = (meta[:, group // 2].to(torch.int32) >> (4 * (group % 2))) & 0xF
    first_padding = k - 4 * group  # positions of the last group from this one on are padding
    kept = values[:, 2 * group:2 * group + 2] != 0
    padded = torch.stack(((nibble & 3) >= first_padding, (nibble >> 2) >= first_padding), dim=1)
    bad = torch.nonzero((kept & padded).any(dim=1))
    if bad.numel():
        row = int(bad[0, 0])
        raise ValueError(f"{op}: row {row} keeps a nonzero value in the zero padding of K = {k} (columns {k} .. "
                         f"{fmt.padded_k(k) - 1}): a weight made for {fmt.padded_k(k)} input features? Its values "
                         "there would be dropped")


def check_int8_values(op: str, values: torch.Tensor) -> None:
    """ValueError where int8 ``values`` hold -128, which symmetric quantization never makes (a host
    read of the data)."""
    if values.numel() and int(values.min()) < -127:
        row = int(torch.nonzero(values == -128)[0][0])
        raise ValueError(f"{op}: int8 values must lie in [-127, 127] (symmetric quantization), got -128 in row {row}")


class KernelMetaCache:
    """The kernel-layout copies (reorder_meta) of one weight's metadata, per key (a layer's: backend
    and device; a SparseTensor24's: backend), each with a tag of what it was made from.

    forget() sets the copies aside instead of freeing them (one a key), and the next copy made under
    the same key outside autograd is written into the old one's memory. Why: a CUDA graph captured
    over a layer reads the copy at its address. Freed by a load_state_dict, an assignment or a
    .half() of a half layer, it was memory the allocator handed on (replays read garbage); written
    in place, a replay reads the refreshed copy, as it reads a weight loaded in place. Under
    autograd a copy gets memory of its own and the one set aside stays: a graph being recorded may
    have saved the old copy for its backward, which an in-place write would spoil. So does a copy
    made for another tag while one is current (another weight sharing the cache). A move to another
    device frees them (keep_only_on)."""

    __slots__ = ("entries", "spare")

    def __init__(self) -> None:
        self.entries: dict = {}  # key -> (tag, tensor)
        self.spare: dict = {}    # key -> tensor, memory for the next copy under key

    def __len__(self) -> int:
        return len(self.entries)

    def get(self, key) -> Optional[tuple]:
        """(tag, tensor) stored under ``key``, or None."""
        return self.entries.get(key)

    def store(self, key, tensor: torch.Tensor, tag=None) -> torch.Tensor:
        """Keep ``tensor`` under ``key`` (in the memory set aside for it, where it may be reused) and
        return the tensor kept. Traced by torch.export or other non-dynamo tracing, or made under a
        torch.func transform: not kept (nothing would put a real tensor in its place)."""
        if torch.compiler.is_compiling():
            if torch.compiler.is_dynamo_compiling():  # a traced copy, which torch.compile's replay keeps
                self.entries[key] = (tag, tensor)
            return tensor
        if torch._C._are_functorch_transforms_active():  # made under vmap: a wrapped tensor, no storage
            return tensor
        spare = self.spare.get(key)
        if (spare is not None and not torch.is_grad_enabled() and spare.shape == tensor.shape
                and spare.device == tensor.device):
            spare.copy_(tensor)
            tensor = self.spare.pop(key)
        if tensor.is_cuda:
            # Made on the caller's stream, and read from then on by calls on any stream, which would
            # not wait for it: once per copy, a wait here.
            torch.cuda.current_stream(tensor.device).synchronize()
        self.entries[key] = (tag, tensor)
        return tensor

    def forget(self) -> None:
        """Set every copy aside: the next get() finds none. Where memory is set aside for a key
        already (its copy was made again under autograd, beside it), that older memory stays: a
        graph captured for inference, the common case, reads it."""
        for key, (_, tensor) in self.entries.items():
            self.spare.setdefault(key, tensor)
        self.entries = {}

    def keep_only_on(self, device: torch.device) -> None:
        """Forget, and free the copies on other devices than ``device`` (the weight moved)."""
        self.forget()
        self.spare = {key: t for key, t in self.spare.items() if t.device == device}

    def stale_keys(self, device: torch.device) -> list:
        """Keys whose copy on ``device`` was set aside and not made again yet."""
        return [key for key, t in self.spare.items() if t.device == device]


class SparseTensor24:
    """A 2:4-sparse weight ``W[N, K]`` stored as kept values and 2-bit metadata.

    Attributes:
        values: ``Wc[N, Kp/2]`` (``Kp = round_up(K, 4)``), the kept values in K order.
        meta: ``E uint8[N, ceil(Kp/8)]``, the logical metadata (see :mod:`sparsegemm.format`).
        shape: ``(N, K)`` of the dense weight, true K.
        scale: optional ``float32[N]`` per-output-channel scale (INT8 weights).

    The CUDA and emulator GEMMs read a hardware-ordered copy of the metadata, made once per
    backend by :meth:`kernel_meta` and cached on the object; it is never saved.

    Built from parts, it checks their shapes, dtypes and devices always, and with ``validate``
    (the default) their data too (:meth:`validate`: a host read of the metadata, and of int8
    values and scales); ``validate=False`` is for parts known good, e.g. just made by compress.
    """

    __slots__ = ("values", "meta", "shape", "scale", "_kernel_meta")

    def __init__(self, values: torch.Tensor, meta: torch.Tensor, shape, scale: Optional[torch.Tensor] = None,
                 *, validate: bool = True):
        for name, t in (("values", values), ("meta", meta)):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"SparseTensor24: {name} must be a tensor, got {type(t).__name__}")
        self.values = values
        self.meta = meta
        self.shape = _dense_shape(shape)
        self.scale = scale
        self._kernel_meta = KernelMetaCache()
        self._check_layout()  # always: the kernels trust these sizes (validate=False skips reading the data)
        if validate:
            self.validate()

    # ---- properties ----------------------------------------------------------------------------
    @property
    def dtype(self) -> torch.dtype:
        """The kept values' dtype (int8 for a quantized weight)."""
        return self.values.dtype

    @property
    def device(self) -> torch.device:
        """Where the values (and metadata and scale) are."""
        return self.values.device

    @property
    def nbytes(self) -> int:
        """Bytes held: values + metadata (+ scale)."""
        total = self.values.nbytes + self.meta.nbytes
        return total + (self.scale.nbytes if self.scale is not None else 0)

    @property
    def dense_nbytes(self) -> int:
        """Bytes of the equivalent dense weight in the same dtype."""
        return self.shape[0] * self.shape[1] * self.values.element_size()

    def __repr__(self) -> str:
        n, k = self.shape
        ratio = self.nbytes / self.dense_nbytes if self.dense_nbytes else 0.0
        scale = ", scale=per-row" if self.scale is not None else ""
        return (f"SparseTensor24(shape=({n}, {k}), dtype={str(self.dtype).replace('torch.', '')}, "
                f"device={self.device}{scale}, nbytes={self.nbytes} ({ratio:.1%} of dense))")

    def __getstate__(self) -> dict:
        # Without the kernel-layout copies: made again after loading, never written to disk.
        return {name: getattr(self, name) for name in ("values", "meta", "shape", "scale")}

    def __setstate__(self, state) -> None:
        if isinstance(state, tuple):  # pickled before __getstate__: (None, {slot: value})
            state = state[1]
        for name in ("values", "meta", "shape", "scale"):
            setattr(self, name, state.get(name))
        self._kernel_meta = KernelMetaCache()

    # ---- checks --------------------------------------------------------------------------------
    def validate(self) -> None:
        """Check shapes, dtypes, devices and that every metadata nibble is a legal ordered pair.

        Raises ValueError naming what is wrong; used for anything that did not come from
        :func:`sparsegemm.compress` (checkpoints, user-built parts, CUTLASS imports).
        """
        self._check_layout()
        n, k = self.shape
        if self.values.dtype == torch.int8:
            from .quant import check_scale

            check_scale("SparseTensor24", "scale", self.scale, n)
            check_int8_values("SparseTensor24", self.values)
        check_metadata("SparseTensor24", self.meta, k)

    def _check_layout(self) -> None:
        """Shapes, dtypes and devices, which the kernels take on trust (no data is read)."""
        n, k = self.shape
        if n <= 0 or k <= 0:
            raise ValueError(f"SparseTensor24: shape must be positive, got {self.shape}")
        if self.values.dtype not in _VALUE_DTYPES:
            raise ValueError(f"SparseTensor24: values dtype must be one of {_VALUE_DTYPES}, got {self.values.dtype}")
        if tuple(self.values.shape) != (n, fmt.values_cols(k)):
            raise ValueError(f"SparseTensor24: values must have shape {(n, fmt.values_cols(k))} for shape "
                             f"{self.shape}, got {tuple(self.values.shape)}")
        if self.meta.dtype != torch.uint8 or tuple(self.meta.shape) != (n, fmt.meta_cols(k)):
            raise ValueError(f"SparseTensor24: meta must be uint8 of shape {(n, fmt.meta_cols(k))}, got "
                             f"{self.meta.dtype} {tuple(self.meta.shape)}")
        if self.meta.device != self.values.device:
            raise ValueError(f"SparseTensor24: values on {self.values.device} but meta on {self.meta.device}")
        if self.values.dtype != torch.int8 and self.scale is not None:
            raise ValueError(f"SparseTensor24: a scale goes with int8 values (their per-row dequantization); "
                             f"{str(self.values.dtype).replace('torch.', '')} values hold their magnitudes, and "
                             "every op would ignore it")
        if self.values.dtype == torch.int8:
            from .quant import check_scale

            check_scale("SparseTensor24", "scale", self.scale, n, values=False)
            if self.scale.device != self.values.device:
                raise ValueError(f"SparseTensor24: scale on {self.scale.device} but values on {self.values.device}")

    # ---- conversions ---------------------------------------------------------------------------
    def to(self, device=None, dtype: Optional[torch.dtype] = None, non_blocking: bool = False) -> "SparseTensor24":
        """This weight on ``device`` and/or with its float values in ``dtype`` (metadata and scale
        follow the device; their dtypes never change). As with ``Tensor.to``, a tensor already on
        that device and in that dtype is shared, not copied: ``.clone()`` its parts for a copy."""
        values = self.values
        if dtype is not None and dtype != values.dtype:
            if values.dtype == torch.int8 or dtype == torch.int8:
                raise ValueError(f"SparseTensor24.to: cannot convert {values.dtype} values to {dtype}; "
                                 "quantize or dequantize explicitly")
            values = values.to(dtype)
        if device is not None:
            values = values.to(device, non_blocking=non_blocking)
        meta = self.meta.to(values.device, non_blocking=non_blocking)
        scale = None if self.scale is None else self.scale.to(values.device, non_blocking=non_blocking)
        out = SparseTensor24(values, meta, self.shape, scale, validate=False)
        if values.device == self.values.device:
            out._kernel_meta = self._kernel_meta  # same metadata, same device: reuse the reorder
        return out

    def cpu(self) -> "SparseTensor24":
        """``self.to("cpu")``."""
        return self.to("cpu")

    def cuda(self, device=None) -> "SparseTensor24":
        """``self.to(device)``, the current CUDA device by default."""
        return self.to(torch.device("cuda") if device is None else device)

    def kernel_meta(self, backend: str) -> torch.Tensor:
        """The hardware-ordered metadata the ``backend`` GEMM reads ("cuda" or "simt"), cached."""
        from . import ops

        # A cached copy answers only for the metadata it was made from (held, not named by id: a
        # tensor made where a freed one was may share its id and address): an assigned ``meta``, a
        # ``.data`` swap (its storage) or an in-place edit (its version; an inference tensor has
        # none) makes it again. Traced by torch.compile, the copy at hand is taken (a compiled
        # graph keeps the reordered metadata it was made with, as SparseLinear's does) and a
        # traced one is never kept.
        meta = self.meta
        compiling = torch.compiler.is_compiling()
        numbers = None if compiling else ops.storage_state(meta)
        cached = self._kernel_meta.get(backend)
        if cached is not None and (compiling or (cached[0][0] is meta and cached[0][1] == numbers)):
            return cached[1]
        kernel = ops.reorder_meta(meta, self.shape[1], backend, s8=self.dtype == torch.int8)
        if not compiling and ops.may_cache_reorder(meta):
            kernel = self._kernel_meta.store(backend, kernel, (meta, numbers))
        return kernel
