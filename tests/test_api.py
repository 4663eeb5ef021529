"""Public functional API on the CPU backend against the numpy/float64 oracles."""
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils._python_dispatch import TorchDispatchMode

import sparsegemm
from sparsegemm import format as fmt
from sparsegemm import oracle
from conftest import PAIRS, integer_input, sparse_weight


# ---- mask / prune ----------------------------------------------------------------------------

def test_mask_rules_ties_nan_negative_zero():
    w = torch.tensor([
        [1.0, 1.0, 1.0, 1.0],          # all tied: lower indices win -> 0, 1
        [0.0, 0.0, 0.0, 0.0],          # all zero: 0, 1
        [-5.0, 2.0, 5.0, 1.0],         # |-5| == |5|: both kept
        [1.0, float("nan"), 3.0, 2.0],  # NaN is the largest: NaN and 3
        [float("nan"), 0.0, float("nan"), float("nan")],  # three NaN: the first two
        [-0.0, 0.0, 0.0, -1.0],        # -0.0 is zero: 0 (tie, lowest) and 3
    ])
    expected = torch.tensor([
        [1, 1, 0, 0], [1, 1, 0, 0], [1, 0, 1, 0], [0, 1, 1, 0], [1, 0, 1, 0], [1, 0, 0, 1],
    ], dtype=torch.bool)
    assert torch.equal(sparsegemm.mask_2to4(w), expected)
    assert np.array_equal(oracle.mask_2to4(w), expected.numpy())


def test_prune_keeps_nan_outside_mask_out():
    w = torch.tensor([[float("nan"), float("nan"), float("nan"), 1.0]])
    p = sparsegemm.prune_2to4(w)
    assert torch.isnan(p[0, :2]).all() and p[0, 2] == 0 and p[0, 3] == 0


@pytest.mark.parametrize("shape", [(1, 4), (3, 8), (17, 36), (5, 7), (2, 5), (9, 130)])
def test_mask_matches_oracle(dtype, shape):
    gen = torch.Generator().manual_seed(3)
    w = torch.randn(*shape, generator=gen).to(dtype)
    w[0, :2] = 0.5  # ties
    mask = sparsegemm.mask_2to4(w)
    assert mask.dtype == torch.bool and mask.shape == w.shape
    assert np.array_equal(mask.numpy(), oracle.mask_2to4(w))
    kept_per_group = torch.nn.functional.pad(mask.int(), (0, fmt.padded_k(shape[1]) - shape[1])).reshape(shape[0], -1, 4).sum(-1)
    assert (kept_per_group <= 2).all()


# ---- compress / decompress -------------------------------------------------------------------

@pytest.mark.parametrize("shape", [(1, 4), (6, 8), (7, 12), (3, 28), (129, 36), (4, 5), (2, 7), (33, 66)])
def test_compress_matches_oracle_and_round_trips(dtype, shape):
    w = sparse_weight(*shape, dtype=dtype, seed=shape[0] * 100 + shape[1])
    sw = sparsegemm.compress(w)
    values, meta = oracle.compress(w)
    assert torch.equal(sw.values, values) and torch.equal(sw.meta, meta)
    assert sw.shape == shape and sw.dtype == dtype
    assert torch.equal(sparsegemm.decompress(sw), w)
    assert torch.equal(oracle.decompress(sw.values, sw.meta, shape[1]), w)


def test_all_six_patterns_round_trip(dtype):
    rows = []
    for i0, i1 in PAIRS:
        row = torch.zeros(4)
        row[i0], row[i1] = 2.0, -3.0
        rows.append(row)
    w = torch.stack(rows).to(dtype)
    sw = sparsegemm.compress(w)
    nibbles = (sw.meta & 0xF).flatten().tolist()
    assert nibbles == [i0 | (i1 << 2) for i0, i1 in PAIRS]
    assert sorted(nibbles) == list(fmt.LEGAL_NIBBLES)
    assert torch.equal(sparsegemm.decompress(sw), w)


def test_odd_group_count_pads_with_canonical_nibble():
    sw = sparsegemm.compress(torch.tensor([[0.0, 0.0, 1.0, 2.0, 3.0, 0.0, 0.0, 4.0, 5.0, 6.0, 0.0, 0.0]]))
    assert sw.meta.tolist() == [[0x0E | (0x0C << 4), 0x04 | (fmt.PAD_NIBBLE << 4)]]


