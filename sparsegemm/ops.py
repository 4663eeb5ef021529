"""torch.library custom ops over the torch-free extension, with argument checks and dispatch.

Layering (DESIGN.md): ``_C`` (raw pointers) -> these custom ops (schema, fake impl, checks,
padding, CPU/SIMT/CUDA dispatch) -> :mod:`sparsegemm.functional` -> :mod:`sparsegemm.nn`.

Every error names the op, the argument, what was expected and what came. Outputs are allocated
here (torch's allocator) and kernels run on the caller's current CUDA stream; the only host sync
is strict ``compress`` on CUDA, which must report a non-2:4 group.
"""
from __future__ import annotations

import functools
import inspect
import numbers
import threading
from typing import NamedTuple, Optional

import torch
from torch import Tensor

from . import _C
from . import format as fmt


def _tag_compile_caches() -> None:
    """torch.compile's caches key a graph by its ops and inputs, not by the Python behind a custom
    op (its fake implementation, its backward) nor by the extension it calls: a graph compiled
    with one build of sparsegemm was reused by the next (a stale backward ran; a changed kernel
    metadata size failed inside cached graphs). A fingerprint of this package's sources and of its
    extension joins torch.compiler.config.cache_key_tag. The tag is process-wide: graphs without
    sparsegemm ops compile again once per fingerprint too."""
    import hashlib
    import os
    import pathlib

    digest = hashlib.sha256()
    for source in sorted(pathlib.Path(__file__).parent.glob("*.py")):
        digest.update(source.read_bytes())
    extension = os.stat(_C.__file__)
    digest.update(f"{extension.st_size}:{extension.st_mtime_ns}".encode())
    tag = f"sparsegemm-{digest.hexdigest()[:16]}"
    config = torch.compiler.config
    if tag not in config.cache_key_tag:
        config.cache_key_tag = f"{config.cache_key_tag}+{tag}" if config.cache_key_tag else tag


_tag_compile_caches()

BACKENDS = ("cpu", "simt", "cuda")
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# The tensor-core kernels (CUDA and their emulator twin) take the 16-bit types only.
KERNEL_DTYPES = (torch.float16, torch.bfloat16)
_INT32_MAX = 2**31 - 1
_CUDA_BUILT = bool(_C.build_info()["cuda_built"])

# From this many rows of X the CPU path may stop gathering X per 2:4 group and instead decompress
# W a row tile at a time into a cache-sized scratch and run torch's dense GEMM on it
# (_cpu_dense_tiles_win says for which dtypes). On the CPU 2:4 saves bytes, not multiply-adds: the
# gathering kernel pays a permute per multiply-add instruction, so once the GEMM is compute bound
# a dense GEMM wins where it runs at full rate: on the dtype's native dot-product instructions
# (_C.cpu_has_native_dot: bf16 on AVX512-BF16, fp16 on AVX512-FP16), for fp32 against the AVX2
# kernel (two permutes and a blend per FMA) and for a short K (CPU_FP32_KERNEL_MIN_K), and against
# the portable scalar kernel. Where torch widens a 16-bit dtype to fp32 instead, and for fp32 with
# a long K against the AVX-512 kernel, the gathering kernel stays ahead at every M. Measured on the
# 2-core AVX-512 VM (L3 flushed, 4096^2, 11008 x 4096, 4096 x 11008): avx512 bf16 gathering 1-9%
# faster at M = 64, the tiles 2-12% faster at M = 96 (1.3x at 512), fp16 gathering 4.0-4.5x
# torch's dense fp16 GEMM at M = 64-2048, fp32 0.92-1.6x at M = 96-2048 (K = 4096); avx2 kernels
# against MKL / oneDNN held to AVX2: fp32 dense 1.25x at M = 80, 2x at 512; bf16 / fp16 gathering
# 1.6-2x at M = 32-512.
# Tried and dropped (2026-11-27): a bf16 kernel with lanes over 16 rows of X, a broadcast weight
# pair and one VDPBF16PS per (W row, group) against X pairs packed per legal nibble, so nothing is
# permuted. Each VDPBF16PS then loads 64 bytes of packed X that no other W row shares, and on the
# VM's Zen 4 cores L2 -> L1 held it to 1.55e9 a second per core (2.3-2.5e9 in a microbenchmark with
# everything in L2): 4096^2 at M = 512 in 38-48 ms against 40-42 ms for the dense tiles. Its fp32
# form for fp16 / fp32 would be bound the same way, at the gathering kernel's 1.4e9 FMAs a second.
CPU_DENSE_TILE_MIN_M = 80
# Below this K even fp32 takes the tiles against the AVX-512 kernel, whose per-output reduction of
# its 16 lanes weighs on a short dot product: MKL 1.4-2.3x at K = 64-256, 1.15x at 576, parity at
# 1152 (M = 512 / 6272, N = 4096 / 512); 1.1x for the kernel at K = 4096.
CPU_FP32_KERNEL_MIN_K = 1024
_CPU_NATIVE_DOT = frozenset(dtype for dtype in KERNEL_DTYPES if _C.cpu_has_native_dot(fmt.DTYPE_CODES[dtype]))
# The INT8 GEMM takes the tiles (torch._int_mm) on CPUs with int8 dot products (VNNI) from this
# many rows of X: its sparse kernel (vpermt2b + vpdpbusd) is a permute per multiply-add as well,
# but dense int8 only pulls ahead later. Measured on the VM (4096^2, 11008 x 4096, 4096 x 11008):
# the tiles 0.83-1.06x the kernel at M = 96-160, 0.94-1.10x at 256, 1.17-1.38x at 384.
CPU_DENSE_TILE_MIN_M_S8 = 256
_CPU_DENSE_TILES_S8 = bool(_C.cpu_has_native_dot(fmt.DTYPE_CODES[torch.int8]))
_CPU_TILE_BYTES = 8 << 20
_thread_buffers = threading.local()  # _reused_buffer's per-thread cache

_cpu_threads: Optional[int] = None


def _sync_threads() -> None:
    """Keep the extension's thread pool the size torch uses (torch.set_num_threads applies)."""
    global _cpu_threads
    n = torch.get_num_threads()
    if n != _cpu_threads:
        _C.cpu_set_num_threads(n)
        _cpu_threads = n


def _ptr(t: Optional[Tensor]) -> int:
    return 0 if t is None else t.data_ptr()


# The raw current-stream handle without building a torch.cuda.Stream object (a few us a call on
# the decode path); the public route where this torch lacks the private getter.
_raw_stream = getattr(torch._C, "_cuda_getCurrentRawStream", None)


def storage_state(t: Tensor) -> tuple:
    """(data pointer, version) of ``t``: what a ``.data`` swap or swap_tensors (the pointer) and an
    in-place edit (the version; None for an inference tensor, which has no counter) change. Caches
    of what was derived from a tensor compare it, beside holding the tensor itself."""
    return t.data_ptr(), None if t.is_inference() else t._version


def versioned(t: Tensor, copy: bool = False) -> Tensor:
    """``t`` (``copy``: a copy of it), made a normal tensor where it is an inference tensor (made
    under torch.inference_mode: no version counter). Metadata the package holds is kept normal, so
    that the caches of its kernel layout, keyed on the version counter (storage_state), see an
    in-place edit made even inside inference mode (where a normal tensor's counter still counts)."""
    if torch.compiler.is_compiling() or not (copy or t.is_inference()):
        return t.clone() if copy else t
    with torch.inference_mode(False):  # a copy made here is normal whatever mode the caller is in
        return t.clone()


def _stream(t: Tensor) -> int:
    if _raw_stream is not None:
        return _raw_stream(t.get_device())
    return torch.cuda.current_stream(t.device).cuda_stream


_IMPLS: dict = {}


def _custom_op(name: str):
    """torch.library.custom_op (functional: no argument is mutated) that also remembers the plain
    implementation, for :func:`call`."""
    def register(fn):
        op = torch.library.custom_op(name, mutates_args=())(fn)
        _IMPLS[op] = fn
        return op

    return register


def _register_fake(op):
    """Registers the decorated function as ``op``'s fake (meta) implementation, behind a check that
    the call's tensors share one device. With one of them on the meta device torch dispatches the
    whole call to the fake (the implementation, whose checks refuse the mix, never runs), which
    handed back an uninitialised tensor on the others' device as the result."""
    def register(fn):
        signature = inspect.signature(fn)

        @functools.wraps(fn)
        def checked(*args, **kwargs):
            tensors = {}
            for name, arg in signature.bind(*args, **kwargs).arguments.items():
                if isinstance(arg, Tensor):
                    tensors[name] = arg
                elif isinstance(arg, (list, tuple)):
                    tensors.update((f"{name}[{i}]", t) for i, t in enumerate(arg) if isinstance(t, Tensor))
            check_same_device(op._qualname.replace("::", "."), **tensors)
            return fn(*args, **kwargs)

        op.register_fake(checked)
        return checked

    return register


_PLAIN_TENSORS = (Tensor, torch.nn.Parameter)


def _plain_eager(args) -> bool:
    grad = torch.is_grad_enabled()
    for a in args:
        if isinstance(a, (list, tuple)):  # grouped_linear's weights and biases
            if not _plain_eager(a):
                return False
        elif isinstance(a, Tensor):
            if type(a) not in _PLAIN_TENSORS:  # fake, functional, ... tensors
                return False
            if grad and a.requires_grad:
                return False
    return True


def records_graph(args) -> bool:
    """Whether a call on ``args`` is being recorded: traced (torch.compile, fake tensors,
    torch.jit.trace, which sees only what the dispatcher sees), needed by autograd, or under a
    torch.func transform (vmap's wrapped tensors pass for plain ones, but have no storage: the
    dispatcher unwraps them). Such a call must go through the custom ops, in one piece; a plain
    eager one may take shortcuts."""
    return (torch.compiler.is_compiling() or torch.jit.is_tracing() or torch._C._are_functorch_transforms_active()
            or not _plain_eager(args))


def _refuse_forward_ad(op) -> None:
    """NotImplementedError under torch.func.jvp / jacfwd: torch runs a custom op there with a zero
    tangent, so the sparse ops' derivatives came out 0, silently."""
    from torch._C._functorch import TransformType
    from torch._functorch.pyfunctorch import retrieve_all_functorch_interpreters

    if any(interpreter.key() == TransformType.Jvp for interpreter in retrieve_all_functorch_interpreters()):
        raise NotImplementedError(f"{op._qualname}: forward-mode AD (torch.func.jvp, jacfwd) is not implemented for "
                                  "the sparse ops; reverse mode through torch.autograd (backward, "
                                  "torch.autograd.grad) is")


def call(op, *args):
    """Run one of our custom ops: through torch's dispatcher when records_graph, and straight to
    its implementation otherwise. The dispatcher costs about 15 us a call, as much as a
    decode-size kernel."""
    if records_graph(args):
        if not torch.compiler.is_compiling() and torch._C._are_functorch_transforms_active():
            _refuse_forward_ad(op)
        return op(*args)
    return _IMPLS[op](*args)


def _on_tensor_device(fn):
    """Run ``fn`` with its first tensor argument's GPU current: the extension launches on the
    current device (and sizes split-K by its SMs), and torch does not switch devices for a custom
    op's implementation."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        first = args[0] if args else next(iter(kwargs.values()))  # every op takes a tensor first
        if first.is_cuda and first.get_device() != torch.cuda.current_device():
            with torch.cuda.device(first.device):
                return fn(*args, **kwargs)
        return fn(*args, **kwargs)

    return wrapper


# ---- argument checks -------------------------------------------------------------------------

def check_dtype(op: str, name: str, t: Tensor, allowed) -> None:
    """Tensor ``name``'s dtype is in ``allowed``."""
    check_dtype_value(op, name, t.dtype, allowed, "must have dtype in")


def check_dtype_value(op: str, name: str, dtype: torch.dtype, allowed, must: str = "must be one of") -> None:
    """Argument ``name`` (a dtype, or ``must`` saying of what) is in ``allowed``."""
    if dtype not in allowed:
        names = ", ".join(str(d).replace("torch.", "") for d in allowed)
        raise TypeError(f"{op}: {name} {must} ({names}), got {str(dtype).replace('torch.', '')}")


