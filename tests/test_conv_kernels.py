"""The implicit-GEMM 2:4 convolution (csrc/cuda/conv_sp.cuh) on every kernel backend (the `kernels`
fixture: the SIMT emulator always, the GPU where there is one); the op-level checks (autograd,
opcheck, errors, allocations) run on the emulator, large layers in test_kernels_cuda.py.

Oracle: torch.nn.functional.conv2d in float64 on the pruned dense weight (SparseConv2d's
dense_weight()). Exact on small-integer data; otherwise within twice the error of the dense
low-precision convolution. Shapes are small (the emulator runs every thread as a fiber) and pick
the cases that break implicit-GEMM addressing: Cin % 8 != 0 (element loads), taps in the zero
padding, stride and dilation, odd H/W, Cout and M off the tile sizes, split-K.
"""
import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from sparsegemm import _C, ops
from sparsegemm.nn import CPU_TORCH_CONV_MIN_M, SparseConv2d, _torch_conv_wins
from test_kernels_simt import DECODE, DECODE_TMA, LARGE_M, WGMMA, WGMMA_TMA, WGMMA_TMA_SPLIT, KernelBackend

KERNEL_DTYPES = [torch.float16, torch.bfloat16]

# (batch, cin, cout, (H, W), kernel, stride, padding, dilation)
GEOMETRIES = [
    (1, 8, 16, (5, 7), 1, 1, 0, 1),
    (2, 16, 24, (7, 9), 3, 1, 1, 1),
    (2, 24, 20, (9, 7), 3, 2, 1, 1),
    (1, 3, 16, (7, 5), 3, 2, 1, 1),            # RGB stem: K = 27, predicated element loads
    (2, 16, 12, (5, 11), (1, 3), 1, (0, 2), 2),
    (1, 8, 40, (9, 9), 3, 1, 0, 2),
    (2, 3, 8, (6, 5), (1, 3), 2, (0, 2), 1),
    (1, 24, 136, (11, 13), 3, 1, 1, 1),        # M = 143 and N = 136: a second tile in both
    (1, 32, 136, (7, 7), 3, 1, 1, 1),          # K = 288: the fast Wc copies of a whole 128-row block
    (1, 32, 136, (3, 3), 3, 1, 1, 1),          # the same at M = 9 (decode tile)
]


def geometry_id(g):
    b, cin, cout, hw, k, s, p, d = g
    return f"b{b}-cin{cin}-cout{cout}-{hw[0]}x{hw[1]}-k{k}-s{s}-p{p}-d{d}"


def make_layer(cin, cout, kernel, stride, padding, dilation, dtype, *, integer, seed=0, bias=True):
    """A SparseConv2d (backend="simt") pruned from a random nn.Conv2d."""
    gen = torch.Generator().manual_seed(seed)
    conv = torch.nn.Conv2d(cin, cout, kernel, stride=stride, padding=padding, dilation=dilation, bias=bias)
    with torch.no_grad():
        if integer:
            conv.weight.copy_(torch.randint(-3, 4, conv.weight.shape, generator=gen).float())
            if bias:
                conv.bias.copy_(torch.randint(-3, 4, conv.bias.shape, generator=gen).float())
        else:
            conv.weight.copy_(torch.randn(conv.weight.shape, generator=gen))
            if bias:
                conv.bias.copy_(torch.randn(conv.bias.shape, generator=gen))
    return SparseConv2d.from_dense(conv, dtype=dtype, backend="simt")


def make_input(batch, cin, hw, dtype, *, integer, seed=1):
    gen = torch.Generator().manual_seed(seed)
    if integer:
        return torch.randint(-3, 4, (batch, cin, *hw), generator=gen).to(dtype)
    return torch.randn(batch, cin, *hw, generator=gen).to(dtype)


def reference(layer, x, dtype=torch.float64):
    bias = None if layer.bias is None else layer.bias.detach().to(dtype)
    return F.conv2d(x.to(dtype), layer.dense_weight().to(dtype), bias, layer.stride, layer.padding, layer.dilation)