def test_prune_true_equals_prune_then_compress(dtype):
    w = torch.randn(16, 40, generator=torch.Generator().manual_seed(5)).to(dtype)
    sw = sparsegemm.compress(w, prune=True)
    values, meta = oracle.compress(w, prune=True)
    assert torch.equal(sw.values, values) and torch.equal(sw.meta, meta)
    assert torch.equal(sparsegemm.decompress(sw), sparsegemm.prune_2to4(w))


def test_nbytes_and_repr():
    sw = sparsegemm.compress(torch.randn(64, 128, dtype=torch.float16), prune=True)
    assert sw.nbytes == 64 * 64 * 2 + 64 * 16
    assert sw.dense_nbytes == 64 * 128 * 2
    assert abs(sw.nbytes / sw.dense_nbytes - 0.5625) < 1e-9
    assert "SparseTensor24(shape=(64, 128), dtype=float16" in repr(sw) and "56.2% of dense" in repr(sw)


# ---- linear ----------------------------------------------------------------------------------

ACTS = [None, "relu", "gelu", "silu"]


@pytest.mark.parametrize("m", [0, 1, 2, 3, 7, 16, 17, 129])
@pytest.mark.parametrize("n,k", [(1, 4), (5, 12), (33, 20), (8, 7), (19, 130)])
def test_linear_exact_on_small_integers(dtype, m, n, k):
    w = sparse_weight(n, k, dtype=dtype, seed=n + k, integer=True)
    x = integer_input(m, k, dtype)
    bias = integer_input(1, n, dtype)[0]
    sw = sparsegemm.compress(w)
    y = sparsegemm.linear(x, sw, bias)
    assert y.shape == (m, n) and y.dtype == dtype
    # Integer sums are exact in fp32; the one rounding to the output dtype is the only error.
    ref = torch.from_numpy(oracle.linear(x, w, bias)).to(dtype)
    assert torch.equal(y, ref)


@pytest.mark.parametrize("activation", ACTS)
@pytest.mark.parametrize("m", [1, 7, 64, 129])
def test_linear_float_within_oracle_tolerance(dtype, activation, m):
    gen = torch.Generator().manual_seed(m)
    w = torch.randn(48, 96, generator=gen).to(dtype)
    x = torch.randn(m, 96, generator=gen).to(dtype)
    bias = torch.randn(48, generator=gen).to(dtype)
    sw = sparsegemm.compress(w, prune=True)
    y = sparsegemm.linear(x, sw, bias, activation=activation)
    oracle.assert_close_to_oracle(y, x, sparsegemm.decompress(sw), bias, activation)


def test_linear_leading_dims_and_no_bias():
    w = sparse_weight(12, 16, dtype=torch.float32, integer=True)
    x = integer_input(6, 16, torch.float32).reshape(2, 3, 16)
    y = sparsegemm.linear(x, sparsegemm.compress(w))
    assert y.shape == (2, 3, 12)
    assert torch.equal(y, x @ w.T)


def test_linear_strided_and_misaligned_inputs_are_handled():
    w = sparse_weight(10, 24, dtype=torch.bfloat16, integer=True)
    sw = sparsegemm.compress(w)
    big = integer_input(9, 50, torch.bfloat16)
    x_rows = big[:, 1:25]                      # row stride 50, start misaligned by one element
    x_t = integer_input(24, 9, torch.bfloat16).T  # column-major
    for x in (x_rows, x_t):
        assert torch.equal(sparsegemm.linear(x, sw).double(), torch.from_numpy(oracle.linear(x, w)))


def test_linear_nan_in_pruned_position_of_x_is_not_dropped_by_zero_weight():
    # A kept weight of zero times Inf is NaN in the dense product too: both agree.
    w = torch.tensor([[1.0, 0.0, 0.0, 0.0]])
    sw = sparsegemm.compress(w)
    x = torch.tensor([[2.0, float("inf"), 3.0, 4.0]])
    assert math.isnan(sparsegemm.linear(x, sw).item()) == math.isnan((x @ w.T).item())


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 40), k=st.integers(1, 70), m=st.integers(0, 20), seed=st.integers(0, 2**16),
       dt=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]))
