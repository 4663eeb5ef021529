"""SIMT emulator self-tests: every instruction model against a direct numpy computation.

Each test launches a small kernel from csrc/simt/selftest.cpp (written with the same portability
API as the CUDA kernels) through the emulator. The lane layouts used by the oracles below are
restated from /work/shared/PTX_SPARSE.md independently of the C++ models.
"""
import numpy as np
import pytest
import torch

from sparsegemm import _C

LEGAL_PAIRS = [(0, 1), (0, 2), (1, 2), (0, 3), (1, 3), (2, 3)]  # nibbles 0x4 0x8 0x9 0xC 0xD 0xE


def ptr(a: np.ndarray) -> int:
    assert a.flags["C_CONTIGUOUS"]
    return a.ctypes.data


# ---- oracles -------------------------------------------------------------------------------------
def random_pairs(rng, rows, groups):
    """Per (row, group) index pairs drawn so that every legal pattern appears."""
    choice = rng.permutation(np.resize(np.arange(6), rows * groups)).reshape(rows, groups)
    return np.array(LEGAL_PAIRS)[choice]  # [rows, groups, 2]


def nibbles(pairs):
    return pairs[..., 0] | (pairs[..., 1] << 2)


def decompress(values, pairs):
    """Dense [rows, 4 * groups] from kept values [rows, 2 * groups] and index pairs."""
    rows, groups = pairs.shape[:2]
    dense = np.zeros((rows, 4 * groups), dtype=np.float64)
    for r in range(rows):
        for q in range(groups):
            dense[r, 4 * q + pairs[r, q, 0]] = values[r, 2 * q]
            dense[r, 4 * q + pairs[r, q, 1]] = values[r, 2 * q + 1]
    return dense


def k32_lane_metadata(pairs, selector, filler=0):
    """Per-lane e of m16n8k32 f16/bf16: lanes 4g + 2F + u hold rows g (bits 15:0) and g + 8 (31:16)
    for K 16u .. 16u + 15; the other lanes get `filler` (0: illegal nibbles, must be ignored)."""
    nib = nibbles(pairs)  # [16, 8]
    e16 = np.zeros((16, 2), dtype=np.uint64)
    for row in range(16):
        for u in range(2):
            e16[row, u] = sum(int(nib[row, 4 * u + n]) << (4 * n) for n in range(4))
    e = np.full(32, filler, dtype=np.uint32)
    for g in range(8):
        for u in range(2):
            e[4 * g + 2 * selector + u] = int(e16[g, u]) | (int(e16[g + 8, u]) << 16)
    return e


def k64_lane_metadata(pairs):
    """Per-lane e of m16n8k64 s8: lane 4g + t holds row g + 8 (t % 2), K 32 (t // 2) .. + 31."""
    nib = nibbles(pairs)  # [16, 16]
    e = np.zeros(32, dtype=np.uint32)
    for lane in range(32):
        g, t = divmod(lane, 4)
        row, half = g + 8 * (t % 2), t // 2
        e[lane] = sum(int(nib[row, 8 * half + n]) << (4 * n) for n in range(8))
    return e


def to_bits(values, bf16):
    with np.errstate(over="ignore", invalid="ignore"):  # Inf and NaN are wanted inputs
        return _to_bits(values, bf16)


def _to_bits(values, bf16):
    if bf16:
        return torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32)).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    return np.ascontiguousarray(values, dtype=np.float16).view(np.uint16)


def from_bits(bits, bf16):
    with np.errstate(invalid="ignore"):  # NaN patterns are wanted inputs
        return _from_bits(bits, bf16)


def _from_bits(bits, bf16):
    if bf16:
        return torch.from_numpy(bits.view(np.int16)).view(torch.bfloat16).float().numpy().astype(np.float64)
    return bits.view(np.float16).astype(np.float64)


def run_mma_k32(a_bits, b_bits, c, e, bf16, selector):
    d = np.zeros((16, 8), dtype=np.float32)
    _C.simt_selftest_mma_sp_k32(bf16, selector, ptr(a_bits), ptr(b_bits), ptr(c), ptr(e), ptr(d))
    return d


# ---- mma.sp m16n8k32 -----------------------------------------------------------------------------
def test_mma_k32_hardware_test_vector():
    """LLVM's sparse-mma-2-4-f16.mlir GPU run: A[i][j] = i + j + 1, indices (0, 2) everywhere
    (0x8888), B[k][n] = n - k, selector 0. All 128 outputs, exactly."""
    a = np.fromfunction(lambda i, j: i + j + 1, (16, 16)).astype(np.float16).view(np.uint16)
    b = np.fromfunction(lambda k, n: n - k, (32, 8)).astype(np.float16)
    b_rows = np.ascontiguousarray(b.T).view(np.uint16)
    d = run_mma_k32(a, b_rows, np.zeros((16, 8), np.float32), np.full(32, 0x88888888, np.uint32), False, 0)
    np.testing.assert_array_equal(d[0], [-2720, -2584, -2448, -2312, -2176, -2040, -1904, -1768])
    np.testing.assert_array_equal(d[15], [-6320, -5944, -5568, -5192, -4816, -4440, -4064, -3688])
    a_dense = decompress(a.view(np.float16).astype(np.float64), np.tile([0, 2], (16, 8, 1)))
    np.testing.assert_array_equal(d, a_dense @ b.astype(np.float64))