def check_x_matches_weight(op: str, x: Tensor, values: Tensor, allowed, bias: Optional[Tensor] = None) -> None:
    """x's dtype is in ``allowed`` and is the dtype of the weight's stored values and of the bias."""
    check_dtype(op, "the layer's weight", values, allowed)  # a module .double()'d, say: not x's fault
    check_dtype(op, "x", x, allowed)
    if x.dtype != values.dtype:
        raise TypeError(f"{op}: x dtype {str(x.dtype).replace('torch.', '')} does not match the weight dtype "
                        f"{str(values.dtype).replace('torch.', '')}; convert one of them")
    if bias is not None and bias.dtype != x.dtype:
        raise TypeError(f"{op}: bias dtype {str(bias.dtype).replace('torch.', '')} does not match x dtype "
                        f"{str(x.dtype).replace('torch.', '')}")


def check_2d(op: str, name: str, t: Tensor) -> None:
    if t.dim() != 2:
        raise ValueError(f"{op}: {name} must be 2-D, got {t.dim()}-D with shape {tuple(t.shape)}")


def check_same_device(op: str, **tensors: Optional[Tensor]) -> Optional[torch.device]:
    """The device all the given tensors (None: absent) are on; ValueError naming each one's where
    they differ."""
    device = None
    for t in tensors.values():  # one pass and no containers: it runs on every decode call
        if t is None:
            continue
        if device is None:
            device = t.device
        elif t.device != device:
            where = ", ".join(f"{k} on {v.device}" for k, v in tensors.items() if v is not None)
            raise ValueError(f"{op}: all tensors must be on one device, got {where}")
    return device


def resolve_backend(op: str, backend: Optional[str], device: torch.device) -> str:
    """The backend that runs ``op`` on tensors of ``device``: None picks by device."""
    if device.type == "meta":  # a shell (torch.device("meta"), init_empty_weights): no data to compute with
        raise ValueError(f"{op}: the tensors are on the meta device, which holds no data to compute with")
    if backend is None:
        backend = "cuda" if device.type == "cuda" else "cpu"
    if backend not in BACKENDS:
        raise ValueError(f"{op}: backend must be one of {BACKENDS} or None, got {backend!r}")
    if backend == "cuda":
        if device.type != "cuda":
            raise ValueError(f"{op}: backend 'cuda' needs CUDA tensors, got tensors on {device}")
        if not _CUDA_BUILT:
            raise RuntimeError(f"{op}: sparsegemm was built without CUDA kernels (no nvcc at build time, or "
                               "SPARSEGEMM_CUDA=0); rebuild with nvcc on PATH")
    elif device.type != "cpu":
        raise ValueError(f"{op}: backend {backend!r} runs on CPU tensors, got tensors on {device}")
    if backend == "simt" and not hasattr(_C, "simt_gemm"):
        raise RuntimeError(f"{op}: this build has no SIMT emulator")
    return backend


def gemm_fits_32bit(m: int, n: int, k: int) -> bool:
    """Whether the tensor-core kernels can index every operand of a GEMM (X [M, K], Y [M, N], W [N, K])."""
    return max(m * k, m * n, n * k) <= _INT32_MAX


def check_gemm_32bit(op: str, m: int, n: int, k: int) -> None:
    """check_32bit for the operands of a GEMM, without building the keyword arguments in the common case."""
    if not gemm_fits_32bit(m, n, k):
        check_32bit(op, **{"M*K": m * k, "M*N": m * n, "N*K": n * k})


def check_32bit(op: str, **sizes: int) -> None:
    """The tensor-core kernels index with 32-bit integers: refuse sizes they cannot address."""
    for name, value in sizes.items():
        if value > _INT32_MAX:
            raise ValueError(f"{op}: {name} = {value} exceeds 32-bit indexing (max {_INT32_MAX}) of the "
                             "tensor-core kernels; split the tensor or use backend='cpu'")


def _rowmajor(t: Tensor) -> Tensor:
    """A view with unit stride along the last dim and non-negative row stride (copy otherwise)."""
    if t.stride(-1) != 1 or t.stride(0) < t.shape[-1]:
        t = t.contiguous()
    return t


# ---- mask ------------------------------------------------------------------------------------

@_custom_op("sparsegemm::mask_2to4")
@_on_tensor_device
def _mask_2to4(w: Tensor) -> Tensor:
    n, k = w.shape
    if w.device.type == "cpu":
        w = _rowmajor(w)
        mask = torch.empty((n, k), dtype=torch.uint8)
        _sync_threads()
        _C.cpu_mask_2to4(fmt.DTYPE_CODES[w.dtype], w.data_ptr(), n, k, w.stride(0), mask.data_ptr())
        return mask.view(torch.bool)
    if w.device.type == "cuda" and _CUDA_BUILT and w.dtype in KERNEL_DTYPES and w.numel() <= _INT32_MAX:
        # On the GPU the mask is read off the compress kernel's metadata: one selection rule, one kernel.
        _, meta = _compress(w, True, "cuda")
        return meta_to_mask(meta, k)
    return _mask_2to4_torch(w)


def _mask_2to4_torch(w: Tensor) -> Tensor:
    """format.h's selection rule in torch ops (any device, fp32 on the GPU, where the compress
    kernel takes 16-bit types only): rank each position by the positions that beat it."""
    n, k = w.shape
    groups = torch.nn.functional.pad(w, (0, fmt.padded_k(k) - k)).reshape(n, -1, 4)
    nan = torch.isnan(groups)
    mag = torch.where(nan, torch.full_like(groups, float("inf")), groups.abs())
    # beats[..., j, i]: position j ranks before position i (NaN first, then larger |w|, then lower index).
    nj, ni = nan.unsqueeze(-1), nan.unsqueeze(-2)
    mj, mi = mag.unsqueeze(-1), mag.unsqueeze(-2)
    lower = torch.ones(4, 4, dtype=torch.bool, device=w.device).triu(1)
    beats = (nj & ~ni) | ((nj == ni) & ((mj > mi) | ((mj == mi) & lower)))
    kept = beats.sum(dim=-2) < 2
    return kept.reshape(n, -1)[:, :k]


@_register_fake(_mask_2to4)
def _(w: Tensor) -> Tensor:
    return w.new_empty(w.shape, dtype=torch.bool)


def _meta_nibbles(meta: Tensor, k: int) -> Tensor:
    """int64 ``[N, groups]``: each group's metadata nibble (i0 in bits 0-1, i1 in bits 2-3)."""
    g = fmt.num_groups(k)
    return torch.stack([meta & 0xF, meta >> 4], dim=-1).reshape(meta.shape[0], -1)[:, :g].to(torch.int64)


def meta_to_mask(meta: Tensor, k: int) -> Tensor:
    """Boolean ``[N, K]`` of kept positions named by logical metadata (torch ops, any device)."""
    nib = _meta_nibbles(meta, k)
    pos = torch.arange(4, device=meta.device)
    kept = (pos == (nib & 3)[..., None]) | (pos == (nib >> 2)[..., None])
    return kept.reshape(meta.shape[0], -1)[:, :k]


def kept_columns(meta: Tensor, k: int) -> Tensor:
    """int64 ``[N, 2 * groups]``: the K column of each stored value, in the values' order, for K
    padded to a multiple of 4 (format.padded_k, as the values are).

    ``dense.gather(1, kept_columns(meta, kp))`` is ``dense[meta_to_mask(meta, kp)]`` row by row,
    with a shape known before the data: torch.compile traces it without a data-dependent size
    (boolean indexing lowers to nonzero, which breaks the graph under dynamic shapes). Validated
    metadata has i0 < i1, so the order is ascending as the mask's is.
    """
    nib = _meta_nibbles(meta, k)
    base = 4 * torch.arange(nib.shape[1], device=meta.device)
    return torch.stack([base + (nib & 3), base + (nib >> 2)], dim=-1).reshape(meta.shape[0], -1)


# ---- compress / decompress -------------------------------------------------------------------

def _non_24_message(op: str, w: Tensor, flat: int) -> str:
    g = fmt.num_groups(w.shape[1])
    row, group = divmod(flat, g)
    k0 = 4 * group
    vals = w[row, k0:k0 + 4].tolist()
    return (f"{op}: weight is not 2:4 sparse: row {row}, group {group} (columns {k0}..{min(k0 + 3, w.shape[1] - 1)}) "
            f"has more than 2 non-zeros: {vals}. Pass prune=True to apply the magnitude 2:4 mask first.")


@_custom_op("sparsegemm::compress")
@_on_tensor_device
def _compress(w: Tensor, prune: bool, backend: str) -> tuple[Tensor, Tensor]:
    op = "sparsegemm.compress"
    # Called as torch.ops.sparsegemm.compress the backend is whatever was passed: one that does not
    # match w's device handed the C++ side pointers of another device.
    resolve_backend(op, backend, w.device)
    check_dtype(op, "w", w, FLOAT_DTYPES if backend == "cpu" else KERNEL_DTYPES)
    if backend != "cpu":  # the kernels index in 32 bits
        check_32bit(op, **{"w.numel()": w.numel()})
    if w.dim() != 2:
        raise ValueError(f"{op}: w must be 2-D [N, K], got shape {tuple(w.shape)}")
    n, k = w.shape
    values = w.new_empty((n, fmt.values_cols(k)))
    meta = torch.empty((n, fmt.meta_cols(k)), dtype=torch.uint8, device=w.device)
    code = fmt.DTYPE_CODES[w.dtype]
    w = _rowmajor(w)
    if backend == "cpu":
        _sync_threads()
        first_bad = _C.cpu_compress(n, k, w.data_ptr(), w.stride(0), values.data_ptr(), meta.data_ptr(), code, prune)
    elif backend == "simt":
        first_bad = _C.simt_compress(n, k, w.data_ptr(), w.stride(0), values.data_ptr(), meta.data_ptr(), code, prune)
    else:
        bad = torch.full((1,), -1, dtype=torch.int64, device=w.device)
        _C.cuda_compress(n, k, w.data_ptr(), w.stride(0), values.data_ptr(), meta.data_ptr(), code, prune,
                         bad.data_ptr(), _stream(w))
        first_bad = int(bad.item()) if not prune else -1
    if first_bad >= 0:
        raise ValueError(_non_24_message("sparsegemm.compress", w, first_bad))
    return values, meta


@_register_fake(_compress)
def _(w: Tensor, prune: bool, backend: str) -> tuple[Tensor, Tensor]:
    n, k = w.shape
    return (w.new_empty((n, fmt.values_cols(k))),
            w.new_empty((n, fmt.meta_cols(k)), dtype=torch.uint8))


@_custom_op("sparsegemm::decompress")
@_on_tensor_device
def _decompress(values: Tensor, meta: Tensor, k: int, backend: str) -> Tensor:
    _check_operands("sparsegemm.decompress", backend, k, values, meta, reads_kernel_meta=False)
    n = values.shape[0]
    w = values.new_empty((n, k))
    code = fmt.DTYPE_CODES[values.dtype]
    values, meta = values.contiguous(), meta.contiguous()
    if backend == "cpu":
        _sync_threads()
        _C.cpu_decompress(n, k, values.data_ptr(), meta.data_ptr(), w.data_ptr(), code)
    elif backend == "simt":
        _C.simt_decompress(n, k, values.data_ptr(), meta.data_ptr(), w.data_ptr(), code)
    else:
        _C.cuda_decompress(n, k, values.data_ptr(), meta.data_ptr(), w.data_ptr(), code, _stream(values))
    return w


@_register_fake(_decompress)
def _(values: Tensor, meta: Tensor, k: int, backend: str) -> Tensor:
    return values.new_empty((values.shape[0], k))


def _decompress_setup_context(ctx, inputs, output) -> None:
    values, meta, k, backend = inputs
    ctx.save_for_backward(meta)
    ctx.k = k


def _decompress_backward(ctx, grad_w: Tensor):
    """The kept values' gradient (the 2:4 mask is fixed): grad_w at the positions they stand at. The
    backward of linear and conv2d decompresses W with this op, so a double backward reaches the
    values through it (a gradient penalty with the weights trained)."""
    meta, = ctx.saved_tensors
    kp = fmt.padded_k(ctx.k)
    return torch.nn.functional.pad(grad_w, (0, kp - ctx.k)).gather(1, kept_columns(meta, kp)), None, None, None