def test_property_round_trip_and_gemm(n, k, m, seed, dt):
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(seed)).to(dt)
    sw = sparsegemm.compress(w, prune=True)
    dense = sparsegemm.decompress(sw)
    assert torch.equal(dense, sparsegemm.prune_2to4(w))
    assert torch.equal(sparsegemm.compress(dense).values, sw.values)
    x = integer_input(m, k, dt, seed=seed)
    wi = sparse_weight(n, k, dtype=dt, seed=seed, integer=True)
    y = sparsegemm.linear(x, sparsegemm.compress(wi))
    assert torch.equal(y, torch.from_numpy(oracle.linear(x, wi)).to(dt))


# ---- errors ----------------------------------------------------------------------------------

def test_non_24_weight_error_names_row_and_group():
    w = torch.zeros(3, 12)
    w[2, 4:7] = 1.0
    with pytest.raises(ValueError, match=r"not 2:4 sparse: row 2, group 1 \(columns 4..7\).*prune=True"):
        sparsegemm.compress(w)


def test_nan_counts_as_non_zero_in_strict_mode():
    with pytest.raises(ValueError, match="row 0, group 0"):
        sparsegemm.compress(torch.tensor([[float("nan"), 1.0, 2.0, 0.0]]))


@pytest.mark.parametrize("bad,match", [
    (torch.zeros(4, 8, dtype=torch.float64), r"compress: w must have dtype in \(float32, float16, bfloat16\), got float64"),
    (torch.zeros(4, 8, dtype=torch.int32), r"got int32"),
    (torch.zeros(8), r"compress: w must be 2-D, got 1-D"),
    (torch.zeros(0, 8), r"compress: w must be non-empty, got shape \(0, 8\)"),
    (torch.zeros(4, 0), r"non-empty"),
])
def test_compress_rejects_bad_weights(bad, match):
    with pytest.raises((TypeError, ValueError), match=match):
        sparsegemm.compress(bad)


def test_linear_errors():
    sw = sparsegemm.compress(torch.zeros(4, 8, dtype=torch.float16))
    with pytest.raises(ValueError, match=r"linear: x must have K = 8 features .* got shape \(2, 6\)"):
        sparsegemm.linear(torch.zeros(2, 6, dtype=torch.float16), sw)
    with pytest.raises(TypeError, match=r"x dtype float32 does not match the weight dtype float16"):
        sparsegemm.linear(torch.zeros(2, 8), sw)
    with pytest.raises(TypeError, match=r"linear: x must have dtype in"):
        sparsegemm.linear(torch.zeros(2, 8, dtype=torch.float64), sw)
    with pytest.raises(ValueError, match=r"bias must have shape \(4,\), got \(5,\)"):
        sparsegemm.linear(torch.zeros(2, 8, dtype=torch.float16), sw, torch.zeros(5, dtype=torch.float16))
    with pytest.raises(TypeError, match=r"bias dtype"):
        sparsegemm.linear(torch.zeros(2, 8, dtype=torch.float16), sw, torch.zeros(4))
    with pytest.raises(ValueError, match=r"activation must be one of"):
        sparsegemm.linear(torch.zeros(2, 8, dtype=torch.float16), sw, activation="tanh")
    with pytest.raises(ValueError, match=r"backend must be one of"):
        sparsegemm.linear(torch.zeros(2, 8, dtype=torch.float16), sw, backend="tpu")
    with pytest.raises(ValueError, match=r"backend 'cuda' needs CUDA tensors, got tensors on cpu"):
        sparsegemm.linear(torch.zeros(2, 8, dtype=torch.float16), sw, backend="cuda")
    with pytest.raises(TypeError, match=r"sw must be a SparseTensor24, got Tensor"):
        sparsegemm.linear(torch.zeros(2, 8, dtype=torch.float16), torch.zeros(4, 8))


def test_device_mix_is_rejected():
    sw = sparsegemm.compress(torch.zeros(4, 8, dtype=torch.float16))
    with pytest.raises(ValueError, match=r"all tensors must be on one device, got x on meta, sw.values on cpu"):
        sparsegemm.linear(torch.zeros(2, 8, dtype=torch.float16, device="meta"), sw)