def assert_within_twice_dense_error(layer, x):
    """layer(x) against the float64 convolution, within twice the error of torch's own conv2d at
    x's dtype on x's device (cuDNN on a GPU)."""
    exact = reference(layer, x)
    dense = reference(layer, x, x.dtype).double()
    base_err = (dense - exact).abs().max().item()
    err = (layer(x).double() - exact).abs().max().item()
    assert err <= 2 * base_err, (err, base_err)


@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=["f16", "bf16"])
@pytest.mark.parametrize("geometry", GEOMETRIES, ids=geometry_id)
def test_exact_on_small_integers(kernels, dtype, geometry):
    b, cin, cout, hw, kernel, stride, padding, dilation = geometry
    layer = make_layer(cin, cout, kernel, stride, padding, dilation, dtype, integer=True)
    x = make_input(b, cin, hw, dtype, integer=True)
    ref = reference(layer, x)
    y = kernels.module(layer)(kernels.to_device(x))
    assert y.shape == ref.shape and y.dtype == dtype
    assert y.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(y.cpu().double(), ref.to(dtype).double())


@pytest.mark.parametrize("geometry", GEOMETRIES, ids=geometry_id)
def test_matches_the_cpu_path(kernels, geometry):
    b, cin, cout, hw, kernel, stride, padding, dilation = geometry
    layer = make_layer(cin, cout, kernel, stride, padding, dilation, torch.float16, integer=True, seed=3)
    x = make_input(b, cin, hw, torch.float16, integer=True, seed=4)
    y_kernel = kernels.module(layer)(kernels.to_device(x)).cpu()
    layer = layer.cpu()
    layer.backend = "cpu"  # im2col from a strided NHWC view + the CPU sparse GEMM
    assert torch.equal(y_kernel, layer(x))


@pytest.mark.parametrize("grad", [False, True], ids=["inference", "autograd"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["f32", "f16", "bf16"])
@pytest.mark.parametrize("geometry", GEOMETRIES, ids=geometry_id)
def test_cpu_backend_exact_on_small_integers(monkeypatch, geometry, dtype, grad):
    # The CPU backend gathers the patch matrix from a strided NHWC view of x; in inference a run of
    # output rows (or of one row's pixels) at a time into a reused scratch, which 600-byte chunks
    # make a few pixels of every image here, so every chunk boundary is crossed. NCHW and
    # channels_last input alike.
    monkeypatch.setattr(ops, "_CPU_TILE_BYTES", 600)
    b, cin, cout, hw, kernel, stride, padding, dilation = geometry
    layer = make_layer(cin, cout, kernel, stride, padding, dilation, dtype, integer=True, seed=7)
    layer.backend = "cpu"
    x = make_input(b, cin, hw, dtype, integer=True, seed=8)
    for x_in in (x, x.to(memory_format=torch.channels_last)):
        with torch.set_grad_enabled(grad):
            y = layer(x_in)
        assert y.requires_grad == grad
        assert torch.equal(y.double(), reference(layer, x))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["f32", "bf16", "f16"])
