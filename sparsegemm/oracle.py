"""Correctness oracles: independent, plain numpy / float64 references (public API).

Nothing here calls the extension. Tests compare every backend (CPU, SIMT emulator, CUDA) with
these, and users can do the same for their own weights:

>>> import torch, sparsegemm
>>> from sparsegemm import oracle
>>> w = torch.randn(64, 128, dtype=torch.bfloat16)
>>> sw = sparsegemm.compress(w, prune=True)
>>> values, meta = oracle.compress(w, prune=True)
>>> bool((sw.values == values).all() and (sw.meta == meta).all())
True

Tolerance policy (DESIGN.md): integer-valued inputs small enough for exact arithmetic must match
exactly (compare those with ``torch.equal`` against :func:`linear`: :func:`assert_close_to_oracle`
allows one unit in the last place at the largest magnitude, so it does not check exactness);
otherwise a result may be off from the float64 reference by at most twice what the dense
low-precision product (``torch.nn.functional.linear`` in the input dtype) is off.
"""
from __future__ import annotations

import numpy as np
import torch

from . import format as fmt

__all__ = [
    "mask_2to4",
    "compress",
    "decompress",
    "encode_meta",
    "decode_meta",
    "linear",
    "dense_baseline_error",
    "assert_close_to_oracle",
    "quantize_rows_int8",
    "quantize_rows_static_int8",
    "quantize_weight_int8",
    "int8_accumulate",
    "linear_int8",
]


def _as_f64(w) -> np.ndarray:
    if isinstance(w, torch.Tensor):
        return w.detach().to("cpu", torch.float64).numpy()
    return np.asarray(w, dtype=np.float64)


