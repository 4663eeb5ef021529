"""INT8 for 2:4 weights: per-channel weights, per-token (or calibrated per-tensor) activations.

The contract every backend follows, bit for bit where it says so (the CPU kernel, the CUDA kernel
and :func:`sparsegemm.oracle.linear_int8` agree on it):

* Weights: pruned to 2:4 first, then symmetric per output channel. ``w_scale[n] = amax_n / 127``
  (fp32) with ``amax_n`` the largest ``|kept value|`` of row n, or 1 where that quotient is 0 (an
  all-zero row, or fp32 values below 127 x 2^-150, which then quantize to 0).
  ``q = clamp(rint(w / w_scale), -127, 127)``, fp32 division, round half to even. The int8 values
  keep the layout of :mod:`sparsegemm.format` (2:4 over single int8 elements, same nibbles).
* Activations, dynamic per token (row of X): ``x_scale[m] = amax_m / 127`` (1 where that is 0, as
  for weights), ``q = clamp(rint(x / x_scale[m]), -127, 127)`` with x widened to fp32 first. A row
  holding a NaN gets a NaN scale and zeros, so its output row is NaN. Static mode uses one
  calibrated scale for every row (:class:`Int8Calibrator`); there a row holding a NaN or an
  infinity gets a NaN scale, so its output row is NaN too.
* GEMM: ``acc`` = the exact integer sum saturated to int32; then in fp32, one rounding per step
  and no FMA: ``y = ((float)acc * w_scale[n]) * x_scale[m]``, ``+ bias[n]``, the activation,
  one rounding to the output dtype (x's dtype). The GPU's tensor cores saturate as they go (each
  mma's running sum, .satfinite; with split-K each split's sum, which the last block adds up
  exactly and saturates), so the two agree unless a partial sum of one row leaves the int32 range
  on its way to an in-range total: with |q| <= 127 that takes K beyond about 266k.
"""
from __future__ import annotations

import math
from typing import Iterable, Optional, Union

import torch
from torch import Tensor, nn

from . import format as fmt
from . import ops
from .tensor import SparseTensor24

__all__ = [
    "quantize_weight",
    "dequantize",
    "quantize_activations",
    "quantize_activations_static",
    "linear_int8",
    "check_scale",
    "Int8Calibrator",
]

QMAX = 127
# Kept values quantize_weight converts to fp32 at a time (16 MiB of them).
_QUANTIZE_RUN_ELEMENTS = 1 << 22


def check_scale(op: str, name: str, scale, length: int, *, values: bool = True) -> None:
    """ValueError unless ``scale`` is a float32 tensor of shape ``(length,)`` and (when ``values``)
    finite and positive everywhere (our quantizers only make such scales). Value checks read the
    data (a host sync on CUDA)."""
    if scale is None:
        raise ValueError(f"{op}: {name} is required for int8 weights (float32[{length}]), got None")
    if not isinstance(scale, Tensor):
        raise ValueError(f"{op}: {name} must be a float32 tensor of shape ({length},), got {type(scale).__name__}")
    if scale.dtype != torch.float32 or tuple(scale.shape) != (length,):
        raise ValueError(f"{op}: {name} must be float32 of shape ({length},), got "
                         f"{str(scale.dtype).replace('torch.', '')} {tuple(scale.shape)}")
    if not values:
        return
    bad = ~torch.isfinite(scale) | ~(scale > 0)
    if bool(bad.any()):
        i = int(torch.nonzero(bad)[0])
        raise ValueError(f"{op}: {name} must be finite and positive, got {float(scale[i])!r} at index {i}")


def static_scale(op: str, scale) -> float:
    """A static (per-tensor) activation scale as a float, checked finite and positive."""
    try:
        value = float(scale)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"{op}: scale must be a positive number, got {scale!r}") from exc
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{op}: scale must be finite and positive, got {value!r}")
    return value


def _row_scale(amax: Tensor) -> Tensor:
    """amax / 127 in fp32, 1 where that is 0 (the contract's scale rule)."""
    quotient = amax / QMAX
    return torch.where(quotient == 0, torch.ones_like(quotient), quotient)