@pytest.mark.parametrize("bf16", [False, True], ids=["f16", "bf16"])
@pytest.mark.parametrize("selector", [0, 1])
@pytest.mark.parametrize("seed", range(3))
def test_mma_k32_small_integers_exact(bf16, selector, seed):
    """Random metadata with all six patterns; small integers make every fp32 sum exact."""
    rng = np.random.default_rng(100 * seed + 10 * selector + bf16)
    pairs = random_pairs(rng, 16, 8)
    a_vals = rng.integers(-8, 9, (16, 16)).astype(np.float32)
    b_vals = rng.integers(-8, 9, (32, 8)).astype(np.float32)
    c = rng.integers(-64, 65, (16, 8)).astype(np.float32)
    d = run_mma_k32(to_bits(a_vals, bf16), to_bits(b_vals.T, bf16), c, k32_lane_metadata(pairs, selector), bf16, selector)
    np.testing.assert_array_equal(d, c + decompress(a_vals, pairs) @ b_vals)


@pytest.mark.parametrize("bf16", [False, True], ids=["f16", "bf16"])
@pytest.mark.parametrize("selector", [0, 1])
def test_mma_k32_random_floats(bf16, selector):
    """Random normal inputs: within fp32 sequential-summation error of the float64 product."""
    rng = np.random.default_rng(7 + selector + 2 * bf16)
    pairs = random_pairs(rng, 16, 8)
    a_bits = to_bits(rng.standard_normal((16, 16)), bf16)
    b_bits = to_bits(rng.standard_normal((8, 32)), bf16)  # X rows
    c = rng.standard_normal((16, 8)).astype(np.float32)
    d = run_mma_k32(a_bits, b_bits, c, k32_lane_metadata(pairs, selector), bf16, selector)
    a_dense = decompress(from_bits(a_bits, bf16), pairs)
    b = from_bits(b_bits, bf16).T
    ref = c + a_dense @ b
    bound = 17 * 2.0**-24 * (np.abs(c) + np.abs(a_dense) @ np.abs(b))
    assert np.all(np.abs(d - ref) <= bound)


def test_mma_k32_metadata_selects_b_rows_and_pruned_inf_does_not_leak():
    """Each kept value multiplies the B row its index names; Inf/NaN in B rows that no metadata
    names stays out of D (the model gathers, it does not multiply by zeros)."""
    rng = np.random.default_rng(3)
    pairs = np.tile([0, 3], (16, 8, 1))  # B rows 4q + 1, 4q + 2 are never used
    a_vals = rng.integers(-4, 5, (16, 16)).astype(np.float32)
    b_vals = rng.integers(-4, 5, (32, 8)).astype(np.float32)
    b_poisoned = b_vals.copy()
    b_poisoned[1::4] = np.inf
    b_poisoned[2::4] = np.nan
    c = np.zeros((16, 8), np.float32)
    d = run_mma_k32(to_bits(a_vals, False), to_bits(b_poisoned.T, False), c, k32_lane_metadata(pairs, 0), False, 0)
    b_clean = b_vals.copy()
    b_clean[1::4] = 0
    b_clean[2::4] = 0
    np.testing.assert_array_equal(d, decompress(a_vals, pairs) @ b_clean)


def test_mma_k32_illegal_nibble_in_read_lane_is_an_error():
    rng = np.random.default_rng(4)
    pairs = random_pairs(rng, 16, 8)
    e = k32_lane_metadata(pairs, 1)
    e[4 * 2 + 2 + 1] = (e[4 * 2 + 2 + 1] & ~np.uint32(0xF0)) | np.uint32(0x50)  # lane 11, nibble 1: (1, 1)
    zeros16 = np.zeros((16, 16), np.uint16)
    with pytest.raises(RuntimeError, match=r"illegal metadata nibble 0x5 in lane 11 bits \[7:4\]"):
        run_mma_k32(zeros16, np.zeros((8, 32), np.uint16), np.zeros((16, 8), np.float32), e, False, 1)
    e[4 * 2 + 2 + 1] = (e[4 * 2 + 2 + 1] & ~np.uint32(0xF0)) | np.uint32(0x60)  # (2, 1): descending
    with pytest.raises(RuntimeError, match="illegal metadata nibble 0x6"):
        run_mma_k32(zeros16, np.zeros((8, 32), np.uint16), np.zeros((16, 8), np.float32), e, False, 1)