def _padded_groups(w64: np.ndarray) -> np.ndarray:
    """[N, K] float64 -> [N, G, 4], zero-padded to whole groups."""
    n, k = w64.shape
    kp = fmt.padded_k(k)
    if kp != k:
        w64 = np.concatenate([w64, np.zeros((n, kp - k))], axis=1)
    return w64.reshape(n, kp // 4, 4)


def _select(groups: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Positions (i0, i1) kept in each group by the magnitude rule (NaN largest, lower index wins ties)."""
    nan = np.isnan(groups)
    mag = np.where(nan, np.inf, np.abs(groups))
    kept = np.zeros(groups.shape, dtype=bool)
    for i in range(4):
        rank = np.zeros(groups.shape[:-1], dtype=np.int64)
        for j in range(4):
            if j == i:
                continue
            beats = (nan[..., j] & ~nan[..., i]) | (
                (nan[..., j] == nan[..., i]) & ((mag[..., j] > mag[..., i]) | ((mag[..., j] == mag[..., i]) & (j < i)))
            )
            rank += beats
        kept[..., i] = rank < 2
    order = np.argsort(~kept, axis=-1, kind="stable")  # kept positions first, in index order
    return order[..., 0], order[..., 1]


def mask_2to4(w) -> np.ndarray:
    """Boolean ``[N, K]`` magnitude 2:4 mask of a 2-D weight (K last)."""
    w64 = _as_f64(w)
    n, k = w64.shape
    i0, i1 = _select(_padded_groups(w64))
    mask = np.zeros((n, i0.shape[1], 4), dtype=bool)
    np.put_along_axis(mask, i0[..., None], True, axis=-1)
    np.put_along_axis(mask, i1[..., None], True, axis=-1)
    return mask.reshape(n, -1)[:, :k]


def first_non_24_group(w) -> tuple[int, int] | None:
    """(row, group) of the first group with more than two non-zeros, or None for a 2:4 weight."""
    groups = _padded_groups(_as_f64(w))
    bad = np.argwhere((groups != 0).sum(axis=-1) > 2)  # NaN != 0 is True: NaN counts as non-zero
    return None if len(bad) == 0 else (int(bad[0][0]), int(bad[0][1]))


def compress(w: torch.Tensor, prune: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(values ``[N, Kp/2]`` in w's dtype, meta ``uint8[N, ceil(G/2)]``) of a 2-D weight."""
    if not prune and first_non_24_group(w) is not None:
        raise ValueError(f"oracle.compress: weight is not 2:4 at (row, group) {first_non_24_group(w)}")
    n, k = w.shape
    i0, i1 = _select(_padded_groups(_as_f64(w)))
    kp = fmt.padded_k(k)
    wp = torch.zeros((n, kp), dtype=w.dtype)
    wp[:, :k] = w.detach().cpu()
    base = np.arange(i0.shape[1]) * 4
    cols = np.stack([base + i0, base + i1], axis=-1).reshape(n, -1)
    values = torch.gather(_bits(wp), 1, torch.from_numpy(cols)).view(w.dtype)
    return values, torch.from_numpy(fmt.encode_nibbles(i0, i1))


def _bits(t: torch.Tensor) -> torch.Tensor:
    """``t`` as integers of its width. Values move as bits: a gather or scatter in a float dtype
    quiets a signalling NaN (0x7F81 -> 0xFFFF in bf16), which the kernels keep as it is."""
    return t.view({1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


def encode_meta(i0, i1) -> np.ndarray:
    """Positions ``[N, G]`` -> E ``uint8[N, ceil(G/2)]`` (format.py's spec)."""
    return fmt.encode_nibbles(i0, i1)


def decode_meta(meta, k: int) -> tuple[np.ndarray, np.ndarray]:
    """E -> positions ``(i0, i1)``, each ``[N, G]``."""
    return fmt.decode_nibbles(np.asarray(meta), k)


def decompress(values: torch.Tensor, meta, k: int) -> torch.Tensor:
    """Dense ``[N, K]`` weight (values' dtype) from the logical format."""
    i0, i1 = decode_meta(np.asarray(meta), k)
    if np.any(i0 >= i1):
        raise ValueError("oracle.decompress: metadata names the same or unordered positions in a group")
    n, g = i0.shape
    base = np.arange(g) * 4
    cols = torch.from_numpy(np.stack([base + i0, base + i1], axis=-1).reshape(n, -1))
    dense = _bits(torch.zeros((n, 4 * g), dtype=values.dtype))  # zero bits are +0 in every dtype
    dense.scatter_(1, cols, _bits(values.detach().cpu().contiguous()))
    return dense.view(values.dtype)[:, :k]


def _activation64(y: torch.Tensor, activation: str | None) -> torch.Tensor:
    """act(y) on the last dim; a gated activation pairs the interleaved gate / up columns
    (:func:`sparsegemm.format.interleave_gate_up`): ``act(gate) * up``, half the columns."""
    if activation in fmt.GATED_ACTIVATIONS:
        gate, up = fmt.split_gate_up(y.movedim(-1, 0))
        return (_activation64(gate, fmt.GATED_ACTIVATIONS[activation]) * up).movedim(0, -1)
    if activation is None:
        return y
    if activation == "relu":
        return torch.clamp_min(y, 0.0)
    if activation == "gelu":
        return 0.5 * y * torch.special.erfc(-y / np.sqrt(2.0))  # 1 + erf(z) cancels for z << 0, even in float64
    if activation == "silu":
        return y / (1.0 + torch.exp(-y))
    raise ValueError(f"oracle: unknown activation {activation!r}")


def linear(x, w_dense, bias=None, activation: str | None = None) -> np.ndarray:
    """float64 ``act(x @ w^T + bias)`` for x ``[..., K]`` and a dense (decompressed) w ``[N, K]``."""
    x64 = torch.as_tensor(_as_f64(x))
    y = x64 @ torch.as_tensor(_as_f64(w_dense)).T
    if bias is not None:
        y = y + torch.as_tensor(_as_f64(bias))
    return _activation64(y, activation).numpy()


def dense_baseline_error(x: torch.Tensor, w_dense: torch.Tensor, bias=None, activation: str | None = None) -> float:
    """Max abs error of the dense product in x's dtype (torch on CPU) vs the float64 reference."""
    ref = linear(x, w_dense, bias, activation)
    b = None if bias is None else bias.cpu().to(x.dtype)
    y = torch.nn.functional.linear(x.cpu(), w_dense.cpu().to(x.dtype), b)
    y = torch.as_tensor(_activation64(y.to(torch.float64), activation)).to(x.dtype)
    return float(np.nanmax(np.abs(y.to(torch.float64).numpy() - ref), initial=0.0))


def assert_close_to_oracle(y: torch.Tensor, x: torch.Tensor, w_dense: torch.Tensor, bias=None,
                           activation: str | None = None) -> None:
    """Raise AssertionError unless y is within the project's tolerance of the float64 reference.

    The bound is twice the dense low-precision error, but never below one unit in the last place
    of the output dtype at the largest reference magnitude (a baseline that happens to be exact
    on a tiny case must not demand bit equality from a different but valid summation order).
    """
    ref = linear(x, w_dense, bias, activation)
    got = y.detach().to("cpu", torch.float64).numpy()
    if got.shape != ref.shape:
        raise AssertionError(f"shape {got.shape} != oracle shape {ref.shape}")
    if got.size == 0:
        return
    if not np.array_equal(np.isnan(got), np.isnan(ref)):
        raise AssertionError("NaN positions differ from the oracle")
    eps = torch.finfo(y.dtype).eps if y.dtype.is_floating_point else 0.0
    floor = eps * float(np.nanmax(np.abs(ref), initial=0.0))
    bound = 2.0 * max(dense_baseline_error(x, w_dense, bias, activation), floor)
    err = float(np.nanmax(np.abs(got - ref), initial=0.0))
    if not err <= bound:
        worst = np.unravel_index(np.nanargmax(np.abs(got - ref)), ref.shape)
        raise AssertionError(f"max abs error {err:.3g} > bound {bound:.3g} at {worst}: "
                             f"got {got[worst]!r}, oracle {ref[worst]!r}")


# ---- INT8 (the contract in sparsegemm/quant.py, step by step) -----------------------------------

def _quantize_fp32(v32: torch.Tensor, scale32: torch.Tensor) -> torch.Tensor:
    """clamp(rint(v / scale), -127, 127) with one correctly rounded fp32 division; NaN -> 0."""
    q = torch.round(v32 / scale32).clamp(-127, 127)
    return torch.nan_to_num(q, nan=0.0).to(torch.int8)


def _scale_fp32(amax32: torch.Tensor) -> torch.Tensor:
    quotient = amax32 / 127
    return torch.where(quotient == 0, torch.ones_like(quotient), quotient)


def quantize_rows_int8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic per-token INT8 of a 2-D x: (x_q int8 [M, K], x_scale float32 [M]); NaN rows give a
    NaN scale and zeros."""
    x32 = x.detach().cpu().to(torch.float32)
    amax = x32.abs().amax(dim=1) if x32.shape[1] else torch.zeros(x32.shape[0])
    scale = _scale_fp32(amax)  # amax is NaN for a row with a NaN (amax propagates it)
    return _quantize_fp32(x32, scale[:, None]), scale


def quantize_rows_static_int8(x: torch.Tensor, scale) -> tuple[torch.Tensor, torch.Tensor]:
    """Static INT8 of a 2-D x with a calibrated scale (a number, or one per row): (x_q int8 [M, K],
    x_scale float32 [M]), x_scale the scale, or NaN for a row holding a NaN or an infinity."""
    x32 = x.detach().cpu().to(torch.float32)
    scale32 = torch.as_tensor(scale, dtype=torch.float32).cpu().expand(x32.shape[0]).clone()
    finite = torch.isfinite(x32).all(dim=1)
    return _quantize_fp32(x32, scale32[:, None]), torch.where(finite, scale32, torch.tensor(float("nan")))


def quantize_weight_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(values int8 [N, Kp/2], meta, scale float32 [N]) of a weight, pruned by the magnitude rule."""
    values, meta = compress(w, prune=True)
    kept = values.to(torch.float32)
    scale = _scale_fp32(kept.abs().amax(dim=1))
    return _quantize_fp32(kept, scale[:, None]), meta, scale


def int8_accumulate(x_q: torch.Tensor, values_q: torch.Tensor, meta, k: int) -> np.ndarray:
    """Exact int64 ``x_q[M, K] @ Wq[N, K]^T`` saturated to int32 (the kernels' acc)."""
    wq = decompress(values_q.to(torch.int16), meta, k).numpy().astype(np.int64)
    acc = x_q.detach().cpu().numpy().astype(np.int64)[:, :k] @ wq.T
    return np.clip(acc, -2**31, 2**31 - 1)


def linear_int8(x_q: torch.Tensor, x_scale: torch.Tensor, values_q: torch.Tensor, meta, k: int,
                w_scale: torch.Tensor, bias=None, activation: str | None = None,
                out_dtype: torch.dtype = torch.float16) -> torch.Tensor:
    """The INT8 GEMM in the contract's order: int64 sum, int32 saturation, then in fp32 (each step
    rounded once, no FMA) ``(acc * w_scale[n]) * x_scale[m]``, ``+ bias[n]``; the activation in
    float64 and one rounding to ``out_dtype``. Kernels match the fp32 steps exactly; their fp32
    activation may differ from this float64 one by an ulp of a 16-bit output, and of an fp32 one by
    a few where it rounds more than once (a gated act(gate) * up; gelu, silu: 2-8 ulp seen)."""
    acc = torch.from_numpy(int8_accumulate(x_q, values_q, meta, k)).to(torch.float32)
    y = (acc * w_scale.detach().cpu().to(torch.float32)[None, :]) * x_scale.detach().cpu().to(torch.float32)[:, None]
    if bias is not None:
        y = y + bias.detach().cpu().to(torch.float32)[None, :]
    return _activation64(y.to(torch.float64), activation).to(out_dtype)
