"""CPU backend kernels (csrc/cpu/) through sparsegemm._C, against a float64 numpy oracle.

Every kernel test runs once per vector ISA this CPU supports: the `isa` fixture switches the
dispatcher with _C.cpu_set_isa (the in-process twin of the SPARSEGEMM_CPU_ISA environment
variable, which test_env_var_* checks in a subprocess).
"""
import os
import subprocess
import sys

import numpy as np
import pytest

from sparsegemm import _C

from conftest import ISAS

F32, F16, BF16 = 0, 1, 2
DTYPES = {"f32": F32, "f16": F16, "bf16": BF16}
ACT_NONE, ACT_RELU, ACT_GELU, ACT_SILU = 0, 1, 2, 3
PAD_NIBBLE = 0x4


# ---- oracle and storage helpers (numpy only) ---------------------------------------------------

def f32_to_bf16_bits(a):
    """Round-to-nearest-even fp32 -> bf16 bit patterns (NaN stays a quiet NaN)."""
    u = np.ascontiguousarray(a, dtype=np.float32).view(np.uint32).astype(np.uint64)
    out = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16) & 0xFFFF
    nan = np.isnan(np.asarray(a, dtype=np.float32))
    out[nan] = (u[nan] >> 16) | 0x40
    return out.astype(np.uint16)


def bf16_bits_to_f64(b):
    return (np.asarray(b, dtype=np.uint16).astype(np.uint32) << 16).view(np.float32).astype(np.float64)


def to_storage(a, dtype):
    """float array -> the array the kernels read for `dtype` (bf16 as uint16 bit patterns)."""
    a = np.asarray(a, dtype=np.float32)
    if dtype == F32:
        return a.copy()
    if dtype == F16:
        with np.errstate(over="ignore"):   # overflow to inf is the intended rounding
            return a.astype(np.float16)
    return f32_to_bf16_bits(a)


def to_f64(a, dtype):
    return bf16_bits_to_f64(a) if dtype == BF16 else np.asarray(a).astype(np.float64)


def storage_dtype(dtype):
    return {F32: np.float32, F16: np.float16, BF16: np.uint16}[dtype]


def bits(a):
    """Raw bit patterns, for exact comparisons that also see -0.0 and NaN payloads."""
    a = np.ascontiguousarray(a)
    return a.view({4: np.uint32, 2: np.uint16}[a.itemsize])


def num_groups(K):
    return (K + 3) // 4


def meta_cols(K):
    return (num_groups(K) + 1) // 2


def select_top2(keys):
    """format.h rule: two largest keys; NaN beats every number; ties go to the lower index."""
    def rank_key(i):
        k = keys[i]
        return (0 if np.isnan(k) else 1, 0.0 if np.isnan(k) else -k, i)
    i0, i1 = sorted(sorted(range(4), key=rank_key)[:2])
    return i0, i1