def test_cpu_backend_large_m_takes_torchs_convolution_where_the_gemm_would_go_dense(monkeypatch, dtype):
    # From CPU_TORCH_CONV_MIN_M output pixels, in a dtype torch convolves natively on this CPU,
    # inference runs torch's convolution on the weight decompressed into the reused scratch (no
    # patch gather); elsewhere (fp16 without native dot products) the patch GEMM.
    layer = make_layer(16, 24, 3, 2, 1, 2, dtype, integer=True, seed=15)
    layer.backend = "cpu"
    x = make_input(3, 16, (21, 19), dtype, integer=True, seed=16)  # M = 3 x 10 x 9 = 270
    assert 270 >= CPU_TORCH_CONV_MIN_M
    dense_conv = _torch_conv_wins(dtype, 16 * 9)
    gemm_calls, pads = [], []
    real = type(layer)._sparse_linear
    monkeypatch.setattr(type(layer), "_sparse_linear", lambda self, cols: (gemm_calls.append(cols.shape),
                                                                           real(self, cols))[1])
    real_pad = torch.nn.functional.pad
    monkeypatch.setattr(torch.nn.functional, "pad", lambda t, *a, **kw: (pads.append(t.shape),
                                                                      real_pad(t, *a, **kw))[1])
    with torch.no_grad():
        y = layer(x.to(memory_format=torch.channels_last))
    assert torch.equal(y.double(), reference(layer, x))
    assert (gemm_calls == []) == dense_conv
    # The padding of 1: torch's convolution pads by itself, so no padded copy of x is made for it.
    assert (pads == []) == dense_conv
    other = torch.bfloat16 if dtype == torch.float32 else torch.float32
    with pytest.raises(TypeError, match="SparseConv2d: x dtype .* does not match the weight dtype"):
        with torch.no_grad():
            layer(x.to(other))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def test_cpu_backend_torchs_convolution_on_one_input_channel(dtype):
    # torch 2.13 read the [N, 1, kh, kw] weight's strides as the other memory format (both fit a
    # size-1 dim): sums off by 1.1 here, by up to 1e29 elsewhere. One channel keeps the patch GEMM.
    layer = make_layer(1, 1, (1, 2), (1, 2), 0, 1, dtype, integer=True, seed=31)
    layer.backend = "cpu"
    x = make_input(40, 1, (5, 3), dtype, integer=True, seed=32)  # M = 40 x 5 x 1 = 200
    assert 200 >= CPU_TORCH_CONV_MIN_M
    with torch.inference_mode():
        assert torch.equal(layer(x).double(), reference(layer, x))


def test_unbatched_input_and_empty_maps_as_torch_takes_them():
    # nn.Conv2d takes an unbatched [C, H, W] input (SparseConv1d took its [C, L]); an empty H or W
    # with padding gave an output of the bias alone where torch refuses it.
    import sparsegemm

    layer = make_layer(8, 4, 3, 1, 1, 1, torch.float32, integer=True, seed=33)
    layer.backend = "cpu"
    x = make_input(1, 8, (5, 6), torch.float32, integer=True, seed=34)
    assert torch.equal(layer(x[0]), layer(x)[0]) and layer(x[0]).shape == (4, 5, 6)
    with pytest.raises(ValueError, match=r"SparseConv2d: x has an empty spatial size \(0, 4\): as nn.Conv2d, "
                                         r"only an empty batch is supported"):
        layer(torch.zeros(1, 8, 0, 4))
    assert layer(torch.zeros(0, 8, 5, 6)).shape == (0, 4, 5, 6)
    one_d = sparsegemm.SparseConv1d.from_dense(torch.nn.Conv1d(8, 4, 3, padding=1))
    with pytest.raises(ValueError, match="SparseConv1d: x has an empty length: as nn.Conv1d"):
        one_d(torch.zeros(2, 8, 0))
    with pytest.raises(ValueError, match=r"x must be \[B, 8, H, W\] or \[8, H, W\], got \(3, 5, 6\)"):
        layer(torch.zeros(3, 5, 6))


def test_cpu_backend_torchs_convolution_of_large_padding_over_one_pixel_runs(tmp_path):
    # A channels_last weight (the decompressed (ky, kx, cin) rows, permuted) made torch 2.13's CPU
    # convolution segfault here; it gets an NCHW copy. In a subprocess: a crash must fail this test,
    # not end the run.
    code = """if True:
        import torch, sparsegemm
        from torch.nn import functional as F
        torch.manual_seed(0)
        conv = torch.nn.Conv2d(8, 8, (1, 2), stride=(1, 5), padding=(0, 7), dilation=(1, 3))
        layer = sparsegemm.SparseConv2d.from_dense(conv, dtype=torch.float32)
        x = torch.randn(60, 8, 1, 1)
        with torch.inference_mode():
            y = layer(x)
        ref = F.conv2d(x.double(), layer.dense_weight().double(), layer.bias.double(), (1, 5), (0, 7), (1, 3))
        print(float((y.double() - ref).abs().max()))
    """
    import os
    import subprocess
    import sys

    import sparsegemm

    # The package these tests import (an installed one in CI, whose source tree has no _C), from a
    # folder that is not the source tree (-c puts the working folder first on the path).
    root = os.path.dirname(os.path.dirname(os.path.abspath(sparsegemm.__file__)))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300,
                            cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert float(result.stdout.strip()) < 1e-5


