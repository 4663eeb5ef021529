"""The public API on backend="simt" (the CUDA kernels in the emulator) agrees with the CPU backend
and the oracles; on a GPU the same checks run with backend="cuda"."""
import pytest
import torch

import sparsegemm
from sparsegemm import oracle
from sparsegemm.nn import SparseLinear
from sparsegemm.quant import quantize_weight
from conftest import integer_input, sparse_weight

KERNEL_DTYPES = [torch.float16, torch.bfloat16]
HAVE_GPU = torch.cuda.is_available() and sparsegemm.info()["cuda_built"]
BACKENDS = ["simt"] + (["cuda"] if HAVE_GPU else [])


def _dev(backend):
    return "cuda" if backend == "cuda" else "cpu"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=str)
@pytest.mark.parametrize("n,k", [(8, 8), (33, 36), (130, 68)])
def test_compress_decompress_match_cpu(backend, dtype, n, k):
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(n * k)).to(dtype)
    w[0, :4] = torch.tensor([1.0, 1.0, 1.0, float("nan")])
    ref = sparsegemm.compress(w, prune=True)
    sw = sparsegemm.compress(w.to(_dev(backend)), prune=True, backend=backend)
    assert torch.equal(sw.values.cpu().view(torch.int16), ref.values.view(torch.int16))
    assert torch.equal(sw.meta.cpu(), ref.meta)
    dense = sparsegemm.decompress(sw, backend=backend).cpu()
    assert torch.equal(dense.view(torch.int16), sparsegemm.decompress(ref).view(torch.int16))
    with pytest.raises(ValueError, match=r"not 2:4 sparse: row 0, group 0"):
        sparsegemm.compress(w.to(_dev(backend)), backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=str)
@pytest.mark.parametrize("m", [1, 7, 17, 70])
def test_linear_exact_and_within_tolerance(backend, dtype, m):
    n, k = 72, 100
    w = sparse_weight(n, k, dtype=dtype, seed=m, integer=True)
    sw = sparsegemm.compress(w).to(_dev(backend))
    x = integer_input(m, k, dtype)
    bias = integer_input(1, n, dtype)[0]
    y = sparsegemm.linear(x.to(_dev(backend)), sw, bias.to(_dev(backend)), activation="relu", backend=backend)
    assert torch.equal(y.cpu(), torch.from_numpy(oracle.linear(x, w, bias, "relu")).to(dtype))
    gen = torch.Generator().manual_seed(m)
    xf = torch.randn(m, k, generator=gen).to(dtype)
    wf = sparsegemm.compress(torch.randn(n, k, generator=gen).to(dtype), prune=True)
    y = sparsegemm.linear(xf.to(_dev(backend)), wf.to(_dev(backend)), activation="silu", backend=backend)
    oracle.assert_close_to_oracle(y.cpu(), xf, sparsegemm.decompress(wf), None, "silu")


def test_sparse_linear_on_simt_backend_reorders_once():
    lin = torch.nn.Linear(64, 48).half()
    sl = SparseLinear.from_dense(lin, backend="simt")
    x = torch.randn(3, 64).half()
    y1 = sl(x)
    cached = dict(sl._kernel_meta.entries)
    y2 = sl(x)
    assert len(cached) == 1 and all(sl._kernel_meta.get(key) is value for key, value in cached.items())
    assert torch.equal(y1, y2)
    oracle.assert_close_to_oracle(y1, x, sl.dense_weight(), lin.bias.detach())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("quantize", [False, True])
@pytest.mark.parametrize("change", ["copy_", "assign", "data", "swap_tensors"])
def test_a_sparse_tensor_whose_metadata_changed_is_reordered_again(backend, quantize, change):
    # The reordered copy cached on a SparseTensor24 answers only for the metadata it was made
    # from: an in-place edit, an assigned tensor, a .data swap or swap_tensors makes it again.
    gen = torch.Generator().manual_seed(31)
    make = quantize_weight if quantize else sparsegemm.compress
    sw, other = (make(torch.randn(32, 64, generator=gen).half().to(_dev(backend)), prune=True) for _ in range(2))
    x = torch.randn(4, 64, generator=gen).half().to(_dev(backend))
    before = sparsegemm.linear(x, sw, backend=backend)
    if change == "copy_":
        sw.meta.copy_(other.meta)
    elif change == "assign":
        sw.meta = other.meta.clone()
    elif change == "data":
        sw.meta.data = other.meta.clone()
    else:
        torch.utils.swap_tensors(sw.meta, other.meta.clone())
    got = sparsegemm.linear(x, sw, backend=backend)
    want = sparsegemm.linear(x.cpu(), sw.cpu(), backend="cpu")
    assert not torch.equal(before, got)
    assert torch.allclose(got.cpu().float(), want.float(), rtol=1e-2, atol=1e-2)


