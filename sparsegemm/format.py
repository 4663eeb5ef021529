"""The logical (canonical) 2:4 format: the one place in Python that spells it out.

Its C++ twin is ``csrc/format.h``; the two must agree, and ``tests/test_format.py`` checks they do.

Contract (DESIGN.md): ``Y[M, N] = X[M, K] @ W[N, K]^T (+ bias[N])``, W 2:4 sparse along K.

* ``Kp = round_up(K, 4)``: a K that is not a multiple of 4 is padded with zero columns; the true
  K is recorded in :class:`~sparsegemm.SparseTensor24` (``shape``) and inputs are never read past it.
* ``G = Kp / 4`` groups per row; each keeps two positions ``i0 < i1`` (0..3).
* ``values`` (Wc) ``[N, Kp/2]``: the kept values in K order, ``Wc[n, 2g + j] = W[n, 4g + i_j]``.
* ``meta`` (E) ``uint8[N, ceil(G/2)]``: byte ``b`` holds group ``2b`` in bits [3:0] and group
  ``2b + 1`` in bits [7:4]; a group's nibble is ``i0 | i1 << 2``. Only the six ordered pairs are
  legal: nibbles 0x4, 0x8, 0x9, 0xC, 0xD, 0xE (what ``mma.sp::ordered_metadata`` requires).
  When G is odd, the unused high nibble of a row's last byte is 0x4.
* A group with fewer than two non-zeros still names two distinct positions (values 0).

Selection rule (``mask_2to4``, ``compress(prune=True)``, and the choice of positions in strict
``compress``): the two largest ``|w|`` of a group are kept; **NaN counts as larger than any
number**, so a NaN is never silently dropped; ties go to the lower index. "Non-zero" is tested by
value: ``-0.0`` is zero, NaN is non-zero.

This layout is independent of any kernel tiling. The CUDA kernels use a private, hardware-ordered
copy of E that is derived from this one (never written to disk).
"""
from __future__ import annotations

import numpy as np
import torch

#: dtype codes shared with csrc/format.h ``enum class DType``.
DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2, torch.int8: 3}

#: Bit of a gated (GLU) activation's code, on top of the code of the activation applied to the
#: gate (csrc/format.h ``kGatedActivation``).
GATED_ACTIVATION = 16

#: Gate and up rows of a gated weight alternate in runs of GATE_ROWS (csrc/format.h ``kGateRows``).
GATE_ROWS = 8

#: The gated activations and the activation each applies to its gate: ``act(gate) * up``.
GATED_ACTIVATIONS = {"reglu": "relu", "geglu": "gelu", "swiglu": "silu"}

#: Activation codes shared with csrc/format.h ``enum class Activation`` (gated: + GATED_ACTIVATION).
ACTIVATION_CODES = {None: 0, "relu": 1, "gelu": 2, "silu": 3}
ACTIVATION_CODES.update({name: GATED_ACTIVATION | ACTIVATION_CODES[base] for name, base in GATED_ACTIVATIONS.items()})

#: The fused activations by name (gelu is the exact erf form).
ACTIVATIONS = ("relu", "gelu", "silu", *GATED_ACTIVATIONS)


def is_gated(code: int) -> bool:
    """Whether an activation code is a gated one (the GEMM then has N / 2 output columns)."""
    return bool(code & GATED_ACTIVATION)