_decompress.register_autograd(_decompress_backward, setup_context=_decompress_setup_context)


def find_invalid_meta(meta: Tensor, k: int) -> Optional[tuple[int, int]]:
    """(row, group) of the first illegal nibble in logical metadata, or None.

    A row with an odd number of groups must carry the pad nibble 0x4 in its unused last half
    byte; that slot is reported as group ``num_groups(k)``.
    """
    m = meta.detach().to("cpu").contiguous()
    flat = _C.cpu_find_invalid_meta(m.data_ptr(), m.shape[0], k)
    return None if flat < 0 else divmod(flat, 2 * fmt.meta_cols(k))


def may_cache_reorder(meta: Tensor) -> bool:
    """Whether a reordered copy made now may be cached: one made while a CUDA graph is being
    captured is only filled when the graph replays, so an eager call before that would read
    garbage from the cache."""
    return not (meta.device.type == "cuda" and torch.cuda.is_current_stream_capturing())


def _reorder_k(k: int, s8: bool) -> int:
    """The K the kernel layout is made for: the INT8 GEMM is called with K padded to whole groups
    (see _linear_s8), so its layout is too."""
    return fmt.padded_k(k) if s8 else k


def _kernel_meta_bytes(n: int, k: int, backend: str, s8: bool) -> int:
    if backend not in ("simt", "cuda"):
        raise ValueError(f"reorder_meta: backend must be 'simt' or 'cuda', got {backend!r}")
    suffix = "_s8" if s8 else ""
    return getattr(_C, f"{backend}_kernel_meta_bytes{suffix}")(n, _reorder_k(k, s8))


def _check_operands(op: str, backend: str, k: int, values: Optional[Tensor], meta: Optional[Tensor],
                    kernel_meta: Optional[Tensor] = None, *, reads_kernel_meta: bool = True,
                    n: Optional[int] = None, s8: bool = False,
                    values_dtype: Optional[torch.dtype] = None, bias: Optional[Tensor] = None,
                    out_dtype: Optional[torch.dtype] = None, w_scale: Optional[Tensor] = None,
                    x: Optional[Tensor] = None, x_scale: Optional[Tensor] = None) -> None:
    """What the C++ side takes on trust, checked in every op that hands it pointers: the ops
    (torch.ops.sparsegemm.*) are callable without the functional API's checks, and a size that
    disagrees there reads or writes past a buffer (a crash, or results made of whatever lies
    there). Shapes, dtypes, lengths and the kernel metadata's size and 16-byte alignment (the
    kernels copy it with cp.async); no data is read. ``kernel_meta`` is checked on the kernel
    backends where the op reads it (``reads_kernel_meta``), ``x`` against K = ``k``; ``out_dtype``
    (the dtype the op writes: x's, or an INT8 GEMM's output; the bias's too) against the backend's."""
    def refuse(what: str) -> None:
        raise ValueError(f"{op}: {what}")

    if backend not in BACKENDS:
        refuse(f"backend must be one of {BACKENDS}, got {backend!r}")
    if isinstance(k, bool) or not isinstance(k, int) or k <= 0:
        refuse(f"k must be a positive int, got {k!r}")
    # One device, the backend's: a metadata tensor moved (or assigned) apart from its values handed
    # the C++ side a pointer of another device (a crash, or results read from arbitrary memory).
    device = check_same_device(op, values=values, meta=meta, kernel_meta=kernel_meta, bias=bias, w_scale=w_scale,
                               x=x, x_scale=x_scale)
    if device is not None and (device.type == "cuda") != (backend == "cuda"):
        refuse(f"the {backend} backend runs on {'CUDA' if backend == 'cuda' else 'CPU'} tensors, got tensors on "
               f"{device}")
    if values is not None:
        if values.dim() != 2 or values.shape[1] != fmt.values_cols(k):
            refuse(f"values must be [N, {fmt.values_cols(k)}] for K = {k}, got {tuple(values.shape)}")
        if values_dtype is not None and values.dtype != values_dtype:
            refuse(f"values must be {values_dtype}, got {values.dtype}")
        if not s8:
            check_dtype(op, "values", values, FLOAT_DTYPES if backend == "cpu" else KERNEL_DTYPES)
        n = values.shape[0]
    if out_dtype is not None:  # x's dtype, or the INT8 GEMM's output: one the backend's kernels write
        check_dtype_value(op, "the output dtype", out_dtype, FLOAT_DTYPES if backend == "cpu" else KERNEL_DTYPES,
                          f"must be one of the {backend} backend's")
    if meta is not None and (meta.dtype != torch.uint8 or tuple(meta.shape) != (n, fmt.meta_cols(k))):
        refuse(f"meta must be uint8 [{n}, {fmt.meta_cols(k)}] for K = {k}, got {meta.dtype} {tuple(meta.shape)}")
    if backend != "cpu":
        check_gemm_32bit(op, 0 if x is None else x.shape[0], n, k)
    if backend != "cpu" and values is not None and reads_kernel_meta:
        size = _kernel_meta_bytes(n, k, backend, s8)
        if (kernel_meta is None or kernel_meta.dtype != torch.uint8 or kernel_meta.numel() != size
                or not kernel_meta.is_contiguous() or kernel_meta.data_ptr() % 16):
            got = "None" if kernel_meta is None else f"{kernel_meta.dtype} of {kernel_meta.numel()} bytes"
            refuse(f"kernel_meta must be the {backend} layout of this weight ({'int8' if s8 else '16-bit'}: "
                   f"{size} contiguous uint8 bytes, 16-byte aligned), got {got}")
    for name, t, dtype in (("bias", bias, out_dtype), ("w_scale", w_scale, torch.float32)):
        if t is not None and (tuple(t.shape) != (n,) or (dtype is not None and t.dtype != dtype)):
            refuse(f"{name} must be {dtype} of shape ({n},), got {t.dtype} {tuple(t.shape)}")
    if x is not None:
        if x.dim() != 2 or x.shape[1] != k:
            refuse(f"x must be [M, {k}], got {tuple(x.shape)}")
        if x_scale is not None and (x_scale.dtype != torch.float32 or tuple(x_scale.shape) != (x.shape[0],)):
            refuse(f"x_scale must be float32 of shape ({x.shape[0]},), got {x_scale.dtype} {tuple(x_scale.shape)}")


@_custom_op("sparsegemm::reorder_meta")
@_on_tensor_device
def _reorder_meta(meta: Tensor, k: int, backend: str, s8: bool) -> Tensor:
    _check_operands("sparsegemm.reorder_meta", backend, k, None, meta, n=meta.shape[0] if meta.dim() else 0)
    n = meta.shape[0]
    meta = meta.contiguous()
    out = torch.empty(_kernel_meta_bytes(n, k, backend, s8), dtype=torch.uint8, device=meta.device)
    suffix = "_s8" if s8 else ""
    kk = _reorder_k(k, s8)
    if backend == "simt":
        getattr(_C, "simt_reorder_meta" + suffix)(meta.data_ptr(), out.data_ptr(), n, kk)
    else:
        getattr(_C, "cuda_reorder_meta" + suffix)(meta.data_ptr(), out.data_ptr(), n, kk, _stream(meta))
    return out


@_register_fake(_reorder_meta)
def _(meta: Tensor, k: int, backend: str, s8: bool) -> Tensor:
    return meta.new_empty((_kernel_meta_bytes(meta.shape[0], k, backend, s8),))


def reorder_meta(meta: Tensor, k: int, backend: str, s8: bool = False) -> Tensor:
    """Logical metadata -> the hardware-ordered layout the ``backend`` GEMM reads.

    ``s8``: the layout of the INT8 GEMM (mma.sp k64 wants its own order). A custom op, so that
    torch.compile traces a first call that has no cached copy yet. A normal tensor even under
    torch.inference_mode: the layers cache it, and a training call after an inference-mode one
    (a validation pass) saves it for backward, which an inference tensor refuses.
    """
    if not torch.compiler.is_compiling() and torch.is_inference_mode_enabled():
        with torch.inference_mode(False):
            return _reorder_meta(meta, k, backend, s8)
    return _reorder_meta(meta, k, backend, s8)


# ---- GEMM ------------------------------------------------------------------------------------