def test_metadata_reassigned_in_a_loop_is_reordered_each_time():
    # A freed metadata tensor's id and address may be taken by the next one (version 0 both): the
    # cache must hold the tensor it was made from, not name it by id.
    gen = torch.Generator().manual_seed(32)
    sw = sparsegemm.compress(torch.randn(128, 256, generator=gen).half(), prune=True)
    patterns = [sparsegemm.compress(torch.randn(128, 256, generator=gen).half(), prune=True).meta for _ in range(2)]
    x = torch.randn(1, 256, generator=gen).half()
    for t in range(8):
        sw.meta = None
        sw.meta = patterns[t % 2].clone()
        assert torch.allclose(sparsegemm.linear(x, sw, backend="simt").float(),
                              sparsegemm.linear(x, sw, backend="cpu").float(), rtol=1e-2, atol=1e-2), t


class _Same(torch.nn.Module):
    def forward(self, t):
        return t


@pytest.mark.parametrize("quantize", [None, "int8"])
def test_sparse_linear_with_parametrized_metadata_runs_on_the_kernels(quantize):
    lin = torch.nn.Linear(64, 32).half()
    simt = SparseLinear.from_dense(lin, backend="simt", quantize=quantize)
    cpu = SparseLinear.from_dense(lin, quantize=quantize)
    torch.nn.utils.parametrize.register_parametrization(simt, "metadata", _Same())
    x = torch.randn(3, 64).half()
    with torch.no_grad():
        for _ in range(2):  # the second call once found the eager plan looking for the buffer
            assert torch.allclose(simt(x).float(), cpu(x).float(), rtol=1e-2, atol=1e-2)


def test_a_values_dtype_view_is_not_served_by_the_eager_plan():
    # Same object, same storage, another dtype: the plan made for fp16 values must not launch.
    layer = SparseLinear.from_dense(torch.nn.Linear(64, 32).half(), backend="simt")
    x = torch.randn(4, 64).half()
    with torch.no_grad():
        layer(x)
        layer.values.data = layer.values.data.view(torch.bfloat16)
        with pytest.raises(TypeError, match="x dtype float16 does not match the weight dtype bfloat16"):
            layer(x)


def test_simt_rejects_fp32_and_gpu_only_needs_cuda():
    sw = sparsegemm.compress(torch.randn(8, 8), prune=True)
    with pytest.raises(TypeError, match=r"linear: x must have dtype in \(float16, bfloat16\), got float32"):
        sparsegemm.linear(torch.randn(2, 8), sw, backend="simt")


def test_sizes_past_32_bit_indexing_are_refused_before_any_work():
    sw = sparsegemm.compress(torch.randn(8, 4096).half(), prune=True)
    x = torch.zeros(1, 4096, dtype=torch.float16).expand(2**19 + 1, 4096)  # M*K > 2^31, no memory behind it
    with pytest.raises(ValueError, match=r"linear: M\*K = 2147487744 exceeds 32-bit indexing"):
        sparsegemm.linear(x, sw, backend="simt")


def test_kernel_entry_points_refuse_a_dtype_they_have_no_kernel_for():
    from sparsegemm import _C

    # int8 (code 3) has no decompress kernel: the C++ boundary raises instead of writing nothing.
    with pytest.raises(ValueError, match=r"decompress: dtype code 3 has no kernel here"):
        _C.simt_decompress(4, 8, 0, 0, 0, 3)


# ---- the ops themselves check what the C++ side takes on trust ----------------------------------

