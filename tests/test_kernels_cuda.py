"""The CUDA kernels on a GPU only: shapes too large for the emulator. The shared test matrix runs on
the GPU from test_kernels_simt.py, test_int8_kernels_simt.py and test_conv_kernels.py (their
`kernels` fixture's "cuda" variant); the checks here are theirs, so both backends answer to the
same oracles. Skips without a CUDA build or a GPU; nothing touches CUDA at import time."""
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

import sparsegemm
from sparsegemm import _C
from test_conv_kernels import assert_within_twice_dense_error, make_input, make_layer
from test_int8_kernels_simt import (assert_gemm_s8_activation_close, assert_gemm_s8_bit_exact,
                                    assert_kernel_meta_s8_matches_reference, assert_quantize_rows_matches_reference)
from test_kernels_simt import (DECODE, DECODE_TMA, LARGE_M, MID_M, WGMMA, WGMMA_TMA, WGMMA_TMA_SPLIT,
                               WGMMA_TMA_WIDE, KernelBackend,
                               assert_compress_prune_matches_reference, assert_gemm_within_twice_dense_error,
                               cuda_kernels_available)
from test_simt_emulator import TMA_BOX_CASES, assert_tma_box_matches_model, wgmma_exact_case, wgmma_mismatch_report

pytestmark = pytest.mark.skipif(
    not cuda_kernels_available(),
    reason="needs a CUDA build of sparsegemm._C and a CUDA GPU (torch.cuda.is_available())")

GPU = KernelBackend("cuda")


@pytest.mark.parametrize("swizzle,box_cols,c0,c1", TMA_BOX_CASES)
def test_tma_box_matches_the_emulator_model(swizzle, box_cols, c0, c1):
    # One TMA copy on the device against the model the emulator implements (test_simt_emulator.py):
    # the swizzles and the zero fill the TMA pipelines rely on, before any pipeline. If a TMA GEMM
    # fails on a GPU, this says whether the copies land where the kernels expect them.
    if not _C.cuda_large_m_uses_wgmma():
        pytest.skip("the TMA self-test runs on compute capability 9.0 GPUs with an sm_90a build")
    assert_tma_box_matches_model(swizzle, box_cols, c0, c1, backend="cuda")


@pytest.mark.parametrize("kind", [0, 1, 2], ids=["f16", "bf16", "s8"])
@pytest.mark.parametrize("upper", [False, True], ids=["k-step-0", "k-step-1"])
@pytest.mark.parametrize("mode", [0, 2, 3], ids=["one", "two-chained", "a-from-shared-memory"])
def test_wgmma_instruction_matches_the_emulator_oracle(kind, upper, mode):
    # One wgmma.mma_async.sp m64n128 on the device against the oracle the emulator's model meets
    # (test_simt_emulator.py): fragment, metadata, descriptor and accumulator layouts, before any
    # pipeline. If the GEMM's wgmma tile fails on a GPU, this says whether the instruction does.
    if not _C.cuda_large_m_uses_wgmma():
        pytest.skip("wgmma runs on compute capability 9.0 GPUs with an sm_90a build")
    a_bytes, b_rows, c, e, expected = wgmma_exact_case(kind, upper, mode)
    a, b, c_dev, e_dev = (torch.from_numpy(np.ascontiguousarray(v)).cuda()
                          for v in (a_bytes, b_rows, c, e.view(np.int32)))
    d = torch.zeros_like(c_dev)
    _C.cuda_wgmma_selftest(kind, mode, upper, a.data_ptr(), b.data_ptr(), c_dev.data_ptr(), e_dev.data_ptr(),
                           d.data_ptr(), stream=torch.cuda.current_stream().cuda_stream)
    torch.cuda.synchronize()
    result = d.cpu().numpy()
    assert np.array_equal(result, expected), wgmma_mismatch_report(result, expected, c, mode)