def oracle_compress(w, dtype, K):
    """(values, meta, mask) of W[N, K] (storage array) in the logical layout, by the magnitude rule."""
    N = w.shape[0]
    G = num_groups(K)
    wf = to_f64(w, dtype)
    values = np.zeros((N, 2 * G), dtype=storage_dtype(dtype))
    meta = np.zeros((N, meta_cols(K)), dtype=np.uint8)
    mask = np.zeros((N, K), dtype=np.uint8)
    for n in range(N):
        for g in range(G):
            keys = [abs(wf[n, 4 * g + i]) if 4 * g + i < K else -1.0 for i in range(4)]
            i0, i1 = select_top2(keys)
            for j, i in enumerate((i0, i1)):
                if 4 * g + i < K:
                    values[n, 2 * g + j] = w[n, 4 * g + i]
                    mask[n, 4 * g + i] = 1
            meta[n, g // 2] |= (i0 | (i1 << 2)) << (4 * (g % 2))
        if G % 2:
            meta[n, -1] |= PAD_NIBBLE << 4
    return values, meta, mask


def oracle_decompress(values, meta, dtype, K):
    N = values.shape[0]
    w = np.zeros((N, K), dtype=storage_dtype(dtype))
    for n in range(N):
        for g in range(num_groups(K)):
            nib = (meta[n, g // 2] >> (4 * (g % 2))) & 0xF
            for j, i in enumerate((nib & 3, nib >> 2)):
                if 4 * g + i < K:
                    w[n, 4 * g + i] = values[n, 2 * g + j]
    return w


def activate64(y, act):
    if act == ACT_RELU:
        return np.maximum(y, 0.0)
    if act == ACT_GELU:
        from math import erfc
        return 0.5 * y * np.vectorize(erfc)(-y / np.sqrt(2.0))
    if act == ACT_SILU:
        return y / (1.0 + np.exp(-y))
    return y


def strict_24(rng, N, K, dtype, scale=1.0):
    """A random W[N, K] with at most two non-zeros per group (storage array)."""
    G = num_groups(K)
    w = np.zeros((N, 4 * G), dtype=np.float32)
    for n in range(N):
        for g in range(G):
            keep = rng.choice(4, size=rng.integers(0, 3), replace=False)
            w[n, 4 * g + keep] = rng.standard_normal(len(keep)) * scale
    return to_storage(w[:, :K], dtype)


# ---- kernel calls ------------------------------------------------------------------------------

def cpu_mask(w, dtype, K):
    N = w.shape[0]
    mask = np.full((N, K), 7, dtype=np.uint8)
    _C.cpu_mask_2to4(dtype, w.ctypes.data, N, K, w.strides[0] // w.itemsize, mask.ctypes.data)
    return mask


def cpu_compress(w, dtype, K, prune):
    N = w.shape[0]
    values = np.empty((N, 2 * num_groups(K)), dtype=storage_dtype(dtype))
    values.view(np.uint8)[...] = 0x5A   # garbage the kernel must overwrite
    meta = np.full((N, meta_cols(K)), 0xFF, dtype=np.uint8)
    first_bad = _C.cpu_compress(N, K, w.ctypes.data, w.strides[0] // w.itemsize, values.ctypes.data,
                                meta.ctypes.data, dtype, prune)
    return values, meta, first_bad


def cpu_decompress(values, meta, dtype, K):
    N = values.shape[0]
    w = np.empty((N, K), dtype=storage_dtype(dtype))
    w.view(np.uint8)[...] = 0x5A
    _C.cpu_decompress(N, K, values.ctypes.data, meta.ctypes.data, w.ctypes.data, dtype)
    return w


def cpu_gemm(x, values, meta, dtype, N, K, bias=None, act=ACT_NONE, y=None):
    """Y = act(X @ W^T + bias) on the CPU kernel; x and y may be strided views of wider buffers."""
    M = x.shape[0]
    if y is None:
        y = np.empty((M, N), dtype=storage_dtype(dtype))
    _C.cpu_gemm(M, N, K, x.ctypes.data, x.strides[0] // x.itemsize, values.ctypes.data, meta.ctypes.data,
                0 if bias is None else bias.ctypes.data, y.ctypes.data, y.strides[0] // y.itemsize, dtype, act, 0, 0)
    return y


def gemm_reference(x, w, dtype, bias=None, act=ACT_NONE):
    ref = to_f64(x, dtype) @ to_f64(w, dtype).T
    if bias is not None:
        ref = ref + to_f64(bias, dtype)[None, :]
    return activate64(ref, act)


def assert_gemm_close(y, x, w, dtype, bias=None, act=ACT_NONE):
    """fp32 accumulation, one rounding to dtype: error <= 2 (eps_out |ref| + K * 2^-24 sum |x||w|)."""
    ref = gemm_reference(x, w, dtype, bias, act)
    K = x.shape[1]
    magnitude = np.abs(to_f64(x, dtype)) @ np.abs(to_f64(w, dtype)).T
    if bias is not None:
        magnitude = magnitude + np.abs(to_f64(bias, dtype))[None, :]
    eps_out = {F32: 2.0 ** -24, F16: 2.0 ** -11, BF16: 2.0 ** -8}[dtype]
    bound = 2 * (eps_out * np.abs(ref) + (K + 2) * 2.0 ** -24 * magnitude) + 1e-30
    err = np.abs(to_f64(y, dtype) - ref)
    assert np.all(err <= bound), f"max err {err.max()} (bound {bound[err > bound].min()})"


@pytest.fixture
def threads():
    """Two threads (this machine's core count, and enough to split work) restored afterwards."""
    previous = _C.cpu_num_threads()
    _C.cpu_set_num_threads(2)
    yield 2
    _C.cpu_set_num_threads(previous)


# ---- selection, mask, compress, decompress -----------------------------------------------------

PAIRS = [(0, 1), (0, 2), (0, 3), (1, 2), (1, 3), (2, 3)]


def assert_prune_matches_oracle(ws, dtype, K):
    """compress(prune=True) and mask on the CPU equal the oracle bit for bit; returns the results."""
    ref_values, ref_meta, ref_mask = oracle_compress(ws, dtype, K)
    values, meta, first_bad = cpu_compress(ws, dtype, K, prune=True)
    assert first_bad == -1
    np.testing.assert_array_equal(meta, ref_meta)
    np.testing.assert_array_equal(bits(values), bits(ref_values))
    np.testing.assert_array_equal(cpu_mask(ws, dtype, K), ref_mask)
    return values, meta, ref_values, ref_meta


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
def test_all_six_pairs_roundtrip(isa, dtype):
    # Row r holds pair r in each of its 3 groups, with distinct non-zero values.
    w = np.zeros((6, 12), dtype=np.float32)
    for r, (i0, i1) in enumerate(PAIRS):
        for g in range(3):
            w[r, 4 * g + i0] = 1 + r + g
            w[r, 4 * g + i1] = -(2 + r + g)
    ws = to_storage(w, dtype)
    values, meta, first_bad = cpu_compress(ws, dtype, 12, prune=False)
    assert first_bad == -1
    for r, (i0, i1) in enumerate(PAIRS):
        nibble = i0 | (i1 << 2)
        assert list(meta[r]) == [nibble | nibble << 4, nibble | PAD_NIBBLE << 4]
    np.testing.assert_array_equal(bits(cpu_decompress(values, meta, dtype, 12)), bits(ws))
    np.testing.assert_array_equal(cpu_mask(ws, dtype, 12), (w != 0).astype(np.uint8))
    assert _C.cpu_find_invalid_meta(meta.ctypes.data, 6, 12) == -1


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
def test_selection_rule_nan_ties_negative_zero(isa, dtype):
    nan = np.nan
    groups = {
        (nan, 5.0, 5.0, 1.0): (0, 1),     # NaN first, then the lower of a tie
        (1.0, nan, nan, 2.0): (1, 2),     # two NaNs beat everything
        (1.0, 1.0, 1.0, 1.0): (0, 1),     # all tied
        (0.0, 0.0, 0.0, 0.0): (0, 1),     # zero group: lowest free indices
        (-0.0, 0.0, 3.0, 0.0): (0, 2),    # -0.0 ties with +0.0
        (-3.0, 2.0, 0.0, 3.0): (0, 3),    # magnitude, not value; |-3| ties 3, lower index wins
        (0.0, 0.0, 0.0, -7.0): (0, 3),
        (0.0, 0.5, -0.25, 0.0): (1, 2),
    }
    w = np.array([list(g) for g in groups], dtype=np.float32)
    ws = to_storage(w, dtype)
    values, meta, _ = cpu_compress(ws, dtype, 4, prune=True)
    mask = cpu_mask(ws, dtype, 4)
    for r, (i0, i1) in enumerate(groups.values()):
        assert meta[r, 0] == (i0 | (i1 << 2) | PAD_NIBBLE << 4), f"group {list(groups)[r]}"
        assert list(mask[r]) == [int(i in (i0, i1)) for i in range(4)]
        np.testing.assert_array_equal(bits(values[r]), bits(ws[r, [i0, i1]]))


@pytest.mark.parametrize("K", [4, 7, 60, 64, 67, 128, 130, 260])
def test_int8_decompress_matches_oracle(isa, threads, K):
    # ops.py's large-M INT8 path decompresses weight tiles; the avx512 copy does 64 K positions a
    # step (vpermb), the rest of a row group by group.
    rng = np.random.default_rng(K)
    N = 11
    pairs = np.array([(0, 1), (0, 2), (0, 3), (1, 2), (1, 3), (2, 3)])
    chosen = pairs[rng.integers(0, 6, size=(N, num_groups(K)))]
    chosen[-1, -1] = (1, 3)  # the last row names position K itself (K % 4 == 3): nothing written past it
    meta = np.zeros((N, meta_cols(K)), dtype=np.uint8)
    for g in range(num_groups(K)):
        meta[:, g // 2] |= ((chosen[:, g, 0] | chosen[:, g, 1] << 2) << (4 * (g % 2))).astype(np.uint8)
    if num_groups(K) % 2:
        meta[:, -1] |= PAD_NIBBLE << 4
    values = rng.integers(-128, 128, size=(N, 2 * num_groups(K))).astype(np.int8)
    guarded = np.full((N + 1, K), 0x5A, dtype=np.int8)  # a row after the output, which must stay untouched
    _C.cpu_decompress(N, K, values.ctypes.data, meta.ctypes.data, guarded.ctypes.data, 3)
    w = guarded[:N]
    assert (guarded[N] == 0x5A).all()
    ref = np.zeros((N, K), dtype=np.int8)
    for n in range(N):
        for g in range(num_groups(K)):
            for j in range(2):
                if 4 * g + chosen[n, g, j] < K:
                    ref[n, 4 * g + chosen[n, g, j]] = values[n, 2 * g + j]
    np.testing.assert_array_equal(w, ref)


@pytest.mark.parametrize("K", [4, 5, 6, 7, 8, 12, 28, 36, 37, 100])
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
def test_prune_compress_matches_oracle(isa, threads, dtype, K):
    rng = np.random.default_rng(K * 10 + dtype)
    N = 13
    # Small integers make ties common; a few NaNs and -0.0 exercise the special keys.
    w = rng.integers(-3, 4, size=(N, K)).astype(np.float32)
    w[rng.random((N, K)) < 0.05] = np.nan
    w[w == 0] = np.where(rng.random((N, K)) < 0.5, -0.0, 0.0)[w == 0]
    ws = to_storage(w, dtype)
    values, meta, ref_values, ref_meta = assert_prune_matches_oracle(ws, dtype, K)
    np.testing.assert_array_equal(bits(cpu_decompress(values, meta, dtype, K)),
                                  bits(oracle_decompress(ref_values, ref_meta, dtype, K)))
    assert _C.cpu_find_invalid_meta(meta.ctypes.data, N, K) == -1


@pytest.mark.parametrize("K", [5, 6, 7, 9])
def test_partial_group_keeps_real_positions(isa, K):
    # Positions >= K do not exist: the strided buffer holds huge values there that must not be read.
    N = 4
    buf = np.full((N, K + 8), 1e30, dtype=np.float32)
    w = buf[:, :K]
    w[...] = 0.5
    w[:, -1] = 0.25                     # the smallest real value of the last group is still kept
    values, meta, _ = cpu_compress(w, F32, K, prune=True)
    mask = cpu_mask(w, F32, K)
    real = K - 4 * (num_groups(K) - 1)
    last = mask[:, 4 * (num_groups(K) - 1):]
    assert np.all(last.sum(axis=1) == min(2, real))
    assert np.all(mask[:, -1] == (1 if real <= 2 else 0))
    assert np.all(np.abs(values) < 1e30)
    np.testing.assert_array_equal(bits(cpu_decompress(values, meta, F32, K)), bits(np.where(mask == 1, w, 0)))


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
def test_strict_mode(isa, threads, dtype):
    rng = np.random.default_rng(dtype)
    N, K = 512, 66                     # enough rows that two threads each take a share
    G = num_groups(K)
    ws = strict_24(rng, N, K, dtype)
    values, meta, first_bad = cpu_compress(ws, dtype, K, prune=False)
    assert first_bad == -1
    np.testing.assert_array_equal(bits(cpu_decompress(values, meta, dtype, K)), bits(ws))
    # Zero-filled slots take the lowest free indices: (0, 3) for a lone non-zero at 3.
    lone = ws.copy()
    lone[0, 0:4] = to_storage(np.array([0.0, 0.0, 0.0, 2.0]), dtype)
    _, meta_lone, _ = cpu_compress(lone, dtype, K, prune=False)
    assert meta_lone[0, 0] & 0xF == 0 | (3 << 2)
    # -0.0 is zero, NaN is not. Bad groups in two rows far apart: the smaller index wins.
    bad = ws.copy()
    bad[3, 4:8] = to_storage(np.array([-0.0, 1.0, 2.0, -0.0]), dtype)   # fine
    bad[400, 8:12] = to_storage(np.array([np.nan, 1.0, 2.0, 0.0]), dtype)
    bad[300, 12:16] = to_storage(np.array([1.0, 1.0, 2.0, 0.0]), dtype)
    bad[300, 64:66] = to_storage(np.array([1.0, 1.0]), dtype)           # partial group: 2 non-zeros is fine
    _, _, first_bad = cpu_compress(bad, dtype, K, prune=False)
    assert first_bad == 300 * G + 3
    bad[300, 12] = 0
    _, _, first_bad = cpu_compress(bad, dtype, K, prune=False)
    assert first_bad == 400 * G + 2
    # prune=True never reports.
    assert cpu_compress(bad, dtype, K, prune=True)[2] == -1


@pytest.mark.parametrize("K", [8, 12, 5])
def test_find_invalid_meta(K):
    N = 5
    G = num_groups(K)
    S = 2 * ((G + 1) // 2)  # nibble slots per row: the groups, plus the pad slot when G is odd
    w = strict_24(np.random.default_rng(K), N, K, F32)
    _, meta, _ = cpu_compress(w, F32, K, prune=True)

    def first_invalid(m):
        return _C.cpu_find_invalid_meta(np.ascontiguousarray(m).ctypes.data, N, K)

    assert first_invalid(meta) == -1
    for nibble in (0x0, 0x5, 0xA, 0xF, 0x1, 0x6, 0xB):  # equal indices, or i0 > i1
        m = meta.copy()
        m[3, 0] = (m[3, 0] & 0xF0) | nibble
        assert first_invalid(m) == 3 * S
        m[2, (G - 1) // 2] = (m[2, (G - 1) // 2] & (0xF0 if G % 2 else 0x0F)) | \
            ((nibble << 4) if G % 2 == 0 else nibble)
        assert first_invalid(m) == 2 * S + G - 1
    if G % 2:
        m = meta.copy()
        m[1, -1] = (m[1, -1] & 0x0F) | 0x80   # pad nibble must be 0x4 even though 0x8 is a legal pair
        assert first_invalid(m) == 1 * S + G   # the pad slot, after the row's G groups
    else:
        assert meta.shape[1] * 2 == G


# ---- vector selection steps (16 groups, 64 K positions per step on avx2 and avx512) -----------

VECTOR_STEP = 64   # K positions per vector step; rows shorter than this take only the scalar path

# Signalling-NaN patterns make numpy warn when the oracle converts them (the result is still NaN).
# Bit patterns of special values per dtype: zeros, subnormals, normal edges, infinities and NaNs
# whose payloads differ (and whose sign-cleared bits would order them if the kernel let them).
SPECIAL_BITS = {
    F32: dict(zero=0x00000000, neg_zero=0x80000000, sub_min=0x00000001, neg_sub_min=0x80000001,
              sub_max=0x007FFFFF, normal_min=0x00800000, finite_max=0x7F7FFFFF, inf=0x7F800000,
              neg_inf=0xFF800000, nan_lo=0x7F800001, nan_hi=0x7FC00000, neg_nan_max=0xFFFFFFFF,
              one=0x3F800000, neg_one=0xBF800000, two=0x40000000, neg_two=0xC0000000),
    F16: dict(zero=0x0000, neg_zero=0x8000, sub_min=0x0001, neg_sub_min=0x8001, sub_max=0x03FF,
              normal_min=0x0400, finite_max=0x7BFF, inf=0x7C00, neg_inf=0xFC00, nan_lo=0x7C01,
              nan_hi=0x7E00, neg_nan_max=0xFFFF, one=0x3C00, neg_one=0xBC00, two=0x4000, neg_two=0xC000),
    BF16: dict(zero=0x0000, neg_zero=0x8000, sub_min=0x0001, neg_sub_min=0x8001, sub_max=0x007F,
               normal_min=0x0080, finite_max=0x7F7F, inf=0x7F80, neg_inf=0xFF80, nan_lo=0x7F81,
               nan_hi=0x7FC0, neg_nan_max=0xFFFF, one=0x3F80, neg_one=0xBF80, two=0x4000, neg_two=0xC000),
}


def from_bits(b, dtype):
    """Storage array holding the given bit patterns."""
    b = np.asarray(b, dtype=np.uint32 if dtype == F32 else np.uint16)
    return b.view(storage_dtype(dtype))


# (four special-value names, kept pair by the format.h rule)
SPECIAL_GROUPS = [
    (("nan_lo", "nan_hi", "neg_nan_max", "zero"), (0, 1)),    # NaNs tie whatever their payloads
    (("one", "neg_nan_max", "two", "nan_lo"), (1, 3)),
    (("inf", "nan_hi", "neg_inf", "two"), (0, 1)),            # NaN, then +inf ties -inf: lower index
    (("neg_inf", "two", "inf", "nan_lo"), (0, 3)),
    (("sub_min", "neg_sub_min", "zero", "neg_zero"), (0, 1)),
    (("zero", "neg_zero", "neg_sub_min", "zero"), (0, 2)),    # a subnormal outranks zeros
    (("neg_zero", "zero", "zero", "sub_max"), (0, 3)),
    (("finite_max", "neg_inf", "normal_min", "sub_max"), (0, 1)),
    (("sub_max", "normal_min", "sub_min", "finite_max"), (1, 3)),
    (("neg_zero", "zero", "neg_zero", "zero"), (0, 1)),       # -0.0 ties +0.0
    (("two", "neg_two", "two", "neg_two"), (0, 1)),
    (("one", "two", "neg_two", "neg_one"), (1, 2)),
    (("neg_one", "sub_max", "zero", "one"), (0, 3)),
    (("zero", "neg_zero", "inf", "neg_inf"), (2, 3)),
]


@pytest.mark.filterwarnings("ignore:invalid value encountered in cast:RuntimeWarning")
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
def test_vector_steps_special_groups(isa, dtype):
    # Row r holds case (r + g) % 14 in group g: every case visits every lane of both vector steps
    # (K = 136: two steps, then two scalar groups).
    special = SPECIAL_BITS[dtype]
    K = 2 * VECTOR_STEP + 8
    G = K // 4
    N = len(SPECIAL_GROUPS)
    w_bits = np.zeros((N, K), dtype=np.uint32)
    expected = np.zeros((N, G, 2), dtype=np.int64)
    for r in range(N):
        for g in range(G):
            names, pair = SPECIAL_GROUPS[(r + g) % N]
            w_bits[r, 4 * g:4 * g + 4] = [special[name] for name in names]
            expected[r, g] = pair
    ws = from_bits(w_bits, dtype)
    values, meta, _ = cpu_compress(ws, dtype, K, prune=True)
    mask = cpu_mask(ws, dtype, K)
    for r in range(N):
        for g in range(G):
            i0, i1 = expected[r, g]
            case = SPECIAL_GROUPS[(r + g) % N][0]
            assert (meta[r, g // 2] >> (4 * (g % 2))) & 0xF == i0 | (i1 << 2), f"row {r} group {g}: {case}"
            assert list(mask[r, 4 * g:4 * g + 4]) == [int(i in (i0, i1)) for i in range(4)], f"{case}"
            np.testing.assert_array_equal(bits(values[r, 2 * g:2 * g + 2]), bits(ws[r, [4 * g + i0, 4 * g + i1]]))


@pytest.mark.filterwarnings("ignore:invalid value encountered in cast:RuntimeWarning")
@pytest.mark.parametrize("K", [64, 65, 66, 67, 68, 128, 131, 200, 259])
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
def test_vector_steps_match_oracle(isa, threads, dtype, K):
    # Each row draws from a few special values, so ties (NaN with NaN, inf with -inf, equal
    # subnormals, -0.0 with 0.0) are common; the strided buffer holds NaNs past K that must not be read.
    rng = np.random.default_rng(1000 * dtype + K)
    N = 12
    pool = np.array(list(SPECIAL_BITS[dtype].values()), dtype=np.uint32)
    buf_bits = np.full((N, K + 5), SPECIAL_BITS[dtype]["nan_hi"], dtype=np.uint32)
    for r in range(N):
        choices = rng.choice(pool, size=rng.integers(2, 6), replace=False)
        buf_bits[r, :K] = rng.choice(choices, size=K)
    buf = from_bits(buf_bits, dtype)
    ws = buf[:, :K]
    values, meta, ref_values, ref_meta = assert_prune_matches_oracle(ws, dtype, K)
    # Strict mode writes the same values and metadata, and reports the first group with more than
    # two non-zeros (NaN is non-zero, -0.0 is not).
    nonzero = np.zeros((N, 4 * num_groups(K)), dtype=bool)
    wf = to_f64(ws, dtype)
    nonzero[:, :K] = (wf != 0) | np.isnan(wf)
    crowded = np.flatnonzero(nonzero.reshape(N, -1, 4).sum(axis=2) > 2)
    strict_values, strict_meta, strict_first_bad = cpu_compress(ws, dtype, K, prune=False)
    assert strict_first_bad == (crowded[0] if len(crowded) else -1)
    np.testing.assert_array_equal(strict_meta, ref_meta)
    np.testing.assert_array_equal(bits(strict_values), bits(ref_values))


@pytest.mark.filterwarnings("ignore:invalid value encountered in cast:RuntimeWarning")
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
def test_strict_mode_failures_inside_vector_steps(isa, threads, dtype):
    # Crowded groups at the first and last lanes of vector steps, in a scalar tail group and in the
    # partial last group, in rows both threads own; removing the earliest one reveals the next.
    special = SPECIAL_BITS[dtype]
    rng = np.random.default_rng(7 + dtype)
    N, K = 400, 3 * VECTOR_STEP + 7        # groups 0-47 in vector steps, 48 scalar, 49 partial
    G = num_groups(K)
    ws = strict_24(rng, N, K, dtype)
    fine = [("neg_zero", "one", "neg_zero", "two"), ("sub_min", "zero", "zero", "neg_inf"),
            ("neg_zero", "zero", "neg_zero", "zero"), ("nan_lo", "neg_zero", "neg_nan_max", "zero")]
    crowded = [("nan_hi", "one", "two", "zero"),               # NaN counts as a non-zero
               ("sub_min", "neg_sub_min", "sub_max", "neg_zero"),  # so do subnormals
               ("inf", "neg_inf", "one", "neg_zero"),
               ("one", "one", "one", "one")]
    for n, row in enumerate(rng.choice(N, size=len(fine) * 8, replace=False)):
        g = rng.integers(0, G - 1)
        ws[row, 4 * g:4 * g + 4] = from_bits([special[name] for name in fine[n % len(fine)]], dtype)
    places = [(390, 0), (350, 15), (301, 16), (250, 31), (203, 47), (150, 32), (120, 48), (30, 17),
              (12, 40)]
    for n, (row, g) in enumerate(places):
        ws[row, 4 * g:4 * g + 4] = from_bits([special[name] for name in crowded[n % len(crowded)]], dtype)
    # Partial last group (3 real positions): three non-zeros are crowded, positions past K do not exist.
    ws[5, 4 * (G - 1):] = from_bits([special["one"], special["neg_inf"], special["sub_min"]], dtype)
    places.append((5, G - 1))
    # A failed strict compress still writes the pruned values and metadata.
    ref_values, ref_meta, _ = oracle_compress(ws, dtype, K)
    values, meta, _ = cpu_compress(ws, dtype, K, prune=False)
    np.testing.assert_array_equal(meta, ref_meta)
    np.testing.assert_array_equal(bits(values), bits(ref_values))
    for row, g in sorted(places, key=lambda place: place[0] * G + place[1]):
        assert cpu_compress(ws, dtype, K, prune=False)[2] == row * G + g
        ws[row, 4 * g:min(4 * g + 4, K)] = 0
    assert cpu_compress(ws, dtype, K, prune=False)[2] == -1


# ---- GEMM --------------------------------------------------------------------------------------

def make_problem(rng, M, N, K, dtype, scale=1.0):
    w = strict_24(rng, N, K, dtype, scale)
    values, meta, first_bad = cpu_compress(w, dtype, K, prune=False)
    assert first_bad == -1
    x = to_storage(rng.standard_normal((M, K)) * scale, dtype)
    return x, w, values, meta


@pytest.mark.parametrize("M", [0, 1, 2, 3, 7, 16, 17, 129])
@pytest.mark.parametrize("K", [4, 8, 12, 28, 36, 5, 7, 72, 100, 256])
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
def test_gemm_matches_oracle(isa, threads, dtype, K, M):
    rng = np.random.default_rng(1000 * M + 10 * K + dtype)
    N = 33
    x, w, values, meta = make_problem(rng, M, N, K, dtype)
    y = cpu_gemm(x, values, meta, dtype, N, K)
    assert y.shape == (M, N)
    assert_gemm_close(y, x, w, dtype)


@pytest.mark.parametrize("act", [ACT_NONE, ACT_RELU, ACT_GELU, ACT_SILU], ids=["none", "relu", "gelu", "silu"])
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
def test_gemm_bias_activation(isa, dtype, act):
    rng = np.random.default_rng(act * 3 + dtype)
    M, N, K = 9, 31, 44
    x, w, values, meta = make_problem(rng, M, N, K, dtype)
    bias = to_storage(rng.standard_normal(N), dtype)
    assert_gemm_close(cpu_gemm(x, values, meta, dtype, N, K, bias=bias, act=act), x, w, dtype, bias, act)


@pytest.mark.parametrize("M", [1, 19])
@pytest.mark.parametrize("N", [1, 3, 6, 17, 35])
@pytest.mark.parametrize("K", [7, 64, 100])
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
def test_gemm_exact_small_integers(isa, threads, dtype, K, N, M):
    # |x|, |w| <= 2 and K <= 100: every partial sum is an integer below 256, exact in fp32 and
    # in the bf16 / f16 output, so the result must equal the oracle bit for bit. N values leave
    # the register blocks' runs of W rows (kernels.cpp sparse_gemm) uneven in every way, with a bias
    # that shows a row's output landing in another row's column.
    rng = np.random.default_rng(K + N + dtype + M)
    w = np.where(np.asarray(strict_24(rng, N, K, F32)) != 0, rng.integers(-2, 3, size=(N, K)), 0).astype(np.float32)
    ws = to_storage(w, dtype)
    values, meta, _ = cpu_compress(ws, dtype, K, prune=False)
    x = to_storage(rng.integers(-2, 3, size=(M, K)), dtype)
    bias = to_storage(rng.integers(-4, 5, size=N), dtype)
    y = cpu_gemm(x, values, meta, dtype, N, K, bias=bias)
    ref = to_f64(x, dtype) @ w.astype(np.float64).T + to_f64(bias, dtype)
    np.testing.assert_array_equal(to_f64(y, dtype), ref)


@pytest.mark.parametrize("M", [19, 150])
@pytest.mark.parametrize("N", [16, 48])
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
def test_gemm_gated_exact_small_integers(isa, threads, dtype, N, M):
    # ReGLU (relu code + the gated bit 16): W's rows alternate gate / up in runs of 8 and
    # Y[m, 8q + r] = relu(gate row 16q + r) * (up row 16q + 8 + r). Small integers keep every fp32
    # step exact, so the one rounding of the product must equal the oracle's; Y's extra columns
    # of the wider buffer stay untouched (the output has N / 2 columns). M = 150 crosses the
    # kernel's 64-row slabs of fp32 pre-activations.
    rng = np.random.default_rng(N + dtype + M)
    K = 36
    w = np.where(np.asarray(strict_24(rng, N, K, F32)) != 0, rng.integers(-2, 3, size=(N, K)), 0).astype(np.float32)
    values, meta, _ = cpu_compress(to_storage(w, dtype), dtype, K, prune=False)
    x = to_storage(rng.integers(-2, 3, size=(M, K)), dtype)
    bias = to_storage(rng.integers(-4, 5, size=N), dtype)
    sentinel = to_storage(np.full((M, N), 777.0), dtype)
    y_buf = sentinel.copy()
    cpu_gemm(x, values, meta, dtype, N, K, bias=bias, act=16 | ACT_RELU, y=y_buf[:, :N // 2])
    z = to_f64(x, dtype) @ w.astype(np.float64).T + to_f64(bias, dtype)
    runs = z.reshape(M, N // 16, 2, 8)
    ref = (np.maximum(runs[:, :, 0], 0) * runs[:, :, 1]).reshape(M, N // 2)
    np.testing.assert_array_equal(to_f64(y_buf[:, :N // 2], dtype), to_f64(to_storage(ref, dtype), dtype))
    np.testing.assert_array_equal(bits(y_buf[:, N // 2:]), bits(sentinel[:, N // 2:]))


@pytest.mark.parametrize("K", [5, 7, 36, 100])
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
def test_gemm_strided_x_and_y(isa, dtype, K):
    # X rows live in a wider buffer whose extra columns hold NaN: reading past K would poison Y.
    # Y rows live in a wider buffer whose extra columns must stay untouched.
    rng = np.random.default_rng(K + dtype)
    M, N = 7, 11
    x_dense, w, values, meta = make_problem(rng, M, N, K, dtype)
    x_buf = to_storage(np.full((M, K + 9), np.nan), dtype)
    x_buf[:, :K] = x_dense
    sentinel = to_storage(np.full((M, N + 5), 12345.0), dtype)
    y_buf = sentinel.copy()
    cpu_gemm(x_buf[:, :K], values, meta, dtype, N, K, y=y_buf[:, :N])
    assert_gemm_close(y_buf[:, :N], x_dense, w, dtype)
    np.testing.assert_array_equal(bits(y_buf[:, N:]), bits(sentinel[:, N:]))


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
def test_gemm_output_rounding_exact(isa, dtype):
    # K = 4 with one kept non-zero: Y = fp32(x * w + bias) (the product is exact), then one rounding
    # to dtype. Covers ties, subnormals and overflow to infinity of the narrowing conversion.
    rng = np.random.default_rng(dtype)
    M, N = 64, 16
    scale = {F32: 1.0, F16: 2.0 ** rng.integers(-26, 17, size=(M, 1)), BF16: 2.0 ** rng.integers(-130, 128, size=(M, 1))}
    xf = (rng.standard_normal((M, 1)) * scale[dtype]).astype(np.float32)
    x = to_storage(np.concatenate([xf, np.zeros((M, 3), np.float32)], axis=1), dtype)
    wf = np.zeros((N, 4), dtype=np.float32)
    wf[:, 0] = rng.standard_normal(N)
    w = to_storage(wf, dtype)
    bias = to_storage(rng.standard_normal(N) * 1e-3, dtype)
    values, meta, _ = cpu_compress(w, dtype, 4, prune=False)
    y = cpu_gemm(x, values, meta, dtype, N, 4, bias=bias)
    exact = (to_f64(x, dtype)[:, :1] * to_f64(w, dtype)[None, :, 0]).astype(np.float32)  # exact product
    with np.errstate(over="ignore"):
        fp32 = exact + to_f64(bias, dtype).astype(np.float32)[None, :]
        expected = to_storage(fp32, dtype)
    np.testing.assert_array_equal(to_f64(y, dtype), to_f64(expected, dtype))


def test_gemm_f16_nan_keeps_its_payload(isa):
    # A quiet NaN in X with a payload reaches Y unchanged (x86 arithmetic passes the NaN operand
    # on), and the f16 narrowing keeps the payload on every ISA: the generic build's exact
    # conversion (half_bits.h) gives the bits of F16C vcvtps2ph.
    nan_bits = 0x7E05
    rng = np.random.default_rng(11)
    M, N, K = 2, 16, 64
    x, w, values, meta = make_problem(rng, M, N, K, F16)
    x.view(np.uint16)[0, 5] = nan_bits
    y = cpu_gemm(x, values, meta, F16, N, K)
    # Rows that keep position 5 get NaN; so may rows whose metadata names it with a stored 0.
    nan_out = np.isnan(to_f64(y[0], F16))
    assert nan_out[to_f64(w, F16)[:, 5] != 0].all() and not nan_out.all()
    np.testing.assert_array_equal(bits(y[0, nan_out]), nan_bits)
    assert np.isfinite(to_f64(y[1], F16)).all()


def test_gemm_same_bits_for_any_thread_count(isa):
    # Each output is reduced by one thread in a fixed order, so the thread split cannot change bits.
    rng = np.random.default_rng(7)
    M, N, K = 40, 301, 132
    x, _, values, meta = make_problem(rng, M, N, K, BF16)
    previous = _C.cpu_num_threads()
    try:
        _C.cpu_set_num_threads(1)
        y1 = cpu_gemm(x, values, meta, BF16, N, K)
        _C.cpu_set_num_threads(2)
        y2 = cpu_gemm(x, values, meta, BF16, N, K)
        _C.cpu_set_num_threads(5)
        y5 = cpu_gemm(x, values, meta, BF16, N, K)
    finally:
        _C.cpu_set_num_threads(previous)
    np.testing.assert_array_equal(y1, y2)
    np.testing.assert_array_equal(y1, y5)


def test_gemm_large_m_slabs(threads):
    # M above the kernel's 256-row slab of converted X.
    rng = np.random.default_rng(3)
    M, N, K = 300, 24, 40
    x, w, values, meta = make_problem(rng, M, N, K, F16)
    assert_gemm_close(cpu_gemm(x, values, meta, F16, N, K), x, w, F16)


# ---- dispatch ----------------------------------------------------------------------------------

def test_set_isa_rejects_unknown_and_unsupported():
    with pytest.raises(RuntimeError, match="'sse9'"):
        _C.cpu_set_isa("sse9")
    for name in ISAS:
        if not _C.cpu_isa_supported(name):
            with pytest.raises(RuntimeError, match=f"'{name}'"):
                _C.cpu_set_isa(name)
    assert _C.cpu_isa_supported("generic")


def _run_with_isa_env(value):
    env = dict(os.environ, SPARSEGEMM_CPU_ISA=value)
    code = "from sparsegemm import _C; print(_C.cpu_isa_name())"
    # Run next to the package under test (the installed one in CI, not the unbuilt source tree).
    package_parent = os.path.dirname(os.path.dirname(os.path.abspath(_C.__file__)))
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, cwd=package_parent)


@pytest.mark.parametrize("name", ISAS)
def test_env_var_selects_isa(name):
    result = _run_with_isa_env(name)
    if _C.cpu_isa_supported(name):
        assert result.returncode == 0, result.stderr
        assert result.stdout.strip() == name
    else:
        assert result.returncode != 0 and f"'{name}'" in result.stderr


def test_env_var_unknown_isa_raises():
    result = _run_with_isa_env("avx1024")
    assert result.returncode != 0
    assert "RuntimeError" in result.stderr and "'avx1024'" in result.stderr


# ---- thread pool -------------------------------------------------------------------------------

def _gemm_in_child(queue):
    rng = np.random.default_rng(11)
    x, w, values, meta = make_problem(rng, 5, 64, 512, F32)
    y = cpu_gemm(x, values, meta, F32, 64, 512)
    queue.put((bool(np.allclose(y, gemm_reference(x, w, F32), rtol=1e-4, atol=1e-3)), _C.cpu_threading()))


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork()")
def test_pool_works_after_fork(threads):
    # The child inherits the pool object but not its threads (e.g. torch DataLoader workers): the
    # kernels must start a new pool there instead of waiting for workers that do not exist.
    import multiprocessing
    rng = np.random.default_rng(10)
    x, w, values, meta = make_problem(rng, 5, 64, 512, F32)
    cpu_gemm(x, values, meta, F32, 64, 512)  # the parent's pool is running
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    child = ctx.Process(target=_gemm_in_child, args=(queue,))
    child.start()
    child.join(timeout=60)
    if child.is_alive():
        child.kill()
        pytest.fail("GEMM in a forked child hung")
    correct, threading = queue.get(timeout=5)
    # GNU OpenMP's team does not survive fork: the child runs on the extension's own pool.
    assert child.exitcode == 0 and correct and threading == "threads"


_FORK_AFTER_TORCH_ONLY = """
import os, sys, numpy as np, torch
import sparsegemm
torch.set_num_threads(2)
a = torch.randn(512, 512)
(a @ a).sum()  # torch's OpenMP team has run; the extension has run no job yet
pid = os.fork()
if pid == 0:  # no torch compute here: torch's own parallel ops hang in such a child
    sparsegemm._C.cpu_set_num_threads(2)
    rng = np.random.default_rng(0)
    w = torch.from_numpy(rng.standard_normal((2048, 512), dtype=np.float32))
    x = torch.from_numpy(rng.standard_normal((5, 512), dtype=np.float32))
    sw = sparsegemm.compress(w, prune=True)
    y = sparsegemm.linear(x, sw).numpy()
    ok = np.allclose(y, x.numpy() @ sparsegemm.decompress(sw).numpy().T, rtol=1e-4, atol=1e-3)
    print(sparsegemm._C.cpu_threading(), ok, flush=True)
    os._exit(0 if ok else 1)
_, status = os.waitpid(pid, 0)
sys.exit(os.waitstatus_to_exitcode(status))
"""


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork()")
def test_fork_before_the_first_job_uses_the_pool():
    # The child's first job must not go to GNU OpenMP's team, whose workers did not survive fork.
    # Run next to the package under test (the installed one in CI, not the unbuilt source tree).
    package_parent = os.path.dirname(os.path.dirname(os.path.abspath(_C.__file__)))
    result = subprocess.run([sys.executable, "-c", _FORK_AFTER_TORCH_ONLY], capture_output=True, text=True,
                            timeout=60, cwd=package_parent)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["threads", "True"]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the OpenMP runtime is looked up on Linux")
def test_jobs_run_on_torchs_openmp_team():
    # torch (imported by this test run) has its OpenMP runtime loaded: the kernels use its team,
    # whose idle workers would otherwise spin on the cores our own threads need.
    assert _C.cpu_threading().startswith("openmp:")
    assert "omp" in _C.cpu_threading().rsplit("/", 1)[-1]
    try:
        _C.cpu_use_openmp(False)
        assert _C.cpu_threading() == "threads"
    finally:
        _C.cpu_use_openmp(True)


@pytest.mark.parametrize("openmp", [True, False])
def test_gemm_same_bits_on_openmp_team_and_own_pool(isa, openmp):
    # Either runtime splits rows, never a dot product: the bits of the one-thread result.
    rng = np.random.default_rng(8)
    M, N, K = 70, 203, 264  # M >= 64: the int8 / float drivers' slabs and tiles both split
    x, _, values, meta = make_problem(rng, M, N, K, BF16)
    previous = _C.cpu_num_threads()
    try:
        _C.cpu_set_num_threads(1)
        y1 = cpu_gemm(x, values, meta, BF16, N, K)
        _C.cpu_use_openmp(openmp)
        _C.cpu_set_num_threads(3)
        y3 = cpu_gemm(x, values, meta, BF16, N, K)
    finally:
        _C.cpu_use_openmp(True)
        _C.cpu_set_num_threads(previous)
    np.testing.assert_array_equal(y1, y3)
