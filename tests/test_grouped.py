"""Grouped GEMMs: sparsegemm.grouped_linear (one launch of the kernels' GroupedRowMajorX loader for
many weights, each on its own run of rows) and SparseExperts' grouped path, against each group's
oracle: through the emulator always, on the GPU where there is one."""
import pytest
import torch

import sparsegemm
from sparsegemm import _C, ops, oracle, quant
from sparsegemm.nn import SparseExperts

from conftest import sparse_weight
from test_experts import Experts, routing
from test_int8_kernels_simt import ulps_apart


def cuda_kernels_available():
    return bool(_C.build_info()["cuda_built"]) and torch.cuda.is_available()


BACKENDS = ["simt", pytest.param("cuda", marks=pytest.mark.skipif(
    not cuda_kernels_available(), reason="needs a CUDA build of sparsegemm._C and a CUDA GPU"))]


def device_of(backend):
    return "cuda" if backend == "cuda" else "cpu"


def grouped_case(rows, n, k, dtype, *, seed=0, bias=True, int8=False, device="cpu"):
    """(x, row_offsets, weights, bias list or None): consecutive groups of `rows` rows, with two
    rows that no group holds before the first and three after the last."""
    gen = torch.Generator().manual_seed(seed)
    row_offsets = [2]
    for count in rows:
        row_offsets.append(row_offsets[-1] + count)
    m = row_offsets[-1] + 3
    x = torch.randn(m, k, generator=gen).to(dtype)
    weights = []
    for g in range(len(rows)):
        w = sparse_weight(n, k, torch.float32 if int8 else dtype, seed=seed * 100 + g)
        weights.append(sparsegemm.compress(w, dtype=torch.int8) if int8 else sparsegemm.compress(w))
    biases = [torch.randn(n, generator=gen).to(dtype) for _ in rows] if bias else None
    to = lambda t: t.to(device)  # noqa: E731
    weights = [sparsegemm.SparseTensor24(to(w.values), to(w.meta), w.shape, None if w.scale is None else to(w.scale))
               for w in weights]
    return to(x), to(torch.tensor(row_offsets, dtype=torch.int64)), weights, (
        None if biases is None else [to(b) for b in biases])


def assert_groups_match_oracle(y, x, row_offsets, weights, biases, activation):
    offsets = row_offsets.tolist()
    covered = torch.zeros(y.shape[0], dtype=torch.bool)
    for g, w in enumerate(weights):
        rows = slice(offsets[g], offsets[g + 1])
        covered[rows] = True
        if rows.stop > rows.start:
            oracle.assert_close_to_oracle(y[rows].cpu(), x[rows].cpu(), sparsegemm.decompress(cpu_weight(w)),
                                          None if biases is None else biases[g].cpu(), activation)
    assert torch.count_nonzero(y[~covered.to(y.device)]) == 0  # rows outside every group


def cpu_weight(w):
    return sparsegemm.SparseTensor24(w.values.cpu(), w.meta.cpu(), w.shape, None if w.scale is None else w.scale.cpu())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["f16", "bf16"])
@pytest.mark.parametrize("rows,max_rows", [([3, 0, 16, 1], 16), ([20, 0, 5, 33], None)], ids=["decode", "large_m"])
@pytest.mark.parametrize("activation", [None, "gelu", "swiglu"])
def test_grouped_linear_matches_each_groups_oracle(backend, dtype, rows, max_rows, activation):
    # max_rows 16: the decode tile; None (M): the large-M tile (the wgmma one on Hopper). N = 144 is
    # not a multiple of the 128-row block; K = 96 ends on a half k-tile.
    x, offsets, weights, biases = grouped_case(rows, 144, 96, dtype, seed=len(rows) + int(max_rows or 0),
                                               device=device_of(backend))
    y = sparsegemm.grouped_linear(x, offsets, weights, biases, activation=activation, max_rows=max_rows,
                                  backend=backend)
    assert y.shape == (x.shape[0], 72 if activation == "swiglu" else 144) and y.dtype == dtype
    assert_groups_match_oracle(y, x, offsets, weights, biases, activation)


@pytest.mark.parametrize("config", [0, 1, 2], ids=["large_m", "decode", "wgmma"])
def test_every_grouped_tile_in_the_emulator(config):
    # The tiles forced through the launch (the wgmma tile runs only on Hopper, and in the emulator).
    x, offsets, weights, biases = grouped_case([9, 0, 17, 4], 136, 64, torch.float16, seed=config)
    table = ops.grouped_weights([w.values for w in weights], [w.kernel_meta("simt") for w in weights], biases, None,
                                64)
    y = torch.zeros(x.shape[0], 136, dtype=torch.float16)
    ops.launch_grouped("simt_", 0, x, offsets, 17, table, ops.activation_code("test", "silu", 136), y, config)
    assert_groups_match_oracle(y, x, offsets, weights, biases, "silu")


@pytest.mark.parametrize("int8", [False, True], ids=["f16", "int8"])
@pytest.mark.parametrize("split_k", [2, 3])
def test_grouped_decode_tile_splits_k(int8, split_k, shuffled_block_orders):
    # Forced splits of the decode tile: each group's partial sums in the workspace rows of its own
    # (absolute) rows, one arrival counter per group and tile; K = 1000 ends on a partial stage.
    # Blocks in shuffled orders too: groups' splits then interleave, as they run at once on a GPU.
    x, offsets, weights, biases = grouped_case([3, 0, 9, 1], 144, 1000, torch.float16, seed=21 + split_k, int8=int8)
    table = ops.grouped_weights([w.values for w in weights], [w.kernel_meta("simt") for w in weights], biases,
                                [w.scale for w in weights] if int8 else None, 1000)
    swiglu = ops.activation_code("test", "swiglu", 144)
    want = sparsegemm.grouped_linear(x, offsets, weights, biases, activation="swiglu", backend="cpu")
    results = []
    for seed in shuffled_block_orders:
        _C.simt_set_block_order(seed)
        y = torch.zeros(x.shape[0], 72, dtype=torch.float16)
        ops.launch_grouped("simt_", 0, x, offsets, 9, table, swiglu, y, 1, split_k)
        if int8:  # the integer sums are exact: one ulp at most after the epilogue
            assert int(ulps_apart(y, want).max()) <= 1
        else:
            assert_groups_match_oracle(y, x, offsets, weights, biases, "swiglu")
        results.append(y)
    # Splits are summed in order whichever block arrives last: every order gives the same bits.
    assert all(torch.equal(y, results[0]) for y in results)