def test_mma_k32_unread_lanes_may_hold_anything():
    """Selector 0 reads lanes t = 0, 1 only: garbage (0xFFFFFFFF) in t = 2, 3 changes nothing."""
    rng = np.random.default_rng(5)
    pairs = random_pairs(rng, 16, 8)
    a_vals = rng.integers(-8, 9, (16, 16)).astype(np.float32)
    b_vals = rng.integers(-8, 9, (32, 8)).astype(np.float32)
    c = np.zeros((16, 8), np.float32)
    d = run_mma_k32(to_bits(a_vals, False), to_bits(b_vals.T, False), c, k32_lane_metadata(pairs, 0, 0xFFFFFFFF), False, 0)
    np.testing.assert_array_equal(d, decompress(a_vals, pairs) @ b_vals)


# ---- mma.sp m16n8k64 s8 --------------------------------------------------------------------------
def run_mma_k64(a, b_rows, c, e):
    d = np.zeros((16, 8), dtype=np.int32)
    _C.simt_selftest_mma_sp_k64_s8(ptr(a), ptr(b_rows), ptr(c), ptr(e), ptr(d))
    return d


@pytest.mark.parametrize("seed", range(3))
def test_mma_k64_s8_exact(seed):
    rng = np.random.default_rng(seed)
    pairs = random_pairs(rng, 16, 16)
    a = rng.integers(-128, 128, (16, 32)).astype(np.int8)
    b = rng.integers(-128, 128, (64, 8)).astype(np.int8)
    c = rng.integers(-(2**20), 2**20, (16, 8)).astype(np.int32)
    d = run_mma_k64(a, np.ascontiguousarray(b.T), c, k64_lane_metadata(pairs))
    ref = c.astype(np.int64) + decompress(a.astype(np.float64), pairs).astype(np.int64) @ b.astype(np.int64)
    np.testing.assert_array_equal(d, ref)


def test_mma_k64_s8_satfinite_clamps():
    pairs = np.tile([1, 2], (16, 16, 1))
    a = np.full((16, 32), 127, np.int8)
    a[8:] = -128
    b = np.full((64, 8), 127, np.int8)
    c = np.zeros((16, 8), np.int32)
    c[:8] = 2**31 - 100_000  # + 32 * 127 * 127 overflows upwards
    c[8:] = -(2**31) + 100_000  # + 32 * -128 * 127 overflows downwards
    d = run_mma_k64(a, np.ascontiguousarray(b.T), c, k64_lane_metadata(pairs))
    assert np.all(d[:8] == 2**31 - 1) and np.all(d[8:] == -(2**31))


def test_mma_k64_s8_lane_layout_is_not_the_16_bit_one():
    """Only row 8's metadata (lane 4g + 1) names index 3; a 16-bit-style reading would not."""
    pairs = np.tile([0, 1], (16, 16, 1))
    pairs[8:, :8] = [2, 3]  # rows 8..15, K 0..31
    a = np.ones((16, 32), np.int8)
    b = np.zeros((64, 8), np.int8)
    b[2:32:4] = 1  # only index 2 rows within K 0..31 are non-zero
    d = run_mma_k64(a, np.ascontiguousarray(b.T), np.zeros((16, 8), np.int32), k64_lane_metadata(pairs))
    assert np.all(d[:8] == 0) and np.all(d[8:] == 8)


# ---- wgmma.mma_async.sp m64n128 (sm_90a) --------------------------------------------------------
# One warpgroup (csrc/cuda/wgmma_selftest.cuh, which tests/test_kernels_cuda.py runs on the GPU
# against the same oracle): warp w holds A rows 16w .. 16w + 15 in the mma.sp fragment and metadata
# layouts (the kernel loads the fragments; the metadata is built here per warp with the helpers
# above), B comes from shared memory through a 128-byte-swizzle descriptor, D is mma's C layout
# per 8 columns. kind 0 f16, 1 bf16 (k32: 16 compressed values a row), 2 s8 (k64: 32 bytes a row).
def run_wgmma(kind, mode, upper, a_bytes, b_bytes, c, e):
    d = np.zeros((64, 128), dtype=c.dtype)
    _C.simt_wgmma_selftest(kind, mode, upper, ptr(a_bytes), ptr(b_bytes), ptr(c), ptr(e), ptr(d))
    return d


def wgmma_metadata(pairs, kind):
    """e[128] of a warpgroup: warp w's lanes as mma.sp's for rows 16w .. 16w + 15 (selector 0)."""
    per_warp = (k64_lane_metadata if kind == 2 else lambda p: k32_lane_metadata(p, 0))
    return np.concatenate([per_warp(pairs[16 * w:16 * w + 16]) for w in range(4)]).astype(np.uint32)