def _reused_buffer(key, numel: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """A per-thread buffer of at least ``numel`` elements (any contents) kept between calls under
    ``key`` (a fresh one costs an allocation, and page faults on the CPU); grown by replacing it."""
    cache = getattr(_thread_buffers, "buffers", None)
    if cache is None:
        cache = _thread_buffers.buffers = {}
    buffer = cache.get(key)
    if buffer is None or buffer.numel() < numel:
        # A normal tensor even when made under torch.inference_mode: an inference tensor could not
        # be written by torch ops (copy_, out=) in the calls that follow outside that mode.
        with torch.inference_mode(False):
            buffer = cache[key] = torch.empty(numel, dtype=dtype, device=device)
    return buffer


# Temporaries of the CUDA / SIMT launches: the split-K workspace for partial sums and the uint64
# tile counters (any contents at launch either: a counter word carries its launch's token, csrc/
# params.h GemmParams), and the quantized activations of the dynamic INT8 linear. A launch must
# have them to itself while it runs. On the CPU (SIMT) and on the device's default stream they
# are _reused_buffer's: launches on one stream run in order, so no allocation is paid per call;
# per thread, because one thread's INT8 quantize and GEMM launches may interleave with another's
# on the same stream; replacing a buffer is safe, as launches still queued on the stream that use
# it run before anything the caching allocator gives its memory to next on that stream. On any
# other stream they are made per call: a CUDA-graph capture (never on the default stream) then
# draws them from the graph's own memory with no fill node to replay, and torch.compile's
# CUDA-graph trees, which warm up on a stream of their own inside a private memory pool, see only
# short-lived tensors.
def _scratch(x: Tensor, stream: int, purpose: str, numel: int, dtype: torch.dtype) -> Tensor:
    """At least ``numel`` elements of ``dtype`` (any contents) on ``x``'s device for a launch on
    ``stream``. The caller holds the tensor until its launch is issued."""
    if stream != 0:
        return torch.empty(numel, dtype=dtype, device=x.device)
    return _reused_buffer((x.get_device(), purpose), numel, dtype, x.device)


def _launch_scratch(x: Tensor, api: str, scratch_fn: str, stream: int,
                    *plan) -> tuple[Optional[Tensor], Optional[Tensor]]:
    """(workspace, tile counters) for a GEMM launch, (None, None) when the plan needs none.
    ``api``: "simt_" or "cuda_"; ``scratch_fn``: "gemm_scratch" or "gemm_s8_scratch" (plan: M, N,
    K), "gemm_grouped_scratch" or "gemm_s8_grouped_scratch" (plan: their arguments)."""
    workspace_bytes, counters = getattr(_C, api + scratch_fn)(*plan)
    if counters == 0:
        return None, None
    return (_scratch(x, stream, "split_k_workspace", workspace_bytes, torch.uint8),
            _scratch(x, stream, "split_k_counters", counters, torch.int64))


def kernel_backend(backend: Optional[str], x: Tensor) -> Optional[str]:
    """The GPU kernels' backend ("cuda", or "simt" for their emulator) a call with ``backend``
    (None: by device) on ``x`` runs, or None for the CPU backend or a mismatch (the hot paths'
    cheap test; resolve_backend gives the errors)."""
    if backend in (None, "cuda") and x.is_cuda and _CUDA_BUILT:
        return "cuda"
    if backend == "simt" and x.device.type == "cpu":
        return "simt"
    return None


def plain_linear_args(x: Tensor, values: Tensor, n: int, k: int, bias: Optional[Tensor], code: Optional[int]) -> bool:
    """Whether a 16-bit linear's arguments are the common case: a plain x of the weight's float
    dtype with K features, a usable activation ``code``, a bias of shape (n,) in that dtype, all
    on one device (the hot paths' cheap test; the detailed checks name what is wrong)."""
    return (type(x) in _PLAIN_TENSORS and x.dtype is values.dtype and x.dtype in FLOAT_DTYPES
            and x.dim() >= 1 and x.shape[-1] == k and code is not None and x.device == values.device
            and (bias is None or (bias.dtype is x.dtype and bias.shape == (n,) and bias.device == x.device)))


def usable_activation_code(activation: Optional[str], n: int) -> Optional[int]:
    """The kernels' code of ``activation`` for a weight of n rows, or None where
    :func:`activation_code` raises (the hot paths' cheap test)."""
    code = fmt.ACTIVATION_CODES.get(activation) if isinstance(activation, (str, type(None))) else None
    if code is None or (fmt.is_gated(code) and n % (2 * fmt.GATE_ROWS)):
        return None
    return code


def activation_code(op: str, activation: Optional[str], n: int) -> int:
    """The kernels' code of ``activation`` for a weight of n rows, or the error naming what is wrong."""
    code = usable_activation_code(activation, n)
    if code is not None:
        return code
    if not isinstance(activation, (str, type(None))) or activation not in fmt.ACTIVATION_CODES:
        raise ValueError(f"{op}: activation must be one of {fmt.ACTIVATIONS} or None, got {activation!r}")
    raise ValueError(f"{op}: activation {activation!r} is gated: the weight's rows must be gate and up rows "
                     f"interleaved in runs of {fmt.GATE_ROWS} (sparsegemm.format.interleave_gate_up), a multiple "
                     f"of {2 * fmt.GATE_ROWS}; got {n} rows")


def out_features(n: int, activation: int) -> int:
    """Columns of Y for a weight of n rows: half of them under a gated activation."""
    return n // 2 if fmt.is_gated(activation) else n


_TORCH_ACTIVATIONS = {1: torch.relu, 2: torch.nn.functional.gelu, 3: torch.nn.functional.silu}


def _gate_up_columns(z: Tensor) -> tuple[Tensor, Tensor]:
    """(gate, up) columns [M, N / 2] of a gated layer's pre-activations z [M, N]."""
    gate, up = fmt.split_gate_up(z.T)
    return gate.T, up.T


def _gelu_erfc(z: Tensor) -> Tensor:
    """Exact GELU with 1 + erf(z / sqrt 2) as erfc(-z / sqrt 2), as the kernels and the oracle
    compute it: torch's gelu cancels that sum below z = -4 (-0.0 from about -5.9 on, 100% off).
    In float64: erfc multiplies the relative error of its argument by about z^2, so z / sqrt 2
    rounded to fp32 put the fp32 result 1e-6 off at z = -6 (the kernels' fp32 epilogues keep that)."""
    z64 = z.double()
    return (0.5 * z64 * torch.special.erfc(z64 * -0.7071067811865476)).to(z.dtype)


# What activate_torch computes: _TORCH_ACTIVATIONS (which also tells a model's activation by what it
# computes, nn.py), but GELU in the form that keeps its negative tail.
_ACTIVATIONS_COMPUTED = {**_TORCH_ACTIVATIONS, fmt.ACTIVATION_CODES["gelu"]: _gelu_erfc}


def activate_torch(z: Tensor, activation: int) -> Tensor:
    """The activation of nonzero code ``activation`` on pre-activations z [M, N] with torch ops (a
    gated one pairs gate and up columns: [M, N / 2]); in z's dtype."""
    act = _ACTIVATIONS_COMPUTED[activation & ~fmt.GATED_ACTIVATION]
    if not fmt.is_gated(activation):
        return act(z)
    gate, up = _gate_up_columns(z)
    return act(gate) * up


def _cpu_dense_tiles_win(dtype: torch.dtype, k: int) -> bool:
    """Whether, from CPU_DENSE_TILE_MIN_M rows, torch's dense GEMM on decompressed tiles beats the
    gathering kernel of the CPU ISA in use for ``dtype`` and K (see CPU_DENSE_TILE_MIN_M)."""
    if dtype in _CPU_NATIVE_DOT:
        return True
    isa = _C.cpu_isa_name()  # live: tests and bench/bench_cpu.py switch it (_C.cpu_set_isa)
    return isa == "generic" or (dtype == torch.float32 and (isa == "avx2" or k < CPU_FP32_KERNEL_MIN_K))


def cpu_large_m_gemm() -> dict:
    """{dtype name: the CPU GEMM it takes at large M on this CPU and ISA}, INT8 included: "dense
    tiles", "sparse kernel", or for fp32 against the AVX-512 kernel a split by K."""
    def path(wins: bool) -> str:
        return "dense tiles" if wins else "sparse kernel"

    table = {}
    for dtype in FLOAT_DTYPES:
        short, long = _cpu_dense_tiles_win(dtype, 1), _cpu_dense_tiles_win(dtype, CPU_FP32_KERNEL_MIN_K)
        table[str(dtype).removeprefix("torch.")] = (
            path(short) if short == long else f"{path(short)} below K = {CPU_FP32_KERNEL_MIN_K}, else {path(long)}")
    table["int8"] = path(_CPU_DENSE_TILES_S8)
    return table


def _decompressed_tiles(values: Tensor, meta: Tensor, k: int, activation: int):
    """(first row, tile [rows, k]) for W decompressed one row tile (at most _CPU_TILE_BYTES) at a
    time into a reused per-thread scratch, each tile valid until the next is made. A gated layer's
    tiles hold whole runs of gate and up rows (format.interleave_gate_up), whose outputs are the
    tile's own columns of y."""
    n = values.shape[0]
    itemsize = values.element_size()
    tile = max(1, min(n, _CPU_TILE_BYTES // (k * itemsize)))
    if fmt.is_gated(activation):
        pair = 2 * fmt.GATE_ROWS
        tile = max(pair, tile // pair * pair)
    scratch = _reused_buffer(("cpu_dense_tile", values.dtype), tile * k, values.dtype, values.device)
    scratch = scratch[:tile * k].view(tile, k)
    vrow = values.stride(0) * itemsize
    code = fmt.DTYPE_CODES[values.dtype]
    for n0 in range(0, n, tile):
        rows = min(tile, n - n0)
        part = scratch[:rows]
        _C.cpu_decompress(rows, k, values.data_ptr() + n0 * vrow, meta.data_ptr() + n0 * meta.stride(0),
                          part.data_ptr(), code)
        yield n0, part


def _cpu_dense_tiles(x: Tensor, values: Tensor, meta: Tensor, k: int, bias: Optional[Tensor], activation: int,
                     y: Tensor) -> None:
    """Large-M CPU path: torch's dense GEMM on each of _decompressed_tiles and the activation on its
    [M, tile] result, so no temporary is larger than a tile's."""
    n = values.shape[0]
    for n0, part in _decompressed_tiles(values, meta, k, activation):
        rows = part.shape[0]
        b = None if bias is None else bias[n0:n0 + rows]
        if not activation and rows == n:  # one tile: straight into y
            torch.mm(x, part.T, out=y) if b is None else torch.addmm(b, x, part.T, out=y)
            continue
        z = torch.nn.functional.linear(x, part, b)
        out = y[:, out_features(n0, activation):out_features(n0 + rows, activation)]
        # torch's dense GEMM has rounded to the output dtype already, so with an activation this path
        # rounds twice (the activation itself runs in fp32): within the oracle tolerance, not the
        # fused kernels' one rounding.
        out.copy_(activate_torch(z.float(), activation) if activation else z)


def _cpu_dense_tiles_s8(x_q: Tensor, x_scale: Tensor, values: Tensor, meta: Tensor, k: int, w_scale: Tensor,
                        bias: Optional[Tensor], activation: int, y: Tensor) -> None:
    """Large-M INT8 CPU path: torch's dense int8 GEMM (torch._int_mm: exact int32 sums, which the
    caller makes sure cannot wrap) on each of _decompressed_tiles, then the INT8 epilogue of the
    C++ kernel on those sums (_C.cpu_s8_epilogue): the sparse kernel's bits. x_q, x_scale,
    w_scale, bias and y contiguous."""
    m = x_q.shape[0]
    for n0, part in _decompressed_tiles(values, meta, k, activation):
        rows = part.shape[0]
        # [M, tile] int32. A [rows, 1] tile's transpose has strides (1, 1), which torch._int_mm on the
        # CPU misreads (wrong, run-to-run different sums): K = 1 gets a [1, rows] tile of its own.
        acc = torch._int_mm(x_q, part.T if part.shape[1] > 1 else part.reshape(1, -1))
        out = y[:, out_features(n0, activation):]
        _C.cpu_s8_epilogue(m, rows, acc.data_ptr(), acc.stride(0), w_scale.data_ptr() + 4 * n0, x_scale.data_ptr(),
                           0 if bias is None else bias.data_ptr() + n0 * bias.element_size(), out.data_ptr(),
                           y.stride(0), fmt.DTYPE_CODES[y.dtype], activation)


@_custom_op("sparsegemm::linear")
@_on_tensor_device
def _linear(x: Tensor, values: Tensor, meta: Tensor, kernel_meta: Optional[Tensor], k: int, bias: Optional[Tensor],
            activation: int, backend: str) -> Tensor:
    """``meta`` is the logical metadata (CPU backend, autograd); ``kernel_meta`` the reordered copy
    the CUDA / SIMT GEMM reads (None for the CPU backend)."""
    _check_operands("sparsegemm.linear", backend, k, values, meta, kernel_meta, values_dtype=x.dtype, bias=bias,
                    out_dtype=x.dtype, x=x)
    m, n = x.shape[0], values.shape[0]
    y = x.new_empty((m, out_features(n, activation)))
    if m == 0:
        return y
    code = fmt.DTYPE_CODES[x.dtype]
    values = values.contiguous()
    bias = None if bias is None else bias.contiguous()
    if backend == "cpu":
        x = _rowmajor(x)
        meta = meta.contiguous()
        _sync_threads()
        if m >= CPU_DENSE_TILE_MIN_M and _cpu_dense_tiles_win(x.dtype, k):
            _cpu_dense_tiles(x, values, meta, k, bias, activation, y)
        else:
            _C.cpu_gemm(m, n, k, x.data_ptr(), x.stride(0), values.data_ptr(), meta.data_ptr(), _ptr(bias),
                        y.data_ptr(), y.stride(0), code, activation, 0, 0)
    else:
        # The kernels read 16-byte rows with cp.async where X allows it and fall back to element
        # copies otherwise, so any row stride works; a unit stride along K is still required.
        x = _rowmajor(x)
        api = "simt_" if backend == "simt" else "cuda_"
        launch_gemm(api, _stream(x) if backend == "cuda" else 0, x, values, kernel_meta, bias, activation, y)
    return y


def launch_gemm(api: str, stream: int, x: Tensor, values: Tensor, kernel_meta: Tensor, bias: Optional[Tensor],
                activation: int, y: Tensor) -> None:
    """The 16-bit GEMM kernel of ``api`` ("simt_" / "cuda_") with its split-K scratch: x [M, K] with a
    unit stride along K, values, bias and y [M, N] (gated: [M, N / 2]) contiguous, all of one dtype
    and on the current device, M > 0."""
    m, k = x.shape
    n = values.shape[0]
    workspace, counters = _launch_scratch(x, api, "gemm_scratch", stream, m, n, k)
    getattr(_C, api + "gemm")(m, n, k, x.data_ptr(), x.stride(0), values.data_ptr(), kernel_meta.data_ptr(),
                              _ptr(bias), y.data_ptr(), y.stride(0), fmt.DTYPE_CODES[x.dtype], activation,
                              _ptr(workspace), _ptr(counters), -1, 0, stream)  # positional: kwargs cost in pybind


class GroupedWeights(NamedTuple):
    """The weights of a grouped GEMM (params.h GroupedGemmParams) as the launch passes them: one
    data pointer per group for the values, the kernel-layout metadata, the bias (empty list: none)
    and the INT8 weight scale (empty list: a 16-bit GEMM); ``tensors`` keeps what they point into
    alive. Every group's weight is n x k. ``input_scale``: INT8 groups' static activation scales
    (0-d float32 tensors on the device, read at each launch), or an empty list: x quantized per token."""

    n: int
    k: int
    values: list
    kernel_meta: list
    bias: list
    scale: list
    tensors: tuple
    input_scale: list


def grouped_weights(values: list, kernel_meta: list, bias: Optional[list], scale: Optional[list], k: int,
                    input_scale: Optional[list] = None) -> GroupedWeights:
    """GroupedWeights of contiguous per-group tensors (bias / scale / input_scale: None, or one per group)."""
    ptrs = lambda ts: [] if ts is None else [t.data_ptr() for t in ts]  # noqa: E731
    return GroupedWeights(values[0].shape[0], k, ptrs(values), ptrs(kernel_meta), ptrs(bias), ptrs(scale),
                          (values, kernel_meta, bias, scale), list(input_scale or []))


def kernel_readable_scale(scale: Tensor, device: torch.device) -> bool:
    """Whether the quantize kernels can read ``scale`` as a static activation scale through its
    pointer: one float32 element on ``device`` (a float64's bytes or a host address they would
    read as one)."""
    return scale.numel() == 1 and scale.dtype is torch.float32 and scale.device == device


def _quantize_rows_to_scratch(api: str, stream: int, x: Tensor, scale: Optional[Tensor] = None,
                              row_offsets: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    """(x_q, x_scale): x [M, K] (a unit stride along K) quantized by the kernels of ``api`` into the
    stream's reused scratch: per token, or by the static ``scale`` (kernel_readable_scale, or with a
    grouped launch's ``row_offsets`` [G + 1] a contiguous float32 [G] on x's device, group g's rows
    by scale[g]; quant.quantize_static's result)."""
    m, k = x.shape
    x_q = _scratch(x, stream, "x_q", m * k, torch.int8)
    x_scale = _scratch(x, stream, "x_scale", m, torch.float32)
    if scale is None:
        getattr(_C, api + "quantize_rows")(m, k, x.data_ptr(), x.stride(0), fmt.DTYPE_CODES[x.dtype], x_q.data_ptr(),
                                           x_scale.data_ptr(), stream)
    else:
        groups = 0 if row_offsets is None else scale.numel()
        getattr(_C, api + "quantize_rows_static")(m, k, x.data_ptr(), x.stride(0), fmt.DTYPE_CODES[x.dtype],
                                                  scale.data_ptr(), _ptr(row_offsets), groups, x_q.data_ptr(),
                                                  x_scale.data_ptr(), stream)
    return x_q, x_scale


def launch_grouped(api: str, stream: int, x: Tensor, row_offsets: Tensor, max_rows: int, weights: GroupedWeights,
                   activation: int, y: Tensor, config: int = -1, split_k: int = 0) -> None:
    """The grouped GEMM kernel of ``api`` ("simt_" / "cuda_"): rows row_offsets[g] .. row_offsets[g + 1]
    of x [M, K] (a unit stride along K; for INT8 weights a float x, quantized per token here) times
    group g's weight into the same rows of y [M, N] (gated: N / 2; contiguous, x's dtype). Rows no
    group holds are not written. row_offsets: int64 [G + 1], contiguous, on x's device; max_rows: at
    least every group's row count (the launch is sized by it and computes no more). config /
    split_k: as GemmParams' (-1 / 0: planned; the decode tile splits K when the groups that can have
    rows leave the GPU part idle)."""
    m, k = x.shape
    s8 = bool(weights.scale)
    workspace, counters = _launch_scratch(x, api, "gemm_s8_grouped_scratch" if s8 else "gemm_grouped_scratch", stream,
                                          max_rows, weights.n, k, m, len(weights.values), config, split_k)
    scratch = (_ptr(workspace), _ptr(counters), config, split_k, stream)
    if not s8:
        getattr(_C, api + "gemm_grouped")(max_rows, weights.n, k, x.data_ptr(), x.stride(0), m, row_offsets.data_ptr(),
                                          weights.values, weights.kernel_meta, weights.bias, y.data_ptr(), y.stride(0),
                                          fmt.DTYPE_CODES[x.dtype], activation, *scratch)
        return
    group_scale = None
    if weights.input_scale:
        from .quant import static_scale

        if x.device.type == "cpu":  # the emulator: checked where reading them is free, as a layer's are
            for g, s in enumerate(weights.input_scale):
                static_scale(f"sparsegemm.grouped_linear (input_scale[{g}])", s)
        # Each row by its group's static scale, which the kernel finds from the offsets on the device
        # (no host read: capturable).
        group_scale = torch.stack(weights.input_scale)
    x_q, x_scale = _quantize_rows_to_scratch(api, stream, x, group_scale, row_offsets if weights.input_scale else None)
    getattr(_C, api + "gemm_s8_grouped")(max_rows, weights.n, k, x_q.data_ptr(), k, m, row_offsets.data_ptr(),
                                         weights.values, weights.kernel_meta, weights.scale, x_scale.data_ptr(),
                                         weights.bias, y.data_ptr(), y.stride(0), fmt.DTYPE_CODES[y.dtype],
                                         activation, *scratch)


def _given(items: list) -> list:
    """One of grouped_linear's optional per-group lists as the op uses it: [] where none is given,
    whether as an empty list or as tensors with no elements (how traced graphs pass "none":
    AOTInductor's proxy executor hands the op an empty tensor list as None, and torch.jit.trace
    takes no list of optional tensors). No weight's bias, kernel metadata or scale is empty."""
    return [] if all(t.numel() == 0 for t in items) else items


def no_tensors(like: Tensor, groups: int) -> list:
    """The "none given" list a traced call passes for one of grouped_linear's optional lists."""
    return [like.new_empty(0)] * groups


@_custom_op("sparsegemm::grouped_linear")
@_on_tensor_device
def _grouped_linear(x: Tensor, row_offsets: Tensor, values: list[Tensor], meta: list[Tensor],
                    kernel_meta: list[Tensor], k: int, bias: list[Tensor], scale: list[Tensor],
                    input_scale: list[Tensor], activation: int, max_rows: int, backend: str) -> Tensor:
    """functional.grouped_linear's computation: group g's linear (values[g]; ``scale``: INT8
    weights' per-row scales, x then quantized per token, or with ``input_scale[g]``, 0-d float32
    tensors on x's device, where given) on rows row_offsets[g] .. row_offsets[g + 1] - 1 of x [M, K],
    zeros elsewhere. ``meta``: the logical metadata (CPU backend);
    ``kernel_meta``: the reordered copies (CUDA / SIMT). An empty list, or one of empty tensors, is
    none (_given): no reordered copies for the CPU, no bias, no scales (16-bit weights). The CPU
    and SIMT backends read the offsets and check them (and max_rows, which when negative is M: a
    graph torch.jit.trace recorded at one size runs at any); CUDA never reads them on the host."""
    op = "sparsegemm.grouped_linear"
    groups = len(values)
    if not groups or row_offsets.dtype != torch.int64 or tuple(row_offsets.shape) != (groups + 1,) or (
            not row_offsets.is_contiguous()):
        raise ValueError(f"{op}: row_offsets must be a contiguous int64 tensor of shape ({groups + 1},) for {groups} "
                         f"weights, got {row_offsets.dtype} {tuple(row_offsets.shape)}"
                         + ("" if row_offsets.is_contiguous() else f" with strides {row_offsets.stride()}"))
    kernel_meta, bias, scale, input_scale = (_given(t) for t in (kernel_meta, bias, scale, input_scale))
    for name, items in (("meta", meta), ("kernel_meta", kernel_meta), ("bias", bias), ("scale", scale),
                        ("input_scale", input_scale)):
        if items and len(items) != groups:
            raise ValueError(f"{op}: {name} must hold one tensor per weight ({groups}), got {len(items)}")
    s8 = bool(scale)
    if input_scale and not s8:
        raise ValueError(f"{op}: input_scale (static INT8 activations) needs INT8 weights")
    for g, s in enumerate(input_scale):
        if s.shape != () or s.dtype != torch.float32 or s.device != x.device:
            raise ValueError(f"{op}: input_scale[{g}] must be a 0-d float32 tensor on {x.device}, got {s.dtype} "
                             f"{tuple(s.shape)} on {s.device}")
    # Group 0 in full; the others must match it (a loop of cheap comparisons: under torch.compile this
    # runs at every call, for up to hundreds of experts).
    first = [t[0] if t else None for t in (values, meta, kernel_meta, bias, scale)]
    _check_operands(f"{op} (group 0)", backend, k, first[0], first[1], first[2], s8=s8,
                    values_dtype=torch.int8 if s8 else x.dtype, bias=first[3], out_dtype=x.dtype, w_scale=first[4],
                    x=x)
    check_same_device(op, x=x, row_offsets=row_offsets)  # the kernels read the offsets on the device
    if s8 and backend != "cpu" and k % 4:  # the kernels' metadata is laid out for the padded K
        raise ValueError(f"{op}: the INT8 kernels take K a multiple of 4, got {k}")
    for name, items, like in zip(("values", "meta", "kernel_meta", "bias", "scale"),
                                 (values, meta, kernel_meta, bias, scale), first):
        if name == ("kernel_meta" if backend == "cpu" else "meta"):
            continue  # not read by this backend's GEMM (the kernels read the reordered copies)
        for g, t in enumerate(items):
            if t.shape != like.shape or t.dtype != like.dtype or t.device != like.device or (
                    name == "kernel_meta" and (t.data_ptr() % 16 or not t.is_contiguous())):
                raise ValueError(f"{op}: {name}[{g}] must match {name}[0] ({like.dtype} {tuple(like.shape)} on "
                                 f"{like.device}{', contiguous, 16-byte aligned' if name == 'kernel_meta' else ''}), "
                                 f"got {t.dtype} {tuple(t.shape)} on {t.device}")
    m, n = x.shape[0], values[0].shape[0]
    max_rows = m if max_rows < 0 else max_rows
    y = x.new_zeros((m, out_features(n, activation)))
    if backend != "cuda":
        offsets = row_offsets.tolist()
        for g in range(groups):
            if not 0 <= offsets[g] <= offsets[g + 1] <= m:
                raise ValueError(f"{op}: row_offsets must rise from >= 0 to <= M = {m}, got {offsets[g]} then "
                                 f"{offsets[g + 1]} at group {g}")
            if offsets[g + 1] - offsets[g] > max_rows:
                raise ValueError(f"{op}: group {g} has {offsets[g + 1] - offsets[g]} rows, more than max_rows = "
                                 f"{max_rows}")
    if m == 0 or max_rows == 0:
        return y
    if backend == "cpu":
        for g in range(groups):
            rows = slice(offsets[g], offsets[g + 1])
            if rows.stop > rows.start:
                b = bias[g] if bias else None
                if not scale:
                    y[rows] = _IMPLS[_linear](x[rows], values[g], meta[g], None, k, b, activation, "cpu")
                else:
                    y[rows] = _IMPLS[_linear_s8_float](x[rows], values[g], meta[g], None, scale[g],
                                                       input_scale[g] if input_scale else None, k, b, activation,
                                                       x.dtype, "cpu")
        return y
    contiguous = lambda ts: [t.contiguous() for t in ts] or None  # noqa: E731
    table = grouped_weights(contiguous(values), kernel_meta, contiguous(bias), contiguous(scale), k, input_scale)
    x = _rowmajor(x)
    launch_grouped(backend + "_", _stream(x) if backend == "cuda" else 0, x, row_offsets.contiguous(), max_rows,
                   table, activation, y)
    return y


@_register_fake(_grouped_linear)
def _(x: Tensor, row_offsets: Tensor, values: list[Tensor], meta: list[Tensor], kernel_meta: list[Tensor], k: int,
      bias: list[Tensor], scale: list[Tensor], input_scale: list[Tensor], activation: int, max_rows: int,
      backend: str) -> Tensor:
    return x.new_empty((x.shape[0], out_features(values[0].shape[0], activation)))


@_custom_op("sparsegemm::grouped_linear_grads")
@_on_tensor_device
def _grouped_linear_grads(grad_y: Tensor, x: Tensor, row_offsets: Tensor, values: list[Tensor], meta: list[Tensor],
                          kernel_meta: list[Tensor], k: int, bias: list[Tensor], scale: list[Tensor],
                          input_scale: list[Tensor], activation: int, max_rows: int, backend: str, need_x: bool,
                          need_values: bool, need_bias: bool) -> tuple[Tensor, list[Tensor], list[Tensor]]:
    """_grouped_linear's gradients: each group's _linear_grads on its rows (the first max_rows of
    them: the rows the forward computed), or with int8 weights (``scale``: theirs) its
    _int8_linear_grads, the values getting none; zeros on rows no group holds; (grad x, grad
    values per group, grad bias per group), each empty where not needed. An op of its own, so that
    a compiled backward calls it whole: it reads the offsets on the host."""
    grad_x = torch.zeros_like(x) if need_x else x.new_empty(0)
    grad_values = [torch.zeros_like(v) if need_values else v.new_empty(0) for v in values]
    grad_bias = [torch.zeros_like(b) if need_bias else b.new_empty(0) for b in bias]
    offsets = row_offsets.tolist()
    m = x.shape[0]
    max_rows = m if max_rows < 0 else max_rows
    for g in range(len(values)):
        # The rows the forward computed: the offsets clamped into x as the CUDA kernel clamps them
        # (gemm_sp.cuh GroupedRowMajorX), at most max_rows of them.
        first = min(max(offsets[g], 0), m)
        end = min(max(offsets[g + 1], first), m, first + max_rows)
        if end == first:
            continue
        rows_meta, rows_bias = kernel_meta[g] if kernel_meta else None, bias[g] if bias else None
        if scale:
            gv = None
            gx, gb = _int8_linear_grads(grad_y[first:end], x[first:end], values[g], meta[g], rows_meta, scale[g],
                                        input_scale[g] if input_scale else None, k, rows_bias, activation, backend,
                                        need_x, need_bias)
        else:
            gx, gv, gb = _linear_grads(grad_y[first:end], x[first:end], values[g], meta[g], rows_meta, k, rows_bias,
                                       activation, backend, need_x, need_values, need_bias)
        if gx is not None:
            grad_x[first:end] = gx
        if gv is not None:
            grad_values[g] = gv
        if gb is not None:
            grad_bias[g] = gb
    return grad_x, grad_values, grad_bias


@_register_fake(_grouped_linear_grads)
def _(grad_y: Tensor, x: Tensor, row_offsets: Tensor, values: list[Tensor], meta: list[Tensor],
      kernel_meta: list[Tensor], k: int, bias: list[Tensor], scale: list[Tensor], input_scale: list[Tensor],
      activation: int, max_rows: int, backend: str, need_x: bool, need_values: bool,
      need_bias: bool) -> tuple[Tensor, list[Tensor], list[Tensor]]:
    return (torch.empty_like(x) if need_x else x.new_empty(0),
            [torch.empty_like(v) if need_values else v.new_empty(0) for v in values],
            [torch.empty_like(b) if need_bias else b.new_empty(0) for b in bias])


def _grouped_linear_setup_context(ctx, inputs, output) -> None:
    x, row_offsets, values, meta, kernel_meta, k, bias, scale, input_scale, activation, max_rows, backend = inputs
    ctx.passed = [len(t) for t in (kernel_meta, bias, scale, input_scale)]  # the gradients' list lengths
    kernel_meta, bias, scale, input_scale = (_given(t) for t in (kernel_meta, bias, scale, input_scale))
    ctx.lists = len(values), len(meta), len(kernel_meta), len(bias), len(scale)
    ctx.save_for_backward(x, row_offsets, *values, *meta, *kernel_meta, *bias, *scale, *input_scale)
    ctx.k, ctx.activation, ctx.max_rows, ctx.backend = k, activation, max_rows, backend


def _grouped_linear_backward(ctx, grad_y: Tensor):
    groups, metas, kernel_metas, biases, scales = ctx.lists
    x, row_offsets, *rest = ctx.saved_tensors
    values, meta = rest[:groups], rest[groups:2 * groups]
    kernel_meta = rest[2 * groups:2 * groups + kernel_metas]
    bias = rest[2 * groups + kernel_metas:][:biases]
    scale = rest[2 * groups + kernel_metas + biases:][:scales]
    input_scale = rest[2 * groups + kernel_metas + biases + scales:]
    # A list argument's entry is a list of flags, one per tensor.
    need_x, need_values, need_bias = (any(flag) if isinstance(flag, (list, tuple)) else bool(flag)
                                      for flag in (ctx.needs_input_grad[i] for i in (0, 2, 6)))
    # INT8 scales get no gradient: _int8_gradient refuses when run (returned, so that it runs).
    passed_kernel_meta, passed_bias, passed_scale, passed_input_scale = ctx.passed

    def refused(tensors, needs, passed: int) -> list:
        if not tensors:  # none given: one None per entry passed
            return [None] * passed
        return [_int8_gradient(grad_y, list(s.shape), s.dtype) if need else None for s, need in zip(tensors, needs)]

    scale_grads = refused(scale, ctx.needs_input_grad[7], passed_scale)
    input_scale_grads = refused(input_scale, ctx.needs_input_grad[8], passed_input_scale)
    # Eager, the op's implementation itself, whose torch ops autograd records under create_graph
    # (a double backward, as through linear's); traced, the op, which reads the offsets on the host.
    grads = _grouped_linear_grads if torch.compiler.is_compiling() else _IMPLS[_grouped_linear_grads]
    grad_x, grad_values, grad_bias = grads(
        grad_y, x, row_offsets, values, meta, kernel_meta, ctx.k, bias, scale, input_scale, ctx.activation,
        ctx.max_rows, ctx.backend, need_x, need_values and not scale, need_bias)
    # Lists get lists (the op's inputs' structure), of None where no gradient flows.
    return (grad_x if need_x else None, None,
            list(grad_values) if need_values and not scale else [None] * groups,
            [None] * metas, [None] * passed_kernel_meta, None, list(grad_bias) if need_bias else [None] * passed_bias,
            scale_grads, input_scale_grads, None, None, None)


_grouped_linear.register_autograd(_grouped_linear_backward, setup_context=_grouped_linear_setup_context)


@_register_fake(_linear)
def _(x: Tensor, values: Tensor, meta: Tensor, kernel_meta: Optional[Tensor], k: int, bias: Optional[Tensor],
      activation: int, backend: str) -> Tensor:
    return x.new_empty((x.shape[0], out_features(values.shape[0], activation)))


def _activation_grad(z: Tensor, activation: int) -> Tensor:
    """d act(z) / dz in fp32, for the pre-activation z (``activation``: a nonzero code without the gated bit)."""
    if activation == 1:
        return (z > 0).to(z.dtype)
    if activation == 2:
        cdf = 0.5 * (1.0 + torch.erf(z * 0.7071067811865476))
        return cdf + z * torch.exp(-0.5 * z * z) * 0.3989422804014327
    sig = torch.sigmoid(z)
    return sig * (1.0 + z * (1.0 - sig))


def _epilogue_grad(grad_y: Tensor, activation: int, preactivations) -> Tensor:
    """The fp32 gradient of a GEMM's output (with its bias) from grad_y, that of the output after
    ``activation``; ``preactivations()``: the GEMM's output with no activation (called only when
    there is one: the backward recomputes it rather than keep it from the forward)."""
    g = grad_y.float()
    if not activation:
        return g
    base = activation & ~fmt.GATED_ACTIVATION
    z = preactivations().float()
    if fmt.is_gated(activation):
        # y = act(gate) * up: d gate = g act'(gate) up, d up = g act(gate), back in the rows' interleaved order.
        gate, up = _gate_up_columns(z)
        return fmt.interleave_gate_up((g * _activation_grad(gate, base) * up).T, (g * activate_torch(gate, base)).T).T
    return g * _activation_grad(z, activation)


def _linear_setup_context(ctx, inputs, output) -> None:
    x, values, meta, kernel_meta, k, bias, activation, backend = inputs
    ctx.save_for_backward(x, values, meta, kernel_meta, bias)
    ctx.k, ctx.activation, ctx.backend = k, activation, backend


def _linear_backward(ctx, grad_y: Tensor):
    x, values, meta, kernel_meta, bias = ctx.saved_tensors
    grad_x, grad_values, grad_bias = _linear_grads(grad_y, x, values, meta, kernel_meta, ctx.k, bias, ctx.activation,
                                                   ctx.backend, *(ctx.needs_input_grad[i] for i in (0, 1, 5)))
    return grad_x, grad_values, None, None, None, grad_bias, None, None


# Bytes of a row tile's fp32 product in _linear_grads' values gradient (eager).
_GRAD_TILE_BYTES = 16 << 20


def _linear_grads(grad_y: Tensor, x: Tensor, values: Tensor, meta: Tensor, kernel_meta: Optional[Tensor], k: int,
                  bias: Optional[Tensor], activation: int, backend: str, need_x: bool, need_values: bool,
                  need_bias: bool) -> tuple:
    """(grad x, grad of the kept values (the 2:4 mask is fixed), grad bias) of _linear's output, each
    None where not needed. Plain torch ops on a transient dense W: the training path favours clarity
    over speed. Eagerly, the values' gradient is taken a tile of W's rows at a time, so that its
    fp32 dense product and gather index stay near _GRAD_TILE_BYTES (the whole of them was 4 to 8
    times W's dense size at once); traced, in one piece (a loop would unroll into the graph)."""
    g = _epilogue_grad(grad_y, activation, lambda: _linear(x, values, meta, kernel_meta, k, bias, 0, backend))
    grad_x = grad_values = grad_bias = None
    if need_x:
        w = _decompress(values, meta, k, "cpu" if values.device.type == "cpu" else "cuda")
        grad_x = (g @ w.float()).to(x.dtype)
        del w  # not held through the values' gradient
    if need_values:
        kp = fmt.padded_k(k)
        x32 = x.float()
        n = values.shape[0]
        tile = n if torch.compiler.is_compiling() else max(1, _GRAD_TILE_BYTES // (4 * kp))
        parts = []
        for n0 in range(0, n, tile):
            full = g[:, n0:n0 + tile].T @ x32
            if kp != k:
                full = torch.nn.functional.pad(full, (0, kp - k))
            parts.append(full.gather(1, kept_columns(meta[n0:n0 + tile], kp)).to(values.dtype))
        grad_values = parts[0] if len(parts) == 1 else torch.cat(parts)
    if bias is not None and need_bias:
        grad_bias = g.sum(0).to(bias.dtype)
    return grad_x, grad_values, grad_bias


_linear.register_autograd(_linear_backward, setup_context=_linear_setup_context)


# ---- implicit-GEMM convolution ---------------------------------------------------------------

def conv_output_size(size: int, kernel: int, stride: int, padding: int, dilation: int) -> int:
    """Output extent of one spatial dim, as torch.nn.functional.conv2d computes it."""
    return (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1


def conv_output_hw(op: str, h: int, w: int, kernel_size, stride, padding, dilation) -> tuple[int, int]:
    """(Ho, Wo) of a convolution of an [H, W] input; ValueError naming ``op`` when either is < 1."""
    ho = conv_output_size(h, kernel_size[0], stride[0], padding[0], dilation[0])
    wo = conv_output_size(w, kernel_size[1], stride[1], padding[1], dilation[1])
    if ho <= 0 or wo <= 0:
        raise ValueError(f"{op}: the input [H, W] = [{h}, {w}] is smaller than the dilated kernel with padding "
                         f"{list(padding)}: output would be {ho} x {wo}")
    return ho, wo


def check_conv_geometry(op: str, kernel_size, stride, padding, dilation) -> None:
    """Each of the four is two integers: kernel_size, stride and dilation >= 1, padding >= 0."""
    for name, pair, low in (("kernel_size", kernel_size, 1), ("stride", stride, 1), ("padding", padding, 0),
                            ("dilation", dilation, 1)):
        if (not isinstance(pair, (list, tuple)) or len(pair) != 2
                or not all(isinstance(v, numbers.Integral) and not isinstance(v, bool) for v in pair)
                or min(pair) < low):
            raise ValueError(f"{op}: {name} must be two integers >= {low}, got {pair!r}")


def _conv2d_shape(op: str, x: Tensor, n: int, kernel_size, stride, padding, dilation) -> tuple[int, int, int, int]:
    """(B, Ho, Wo, Cout) of the NHWC output, after the checks the kernels need."""
    if x.dim() != 4:
        raise ValueError(f"{op}: x must be NHWC [B, H, W, C], got {x.dim()}-D with shape {tuple(x.shape)}")
    check_conv_geometry(op, kernel_size, stride, padding, dilation)
    b, h, w, c = x.shape
    ho, wo = conv_output_hw(op, h, w, kernel_size, stride, padding, dilation)
    m, k = b * ho * wo, c * kernel_size[0] * kernel_size[1]
    # The kernel's implicit-GEMM addressing is 32-bit, including the tail rows of the last M tile.
    check_32bit(op, **{"B*H*W*C": b * h * w * c, "M*N": m * n, "N*K": n * k, "M + 128": m + 128})
    return b, ho, wo, n


@_custom_op("sparsegemm::conv2d")
@_on_tensor_device
def _conv2d(x: Tensor, values: Tensor, meta: Tensor, kernel_meta: Tensor, kernel_size: list[int], stride: list[int],
            padding: list[int], dilation: list[int], bias: Optional[Tensor], activation: int, backend: str) -> Tensor:
    """Implicit-GEMM 2:4 convolution (CUDA / SIMT): x NHWC [B, H, W, Cin] -> NHWC [B, Ho, Wo, Cout].

    The weight is the SparseConv2d matrix [Cout, kh * kw * Cin] in (ky, kx, cin) order: ``meta``
    its logical metadata (autograd), ``kernel_meta`` the reordered copy the kernel reads. The
    kernel reads x where it lies; the only allocation is the output (split-K scratch is reused).
    """
    op = "sparsegemm.conv2d"
    if backend == "cpu":  # the CPU backend convolves in SparseConv2d (patch GEMM or torch's convolution)
        raise ValueError(f"{op}: runs the cuda or simt kernels, got backend 'cpu'")
    check_same_device(op, x=x, values=values)
    if x.dim() != 4 or len(kernel_size) != 2:
        raise ValueError(f"{op}: x must be NHWC [B, H, W, Cin] and kernel_size two ints, got {tuple(x.shape)}, "
                         f"{kernel_size}")
    _check_operands(op, backend, x.shape[3] * kernel_size[0] * kernel_size[1], values, meta, kernel_meta,
                    values_dtype=x.dtype, bias=bias, out_dtype=x.dtype)
    b, ho, wo, n = _conv2d_shape(op, x, values.shape[0], kernel_size, stride, padding, dilation)
    y = x.new_empty((b, ho, wo, n))
    if y.numel() == 0:
        return y
    x = x.contiguous()
    values = values.contiguous()
    bias = None if bias is None else bias.contiguous()
    m, k = b * ho * wo, x.shape[3] * kernel_size[0] * kernel_size[1]
    api = "simt_" if backend == "simt" else "cuda_"
    stream = _stream(x) if backend == "cuda" else 0
    workspace, counters = _launch_scratch(x, api, "gemm_scratch", stream, m, n, k)
    getattr(_C, api + "conv2d")(x.data_ptr(), values.data_ptr(), kernel_meta.data_ptr(), _ptr(bias), y.data_ptr(),
                                b, x.shape[1], x.shape[2], x.shape[3], n, ho, wo, list(kernel_size), list(stride),
                                list(padding), list(dilation), fmt.DTYPE_CODES[x.dtype], activation,
                                workspace=_ptr(workspace), tile_counters=_ptr(counters), stream=stream)
    return y


@_register_fake(_conv2d)
def _(x: Tensor, values: Tensor, meta: Tensor, kernel_meta: Tensor, kernel_size: list[int], stride: list[int],
      padding: list[int], dilation: list[int], bias: Optional[Tensor], activation: int, backend: str) -> Tensor:
    return x.new_empty(_conv2d_shape("sparsegemm.conv2d", x, values.shape[0], kernel_size, stride, padding, dilation))


def _conv2d_setup_context(ctx, inputs, output) -> None:
    x, values, meta, kernel_meta, kernel_size, stride, padding, dilation, bias, activation, backend = inputs
    ctx.save_for_backward(x, values, meta, kernel_meta, bias)
    ctx.geometry = (kernel_size, stride, padding, dilation)
    ctx.activation, ctx.backend = activation, backend


def _conv2d_backward(ctx, grad_y: Tensor):
    """Gradients of x, of the kept values (fixed mask) and of the bias, through torch's dense
    convolution gradients on a transient fp32 weight (training favours clarity, as in linear)."""
    x, values, meta, kernel_meta, bias = ctx.saved_tensors
    kernel_size, stride, padding, dilation = ctx.geometry
    cout, cin, (kh, kw) = values.shape[0], x.shape[3], kernel_size
    k = kh * kw * cin
    g = grad_y.float()
    if ctx.activation:
        z = _conv2d(x, values, meta, kernel_meta, kernel_size, stride, padding, dilation, bias, 0, ctx.backend)
        g = g * _activation_grad(z.float(), ctx.activation)
    g = g.permute(0, 3, 1, 2)  # NCHW view, as convolution_backward takes it
    matrix = _decompress(values, meta, k, "cpu" if values.device.type == "cpu" else "cuda").float()
    weight = matrix.view(cout, kh, kw, cin).permute(0, 3, 1, 2)
    x_nchw = x.permute(0, 3, 1, 2)
    grad_x = grad_values = grad_bias = None
    # One convolution_backward for the three, not torch.nn.grad's conv2d_input and conv2d_weight
    # and a sum for the bias: with those, Inductor (torch 2.13) failed on a compiled dynamic-shape
    # step through a strided convolution ("ValueRangeError: Invalid ranges [0:-1]"; reproduced
    # with a torch-only custom op).
    want_bias = bias is not None and ctx.needs_input_grad[8]
    grad_x_nchw, grad_w, grad_b = torch.ops.aten.convolution_backward(
        g, x_nchw.float(), weight, [cout] if want_bias else None, list(stride), list(padding), list(dilation), False,
        [0, 0], 1, [ctx.needs_input_grad[0], ctx.needs_input_grad[1], want_bias])
    if ctx.needs_input_grad[0]:
        grad_x = grad_x_nchw.permute(0, 2, 3, 1).to(x.dtype)
    if ctx.needs_input_grad[1]:
        kp = fmt.padded_k(k)
        full = torch.nn.functional.pad(grad_w.permute(0, 2, 3, 1).reshape(cout, k), (0, kp - k))
        grad_values = full.gather(1, kept_columns(meta, kp)).to(values.dtype)
    if want_bias:
        grad_bias = grad_b.to(bias.dtype)
    return grad_x, grad_values, None, None, None, None, None, None, grad_bias, None, None


_conv2d.register_autograd(_conv2d_backward, setup_context=_conv2d_setup_context)


# ---- INT8 (issue 4) --------------------------------------------------------------------------

_INT8_KERNELS = {backend: hasattr(_C, f"{backend}_gemm_s8") for backend in BACKENDS}


def has_int8_kernels(backend: str) -> bool:
    """Whether this build has the INT8 kernels of ``backend`` ("cpu", "simt" or "cuda")."""
    return _INT8_KERNELS[backend]


def require_int8_kernels(op: str, backend: str) -> None:
    if not has_int8_kernels(backend):
        raise RuntimeError(f"{op}: this build has no INT8 kernels for backend {backend!r} "
                           f"(_C.{backend}_gemm_s8 is missing); use backend='cpu' or rebuild")


@_custom_op("sparsegemm::quantize_rows")
@_on_tensor_device
def _quantize_rows(x: Tensor, backend: str) -> tuple[Tensor, Tensor]:
    """Dynamic per-token INT8: (x_q int8 [M, K] contiguous, x_scale float32 [M]) of x [M, K]."""
    resolve_backend("sparsegemm.quantize_rows", backend, x.device)  # as in _compress
    m, k = x.shape
    x_q = torch.empty((m, k), dtype=torch.int8, device=x.device)
    x_scale = torch.empty((m,), dtype=torch.float32, device=x.device)
    if m == 0:
        return x_q, x_scale
    x = _rowmajor(x)
    code = fmt.DTYPE_CODES[x.dtype]
    if backend == "cpu":
        _sync_threads()
        _C.cpu_quantize_rows(m, k, x.data_ptr(), x.stride(0), code, x_q.data_ptr(), x_scale.data_ptr())
    elif backend == "simt":
        _C.simt_quantize_rows(m, k, x.data_ptr(), x.stride(0), code, x_q.data_ptr(), x_scale.data_ptr())
    else:
        _C.cuda_quantize_rows(m, k, x.data_ptr(), x.stride(0), code, x_q.data_ptr(), x_scale.data_ptr(),
                              stream=_stream(x))
    return x_q, x_scale


@_register_fake(_quantize_rows)
def _(x: Tensor, backend: str) -> tuple[Tensor, Tensor]:
    m, k = x.shape
    return x.new_empty((m, k), dtype=torch.int8), x.new_empty((m,), dtype=torch.float32)


@_custom_op("sparsegemm::linear_s8")
@_on_tensor_device
def _linear_s8(x_q: Tensor, x_scale: Tensor, values: Tensor, meta: Tensor, kernel_meta: Optional[Tensor],
               w_scale: Tensor, k: int, bias: Optional[Tensor], activation: int, out_dtype: torch.dtype,
               backend: str) -> Tensor:
    """INT8 GEMM: Y[M, N] (out_dtype) = epilogue(x_q [M, K] @ Wq^T). ``meta`` is the logical
    metadata (CPU); ``kernel_meta`` the s8 reordered copy (CUDA / SIMT), for K padded to whole
    groups: those kernels read x_q as [M, padded_k(k)] and its zero columns add nothing."""
    if x_q.dtype != torch.int8:
        raise ValueError(f"sparsegemm.linear_s8: x_q must be int8, got {x_q.dtype}")
    _check_operands("sparsegemm.linear_s8", backend, k, values, meta, kernel_meta, s8=True, values_dtype=torch.int8,
                    bias=bias, out_dtype=out_dtype, w_scale=w_scale, x=x_q, x_scale=x_scale)
    m, n = x_q.shape[0], values.shape[0]
    y = torch.empty((m, out_features(n, activation)), dtype=out_dtype, device=x_q.device)
    if m == 0:
        return y
    code = fmt.DTYPE_CODES[out_dtype]
    values = values.contiguous()
    x_scale, w_scale = x_scale.contiguous(), w_scale.contiguous()
    bias = None if bias is None else bias.contiguous()
    x_q = _rowmajor(x_q)
    if backend == "cpu":
        _sync_threads()
        meta = meta.contiguous()
        # torch._int_mm sums in int32: dense tiles only where no sum of K / 2 products of at most
        # 128 * 128 can wrap.
        if m >= CPU_DENSE_TILE_MIN_M_S8 and _CPU_DENSE_TILES_S8 and fmt.padded_k(k) // 2 * 128 * 128 <= _INT32_MAX:
            _cpu_dense_tiles_s8(x_q, x_scale, values, meta, k, w_scale, bias, activation, y)
            return y
        _C.cpu_gemm_s8(m, n, k, x_q.data_ptr(), x_q.stride(0), values.data_ptr(), meta.data_ptr(),
                       w_scale.data_ptr(), x_scale.data_ptr(), _ptr(bias), y.data_ptr(), y.stride(0), code, activation)
        return y
    kp = fmt.padded_k(k)
    if kp != k:
        x_q = torch.nn.functional.pad(x_q, (0, kp - k))
    api = "simt_" if backend == "simt" else "cuda_"
    _gemm_s8_launch(api, _stream(x_q) if backend == "cuda" else 0, m, n, kp, x_q, x_q.stride(0), x_scale, values,
                    kernel_meta, w_scale, bias, y, code, activation)
    return y


def _gemm_s8_launch(api: str, stream: int, m: int, n: int, k: int, x_q: Tensor, ldx: int, x_scale: Tensor,
                    values: Tensor, kernel_meta: Tensor, w_scale: Tensor, bias: Optional[Tensor], y: Tensor, code: int,
                    activation: int) -> None:
    """The INT8 GEMM kernel of ``api`` ("simt_" / "cuda_") with its split-K scratch: x_q rows ldx
    apart, values / w_scale / bias contiguous, y [M, N] (gated: [M, N / 2]) contiguous (``code``: its dtype's).
    Sizes and strides are passed in, not read off the tensors: this is the decode path's host time."""
    workspace, counters = _launch_scratch(x_q, api, "gemm_s8_scratch", stream, m, n, k)
    getattr(_C, api + "gemm_s8")(m, n, k, x_q.data_ptr(), ldx, values.data_ptr(), kernel_meta.data_ptr(),
                                 w_scale.data_ptr(), x_scale.data_ptr(), _ptr(bias), y.data_ptr(),
                                 out_features(n, activation), code, activation,
                                 _ptr(workspace), _ptr(counters), -1, 0, stream)


@_custom_op("sparsegemm::linear_s8_dynamic")
@_on_tensor_device
def _linear_s8_dynamic(x: Tensor, values: Tensor, kernel_meta: Tensor, w_scale: Tensor, bias: Optional[Tensor],
                       activation: int, out_dtype: torch.dtype, backend: str) -> Tensor:
    """Dynamic INT8 linear on the CUDA / SIMT kernels for K % 4 == 0 (no padding of x_q): the
    per-token quantization of x [M, K] and the INT8 GEMM in one op, x_q and x_scale in reused
    scratch (_scratch) instead of tensors of their own: what :func:`_quantize_rows` then
    :func:`_linear_s8` compute, without the second op's host cost."""
    return _linear_s8_kernels("sparsegemm.linear_s8_dynamic", x, values, kernel_meta, w_scale, bias, activation,
                              out_dtype, backend)


def _linear_s8_kernels(op: str, x: Tensor, values: Tensor, kernel_meta: Tensor, w_scale: Tensor,
                       bias: Optional[Tensor], activation: int, out_dtype: torch.dtype, backend: str,
                       input_scale: Optional[Tensor] = None) -> Tensor:
    """The INT8 linear of float x [M, K] (K % 4 == 0) on the simt / cuda kernels: quantized per
    token, or by the static ``input_scale`` (kernel_readable_scale), into reused scratch, then the
    INT8 GEMM (launch_s8)."""
    if backend == "cpu" or x.dim() != 2 or x.shape[1] % 4:
        raise ValueError(f"{op}: needs the simt / cuda kernels and x [M, K] with K % 4 == 0, got {backend!r}, "
                         f"{tuple(x.shape)}")
    _check_operands(op, backend, x.shape[1], values, None, kernel_meta, s8=True, values_dtype=torch.int8, bias=bias,
                    out_dtype=out_dtype, w_scale=w_scale, x=x)
    m, k = x.shape
    n = values.shape[0]
    y = torch.empty((m, out_features(n, activation)), dtype=out_dtype, device=x.device)
    if m == 0:
        return y
    api = "simt_" if backend == "simt" else "cuda_"
    x = _rowmajor(x)
    bias = None if bias is None else bias.contiguous()
    launch_s8(api, _stream(x) if backend == "cuda" else 0, x, values.contiguous(), kernel_meta, w_scale.contiguous(),
              bias, activation, y, input_scale)
    return y


def launch_s8(api: str, stream: int, x: Tensor, values: Tensor, kernel_meta: Tensor, w_scale: Tensor,
              bias: Optional[Tensor], activation: int, y: Tensor, input_scale: Optional[Tensor] = None) -> None:
    """Quantization of x [M, K] (a unit stride along K, M > 0, K % 4 == 0; per token, or by the
    static ``input_scale``) into reused scratch, then the INT8 GEMM into y (contiguous, the output
    dtype): the kernels of ``api``, every tensor on the current device, values / w_scale / bias
    contiguous."""
    m, k = x.shape
    x_q, x_scale = _quantize_rows_to_scratch(api, stream, x, input_scale)
    _gemm_s8_launch(api, stream, m, values.shape[0], k, x_q, k, x_scale, values, kernel_meta, w_scale, bias, y,
                    fmt.DTYPE_CODES[y.dtype], activation)


@_custom_op("sparsegemm::int8_gradient")
def _int8_gradient(grad: Tensor, shape: list[int], dtype: torch.dtype) -> Tensor:
    """The gradient an INT8 op would pass back to a float input it takes no gradient for (a scale,
    or the x_scale of pre-quantized activations): none exists, and running this says so. An op, not
    a raise in the backward formulas: torch.compile traces those formulas (on fake tensors) for a
    model in grad mode, which must compile and run forward; only a backward that actually runs
    reaches this."""
    raise RuntimeError("sparsegemm: no gradient flows to the INT8 GEMM's scales or through pre-quantized (x_q, "
                       "x_scale) activations: it passes float activations and its bias their straight-through "
                       "gradient; to train the weight, fine-tune the fp16 / bf16 SparseLinear, then quantize")


@_register_fake(_int8_gradient)
def _(grad: Tensor, shape: list[int], dtype: torch.dtype) -> Tensor:
    return grad.new_empty(shape, dtype=dtype)


def _float_input_shapes(ctx, inputs, output) -> None:
    ctx.shapes = [(list(t.shape), t.dtype) if isinstance(t, Tensor) else None for t in inputs]


def _int8_backward(ctx, *grads):
    """Every float input that needs a gradient gets an _int8_gradient, which refuses when run. It
    is made from the gradient of the op's float output (the last: quantize_rows' int8 x_q has
    none), so that it belongs to the backward graph."""
    grad = grads[-1]
    return tuple(_int8_gradient(grad, *ctx.shapes[i]) if needed and ctx.shapes[i] is not None else None
                 for i, needed in enumerate(ctx.needs_input_grad))


# These run in grad mode (a pre-quantized pair), eager or compiled; a backward into their float
# inputs is refused, with that message. Float activations take _linear_s8_float (quant.linear_int8;
# its eager fast path, _linear_s8_dynamic, only where no gradient can be asked for).
for _op in (_quantize_rows, _linear_s8, _linear_s8_dynamic):
    _op.register_autograd(_int8_backward, setup_context=_float_input_shapes)


def dequantized(values: Tensor, meta: Tensor, w_scale: Tensor, k: int) -> Tensor:
    """The dense float32 ``[N, K]`` weight of int8 kept values and their per-row scale (value *
    scale), with torch ops (a gather's index, no data-dependent shape: see kept_columns)."""
    kp = fmt.padded_k(k)
    dense = torch.zeros((values.shape[0], kp), dtype=torch.float32, device=values.device)
    dense.scatter_(1, kept_columns(meta, kp), values.float() * w_scale.float()[:, None])
    return dense[:, :k]


@_custom_op("sparsegemm::linear_s8_float")
@_on_tensor_device
def _linear_s8_float(x: Tensor, values: Tensor, meta: Tensor, kernel_meta: Optional[Tensor], w_scale: Tensor,
                     input_scale: Optional[Tensor], k: int, bias: Optional[Tensor], activation: int,
                     out_dtype: torch.dtype, backend: str) -> Tensor:
    """INT8 linear of float activations x [M, K]: quantized per token (``input_scale`` None) or with
    the static ``input_scale`` (a 0-d float32 tensor on x's device), then the INT8 GEMM
    (quant.linear_int8). One op, so that its backward (_linear_s8_float_backward) sees the float x:
    the int8 x_q between the two steps carries no gradient."""
    if input_scale is not None and not kernel_readable_scale(input_scale, x.device):
        # quant.linear_int8 makes it so; a direct call of the op must too.
        raise ValueError(f"sparsegemm.linear_s8_float: input_scale must be a one-element float32 tensor on x's device "
                         f"({x.device}), got a {str(input_scale.dtype).replace('torch.', '')} tensor of shape "
                         f"{tuple(input_scale.shape)} on {input_scale.device}")
    if backend != "cpu" and k % 4 == 0:
        return _linear_s8_kernels("sparsegemm.linear_s8_float", x, values, kernel_meta, w_scale, bias, activation,
                                  out_dtype, backend, input_scale)
    if input_scale is not None:
        from .quant import quantize_static

        x_q, x_scale = quantize_static(x, input_scale)
    else:
        x_q, x_scale = _IMPLS[_quantize_rows](x, backend)
    return _IMPLS[_linear_s8](x_q, x_scale, values, meta, kernel_meta, w_scale, k, bias, activation, out_dtype,
                              backend)


@_register_fake(_linear_s8_float)
def _(x: Tensor, values: Tensor, meta: Tensor, kernel_meta: Optional[Tensor], w_scale: Tensor,
      input_scale: Optional[Tensor], k: int, bias: Optional[Tensor], activation: int, out_dtype: torch.dtype,
      backend: str) -> Tensor:
    return x.new_empty((x.shape[0], out_features(values.shape[0], activation)), dtype=out_dtype)


def _linear_s8_float_setup_context(ctx, inputs, output) -> None:
    x, values, meta, kernel_meta, w_scale, input_scale, k, bias, activation, out_dtype, backend = inputs
    ctx.save_for_backward(x, values, meta, kernel_meta, w_scale, input_scale, bias)
    ctx.k, ctx.activation, ctx.out_dtype, ctx.backend = k, activation, out_dtype, backend


def _linear_s8_float_backward(ctx, grad_y: Tensor):
    x, values, meta, kernel_meta, w_scale, input_scale, bias = ctx.saved_tensors
    need_x, need_w_scale, need_input_scale, need_bias = (ctx.needs_input_grad[i] for i in (0, 4, 5, 7))
    grad_x, grad_bias = _int8_linear_grads(grad_y, x, values, meta, kernel_meta, w_scale, input_scale, ctx.k, bias,
                                           ctx.activation, ctx.backend, need_x, need_bias)
    refuse = lambda t: _int8_gradient(grad_y, list(t.shape), t.dtype)  # noqa: E731
    return (grad_x, None, None, None, refuse(w_scale) if need_w_scale else None,
            refuse(input_scale) if need_input_scale else None, None, grad_bias, None, None, None)


def _int8_linear_grads(grad_y: Tensor, x: Tensor, values: Tensor, meta: Tensor, kernel_meta: Optional[Tensor],
                       w_scale: Tensor, input_scale: Optional[Tensor], k: int, bias: Optional[Tensor], activation: int,
                       backend: str, need_x: bool, need_bias: bool) -> tuple:
    """(grad x, grad bias) of _linear_s8_float's output, each None where not needed: the
    straight-through estimator (as bitsandbytes' INT8 layers and torch.ao's fake quantization
    use). The quantization of x counts as the identity and W as its dequantized value: grad x = g
    @ W, grad bias = the sum of g over the rows, g being grad_y through the activation at the
    pre-activations recomputed from the same quantized x. With a static scale, inputs it
    saturates (|rint(x / scale)| > 127, quant.QMAX) pass no gradient
    (torch.fake_quantize_per_tensor_affine's rule); a per-token scale saturates nothing. The int8
    values get none: the integer grid has no gradient."""
    g = _epilogue_grad(grad_y, activation, lambda: _linear_s8_float(x, values, meta, kernel_meta, w_scale, input_scale,
                                                                     k, bias, 0, grad_y.dtype, backend))
    grad_x = grad_bias = None
    if need_x:
        grad_x = g @ dequantized(values, meta, w_scale, k)
        if input_scale is not None:
            from .quant import QMAX

            grad_x = grad_x * (torch.round(x.float() / input_scale).abs() <= QMAX)
        grad_x = grad_x.to(x.dtype)
    if bias is not None and need_bias:
        grad_bias = g.sum(0).to(bias.dtype)
    return grad_x, grad_bias


_linear_s8_float.register_autograd(_linear_s8_float_backward, setup_context=_linear_s8_float_setup_context)


@_register_fake(_linear_s8_dynamic)
def _(x: Tensor, values: Tensor, kernel_meta: Tensor, w_scale: Tensor, bias: Optional[Tensor], activation: int,
      out_dtype: torch.dtype, backend: str) -> Tensor:
    return x.new_empty((x.shape[0], out_features(values.shape[0], activation)), dtype=out_dtype)


@_register_fake(_linear_s8)
def _(x_q: Tensor, x_scale: Tensor, values: Tensor, meta: Tensor, kernel_meta: Optional[Tensor], w_scale: Tensor,
      k: int, bias: Optional[Tensor], activation: int, out_dtype: torch.dtype, backend: str) -> Tensor:
    return x_q.new_empty((x_q.shape[0], out_features(values.shape[0], activation)), dtype=out_dtype)