def _quantize(v: Tensor, scale: Tensor) -> Tensor:
    """clamp(rint(v / scale), -127, 127) in fp32 (torch.round is half to even); NaN -> 0."""
    q = v / scale  # a new tensor, rounded, clamped and cleaned in place: one fp32 temporary, not four
    return q.round_().clamp_(-QMAX, QMAX).nan_to_num_(nan=0.0).to(torch.int8)


def quantize_weight(w: Tensor, *, prune: bool = True, backend: Optional[str] = None) -> SparseTensor24:
    """Prune (magnitude 2:4, when ``prune``) and quantize ``w [N, K]`` to an int8 SparseTensor24.

    The 2:4 selection runs on ``w`` itself; the kept values are then quantized per output
    channel (module docstring). ``prune=False`` requires ``w`` to be 2:4 already. Non-finite kept
    values raise ValueError (they have no int8 scale). ``backend``: where the 2:4 selection runs
    (None: by device; "simt": the CUDA kernel in the CPU emulator).
    """
    from .functional import compress

    op = "sparsegemm.quant.quantize_weight"
    sw = compress(w, prune=prune, backend=backend)
    n, cols = sw.values.shape
    values = torch.empty((n, cols), dtype=torch.int8, device=sw.values.device)
    scale = torch.empty(n, dtype=torch.float32, device=sw.values.device)
    # In runs of rows, so that the fp32 copy of the kept values is one run's, not the layer's (all at
    # once, converting a layer took about 4x its 16-bit weight's memory at its peak).
    rows = max(1, _QUANTIZE_RUN_ELEMENTS // max(1, cols))
    for first in range(0, n, rows):
        kept = sw.values[first:first + rows].float()
        if not bool(torch.isfinite(kept).all()):
            row = first + int(torch.nonzero(~torch.isfinite(kept))[0][0])
            raise ValueError(f"{op}: w must have finite kept values to be quantized, got a non-finite value in row "
                             f"{row}")
        low, high = torch.aminmax(kept, dim=1)  # max |kept| per row without an fp32 |kept| beside kept
        scale[first:first + rows] = _row_scale(torch.maximum(high, -low))
        values[first:first + rows] = _quantize(kept, scale[first:first + rows, None])
    return SparseTensor24(values, sw.meta, sw.shape, scale, validate=False)


def dequantize(sw: SparseTensor24) -> Tensor:
    """The dense float32 weight ``[N, K]`` an int8 SparseTensor24 stands for (value * scale)."""
    op = "sparsegemm.quant.dequantize"
    if not isinstance(sw, SparseTensor24):
        raise TypeError(f"{op}: sw must be a SparseTensor24, got {type(sw).__name__}")
    if sw.dtype != torch.int8:
        raise TypeError(f"{op}: sw must hold int8 values, got {str(sw.dtype).replace('torch.', '')} "
                        "(use sparsegemm.decompress)")
    n, k = sw.shape
    check_scale(op, "sw.scale", sw.scale, n)
    return ops.dequantized(sw.values, sw.meta, sw.scale, k)


def _check_activations(op: str, x: Tensor, backend: Optional[str]) -> str:
    if not isinstance(x, Tensor):
        raise TypeError(f"{op}: x must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() < 1:
        raise ValueError(f"{op}: x must have at least one dim (K last), got a 0-D tensor")
    ops.check_dtype(op, "x", x, ops.FLOAT_DTYPES)
    if x.shape[-1] == 0:
        raise ValueError(f"{op}: x has no features to quantize (K = 0), got shape {tuple(x.shape)}")
    backend = ops.resolve_backend(op, backend, x.device)
    if backend != "cpu":
        ops.check_dtype(op, "x", x, ops.KERNEL_DTYPES)
        ops.require_int8_kernels(op, backend)
    return backend


def quantize_activations(x: Tensor, *, backend: Optional[str] = None) -> tuple[Tensor, Tensor]:
    """Dynamic per-token INT8 of ``x [..., K]``: ``(x_q int8 [..., K], x_scale float32 [...])``;
    ``backend`` as for :func:`sparsegemm.linear` (None: by device)."""
    backend = _check_activations("sparsegemm.quant.quantize_activations", x, backend)
    k = x.shape[-1]
    x_q, x_scale = ops._quantize_rows(x.reshape(-1, k), backend)
    return x_q.reshape(x.shape), x_scale.reshape(x.shape[:-1])


def quantize_activations_static(x: Tensor, scale: Union[float, Tensor]) -> tuple[Tensor, Tensor]:
    """Static per-tensor INT8 of ``x [..., K]`` with a calibrated ``scale`` (a positive number).

    Returns ``(x_q int8 [..., K], x_scale float32 [...])`` (the scale repeated per token, NaN for a
    token holding a NaN or an infinity, whose output row is then NaN) in the form
    :func:`linear_int8` takes; values beyond ``127 * scale`` saturate.
    """
    op = "sparsegemm.quant.quantize_activations_static"
    if not isinstance(x, Tensor):
        raise TypeError(f"{op}: x must be a torch.Tensor, got {type(x).__name__}")
    ops.check_dtype(op, "x", x, ops.FLOAT_DTYPES)
    return quantize_static(x, _static_scale_tensor(op, scale, x.device))


def _static_scale_tensor(op: str, scale: Union[float, Tensor], device: torch.device) -> Tensor:
    """A static activation scale (a positive number or a one-element float tensor) as a 0-d
    float32 tensor on ``device``."""
    if isinstance(scale, Tensor):
        # A layer's calibrated scale (checked when it was set) or a caller's: its shape always, its
        # value where reading it is free (on the CPU, eager); on a GPU it is used as it is, on its
        # device, so the forward has no host read (no sync, graph capture and torch.compile stay
        # possible).
        if scale.numel() != 1 or not scale.is_floating_point():
            raise ValueError(f"{op}: scale must be a positive number or a one-element float tensor, got a "
                             f"{str(scale.dtype).replace('torch.', '')} tensor of shape {tuple(scale.shape)}")
        if scale.device.type == "cpu" and not torch.compiler.is_compiling():
            static_scale(op, scale.detach())
        return scale.to(device=device, dtype=torch.float32).reshape(())
    # A fill on the device, not torch.tensor's copy from the host: capturable in a CUDA graph.
    return torch.full((), static_scale(op, scale), dtype=torch.float32, device=device)


def quantize_static(x: Tensor, s: Tensor) -> tuple[Tensor, Tensor]:
    """quantize_activations_static's result for a checked scale ``s`` (0-d float32 on x's device):
    the CPU path, and the reference of the kernels' (ops._quantize_rows_to_scratch)."""
    x_q = _quantize(x.float(), s)
    # A token row holding a NaN or an infinity gets a NaN scale, so its output row is NaN, as in
    # dynamic mode (it would otherwise quantize to zeros and saturated values, silently).
    x_scale = torch.where(torch.isfinite(x).all(dim=-1), s, float("nan"))
    return x_q, x_scale


def _dynamic_fast_path(x, sw: SparseTensor24, bias, activation, out_dtype, input_scale,
                       backend) -> Optional[tuple[str, int]]:
    """(kernel backend, activation code) of :func:`linear_int8`'s common decode case, or None. The decode path is
    host bound: dynamic quantization on the kernels with plain tensors on one device, an unpadded
    K and nothing to convert is recognised in one cheap test and goes straight to the fused op;
    anything else takes the checks that name what is wrong."""
    if input_scale is not None or out_dtype is not None or type(x) not in ops._PLAIN_TENSORS:
        return None
    fast = ops.kernel_backend(backend, x)
    if fast is None:
        return None
    n, k = sw.shape
    device, scale = x.device, sw.scale
    code = ops.usable_activation_code(activation, n)
    ok = (code is not None and k % 4 == 0
          and x.dtype in ops.KERNEL_DTYPES and x.dim() >= 1 and x.shape[-1] == k and sw.values.device == device
          and type(scale) in ops._PLAIN_TENSORS and scale.dtype is torch.float32 and scale.shape == (n,)
          and scale.device == device and ops.has_int8_kernels(fast)
          and (bias is None or (bias.dtype is x.dtype and bias.shape == (n,) and bias.device == device)))
    return (fast, code) if ok else None


def linear_int8(x: Union[Tensor, tuple], sw: SparseTensor24, bias: Optional[Tensor] = None, *,
                activation: Optional[str] = None, out_dtype: Optional[torch.dtype] = None,
                input_scale: Union[float, Tensor, None] = None, backend: Optional[str] = None) -> Tensor:
    """``activation(x @ W^T + bias)`` with an int8 2:4 weight; x is ``[..., K]``, the result ``[..., N]``
    (``[..., N / 2]`` for a gated activation: see :func:`sparsegemm.linear`).

    ``x`` is a float tensor (f16 / bf16; also f32 on the CPU), quantized here per token, or per
    tensor with ``input_scale`` (static mode); or a pre-quantized pair ``(x_q int8 [..., K],
    x_scale float32 [...])``. The output dtype is ``out_dtype``, by default x's (for a pair it
    must be given, unless a bias fixes it); ``bias`` is converted to it. ``activation`` and
    ``backend`` as for :func:`sparsegemm.linear`.
    """
    op = "sparsegemm.linear"
    if not isinstance(sw, SparseTensor24) or sw.dtype != torch.int8:
        raise TypeError(f"{op}: sw must be an int8 SparseTensor24, got "
                        f"{type(sw).__name__ if not isinstance(sw, SparseTensor24) else sw.dtype}")
    n, k = sw.shape
    # Float activations go through one op that quantizes and multiplies (ops._linear_s8_float), whose
    # backward passes the gradient straight through the quantization. The fast path's op has none:
    # it is not taken where a gradient may be asked for, nor in a torch.jit.trace, whose graph must
    # not depend on the grad mode (its check traces again under no_grad).
    needs_gradient = torch.jit.is_tracing() or (torch.is_grad_enabled() and isinstance(x, Tensor) and (
        x.requires_grad or (isinstance(bias, Tensor) and bias.requires_grad)))
    fast = None if needs_gradient else _dynamic_fast_path(x, sw, bias, activation, out_dtype, input_scale, backend)
    if fast is not None:
        fast_backend, act = fast
        x2 = x if x.dim() == 2 else x.reshape(-1, k)
        ops.check_gemm_32bit(op, x2.shape[0], n, k)
        y = ops.call(ops._linear_s8_dynamic, x2, sw.values, sw.kernel_meta(fast_backend), sw.scale, bias, act,
                     x.dtype, fast_backend)
        return y if x.dim() == 2 else y.reshape(*x.shape[:-1], ops.out_features(n, act))
    # The values were checked when the weight was built (SparseTensor24.validate, quantize_weight);
    # reading them again here would cost a host sync per call and break torch.compile graphs.
    check_scale(op, "sw.scale", sw.scale, n, values=False)
    act = ops.activation_code(op, activation, n)
    if isinstance(x, tuple):
        if len(x) != 2:
            raise ValueError(f"{op}: a pre-quantized x must be the pair (x_q, x_scale), got {len(x)} items")
        x_q, x_scale = x
        if input_scale is not None:  # it was dropped silently
            raise ValueError(f"{op}: input_scale quantizes float activations, but x is already quantized "
                             f"(x_q, x_scale): pass one or the other, got both")
        if not isinstance(x_q, Tensor) or x_q.dtype != torch.int8:
            raise TypeError(f"{op}: x_q must be an int8 tensor, got "
                            f"{x_q.dtype if isinstance(x_q, Tensor) else type(x_q).__name__}")
        if out_dtype is None:
            if bias is None:
                raise ValueError(f"{op}: out_dtype is required with a pre-quantized x and no bias, got None")
            out_dtype = bias.dtype
        if x_q.dim() < 1 or x_q.shape[-1] != k:
            raise ValueError(f"{op}: x_q must have K = {k} features in its last dim (the weight is {n} x {k}), "
                             f"got shape {tuple(x_q.shape)}")
        backend = ops.resolve_backend(op, backend, x_q.device)
        lead = x_q.shape[:-1]
        m = x_q.reshape(-1, k).shape[0]
        if not isinstance(x_scale, Tensor):
            raise ValueError(f"{op}: x_scale must be a float32 tensor of shape {tuple(lead)}, got "
                             f"{type(x_scale).__name__}")
        x_scale = x_scale.reshape(-1) if tuple(x_scale.shape) == tuple(lead) else x_scale
        # Shape and dtype only: a NaN x_scale is how a NaN token row is carried (its output is NaN), and
        # the values of a pre-quantized pair are the caller's (x_q in [-127, 127], x_scale positive):
        # reading them would cost a host sync per call, as for sw's values above.
        check_scale(op, "x_scale", x_scale, m, values=False)
        x_q = x_q.reshape(m, k)
        given = {"x_q": x_q, "x_scale": x_scale}  # what the device check names: the caller's tensors
    else:
        if not isinstance(x, Tensor):
            raise TypeError(f"{op}: x must be a torch.Tensor or (x_q, x_scale), got {type(x).__name__}")
        if x.dim() < 1 or x.shape[-1] != k:
            raise ValueError(f"{op}: x must have K = {k} features in its last dim (the weight is {n} x {k}), "
                             f"got shape {tuple(x.shape)}")
        backend = _check_activations(op, x, backend)
        out_dtype = out_dtype or x.dtype
        lead = x.shape[:-1]
        x2 = x if len(lead) == 1 else x.reshape(-1, k)
        m = x2.shape[0]
        given = {"x": x2}
        x_q = None  # quantized inside the op below
        if input_scale is not None:
            input_scale = _static_scale_tensor("sparsegemm.quant.quantize_activations_static", input_scale, x.device)
    ops.check_dtype_value(op, "out_dtype", out_dtype, ops.FLOAT_DTYPES if backend == "cpu" else ops.KERNEL_DTYPES)
    if backend != "cpu":
        ops.require_int8_kernels(op, backend)
        ops.check_gemm_32bit(op, m, n, fmt.padded_k(k))
    if bias is not None:
        ops.check_dtype(op, "bias", bias, ops.FLOAT_DTYPES)  # an integer bias was converted silently
        if tuple(bias.shape) != (n,):
            raise ValueError(f"{op}: bias must have shape ({n},), got {tuple(bias.shape)}")
        bias = bias.to(out_dtype)
    kernel_meta = sw.kernel_meta(backend) if backend != "cpu" else None
    ops.check_same_device(op, **given, **{"sw.values": sw.values, "sw.scale": sw.scale}, bias=bias)
    if x_q is None:
        y = ops.call(ops._linear_s8_float, x2, sw.values, sw.meta, kernel_meta, sw.scale, input_scale, k, bias, act,
                     out_dtype, backend)
    else:
        y = ops.call(ops._linear_s8, x_q, x_scale, sw.values, sw.meta, kernel_meta, sw.scale, k, bias, act, out_dtype,
                     backend)
    return y if len(lead) == 1 else y.reshape(*lead, ops.out_features(n, act))


class Int8Calibrator:
    """Static activation scales: run a few batches through a model, record each int8 layer's input.

    >>> cal = Int8Calibrator(model)          # hooks every SparseLinear holding int8 weights
    >>> with cal:
    ...     for batch in batches[:8]:
    ...         model(batch)
    >>> cal.apply()                          # each layer now quantizes with scale = amax / 127

    The recorded statistic is the largest ``|x|`` seen (NaN and inf inputs are refused). An expert
    of a SparseExperts that no batch routed to takes the largest input seen by the mixture's other
    experts of the same projection (their gate/up layers all read the same token stream); with
    64-128 experts a few batches often leave some expert idle. ``modules``: the names (as in
    ``model.named_modules()``) of the int8 layers to calibrate; default all of them.
    """

    def __init__(self, model: nn.Module, modules: Optional[Iterable[str]] = None):
        from .nn import SparseExperts, SparseLinear

        if isinstance(modules, str):  # would be taken as a set of one-letter names
            raise TypeError(f"Int8Calibrator: modules must be layer names (a list), got the string {modules!r}")
        wanted = None if modules is None else set(modules)
        self.layers = {name: mod for name, mod in model.named_modules()
                       if isinstance(mod, SparseLinear) and mod.quantize == "int8"
                       and (wanted is None or name in wanted)}
        unknown = sorted((wanted or set()) - {name for name, _ in model.named_modules()})
        if unknown:  # a typo; names of other modules are left out, as the int8 filter leaves them
            raise ValueError(f"Int8Calibrator: modules {unknown[:5]} are not modules of the model")
        if not self.layers and wanted is not None:
            raise ValueError(f"Int8Calibrator: modules {sorted(wanted)[:5]} name no int8 SparseLinear layer of the "
                             "model")
        if not self.layers:
            raise ValueError("Int8Calibrator: the model has no int8 SparseLinear layers "
                             "(convert with sparsify(..., quantize='int8') first)")
        # Layer name -> the names of its sibling experts' layers of the same projection.
        self._siblings: dict = {}
        for name, mod in model.named_modules():
            if isinstance(mod, SparseExperts):
                prefix = f"{name}." if name else ""
                for projection in ("gate_up", "down"):
                    names = [f"{prefix}{projection}.{e}" for e in range(len(getattr(mod, projection)))]
                    for layer in names:
                        if layer in self.layers:
                            self._siblings[layer] = [other for other in names if other in self.layers]
        self.amax: dict = {}
        self._hooks: list = []

    def _observe(self, name: str, x: Tensor) -> None:
        amax = float(x.detach().abs().amax()) if x.numel() else 0.0
        if not math.isfinite(amax):
            raise ValueError(f"Int8Calibrator: layer {name!r} saw a non-finite input (amax {amax}); "
                             "calibrate with finite data")
        self.amax[name] = max(self.amax.get(name, 0.0), amax)

    def __enter__(self) -> "Int8Calibrator":
        if self._hooks:  # the inner block's exit would remove the outer one's hooks: it stopped recording
            raise RuntimeError("Int8Calibrator: already recording (a `with` block of this calibrator is open); "
                               "run every batch inside that one block")
        for name, mod in self.layers.items():
            # With kwargs: a forward called as layer(input=x) passes no positional argument.
            self._hooks.append(mod.register_forward_pre_hook(
                lambda _mod, args, kwargs, name=name: self._observe(name, args[0] if args else kwargs["input"]),
                with_kwargs=True))
        return self

    def __exit__(self, *exc) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks = []

    def scales(self) -> dict:
        """{layer name: static scale}: amax / 127 in fp32, or 1 where that is 0 (_row_scale, the weights' rule)."""
        amax = dict(self.amax)
        for name in set(self.layers) - set(amax):
            seen = [self.amax[other] for other in self._siblings.get(name, ()) if other in self.amax]
            if seen:
                amax[name] = max(seen)  # an idle expert: its mixture's largest input for this projection
        missing = sorted(set(self.layers) - set(amax))
        if missing:
            raise ValueError(f"Int8Calibrator: no batch reached layers {missing[:5]}; run the model inside "
                             "`with calibrator:` first")
        zeros = sorted(name for name, a in amax.items() if a == 0)
        if zeros:  # amax 0 would give scale 1: real inputs then saturate or vanish (29% off a 128 x 128 layer)
            raise ValueError(f"Int8Calibrator: layers {zeros[:5]} saw only zeros (or empty batches), which set no "
                             "scale: calibrate on data that reaches them, or leave them dynamic (modules=)")
        return {name: float(_row_scale(torch.tensor(a, dtype=torch.float32))) for name, a in amax.items()}

    def apply(self) -> dict:
        """Switch every calibrated layer to static mode with its scale; returns the scales."""
        scales = self.scales()
        for name, scale in scales.items():
            self.layers[name].set_input_scale(scale)
        return scales