def wgmma_operands(rng, kind):
    """(A values [64, kc], B [K, 128], pairs, A bytes, B rows bytes) with random legal metadata."""
    k = 64 if kind == 2 else 32
    pairs = random_pairs(rng, 64, k // 4)
    if kind == 2:
        a = rng.integers(-128, 128, (64, 32)).astype(np.int8)
        b = rng.integers(-128, 128, (k, 128)).astype(np.int8)
        b_rows = np.ascontiguousarray(b.T).view(np.uint8)
        return a.astype(np.float64), b.astype(np.float64), pairs, a.view(np.uint8), b_rows
    bf16 = kind == 1
    a = rng.integers(-8, 9, (64, 16)).astype(np.float32)
    b = rng.integers(-8, 9, (k, 128)).astype(np.float32)
    return (a.astype(np.float64), b.astype(np.float64), pairs, to_bits(a, bf16).view(np.uint8),
            np.ascontiguousarray(to_bits(b.T, bf16)).view(np.uint8))


def wgmma_exact_case(kind, upper, mode):
    """(A bytes, B rows bytes, C, e, expected D) of one exact wgmma_selftest case: small integers
    (every fp32 sum exact; s8 exactly), D = C + A B (mode 2: C + 2 A B). Also run on the GPU."""
    rng = np.random.default_rng(31 * kind + 2 * upper + mode)
    a, b, pairs, a_bytes, b_rows = wgmma_operands(rng, kind)
    if kind == 2:
        c = rng.integers(-(2**20), 2**20, (64, 128)).astype(np.int32)
    else:
        c = rng.integers(-64, 65, (64, 128)).astype(np.float32)
    expected = c.astype(np.float64) + (2 if mode == 2 else 1) * (decompress(a, pairs) @ b)
    return a_bytes, b_rows, c, wgmma_metadata(pairs, kind), expected


def wgmma_mismatch_report(d, expected, c, mode):
    """Where and how a wgmma_selftest result D [64, 128] differs from the expected one, for a GPU
    run with little time to debug: a map of the warps' 16-row blocks by 8-column groups ('.' all
    right, 'x' all wrong, else tenths wrong), the simple wrong answers it equals (C alone, one of two
    chained products, no C), and blocks or column groups that hold another's expected values (a
    fragment or swizzle mix-up)."""
    d = np.asarray(d, dtype=np.float64)
    wrong = d != expected
    lines = [f"{int(wrong.sum())} of {wrong.size} elements differ; warps (rows) x 8-column groups:"]
    for w in range(4):
        cells = wrong[16 * w:16 * w + 16].reshape(16, 16, 8).mean(axis=(0, 2))
        lines.append(f"  warp {w}: " + "".join("." if f == 0 else "x" if f == 1 else str(int(f * 10)) for f in cells))
    product = (expected - c) / (2 if mode == 2 else 1)
    for name, candidate in (("C alone (no product)", c), ("C + one product (mode 2 lost one)", c + product),
                            ("the product without C", (2 if mode == 2 else 1) * product)):
        if np.array_equal(d, candidate):
            lines.append(f"  D equals {name}")
    for w in range(4):
        for v in range(4):
            if v != w and np.array_equal(d[16 * w:16 * w + 16], expected[16 * v:16 * v + 16]):
                lines.append(f"  warp {w}'s rows hold warp {v}'s expected rows")
    groups = [expected[:, 8 * g:8 * g + 8] for g in range(16)]
    for g in range(16):
        if not np.array_equal(d[:, 8 * g:8 * g + 8], groups[g]):
            for h in range(16):
                if np.array_equal(d[:, 8 * g:8 * g + 8], groups[h]):
                    lines.append(f"  column group {g} holds group {h}'s expected values")
    return "\n".join(lines)


def test_wgmma_mismatch_report_names_the_pattern():
    rng = np.random.default_rng(3)
    expected = rng.permutation(64 * 128).reshape(64, 128).astype(np.float64)  # no two elements equal
    c = rng.integers(-5, 5, (64, 128)).astype(np.float64)
    swapped = expected.copy()
    swapped[:, 0:8], swapped[:, 8:16] = expected[:, 8:16], expected[:, 0:8]
    report = wgmma_mismatch_report(swapped, expected, c, 0)
    assert "1024 of 8192" in report and "warp 0: xx.............." in report
    assert "column group 0 holds group 1's" in report and "column group 1 holds group 0's" in report
    assert "D equals C alone" in wgmma_mismatch_report(c, expected, c, 0)
    assert "mode 2 lost one" in wgmma_mismatch_report(c + (expected - c) / 2, expected, c, 2)
    rows = expected.copy()
    rows[16:32] = expected[48:64]
    assert "warp 1's rows hold warp 3's expected rows" in wgmma_mismatch_report(rows, expected, c, 0)
    assert wgmma_mismatch_report(expected, expected, c, 0).startswith("0 of 8192")


@pytest.mark.parametrize("kind", [0, 1, 2], ids=["f16", "bf16", "s8"])
@pytest.mark.parametrize("upper", [False, True], ids=["k-step-0", "k-step-1"])
@pytest.mark.parametrize("mode", [0, 2, 3], ids=["one", "two-chained", "a-from-shared-memory"])
def test_wgmma_exact_against_the_dense_product(kind, upper, mode):
    a_bytes, b_rows, c, e, expected = wgmma_exact_case(kind, upper, mode)
    np.testing.assert_array_equal(run_wgmma(kind, mode, upper, a_bytes, b_rows, c, e), expected)


@pytest.mark.parametrize("kind", [0, 2], ids=["f16", "s8"])
def test_wgmma_registers_in_flight_hold_no_result(kind):
    """Read before wgmma.wait_group: the accumulators are undefined (the emulator's poison,
    0x7FBADBAD: NaN as f32, no plausible s32 sum)."""
    rng = np.random.default_rng(5)
    a, b, pairs, a_bytes, b_rows = wgmma_operands(rng, kind)
    c = np.zeros((64, 128), np.int32 if kind == 2 else np.float32)
    d = run_wgmma(kind, 1, False, a_bytes, b_rows, c, wgmma_metadata(pairs, kind))
    assert np.all(d.view(np.uint32) == 0x7FBADBAD)


def test_wgmma_metadata_of_each_warp_names_its_own_rows():
    """Rows 16..31 (warp 1) keep indices (2, 3) where every other row keeps (0, 1); B is non-zero
    only at index-2 rows, so only warp 1's rows see it: a warp reading another's metadata fails."""
    pairs = np.tile([0, 1], (64, 8, 1))
    pairs[16:32] = [2, 3]
    a = np.ones((64, 16), np.float32)
    b = np.zeros((32, 128), np.float32)
    b[2::4] = 1
    b_rows = np.ascontiguousarray(to_bits(b.T, False)).view(np.uint8)
    d = run_wgmma(0, 0, False, to_bits(a, False).view(np.uint8), b_rows, np.zeros((64, 128), np.float32),
                  wgmma_metadata(pairs, 0))
    assert np.all(d[16:32] == 8) and np.all(d[:16] == 0) and np.all(d[32:] == 0)


# ---- ldmatrix ------------------------------------------------------------------------------------
@pytest.mark.parametrize("matrices", [1, 2, 4])
@pytest.mark.parametrize("trans", [False, True])
def test_ldmatrix(matrices, trans):
    rng = np.random.default_rng(matrices + 10 * trans)
    image = rng.integers(0, 2**16, 64 * 8).astype(np.uint16)  # 64 rows of 16 bytes
    offsets = (rng.permutation(64)[:32] * 16).astype(np.int32)  # arbitrary row addresses
    offsets[8 * matrices:] = 1 << 20  # unused lanes: ignored, even when out of range
    out = np.zeros((32, 4), np.uint32)
    _C.simt_selftest_ldmatrix(matrices, trans, ptr(image), image.size, ptr(offsets), ptr(out))
    rows = image.reshape(64, 8)
    expected = np.zeros((32, 4), np.uint32)
    for lane in range(32):
        g, t = divmod(lane, 4)
        for i in range(matrices):
            m = np.stack([rows[offsets[8 * i + r] // 16] for r in range(8)])  # [row][col]
            lo, hi = (m[2 * t, g], m[2 * t + 1, g]) if trans else (m[g, 2 * t], m[g, 2 * t + 1])
            expected[lane, i] = int(lo) | (int(hi) << 16)
    np.testing.assert_array_equal(out, expected)


# ---- shuffles and ballot -------------------------------------------------------------------------
@pytest.mark.parametrize("width", [32, 16, 8, 4])
def test_shuffles_and_ballot(width):
    rng = np.random.default_rng(width)
    values = rng.integers(-(2**31), 2**31, 32).astype(np.int32)
    src = rng.integers(0, 64, 32).astype(np.int32)
    xor_mask, delta = 5 % width or 1, 3 % width or 1
    out = np.zeros((32, 5), np.int32)
    _C.simt_selftest_shuffles(ptr(values), ptr(src), xor_mask, delta, width, ptr(out))
    for lane in range(32):
        start = lane // width * width
        end = start + width - 1
        assert out[lane, 0] == values[start + src[lane] % width]
        j = lane ^ xor_mask
        assert out[lane, 1] == values[j if j <= end else lane]
        assert out[lane, 2] == values[lane + delta if lane + delta <= end else lane]
        assert out[lane, 3] == values[lane - delta if lane - delta >= start else lane]
    ballot = sum(1 << lane for lane in range(32) if values[lane] & 1)
    assert np.all(out[:, 4].view(np.uint32) == ballot)


# ---- cp.async ------------------------------------------------------------------------------------
def run_cp_async(mode, chunks, seed):
    rng = np.random.default_rng(seed)
    src = rng.integers(0, 256, chunks * 16).astype(np.uint8)
    pred = (rng.random(chunks) < 0.7).astype(np.uint8)
    out = np.zeros((2, chunks * 16), np.uint8)
    _C.simt_selftest_cp_async(mode, ptr(src), ptr(pred), chunks, ptr(out))
    landed = src.reshape(chunks, 16) * pred[:, None]
    return out.reshape(2, chunks, 16), landed


def test_cp_async_predicate_zero_fills():
    out, landed = run_cp_async(0, 40, 0)
    np.testing.assert_array_equal(out[0], landed)


def test_cp_async_missing_wait_reads_stale_shared_memory():
    """Copies land only when their group is waited for: without the wait the kernel reads the
    0xFF poison of fresh shared memory, as a race on the GPU could."""
    out, _ = run_cp_async(1, 40, 1)
    assert np.all(out[0] == 0xFF)


def test_cp_async_wait_group_retires_oldest_groups_first():
    out, landed = run_cp_async(2, 40, 2)
    np.testing.assert_array_equal(out[0, :32], landed[:32])  # group 0 waited for
    assert np.all(out[0, 32:] == 0xFF)  # group 1 still in flight after wait_group 1
    np.testing.assert_array_equal(out[1], landed)


# ---- mbarrier and TMA -----------------------------------------------------------------------------
def tma_box_reference(src, c0, c1, box_cols, box_rows, swizzle):
    """The bytes cp.async.bulk.tensor.2d leaves in shared memory at offset 1024 (tma_selftest.cuh's
    destination): the box with zeros outside src, its 16-byte chunks moved by the swizzle, which
    XORs address bits [4, 4 + log2(swizzle / 16)) with bits [7, ...) (CUDA's cuTensorMapEncodeTiled
    CU_TENSOR_MAP_SWIZZLE_*B, CUTLASS Swizzle<b, 4, 3>)."""
    rows, cols = src.shape
    box = np.zeros((box_rows, box_cols), np.uint8)
    for r in range(box_rows):
        for c in range(box_cols):
            if 0 <= c1 + r < rows and 0 <= c0 + c < cols:
                box[r, c] = src[c1 + r, c0 + c]
    address = 1024 + np.arange(box.size)
    if swizzle:
        address ^= ((address >> 7) & (swizzle // 16 - 1)) << 4
    out = np.zeros(box.size, np.uint8)
    out[address - 1024] = box.reshape(-1)
    return out


def run_tma_box(mode, src, row_stride, box_cols, box_rows, swizzle, c0, c1, backend="simt"):
    """_C.<backend>_tma_selftest on byte tensor src (rows row_stride bytes apart) -> the landed box."""
    rows, cols = src.shape
    store = np.zeros((rows, row_stride), np.uint8)
    store[:, :cols] = src
    out = np.full(box_cols * box_rows, 7, np.uint8)
    if backend == "simt":
        _C.simt_tma_selftest(mode, ptr(store), rows, cols, row_stride, box_cols, box_rows, swizzle, c0, c1, ptr(out))
        return out
    store_dev, out_dev = torch.from_numpy(store).cuda(), torch.from_numpy(out).cuda()
    _C.cuda_tma_selftest(mode, store_dev.data_ptr(), rows, cols, row_stride, box_cols, box_rows, swizzle, c0, c1,
                         out_dev.data_ptr(), stream=torch.cuda.current_stream().cuda_stream)
    torch.cuda.synchronize()
    return out_dev.cpu().numpy()


# A 20 x 150 byte tensor in rows 160 bytes apart; boxes of 16 rows that start inside it, before it
# (negative coordinates) and run past its last row and column: zeros there. Each starts a whole 16
# bytes into the rows, as the hardware requires (test_tma_box_refuses_a_start_inside_16_bytes). Each
# swizzle with rows of one span (the TMA pipelines' boxes), and none.
TMA_BOX_CASES = [(swizzle, box_cols, c0, c1) for swizzle, box_cols in [(0, 48), (32, 32), (64, 64), (128, 128)]
                 for c0, c1 in [(0, 0), (16, 3), (-16, -2), (112, 13)]]


def assert_tma_box_matches_model(swizzle, box_cols, c0, c1, backend="simt"):
    rng = np.random.default_rng(swizzle + c0 + 2 * c1 + 64)
    src = rng.integers(1, 256, (20, 150), dtype=np.uint8)
    out = run_tma_box(0, src, 160, box_cols, 16, swizzle, c0, c1, backend)
    np.testing.assert_array_equal(out, tma_box_reference(src, c0, c1, box_cols, 16, swizzle))


@pytest.mark.parametrize("swizzle,box_cols,c0,c1", TMA_BOX_CASES)
def test_tma_box_matches_the_swizzle_and_zero_fill_model(swizzle, box_cols, c0, c1):
    assert_tma_box_matches_model(swizzle, box_cols, c0, c1)


def test_tma_box_read_before_the_wait_sees_poison():
    """A copy lands when its mbarrier is waited on: a read before that sees 0xFF, as a race on the
    GPU could see stale bytes."""
    src = np.arange(1, 65, dtype=np.uint8).reshape(4, 16)
    assert np.all(run_tma_box(1, src, 16, 16, 4, 0, 0, 0) == 0xFF)
    np.testing.assert_array_equal(run_tma_box(0, src, 16, 16, 4, 0, 0, 0), src.reshape(-1))


def test_tma_box_refuses_a_start_inside_16_bytes():
    src = np.ones((20, 150), np.uint8)
    with pytest.raises(RuntimeError, match=r"the box starts 40 bytes into its rows \(c0 = 40\); the hardware takes "
                                           r"only whole 16 bytes"):
        run_tma_box(0, src, 160, 48, 16, 0, 40, 13)


def test_tma_box_refuses_a_tensor_map_it_does_not_model():
    src = np.zeros((4, 64), np.uint8)
    with pytest.raises(RuntimeError, match=r"rows are one swizzle span \(128 bytes\), not 64"):
        run_tma_box(0, src, 64, 64, 4, 128, 0, 0)
    with pytest.raises(RuntimeError, match=r"invalid tensor map"):
        run_tma_box(0, src, 72, 64, 4, 0, 0, 0)  # rows 72 bytes apart: not whole 16 bytes


# ---- launch geometry, atomics, conversions ------------------------------------------------------
def test_grid_and_block_indices():
    grid, block = (2, 3, 2), (8, 4, 2)
    threads = np.prod(block)
    out = np.full((np.prod(grid) * threads, 8), -7, np.int32)
    _C.simt_selftest_indices(grid, block, ptr(out))
    rows = []
    for bz in range(grid[2]):
        for by in range(grid[1]):
            for bx in range(grid[0]):
                for linear in range(threads):
                    tx, ty, tz = linear % 8, linear // 8 % 4, linear // 32
                    rows.append([bx, by, bz, tx, ty, tz, linear % 32, 48])
    np.testing.assert_array_equal(out, np.array(rows))


def test_block_order_default_increasing_and_seeded_permutations(shuffled_block_orders):
    grid = (3, 4, 5)
    blocks = int(np.prod(grid))

    def arrivals():
        tickets, out = np.zeros(1, np.int32), np.full(blocks, -1, np.int32)
        _C.simt_selftest_block_arrivals(grid, ptr(tickets), ptr(out))
        assert tickets[0] == blocks
        return out.tolist()

    assert arrivals() == list(range(blocks))
    _C.simt_set_block_order(1)
    first = arrivals()
    assert sorted(first) == list(range(blocks)) and first != list(range(blocks))
    assert arrivals() == first  # a seed fixes the order
    _C.simt_set_block_order(2)
    assert arrivals() != first
    _C.simt_set_block_order(0)
    assert arrivals() == list(range(blocks))


def test_atomics_across_blocks():
    fsum, isum = np.zeros(1, np.float32), np.zeros(1, np.int32)
    imin, lmin = np.full(1, 2**31 - 1, np.int32), np.full(1, 2**62, np.int64)
    _C.simt_selftest_atomics(3, ptr(fsum), ptr(isum), ptr(imin), ptr(lmin))
    assert fsum[0] == 96.0 and isum[0] == 192 and imin[0] == 0 and lmin[0] == 0
    imin[0], lmin[0] = -5, -5
    _C.simt_selftest_atomics(1, ptr(fsum), ptr(isum), ptr(imin), ptr(lmin))
    assert imin[0] == -5 and lmin[0] == -5


def test_f16_bf16_to_f32_all_bit_patterns():
    bits = np.arange(2**16, dtype=np.uint16)
    for kind, bf16 in ((0, False), (1, True)):
        out = np.zeros(bits.size, np.float32)
        _C.simt_selftest_convert(kind, ptr(bits), ptr(out), bits.size)
        with np.errstate(invalid="ignore"):
            ref = from_bits(bits, bf16).astype(np.float32)
        np.testing.assert_array_equal(out.view(np.uint32)[~np.isnan(ref)], ref.view(np.uint32)[~np.isnan(ref)])
        assert np.all(np.isnan(out) == np.isnan(ref))


def test_f32_to_f16_bf16_round_to_nearest_even():
    rng = np.random.default_rng(0)
    edge = np.array([0.0, -0.0, np.inf, -np.inf, 65504, 65519.99, 65520, -65520, 2**-24, 2**-25, 2**-25 * 1.0001,
                     3 * 2**-26, 2**-14, 2**-14 * (1 - 2**-11), 1 + 2**-11, 1 + 3 * 2**-11, 3.4e38, 1e-45],
                    dtype=np.float32)
    random_bits = rng.integers(0, 2**32, 200_000, dtype=np.uint64).astype(np.uint32).view(np.float32)
    x = np.concatenate([edge, random_bits, rng.standard_normal(10_000).astype(np.float32)])
    finite = ~np.isnan(x)
    for kind, bf16 in ((2, False), (3, True)):
        out = np.zeros(x.size, np.uint16)
        _C.simt_selftest_convert(kind, ptr(x), ptr(out), x.size)
        ref = to_bits(x, bf16)
        np.testing.assert_array_equal(out[finite], ref[finite])
        assert np.all(np.isnan(from_bits(out[~finite], bf16)))  # NaN stays NaN


# ---- errors the hardware would not forgive -------------------------------------------------------
MISUSE = [
    (0, r"never reached by every thread"),
    (1, r"different collectives: this lane at vote\.sync\.ballot\.b32, lane 0 at shfl\.sync\.idx\.b32"),
    (2, r"ldmatrix\.sync\.aligned\.m8n8\.x4\.shared\.b16, row address of lane 3: .*out of range"),
    (3, r"row address of lane 3: shared-memory address at offset 8 is not 16-byte aligned"),
    (4, r"cp\.async.*out of range"),
    (5, r"exited while lane 0 of its warp waits at shfl\.sync\.idx\.b32"),
    (6, r"block of 48 threads: warp collectives need a block size that is a multiple of 32"),
    (7, r"divergent warp"),
    (8, r"invalid launch configuration: 167936 bytes of dynamic shared memory"),
    (9, r"different collectives: .*\(selector 1\).*\(selector 0\)"),
    (10, r"cp\.async\.cg\.shared\.global: 16 source bytes at byte 16 of misuse_source, which holds 16 bytes"),
    (11, r"cp\.async\.cg\.shared\.global before griddepcontrol\.wait in a dependent launch"),
    (12, r"prefetch\.global\.L2: 1 source bytes at byte 16 of misuse_source, which holds 16 bytes"),
    (13, r"atomicAdd before griddepcontrol\.wait in a dependent launch"),
    (14, r"wgmma\.mma_async\.sp\.sync\.aligned\.m64n128k32\.f32\.f16\.f16 .* without a wgmma\.fence"),
    (15, r"thread exited with wgmma\.mma_async results in flight"),
    (16, r"waits at __syncthreads \(divergent warpgroup\)|deadlock"),
    (17, r"block of 64 threads: warpgroup collectives need a block size that is a multiple of 128"),
    (18, r"reads shared-memory bytes \[0, 16\) that thread 0 wrote \(cp\.async or st\.shared\) and has not fenced to the "
         r"async proxy"),
    (19, r"cp\.async\.cg\.shared\.global writes shared-memory bytes \[0, 16\) while a wgmma\.mma_async in flight reads"),
    (20, r"thread 5 passes A / B descriptors .* \(they must be the same across the warpgroup\)"),
    (21, r"without a wgmma\.fence since the thread's last wgmma\.wait_group or ldmatrix"),
    (22, r"reads shared-memory bytes \[0, 16\) that a cp\.async of thread 0 still in flight writes"),
    (23, r"reads shared-memory bytes \[0, 16\) that thread 1 wrote \(cp\.async or st\.shared\) and has not fenced"),
    (24, r"reads shared-memory bytes \[0, 16\) that thread 0 wrote \(cp\.async or st\.shared\) and has not fenced"),
    (25, r"exited with TMA copies in flight that signal the mbarrier at offset 0 \(no thread waited for them\)"),
    (26, r"mbarrier\.try_wait\.parity on the mbarrier at offset 0 that thread 0 initialised with no __syncthreads"),
    (27, r"deadlock, no thread can proceed \(thread 0 at mbarrier\.try_wait\.parity"),
    (28, r"cp\.async\.cg\.shared\.global writes shared-memory bytes \[16, 32\), which hold the mbarrier at offset 16"),
    (29, r"cp\.async\.bulk\.tensor\.2d: a copy of 16 bytes onto an mbarrier whose current phase has 0 announced bytes"),
    (30, r"wgmma\.wait_group: a register that a wgmma of thread 7 reads \(its metadata word or A fragment\) went from "
         r"2290649224 to 1145324612 while the wgmma was in flight"),
    (31, r"wgmma\.wait_group: a register that a wgmma of thread 9 reads .* went from 0 to 1 while the wgmma was in "
         r"flight"),
    (32, r"cp\.async\.cg\.shared\.global: 16 source bytes at byte 16 of misuse_source, which holds 24 bytes"),
]


@pytest.mark.parametrize("which,message", MISUSE, ids=[str(w) for w, _ in MISUSE])
def test_misuse_is_reported(which, message):
    with pytest.raises(RuntimeError, match=message) as info:
        _C.simt_selftest_misuse(which)
    assert "kernel 'kernels::misuse_kernel'" in str(info.value)


def test_errors_name_block_and_thread_and_emulator_recovers():
    with pytest.raises(RuntimeError, match=r"block \(0,0,0\), thread \(\d+,0,0\) \(warp \d, lane \d+\)"):
        _C.simt_selftest_misuse(0)
    test_mma_k32_hardware_test_vector()  # a failed launch leaves nothing behind
