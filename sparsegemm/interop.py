"""Converters to and from PyTorch's semi-structured CUTLASS layout (pure torch, any device).

``to_cutlass(sw)`` returns exactly what
``torch.sparse._semi_structured_conversions.sparse_semi_structured_from_dense_cutlass`` gives for
the dense weight ``decompress(sw)`` (tests check it bit for bit for fp16, bf16 and int8), so our
weights can feed ``torch.sparse.to_sparse_semi_structured``'s CUTLASS backend and theirs ours.

Their layout in short: metadata nibbles (same encoding as ours) packed 4 per int16 for 16-bit
values, 8 per int32 for int8, then reordered the way CUTLASS's sparse GEMM loads them
(ColumnMajorInterleaved<2> with rows interleaved in bands of 32 (int16) or 16 (int32) and 2x2
blocks swapped). For groups with fewer than two non-zeros PyTorch picks positions by a fixed
table (below), which differs from our canonical choice: ``to_cutlass`` re-derives them so the
output is identical, and ``from_cutlass`` accepts any ordered pair.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .tensor import SparseTensor24

__all__ = ["to_cutlass", "from_cutlass"]

_CUTLASS_DTYPES = (torch.float16, torch.bfloat16, torch.int8)

# PyTorch's choice of the two positions for each non-zero pattern with at most two non-zeros
# (bit i of the index = position i is non-zero), as the nibble i0 | i1 << 2.
_PATTERN_TO_NIBBLE = {
    0b0000: 0xE, 0b1000: 0xE, 0b0100: 0xE, 0b0010: 0x9, 0b0001: 0x8,
    0b0011: 0x4, 0b0101: 0x8, 0b0110: 0x9, 0b1001: 0xC, 0b1010: 0xD, 0b1100: 0xE,
}


def _layout(dtype: torch.dtype) -> tuple[torch.dtype, int, int]:
    """(metadata word dtype, nibbles per word, row band of the reordering) for a value dtype."""
    if dtype == torch.int8:
        return torch.int32, 8, 16
    return torch.int16, 4, 32


def _reorder_offsets(rows: int, cols: int, dtype: torch.dtype, device) -> Tensor:
    """Flat destination of metadata word (r, c) in CUTLASS's reordered buffer, row-major order."""
    _, _, band = _layout(dtype)
    interweave = 4 if band == 32 else 2
    r = torch.arange(rows, device=device)[:, None].expand(rows, cols)
    c = torch.arange(cols, device=device)[None, :].expand(rows, cols)
    # Rows of a band are interleaved so that the words one warp loads sit together.
    dr = r // band * band + (r % 8) * interweave + (r % band) // 8
    # Then in each 2x2 block of (row, col) the off-diagonal words trade places.
    swap = ((dr % 2 == 0) & (c % 2 == 1)).long() - ((dr % 2 == 1) & (c % 2 == 0)).long()
    dr, dc = dr + swap, c - swap
    # ColumnMajorInterleaved<2>: pairs of columns stored column-major.
    return ((dc // 2) * rows * 2 + dr * 2 + dc % 2).reshape(-1)


def _check_shape(op: str, n: int, k: int, dtype: torch.dtype) -> None:
    word_dtype, per_word, band = _layout(dtype)
    if n % band:
        raise ValueError(f"{op}: the CUTLASS layout needs N (rows) divisible by {band} for {dtype}, got N = {n}")
    # Metadata words are reordered in 2 x 2 blocks, so a row needs an even number of them.
    if k % (8 * per_word):
        raise ValueError(f"{op}: the CUTLASS layout needs K divisible by {8 * per_word} for {dtype}, got K = {k}")


def to_cutlass(sw: SparseTensor24) -> tuple[Tensor, Tensor]:
    """(values ``[N, K/2]``, reordered metadata ``int16[N, K/16]`` or ``int32[N, K/32]`` for int8)."""
    op = "sparsegemm.to_cutlass"
    if not isinstance(sw, SparseTensor24):
        raise TypeError(f"{op}: sw must be a SparseTensor24, got {type(sw).__name__}")
    if sw.dtype not in _CUTLASS_DTYPES:
        raise TypeError(f"{op}: values must be float16, bfloat16 or int8 (PyTorch's CUTLASS layout treats "
                        f"float32 as 1:2), got {sw.dtype}")
    n, k = sw.shape
    _check_shape(op, n, k, sw.dtype)
    word_dtype, per_word, _ = _layout(sw.dtype)
    g = k // 4
    dev = sw.device
    nib = torch.stack([sw.meta & 0xF, sw.meta >> 4], dim=-1).reshape(n, -1)[:, :g].long()
    i0, i1 = nib & 3, nib >> 2
    kept = sw.values.reshape(n, g, 2)
    nonzero = kept != 0
    pattern = (nonzero[..., 0].long() << i0) | (nonzero[..., 1].long() << i1)
    lut = torch.zeros(16, dtype=torch.long, device=dev)
    for pat, nibble in _PATTERN_TO_NIBBLE.items():
        lut[pat] = nibble
    new = lut[pattern]
    j0, j1 = new & 3, new >> 2
    # The new positions cover every non-zero, so their values come from the old ones or are zero.
    zero = torch.zeros((), dtype=sw.dtype, device=dev)

    def value_at(pos: Tensor) -> Tensor:
        return torch.where(pos == i0, kept[..., 0], torch.where(pos == i1, kept[..., 1], zero))

    values = torch.stack([value_at(j0), value_at(j1)], dim=-1).reshape(n, k // 2)
    words = new.reshape(n, k // (4 * per_word), per_word)
    shifts = torch.arange(per_word, device=dev) * 4
    packed = (words << shifts).sum(-1)
    bits = 16 if word_dtype == torch.int16 else 32
    packed = torch.where(packed >= 2 ** (bits - 1), packed - 2 ** bits, packed).to(word_dtype)
    out = torch.empty(packed.numel(), dtype=word_dtype, device=dev)
    out[_reorder_offsets(n, packed.shape[1], sw.dtype, dev)] = packed.reshape(-1)
    return values, out.view(n, packed.shape[1])


def from_cutlass(values: Tensor, meta: Tensor, scale: Optional[Tensor] = None) -> SparseTensor24:
    """A :class:`SparseTensor24` from PyTorch's CUTLASS layout (values ``[N, K/2]``, reordered meta).

    int8 values need their per-row ``scale`` (float32[N]). The metadata is validated: a nibble
    that is not an ordered pair of distinct positions raises ValueError.
    """
    op = "sparsegemm.from_cutlass"
    if values.dtype not in _CUTLASS_DTYPES:
        raise TypeError(f"{op}: values must be float16, bfloat16 or int8, got {values.dtype}")
    if values.dim() != 2 or meta.dim() != 2:
        raise ValueError(f"{op}: values and meta must be 2-D, got {tuple(values.shape)} and {tuple(meta.shape)}")
    n, k = values.shape[0], values.shape[1] * 2
    _check_shape(op, n, k, values.dtype)
    word_dtype, per_word, _ = _layout(values.dtype)
    cols = k // (4 * per_word)
    if meta.dtype != word_dtype or tuple(meta.shape) != (n, cols):
        raise ValueError(f"{op}: meta must be {word_dtype} of shape {(n, cols)} for values {tuple(values.shape)}, "
                         f"got {meta.dtype} {tuple(meta.shape)}")
    if meta.device != values.device:
        raise ValueError(f"{op}: values on {values.device} but meta on {meta.device}")
    words = meta.reshape(-1)[_reorder_offsets(n, cols, values.dtype, meta.device)].long().reshape(n, cols, 1)
    shifts = torch.arange(per_word, device=meta.device) * 4
    nib = ((words >> shifts) & 0xF).reshape(n, k // 4).to(torch.uint8)
    logical = nib[:, 0::2] | (nib[:, 1::2] << 4)  # K % 16 == 0: an even number of groups
    return SparseTensor24(values.contiguous(), logical.contiguous(), (n, k), scale)