@pytest.mark.parametrize("nibble,match", [(0x0, "0x0"), (0x5, "0x5"), (0xA, "0xA"), (0xF, "0xF"), (0x6, "0x6")])
def test_corrupt_metadata_is_rejected(nibble, match):
    sw = sparsegemm.compress(torch.randn(3, 16), prune=True)
    meta = sw.meta.clone()
    meta[1, 1] = (meta[1, 1] & 0xF0) | nibble
    with pytest.raises(ValueError, match=rf"corrupt metadata at row 1, group 2: nibble {match}"):
        sparsegemm.SparseTensor24(sw.values, meta, sw.shape)


def test_bad_pad_nibble_is_rejected():
    sw = sparsegemm.compress(torch.randn(2, 12), prune=True)  # three groups: one pad nibble per row
    meta = sw.meta.clone()
    meta[1, 1] = (meta[1, 1] & 0x0F) | 0x80
    with pytest.raises(ValueError, match=r"row 1, group 3: nibble 0x8 .*padding 0x4"):
        sparsegemm.SparseTensor24(sw.values, meta, sw.shape)


def test_sparse_tensor_shape_checks():
    sw = sparsegemm.compress(torch.randn(4, 16), prune=True)
    with pytest.raises(ValueError, match=r"values must have shape \(4, 8\)"):
        sparsegemm.SparseTensor24(sw.values[:, :6], sw.meta, sw.shape)
    with pytest.raises(ValueError, match=r"meta must be uint8 of shape \(4, 2\)"):
        sparsegemm.SparseTensor24(sw.values, sw.meta.to(torch.int16), sw.shape)


def test_torch_mask_used_for_fp32_on_gpu_matches_oracle():
    # The GPU compress kernel takes 16-bit types; fp32 weights on the GPU use this torch version.
    from sparsegemm import ops

    gen = torch.Generator().manual_seed(9)
    for _ in range(20):
        w = torch.randn(7, 23, generator=gen)
        w[torch.rand(7, 23, generator=gen) < 0.2] = float("nan")
        w[torch.rand(7, 23, generator=gen) < 0.2] = 0.5
        w[torch.rand(7, 23, generator=gen) < 0.1] = -0.0
        w[torch.rand(7, 23, generator=gen) < 0.1] = float("inf")
        assert np.array_equal(ops._mask_2to4_torch(w).numpy(), oracle.mask_2to4(w))


def _weight_16x32(dtype=torch.float16):
    return sparsegemm.compress(torch.randn(16, 32, generator=torch.Generator().manual_seed(5)).to(dtype), prune=True)


@pytest.mark.parametrize("call", ["linear", "simt", "decompress", "grouped"])
def test_metadata_on_another_device_than_the_values_is_refused(call):
    # An assigned sw.meta on another device reached C++ as a pointer it could not read: a segfault
    # (linear, grouped_linear), or values read from arbitrary memory (decompress).
    sw = _weight_16x32()
    x = torch.randn(3, 32, dtype=torch.float16)
    sw.meta = sw.meta.to("meta")
    run = {"linear": lambda: sparsegemm.linear(x, sw), "simt": lambda: sparsegemm.linear(x, sw, backend="simt"),
           "decompress": lambda: sparsegemm.decompress(sw),
           "grouped": lambda: sparsegemm.grouped_linear(x, torch.tensor([0, 3]), [sw])}[call]
    with pytest.raises(ValueError, match=r"all tensors must be on one device, got .*meta on meta"):
        run()


