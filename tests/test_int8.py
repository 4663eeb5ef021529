"""INT8 (issue 4): quantizers, the CPU s8 GEMM against the int8 oracle, the Python layer.

The oracle (sparsegemm.oracle.linear_int8) follows the contract's order of operations: integer
results must match exactly; outputs match bit for bit without an activation and within one ulp of
the output dtype with one (fp32 vs float64 erf / exp).
"""
import numpy as np
import pytest
import torch
from torch import nn

import sparsegemm
from sparsegemm import _C, oracle, ops, quant
from sparsegemm import format as fmt

from conftest import sparse_weight

OUT_DTYPES = [torch.float16, torch.bfloat16, torch.float32]
ACTS = [None, "relu", "gelu", "silu"]
# Outputs below this are compared absolutely: the kernels' fp32 erfc / exp and the oracle's float64
# ones may round a tiny activation differently by more than an ulp of its own.
ACT_ABS_FLOOR = 1e-6


def random_int8_weight(n, k, seed=0, extreme=False):
    """(values int8 [N, Kp/2], meta, w_scale) with every 2:4 pattern; extreme: all values +-127."""
    gen = torch.Generator().manual_seed(seed)
    meta = sparsegemm.compress(sparse_weight(n, k, torch.float32, seed=seed), prune=True).meta
    shape = (n, fmt.values_cols(k))
    if extreme:
        values = torch.full(shape, 127, dtype=torch.int8)
    else:
        values = torch.randint(-127, 128, shape, generator=gen, dtype=torch.int8)
    # Values in the padded tail of the last group must be 0, as compress writes them.
    if k % 4:
        dense = oracle.decompress(values.to(torch.int16), meta, fmt.padded_k(k))
        dense[:, k:] = 0
        mask = ops.meta_to_mask(meta, fmt.padded_k(k))
        values = dense[mask].reshape(shape).to(torch.int8)
    w_scale = (torch.rand(n, generator=gen) + 0.01) / 127
    return values, meta, w_scale


def cpu_gemm_s8(x_q, x_scale, values, meta, k, w_scale, bias=None, act=None, out_dtype=torch.float16):
    m, n = x_q.shape[0], values.shape[0]
    y = torch.empty(m, n, dtype=out_dtype)
    _C.cpu_gemm_s8(m, n, k, x_q.data_ptr(), x_q.stride(0), values.data_ptr(), meta.data_ptr(), w_scale.data_ptr(),
                   x_scale.data_ptr(), 0 if bias is None else bias.data_ptr(), y.data_ptr(), y.stride(0),
                   fmt.DTYPE_CODES[out_dtype], fmt.ACTIVATION_CODES[act])
    return y


def ulp_distance(a: torch.Tensor, b: torch.Tensor, abs_floor: float = 0.0) -> int:
    """Largest distance in units in the last place between two same-dtype tensors (NaN == NaN),
    ignoring elements whose absolute difference is at most ``abs_floor``."""
    assert a.dtype == b.dtype
    bits = {torch.float16: torch.int16, torch.bfloat16: torch.int16, torch.float32: torch.int32}[a.dtype]

    def ordered(t):
        i = t.view(bits).to(torch.int64)
        return torch.where(i < 0, -(i & (2 ** (8 * t.element_size() - 1) - 1)), i)

    both_nan = torch.isnan(a) & torch.isnan(b)
    d = (ordered(a) - ordered(b)).abs()
    d[both_nan | ((a.double() - b.double()).abs() <= abs_floor)] = 0
    return int(d.max()) if d.numel() else 0


# ---- quantizers ---------------------------------------------------------------------------------