def chunked_conv_gemm_rows(monkeypatch, batch: int, tile_bytes: int) -> list:
    """The rows of each GEMM call of an inference 3 x 3, stride 2 SparseConv2d (8 -> 12 channels,
    CPU backend, 7 x 6 input: output 4 x 3 an image, K = 72) over ``batch`` images, with a patch
    scratch of ``tile_bytes``; checks its output against the reference."""
    layer = make_layer(8, 12, 3, 2, 1, 1, torch.float32, integer=True, seed=11)
    layer.backend = "cpu"
    x = make_input(batch, 8, (7, 6), torch.float32, integer=True, seed=12)
    monkeypatch.setattr(ops, "_CPU_TILE_BYTES", tile_bytes)
    gemm_rows = []
    real = type(layer)._sparse_linear
    monkeypatch.setattr(type(layer), "_sparse_linear", lambda self, cols: (gemm_rows.append(cols.shape[0]),
                                                                           real(self, cols))[1])
    with torch.no_grad():
        y = layer(x)
    assert torch.equal(y.double(), reference(layer, x))
    return gemm_rows


@pytest.mark.parametrize("tile_pixels,row_chunks", [(3, [3]), (2, [2, 1]), (1, [1, 1, 1])])
def test_cpu_backend_splits_a_row_wider_than_the_scratch(monkeypatch, tile_pixels, row_chunks):
    # A row of output pixels wider than the scratch is gathered a run of its pixels at a time (the
    # scratch once took at least a whole row, unbounded for a wide enough image): rows of 3 pixels
    # in chunks of 3, 2 + 1 and 1 + 1 + 1, and the scratch no larger than asked.
    key, k = ("conv_patches", torch.float32), 8 * 9
    ops._reused_buffer(key, 0, torch.float32, torch.device("cpu"))  # this thread's buffers
    monkeypatch.delitem(ops._thread_buffers.buffers, key)  # made afresh below
    assert chunked_conv_gemm_rows(monkeypatch, 2, tile_pixels * k * 4) == row_chunks * (2 * 4)  # 4 rows an image
    assert ops._reused_buffer(key, 0, torch.float32, torch.device("cpu")).numel() <= tile_pixels * k


@pytest.mark.parametrize("images_per_chunk", [1, 2, 5])
def test_cpu_backend_chunks_of_whole_images(monkeypatch, images_per_chunk):
    # Inference chunks of whole images where one fits the scratch: 5 images in chunks of 2, 2, 1.
    pixels, k = 4 * 3, 8 * 9
    gemm_rows = chunked_conv_gemm_rows(monkeypatch, 5, images_per_chunk * pixels * k * 4)
    assert gemm_rows == [pixels * n for n in {1: [1] * 5, 2: [2, 2, 1], 5: [5]}[images_per_chunk]]


# torch.jit.trace is deprecated, and warns of the argument checks it cannot record.
@pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::torch.jit.TracerWarning")
def test_cpu_backend_traced_module_serves_any_batch():
    # torch.jit.trace records one GEMM over the whole patch matrix, not the inference chunk loop
    # (which it would unroll for the example's batch size).
    layer = make_layer(8, 12, 3, 1, 1, 1, torch.float32, integer=True, seed=13).requires_grad_(False)
    layer.backend = "cpu"
    with torch.no_grad():
        traced = torch.jit.trace(layer, make_input(2, 8, (5, 6), torch.float32, integer=True, seed=14))
        x = make_input(3, 8, (5, 6), torch.float32, integer=True, seed=15)
        assert torch.equal(traced(x).double(), reference(layer, x))