def test_the_grouped_plan_splits_k_when_the_routed_groups_leave_the_gpu_idle():
    # The emulator plans for 4 SMs x 2 decode blocks: three groups of one 64-row N tile and K = 2048
    # (32 k-tiles) fill three block slots unsplit, six with two splits.
    workspace_bytes, counters = _C.simt_gemm_grouped_scratch(2, 64, 2048, 6, 3)
    assert workspace_bytes == 2 * 6 * 64 * 4 and counters == 3
    x, offsets, weights, _ = grouped_case([2, 1, 2], 64, 2048, torch.bfloat16, seed=22, bias=False)
    x, offsets = x[2:8], offsets - 2  # six rows, as many as the groups can hold (two each)
    y = sparsegemm.grouped_linear(x, offsets, weights, max_rows=2, backend="simt")
    assert_groups_match_oracle(y, x, offsets, weights, None, None)
    # More rows of X than the groups can hold: the split's workspace is laid out by X's rows, all of
    # them (16 MiB for 8192 rows here, where 64 KiB of them are computed; 8 GiB at 65536 rows and N =
    # 4096 on an H200), so it does not split.
    assert _C.simt_gemm_grouped_scratch(2, 64, 2048, 7, 3) == (0, 0)
    assert _C.simt_gemm_grouped_scratch(16, 128, 4096, 8192, 2) == (0, 0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("activation", [None, "relu", "swiglu"])
def test_int8_grouped_linear_is_each_groups_int8_linear(backend, activation):
    # The INT8 contract: the kernels' integer sums are exact, so each group's rows are the CPU
    # backend's INT8 linear of them, within one ulp after the epilogue (bit for bit for relu / none).
    x, offsets, weights, biases = grouped_case([5, 0, 12], 64, 128, torch.float16, seed=3, int8=True,
                                               device=device_of(backend))
    y = sparsegemm.grouped_linear(x, offsets, weights, biases, activation=activation, max_rows=16, backend=backend)
    bounds = offsets.tolist()
    for g, w in enumerate(weights):
        rows = slice(bounds[g], bounds[g + 1])
        if rows.stop > rows.start:
            want = sparsegemm.linear(x[rows].cpu(), cpu_weight(w), biases[g].cpu(), activation=activation,
                                     backend="cpu")
            assert int(ulps_apart(y[rows].cpu(), want).max()) <= (0 if activation != "swiglu" else 1)


@pytest.mark.parametrize("backend", ["cpu", *BACKENDS])
@pytest.mark.parametrize("activation", [None, "relu", "swiglu"])
def test_static_int8_grouped_linear_is_each_groups_static_int8_linear(backend, activation):
    # Static activation scales, one a group (numbers or one-element tensors; small enough that some
    # inputs saturate): each group's rows are its linear_int8 with that scale, within one ulp.
    x, offsets, weights, biases = grouped_case([5, 0, 12], 64, 128, torch.float16, seed=4, int8=True,
                                               device=device_of(backend))
    scales = [0.01, torch.tensor(0.03), torch.tensor([0.02])]
    y = sparsegemm.grouped_linear(x, offsets, weights, biases, activation=activation, input_scale=scales,
                                  max_rows=16, backend=backend)
    bounds = offsets.tolist()
    for g, w in enumerate(weights):
        rows = slice(bounds[g], bounds[g + 1])
        if rows.stop > rows.start:
            want = quant.linear_int8(x[rows].cpu(), cpu_weight(w), biases[g].cpu(), activation=activation,
                                     input_scale=scales[g], backend="cpu")
            assert int(ulps_apart(y[rows].cpu(), want).max()) <= (0 if activation != "swiglu" else 1)
            dynamic = quant.linear_int8(x[rows].cpu(), cpu_weight(w), biases[g].cpu(), activation=activation,
                                        backend="cpu")
            assert not torch.equal(want, dynamic)
    assert torch.count_nonzero(y[:2]) == 0 and torch.count_nonzero(y[-3:]) == 0


def test_grouped_linear_refuses_input_scales_it_cannot_take():
    x, offsets, weights, _ = grouped_case([3, 4], 16, 32, torch.float16, seed=29, int8=True, bias=False)
    _, _, weights16, _ = grouped_case([3, 4], 16, 32, torch.float16, seed=29, bias=False)
    for ws, scales, match in ((weights16, [0.1, 0.1], "input_scale .* needs int8 weights, got torch.float16"),
                              (weights, [0.1], r"input_scale must be None or 2 scales \(one per weight\), got 1"),
                              (weights, 0.1, "input_scale must be None or 2 scales .* got float"),
                              (weights, [0.1, -1.0], r"\(input_scale\[1\]\)"),
                              (weights, [0.1, torch.ones(2)], r"\(input_scale\[1\]\)")):
        with pytest.raises(ValueError, match=f"sparsegemm.grouped_linear.*{match}"):
            sparsegemm.grouped_linear(x, offsets, ws, input_scale=scales)


def test_grouped_linear_on_the_cpu_is_each_groups_linear():
    x, offsets, weights, biases = grouped_case([4, 0, 7], 40, 36, torch.float32, seed=5)
    y = sparsegemm.grouped_linear(x, offsets, weights, biases, activation="gelu")
    for g, (first, end) in enumerate(zip(offsets.tolist(), offsets.tolist()[1:])):
        assert torch.equal(y[first:end], sparsegemm.linear(x[first:end], weights[g], biases[g], activation="gelu"))
    assert torch.count_nonzero(y[:2]) == 0 and torch.count_nonzero(y[-3:]) == 0


@pytest.mark.parametrize("backend", ["cpu", "simt"])
def test_int8_grouped_linear_takes_any_float_bias_as_linear_does(backend):
    # linear converts an int8 weight's bias to the output's dtype; grouped_linear refused an fp32 one.
    x, offsets, weights, biases = grouped_case([3, 2], 32, 64, torch.float16, seed=9, int8=True)
    biases = [torch.randn(32, generator=torch.Generator().manual_seed(g)) for g in range(2)]
    y = sparsegemm.grouped_linear(x, offsets, weights, biases, backend=backend)
    for g, (first, end) in enumerate(zip(offsets.tolist(), offsets.tolist()[1:])):
        assert torch.equal(y[first:end], sparsegemm.linear(x[first:end], weights[g], biases[g], backend=backend))
    for call in (lambda: sparsegemm.grouped_linear(x, offsets, weights, [b.long() for b in biases], backend=backend),
                 lambda: sparsegemm.linear(x, weights[0], biases[0].long(), backend=backend)):
        with pytest.raises(TypeError, match=r"bias(\[0\])? must have dtype in \(float32, float16, bfloat16\), "
                                            r"got int64"):
            call()


def leaf_copies(x, weights, biases):
    """Copies of a grouped case's float tensors that take gradients (the kept values of each weight)."""
    leaf = lambda t: t.detach().clone().requires_grad_(True)  # noqa: E731
    weights = [sparsegemm.SparseTensor24(leaf(w.values), w.meta, w.shape, w.scale) for w in weights]
    return leaf(x), weights, None if biases is None else [leaf(b) for b in biases]


@pytest.mark.parametrize("backend", ["cpu", *BACKENDS])
@pytest.mark.parametrize("activation", [None, "gelu", "swiglu"])
def test_grouped_linear_gradients_are_each_groups_linear_gradients(backend, activation):
    # x, every weight's kept values and every bias get what each group's linear gives its rows, bit
    # for bit; rows no group holds get zeros. On CUDA max_rows = 4 cuts the 5-row group to the 4
    # rows the forward computes (the CPU and SIMT backends refuse a group beyond max_rows).
    dtype = torch.float32 if backend == "cpu" else torch.float16
    case = grouped_case([3, 0, 5], 32, 64, dtype, seed=21, device=device_of(backend))
    max_rows = 4 if backend == "cuda" else None
    x, weights, biases = leaf_copies(*case[:1], *case[2:])
    y = sparsegemm.grouped_linear(x, case[1], weights, biases, activation=activation, max_rows=max_rows,
                                  backend=backend)
    grad_y = torch.randn(y.shape, generator=torch.Generator().manual_seed(22)).to(y)
    (y * grad_y).sum().backward()
    x_ref, weights_ref, biases_ref = leaf_copies(*case[:1], *case[2:])
    offsets = case[1].tolist()
    covered = torch.zeros(x.shape[0], dtype=torch.bool)
    for g in range(len(weights)):
        rows = slice(offsets[g], min(offsets[g + 1], offsets[g] + (max_rows or x.shape[0])))
        covered[rows] = True
        if rows.stop > rows.start:
            y_g = sparsegemm.linear(x_ref[rows], weights_ref[g], biases_ref[g], activation=activation, backend=backend)
            (y_g * grad_y[rows]).sum().backward()
    assert torch.equal(x.grad, x_ref.grad) and torch.count_nonzero(x.grad[~covered.to(x.device)]) == 0
    for g in range(len(weights)):
        assert torch.equal(weights[g].values.grad, weights_ref[g].values.grad if weights_ref[g].values.grad is not None
                           else torch.zeros_like(weights[g].values))
        assert torch.equal(biases[g].grad, biases_ref[g].grad if biases_ref[g].grad is not None
                           else torch.zeros_like(biases[g]))
    assert torch.count_nonzero(weights[1].values.grad) == 0  # the empty group


def test_grouped_linear_trains_compiled_and_with_frozen_weights():
    # Compiled whole (the backward's host read of the offsets is an op of its own), the gradients
    # equal eager ones; with frozen weights and biases only x gets one.
    case = grouped_case([3, 0, 5], 32, 64, torch.float32, seed=24)
    fn = lambda x, w, b: sparsegemm.grouped_linear(x, case[1], w, b, activation="gelu")  # noqa: E731
    compiled = torch.compile(fn, fullgraph=True)
    grads = []
    for run in (fn, compiled):
        x, weights, biases = leaf_copies(*case[:1], *case[2:])
        run(x, weights, biases).sum().backward()
        grads.append([x.grad] + [w.values.grad for w in weights] + [b.grad for b in biases])
    assert all(torch.equal(a, b) for a, b in zip(*grads))
    x = case[0].clone().requires_grad_(True)
    fn(x, case[2], case[3]).sum().backward()
    assert torch.equal(x.grad, grads[0][0]) and all(w.values.grad is None for w in case[2])


def test_trainable_weights_get_gradients_when_x_needs_none():
    # Inputs that are data (or come from frozen layers): the weights in grouped_linear's lists still
    # make the call record a graph, and get what each group's linear gives them.
    x, offsets, weights, biases = grouped_case([3, 0, 5], 32, 64, torch.float32, seed=25)
    _, trained, trained_bias = leaf_copies(x, weights, biases)
    y = sparsegemm.grouped_linear(x, offsets, trained, trained_bias)
    assert y.requires_grad
    y.sum().backward()
    _, reference, reference_bias = leaf_copies(x, weights, biases)
    rows = slice(*offsets.tolist()[2:4])
    sparsegemm.linear(x[rows], reference[2], reference_bias[2]).sum().backward()
    assert torch.equal(trained[2].values.grad, reference[2].values.grad)
    assert torch.equal(trained_bias[2].grad, reference_bias[2].grad)


def test_the_backward_clamps_offsets_as_the_kernel_does():
    # CUDA never reads the offsets on the host: the kernel clamps them into x (and to max_rows), and
    # the gradients follow the rows it computed.
    x, _, weights, _ = grouped_case([4, 4], 16, 32, torch.float32, seed=26, bias=False)
    grad_y = torch.randn(x.shape[0], 16, generator=torch.Generator().manual_seed(27))
    w = weights[0]
    for offsets, max_rows, rows in [([-2, 3], 99, slice(0, 3)), ([5, 10 ** 6], 99, slice(5, x.shape[0])),
                                    ([1, 9], 3, slice(1, 4)), ([6, 2], 99, slice(6, 6))]:
        got = ops._grouped_linear_grads(grad_y, x, torch.tensor(offsets), [w.values], [w.meta], [], 32, [], [], [], 0,
                                        max_rows, "cpu", True, False, False)[0]
        want = torch.zeros_like(x)
        want[rows] = grad_y[rows] @ sparsegemm.decompress(w)
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("static", [False, True], ids=["per_token", "static"])
@pytest.mark.parametrize("compiled", [False, True])
@pytest.mark.parametrize("backend", ["cpu", "simt"])
def test_int8_grouped_linear_passes_each_groups_straight_through_gradient(compiled, backend, static):
    # x and the biases get what each group's linear_int8 gives its rows (the straight-through
    # estimator; static scales: none where they saturate x); rows no group holds get zeros.
    dtype = torch.float32 if backend == "cpu" else torch.float16
    x, offsets, weights, biases = grouped_case([3, 0, 4], 16, 32, dtype, seed=23, int8=True)
    scales = [0.011, 0.02, torch.tensor([0.009])] if static else [None] * 3  # about 10% of x saturates
    grad_y = torch.randn(x.shape[0], 8, generator=torch.Generator().manual_seed(5)).to(dtype)
    results = []
    for grouped in (True, False):
        x_leaf = x.clone().requires_grad_(True)
        b_leaf = [b.clone().requires_grad_(True) for b in biases]
        if grouped:
            fn = lambda x, b: sparsegemm.grouped_linear(x, offsets, weights, b, activation="swiglu",  # noqa: E731
                                                        input_scale=scales if static else None, backend=backend)
            y = (torch.compile(fn, fullgraph=True) if compiled else fn)(x_leaf, b_leaf)
        else:
            bounds = offsets.tolist()
            y = torch.cat([x_leaf[:bounds[0]].new_zeros(bounds[0], 8)]
                          + [quant.linear_int8(x_leaf[bounds[g]:bounds[g + 1]], weights[g], b_leaf[g],
                                               activation="swiglu", input_scale=scales[g], backend=backend)
                             for g in range(len(weights))]
                          + [x_leaf.new_zeros(x.shape[0] - bounds[-1], 8)])
        y.backward(grad_y)
        results.append((y.detach(), x_leaf.grad, [b.grad for b in b_leaf]))
    (y, gx, gb), (y_ref, gx_ref, gb_ref) = results
    torch.testing.assert_close(y, y_ref, rtol=0, atol=0)
    torch.testing.assert_close(gx, gx_ref, rtol=1e-5, atol=1e-5)
    assert torch.count_nonzero(gx[:2]) == 0 and torch.count_nonzero(gx[-3:]) == 0 and gx[2:9].abs().sum() > 0
    for got, want in zip(gb, gb_ref):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert torch.count_nonzero(gb[1]) == 0  # the empty group's bias
    if static:  # the saturated inputs pass no gradient
        rows = slice(offsets[0], offsets[1])
        assert torch.equal(gx[rows] == 0, (x[rows].float() / 0.011).round().abs() > quant.QMAX)


def test_int8_grouped_linear_refuses_a_backward_to_its_scales():
    x, offsets, weights, _ = grouped_case([3, 4], 16, 32, torch.float16, seed=28, int8=True, bias=False)
    trained = [sparsegemm.SparseTensor24(w.values, w.meta, w.shape, w.scale.clone().requires_grad_(True))
               for w in weights]
    y = sparsegemm.grouped_linear(x, offsets, trained)
    with pytest.raises(RuntimeError, match="no gradient flows to the INT8 GEMM's scales"):
        y.float().sum().backward()


def test_a_double_backward_is_each_groups_linears():
    # A gradient of x's gradient (a Hessian-vector product, a gradient penalty): eager, through the
    # backward's own torch ops, as through linear's.
    x, offsets, weights, biases = grouped_case([3, 0, 5], 32, 64, torch.float32, seed=29)
    results = []
    for grouped in (True, False):
        x_leaf = x.clone().requires_grad_(True)
        if grouped:
            y = sparsegemm.grouped_linear(x_leaf, offsets, weights, biases, activation="gelu")
        else:
            bounds = offsets.tolist()
            y = torch.cat([sparsegemm.linear(x_leaf[bounds[g]:bounds[g + 1]], weights[g], biases[g], activation="gelu")
                           for g in range(len(weights))])
        (grad_x,) = torch.autograd.grad(y.pow(2).sum(), x_leaf, create_graph=True)
        results.append(torch.autograd.grad(grad_x.pow(2).sum(), x_leaf)[0])
    torch.testing.assert_close(results[0], results[1], rtol=1e-5, atol=1e-5)


def test_row_offsets_may_be_a_strided_view():
    x, offsets, weights, biases = grouped_case([3, 0, 5], 32, 64, torch.float32, seed=30)
    column = torch.stack([offsets, offsets * 0], dim=1)[:, 0]  # stride 2
    assert not column.is_contiguous()
    assert torch.equal(sparsegemm.grouped_linear(x, column, weights, biases),
                       sparsegemm.grouped_linear(x, offsets, weights, biases))
    # The op itself (torch.ops.sparsegemm.grouped_linear) takes rows as stored, and says why it refuses.
    with pytest.raises(ValueError, match=r"got torch.int64 \(4,\) with strides \(2,\)"):
        ops._grouped_linear(x, column, [w.values for w in weights], [w.meta for w in weights], [], 64, [], [], [], 0,
                            x.shape[0], "cpu")


def test_more_groups_than_one_launch_takes():
    # 130 groups: two launches of at most 128 (the pointer tables travel in the kernel parameters).
    gen = torch.Generator().manual_seed(7)
    rows = torch.randint(0, 4, (130,), generator=gen).tolist()
    x, offsets, weights, biases = grouped_case(rows, 16, 32, torch.float16, seed=7)
    y = sparsegemm.grouped_linear(x, offsets, weights, biases, max_rows=3, backend="simt")
    want = sparsegemm.grouped_linear(x, offsets, weights, biases, max_rows=3, backend="cpu")
    assert torch.allclose(y.float(), want.float(), rtol=1e-3, atol=1e-3)


def test_the_kernel_clamps_offsets_and_stops_at_max_rows():
    # On CUDA the offsets are never read on the host: whatever they hold, the launch stays inside
    # X and Y (the emulator fails any copy outside), and a group computes at most max_rows rows.
    x, _, weights, _ = grouped_case([4, 4], 16, 32, torch.float16, seed=8, bias=False)
    m = x.shape[0]
    table = ops.grouped_weights([w.values for w in weights], [w.kernel_meta("simt") for w in weights], None, None, 32)
    want = [sparsegemm.linear(x, w, backend="cpu") for w in weights]
    y = torch.zeros(m, 16, dtype=torch.float16)
    ops.launch_grouped("simt_", 0, x, torch.tensor([5, 2, 10 ** 6]), 16, table, 0, y)  # falls, then past M
    assert torch.count_nonzero(y[:2]) == 0 and torch.equal(y[2:], want[1][2:])
    y.zero_()
    ops.launch_grouped("simt_", 0, x, torch.tensor([-7, m, m]), 3, table, 0, y)  # negative, then 3 rows at most
    assert torch.equal(y[:3], want[0][:3]) and torch.count_nonzero(y[3:]) == 0


def test_grouped_linear_errors_name_the_argument():
    x, offsets, weights, biases = grouped_case([3, 2], 16, 32, torch.float16, seed=9)
    call = sparsegemm.grouped_linear
    with pytest.raises(TypeError, match="weights must be a non-empty list of SparseTensor24"):
        call(x, offsets, [])
    other = sparsegemm.compress(sparse_weight(16, 36))
    with pytest.raises(ValueError, match=r"every weight must match weights\[0\] .* weights\[1\] 16 x 36"):
        call(x, offsets, [weights[0], other])
    with pytest.raises(ValueError, match=r"row_offsets must be an int64 tensor of shape \(3,\)"):
        call(x, offsets.int(), weights)
    with pytest.raises(ValueError, match=r"row_offsets must be an int64 tensor of shape \(3,\)"):
        call(x, offsets[:2], weights)
    with pytest.raises(ValueError, match=r"bias must be None or 2 tensors"):
        call(x, offsets, weights, biases[:1])
    with pytest.raises(ValueError, match=r"bias must be None or 2 tensors \(one per weight\), got NoneType at "
                                         r"bias\[1\]"):
        call(x, offsets, weights, [biases[0], None])
    with pytest.raises(ValueError, match=r"bias\[1\] must have shape \(16,\)"):
        call(x, offsets, weights, [biases[0], biases[1][:8]])
    with pytest.raises(ValueError, match=r"x must be a \[M, 32\] tensor"):
        call(x[:, :16], offsets, weights)
    with pytest.raises(ValueError, match="max_rows must be a non-negative int"):
        call(x, offsets, weights, max_rows=-1)
    for bad, message in (([3, 1, 5], "rise from >= 0"), ([-1, 3, 5], "rise from >= 0"),
                         ([2, 5, x.shape[0] + 1], f"to <= M = {x.shape[0]}")):
        for backend in ("cpu", "simt"):
            with pytest.raises(ValueError, match=message):
                call(x, torch.tensor(bad), weights, backend=backend)
    # A bound past M is M (no group has more rows): the launch is sized by it.
    assert torch.equal(call(x, offsets, weights, max_rows=2 ** 40, backend="simt"), call(x, offsets, weights,
                                                                                         backend="simt"))
    with pytest.raises(ValueError, match="group 1 has 2 rows, more than max_rows = 1"):
        call(x, torch.tensor([2, 3, 5]), weights, max_rows=1, backend="simt")
    with pytest.raises(TypeError, match=r"x must have dtype in \(float16, bfloat16\), got float32"):
        call(x.float(), offsets, [sparsegemm.compress(sparse_weight(16, 32, torch.float32))] * 2, backend="simt")


# ---- SparseExperts' grouped path ---------------------------------------------------------------------

def per_expert(module, *args):
    """The per-expert path's result (the grouped one skipped)."""
    grouped = module._grouped_forward
    module._grouped_forward = lambda *a: None
    try:
        return module(*args)
    finally:
        module._grouped_forward = grouped


def experts(quantize, **kwargs):
    """SparseExperts of test_experts.Experts; quantize "static": INT8 with a static activation scale
    on every layer (calibrated values of the test's inputs' size)."""
    sparse = SparseExperts.from_dense(Experts(), quantize="int8" if quantize == "static" else quantize, **kwargs)
    if quantize == "static":
        for layers, scale in ((sparse.gate_up, 0.02), (sparse.down, 0.01)):
            for layer in layers:
                layer.set_input_scale(scale)
    return sparse


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("quantize", [None, "int8", "static"])
def test_sparse_experts_grouped_path_matches_the_per_expert_one(backend, quantize):
    # routing(): a token routed to one expert twice (one route, the summed weight) and a token
    # routed nowhere (padding indices E and -1), besides ordinary routes.
    torch.manual_seed(10)
    device = device_of(backend)
    sparse = experts(quantize, dtype=torch.float16, backend=None if backend == "cuda" else backend).to(device)
    x, index, weights = routing(tokens=12)
    x, index, weights = x.half().to(device), index.to(device), weights.half().to(device)
    with torch.no_grad():
        got = sparse(x, index, weights)
        assert sparse.__dict__["_grouped"][1] is not None  # the grouped launches ran
        want = per_expert(sparse, x, index, weights)
    assert torch.allclose(got.float(), want.float(), rtol=2e-2, atol=2e-2)
    assert torch.count_nonzero(got[1]) == 0  # the token routed nowhere


def test_a_route_to_nowhere_adds_nothing_whatever_its_weight():
    torch.manual_seed(16)
    sparse = SparseExperts.from_dense(Experts(), dtype=torch.float16, backend="simt")
    x = torch.randn(3, 64).half()
    index = torch.tensor([[0, 1], [4, -1], [2, 4]])  # E = 4 and -1: padding
    weights = torch.tensor([[0.5, 0.5], [float("inf"), float("nan")], [1.0, float("inf")]]).half()
    with torch.no_grad():
        got = sparse(x, index, weights)
        want = per_expert(sparse, x, index, weights)
    assert torch.count_nonzero(got[1]) == 0 and torch.isfinite(got).all()
    assert torch.allclose(got.float(), want.float(), rtol=2e-2, atol=2e-2)


def test_experts_with_a_non_contiguous_weight_take_the_per_expert_path():
    # The tables would hold a contiguous copy that an in-place edit of the layer never reaches.
    torch.manual_seed(17)
    sparse = SparseExperts.from_dense(Experts(), dtype=torch.float16, backend="simt")
    layer = sparse.down[1]
    layer.values.data = layer.values.data.t().contiguous().t()
    x, index, weights = routing(tokens=8)
    with torch.no_grad():
        before = sparse(x.half(), index, weights.half())
        assert sparse.__dict__["_grouped"][1] is None
        layer.values.mul_(2)
        after = sparse(x.half(), index, weights.half())
    assert not torch.equal(before, after)


@pytest.mark.parametrize("change", ["copy_", "data", "swap_tensors"])
def test_sparse_experts_grouped_path_sees_a_changed_weight(change):
    # One expert's metadata changes: an in-place copy (a broadcast, a load: its version moves, and
    # the values are copied too), or a swap that keeps the tensor object and its version counter
    # (the values stay: the tables must follow the metadata's storage). Reordered again each time.
    torch.manual_seed(11)
    sparse = SparseExperts.from_dense(Experts(), dtype=torch.float16, backend="simt")
    x, index, weights = routing(tokens=8)
    x, weights = x.half(), weights.half()
    with torch.no_grad():
        before = sparse(x, index, weights)
        meta, other = sparse.gate_up[2].metadata, sparse.gate_up[3].metadata.clone()
        if change == "copy_":
            meta.copy_(other)
            sparse.gate_up[2].values.copy_(sparse.gate_up[3].values)
        elif change == "data":
            meta.data = other
        else:
            torch.utils.swap_tensors(meta, other)
        after = sparse(x, index, weights)
        want = per_expert(sparse, x, index, weights)
    assert not torch.equal(before, after)
    assert torch.allclose(after.float(), want.float(), rtol=2e-2, atol=2e-2)


def test_sparse_experts_made_in_inference_mode_run_grouped():
    # Inference tensors have no version counter: the tables' state goes without it.
    torch.manual_seed(23)
    with torch.inference_mode():
        sparse = SparseExperts.from_dense(Experts(), dtype=torch.float16, backend="simt")
        x, index, weights = routing(tokens=6)
        got = sparse(x.half(), index, weights.half())
        assert sparse.__dict__["_grouped"][1] is not None
        want = per_expert(sparse, x.half(), index, weights.half())
    assert torch.allclose(got.float(), want.float(), rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("quantize", [None, "int8"])
def test_a_swapped_bias_or_scale_is_seen(quantize):
    # A .data swap keeps the tensor object; the tables follow its new storage (the old one may be
    # freed), as functional_call's overrides.
    torch.manual_seed(24)
    base = SparseExperts.from_dense(Experts(), dtype=torch.float16, backend="simt", quantize=quantize)
    down = [sparsegemm.SparseLinear.from_dense(torch.nn.Linear(32, 64).half(), backend="simt", quantize=quantize)
            for _ in base.down]
    sparse = SparseExperts(list(base.gate_up), down)
    x, index, weights = routing(tokens=8)
    x, weights = x.half(), weights.half()
    with torch.no_grad():
        sparse(x, index, weights)
        for layer in down:
            layer.bias.data = layer.bias + 100
            if quantize:
                layer.scale.data = 2 * layer.scale
        got = sparse(x, index, weights)
        want = per_expert(sparse, x, index, weights)
        assert torch.allclose(got.float(), want.float(), rtol=2e-2, atol=2e-2)
        override = {f"down.{e}.bias": torch.zeros(64, dtype=torch.float16) for e in range(len(down))}
        got = torch.func.functional_call(sparse, override, (x, index, weights))
        for layer in down:
            layer.bias.data = torch.zeros(64, dtype=torch.float16)
        assert torch.allclose(got.float(), per_expert(sparse, x, index, weights).float(), rtol=2e-2, atol=2e-2)


def test_sparse_experts_train_through_the_per_expert_path():
    torch.manual_seed(12)
    sparse = SparseExperts.from_dense(Experts(), dtype=torch.float16, backend="simt")
    x, index, weights = routing(tokens=6)
    out = sparse(x.half(), index, weights.half())  # grad mode, trainable values: the per-expert path
    out.float().sum().backward()
    assert sparse.gate_up[1].values.grad is not None


@pytest.mark.parametrize("trainable", ["experts", "inputs"])
def test_sparse_experts_train_compiled_whole_through_the_grouped_op(trainable):
    # fullgraph in grad mode: the grouped op's autograd gives what the eager per-expert path gives
    # (trainable experts, or frozen ones behind a layer that trains and a router that does).
    torch.manual_seed(19)
    sparse = SparseExperts.from_dense(Experts(), dtype=torch.float32, backend="cpu")
    if trainable == "inputs":
        sparse.requires_grad_(False)
    x, index, weights = routing(tokens=10)
    grads = []
    for run in (sparse, torch.compile(sparse, fullgraph=True, dynamic=False)):
        x_leaf, w_leaf = x.clone().requires_grad_(True), weights.clone().requires_grad_(True)
        run(x_leaf, index, w_leaf).pow(2).sum().backward()
        grads.append([x_leaf.grad, w_leaf.grad] + [p.grad.clone() for p in sparse.parameters() if p.grad is not None])
        sparse.zero_grad(set_to_none=True)
    assert len(grads[0]) == len(grads[1]) == (2 if trainable == "inputs" else 2 + 2 * 4)
    for eager, compiled in zip(*grads):
        torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-4)


def test_sparse_experts_with_no_route_still_give_zero_gradients():
    # Every route padding (or no token): the dense module's output still depends on x, the routing
    # weights and the experts, and a backward gives zeros; so does SparseExperts'.
    sparse = SparseExperts.from_dense(Experts(), dtype=torch.float32, backend="cpu")
    for tokens in (2, 0):
        x = torch.randn(tokens, 64, requires_grad=True)
        weights = torch.rand(tokens, 2, requires_grad=True)
        out = sparse(x, torch.full((tokens, 2), -1), weights)
        assert out.requires_grad and torch.count_nonzero(out) == 0
        out.sum().backward()
        assert torch.count_nonzero(x.grad) == torch.count_nonzero(weights.grad) == 0
        assert all(p.grad is not None and torch.count_nonzero(p.grad) == 0 for p in sparse.parameters())
        sparse.zero_grad(set_to_none=True)


def test_static_experts_see_a_scale_changed_past_setattr_and_refuse_a_bad_one():
    # The grouped tables keep each scale's tensor: a .data swap gave them the old storage's value
    # (0.89 off); a zero scale, refused by the per-expert layers, gave that expert no output.
    torch.manual_seed(31)
    sparse = experts("static", dtype=torch.float16, backend="simt")
    x, index, weights = routing(tokens=8)
    x, weights = x.half(), weights.half()
    with torch.no_grad():
        before = sparse(x, index, weights)
        for layer in sparse.gate_up:
            layer.input_scale.data = torch.tensor(0.05)
        got = sparse(x, index, weights)
        want = per_expert(sparse, x, index, weights)
        torch.testing.assert_close(got, want, rtol=2e-3, atol=2e-3)
        assert (got - before).abs().max() > 0.05
        sparse.gate_up[1].input_scale.fill_(0.0)
        with pytest.raises(ValueError, match=r"input_scale\[1\]\): scale must be finite and positive, got 0.0"):
            sparse(x, index, weights)


def test_experts_no_route_reached_get_zero_gradients_eager_as_compiled():
    # Eager, they got None (the per-expert loop skips them) where the compiled grouped op and the
    # dense module give zeros: AdamW's weight decay then moved them in compiled training only.
    torch._dynamo.reset()
    torch.manual_seed(30)
    sparse = SparseExperts.from_dense(Experts(), dtype=torch.float32, backend="cpu")
    x, weights = torch.randn(1, 64), torch.rand(1, 2)
    index = torch.tensor([[0, 1]])
    grads = []
    for run in (sparse, torch.compile(sparse, fullgraph=True)):
        sparse.zero_grad(set_to_none=True)
        run(x, index, weights).square().sum().backward()
        grads.append({name: p.grad for name, p in sparse.named_parameters()})
    eager, compiled = grads
    for name, grad in eager.items():
        assert grad is not None, name
        torch.testing.assert_close(grad, compiled[name], rtol=1e-5, atol=1e-5)
        idle = name.split(".")[1] in ("2", "3")
        assert (torch.count_nonzero(grad) == 0) == idle, name


@pytest.mark.skipif(not cuda_kernels_available(), reason="needs a CUDA build of sparsegemm._C and a CUDA GPU")
def test_sparse_experts_replay_in_a_cuda_graph_with_new_routes():
    # No host synchronisation in the grouped path: a captured graph replays whatever routing the
    # index and weight tensors hold at replay.
    torch.manual_seed(13)
    sparse = SparseExperts.from_dense(Experts(experts=8), dtype=torch.float16).cuda()
    x = torch.randn(16, 64, device="cuda", dtype=torch.float16)
    index = torch.randint(0, 8, (16, 2), device="cuda")
    weights = torch.rand(16, 2, device="cuda", dtype=torch.float16)
    with torch.no_grad():
        sparse(x, index, weights)  # warm-up: reorders the metadata, builds the tables
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = sparse(x, index, weights)
        for seed in range(3):
            gen = torch.Generator(device="cuda").manual_seed(seed)
            index.copy_(torch.randint(0, 8, (16, 2), device="cuda", generator=gen))
            weights.copy_(torch.rand(16, 2, device="cuda", generator=gen))
            graph.replay()
            torch.testing.assert_close(out, per_expert(sparse, x, index, weights), rtol=2e-2, atol=2e-2)
        # A first call inside the capture: the tables made then are not kept (their reordered
        # metadata is only filled at replay), so an eager call afterwards makes its own.
        fresh = SparseExperts.from_dense(Experts(experts=8), dtype=torch.float16).cuda()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = fresh(x, index, weights)
        graph.replay()
        want = per_expert(fresh, x, index, weights)
        torch.testing.assert_close(out, want, rtol=2e-2, atol=2e-2)
        torch.testing.assert_close(fresh(x, index, weights), want, rtol=2e-2, atol=2e-2)


def test_a_token_routed_twice_to_one_expert_counts_once_with_both_weights():
    # Every route of three tokens to expert 2: five routes, more than the three tokens that bound
    # each group of the launches, unless the repeats are merged into one route each.
    torch.manual_seed(14)
    sparse = SparseExperts.from_dense(Experts(), dtype=torch.float16, backend="simt")
    x = torch.randn(3, 64).half()
    index = torch.tensor([[2, 2], [2, 2], [1, 2]])
    weights = torch.rand(3, 2).half()
    with torch.no_grad():
        got = sparse(x, index, weights)
        want = per_expert(sparse, x, index, weights)
    assert torch.allclose(got.float(), want.float(), rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("backend", ["simt", "cpu"])
@pytest.mark.parametrize("quantize", [None, "int8", "static"])
def test_sparse_experts_compile_whole_through_the_grouped_op(backend, quantize):
    # fullgraph: the routing on the device and the two grouped GEMMs as custom ops, no host read
    # (static INT8 scales included: each expert's rows quantized with its scale on the device).
    torch._dynamo.reset()  # every test's experts recompile SparseExperts.forward: keep under the limit
    torch.manual_seed(18)
    dtype = torch.float16 if backend == "simt" else torch.float32
    sparse = experts(quantize, dtype=dtype, backend=backend)
    x, index, weights = routing(tokens=10)
    x, weights = x.to(dtype), weights.to(dtype)
    compiled = torch.compile(sparse, fullgraph=True, dynamic=False)
    with torch.no_grad():
        got = compiled(x, index, weights)
        want = sparse(x, index, weights)
    # Inductor fuses the weighting and the sum in fp32 (eager rounds the product first): an ulp apart.
    torch.testing.assert_close(got, want, rtol=2e-3, atol=2e-3)


@pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::torch.jit.TracerWarning")
@pytest.mark.parametrize("backend,quantize", [("cpu", None), ("cpu", "int8"), ("simt", None)])
def test_a_jit_traced_mixture_follows_every_routing(backend, quantize):
    # Traced, the per-expert path's host read of the routing was recorded as constants: every later
    # call ran the traced routing (0.2-1.3 off, silently), or failed at another batch size.
    torch.manual_seed(34)
    dtype = torch.float16 if backend == "simt" else torch.float32
    sparse = SparseExperts.from_dense(Experts(), dtype=dtype, backend=backend, quantize=quantize)
    x, index, weights = routing(tokens=6)
    with torch.no_grad():
        traced = torch.jit.trace(sparse, (x.to(dtype), index, weights.to(dtype)), check_trace=False)
        for tokens, seed in ((6, 1), (11, 2), (2, 3)):
            x, index, weights = routing(tokens=tokens, seed=seed)
            x, weights = x.to(dtype), weights.to(dtype)
            torch.testing.assert_close(traced(x, index, weights), sparse(x, index, weights), rtol=1e-5, atol=1e-5)
    sparse.gate_up[0].register_forward_hook(lambda *args: None)  # the per-expert path: refused, not recorded
    with torch.no_grad(), pytest.raises(RuntimeError, match="SparseExperts: torch.jit.trace records only the grouped"):
        torch.jit.trace(sparse, (x, index, weights), check_trace=False)


@pytest.mark.parametrize("dynamic", [False, True])
def test_grouped_linear_compiles_whole(dynamic):
    x, offsets, weights, biases = grouped_case([3, 4], 16, 32, torch.float16, seed=19)
    fn = lambda x: sparsegemm.grouped_linear(x, offsets, weights, biases, activation="relu") * 2  # noqa: E731
    compiled = torch.compile(fn, fullgraph=True, dynamic=dynamic)
    torch.testing.assert_close(compiled(x), fn(x), rtol=0, atol=0)
    torch.testing.assert_close(compiled(x[:-1]), fn(x[:-1]), rtol=0, atol=0)  # one row fewer (M a symbol)


@pytest.mark.parametrize("backend,int8", [("cpu", False), ("cpu", True), ("simt", False), ("simt", True)])
def test_opcheck_grouped_linear(backend, int8):
    x, offsets, weights, biases = grouped_case([3, 0, 4], 16, 32, torch.float16, seed=20, int8=int8)
    kernel_meta = [w.kernel_meta(backend) for w in weights] if backend != "cpu" else []
    torch.library.opcheck(ops._grouped_linear, (x, offsets, [w.values for w in weights], [w.meta for w in weights],
                                                kernel_meta, 32, biases, [w.scale for w in weights] if int8 else [],
                                                [], 0, 4, backend))
    grad_y = torch.randn(x.shape[0], 16).to(x.dtype)
    torch.library.opcheck(ops._grouped_linear_grads, (grad_y, x, offsets, [w.values for w in weights],
                                                  [w.meta for w in weights], kernel_meta, 32, biases,
                                                  [w.scale for w in weights] if int8 else [], [], 1, 4, backend,
                                                  True, False, True))


# ---- what the grouped tables must notice (each found stale once) ---------------------------------------

@pytest.mark.parametrize("how", ["register_buffer", "_buffers", "functional_call"])
def test_an_input_scale_set_past_setattr_is_seen_by_the_grouped_path(how):
    # A static INT8 scale makes the layer quantize with it; the grouped (dynamic) tables made
    # before must not serve it, however the buffer got there. The grouped launch quantizes each
    # expert's rows with its scale, as the expert's layer does (the gated epilogue an ulp apart).
    torch.manual_seed(24)
    sparse = SparseExperts.from_dense(Experts(), dtype=torch.float16, backend="simt", quantize="int8")
    x, index, weights = routing(tokens=8)
    x, weights = x.half(), weights.half()
    scale = torch.tensor(0.2)
    with torch.no_grad():
        dynamic = sparse(x, index, weights)
        if how == "functional_call":
            got = torch.func.functional_call(sparse, {f"gate_up.{e}.input_scale": scale for e in range(4)},
                                             (x, index, weights))
            for layer in sparse.gate_up:
                layer.set_input_scale(0.2)
        else:
            for layer in sparse.gate_up:
                if how == "register_buffer":
                    layer.register_buffer("input_scale", scale.clone())
                else:
                    layer._buffers["input_scale"] = scale.clone()
            got = sparse(x, index, weights)
        want = per_expert(sparse, x, index, weights)
    torch.testing.assert_close(got, want, rtol=2e-3, atol=2e-3)
    assert (got - dynamic).abs().max() > 0.05


class _Shift(torch.nn.Module):
    shift = 0.0

    def forward(self, t):
        return t + self.shift


class _Same(torch.nn.Module):
    def forward(self, t):
        return t


def test_parametrized_layers_take_the_per_expert_path():
    # A parametrized tensor is computed at each access: tables made from one value go stale (a
    # bias) or cannot name it at all (the metadata, no longer a buffer).
    torch.manual_seed(24)
    parametrize = torch.nn.utils.parametrize
    base = SparseExperts.from_dense(Experts(), dtype=torch.float16, backend="simt")
    down = [sparsegemm.SparseLinear.from_dense(torch.nn.Linear(32, 64).half(), backend="simt") for _ in base.down]
    sparse = SparseExperts(list(base.gate_up), down)
    x, index, weights = routing(tokens=8)
    x, weights = x.half(), weights.half()
    shifts = [_Shift() for _ in down]
    for layer, shift in zip(down, shifts):
        parametrize.register_parametrization(layer, "bias", shift)
    with torch.no_grad():
        before = sparse(x, index, weights)
        for shift in shifts:
            shift.shift = 5.0
        got = sparse(x, index, weights)
        assert torch.equal(got, per_expert(sparse, x, index, weights))
        assert not torch.equal(got, before)
        parametrize.register_parametrization(sparse.gate_up[0], "metadata", _Same())
        assert torch.equal(sparse(x, index, weights), got)


def test_an_int8_calibrator_sees_every_expert_in_no_grad():
    # Its forward pre-hooks are on the layers: the grouped launches would never call them.
    from sparsegemm.quant import Int8Calibrator

    torch.manual_seed(24)
    sparse = SparseExperts.from_dense(Experts(), dtype=torch.float16, backend="simt", quantize="int8")
    x, index, weights = routing(tokens=8)
    with torch.no_grad():
        sparse(x.half(), index, weights.half())  # grouped tables made before the hooks
        calibrator = Int8Calibrator(sparse)
        with calibrator:
            sparse(x.half(), index, weights.half())
    scales = calibrator.apply()
    assert len(scales) == 2 * 4 and all(s > 0 for s in scales.values())


def test_metadata_overrides_in_a_loop_are_each_reordered():
    # functional_call with a fresh metadata tensor per call: a freed override's id and address may
    # be taken by the next one, so the tables hold the tensors they name.
    torch.manual_seed(26)
    sparse = SparseExperts.from_dense(Experts(), dtype=torch.float16, backend="simt")
    patterns = [SparseExperts.from_dense(Experts(), dtype=torch.float16).gate_up[2].metadata for _ in range(2)]
    x, index, weights = routing(tokens=8)
    x, weights = x.half(), weights.half()
    with torch.no_grad():
        wants = []
        for meta in patterns:
            sparse.gate_up[2].metadata.copy_(meta)
            wants.append(per_expert(sparse, x, index, weights))
        for t in range(12):
            got = torch.func.functional_call(sparse, {"gate_up.2.metadata": patterns[t % 2].clone()},
                                             (x, index, weights))
            assert torch.allclose(got.float(), wants[t % 2].float(), rtol=2e-2, atol=2e-2), t
        # The layer's own metadata (the last pattern copied in) serves plain calls again.
        assert torch.allclose(sparse(x, index, weights).float(), wants[1].float(), rtol=2e-2, atol=2e-2)


def test_int8_calibrator_fills_an_idle_expert_from_its_siblings():
    # With many experts a few batches leave some unrouted: those take their mixture's largest input
    # of the same projection instead of failing apply() for the whole model.
    from sparsegemm.quant import Int8Calibrator

    torch.manual_seed(27)
    sparse = SparseExperts.from_dense(Experts(experts=8), quantize="int8")
    calibrator = Int8Calibrator(sparse)
    with torch.no_grad(), calibrator:
        sparse(torch.randn(5, 64), torch.randint(0, 4, (5, 2)), torch.rand(5, 2))  # experts 4-7 idle
    scales = calibrator.apply()
    assert len(scales) == 16
    seen = calibrator.amax
    fp32_scale = lambda amax: float(torch.tensor(amax, dtype=torch.float32) / 127)  # noqa: E731
    assert scales["gate_up.6"] == fp32_scale(max(seen[f"gate_up.{e}"] for e in range(4)))
    assert scales["down.5"] == fp32_scale(max(seen[f"down.{e}"] for e in range(4) if f"down.{e}" in seen))
    assert all(sparse.gate_up[e].input_scale is not None for e in range(8))