def _op_cases():
    """(label, call, message) for torch.ops.sparsegemm.* called directly with operands that disagree:
    each once crashed the process or read past a buffer (the checks lived in the functional API)."""
    O = torch.ops.sparsegemm
    sw = sparsegemm.compress(torch.randn(8, 16), prune=True)
    swh = sparsegemm.compress(torch.randn(8, 16).half(), prune=True)
    km = sparsegemm.ops.reorder_meta(swh.meta, 16, "simt")
    q = quantize_weight(torch.randn(8, 16))
    kq = sparsegemm.ops.reorder_meta(q.meta, 16, "simt", s8=True)
    x, xh = torch.randn(2, 16), torch.randn(2, 16).half()
    return [
        ("linear k", lambda: O.linear(x, sw.values, sw.meta, None, 1 << 26, None, 0, "cpu"), r"values must be \[N, 33554432\]"),
        ("linear bias", lambda: O.linear(x, sw.values, sw.meta, None, 16, torch.zeros(1), 0, "cpu"), r"bias must be"),
        ("linear narrow x", lambda: O.linear(x[:, :8], sw.values, sw.meta, None, 16, None, 0, "cpu"), r"x must be \[M, 16\]"),
        ("linear dtype", lambda: O.linear(x, swh.values, swh.meta, None, 16, None, 0, "cpu"), r"values must be torch.float32"),
        ("linear 1-D x", lambda: O.linear(xh[0], swh.values, swh.meta, km, 16, None, 0, "simt"), r"x must be \[M, 16\]"),
        ("linear s8 layout", lambda: O.linear(xh, swh.values, swh.meta, kq, 16, None, 0, "simt"), r"kernel_meta must be"),
        ("linear misaligned", lambda: O.linear(xh, swh.values, swh.meta, torch.cat([km[:1], km])[1:], 16, None, 0,
                                               "simt"), r"16-byte aligned"),
        ("decompress k", lambda: O.decompress(sw.values, sw.meta, 1 << 24, "cpu"), r"values must be \[N, 8388608\]"),
        ("reorder k", lambda: O.reorder_meta(sw.meta, 1 << 24, "simt", False), r"meta must be uint8 \[8, 2097152\]"),
        ("s8 w_scale", lambda: O.linear_s8(torch.zeros(2, 16, dtype=torch.int8), torch.ones(2), q.values, q.meta, None,
                                           q.scale[:1].clone(), 16, None, 0, torch.float32, "cpu"), r"w_scale must be"),
        ("s8 x_scale", lambda: O.linear_s8(torch.zeros(2, 16, dtype=torch.int8), torch.ones(1), q.values, q.meta, None,
                                           q.scale, 16, None, 0, torch.float32, "cpu"), r"x_scale must be"),
        ("s8 dynamic", lambda: O.linear_s8_dynamic(xh, q.values, kq, q.scale[:2].clone(), None, 0, torch.float16, "simt"),
         r"w_scale must be"),
        ("grouped offsets", lambda: O.grouped_linear(x, torch.tensor([0, 2], dtype=torch.int32), [sw.values], [sw.meta],
                                                     [], 16, [], [], [], 0, 2, "cpu"), r"row_offsets must be a contiguous int64"),
        ("grouped k", lambda: O.grouped_linear(x, torch.tensor([0, 2]), [sw.values], [sw.meta], [], 1 << 24, [], [], [],
                                               0, 2, "cpu"), r"\(group 0\): values must be"),
        ("grouped rows", lambda: O.grouped_linear(x, torch.tensor([0, 1, 2]), [sw.values, sw.values[:4]],
                                                  [sw.meta, sw.meta[:4]], [], 16, [], [], [], 0, 2, "cpu"),
         r"values\[1\] must match values\[0\]"),
        ("conv channels", lambda: O.conv2d(torch.randn(1, 4, 4, 3).half(), swh.values, swh.meta, km, [2, 2], [1, 1],
                                           [0, 0], [1, 1], None, 0, "simt"), r"values must be \[N, 6\]"),
        ("backend", lambda: O.decompress(sw.values, sw.meta, 16, "gpu"), r"backend must be one of"),
    ]


@pytest.mark.parametrize("index", range(17))
def test_the_ops_refuse_operands_that_disagree(index):
    label, call, message = _op_cases()[index]
    with pytest.raises(ValueError, match=message):
        call()


def test_the_ops_refuse_dtypes_their_kernels_lack():
    # The 16-bit ops passed values of x's dtype unchecked and the INT8 ones any output dtype: an fp32
    # call reached C++ ("dtype code 0 has no kernel here"), an INT8 grouped one after quantizing.
    O = torch.ops.sparsegemm
    sw = sparsegemm.compress(torch.randn(8, 16), prune=True)
    km = sparsegemm.ops.reorder_meta(sw.meta, 16, "simt")
    q = quantize_weight(torch.randn(8, 16))
    kq = sparsegemm.ops.reorder_meta(q.meta, 16, "simt", s8=True)
    x = torch.randn(2, 16)
    for call, message in (
            (lambda: O.linear(x, sw.values, sw.meta, km, 16, None, 0, "simt"),
             r"sparsegemm.linear: values must have dtype in \(float16, bfloat16\), got float32"),
            (lambda: O.conv2d(torch.randn(1, 4, 4, 16), sw.values, sw.meta, km, [1, 1], [1, 1], [0, 0], [1, 1], None,
                              0, "simt"), r"sparsegemm.conv2d: values must have dtype in \(float16, bfloat16\)"),
            (lambda: O.linear_s8_dynamic(x, q.values, kq, q.scale, None, 0, torch.float32, "simt"),
             r"linear_s8_dynamic: the output dtype must be one of the simt backend's \(float16, bfloat16\), got "
             r"float32"),
            (lambda: O.linear_s8(torch.zeros(2, 16, dtype=torch.int8), torch.ones(2), q.values, q.meta, None, q.scale,
                                 16, None, 0, torch.float64, "cpu"),
             r"linear_s8: the output dtype must be one of the cpu backend's \(float32, float16, bfloat16\), got "
             r"float64"),
            (lambda: O.grouped_linear(x, torch.tensor([0, 2]), [q.values], [q.meta], [kq], 16, [], [q.scale], [], 0, 2,
                                      "simt"), r"grouped_linear \(group 0\): the output dtype must be one of the simt")):
        with pytest.raises(TypeError, match=message):
            call()


def test_a_sparse_tensor_built_unchecked_still_has_its_sizes_checked():
    # validate=False skips reading the data (the nibble scan); the kernels trust the sizes, which a
    # wrong shape once turned into a crash of sparsegemm.linear / decompress.
    with pytest.raises(ValueError, match=r"SparseTensor24: values must have shape \(4, 2097152\)"):
        sparsegemm.SparseTensor24(torch.randn(4, 2), torch.full((4, 1), 0x44, dtype=torch.uint8), (4, 1 << 22),
                                  validate=False)