@pytest.mark.parametrize("case", ["few pixels", "weight past the scratch", "1x1 view"])
def test_cpu_backend_keeps_the_patch_gemm_where_it_wins(monkeypatch, case):
    # Below CPU_TORCH_CONV_MIN_M pixels the sparse GEMM reads half the weight bytes; a weight past
    # the dense-tile scratch would be decompressed afresh each call; a 1 x 1, stride 1 convolution
    # of a channels_last input has its patch matrix as a view, with no gather to save.
    kernel, stride, batch, hw = (1, 1, 3, (21, 19)) if case == "1x1 view" else (3, 2, 3, (21, 19))
    if case == "few pixels":
        batch, hw = 1, (9, 9)  # M = 25
    layer = make_layer(16, 24, kernel, stride, kernel // 2, 1, torch.float32, integer=True, seed=22)
    layer.backend = "cpu"
    if case == "weight past the scratch":
        monkeypatch.setattr(ops, "_CPU_TILE_BYTES", 24 * 16 * 9 * 4 - 4)
    x = make_input(batch, 16, hw, torch.float32, integer=True, seed=23).to(memory_format=torch.channels_last)
    gemm_calls = []
    real = type(layer)._sparse_linear
    monkeypatch.setattr(type(layer), "_sparse_linear", lambda self, cols: (gemm_calls.append(cols.shape),
                                                                           real(self, cols))[1])
    with torch.no_grad():
        y = layer(x)
    assert gemm_calls and torch.equal(y.double(), reference(layer, x))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["f32", "bf16", "f16"])
def test_cpu_backend_compiles_whole_at_large_m(dtype):
    # The inference dispatch (torch's convolution or the patch GEMM) must not call into the
    # extension where torch.compile traces it.
    torch._dynamo.reset()
    layer = make_layer(8, 16, 3, 1, 1, 1, dtype, integer=True, seed=20).requires_grad_(False)
    layer.backend = "cpu"
    x = make_input(4, 8, (5, 5), dtype, integer=True, seed=21)  # M = 100
    with torch.no_grad():
        assert torch.equal(torch.compile(layer, fullgraph=True)(x).double(), reference(layer, x))


# torch.jit.trace is deprecated, and warns of the argument checks it cannot record.
@pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::torch.jit.TracerWarning")
def test_cpu_backend_traces_in_grad_mode_with_trainable_parameters():
    # The trace (grad mode, trainable values) and its check (no_grad) must record one graph: the
    # F.unfold patch path is for compiled training steps only.
    layer = make_layer(8, 12, 3, 1, 1, 1, torch.float32, integer=True, seed=17)
    layer.backend = "cpu"
    traced = torch.jit.trace(layer, make_input(2, 8, (5, 6), torch.float32, integer=True, seed=18))
    x = make_input(3, 8, (5, 6), torch.float32, integer=True, seed=19)
    assert torch.equal(traced(x).double(), reference(layer, x))


def test_cpu_backend_rejects_an_input_smaller_than_the_kernel():
    layer = make_layer(8, 12, 3, 1, 0, 1, torch.float32, integer=True)
    layer.backend = "cpu"
    with pytest.raises(ValueError, match=r"SparseConv2d: the input \[H, W\] = \[2, 5\] is smaller"):
        layer(make_input(1, 8, (2, 5), torch.float32, integer=True))


def test_cpu_backend_scratch_made_in_inference_mode_serves_later_calls():
    # The patch scratch (ops._reused_buffer) first made under torch.inference_mode must still take
    # the gather's copy_ in a later call under no_grad: it is a normal tensor, not an inference one.
    layer = make_layer(8, 16, 3, 1, 1, 1, torch.float32, integer=True, seed=9)
    layer.backend = "cpu"
    x = make_input(1, 8, (6, 5), torch.float32, integer=True, seed=10)
    ops._thread_buffers.buffers = {}  # this thread's scratch made anew, under inference mode
    with torch.inference_mode():
        first = layer(x)
    with torch.no_grad():
        assert torch.equal(layer(x), first)
    assert torch.equal(first.double(), reference(layer, x))


@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=["f16", "bf16"])
@pytest.mark.parametrize("geometry", [GEOMETRIES[1], GEOMETRIES[3], GEOMETRIES[4], GEOMETRIES[7]], ids=geometry_id)
def test_random_within_twice_dense_error(kernels, dtype, geometry):
    b, cin, cout, hw, kernel, stride, padding, dilation = geometry
    layer = make_layer(cin, cout, kernel, stride, padding, dilation, dtype, integer=False, seed=5)
    x = make_input(b, cin, hw, dtype, integer=False, seed=6)
    assert_within_twice_dense_error(kernels.module(layer), kernels.to_device(x))


