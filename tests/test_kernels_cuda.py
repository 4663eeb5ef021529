"""The CUDA kernels on a GPU (sparsegemm._C.cuda_*): the emulator test matrix plus large shapes.
Oracles and shapes come from test_kernels_simt.py, so both backends answer to the same numbers.
Skips without a CUDA build or a GPU; nothing touches CUDA at import time."""
import numpy as np
import pytest
import torch

from sparsegemm import _C
from test_kernels_simt import (ACT_CODES, DECODE, DTYPE_CODES, GEMM_SHAPES, LARGE_M, activation, padded_k,
                               reference_compress, reference_decompress, sparse_weight)

pytestmark = pytest.mark.skipif(
    not (_C.build_info()["cuda_built"] and torch.cuda.is_available()),
    reason="needs a CUDA build of sparsegemm._C and a CUDA GPU (torch.cuda.is_available())")


def stream():
    return torch.cuda.current_stream().cuda_stream


def cuda_compress(w, prune=True):
    n, k = w.shape
    values = torch.full((n, padded_k(k) // 2), 7, dtype=w.dtype, device="cuda")
    meta = torch.full((n, (padded_k(k) // 4 + 1) // 2), 0xFF, dtype=torch.uint8, device="cuda")
    bad = torch.zeros(1, dtype=torch.int64, device="cuda")
    _C.cuda_compress(n, k, w.data_ptr(), w.stride(0), values.data_ptr(), meta.data_ptr(), DTYPE_CODES[w.dtype],
                     prune, bad.data_ptr(), stream())
    return values, meta, int(bad.item())


def cuda_gemm(x, values, meta, n, k, bias=None, act="none", config=-1, split_k=0):
    m = x.shape[0]
    kmeta = torch.empty(_C.cuda_kernel_meta_bytes(n, k), dtype=torch.uint8, device="cuda")
    _C.cuda_reorder_meta(meta.data_ptr(), kmeta.data_ptr(), n, k, stream())
    y = torch.full((m, n), float("nan"), dtype=x.dtype, device="cuda")
    ws_bytes = _C.cuda_gemm_workspace_bytes(m, n, k, config, split_k)
    ws = torch.empty(max(ws_bytes, 4), dtype=torch.uint8, device="cuda")
    _C.cuda_gemm(m, n, k, x.data_ptr(), x.stride(0), values.data_ptr(), kmeta.data_ptr(),
                 0 if bias is None else bias.data_ptr(), y.data_ptr(), y.stride(0), DTYPE_CODES[x.dtype],
                 ACT_CODES[act], ws.data_ptr() if ws_bytes else 0, config, split_k, stream())
    torch.cuda.synchronize()
    return y


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("n,k", [(3, 4), (5, 36), (4, 70), (17, 264), (1024, 4100)])
def test_compress_decompress_match_reference(dtype, n, k):
    gen = torch.Generator().manual_seed(n + k)
    w = (torch.randint(-2, 3, (n, k), generator=gen).float() * 0.5).to(dtype)
    w[0, 0] = float("nan")
    w[-1, -1] = -0.0
    values, meta, bad = cuda_compress(w.cuda(), prune=True)
    ref_values, ref_meta, _ = reference_compress(w)
    assert bad == -1
    assert torch.equal(values.cpu().view(torch.uint8), ref_values.contiguous().view(torch.uint8))
    np.testing.assert_array_equal(meta.cpu().numpy(), ref_meta)
    out = torch.empty((n, k), dtype=dtype, device="cuda")
    _C.cuda_decompress(n, k, values.data_ptr(), meta.data_ptr(), out.data_ptr(), DTYPE_CODES[dtype], stream())
    ref = reference_decompress(values.cpu(), meta.cpu().numpy(), k)
    assert torch.equal(out.cpu().view(torch.uint8), ref.view(torch.uint8))


def test_strict_mode_reports_smallest_bad_group():
    gen = torch.Generator().manual_seed(5)
    w = sparse_weight(6, 44, torch.float16, gen)
    assert cuda_compress(w.cuda(), prune=False)[2] == -1
    w[4, 8:11] = 1
    w[2, 40:44] = torch.tensor([1, 2, float("nan"), 3])
    assert cuda_compress(w.cuda(), prune=False)[2] == 2 * 11 + 10


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("config", [LARGE_M, DECODE])
@pytest.mark.parametrize("m,n,k", GEMM_SHAPES)
def test_gemm_exact_small_integers(dtype, config, m, n, k):
    gen = torch.Generator().manual_seed(m * 7 + n * 13 + k)
    w = sparse_weight(n, k, dtype, gen, -2, 3)
    x = torch.randint(-2, 3, (m, k), generator=gen).to(dtype)
    bias = torch.randint(-3, 4, (n,), generator=gen).to(dtype)
    values, meta, _ = cuda_compress(w.cuda(), prune=False)
    y = cuda_gemm(x.cuda(), values, meta, n, k, bias=bias.cuda(), act="relu", config=config)
    assert torch.equal(y.cpu(), torch.relu(x.double() @ w.double().T + bias.double()).to(dtype))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("m,n,k,config,split_k", [
    (1, 8192, 8192, -1, 0), (16, 4096, 4096, -1, 0), (8, 4096, 4096, DECODE, 7),
    (2048, 4096, 4096, -1, 0), (777, 3000, 1028, LARGE_M, 0)])
@pytest.mark.parametrize("act", ["none", "gelu"])
def test_gemm_large_within_twice_dense_error(dtype, m, n, k, config, split_k, act):
    gen = torch.Generator(device="cuda").manual_seed(m + n + k)
    w_dense = torch.randn(n, k, generator=gen, device="cuda").to(dtype)
    values, meta, _ = cuda_compress(w_dense, prune=True)
    w = torch.empty_like(w_dense)
    _C.cuda_decompress(n, k, values.data_ptr(), meta.data_ptr(), w.data_ptr(), DTYPE_CODES[dtype], stream())
    x = torch.randn(m, k, generator=gen, device="cuda").to(dtype)
    bias = torch.randn(n, generator=gen, device="cuda").to(dtype)
    y = cuda_gemm(x, values, meta, n, k, bias=bias, act=act, config=config, split_k=split_k)
    exact = activation(x.double() @ w.double().T + bias.double(), act)
    dense = activation((torch.matmul(x, w.T) + bias).double(), act)
    base_err = (dense - exact).abs().max().item()
    err = (y.double() - exact).abs().max().item()
    assert err <= 2 * base_err + 1e-6, (err, base_err)


# ---- INT8 (quantize.cuh, gemm_sp_s8.cuh): the emulator's oracles, plus large shapes ----------------
from test_int8_kernels_simt import (S8_SHAPES, random_scales, reference_gemm_s8,  # noqa: E402
                                    reference_kernel_meta_s8, reference_quantize_rows, sparse_int8_weight)


def cuda_gemm_s8(x_q, values, meta, w_scale, x_scale, n, k, out_dtype, bias=None, act="none", config=-1, split_k=0):
    """All tensors on the GPU; meta is the logical E (reordered here)."""
    m = x_q.shape[0]
    kmeta = torch.empty(_C.cuda_kernel_meta_bytes_s8(n, k), dtype=torch.uint8, device="cuda")
    _C.cuda_reorder_meta_s8(meta.data_ptr(), kmeta.data_ptr(), n, k, stream())
    y = torch.full((m, n), float("nan"), dtype=out_dtype, device="cuda")
    ws_bytes = _C.cuda_gemm_s8_workspace_bytes(m, n, k, config, split_k)
    ws = torch.empty(max(ws_bytes, 4), dtype=torch.uint8, device="cuda")
    _C.cuda_gemm_s8(m, n, k, x_q.data_ptr(), x_q.stride(0), values.data_ptr(), kmeta.data_ptr(), w_scale.data_ptr(),
                    x_scale.data_ptr(), 0 if bias is None else bias.data_ptr(), y.data_ptr(), y.stride(0),
                    DTYPE_CODES[out_dtype], ACT_CODES[act], ws.data_ptr() if ws_bytes else 0, config, split_k,
                    stream())
    torch.cuda.synchronize()
    return y


@pytest.mark.parametrize("n,k", [(20, 100), (130, 200), (4096, 4100)])
def test_reorder_meta_s8_layout(n, k):
    _, _, meta = sparse_int8_weight(n, k, torch.Generator().manual_seed(n + k))
    out = torch.empty(_C.cuda_kernel_meta_bytes_s8(n, k), dtype=torch.uint8, device="cuda")
    _C.cuda_reorder_meta_s8(torch.from_numpy(meta).cuda().data_ptr(), out.data_ptr(), n, k, stream())
    np.testing.assert_array_equal(out.cpu().numpy().view(np.uint32), reference_kernel_meta_s8(meta, n, k))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("m,k", [(1, 4), (17, 1000), (300, 4096)])
def test_quantize_rows_matches_reference(dtype, m, k):
    x = (torch.randn(m, k, generator=torch.Generator().manual_seed(m + k)) * 3).to(dtype)
    x[0, 1] = float("nan")
    if m > 1:
        x[1] = 0
    x_q = torch.empty((m, k), dtype=torch.int8, device="cuda")
    x_scale = torch.empty(m, dtype=torch.float32, device="cuda")
    _C.cuda_quantize_rows(m, k, x.cuda().data_ptr(), k, DTYPE_CODES[dtype], x_q.data_ptr(), x_scale.data_ptr(),
                          stream())
    ref_q, ref_scale = reference_quantize_rows(x)
    # Values bit for bit, NaN by position: the GPU's NaN is 0x7fffffff, the host's keeps its payload.
    np.testing.assert_array_equal(x_scale.cpu().numpy(), ref_scale)
    np.testing.assert_array_equal(x_q.cpu().numpy(), ref_q)


@pytest.mark.parametrize("out_dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("m,n,k,config,split_k", [(m, n, k, c, 0) for m, n, k in S8_SHAPES for c in (LARGE_M, DECODE)]
                         + [(1, 8192, 8192, -1, 0), (16, 4096, 4096, -1, 0), (8, 4096, 4096, DECODE, 7),
                            (2048, 4096, 4096, -1, 0), (777, 3000, 1028, LARGE_M, 0)])
def test_gemm_s8_bit_exact(out_dtype, m, n, k, config, split_k):
    gen = torch.Generator().manual_seed(m + n + k)
    wq, values, meta = sparse_int8_weight(n, k, gen)
    x_q = torch.randint(-127, 128, (m, k), generator=gen).to(torch.int8)
    w_scale, x_scale = random_scales(n, gen), random_scales(m, gen)
    bias = torch.randn(n, generator=gen).to(out_dtype)
    y = cuda_gemm_s8(x_q.cuda(), torch.from_numpy(values).cuda(), torch.from_numpy(meta).cuda(),
                     torch.from_numpy(w_scale).cuda(), torch.from_numpy(x_scale).cuda(), n, k, out_dtype,
                     bias=bias.cuda(), config=config, split_k=split_k)
    ref = reference_gemm_s8(x_q.numpy(), wq, w_scale, x_scale, bias, "none", out_dtype)
    assert torch.equal(y.cpu().view(torch.int16), ref.view(torch.int16))


@pytest.mark.parametrize("act", ["relu", "gelu", "silu"])
def test_gemm_s8_activation_within_one_ulp(act):
    m, n, k = 64, 520, 1032
    gen = torch.Generator().manual_seed(3)
    wq, values, meta = sparse_int8_weight(n, k, gen)
    x_q = torch.randint(-127, 128, (m, k), generator=gen).to(torch.int8)
    w_scale, x_scale = random_scales(n, gen), random_scales(m, gen)
    y = cuda_gemm_s8(x_q.cuda(), torch.from_numpy(values).cuda(), torch.from_numpy(meta).cuda(),
                     torch.from_numpy(w_scale).cuda(), torch.from_numpy(x_scale).cuda(), n, k, torch.float16, act=act)
    ref = reference_gemm_s8(x_q.numpy(), wq, w_scale, x_scale, None, act, torch.float16)
    if act == "relu":
        assert torch.equal(y.cpu().view(torch.int16), ref.view(torch.int16))
        return
    # The device's erff / expf may be 2 fp32 ulps off (CUDA math docs), which (1 + erf(v)) near
    # -1 amplifies: allow 1 f16 ulp plus 2^-22 |v| (v: the oracle's value before the activation).
    v = reference_gemm_s8(x_q.numpy(), wq, w_scale, x_scale, None, "none", torch.float32).double()
    tol = ref.double().abs() * 2.0**-10 + 2.0**-24 + v.abs() * 2.0**-22
    assert torch.all((y.cpu().double() - ref.double()).abs() <= tol)


# ---- implicit-GEMM convolution (conv_sp.cuh): the emulator's geometries, plus a large layer -------
from test_conv_kernels import GEOMETRIES, geometry_id, make_input, make_layer, reference  # noqa: E402


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("geometry", GEOMETRIES, ids=geometry_id)
def test_conv_exact_small_integers(dtype, geometry):
    b, cin, cout, hw, kernel, stride, padding, dilation = geometry
    layer = make_layer(cin, cout, kernel, stride, padding, dilation, dtype, integer=True)
    x = make_input(b, cin, hw, dtype, integer=True)
    ref = reference(layer, x).to(dtype)
    layer = layer.cuda()
    layer.backend = None
    y = layer(x.cuda())
    assert y.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(y.cpu(), ref)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("batch,cin,cout,hw,kernel,stride,padding,dilation", [
    (8, 64, 128, (56, 56), 3, 1, 1, 1), (4, 256, 512, (28, 28), 1, 2, 0, 1), (2, 3, 64, (224, 224), 7, 2, 3, 1),
    (1, 128, 96, (17, 23), 3, 1, 2, 2)])
def test_conv_large_within_twice_dense_error(dtype, batch, cin, cout, hw, kernel, stride, padding, dilation):
    layer = make_layer(cin, cout, kernel, stride, padding, dilation, dtype, integer=False, seed=7).cuda()
    layer.backend = None
    x = make_input(batch, cin, hw, dtype, integer=False, seed=8).cuda().to(memory_format=torch.channels_last)
    exact = reference(layer, x)
    dense = reference(layer, x, dtype).double()  # cuDNN at the same dtype
    base_err = (dense - exact).abs().max().item()
    err = (layer(x).double() - exact).abs().max().item()
    assert err <= 2 * base_err + 1e-6, (err, base_err)