# (M, N, K, config, split_k): decode and prefill at model sizes, a forced split-K, ragged tails; the
# warp-level large-M tile forced, the wgmma tile with cp.async and with TMA copies (128 and 256 W
# rows, K split at mid-size M by its own rule and 3 ways), and the decode tile with TMA copies (the
# TMA ones skipped where the GPU does not run the wgmma tile); 48 rows planned: the decode tile
# over three M tiles on a wgmma GPU (gemm_heuristics.h kMidMDecodeCostPerWgmmaKTile); the mid-M
# tile at 64 and 200 rows (its own split, and 5 ways over a ragged N).
LARGE_GEMMS = [(1, 8192, 8192, -1, 0), (16, 4096, 4096, -1, 0), (48, 4096, 4096, -1, 0), (8, 4096, 4096, DECODE, 7),
               (2048, 4096, 4096, -1, 0), (777, 3000, 1028, LARGE_M, 0), (777, 3000, 1028, WGMMA, 0),
               (4096, 4096, 8192, WGMMA, 0), (777, 3000, 1056, WGMMA_TMA, 0), (4096, 4096, 8192, WGMMA_TMA, 0),
               (777, 3000, 1056, WGMMA_TMA_WIDE, 0), (4096, 4096, 8192, WGMMA_TMA_WIDE, 0),
               (1, 8192, 8192, DECODE_TMA, 0), (16, 4096, 11008, DECODE_TMA, 0), (8, 4096, 4096, DECODE_TMA, 7),
               (256, 4096, 4096, WGMMA_TMA_SPLIT, 0), (100, 3000, 11008, WGMMA_TMA_SPLIT, 3),
               (64, 4096, 4096, MID_M, 0), (200, 3000, 11008, MID_M, 5)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_compress_decompress_large_match_reference(dtype):
    n, k = 1024, 4100
    gen = torch.Generator().manual_seed(n + k)
    w = (torch.randint(-2, 3, (n, k), generator=gen).float() * 0.5).to(dtype)
    w[0, 0] = float("nan")
    w[-1, -1] = -0.0
    assert_compress_prune_matches_reference(GPU, w)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("m,n,k,config,split_k", LARGE_GEMMS)
@pytest.mark.parametrize("act", ["none", "gelu"])
def test_gemm_large_within_twice_dense_error(dtype, m, n, k, config, split_k, act):
    # Operands made on the GPU: the float64 reference and the dense baseline run there too.
    gen = torch.Generator(device="cuda").manual_seed(m + n + k)
    w_dense = torch.randn(n, k, generator=gen, device="cuda").to(dtype)
    x = torch.randn(m, k, generator=gen, device="cuda").to(dtype)
    bias = torch.randn(n, generator=gen, device="cuda").to(dtype)
    assert_gemm_within_twice_dense_error(GPU, x, w_dense, bias, act, config, split_k)


def test_reorder_meta_s8_large_layout():
    assert_kernel_meta_s8_matches_reference(GPU, 4096, 4100)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_quantize_rows_large_matches_reference(dtype):
    m, k = 300, 4096
    x = (torch.randn(m, k, generator=torch.Generator().manual_seed(m + k)) * 3).to(dtype)
    x[0, 1] = float("nan")
    x[1] = 0
    assert_quantize_rows_matches_reference(GPU, x)


@pytest.mark.parametrize("out_dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("m,n,k,config,split_k", [gemm for gemm in LARGE_GEMMS if gemm[3] != WGMMA_TMA_SPLIT])
def test_gemm_s8_large_bit_exact(out_dtype, m, n, k, config, split_k):
    assert_gemm_s8_bit_exact(GPU, out_dtype, m, n, k, config, split_k)


@pytest.mark.parametrize("act", ["relu", "gelu", "silu"])
def test_gemm_s8_large_activation_close(act):
    gen = torch.Generator().manual_seed(3)
    assert_gemm_s8_activation_close(GPU, torch.float16, act, 64, 520, 1032, -1, 0, gen, with_bias=False)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("batch,cin,cout,hw,kernel,stride,padding,dilation", [
    (8, 64, 128, (56, 56), 3, 1, 1, 1), (4, 256, 512, (28, 28), 1, 2, 0, 1), (2, 3, 64, (224, 224), 7, 2, 3, 1),
    (1, 128, 96, (17, 23), 3, 1, 2, 2)])
def test_conv_large_within_twice_dense_error(dtype, batch, cin, cout, hw, kernel, stride, padding, dilation):
    layer = GPU.module(make_layer(cin, cout, kernel, stride, padding, dilation, dtype, integer=False, seed=7))
    x = make_input(batch, cin, hw, dtype, integer=False, seed=8).cuda().to(memory_format=torch.channels_last)
    assert_within_twice_dense_error(layer, x)


def _chain(m: int, quantize, seed: int) -> tuple[list, torch.Tensor]:
    """Layers whose outputs feed the next (decode and prefill sizes, split-K and not, a gated one)
    and an input for them."""
    from sparsegemm.nn import SparseLinear

    gen = torch.Generator().manual_seed(seed)
    sizes = [1024, 3072, 1024, 2048, 1024]
    layers = []
    for k, n in zip(sizes, sizes[1:]):
        dense = torch.nn.Linear(k, n)
        with torch.no_grad():
            dense.weight.copy_(torch.randn(n, k, generator=gen) / k ** 0.5)
            dense.bias.copy_(torch.randn(n, generator=gen))
        layers.append(SparseLinear.from_dense(dense.cuda().half(), quantize=quantize))
    gate, up = (torch.nn.Linear(1024, 1536).cuda().half() for _ in range(2))
    layers.append(SparseLinear.from_gate_up(gate, up, quantize=quantize))
    return layers, torch.randn(m, 1024, generator=gen).cuda().half()


@pytest.mark.parametrize("quantize", [None, "int8"])
@pytest.mark.parametrize("m", [1, 16, 600])
def test_back_to_back_launches_match_synchronized_ones(m, quantize):
    # On sm_90 each GEMM (and INT8 quantize) launch may start while the one before it still runs
    # (programmatic dependent launch, gemm_sp.cuh): it must read the previous layer's output, the
    # shared split-K scratch and an in-place weight update only after that kernel is done. The same
    # kernels with a host sync between launches (nothing overlaps) give the reference bits.
    layers, x = _chain(m, quantize, seed=m)
    with torch.inference_mode():
        def run(sync: bool) -> torch.Tensor:
            h = x
            for layer in layers:
                h = layer(h)
                if sync:
                    torch.cuda.synchronize()
            return h

        reference = run(sync=True)
        for _ in range(3):
            assert torch.equal(run(sync=False), reference)
        # A weight written by the kernel right before the GEMM that reads it.
        if quantize is None:
            first = layers[0]
            original = first(x)
            torch.cuda.synchronize()
            first.values.mul_(-1)
            flipped = first(x)  # launched right behind the kernel that flips the weight
            torch.cuda.synchronize()
            assert torch.equal(flipped, first(x)) and not torch.equal(flipped, original)
            first.values.mul_(-1)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            run(sync=False)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            captured = run(sync=False)
        for _ in range(3):
            graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(captured, reference)


def test_large_m_takes_the_wgmma_tile_exactly_on_hopper():
    # Compute capability 9.0 with SM 90 in the build (sm_90a machine code): the heuristic's large-M
    # choice; anywhere else it must not be taken (its kernels there are a trap).
    hopper = torch.cuda.get_device_capability() == (9, 0) and "90" in _C.build_info()["cuda_archs"].split(",")
    turned_off = (os.environ.get("SPARSEGEMM_WGMMA") == "0"
                  or os.environ.get("CUDA_FORCE_PTX_JIT", "0") not in ("", "0"))
    assert _C.cuda_large_m_uses_wgmma() == (hopper and not turned_off)


@pytest.mark.parametrize("setting,large_m_tile,tma_large_m,tma_decode", [
    (None, "WgmmaLargeM", True, False), ("0", "WgmmaLargeM", False, False), ("1", "WgmmaLargeM", True, True),
    ("wide", "WgmmaWideLargeM", True, True)])
def test_tma_setting_picks_the_pipelines_through_the_public_api(tmp_path, setting, large_m_tile, tma_large_m,
                                                                 tma_decode):
    # SPARSEGEMM_TMA (read once per process, so in a child) picks which of sparsegemm.linear's decode
    # (M = 3) and large-M (M = 300) GEMMs run their TMA kernels (the profiler names them): unset, the
    # large-M one; "0" neither; "1" both; "wide" both, large M the 256-row tile. Every choice gives
    # the bits this process's default gives.
    if not _C.cuda_large_m_uses_wgmma():
        pytest.skip("the TMA pipelines run on compute capability 9.0 GPUs with an sm_90a build")
    script = textwrap.dedent("""
        import sys, numpy as np, torch, sparsegemm
        from torch.profiler import ProfilerActivity, profile
        torch.manual_seed(0)
        sw = sparsegemm.compress(torch.randn(512, 1024, device="cuda").half(), prune=True)
        xs = [torch.randn(m, 1024, device="cuda").half() for m in (3, 300)]
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            ys = [sparsegemm.linear(x, sw) for x in xs]
            torch.cuda.synchronize()
        names = [e.name for e in prof.events() if "gemm_sp_kernel" in e.name]
        np.save(sys.argv[1], np.stack([y.float().cpu().numpy().ravel()[:512 * 3] for y in ys]))
        for tile in (sys.argv[2], "Decode"):  # kernels of the tile, of them TMA ones
            print(sum(tile in n for n in names), sum(tile in n and "TmaRowMajorX" in n for n in names))
    """)
    out = tmp_path / "y.npy"
    env = {name: value for name, value in os.environ.items() if name != "SPARSEGEMM_TMA"}
    if setting is not None:
        env["SPARSEGEMM_TMA"] = setting
    run = subprocess.run([sys.executable, "-c", script, str(out), large_m_tile], env=env, cwd=tmp_path,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    large_m, large_m_tma, decode, decode_tma = map(int, run.stdout.split()[-4:])
    assert large_m >= 1 and decode >= 1, run.stdout
    assert (large_m_tma, decode_tma) == (large_m if tma_large_m else 0, decode if tma_decode else 0), run.stdout
    torch.manual_seed(0)
    sw = sparsegemm.compress(torch.randn(512, 1024, device="cuda").half(), prune=True)
    xs = [torch.randn(m, 1024, device="cuda").half() for m in (3, 300)]
    reference = np.stack([sparsegemm.linear(x, sw).float().cpu().numpy().ravel()[:512 * 3] for x in xs])
    np.testing.assert_array_equal(np.load(out), reference)


def test_mid_m_tile_is_refused_only_for_shared_memory():
    # Not a Hopper tile (gemm_heuristics.h needs_sm90a): any GPU that gives a block its 102 KiB runs it.
    try:
        _C.cuda_gemm_scratch(256, 256, 256, MID_M, 0)
    except ValueError as refusal:
        assert "bytes of shared memory a block" in str(refusal)


@pytest.mark.parametrize("config", [WGMMA, WGMMA_TMA, DECODE_TMA, WGMMA_TMA_WIDE, WGMMA_TMA_SPLIT])
def test_forcing_the_wgmma_tile_where_it_cannot_run_is_refused(config):
    # Off Hopper (or with the tile turned off) its kernels and the TMA pipelines' are a trap: the
    # launch must not happen.
    if _C.cuda_large_m_uses_wgmma():
        pytest.skip("this GPU runs the wgmma tile")
    with pytest.raises(ValueError, match=rf"config {config} \(the wgmma tile or a TMA pipeline\) needs sm_90a machine "
                                         r"code .*, but "):
        _C.cuda_gemm_scratch(256, 256, 256, config, 0)


def test_static_int8_quantization_with_a_number_for_scale_is_capturable():
    # A Python-number scale became a device tensor through torch.tensor, a copy from the host that a
    # CUDA graph cannot capture (and a pageable copy every call); it is now a fill on x's device.
    from sparsegemm import quant

    x = torch.randn(4, 64, device="cuda")
    want = quant.quantize_activations_static(x, 0.05)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = quant.quantize_activations_static(x, 0.05)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(captured[0], want[0]) and torch.equal(captured[1], want[1])
    assert torch.equal(want[0].cpu(), quant.quantize_activations_static(x.cpu(), 0.05)[0])


@pytest.mark.parametrize("quantize", [None, "int8"])
def test_a_graph_replays_a_weight_loaded_in_place_and_streams_share_first_copies(quantize):
    # The reordered metadata was freed by load_state_dict (replays then read reused memory) and, made
    # on a busy stream, read at once from another one. Now a load remakes it in its own memory, and
    # the copy is complete before any stream reads it (KernelMetaCache).
    torch.manual_seed(0)
    layer, other = (sparsegemm.SparseLinear.from_dense(torch.nn.Linear(4096, 1024).cuda().half(), quantize=quantize)
                    for _ in range(2))
    x = torch.randn(16, 4096, device="cuda", dtype=torch.float16)
    with torch.no_grad():
        want = other(x)
        layer(x)  # warm-up: the copy is made and kept
        graph, side = torch.cuda.CUDAGraph(), torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side), torch.cuda.graph(graph):
            captured = layer(x)
        torch.cuda.current_stream().wait_stream(side)
        layer.load_state_dict(other.state_dict())
        junk = [torch.full((1 << 20,), 0xFF, dtype=torch.uint8, device="cuda") for _ in range(16)]  # reuse freed
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(captured, want) and len(junk) == 16
        dense = torch.nn.Linear(4096, 1024).cuda().half()
        reference = sparsegemm.SparseLinear.from_dense(dense, quantize=quantize)(x)
        fresh = sparsegemm.SparseLinear.from_dense(dense, quantize=quantize)  # no copy made yet
        busy, reader = torch.cuda.Stream(), torch.cuda.Stream()
        torch.cuda.synchronize()
        with torch.cuda.stream(busy):
            torch.cuda._sleep(50_000_000)  # tens of ms: the copy is queued behind it
            first = fresh(x)
        with torch.cuda.stream(reader):
            second = fresh(x)
        torch.cuda.synchronize()
        assert torch.equal(first, reference) and torch.equal(second, reference)