def test_output_is_an_nchw_view_of_nhwc_storage(kernels):
    layer = make_layer(8, 24, 3, 1, 1, 1, torch.float16, integer=True)
    x = make_input(2, 8, (5, 6), torch.float16, integer=True)
    ref = reference(layer, x)
    layer = kernels.module(layer)
    for x_in in (x, x.to(memory_format=torch.channels_last)):
        y = layer(kernels.to_device(x_in))
        assert y.shape == (2, 24, 5, 6)
        assert y.is_contiguous(memory_format=torch.channels_last) and not y.is_contiguous()
        assert torch.equal(y.cpu().double(), ref)


def test_channels_last_input_at_an_unaligned_offset_takes_the_element_loads(kernels):
    # cin % 8 == 0 but x starts 2 bytes past a 16-byte boundary: cp.async is not allowed.
    layer = make_layer(16, 8, 3, 1, 1, 1, torch.float16, integer=True)
    base = make_input(1, 1, (1, 5 * 7 * 16 + 1), torch.float16, integer=True).flatten()
    x = base[1:].view(1, 5, 7, 16).permute(0, 3, 1, 2)
    ref = reference(layer, x)
    x = kernels.to_device(x)
    assert x.is_contiguous(memory_format=torch.channels_last) and x.data_ptr() % 16 != 0
    assert torch.equal(kernels.module(layer)(x).cpu().double(), ref)


@pytest.mark.parametrize("act,fn", [(1, torch.relu), (3, F.silu)], ids=["relu", "silu"])
def test_fused_bias_and_activation(kernels, act, fn):
    layer = make_layer(16, 24, 3, 2, 1, 1, torch.float16, integer=True)
    x = make_input(2, 16, (7, 7), torch.float16, integer=True)
    ref = fn(reference(layer, x).float()).permute(0, 2, 3, 1)
    layer = kernels.module(layer)
    y = ops._conv2d(kernels.to_device(x.permute(0, 2, 3, 1).contiguous()), layer.values, layer.metadata,
                    layer._kernel_meta_for(kernels.name), [3, 3], [2, 2], [1, 1], [1, 1], layer.bias, act, kernels.name)
    # relu is exact on integers; silu's fp32 exp may differ from torch's by an ulp before rounding.
    torch.testing.assert_close(y.cpu().float(), ref.half().float(), rtol=0 if act == 1 else 1e-3, atol=0)


@pytest.mark.parametrize("config,split_k", [(DECODE, 0), (DECODE, 3), (DECODE, 5), (LARGE_M, 0), (WGMMA, 0)])
def test_forced_tiles_and_split_k(kernels, config, split_k):
    # K = 9 * 32 = 288: five k-tiles, so split_k = 3 gives splits of 2, 2 and 1.
    layer = make_layer(32, 20, 3, 1, 1, 1, torch.float16, integer=True)
    x = make_input(1, 32, (3, 5), torch.float16, integer=True)
    m, n, k = 15, 20, 288
    assert (kernels.gemm_scratch(m, n, k, config, split_k)[0] > 0) == (split_k > 1)
    y = kernels.conv2d(x.permute(0, 2, 3, 1).contiguous(), layer.values.detach(), layer.metadata, layer.bias.detach(),
                       (3, 5), (3, 3), (1, 1), (1, 1), (1, 1), config=config, split_k=split_k)
    assert torch.equal(y.permute(0, 3, 1, 2).double(), reference(layer, x))


@pytest.mark.parametrize("config,tile", [(WGMMA_TMA, "wgmma"), (DECODE_TMA, "decode"),
                                         (WGMMA_TMA_SPLIT, "K-split wgmma")])
