"""The INT8 CUDA kernels (quantize.cuh, reorder.cuh's int8 layout, gemm_sp_s8.cuh) on every kernel
backend (the `kernels` fixture: the SIMT emulator always, the GPU where there is one), against
numpy oracles that follow the INT8 contract's
order of operations: per-token scale amax / 127 (fp32, correctly rounded), q = rint(x / scale)
clamped to +-127, an exact integer sum (int64, clamped to int32), then fp32 products
(acc * w_scale) * x_scale, + bias, activation and one rounding to the output dtype.

Without an activation the kernel must equal the oracle bit for bit; with gelu/silu (fp32 erfcf /
expf, whose last bit is not specified across libraries) at most 1 ulp of the output dtype in the
emulator; the device's erfcf / expf may be a few fp32 ulps off.
GPU-only large shapes live in test_kernels_cuda.py and share the check functions below.
"""
import math

import numpy as np
import pytest
import torch

from sparsegemm import _C, oracle
from sparsegemm.format import DTYPE_CODES
from test_kernels_simt import (DECODE, DECODE_TMA, GATE_OF, LARGE_M, META_ROW_PAD, MID_M, SIX_PAIRS, WGMMA, WGMMA_TMA,
                               WGMMA_TMA_WIDE, KernelBackend, gate_up_split, padded_k)

INT32_MAX = 2**31 - 1


# ---- oracles -------------------------------------------------------------------------------------
def reference_quantize_rows(x):
    """x: torch [M, K] float -> (x_q int8 [M, K], x_scale float32 [M]) per the INT8 contract."""
    xf = x.float().numpy()
    absx = np.abs(xf)
    amax = np.where(np.isnan(absx).any(axis=1), np.float32(np.nan),
                    np.nan_to_num(absx, nan=0.0).max(axis=1, initial=np.float32(0)))
    amax = amax.astype(np.float32)
    scale = np.where(amax == 0, np.float32(1), amax / np.float32(127)).astype(np.float32)
    with np.errstate(invalid="ignore", divide="ignore"):
        q = np.rint(xf / scale[:, None])  # float32 division, round half to even
    q = np.where(np.isnan(q), 0, np.clip(q, -127, 127)).astype(np.int8)
    return q, scale


def reference_gemm_s8(x_q, wq, w_scale, x_scale, bias, act, out_dtype):
    """Integer-exact sum, then the epilogue in the contract's order (fp32 steps, one rounding)."""
    # float64 BLAS, not numpy's unblocked int64 matmul (tens of seconds at the GPU's large shapes):
    # exact, as every partial sum is an integer below 127^2 * K < 2^53.
    acc = (x_q.astype(np.float64) @ wq.astype(np.float64).T).astype(np.int64)
    acc = np.clip(acc, -2**31, INT32_MAX).astype(np.float32)  # float(int32), round to nearest
    y = (acc * w_scale[None, :].astype(np.float32)).astype(np.float32)
    y = (y * x_scale[:, None].astype(np.float32)).astype(np.float32)
    if bias is not None:
        y = (y + bias.float().numpy()[None, :]).astype(np.float32)
    if act in GATE_OF:  # act(gate) * up, one fp32 product
        gate, up = (t.numpy() for t in gate_up_split(torch.from_numpy(y)))
        return torch.from_numpy((reference_activation(gate, GATE_OF[act]) * up).astype(np.float32)).to(out_dtype)
    return torch.from_numpy(reference_activation(y, act)).to(out_dtype)


def reference_activation(v, act):
    """The kernel's fp32 formulas step by step (gemm_sp.cuh apply_activation): gelu =
    (0.5 v) erfc(-v / sqrt 2), silu = v / (1 + exp(-v)), erfc and exp correctly rounded."""
    f32 = np.float32
    if act == "none":
        return v
    if act == "relu":
        return np.where(v < 0, f32(0), v).astype(f32)
    if act == "gelu":
        erfc = np.vectorize(math.erfc)((v * f32(-0.70710678118654752)).astype(f32).astype(np.float64)).astype(f32)
        return ((f32(0.5) * v).astype(f32) * erfc).astype(f32)
    exp = np.exp((-v).astype(np.float64)).astype(f32)
    return (v / (f32(1) + exp).astype(f32)).astype(f32)