def interleave_gate_up(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """The rows of a gated layer's weight (or bias, or per-row scale) from its two projections.

    ``gate`` and ``up`` are ``[H, ...]`` with H a multiple of GATE_ROWS; the result is ``[2 H, ...]``
    with rows ``16 q + r`` (r < 8) = ``gate[8 q + r]`` and ``16 q + 8 + r`` = ``up[8 q + r]``: the
    layout a gated activation ("swiglu", ...) reads, where output column ``8 q + r`` is
    ``act(gate row) * up row``. Runs of 8 keep each pair inside one thread's MMA fragment.
    """
    if gate.shape != up.shape or gate.dim() < 1:
        raise ValueError(f"interleave_gate_up: gate and up must have one shape [H, ...], got {tuple(gate.shape)} "
                         f"and {tuple(up.shape)}")
    h = gate.shape[0]
    if h % GATE_ROWS:
        raise ValueError(f"interleave_gate_up: H (rows of gate and up) must be a multiple of {GATE_ROWS}, got {h}")
    rest = tuple(gate.shape[1:])
    runs = torch.stack([gate.reshape(h // GATE_ROWS, GATE_ROWS, *rest), up.reshape(h // GATE_ROWS, GATE_ROWS, *rest)],
                       dim=1)
    return runs.reshape(2 * h, *rest)


def split_gate_up(fused: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of :func:`interleave_gate_up`: ``(gate, up)`` of a ``[2 H, ...]`` gated tensor."""
    n = fused.shape[0] if fused.dim() else 0
    if n % (2 * GATE_ROWS):
        raise ValueError(f"split_gate_up: the gated tensor needs a multiple of {2 * GATE_ROWS} rows, got {n}")
    rest = tuple(fused.shape[1:])
    runs = fused.reshape(n // (2 * GATE_ROWS), 2, GATE_ROWS, *rest)
    return runs[:, 0].reshape(n // 2, *rest), runs[:, 1].reshape(n // 2, *rest)

#: The six legal nibbles, i.e. ordered pairs (i0, i1).
LEGAL_NIBBLES = (0x4, 0x8, 0x9, 0xC, 0xD, 0xE)

#: Filler for the unused high nibble of a row with an odd number of groups.
PAD_NIBBLE = 0x4


def padded_k(k: int) -> int:
    """K rounded up to a multiple of 4 (whole groups)."""
    return (k + 3) // 4 * 4


def num_groups(k: int) -> int:
    """Groups of four along a row of K columns (the last one zero-padded when K % 4)."""
    return padded_k(k) // 4


def values_cols(k: int) -> int:
    """Columns of Wc for a weight with K input features."""
    return padded_k(k) // 2


def meta_cols(k: int) -> int:
    """Bytes of E per row for a weight with K input features."""
    return (num_groups(k) + 1) // 2


def encode_nibbles(i0: np.ndarray, i1: np.ndarray) -> np.ndarray:
    """Pack per-group positions ``i0, i1`` (int arrays ``[N, G]``) into E ``uint8[N, ceil(G/2)]``."""
    i0 = np.asarray(i0, dtype=np.uint8)
    i1 = np.asarray(i1, dtype=np.uint8)
    if i0.shape != i1.shape or i0.ndim != 2:
        raise ValueError(f"encode_nibbles: i0 and i1 must be [N, G] arrays of one shape, got {i0.shape} and {i1.shape}")
    if np.any(i0 >= i1) or np.any(i1 > 3):
        raise ValueError("encode_nibbles: every group needs 0 <= i0 < i1 <= 3")
    nib = i0 | (i1 << 2)
    n, g = nib.shape
    if g % 2:
        nib = np.concatenate([nib, np.full((n, 1), PAD_NIBBLE, np.uint8)], axis=1)
    return (nib[:, 0::2] | (nib[:, 1::2] << 4)).astype(np.uint8)


def decode_nibbles(meta: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Unpack E ``uint8[N, meta_cols(k)]`` into positions ``(i0, i1)``, each ``int64[N, G]``."""
    meta = np.asarray(meta, dtype=np.uint8)
    g = num_groups(k)
    if meta.ndim != 2 or meta.shape[1] != meta_cols(k):
        raise ValueError(f"decode_nibbles: meta must be [N, {meta_cols(k)}] for K={k}, got {tuple(meta.shape)}")
    nib = np.empty((meta.shape[0], 2 * meta.shape[1]), np.uint8)
    nib[:, 0::2] = meta & 0xF
    nib[:, 1::2] = meta >> 4
    nib = nib[:, :g].astype(np.int64)
    return nib & 3, nib >> 2