def test_tma_pipelines_are_refused_for_the_convolution(kernels, config, tile):
    # Its X is gathered from an NHWC image, which a 2D tensor map cannot describe.
    layer = make_layer(32, 20, 3, 1, 1, 1, torch.float16, integer=True)
    x = make_input(1, 32, (3, 5), torch.float16, integer=True)
    with pytest.raises(ValueError, match=rf"config {config} \(the {tile} tile fed by TMA\) serves the GEMM only"):
        kernels.conv2d(x.permute(0, 2, 3, 1).contiguous(), layer.values.detach(), layer.metadata, layer.bias.detach(),
                       (3, 5), (3, 3), (1, 1), (1, 1), (1, 1), config=config)


def test_mid_m_tile_is_refused_for_the_convolution(kernels):
    # Forced-only tuning tile (gemm_heuristics.h MidM), instantiated for the GEMM alone.
    layer = make_layer(32, 20, 3, 1, 1, 1, torch.float16, integer=True)
    x = make_input(1, 32, (3, 5), torch.float16, integer=True)
    with pytest.raises(ValueError, match=r"config 7 \(the mid-size M tile\) serves the GEMM only"):
        kernels.conv2d(x.permute(0, 2, 3, 1).contiguous(), layer.values.detach(), layer.metadata, layer.bias.detach(),
                       (3, 5), (3, 3), (1, 1), (1, 1), (1, 1), config=7)


def test_split_k_convolution_under_any_block_order(shuffled_block_orders):
    kernels = KernelBackend("simt")
    layer = make_layer(32, 20, 3, 1, 1, 1, torch.float16, integer=True)
    x = make_input(1, 32, (3, 5), torch.float16, integer=True)
    for seed in shuffled_block_orders:
        _C.simt_set_block_order(seed)
        y = kernels.conv2d(x.permute(0, 2, 3, 1).contiguous(), layer.values.detach(), layer.metadata, layer.bias.detach(),
                           (3, 5), (3, 3), (1, 1), (1, 1), (1, 1), config=DECODE, split_k=4)
        assert torch.equal(y.permute(0, 3, 1, 2).double(), reference(layer, x))


def test_gradients_match_the_dense_convolution():
    layer = make_layer(8, 16, 3, 2, 1, 1, torch.float16, integer=True)
    x = make_input(2, 8, (5, 6), torch.float16, integer=True).requires_grad_()
    y = layer(x)
    g = make_input(2, 16, y.shape[2:], torch.float16, integer=True, seed=9)
    y.backward(g)
    w = layer.dense_weight().double().requires_grad_()
    x64 = x.detach().double().requires_grad_()
    b64 = layer.bias.detach().double().requires_grad_()
    F.conv2d(x64, w, b64, 2, 1).backward(g.double())
    assert torch.equal(x.grad.double(), x64.grad)
    assert torch.equal(layer.bias.grad.double(), b64.grad)
    matrix_grad = w.grad.permute(0, 2, 3, 1).reshape(16, -1)
    kept = ops.meta_to_mask(layer.metadata, matrix_grad.shape[1])
    assert torch.equal(layer.values.grad.double(), matrix_grad[kept].reshape(16, -1))


def test_opcheck_schema_fake_and_autograd():
    layer = make_layer(8, 16, 3, 2, 1, 1, torch.float16, integer=True)
    x = make_input(2, 8, (5, 6), torch.float16, integer=True).permute(0, 2, 3, 1).contiguous().requires_grad_()
    values = layer.values.detach().clone().requires_grad_()
    result = torch.library.opcheck(ops._conv2d, (x, values, layer.metadata, layer._kernel_meta_for("simt"), [3, 3],
                                                 [2, 2], [1, 1], [1, 1], layer.bias.detach(), 0, "simt"))
    assert set(result.values()) == {"SUCCESS"}, result


# ---- errors ----------------------------------------------------------------------------------