@pytest.mark.parametrize("in_dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("k", [1, 7, 16, 33, 130])
def test_quantize_rows_matches_oracle(isa, in_dtype, k):
    gen = torch.Generator().manual_seed(k)
    x = (torch.randn(19, k, generator=gen) * 3).to(in_dtype)
    x[3] = 0  # all-zero row: scale 1, zeros
    x[5, 0] = float("nan")  # NaN row: NaN scale, zeros
    x_q, x_scale = quant.quantize_activations(x)
    ref_q, ref_scale = oracle.quantize_rows_int8(x)
    assert torch.equal(x_q, ref_q)
    assert torch.allclose(x_scale, ref_scale, rtol=0, atol=0, equal_nan=True)
    assert x_scale[3] == 1 and torch.isnan(x_scale[5]) and not x_q[5].any()
    assert x_q.abs().max() <= 127


def test_quantize_rows_extreme_inputs_clamp(isa):
    big, tiny = 3.0e38, 1.0e-45
    x = torch.tensor([[big, -big, 1.0, -1.0] + [0.0] * 28,
                      [tiny, -tiny, 0.0, 0.0] + [tiny] * 28,
                      [float("inf"), 1.0, -2.0, 0.0] + [0.0] * 28,
                      [65504.0, -65504.0, 0.5, 2.0 ** -24] + [0.0] * 28], dtype=torch.float32)
    x_q, x_scale = quant.quantize_activations(x)
    ref_q, ref_scale = oracle.quantize_rows_int8(x)
    assert torch.equal(x_q, ref_q) and torch.allclose(x_scale, ref_scale, rtol=0, atol=0, equal_nan=True)
    assert x_q[0, :2].tolist() == [127, -127]
    # max |x| / 127 underflows to 0 in fp32 for this subnormal row: scale 1, values 0 (a scale of 0
    # with values saturated to +-127 would be refused by check_scale)
    assert x_scale[1] == 1 and not x_q[1].any()
    assert x_q[3, :2].tolist() == [127, -127]
    assert x_q.abs().max() <= 127


def test_quantize_rows_rounds_half_to_even():
    # amax 127 -> scale exactly 1: q = rint(x) with ties to even.
    x = torch.tensor([[127.0, 0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 126.5]])
    x_q, x_scale = quant.quantize_activations(x)
    assert x_scale.item() == 1.0
    assert x_q.tolist() == [[127, 0, 2, 2, 0, -2, -2, 126]]


def test_quantize_weight_in_runs_of_rows_gives_the_same_weight(monkeypatch):
    # The fp32 copy of the kept values is made a run of rows at a time (quant._QUANTIZE_RUN_ELEMENTS),
    # not for the layer at once: runs of 3 rows give the bits one run gives, and a non-finite kept
    # value in a later run is named by its row in the weight.
    gen = torch.Generator().manual_seed(4)
    w = torch.randn(20, 64, generator=gen).to(torch.bfloat16)
    whole = quant.quantize_weight(w)
    monkeypatch.setattr(quant, "_QUANTIZE_RUN_ELEMENTS", 3 * 32)
    runs = quant.quantize_weight(w)
    assert torch.equal(runs.values, whole.values) and torch.equal(runs.scale, whole.scale)
    assert torch.equal(runs.meta, whole.meta)
    w[17, 5] = float("inf")
    with pytest.raises(ValueError, match="non-finite value in row 17"):
        quant.quantize_weight(w)


def test_quantize_weight_matches_oracle_and_clamps():
    w = sparse_weight(24, 37, torch.float32, seed=3) * 5
    w[2] = 0  # all-zero row: scale 1
    w[4, 0], w[4, 1] = 3.0e38, -3.0e38
    sw = quant.quantize_weight(w)
    values, meta, scale = oracle.quantize_weight_int8(w)
    assert torch.equal(sw.values, values) and torch.equal(sw.meta, meta) and torch.equal(sw.scale, scale)
    assert sw.scale[2] == 1 and sw.values.abs().max() <= 127 and sw.values[4, :2].tolist() == [127, -127]
    assert torch.equal(sparsegemm.compress(w, prune=True, dtype=torch.int8).values, sw.values)


def test_dequantize_is_within_half_a_step_of_the_pruned_weight():
    w = torch.randn(16, 42, generator=torch.Generator().manual_seed(2))
    sw = quant.quantize_weight(w)
    deq = quant.dequantize(sw)
    pruned = sparsegemm.prune_2to4(w)
    assert deq.shape == w.shape and deq.dtype == torch.float32
    assert torch.equal(deq != 0, pruned != 0)
    assert bool(((deq - pruned).abs() <= sw.scale[:, None] / 2 * (1 + 1e-6)).all())


# ---- the CPU GEMM against the oracle ------------------------------------------------------------

@pytest.mark.parametrize("m,n,k", [(1, 8, 64), (3, 5, 8), (7, 33, 132), (17, 9, 1000), (129, 4, 72), (5, 6, 4099)])
@pytest.mark.parametrize("out_dtype", OUT_DTYPES)
def test_gemm_s8_bit_exact_without_activation(isa, m, n, k, out_dtype):
    values, meta, w_scale = random_int8_weight(n, k, seed=m)
    x_q, x_scale = oracle.quantize_rows_int8(torch.randn(m, k, generator=torch.Generator().manual_seed(n)))
    bias = torch.randn(n).to(out_dtype)
    for b in (None, bias):
        y = cpu_gemm_s8(x_q, x_scale, values, meta, k, w_scale, b, None, out_dtype)
        ref = oracle.linear_int8(x_q, x_scale, values, meta, k, w_scale, b, None, out_dtype)
        assert torch.equal(y, ref)


@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("out_dtype", OUT_DTYPES)
def test_gemm_s8_activation_within_one_ulp(isa, act, out_dtype):
    m, n, k = 9, 21, 200
    values, meta, w_scale = random_int8_weight(n, k, seed=5)
    x_q, x_scale = oracle.quantize_rows_int8(torch.randn(m, k, generator=torch.Generator().manual_seed(6)))
    bias = torch.randn(n).to(out_dtype)
    y = cpu_gemm_s8(x_q, x_scale, values, meta, k, w_scale, bias, act, out_dtype)
    ref = oracle.linear_int8(x_q, x_scale, values, meta, k, w_scale, bias, act, out_dtype)
    assert ulp_distance(y, ref, ACT_ABS_FLOOR) <= 1


def test_gemm_s8_integer_part_is_exact_for_large_k(isa):
    # Sums far beyond 16 bits (and beyond fp32's 24-bit mantissa, checked in int64 via unit scales).
    m, n, k = 3, 6, 8192
    values, meta, _ = random_int8_weight(n, k, seed=9)
    gen = torch.Generator().manual_seed(10)
    x_q = torch.randint(-127, 128, (m, k), generator=gen, dtype=torch.int8)
    ones_n, ones_m = torch.ones(n), torch.ones(m)
    y = cpu_gemm_s8(x_q, ones_m, values, meta, k, ones_n, out_dtype=torch.float32)
    acc = oracle.int8_accumulate(x_q, values, meta, k)
    assert np.abs(acc).max() > 2 ** 16
    assert np.array_equal(y.numpy(), acc.astype(np.float32))
    # One-hot scales read the exact sums back bit for bit through fp32 where they fit 24 bits.
    x_q = torch.full((m, k), 127, dtype=torch.int8)
    extreme, meta_e, _ = random_int8_weight(n, k, seed=11, extreme=True)
    y = cpu_gemm_s8(x_q, ones_m, extreme, meta_e, k, ones_n, out_dtype=torch.float32)
    assert torch.equal(y, torch.full((m, n), 127.0 * 127.0 * k / 2))


def cpu_linear_s8(x_q, x_scale, values, meta, k, w_scale, bias, act, out_dtype):
    return ops._linear_s8(x_q, x_scale, values, meta, None, w_scale, k, bias, fmt.ACTIVATION_CODES[act], out_dtype,
                          "cpu")


@pytest.mark.parametrize("act", ACTS + ["swiglu"])
@pytest.mark.parametrize("out_dtype", OUT_DTYPES)
def test_large_m_dense_tiles_give_the_kernels_bits(monkeypatch, act, out_dtype):
    # From CPU_DENSE_TILE_MIN_M_S8 rows on a VNNI CPU the INT8 GEMM runs torch._int_mm on decompressed
    # weight tiles and the kernel's epilogue on its int32 sums (_C.cpu_s8_epilogue): the same bits
    # as the sparse kernel, on every tile (600-byte tiles: 3 of 200 bytes a row; 16-row runs when
    # gated), and the oracle's exactly without an activation. Forced on, so that any CPU runs it.
    monkeypatch.setattr(ops, "_CPU_TILE_BYTES", 600)
    m, n, k = ops.CPU_DENSE_TILE_MIN_M_S8, 48, 200
    values, meta, w_scale = random_int8_weight(n, k, seed=12)
    x_q, x_scale = oracle.quantize_rows_int8(torch.randn(m, k, generator=torch.Generator().manual_seed(13)))
    bias = torch.randn(n).to(out_dtype)
    for b in (None, bias):
        monkeypatch.setattr(ops, "_CPU_DENSE_TILES_S8", False)
        kernel = cpu_linear_s8(x_q, x_scale, values, meta, k, w_scale, b, act, out_dtype)
        tiled = []
        real_tiles = ops._cpu_dense_tiles_s8
        monkeypatch.setattr(ops, "_cpu_dense_tiles_s8", lambda *args: (tiled.append(True), real_tiles(*args)))
        monkeypatch.setattr(ops, "_CPU_DENSE_TILES_S8", True)
        y = cpu_linear_s8(x_q, x_scale, values, meta, k, w_scale, b, act, out_dtype)
        monkeypatch.setattr(ops, "_cpu_dense_tiles_s8", real_tiles)
        assert tiled and torch.equal(y, kernel)
        if act is None:
            assert torch.equal(y, oracle.linear_int8(x_q, x_scale, values, meta, k, w_scale, b, None, out_dtype))


@pytest.mark.parametrize("n", [2, 40])
def test_large_m_dense_tiles_with_k_1(monkeypatch, n):
    # K = 1: a [rows, 1] tile's transpose has strides (1, 1), which torch._int_mm misread (wrong,
    # run-to-run different sums). Forced on, so that any CPU runs the tiles.
    monkeypatch.setattr(ops, "_CPU_DENSE_TILES_S8", True)
    m, k = ops.CPU_DENSE_TILE_MIN_M_S8 + 4, 1
    values, meta, w_scale = random_int8_weight(n, k, seed=14)
    x_q, x_scale = oracle.quantize_rows_int8(torch.randn(m, k, generator=torch.Generator().manual_seed(15)))
    y = cpu_linear_s8(x_q, x_scale, values, meta, k, w_scale, None, None, torch.float32)
    assert torch.equal(y, oracle.linear_int8(x_q, x_scale, values, meta, k, w_scale, None, None, torch.float32))


def test_dense_tiles_only_where_int32_sums_cannot_wrap(monkeypatch):
    # torch._int_mm sums in int32, the contract saturates exact sums: from K = 2^18 a sum of K / 2
    # products of 128 * 128 could wrap, so such a layer stays on the kernel at any M.
    monkeypatch.setattr(ops, "_CPU_DENSE_TILES_S8", True)
    monkeypatch.setattr(ops, "CPU_DENSE_TILE_MIN_M_S8", 1)
    tiled = []
    real_tiles = ops._cpu_dense_tiles_s8
    monkeypatch.setattr(ops, "_cpu_dense_tiles_s8", lambda *args: (tiled.append(args[4]), real_tiles(*args)))
    for k, expect_tiles in ((2 ** 18 - 4, True), (2 ** 18, False)):
        values, meta, _ = random_int8_weight(1, k, seed=14, extreme=True)
        x_q = torch.full((2, k), 127, dtype=torch.int8)
        y = cpu_linear_s8(x_q, torch.ones(2), values, meta, k, torch.ones(1), None, None, torch.float32)
        assert (k in tiled) == expect_tiles
        assert torch.equal(y, oracle.linear_int8(x_q, torch.ones(2), values, meta, k, torch.ones(1), None, None,
                                                 torch.float32))


@pytest.mark.parametrize("sign", [1, -1])
def test_gemm_s8_saturates_to_int32(isa, sign):
    # All +-127 with K = 2^21 + 8: |sum| = 127^2 * K / 2 > 2^34 overflows int32 (and would wrap int32
    # lanes without the periodic flush to int64): the result is the saturated int32 bound.
    n, k = 2, 2 ** 21 + 8
    values = torch.full((n, k // 2), 127, dtype=torch.int8)
    meta = torch.full((n, fmt.meta_cols(k)), 0x44, dtype=torch.uint8)
    x_q = torch.full((1, k), 127 * sign, dtype=torch.int8)
    y = cpu_gemm_s8(x_q, torch.ones(1), values, meta, k, torch.ones(n), out_dtype=torch.float32)
    bound = float(2 ** 31 - 1) if sign > 0 else float(-2 ** 31)
    assert torch.equal(y, torch.full((1, n), bound))
    assert oracle.int8_accumulate(x_q, values, meta, k)[0, 0] == (2 ** 31 - 1 if sign > 0 else -2 ** 31)


def test_gemm_s8_lanes_flush_before_they_wrap(isa):
    # x = +-127 by group parity under all-127 weights: the exact sum is 0, but the AVX-512 step's
    # biased lanes ((x + 128) * w, four products a lane) grow by about 2^16 a step, past 2^31 by
    # K = 2^23 unless moved to int64 every 2^13 steps (the other ISAs' lanes likewise).
    k = 2 ** 23
    values = torch.full((2, k // 2), 127, dtype=torch.int8)
    meta = torch.full((2, fmt.meta_cols(k)), 0x44, dtype=torch.uint8)  # positions 0, 1 of each group
    x_q = torch.zeros(1, k, dtype=torch.int8).view(-1, 8)
    x_q[:, 0:2], x_q[:, 4:6] = 127, -127
    x_q = x_q.reshape(1, k)
    assert oracle.int8_accumulate(x_q, values, meta, k)[0, 0] == 0
    y = cpu_gemm_s8(x_q, torch.ones(1), values, meta, k, torch.ones(2), out_dtype=torch.float32)
    assert torch.equal(y, torch.zeros(1, 2))


def test_gemm_s8_exact_with_minus_128(isa):
    # -128 is outside quantize's range but a pre-quantized x_q or a loaded weight may hold it.
    n, k, m = 9, 1000, 5
    values, meta, _ = random_int8_weight(n, k, seed=4)
    values[values.abs() > 120] = -128
    x_q = torch.randint(-128, 128, (m, k), generator=torch.Generator().manual_seed(4), dtype=torch.int8)
    x_q[:, ::7] = -128
    acc = oracle.int8_accumulate(x_q, values, meta, k)
    y = cpu_gemm_s8(x_q, torch.ones(m), values, meta, k, torch.ones(n), out_dtype=torch.float32)
    assert torch.equal(y, torch.from_numpy(acc.astype(np.float32)))


def test_gemm_s8_below_saturation_for_k_under_133k(isa):
    # 127 * 127 per kept product, K / 2 kept: K = 133_000 stays under 2^31 even fully dense-like.
    n, k = 1, 133_000
    values = torch.full((n, k // 2), -127, dtype=torch.int8)
    meta = torch.full((n, fmt.meta_cols(k)), 0x44, dtype=torch.uint8)
    x_q = torch.full((2, k), 127, dtype=torch.int8)
    acc = oracle.int8_accumulate(x_q, values, meta, k)
    assert acc[0, 0] == -127 * 127 * k // 2 > -2 ** 31
    y = cpu_gemm_s8(x_q, torch.ones(2), values, meta, k, torch.ones(n), out_dtype=torch.float32)
    assert torch.equal(y, torch.from_numpy(acc.astype(np.float32)))


def test_gemm_s8_nan_row_propagates():
    values, meta, w_scale = random_int8_weight(4, 16)
    x = torch.randn(3, 16)
    x[1, 2] = float("nan")
    y = sparsegemm.linear(x, sparsegemm.SparseTensor24(values, meta, (4, 16), w_scale))
    assert torch.isnan(y[1]).all() and not torch.isnan(y[0]).any() and not torch.isnan(y[2]).any()


# ---- Python layer ---------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("k", [64, 66])
def test_linear_int8_matches_oracle_and_fp32(dtype, k):
    gen = torch.Generator().manual_seed(k)
    w = torch.randn(48, k, generator=gen)
    sw = sparsegemm.compress(w, prune=True, dtype=torch.int8)
    x = torch.randn(2, 5, k, generator=gen).to(dtype)
    bias = torch.randn(48, generator=gen).to(dtype)
    y = sparsegemm.linear(x, sw, bias, activation="relu")
    assert y.shape == (2, 5, 48) and y.dtype == dtype
    x_q, x_scale = quant.quantize_activations(x.reshape(-1, k))
    ref = oracle.linear_int8(x_q, x_scale, sw.values, sw.meta, k, sw.scale, bias, "relu", dtype)
    assert ulp_distance(y.reshape(-1, 48), ref, ACT_ABS_FLOOR) <= 1
    # Against the fp32 2:4 linear: INT8 error is small (a few tenths of a percent per element).
    y32 = torch.relu(torch.nn.functional.linear(x.float(), sparsegemm.prune_2to4(w), bias.float()))
    assert float((y.float() - y32).norm() / y32.norm()) < 0.03
    # Pre-quantized input gives the same bits.
    pre = quant.linear_int8(quant.quantize_activations(x), sw, bias, activation="relu")
    assert torch.equal(pre, y)


def test_linear_int8_empty_batch():
    sw = quant.quantize_weight(torch.randn(8, 16))
    y = sparsegemm.linear(torch.zeros(0, 16, dtype=torch.bfloat16), sw)
    assert y.shape == (0, 8) and y.dtype == torch.bfloat16


class _KeywordCall(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(64, 64)

    def forward(self, x):
        return self.fc(input=x)


def test_calibrator_records_keyword_calls_and_refuses_reentry():
    # A layer called as fc(input=x) broke the calibrator's hook (IndexError); entering a calibrator
    # inside its own block let the inner exit remove the outer block's hooks (scales too small).
    torch.manual_seed(5)
    model = _KeywordCall()
    sparsegemm.sparsify(model, quantize="int8", min_features=1, progress=False)
    cal = quant.Int8Calibrator(model)
    with cal, torch.no_grad():
        model(torch.full((2, 64), 3.0))
        with pytest.raises(RuntimeError, match="Int8Calibrator: already recording"):
            with cal:
                pass
        model(torch.full((2, 64), -5.0))  # still recorded after the refused re-entry
    assert cal.amax == {"fc": 5.0}
    with cal, torch.no_grad():  # a second block, after the first closed, adds to the record
        model(torch.full((2, 64), 7.0))
    assert cal.amax == {"fc": 7.0}


def test_load_state_dict_refuses_a_bad_static_input_scale():
    # Loaded as is, a static layer's input scale reaches the kernels unread (no host read per call).
    model = nn.Sequential(nn.Linear(64, 64))
    sparsegemm.sparsify(model, quantize="int8", min_features=1, progress=False)
    model[0].set_input_scale(0.1)
    state = model.state_dict()
    for bad in (0.0, -1.0, float("nan"), float("inf")):
        state["0.input_scale"] = torch.tensor(bad)
        with pytest.raises(RuntimeError, match="input_scale must be finite and positive"):
            model.load_state_dict(state)
        assert float(model[0].input_scale) == pytest.approx(0.1)


def test_static_mode_and_calibrator():
    gen = torch.Generator().manual_seed(4)
    model = nn.Sequential(nn.Linear(64, 96), nn.ReLU(), nn.Linear(96, 64))
    sparsegemm.sparsify(model, quantize="int8", min_features=1, progress=False)
    batches = [torch.randn(4, 64, generator=gen) for _ in range(3)]
    with torch.no_grad():
        dynamic = [model(b) for b in batches]
    cal = quant.Int8Calibrator(model)
    with cal, torch.no_grad():
        for b in batches:
            model(b)
    scales = cal.apply()
    assert set(scales) == {"0", "2"}
    assert scales["0"] == pytest.approx(max(float(b.abs().max()) for b in batches) / 127)
    assert float(model[0].input_scale) == pytest.approx(scales["0"])
    with torch.no_grad():
        static = [model(b) for b in batches]
    for d, s in zip(dynamic, static):
        assert float((d - s).norm() / d.norm()) < 0.05
    x = batches[0]
    x_q, x_scale = quant.quantize_activations_static(x, scales["0"])
    assert x_q.dtype == torch.int8 and x_scale.shape == (4,) and bool((x_scale == x_scale[0]).all())
    saturated, _ = quant.quantize_activations_static(x * 100, scales["0"])
    assert saturated.abs().max() == 127


def test_sparse_linear_int8_save_load_round_trip(tmp_path):
    gen = torch.Generator().manual_seed(8)
    dense = nn.Sequential(nn.Linear(256, 512), nn.GELU(), nn.Linear(512, 128)).to(torch.float16)
    sparsegemm.sparsify(dense, quantize="int8", progress=False)
    assert isinstance(dense[0], sparsegemm.SparseLinear) and dense[0].quantize == "int8"
    assert dense[0].values.dtype == torch.int8 and dense[0].scale.dtype == torch.float32
    path = tmp_path / "int8.safetensors"
    sparsegemm.save(dense, path)
    fresh = nn.Sequential(nn.Linear(256, 512), nn.GELU(), nn.Linear(512, 128)).to(torch.float16)
    dense_path = tmp_path / "dense.safetensors"
    from safetensors.torch import save_file
    save_file({k: v.contiguous() for k, v in fresh.state_dict().items()}, str(dense_path))
    loaded = sparsegemm.load(path, fresh)
    x = torch.randn(3, 256, generator=gen).to(torch.float16)
    with torch.no_grad():
        assert torch.equal(loaded(x), dense(x))
    assert path.stat().st_size <= 0.33 * dense_path.stat().st_size
    assert "SparseLinear" in sparsegemm.io.describe(path)


def test_sparsify_int8_mlp_close_to_fp32_24_model():
    gen = torch.Generator().manual_seed(12)
    torch.manual_seed(12)
    base = nn.Sequential(nn.Linear(128, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 64))
    fp32_24 = nn.Sequential(*[nn.Linear(m.in_features, m.out_features) if isinstance(m, nn.Linear) else m
                              for m in base])
    fp32_24.load_state_dict(base.state_dict())
    int8 = nn.Sequential(*[nn.Linear(m.in_features, m.out_features) if isinstance(m, nn.Linear) else m
                           for m in base])
    int8.load_state_dict(base.state_dict())
    sparsegemm.sparsify(fp32_24, progress=False)
    report = sparsegemm.sparsify(int8, quantize="int8", progress=False)
    assert len(report.converted) == 3
    x = torch.randn(32, 128, generator=gen)
    with torch.no_grad():
        ref, got = fp32_24(x), int8(x)
    assert float((got - ref).norm() / ref.norm()) < 0.03
    dense_bytes = sum(layer.dense_bytes for layer in report.converted)
    assert report.totals()["compressed_bytes"] < 0.33 * dense_bytes


def test_custom_ops_opcheck():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(5, 24, generator=gen).to(torch.bfloat16)
    sw = quant.quantize_weight(torch.randn(8, 24, generator=gen))
    torch.library.opcheck(ops._quantize_rows, (x, "cpu"))
    x_q, x_scale = ops._quantize_rows(x, "cpu")
    bias = torch.randn(8, generator=gen).to(torch.bfloat16)
    torch.library.opcheck(ops._linear_s8, (x_q, x_scale, sw.values, sw.meta, None, sw.scale, 24, bias, 2,
                                           torch.bfloat16, "cpu"))
    torch.library.opcheck(ops._linear_s8, (x_q, x_scale, sw.values, sw.meta, None, sw.scale, 24, None, 0,
                                           torch.float32, "cpu"))


# ---- errors ----------------------------------------------------------------------------------------

def test_int8_weight_scale_errors():
    sw = quant.quantize_weight(torch.randn(6, 16))
    with pytest.raises(ValueError, match=r"SparseTensor24: scale is required for int8 weights \(float32\[6\]\), got None"):
        sparsegemm.SparseTensor24(sw.values, sw.meta, sw.shape)
    with pytest.raises(ValueError, match=r"scale must be float32 of shape \(6,\), got float32 \(5,\)"):
        sparsegemm.SparseTensor24(sw.values, sw.meta, sw.shape, torch.ones(5))
    with pytest.raises(ValueError, match=r"scale must be float32 of shape \(6,\), got float16 \(6,\)"):
        sparsegemm.SparseTensor24(sw.values, sw.meta, sw.shape, torch.ones(6, dtype=torch.float16))
    for bad, shown in ((0.0, "0.0"), (float("nan"), "nan"), (float("inf"), "inf"), (-0.5, "-0.5")):
        scale = torch.ones(6)
        scale[4] = bad
        with pytest.raises(ValueError, match=rf"scale must be finite and positive, got {shown} at index 4"):
            sparsegemm.SparseTensor24(sw.values, sw.meta, sw.shape, scale)
    # validate=False skips reading the data, not the sizes the kernels take on trust.
    with pytest.raises(ValueError, match=r"SparseTensor24: scale is required"):
        sparsegemm.SparseTensor24(sw.values, sw.meta, sw.shape, None, validate=False)
    with pytest.raises(ValueError, match=r"SparseTensor24: scale must be float32 of shape \(6,\)"):
        sparsegemm.SparseTensor24(sw.values, sw.meta, sw.shape, torch.ones(3), validate=False)
    unchecked = sparsegemm.SparseTensor24(sw.values, sw.meta, sw.shape, sw.scale, validate=False)
    unchecked.scale = None  # assigned after construction: the ops still refuse it
    with pytest.raises(ValueError, match=r"dequantize: sw.scale is required"):
        quant.dequantize(unchecked)


def test_int8_api_errors():
    sw = quant.quantize_weight(torch.randn(6, 16))
    x = torch.randn(3, 16)
    with pytest.raises(TypeError, match="dequantize: sw must hold int8 values, got float32"):
        quant.dequantize(sparsegemm.compress(torch.randn(6, 16), prune=True))
    with pytest.raises(TypeError, match="int8 weights decompress with sparsegemm.quant.dequantize"):
        sparsegemm.decompress(sw)
    with pytest.raises(ValueError, match="dtype must be None, w's dtype or torch.int8, got torch.float16"):
        sparsegemm.compress(torch.randn(6, 16), prune=True, dtype=torch.float16)
    w = torch.randn(6, 16)
    w[1, 0] = float("inf")
    with pytest.raises(ValueError, match="finite kept values.*row 1"):
        quant.quantize_weight(w)
    with pytest.raises(ValueError, match="must have K = 16 features"):
        sparsegemm.linear(torch.randn(3, 15), sw)
    with pytest.raises(ValueError, match="out_dtype is required with a pre-quantized x and no bias"):
        quant.linear_int8(quant.quantize_activations(x), sw)
    with pytest.raises(ValueError, match=r"x_scale must be float32 of shape \(3,\), got float32 \(2,\)"):
        quant.linear_int8((quant.quantize_activations(x)[0], torch.ones(2)), sw, out_dtype=torch.float16)
    with pytest.raises(TypeError, match="x_q must be an int8 tensor, got torch.float32"):
        quant.linear_int8((x, torch.ones(3)), sw, out_dtype=torch.float16)
    # A pre-quantized pair for a float weight was "x must be a torch.Tensor, got tuple"; a float x
    # with a bias elsewhere named the x_q / x_scale made of it, not the caller's x.
    with pytest.raises(TypeError, match=r"sparsegemm.linear: x as \(x_q, x_scale\), pre-quantized activations, "
                                        r"needs an int8 weight .*got a torch.float32 one"):
        sparsegemm.linear(quant.quantize_activations(x), sparsegemm.compress(torch.randn(6, 16), prune=True))
    with pytest.raises(ValueError, match=r"all tensors must be on one device, got x on cpu, sw.values on cpu, "
                                         r"sw.scale on cpu, bias on meta"):
        sparsegemm.linear(x, sw, torch.zeros(6, device="meta"))
    with pytest.raises(ValueError, match=r"bias must have shape \(6,\), got \(5,\)"):
        sparsegemm.linear(x, sw, torch.zeros(5))
    with pytest.raises(ValueError, match="activation must be one of"):
        sparsegemm.linear(x, sw, activation="tanh")
    with pytest.raises(TypeError, match=r"x must have dtype in \(float32, float16, bfloat16\), got int32"):
        quant.quantize_activations(torch.zeros(2, 4, dtype=torch.int32))
    for bad in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="quantize_activations_static: scale must be finite and positive"):
            quant.quantize_activations_static(x, bad)
    with pytest.raises(ValueError, match="Int8Calibrator: the model has no int8 SparseLinear layers"):
        quant.Int8Calibrator(nn.Sequential(nn.Linear(4, 4)))
    layer = sparsegemm.SparseLinear.from_dense(nn.Linear(16, 8), quantize="int8")
    with pytest.raises(ValueError, match="Int8Calibrator: no batch reached layers"):
        quant.Int8Calibrator(nn.Sequential(layer)).scales()
    with pytest.raises(ValueError, match=r"Int8Calibrator: modules \['1'\] name no int8 SparseLinear layer"):
        quant.Int8Calibrator(nn.Sequential(layer, nn.ReLU()), modules=["1"])  # int8 layers, just not that one
    with pytest.raises(ValueError, match="set_input_scale: scale must be finite and positive, got 0.0"):
        layer.set_input_scale(0.0)
    with pytest.raises(ValueError, match="quantize must be None or 'int8', got 'int4'"):
        sparsegemm.SparseLinear(16, 8, quantize="int4")
    with pytest.raises(ValueError, match="sparsify: quantize must be None or 'int8', got 'fp8'"):
        sparsegemm.sparsify(nn.Sequential(nn.Linear(64, 64)), quantize="fp8")


# ---- the GPU kernels through the emulator (int8k branch) -------------------------------------------

requires_simt_int8 = pytest.mark.skipif(not hasattr(_C, "simt_gemm_s8"),
                                        reason="this build has no SIMT INT8 kernels (int8k not merged)")


@requires_simt_int8
@pytest.mark.parametrize("in_dtype", [torch.float16, torch.bfloat16])
def test_simt_quantize_rows_matches_cpu(in_dtype):
    x = (torch.randn(9, 72, generator=torch.Generator().manual_seed(2)) * 4).to(in_dtype)
    x[2] = 0
    x[4, 7] = float("nan")
    cpu = quant.quantize_activations(x, backend="cpu")
    simt = quant.quantize_activations(x, backend="simt")
    assert torch.equal(cpu[0], simt[0])
    assert torch.allclose(cpu[1], simt[1], rtol=0, atol=0, equal_nan=True)


@requires_simt_int8
@pytest.mark.parametrize("m,n,k", [(1, 16, 64), (5, 24, 130), (17, 40, 256)])
@pytest.mark.parametrize("act", [None, "gelu"])
def test_simt_linear_int8_matches_cpu(m, n, k, act):
    gen = torch.Generator().manual_seed(m + k)
    sw = quant.quantize_weight(torch.randn(n, k, generator=gen))
    x = torch.randn(m, k, generator=gen).to(torch.float16)
    bias = torch.randn(n, generator=gen).to(torch.float16)
    cpu = sparsegemm.linear(x, sw, bias, activation=act, backend="cpu")
    simt = sparsegemm.linear(x, sw, bias, activation=act, backend="simt")
    assert ulp_distance(cpu, simt, ACT_ABS_FLOOR) <= (0 if act is None else 1)


@requires_simt_int8
@pytest.mark.parametrize("m,n,k", [(3, 40, 512), (20, 24, 64)])  # the first one splits K
def test_fused_dynamic_int8_equals_quantize_then_gemm(m, n, k):
    # linear_int8 quantizes inside one op on the kernel backends (ops._linear_s8_dynamic): the
    # same bits as the two ops it replaces, for 2-D and 3-D x, and the fake impl agrees.
    gen = torch.Generator().manual_seed(m * n)
    sw = quant.quantize_weight(torch.randn(n, k, generator=gen))
    x = torch.randn(2, m, k, generator=gen).to(torch.bfloat16)
    bias = torch.randn(n, generator=gen).to(torch.bfloat16)
    x_q, x_scale = ops._quantize_rows(x.reshape(-1, k), "simt")
    two_ops = ops._linear_s8(x_q, x_scale, sw.values, sw.meta, sw.kernel_meta("simt"), sw.scale, k, bias, 3,
                             torch.bfloat16, "simt").reshape(2, m, n)
    fused = sparsegemm.linear(x, sw, bias, activation="silu", backend="simt")
    assert torch.equal(fused, two_ops)
    torch.library.opcheck(ops._linear_s8_dynamic, (x[0], sw.values, sw.kernel_meta("simt"), sw.scale, bias, 3,
                                                   torch.bfloat16, "simt"))


def test_bench_int8_rows():
    from sparsegemm import bench

    timer = bench.Timer(torch.device("cpu"), warmup=1, repeats=2)
    rows = bench.bench_int8_shape(torch.device("cpu"), "tiny", 32, 64, 128, timer)
    methods = [r.method for r in rows]
    assert methods[0] == "dense" and methods[-2:] == ["sparsegemm int8", "sparsegemm int8, static scale"]
    assert all(r.dtype == "int8" and r.ms > 0 for r in rows)
    assert 0 < rows[-2].rel_error < 0.03 and 0 < rows[-1].rel_error < 0.03
    assert "| cpu | int8 | tiny | 32 | 64 | 128 | sparsegemm int8 |" in bench.markdown(rows)


@requires_simt_int8
def test_sparse_linear_int8_simt_backend_matches_cpu_and_caches_meta():
    gen = torch.Generator().manual_seed(21)
    linear = nn.Linear(70, 24).to(torch.bfloat16)
    cpu = sparsegemm.SparseLinear.from_dense(linear, quantize="int8")
    simt = sparsegemm.SparseLinear.from_dense(linear, quantize="int8", backend="simt")
    x = torch.randn(2, 3, 70, generator=gen).to(torch.bfloat16)
    with torch.no_grad():
        assert torch.equal(simt(x), cpu(x))
        cached = simt._kernel_meta.get("simt")
        simt(x)
        assert cached is not None and simt._kernel_meta.get("simt") is cached


# ---- found by an adversarial pass across backends -------------------------------------------------

@pytest.mark.parametrize("backend", ["cpu", pytest.param("simt", marks=requires_simt_int8)])
@pytest.mark.parametrize("int8", [False, True])
def test_gelu_keeps_its_negative_tail(backend, int8):
    # 0.5 v (1 + erf(v / sqrt 2)) cancels below v = -4 (57% off at -5.5, -0 from -6 on); the
    # epilogues compute 1 + erf(z) as erfc(-z). One kept weight of 1: the pre-activation is x.
    w = torch.zeros(16, 4, dtype=torch.bfloat16)
    w[:, 0] = 1
    sw = quant.quantize_weight(w.float()) if int8 else sparsegemm.compress(w)
    for z in (-5.0, -5.5, -6.0, -8.0):
        x = torch.tensor([[z, 0, 0, 0]], dtype=torch.bfloat16)
        want = torch.tensor(oracle.linear(x, w, None, "gelu")).bfloat16()
        got = sparsegemm.linear(x, sw, activation="gelu", backend=backend)
        assert got[0, 0] < 0 and torch.equal(got, want), (z, got[0, 0].item(), want[0, 0].item())


@pytest.mark.parametrize("bad", [0.0, float("nan"), float("inf"), -1.0])
def test_a_static_scale_tensor_is_checked(bad):
    sw = quant.quantize_weight(torch.randn(16, 64))
    x = torch.randn(2, 64).half()
    with pytest.raises(ValueError, match=r"quantize_activations_static: scale must be finite and positive, got"):
        quant.linear_int8(x, sw, input_scale=torch.tensor(bad))
    with pytest.raises(ValueError, match=r"scale must be a positive number or a one-element float tensor, got a "
                                         r"float32 tensor of shape \(2,\)"):
        quant.linear_int8(x, sw, input_scale=torch.tensor([1.0, 2.0]))


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_static_mode_makes_a_non_finite_token_row_nan(bad):
    # As in dynamic mode: the row's values would otherwise quantize to 0 or +-127, silently.
    sw = quant.quantize_weight(torch.randn(16, 64))
    x = torch.randn(3, 64).half()
    x[1, 5] = bad
    y = quant.linear_int8(x, sw, input_scale=0.05)
    assert torch.isnan(y[1]).all() and torch.isfinite(y[0]).all() and torch.isfinite(y[2]).all()
    assert torch.isnan(sparsegemm.linear(x, sw)[1]).all()  # dynamic


@requires_simt_int8
def test_static_int8_on_the_kernels_quantizes_in_the_static_kernel(monkeypatch):
    # A calibrated layer and a grouped launch on the kernels quantize x in one launch of
    # quantize_rows_static (quantize.cuh), not in torch ops (nine launches a decode step on a GPU):
    # the same output as the CPU path's torch ops, and the kernel ran.
    launches = []
    kernel = _C.simt_quantize_rows_static
    monkeypatch.setattr(_C, "simt_quantize_rows_static", lambda *args: launches.append(args[7]) or kernel(*args))
    gen = torch.Generator().manual_seed(7)
    layer = sparsegemm.SparseLinear.from_dense(nn.Linear(64, 48), quantize="int8").half()
    layer.set_input_scale(0.03)
    x = (torch.randn(5, 64, generator=gen) * 2).half()
    x[2, 9] = float("inf")
    expected = layer(x)  # cpu
    layer.backend = "simt"
    got = layer(x)
    assert launches == [0]  # one launch, one scale for every row (no groups)
    torch.testing.assert_close(got, expected, rtol=0, atol=0, equal_nan=True)
    assert torch.isnan(got[2]).all()
    sw = [quant.quantize_weight(torch.randn(48, 64, generator=gen)) for _ in range(3)]
    offsets = torch.tensor([0, 2, 2, 5])
    scales = [0.02, 0.5, 0.04]
    grouped = sparsegemm.grouped_linear(x, offsets, sw, input_scale=scales, backend="simt")
    assert launches == [0, 3]  # then one launch, a scale per group
    torch.testing.assert_close(grouped, sparsegemm.grouped_linear(x, offsets, sw, input_scale=scales, backend="cpu"),
                               rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("backend", ["cpu", pytest.param("simt", marks=requires_simt_int8)])
@pytest.mark.parametrize("bad", [torch.tensor([0.03, 0.03]), torch.tensor(0.03, dtype=torch.float64),
                                 torch.tensor(0.03, dtype=torch.bfloat16)])
def test_the_float_int8_op_refuses_a_static_scale_it_cannot_read(backend, bad):
    # linear_int8 hands the op a 0-d float32 scale; called directly, the op reads what it is given
    # through its pointer on the kernels (a [2] scale's second element for row 1, a float64's bytes).
    sw = quant.quantize_weight(torch.randn(16, 64))
    x = torch.randn(3, 64).half()
    with pytest.raises(ValueError, match=r"linear_s8_float: input_scale must be a one-element float32 tensor on "
                                         r"x's device \(cpu\), got a "):
        kernel_meta = None if backend == "cpu" else sw.kernel_meta(backend)
        torch.ops.sparsegemm.linear_s8_float(x, sw.values, sw.meta, kernel_meta, sw.scale, bad, 64, None, 0,
                                             torch.float16, backend)


def test_a_weight_row_too_small_for_an_fp32_scale_quantizes_to_zero():
    # max |kept| / 127 underflows to 0 below 127 x 2^-150: such a row takes scale 1 (its values
    # round to 0), not scale 0 with values saturated to +-127 that dequantize and validate refuse.
    w = torch.randn(8, 16)
    w[3] = torch.randn(16) * 1e-44
    sw = quant.quantize_weight(w)
    sw.validate()
    assert sw.scale[3] == 1 and torch.count_nonzero(sw.values[3]) == 0
    assert torch.isfinite(quant.dequantize(sw)).all()
    scale = oracle.quantize_weight_int8(w)[2]
    assert torch.equal(scale, sw.scale)
    x = torch.randn(2, 16)
    x[1] = torch.randn(16) * 1e-44
    x_q, x_scale = quant.quantize_activations(x)
    assert x_scale[1] == 1 and torch.count_nonzero(x_q[1]) == 0
    assert torch.equal(x_scale, oracle.quantize_rows_int8(x)[1])


def test_a_calibrated_scale_follows_the_weights_scale_rule():
    # An input too small for an fp32 scale (amax / 127 underflows to 0 in fp32; its double quotient
    # did not, so the layer got a scale that became 0 once stored) calibrates to 1, as weights do.
    layer = sparsegemm.SparseLinear.from_dense(nn.Linear(16, 8), quantize="int8")
    calibrator = quant.Int8Calibrator(layer)
    with torch.no_grad(), calibrator:
        layer(torch.full((2, 16), 1e-44))
    assert calibrator.apply() == {"": 1.0}
    assert float(layer.input_scale) == 1.0


def test_calibrator_refuses_what_sets_no_scale():
    model = nn.Sequential(nn.Linear(128, 128))
    sparsegemm.sparsify(model, quantize="int8", min_features=8)
    with pytest.raises(TypeError, match="modules must be layer names \\(a list\\), got the string '0'"):
        quant.Int8Calibrator(model, modules="0")
    with pytest.raises(ValueError, match=r"modules \['layer.0'\] are not modules of the model"):
        quant.Int8Calibrator(model, modules=["layer.0"])
    calibrator = quant.Int8Calibrator(model)
    with calibrator:
        model(torch.zeros(4, 128))
        model(torch.zeros(0, 128))
    with pytest.raises(ValueError, match=r"layers \['0'\] saw only zeros \(or empty batches\), which set no scale"):
        calibrator.apply()  # gave scale 1: 29% off dynamic INT8 on real inputs


def test_calibrator_leaves_named_modules_that_are_not_int8_layers():
    model = nn.Sequential(nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 128))
    sparsegemm.sparsify(model, quantize="int8", min_features=8)
    assert set(quant.Int8Calibrator(model, modules=["0", "1", "2"]).layers) == {"0", "2"}


def test_static_quantization_saturates_both_ways_and_a_pair_refuses_input_scale():
    x_q, x_scale = quant.quantize_activations_static(torch.tensor([[-1000.0, 1000.0, -127.4, 0.4]]), 1.0)
    assert x_q.tolist() == [[-127, 127, -127, 0]] and x_scale.tolist() == [1.0]
    sw = sparsegemm.compress(torch.randn(16, 32), prune=True, dtype=torch.int8)
    with pytest.raises(ValueError, match=r"input_scale quantizes float activations, but x is already quantized"):
        quant.linear_int8((torch.zeros(2, 32, dtype=torch.int8), torch.ones(2)), sw, out_dtype=torch.float16,
                          input_scale=1.0)


def test_int8_layer_bias_is_frozen_and_its_dense_dtype_follows_moves(tmp_path):
    layer = sparsegemm.SparseLinear.from_dense(nn.Linear(64, 64), quantize="int8")
    assert not layer.values.requires_grad and not layer.bias.requires_grad
    bare = sparsegemm.SparseLinear(64, 64, bias=False, dtype=torch.float32, quantize="int8").half()
    assert bare.dense_dtype() == torch.float16
    from sparsegemm.io import describe

    model = nn.Sequential(bare)
    sparsegemm.save(model, tmp_path / "q.safetensors")
    stored = bare.values.nbytes + bare.metadata.nbytes + bare.scale.nbytes
    row = next(line for line in describe(tmp_path / "q.safetensors").splitlines() if line.startswith("0 "))
    assert row.split()[-3:-1] == [f"{64 * 64 * 2:,}", f"{stored:,}"]  # dense in float16, stored with the scale


# ---- gradients: the straight-through estimator --------------------------------------------------

def straight_through_reference(x, sw, bias, activation, input_scale, backend, grad_y):
    """(grad x, grad bias) in float64: grad_y through the activation's derivative at the INT8
    layer's own pre-activations, times the dequantized weight; with a static scale, zero where x
    saturates."""
    with torch.no_grad():
        z = quant.linear_int8(x, sw, bias, input_scale=input_scale, backend=backend).double().requires_grad_(True)
    acts = {"relu": torch.relu, "gelu": nn.functional.gelu, "silu": nn.functional.silu}
    if activation in ("swiglu", "geglu", "reglu"):
        # Columns 16q + r (r < 8) are the gates of outputs 8q + r, columns 16q + 8 + r their up rows.
        pairs = z.view(z.shape[0], -1, 2, 8)
        gate, up = pairs[:, :, 0].flatten(1), pairs[:, :, 1].flatten(1)
        out = acts[{"swiglu": "silu", "geglu": "gelu", "reglu": "relu"}[activation]](gate) * up
    else:
        out = acts[activation](z) if activation else z
    out.backward(grad_y.double())
    weight = oracle.decompress(sw.values, sw.meta, sw.shape[1]).double() * sw.scale.double()[:, None]
    grad_x = z.grad @ weight
    if input_scale is not None:
        grad_x = grad_x * (torch.round(x.float() / input_scale).abs() <= 127)
    return grad_x, z.grad.sum(0)


@pytest.mark.parametrize("backend,dtype,k", [("cpu", torch.float32, 64), ("cpu", torch.bfloat16, 62),
                                             ("simt", torch.float16, 64), ("simt", torch.bfloat16, 62)])
@pytest.mark.parametrize("activation", [None, "relu", "gelu", "silu", "swiglu", "geglu", "reglu"])
@pytest.mark.parametrize("static", [False, True])
def test_linear_int8_passes_gradients_straight_through(backend, dtype, k, activation, static):
    # x and the bias get the gradient of the layer with its dequantized weight, taken at the INT8
    # layer's own pre-activations; a static scale passes nothing where it saturates (about 15% of
    # these inputs at scale 0.02). K = 62 pads K (the quantize-then-GEMM path on the kernels).
    gen = torch.Generator().manual_seed(k + (activation or "").__len__())
    sw = quant.quantize_weight(torch.randn(32, k, generator=gen))
    x = (torch.randn(5, k, generator=gen) * 2).to(dtype)
    bias = torch.randn(32, generator=gen).to(dtype)
    input_scale = 0.02 if static else None
    x_leaf, bias_leaf = x.clone().requires_grad_(True), bias.clone().requires_grad_(True)
    y = quant.linear_int8(x_leaf, sw, bias_leaf, activation=activation, input_scale=input_scale, backend=backend)
    with torch.no_grad():  # the same forward as outside autograd
        assert torch.equal(y, quant.linear_int8(x, sw, bias, activation=activation, input_scale=input_scale,
                                                backend=backend))
    grad_y = torch.randn(y.shape, generator=gen).to(dtype)
    y.backward(grad_y)
    want_x, want_bias = straight_through_reference(x, sw, bias, activation, input_scale, backend, grad_y)
    if static:
        assert (want_x == 0).float().mean() > 0.05  # saturated inputs were there to be masked
    tol = 1e-5 if dtype == torch.float32 else 1e-2  # the gradients are rounded to x's dtype
    for got, want in ((x_leaf.grad, want_x), (bias_leaf.grad, want_bias)):
        assert got.dtype == dtype
        assert (got.double() - want).abs().max() <= tol * want.abs().max()


def test_int8_straight_through_reaches_a_bias_alone_and_refuses_scales_and_pairs():
    gen = torch.Generator().manual_seed(3)
    sw = quant.quantize_weight(torch.randn(16, 32, generator=gen))
    x = torch.randn(4, 32, generator=gen)
    bias = torch.randn(16, generator=gen).requires_grad_(True)
    quant.linear_int8(x, sw, bias, activation="relu").sum().backward()
    with torch.no_grad():
        z = quant.linear_int8(x, sw, bias)
    torch.testing.assert_close(bias.grad, (z > 0).float().sum(0))
    trained = sparsegemm.SparseTensor24(sw.values, sw.meta, sw.shape, sw.scale.clone().requires_grad_(True))
    for y in (quant.linear_int8(x.clone().requires_grad_(True), trained),
              quant.linear_int8(x, sw, input_scale=torch.tensor(0.05, requires_grad=True)),
              quant.linear_int8((torch.ones(4, 32, dtype=torch.int8), torch.ones(4, requires_grad=True)), sw,
                                out_dtype=torch.float32)):
        with pytest.raises(RuntimeError, match=r"no gradient flows to the INT8 GEMM's scales or through "
                                               r"pre-quantized \(x_q, x_scale\) activations"):
            y.sum().backward()


def test_a_compiled_training_step_runs_through_an_int8_layer():
    # A LoRA-style adapter in front of a frozen INT8 layer trains, compiled whole, as eager.
    gen = torch.Generator().manual_seed(4)
    int8_layer = sparsegemm.SparseLinear.from_dense(nn.Linear(64, 32), quantize="int8")
    results = []
    for compiled in (False, True):
        adapter = nn.Linear(64, 64)
        with torch.no_grad():
            adapter.weight.copy_(torch.eye(64) + 0.01 * torch.randn(64, 64, generator=torch.Generator().manual_seed(0)))
            adapter.bias.zero_()
        model = nn.Sequential(adapter, int8_layer)
        x = torch.randn(8, 64, generator=gen)
        step = lambda: model(x).square().mean()  # noqa: E731
        torch._dynamo.reset()
        loss = (torch.compile(step, fullgraph=True) if compiled else step)()
        loss.backward()
        results.append((loss.detach(), adapter.weight.grad))
        gen = torch.Generator().manual_seed(4)
    (loss, grad), (loss_c, grad_c) = results
    torch._dynamo.reset()
    assert grad.abs().sum() > 0
    torch.testing.assert_close(loss_c, loss, rtol=1e-5, atol=0)  # inductor's adapter GEMM rounds its own way
    torch.testing.assert_close(grad_c, grad, rtol=1e-4, atol=1e-6)


def test_opcheck_of_the_straight_through_op():
    gen = torch.Generator().manual_seed(2)
    sw = quant.quantize_weight(torch.randn(8, 24, generator=gen))
    x = torch.randn(5, 24, generator=gen).requires_grad_(True)
    bias = torch.randn(8, generator=gen).requires_grad_(True)
    for input_scale in (None, torch.tensor(0.02)):
        torch.library.opcheck(ops._linear_s8_float, (x, sw.values, sw.meta, None, sw.scale, input_scale, 24, bias,
                                                     3, torch.float32, "cpu"))


def test_a_traced_int8_layer_takes_one_graph_in_every_grad_mode_and_passes_gradients():
    # torch.jit.trace's check traces again under no_grad: the graph recorded with an input needing a
    # gradient must be the one recorded without (it once was not: "Graphs differed across
    # invocations"), and either trace passes the straight-through gradient.
    torch.manual_seed(0)
    layer = sparsegemm.SparseLinear.from_dense(nn.Linear(64, 32), quantize="int8")
    x = torch.randn(6, 64)
    with torch.no_grad():
        want = layer(x)
    grads = []
    for example in (x.clone().requires_grad_(True), x):
        traced = torch.jit.trace(layer, (example,))
        x_leaf = x.clone().requires_grad_(True)
        y = traced(x_leaf)
        assert torch.equal(y.detach(), want)
        y.sum().backward()
        grads.append(x_leaf.grad)
    eager = x.clone().requires_grad_(True)
    layer(eager).sum().backward()
    assert torch.equal(grads[0], eager.grad) and torch.equal(grads[1], eager.grad)