def test_the_raw_ops_refuse_what_their_kernels_cannot_take():
    w = torch.randn(16, 32, dtype=torch.float64)
    with pytest.raises(TypeError, match=r"sparsegemm.compress: w must have dtype in \(float32, float16, bfloat16\), "
                                        r"got float64"):
        torch.ops.sparsegemm.compress(w, True, "cpu")  # was a KeyError from the dtype table
    with pytest.raises(ValueError, match=r"sparsegemm.compress: backend must be one of .* got 'tpu'"):
        torch.ops.sparsegemm.compress(w.half(), True, "tpu")  # ran the CUDA branch
    sw = _weight_16x32()
    with pytest.raises(ValueError, match=r"the cuda backend runs on CUDA tensors, got tensors on cpu"):
        torch.ops.sparsegemm.decompress(sw.values, sw.meta, 32, "cuda")
    # Host pointers handed to the CUDA kernels (or the reverse): compress, quantize_rows and conv2d
    # took the backend they were given; grouped_linear read offsets from any device.
    with pytest.raises(ValueError, match=r"sparsegemm.compress: backend 'cuda' needs CUDA tensors, got tensors "
                                         r"on cpu"):
        torch.ops.sparsegemm.compress(w.half(), True, "cuda")
    x = torch.randn(3, 32, dtype=torch.float16)
    for backend, why in (("cuda", "backend 'cuda' needs CUDA tensors"), ("tpu", "backend must be one of")):
        with pytest.raises(ValueError, match=f"sparsegemm.quantize_rows: {why}"):
            torch.ops.sparsegemm.quantize_rows(x, backend)
    with pytest.raises(ValueError, match="sparsegemm.conv2d: runs the cuda or simt kernels, got backend 'cpu'"):
        torch.ops.sparsegemm.conv2d(torch.randn(1, 4, 4, 16, dtype=torch.float16), sw.values, sw.meta, sw.meta,
                                    [1, 2], [1, 1], [0, 0], [1, 1], None, 0, "cpu")
    with pytest.raises(ValueError, match=r"all tensors must be on one device, got x on cpu, row_offsets on meta"):
        torch.ops.sparsegemm.grouped_linear(x, torch.tensor([0, 3], device="meta"), [sw.values], [sw.meta], [], 32,
                                            [], [], [], 0, 3, "cpu")


def test_a_scale_beside_float_values_is_refused():
    # It was checked, then ignored by every op.
    sw = _weight_16x32()
    with pytest.raises(ValueError, match="SparseTensor24: a scale goes with int8 values"):
        sparsegemm.SparseTensor24(sw.values, sw.meta, sw.shape, torch.full((16,), 2.0))


@pytest.mark.parametrize("shape", [(16, 32, 99), (16.9, 32.2), (16,), "16x32", (True, 32)])
def test_sparse_tensor_shape_must_be_two_integers(shape):
    sw = _weight_16x32()  # (16, 32, 99) and (16.9, 32.2) became (16, 32); (16,) an IndexError
    with pytest.raises(ValueError, match=r"SparseTensor24: shape must be \(N, K\), two integers, got"):
        sparsegemm.SparseTensor24(sw.values, sw.meta, shape)


def test_sparse_tensor_parts_must_be_tensors():
    sw = _weight_16x32()
    with pytest.raises(TypeError, match="SparseTensor24: meta must be a tensor, got NoneType"):
        sparsegemm.SparseTensor24(sw.values, None, sw.shape)
    with pytest.raises(TypeError, match="SparseTensor24: values must be a tensor, got list"):
        sparsegemm.SparseTensor24(sw.values.tolist(), sw.meta, sw.shape)


def test_int8_argument_errors_name_the_op():
    from sparsegemm import quant

    w8 = quant.quantize_weight(torch.randn(16, 32))
    x = torch.randn(3, 32)
    pair = quant.quantize_activations(x)
    with pytest.raises(ValueError, match="input_scale quantizes float activations, but x is already quantized"):
        quant.linear_int8(pair, w8, out_dtype=torch.float32, input_scale=2.0)  # was dropped silently
    with pytest.raises(TypeError, match=r"scale must be a positive number, got 'a'"):
        quant.linear_int8(x, w8, input_scale="a")
    with pytest.raises(ValueError, match=r"quantize_activations: x has no features to quantize \(K = 0\)"):
        quant.quantize_activations(torch.ones(3, 0))
    with pytest.raises(TypeError, match="sparsegemm.compress: prune must be True or False, got 'no'"):
        sparsegemm.compress(torch.randn(16, 32), prune="no")


def test_an_array_dlpack_cannot_carry_is_refused_by_name():
    np = pytest.importorskip("numpy")
    sw = _weight_16x32(torch.float32)
    x = np.zeros((3, 32), dtype=">f4")  # big-endian: torch's from_dlpack raised a bare BufferError
    with pytest.raises(TypeError, match=r"sparsegemm.linear: x \(ndarray of dtype >f4\) cannot be shared through "
                                        r"DLPack"):
        sparsegemm.linear(x, sw)