def test_errors_name_the_problem():
    layer = make_layer(8, 8, 3, 1, 0, 1, torch.float16, integer=True)
    with pytest.raises(TypeError, match="SparseConv2d: x must have dtype in"):
        layer(torch.zeros(1, 8, 5, 5))
    with pytest.raises(TypeError, match="does not match the weight dtype"):
        layer(torch.zeros(1, 8, 5, 5, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="smaller than the dilated kernel"):
        layer(torch.zeros(1, 8, 2, 5, dtype=torch.float16))
    with pytest.raises(ValueError, match="stride must be two integers >= 1"):
        ops._conv2d(torch.zeros(1, 5, 5, 8, dtype=torch.float16), layer.values, layer.metadata,
                    layer._kernel_meta_for("simt"), [3, 3], [0, 1], [0, 0], [1, 1], None, 0, "simt")


def test_32bit_index_check():
    # Meta tensors run the fake impl, which checks before anything is allocated or read.
    v = torch.empty(8, 4, dtype=torch.float16, device="meta")
    meta = torch.empty(8, 1, dtype=torch.uint8, device="meta")
    x = torch.empty(64, 2048, 2048, 8, dtype=torch.float16, device="meta")
    with pytest.raises(ValueError, match=r"B\*H\*W\*C = 2147483648 exceeds 32-bit indexing"):
        ops._conv2d(x, v, meta, meta, [1, 1], [1, 1], [0, 0], [1, 1], None, 0, "simt")
    x = torch.empty(64, 2047, 2048, 8, dtype=torch.float16, device="meta")
    assert ops._conv2d(x, v, meta, meta, [1, 1], [1, 1], [0, 0], [1, 1], None, 0, "simt").shape == x.shape


# ---- no im2col buffer ------------------------------------------------------------------------

class AllocationLog(TorchDispatchMode):
    """Records every aten op and the bytes of the fresh (non-view) tensors it returns."""

    def __init__(self):
        super().__init__()
        self.ops, self.fresh_bytes = [], []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.ops.append(str(func.overloadpacket))
        if isinstance(out, torch.Tensor) and not out._is_view():
            self.fresh_bytes.append(out.untyped_storage().nbytes())
        return out


@pytest.mark.parametrize("split_k_shape", [False, True], ids=["single-pass", "split-k"])
def test_op_allocates_only_the_output(split_k_shape):
    # 1 x 128 x 3 x 5 input with 3x3 taps: M = 15 (decode tile), K = 1152 (18 k-tiles: split-K).
    cin, hw = (128, (3, 5)) if split_k_shape else (16, (9, 11))
    layer = make_layer(cin, 24, 3, 1, 1, 1, torch.float16, integer=True)
    x = make_input(1, cin, hw, torch.float16, integer=True).permute(0, 2, 3, 1).contiguous()
    kernel_meta = layer._kernel_meta_for("simt")
    args = (x, layer.values.detach(), layer.metadata, kernel_meta, [3, 3], [1, 1], [1, 1], [1, 1], layer.bias.detach(), 0,
            "simt")
    m, k = hw[0] * hw[1], 9 * cin
    assert (_C.simt_gemm_scratch(m, 24, k)[0] > 0) == split_k_shape
    ops._conv2d._init_fn(*args)  # a first split-K call may size the reused scratch (ops._scratch)
    with AllocationLog() as log:
        y = ops._conv2d._init_fn(*args)  # the op's body, so that the log sees inside it
    assert log.fresh_bytes == [y.nbytes]
    # Allocations only: no im2col, unfold, copy, pad or gather of x.
    assert log.ops == ["aten.new_empty"], log.ops
    assert torch.equal(y.permute(0, 3, 1, 2).double(), reference(layer, x.permute(0, 3, 1, 2)))
    # The fake impl (run on meta tensors) promises the same output.
    fake = ops._conv2d(*[a.to("meta") if isinstance(a, torch.Tensor) else a for a in args])
    assert fake.shape == y.shape and fake.dtype == y.dtype and fake.is_contiguous()


def test_module_forward_on_channels_last_input_copies_nothing():
    layer = make_layer(16, 24, 3, 2, 1, 1, torch.float16, integer=True)
    x = make_input(2, 16, (7, 9), torch.float16, integer=True).to(memory_format=torch.channels_last)
    layer(x)  # the first forward reorders the metadata once
    with torch.no_grad(), AllocationLog() as log:
        y = layer(x)
    # The op's own body runs (ops.call: no dispatcher for a plain eager call): its output's allocation.
    assert sorted(log.ops) == ["aten.new_empty", "aten.permute", "aten.permute"], log.ops
    assert torch.equal(y.double(), reference(layer, x))