def sparse_int8_weight(n, k, gen, low=-127, high=128):
    """Random 2:4 int8 weight [n, k] (every group one of the six patterns) with its compressed
    values [n, Kp/2] and logical metadata [n, ceil(G/2)] (format.h)."""
    kp = padded_k(k)
    g = kp // 4
    pat = torch.randint(0, 6, (n, g), generator=gen).numpy()
    vals = torch.randint(low, high, (n, g, 2), generator=gen).numpy().astype(np.int8)
    pairs = np.array(SIX_PAIRS)
    i0, i1 = pairs[pat, 0], pairs[pat, 1]
    w = np.zeros((n, g, 4), np.int8)
    np.put_along_axis(w, i0[..., None], vals[..., :1], axis=2)
    np.put_along_axis(w, i1[..., None], vals[..., 1:], axis=2)
    w = w.reshape(n, kp)
    if kp != k:  # the padded tail of K holds zeros
        w[:, k:] = 0
        vals = vals.reshape(n, kp // 2)
        kept_cols = np.stack([4 * np.arange(g)[None, :] + i0, 4 * np.arange(g)[None, :] + i1], axis=2).reshape(n, -1)
        vals = np.where(kept_cols >= k, 0, vals).astype(np.int8)
    nibbles = (i0 | (i1 << 2)).astype(np.uint8)
    if g % 2:
        nibbles = np.concatenate([nibbles, np.full((n, 1), 0x4, np.uint8)], axis=1)
    meta = (nibbles[:, 0::2] | (nibbles[:, 1::2] << 4)).astype(np.uint8)
    return w[:, :k].copy(), np.ascontiguousarray(vals.reshape(n, kp // 2)), meta


def reference_kernel_meta_s8(meta, n, k):
    """reorder.cuh's int8 layout: uint32 [Npad/16, Kpad/64, 32], word 4g+q for lane 4g+q:
    row 16tn + g + 8(q & 1), K 64tk + 32(q >> 1) .. + 31, group j of those 32 K in nibble j."""
    g_count = padded_k(k) // 4
    npad = (n + META_ROW_PAD - 1) // META_ROW_PAD * META_ROW_PAD
    kpad = (padded_k(k) + 127) // 128 * 128
    nib = np.full((npad, kpad // 4), 0x4, np.uint64)
    nib[:n, :g_count] = np.stack([meta & 0xF, meta >> 4], axis=2).reshape(n, -1)[:, :g_count]
    octs = nib.reshape(npad, kpad // 32, 8)
    word = (octs << (4 * np.arange(8, dtype=np.uint64))).sum(axis=2)  # [row, 32-K chunk]
    word = word.reshape(npad // 16, 2, 8, kpad // 64, 2)  # [tn, row8, g, tk, khalf]
    word = word.transpose(0, 3, 2, 4, 1)  # [tn, tk, g, khalf, row8]: lane 4g + 2 khalf + row8
    return word.reshape(-1).astype(np.uint32)


# ---- data ------------------------------------------------------------------------------------------
def random_scales(count, gen):
    return (torch.rand(count, generator=gen, dtype=torch.float64) * 0.02 + 1e-4).float().numpy()


def ulps_apart(a, b):
    """Distance in units in the last place between two f16/bf16 tensors (same sign assumed)."""
    ai, bi = a.view(torch.int16).int(), b.view(torch.int16).int()
    return (ai - bi).abs()


# ---- metadata reorder ------------------------------------------------------------------------------
def assert_kernel_meta_s8_matches_reference(kernels, n, k):
    _, _, meta = sparse_int8_weight(n, k, torch.Generator().manual_seed(n * 31 + k))
    got = kernels.kernel_meta(meta, n, k, s8=True).numpy().view(np.uint32)
    np.testing.assert_array_equal(got, reference_kernel_meta_s8(meta, n, k))


@pytest.mark.parametrize("n,k", [(1, 4), (16, 64), (20, 100), (130, 200), (8, 260)])
def test_reorder_meta_s8_layout(kernels, n, k):
    assert_kernel_meta_s8_matches_reference(kernels, n, k)


def test_kernel_meta_bytes_s8_pads_rows_and_k(kernels):
    assert kernels.kernel_meta_bytes_s8(1, 4) == 256 // 16 * (128 // 64) * 32 * 4
    assert kernels.kernel_meta_bytes_s8(257, 132) == 512 // 16 * (256 // 64) * 32 * 4


# ---- quantize ----------------------------------------------------------------------------------------
def assert_bits_equal_nan_by_position(got, ref):
    """float32 arrays equal bit for bit, except that where the oracle has NaN any NaN will do: the
    GPU's fp32 arithmetic on NaN returns 0x7fffffff, the host's keeps the input's payload."""
    nan = np.isnan(ref)
    np.testing.assert_array_equal(np.isnan(got), nan)
    np.testing.assert_array_equal(got[~nan].view(np.uint32), ref[~nan].view(np.uint32))


def assert_quantize_rows_matches_reference(kernels, x):
    x_q, x_scale = kernels.quantize_rows(x)
    ref_q, ref_scale = reference_quantize_rows(x)
    assert_bits_equal_nan_by_position(x_scale, ref_scale)
    np.testing.assert_array_equal(x_q, ref_q)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("m,k", [(1, 4), (7, 300), (17, 1000), (3, 0)])
def test_quantize_rows_matches_reference(kernels, dtype, m, k):
    gen = torch.Generator().manual_seed(m * 100 + k)
    x = (torch.randn(m, k, generator=gen) * 3).to(dtype)
    if m > 2 and k > 0:
        x[1] = 0  # all-zero row: scale 1, q = 0
        x[2, : k // 2] = -x[2, : k // 2].abs() * 50  # the negative extreme sets amax
    if m > 3:
        x[3, k // 3] = float("nan")  # a NaN row: scale NaN, q = 0
    assert_quantize_rows_matches_reference(kernels, x)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_quantize_rows_reads_every_round_of_a_long_row_aligned_or_not(kernels, dtype):
    # A block reads 16-byte vectors, four rounds of 256 threads before it waits (quantize.cuh):
    # rows of 9005 elements take a second pass of rounds, with a partial vector at the end. The
    # row's extreme and a NaN sit past the first 8192 elements; row 1 of the strided view starts off
    # the 16-byte grid (element loads), row 0 on it.
    k = 9005
    gen = torch.Generator().manual_seed(k)
    base = torch.randn(4, k + 1, generator=gen).to(dtype)
    x = base[:, :k]
    x[0, 9000] = -300.0  # row 0: amax from the second round
    x[1, 3] = 0.0
    x[1, k - 1] = 250.0  # row 1: amax from the last, partial vector
    x[2, 8200] = float("nan")
    assert x.stride(0) * x.element_size() % 16 != 0
    assert_quantize_rows_matches_reference(kernels, x)


def assert_quantize_rows_static_matches_oracle(kernels, x, scale, row_offsets=None):
    x_q, x_scale = kernels.quantize_rows_static(x, scale, row_offsets)
    if row_offsets is not None:  # each row by its group's scale; rows past every group by the last's
        rows = torch.arange(x.shape[0])
        scale = scale[torch.searchsorted(row_offsets[1:], rows, right=True).clamp(max=scale.numel() - 1)]
    ref_q, ref_scale = oracle.quantize_rows_static_int8(x, scale)
    assert_bits_equal_nan_by_position(x_scale, ref_scale.numpy())
    np.testing.assert_array_equal(x_q, ref_q.numpy())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("m,k", [(1, 4), (5, 300), (3, 9005), (2, 0)])
@pytest.mark.parametrize("grouped", [False, True])
def test_quantize_rows_static_matches_oracle(kernels, dtype, m, k, grouped):
    # Rows: plain, one with values the scale saturates both ways, one with an infinity (scale NaN,
    # the infinity itself +127), one with a NaN (scale NaN, the NaN 0), one of exact halves (x / s
    # = n + 0.5 rounds to even); a strided view (ldx = k + 1: rows off the 16-byte grid); long rows
    # hold their specials past the first 8192 elements. Grouped: three groups, the middle one
    # empty, the last row past every group.
    gen = torch.Generator().manual_seed(m * 1000 + k)
    base = (torch.randn(max(m, 5), k + 1, generator=gen) * 4).to(dtype)
    x = base[:m, :k]
    at = k - 1 if k > 8192 else k // 2
    if k:
        if m > 1:
            x[1, : k // 3] = 1e4
            x[1, k // 3:] = -1e4
        if m > 2:
            x[2, at] = float("inf")
        if m > 3:
            x[3, at] = float("nan")
        if m > 4:
            x[4] = torch.tensor([0.5, 1.5, 2.5, -2.5] * (k // 4) + [3.5] * (k % 4)).to(dtype)
    if grouped:
        scale = torch.tensor([0.05, 0.3, 1.0])
        offsets = torch.tensor([0, max(m - 2, 0), max(m - 2, 0), max(m - 1, 0)])  # rows past the last: its scale
        assert_quantize_rows_static_matches_oracle(kernels, x, scale, offsets)
    else:
        assert_quantize_rows_static_matches_oracle(kernels, x, torch.tensor(0.25 if m > 4 else 0.07))


def test_quantize_rows_static_finds_each_rows_group_among_many(kernels):
    # More groups than the block has threads (quantize.cuh group_of_row reads them in rounds), rows
    # before the first group's start (group 0's scale) and runs of empty groups.
    groups, m = 300, 40
    gen = torch.Generator().manual_seed(300)
    offsets = torch.sort(torch.randint(3, m - 2, (groups + 1,), generator=gen)).values
    offsets[-40:] = m - 2
    scale = torch.rand(groups, generator=gen) + 0.01
    x = (torch.randn(m, 24, generator=gen) * 3).half()
    assert_quantize_rows_static_matches_oracle(kernels, x, scale, offsets)


def test_quantize_rows_static_refuses_offsets_without_groups(kernels):
    x = torch.ones(2, 8, dtype=torch.float16)
    with pytest.raises(ValueError, match="row_offsets needs at least one group, got groups = 0"):
        kernels._launch("quantize_rows_static", 2, 8, x.data_ptr(), 8, DTYPE_CODES[x.dtype], torch.ones(2).data_ptr(),
                        torch.zeros(3, dtype=torch.int64).data_ptr(), 0, torch.empty(2, 8, dtype=torch.int8).data_ptr(),
                        torch.empty(2).data_ptr())


def test_quantize_rows_strided_input_rounds_half_to_even(kernels):
    # Row amax 127 gives scale exactly 1: x / scale = x, so halves round to even.
    base = torch.zeros((2, 12), dtype=torch.float32)
    base[:, 1:11] = torch.tensor([127, 2.5, 3.5, -2.5, -3.5, 0.5, -0.5, 1.5, 126.5, -127])
    x = base[:, 1:11]  # ldx = 12
    x_q, x_scale = kernels.quantize_rows(x)
    np.testing.assert_array_equal(x_scale, [1.0, 1.0])
    np.testing.assert_array_equal(x_q[0], [127, 2, 4, -2, -4, 0, 0, 2, 126, -127])


def test_quantize_rows_clamps_at_127_and_an_underflowing_scale_is_one(kernels):
    # A subnormal fp32 row: amax / 127 rounds to 2^-149, and -amax / 2^-149 = -189 must clamp to
    # -127 (symmetric), not -128. A row whose amax / 127 underflows to 0 takes scale 1 (all q 0),
    # as the CPU backend does: a scale of 0 gave q = +-127 from x / 0.
    tiny = float(np.float32(189 * 2.0 ** -149))
    x_q, x_scale = kernels.quantize_rows(torch.tensor([[-tiny, tiny, 0.0, 0.0]], dtype=torch.float32))
    assert x_scale[0] == np.float32(2.0 ** -149)
    np.testing.assert_array_equal(x_q[0], [-127, 127, 0, 0])
    x_q, x_scale = kernels.quantize_rows(torch.tensor([[1e-45, -1e-45, 0.0, 3e-45]], dtype=torch.float32))
    np.testing.assert_array_equal(x_scale, [1.0])
    np.testing.assert_array_equal(x_q[0], [0, 0, 0, 0])


def test_quantize_rows_nan_row_propagates(kernels):
    x = torch.tensor([[1.0, float("nan"), 3.0, -2.0], [1.0, 2.0, 4.0, -8.0]], dtype=torch.float16)
    x_q, x_scale = kernels.quantize_rows(x)
    assert np.isnan(x_scale[0])
    np.testing.assert_array_equal(x_q[0], [0, 0, 0, 0])
    ref_q, ref_scale = reference_quantize_rows(x)
    assert x_scale[1] == ref_scale[1]
    np.testing.assert_array_equal(x_q[1], ref_q[1])


# ---- GEMM ----------------------------------------------------------------------------------------
# (M, N, K): M in {1, 7, 16, 17, 64}, N not a tile multiple, K % 64 != 0, K with one k-tile of 128
# (fewer than any pipeline's stages), K % 16 != 0 (element loads of X) and K % 32 == 0 (16-byte
# cp.async of X and Wc), K large enough that the sums need more than 16 bits (|acc| reaches
# ~127^2 * K / 2).
S8_SHAPES = [(1, 40, 36), (7, 24, 200), (16, 72, 1000), (17, 136, 100), (64, 40, 416), (3, 130, 132),
             (2, 24, 388),
             (5, 256, 1056)]  # whole 128-row blocks, 16-byte rows: the fast Wc copies, then a stage across Kc


def assert_gemm_s8_bit_exact(kernels, out_dtype, m, n, k, config, split_k):
    """Random int8 operands, scales and bias: the GEMM equals the oracle bit for bit."""
    gen = torch.Generator().manual_seed(m * 7 + n * 13 + k)
    wq, values, meta = sparse_int8_weight(n, k, gen)
    x_q = torch.randint(-127, 128, (m, k), generator=gen).to(torch.int8)
    w_scale, x_scale = random_scales(n, gen), random_scales(m, gen)
    bias = torch.randn(n, generator=gen).to(out_dtype)
    y = kernels.gemm_s8(x_q, values, meta, w_scale, x_scale, n, k, out_dtype, bias=bias, config=config,
                        split_k=split_k)
    ref = reference_gemm_s8(x_q.numpy(), wq, w_scale, x_scale, bias, "none", out_dtype)
    assert torch.equal(y.view(torch.int16), ref.view(torch.int16))
    if k >= 1000:  # the sums really exceed 16 bits
        assert np.abs(x_q.numpy().astype(np.float64) @ wq.astype(np.float64).T).max() > 2**16


@pytest.mark.parametrize("out_dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("config", [LARGE_M, DECODE, WGMMA, MID_M])
@pytest.mark.parametrize("m,n,k", S8_SHAPES)
def test_gemm_s8_bit_exact_without_activation(kernels, out_dtype, config, m, n, k):
    assert_gemm_s8_bit_exact(kernels, out_dtype, m, n, k, config, 0)


@pytest.mark.parametrize("config,split_k", [(DECODE, 3), (DECODE, 0), (DECODE, 13), (MID_M, 3)])
def test_gemm_s8_split_k_matches_single_pass(kernels, config, split_k):
    m, n, k = 5, 72, 1568  # 13 k-tiles of 128, the last one partial
    gen = torch.Generator().manual_seed(split_k + 10 * config)
    wq, values, meta = sparse_int8_weight(n, k, gen)
    x_q = torch.randint(-127, 128, (m, k), generator=gen).to(torch.int8)
    w_scale, x_scale = random_scales(n, gen), random_scales(m, gen)
    if config == DECODE and split_k == 0:
        assert kernels.gemm_scratch(m, n, k, s8=True)[0] > 0  # the heuristic splits this one
    y = kernels.gemm_s8(x_q, values, meta, w_scale, x_scale, n, k, torch.float16, config=config, split_k=split_k)
    ref = reference_gemm_s8(x_q.numpy(), wq, w_scale, x_scale, None, "none", torch.float16)
    assert torch.equal(y.view(torch.int16), ref.view(torch.int16))


def test_gemm_s8_split_k_exact_under_any_block_order(shuffled_block_orders):
    # The tile's last split to arrive does the reduction, whichever it is (emulator block orders):
    # integer sums do not depend on their order, so this checks that the right block reduces and
    # that it waits for every split (the float tests in test_kernels_simt check the order).
    kernels = KernelBackend("simt")
    m, n, k = 3, 200, 1568
    gen = torch.Generator().manual_seed(5)
    wq, values, meta = sparse_int8_weight(n, k, gen)
    x_q = torch.randint(-127, 128, (m, k), generator=gen).to(torch.int8)
    w_scale, x_scale = random_scales(n, gen), random_scales(m, gen)
    ref = reference_gemm_s8(x_q.numpy(), wq, w_scale, x_scale, None, "none", torch.bfloat16)
    for seed in shuffled_block_orders:
        _C.simt_set_block_order(seed)
        y = kernels.gemm_s8(x_q, values, meta, w_scale, x_scale, n, k, torch.bfloat16, config=DECODE, split_k=4)
        assert torch.equal(y.view(torch.int16), ref.view(torch.int16))


def assert_gemm_s8_activation_close(kernels, out_dtype, act, m, n, k, config, split_k, gen, with_bias):
    """relu bit for bit; gelu / silu with the sign of the oracle and, in the emulator, within 1 ulp
    of the output dtype; on the GPU within 1 ulp plus 2^-22 |v| (v: the oracle's value before the
    activation), room for the device's erfcf / expf (a few fp32 ulps)."""
    wq, values, meta = sparse_int8_weight(n, k, gen)
    x_q = torch.randint(-127, 128, (m, k), generator=gen).to(torch.int8)
    w_scale, x_scale = random_scales(n, gen), random_scales(m, gen)
    bias = torch.randn(n, generator=gen).to(out_dtype) if with_bias else None
    y = kernels.gemm_s8(x_q, values, meta, w_scale, x_scale, n, k, out_dtype, bias=bias, act=act, config=config,
                        split_k=split_k)
    ref = reference_gemm_s8(x_q.numpy(), wq, w_scale, x_scale, bias, act, out_dtype)
    if act in ("relu", "reglu"):
        assert torch.equal(y.view(torch.int16), ref.view(torch.int16))
        return
    same_sign = torch.sign(y.float()) == torch.sign(ref.float())
    assert torch.all(same_sign | (ref == 0) | (y == 0))
    if kernels.name == "simt":
        assert int(ulps_apart(y, ref).max()) <= 1
        return
    v = reference_gemm_s8(x_q.numpy(), wq, w_scale, x_scale, bias, "none", torch.float32).double()
    finfo = torch.finfo(out_dtype)
    tol = ref.double().abs() * finfo.eps + finfo.smallest_normal * finfo.eps + v.abs() * 2.0**-22
    assert torch.all((y.double() - ref.double()).abs() <= tol)


@pytest.mark.parametrize("out_dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("act", ["relu", "gelu", "silu"])
@pytest.mark.parametrize("config,split_k", [(LARGE_M, 0), (WGMMA, 0), (DECODE, 2), (MID_M, 2)])
def test_gemm_s8_activation_within_one_ulp(kernels, out_dtype, act, config, split_k):
    gen = torch.Generator().manual_seed(len(act) + config)
    assert_gemm_s8_activation_close(kernels, out_dtype, act, 9, 40, 260, config, split_k, gen, with_bias=True)


@pytest.mark.parametrize("out_dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("config,split_k", [(LARGE_M, 0), (WGMMA, 0), (DECODE, 0), (DECODE, 3), (MID_M, 3)])
@pytest.mark.parametrize("m,n,k", [(1, 16, 260), (9, 144, 520), (130, 48, 132)])
def test_gemm_s8_gated_bit_exact(kernels, out_dtype, config, split_k, m, n, k):
    """ReGLU: relu is exact and the gate * up product one fp32 rounding, so the kernel equals the
    contract's oracle bit for bit; gate / up pairing and output columns are checked with it."""
    gen = torch.Generator().manual_seed(m + n + k + split_k)
    assert_gemm_s8_activation_close(kernels, out_dtype, "reglu", m, n, k, config, split_k, gen, with_bias=True)


@pytest.mark.parametrize("out_dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("act", ["relu", "reglu"])
@pytest.mark.parametrize("m,n,k,config,split_k", [(1, 32, 32, WGMMA_TMA, 0), (33, 144, 320, WGMMA_TMA, 0),
                                                  (130, 304, 2048, WGMMA_TMA, 0), (1, 32, 32, DECODE_TMA, 0),
                                                  (33, 272, 320, WGMMA_TMA_WIDE, 0), (130, 304, 2048, WGMMA_TMA_WIDE, 0),
                                                  (9, 144, 2080, DECODE_TMA, 3), (16, 304, 4096, DECODE_TMA, 0)])
def test_gemm_s8_tma_bit_exact(kernels, out_dtype, act, m, n, k, config, split_k):
    """The TMA pipelines (configs 3, 4, 5) on int8: Wc rows of K / 2 bytes must be whole 16 bytes (K %
    32 == 0); M and N tails, K ending inside a 128-wide k-tile, 16 / 32 k-tiles (four rounds of the
    stages), a decode split of K. relu and ReGLU are exact in the contract's order, so bit for bit
    against the oracle."""
    gen = torch.Generator().manual_seed(m + n + k + config)
    assert_gemm_s8_activation_close(kernels, out_dtype, act, m, n, k, config, split_k, gen, with_bias=True)


@pytest.mark.parametrize("config", [LARGE_M, DECODE, WGMMA, MID_M])
def test_gemm_s8_quantized_end_to_end_with_unaligned_rows(kernels, config):
    """quantize_rows -> gemm_s8 on X rows with an odd stride (the element-copy path), a NaN row
    (its outputs are NaN) and an output with a row stride wider than N (nothing written between)."""
    m, n, k = 6, 24, 72
    gen = torch.Generator().manual_seed(8)
    wq, values, meta = sparse_int8_weight(n, k, gen)
    x = torch.randn(m, k, generator=gen).to(torch.bfloat16)
    x[4, 3] = float("nan")
    x_q, x_scale = kernels.quantize_rows(x)
    store = torch.zeros((m, k + 3), dtype=torch.int8)
    store[:, 1:k + 1] = torch.from_numpy(x_q)
    w_scale = random_scales(n, gen)
    y_store = torch.full((m, n + 5), 42.0, dtype=torch.bfloat16)
    kernels.gemm_s8(store[:, 1:k + 1], values, meta, w_scale, x_scale, n, k, torch.bfloat16, config=config,
                    y=y_store[:, :n])
    ref = reference_gemm_s8(x_q, wq, w_scale, x_scale, None, "none", torch.bfloat16)
    assert torch.all(torch.isnan(y_store[4, :n]))
    keep = [0, 1, 2, 3, 5]
    assert torch.equal(y_store[keep, :n].view(torch.int16), ref[keep].view(torch.int16))
    assert torch.all(y_store[:, n:] == 42)


def test_gemm_s8_m_zero_writes_nothing(kernels):
    n, k = 16, 64
    gen = torch.Generator().manual_seed(1)
    _, values, meta = sparse_int8_weight(n, k, gen)
    y = torch.full((1, n), 3.0, dtype=torch.float16)
    scales = np.ones(n, np.float32)
    kernels.gemm_s8(torch.zeros((0, k), dtype=torch.int8), values, meta, scales, scales, n, k, torch.float16,
                    y=y[:0])
    assert torch.all(y == 3)


@pytest.mark.parametrize("config", [LARGE_M, DECODE, WGMMA, MID_M])
def test_gemm_s8_k_zero_gives_activation_of_bias(kernels, config):
    m, n = 3, 20
    x_q = torch.zeros((m, 0), dtype=torch.int8)
    bias = torch.arange(-10, 10, dtype=torch.bfloat16)
    values = np.zeros((n, 0), np.int8)
    meta = np.zeros((n, 0), np.uint8)
    y = kernels.gemm_s8(x_q, values, meta, np.ones(n, np.float32), np.ones(m, np.float32), n, 0, torch.bfloat16,
                        bias=bias, act="relu", config=config)
    assert torch.equal(y, torch.relu(bias).expand(m, n))


def test_gemm_s8_saturates_like_int64_clamped(kernels):
    """Every product is +127 * 127, so the true sum (K / 2 * 16129) passes INT32_MAX: the
    tensor core's .satfinite (and the split-K int64 clamp) must give INT32_MAX, not a wrapped
    negative number. K = 266,368 keeps 133,184 products: 2,148,124,736 > 2^31 - 1."""
    m, n, k = 1, 16, 266368
    g = k // 4
    values = np.full((n, k // 2), 127, np.int8)
    meta = np.full((n, (g + 1) // 2), 0x88, np.uint8)  # (0, 2) in every group
    x_q = torch.full((m, k), 127, dtype=torch.int8)
    w_scale = np.full(n, 2.0**-20, np.float32)
    x_scale = np.ones(m, np.float32)
    for split_k in (1, 4):
        y = kernels.gemm_s8(x_q, values, meta, w_scale, x_scale, n, k, torch.bfloat16, config=DECODE, split_k=split_k)
        # float(INT32_MAX) = 2^31; * 2^-20 = 2048 exactly. A wrapped sum would be negative.
        assert torch.all(y == 2048.0), (split_k, y)