@pytest.mark.parametrize("dtype, bits", [(torch.bfloat16, 0x7F81), (torch.float16, 0x7C01)])
def test_the_oracle_moves_signalling_nans_as_bits(dtype, bits):
    # A gather in the float dtype quieted them (bf16 0x7F81 -> 0xFFFF): a false mismatch against the
    # kernels, which keep every bit.
    w = torch.tensor([[bits, 0, 0, 0x3C00 if dtype == torch.float16 else 0x3F80]], dtype=torch.int16).view(dtype)
    values, meta = oracle.compress(w, prune=True)
    ours = sparsegemm.compress(w, prune=True)
    assert torch.equal(values.view(torch.int16), ours.values.view(torch.int16)) and torch.equal(meta, ours.meta)
    assert int(values.view(torch.int16)[0, 0]) == bits
    back = oracle.decompress(values, meta, 4)
    assert torch.equal(back.view(torch.int16), w.view(torch.int16))


def test_submodules_the_docs_name_resolve_after_a_plain_import(tmp_path):
    # The docs say sparsegemm.quant.quantize_weight and sparsegemm.bench.bench_int8_shape: after
    # `import sparsegemm` alone both were AttributeErrors (until something imported them).
    import subprocess
    import sys

    script = ("import sparsegemm, sys\n"
              "assert 'sparsegemm.quant' not in sys.modules\n"
              "print(sparsegemm.quant.quantize_weight.__name__, sparsegemm.bench.bench_int8_shape.__name__,\n"
              "      sparsegemm.targets.run.__name__)\n"
              "try:\n"
              "    sparsegemm.nonexistent\n"
              "except AttributeError as exc:\n"
              "    print(exc)\n")
    # From a scratch folder: in the repository's root `-c` would import the source tree (no _C when installed).
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert out.splitlines() == ["quantize_weight bench_int8_shape run",
                                "module 'sparsegemm' has no attribute 'nonexistent'"]


def test_the_oracle_refuses_what_the_library_refuses():
    # Strict compress counts NaN as non-zero (the library's rule); decompress refuses a nibble
    # naming one position twice.
    with pytest.raises(ValueError, match=r"oracle.compress: weight is not 2:4 at \(row, group\) \(0, 0\)"):
        oracle.compress(torch.tensor([[float("nan"), 1.0, 2.0, 0.0]]))
    values, meta = oracle.compress(torch.tensor([[0.0, 1.0, 2.0, 0.0]]))
    oracle.decompress(values, meta, 4)
    with pytest.raises(ValueError, match=r"oracle.decompress: metadata names the same or unordered positions"):
        oracle.decompress(values, torch.tensor([[0x45]], dtype=torch.uint8), 4)  # i0 == i1 == 1


def test_sizes_count_the_true_k_and_parts_share_a_device():
    sw = sparsegemm.compress(torch.zeros(4, 6, dtype=torch.float16))  # K = 6, padded to 8 inside
    assert sw.dense_nbytes == 4 * 6 * 2 and sw.nbytes == 4 * 4 * 2 + 4 * 1
    with pytest.raises(ValueError, match=r"SparseTensor24: values on cpu but meta on meta"):
        sparsegemm.SparseTensor24(sw.values, sw.meta.to("meta"), sw.shape, validate=False)


class OpNames(TorchDispatchMode):
    """The names of the ops dispatched while it is active."""

    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(str(func))
        return func(*args, **(kwargs or {}))


def test_eager_mask_compress_and_decompress_skip_torchs_dispatcher():
    # Like linear (ops.call): through the dispatcher a custom op cost ~15 us a call, and its first
    # call imported torch._dynamo (with sympy: ~800 modules, 1 s, 67 MB) for a plain eager compress.
    # Recorded calls still go through it (tests/test_torch_integration.py).
    w = torch.randn(16, 32, dtype=torch.bfloat16)
    log = OpNames()
    with log:
        sw = sparsegemm.compress(w, prune=True)
        dense = sparsegemm.decompress(sw)
        mask = sparsegemm.mask_2to4(w)
    assert not [name for name in log.names if name.startswith("sparsegemm.")], log.names
    assert torch.equal(dense, torch.where(mask, w, torch.zeros((), dtype=w.dtype)))
