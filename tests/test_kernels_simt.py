"""The CUDA kernels of csrc/cuda/ on every kernel backend: the SIMT emulator on the CPU
(sparsegemm._C.simt_*) always, the GPU (cuda_*) where there is one. Each test takes the `kernels`
fixture (conftest.py), a KernelBackend; the GPU-only large shapes live in test_kernels_cuda.py and
share the check functions below.

Oracles live in this file (numpy, float64): the format.h selection rule, the kernel metadata
layout of csrc/cuda/reorder.cuh and the dense product on the decompressed weight. Shapes are
small because the emulator runs every CUDA thread as a fiber; they are chosen to hit the tails
(M, N, K not tile multiples, fewer k-tiles than pipeline stages, K % 8 != 0, unaligned rows).
"""
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from sparsegemm import _C

DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
ACT_CODES = {"none": 0, "relu": 1, "gelu": 2, "silu": 3, "reglu": 17, "geglu": 18, "swiglu": 19}
GATE_OF = {"reglu": "relu", "geglu": "gelu", "swiglu": "silu"}  # gated: act(gate) * up, N / 2 columns
# gemm_heuristics.h GemmConfig
LARGE_M, DECODE, WGMMA, WGMMA_TMA, DECODE_TMA, WGMMA_TMA_WIDE, WGMMA_TMA_SPLIT, MID_M = 0, 1, 2, 3, 4, 5, 6, 7
SIX_PAIRS = [(0, 1), (0, 2), (1, 2), (0, 3), (1, 3), (2, 3)]


# ---- format.h oracle ---------------------------------------------------------------------------
def padded_k(k):
    return (k + 3) // 4 * 4


def select_top2(groups):
    """groups: float64 [..., 4] -> (i0, i1): two largest |w|, NaN largest, ties to lower index."""
    key = np.abs(groups)
    nan = np.isnan(key)
    a_key, b_key = key[..., :, None], key[..., None, :]
    a_nan, b_nan = nan[..., :, None], nan[..., None, :]
    idx = np.arange(4)
    lower = (idx[:, None] < idx[None, :])
    # beats[..., a, b]: does position a rank before position b?
    beats = np.where(a_nan != b_nan, a_nan,
                     np.where(~a_nan & (a_key != b_key), a_key > b_key, lower))
    beats &= ~np.eye(4, dtype=bool)
    rank = beats.sum(axis=-2)  # number of positions that beat b
    kept = rank < 2
    order = np.argsort(~kept, axis=-1, kind="stable")
    return order[..., 0], order[..., 1]


def bit_view(t):
    return t.view(torch.int32 if t.dtype == torch.float32 else torch.int16)


def reference_compress(w):
    """w: torch [N, K] -> (values torch [N, Kp/2] bit-exact, meta uint8 [N, ceil(G/2)], nonzeros)."""
    n, k = w.shape
    kp = padded_k(k)
    wp = torch.zeros((n, kp), dtype=w.dtype)
    wp[:, :k] = w
    groups = wp.reshape(n, kp // 4, 4)
    i0, i1 = select_top2(groups.double().numpy())
    i0t, i1t = torch.from_numpy(i0), torch.from_numpy(i1)
    bits = bit_view(groups)  # gather the bit patterns: float ops may rewrite NaN payloads
    values = torch.stack([bits.gather(2, i0t[..., None])[..., 0], bits.gather(2, i1t[..., None])[..., 0]], dim=2)
    values = values.view(w.dtype)
    nibbles = (i0 | (i1 << 2)).astype(np.uint8)
    g = nibbles.shape[1]
    if g % 2:
        nibbles = np.concatenate([nibbles, np.full((n, 1), 0x4, np.uint8)], axis=1)
    meta = (nibbles[:, 0::2] | (nibbles[:, 1::2] << 4)).astype(np.uint8)
    nonzeros = (groups.double() != 0).sum(dim=2).numpy()  # NaN counts, -0.0 does not
    return values.reshape(n, kp // 2), meta, nonzeros


def reference_decompress(values, meta, k):
    n = values.shape[0]
    kp = padded_k(k)
    g = kp // 4
    nib = np.stack([meta & 0xF, meta >> 4], axis=2).reshape(n, -1)[:, :g].astype(np.int64)
    v = bit_view(values).reshape(n, g, 2)
    w = torch.zeros((n, g, 4), dtype=v.dtype)
    w.scatter_(2, torch.from_numpy(nib & 3)[..., None], v[..., 0:1])
    w.scatter_(2, torch.from_numpy(nib >> 2)[..., None], v[..., 1:2])
    return w.reshape(n, kp)[:, :k].contiguous().view(values.dtype)


# reorder.cuh kMetaRowPad: rows of the kernel metadata are padded to the widest block tile along N.
META_ROW_PAD = 256


def reference_kernel_meta(meta, n, k):
    """The reorder.cuh layout: uint32 words [Npad/16, Kpad/32, 16], word 2g+p as lane 4g+p needs."""
    g_count = padded_k(k) // 4
    npad = (n + META_ROW_PAD - 1) // META_ROW_PAD * META_ROW_PAD
    kpad = (padded_k(k) + 63) // 64 * 64
    nib = np.full((npad, kpad // 4), 0x4, np.uint32)
    nib[:n, :g_count] = np.stack([meta & 0xF, meta >> 4], axis=2).reshape(n, -1)[:, :g_count]
    quads = nib.reshape(npad, kpad // 16, 4)
    half = (quads << (4 * np.arange(4, dtype=np.uint32))).sum(axis=2).astype(np.uint32)  # [row, 16-K chunk]
    half = half.reshape(npad // 16, 2, 8, kpad // 32, 2)  # [tn, row8, g, tk, p]
    words = half[:, 0] | (half[:, 1] << 16)  # [tn, g, tk, p]
    return words.transpose(0, 2, 1, 3).reshape(-1).astype(np.uint32)


# ---- the kernels through one backend of _C ------------------------------------------------------
def cuda_kernels_available():
    """Whether the cuda_* kernels can run here: a CUDA build of _C and a GPU that torch sees."""
    return _C.build_info()["cuda_built"] and torch.cuda.is_available()


def storage_bytes(t):
    """The whole storage under tensor t, as uint8."""
    return torch.empty(0, dtype=torch.uint8, device=t.device).set_(t.untyped_storage())


def data_ptr(t):
    """t's address, 0 (nullptr) for None."""
    return 0 if t is None else t.data_ptr()


def home(t):
    """Where a test keeps t (a tensor, or a numpy array on the host)."""
    return torch.device("cpu") if isinstance(t, np.ndarray) else t.device


class KernelBackend:
    """The csrc/cuda kernels through one backend of _C: "simt" runs them in the emulator on host
    memory, "cuda" on the GPU, on torch's current stream. The methods take tensors (or numpy
    arrays) on the host or on the backend's device and return results where their first argument
    lives, so that one test body checks both backends against the same host oracles. Outputs
    start out filled with a poison (NaN, 7, 0xFF, 99, -7) that no kernel result equals, so an
    element a kernel forgot to write shows. Device copies are held in locals until the op has
    run: the memory of a dropped temporary could be handed out again before the kernel reads it."""

    def __init__(self, name):
        self.name = name
        self.device = torch.device("cuda" if name == "cuda" else "cpu")

    def __repr__(self):
        return f"KernelBackend({self.name!r})"

    def to_device(self, t):
        """t on the backend's device with its shape, strides and storage offset: the whole storage
        travels, so that a strided or misaligned view stays strided or misaligned there."""
        if isinstance(t, np.ndarray):
            t = torch.from_numpy(t)
        if t.device.type == self.device.type:
            return t
        raw = storage_bytes(t).to(self.device)
        return torch.empty(0, dtype=t.dtype, device=self.device).set_(raw.untyped_storage(), t.storage_offset(),
                                                                       t.shape, t.stride())

    def _write_back(self, t, on_device):
        """Copies what a kernel wrote into on_device (to_device(t)) back into t's storage."""
        if on_device is not t:
            storage_bytes(t).copy_(storage_bytes(on_device))

    def _launch(self, op, *args):
        """_C.<backend>_<op>(*args). The GPU's run on torch's current stream, and are waited for so
        that an asynchronous fault is reported by the op that made it."""
        fn = getattr(_C, f"{self.name}_{op}")
        if self.name != "cuda":
            return fn(*args)
        result = fn(*args, stream=torch.cuda.current_stream().cuda_stream)
        torch.cuda.synchronize()
        return result

    def kernel_meta_bytes_s8(self, n, k):
        return getattr(_C, f"{self.name}_kernel_meta_bytes_s8")(n, k)

    def gemm_scratch(self, *shape_and_config, s8=False):
        """(M, N, K[, config, split_k]) -> (split-K workspace bytes, tile counters) the fp16/bf16
        GEMM (the int8 one with s8) needs."""
        return getattr(_C, f"{self.name}_gemm{'_s8' if s8 else ''}_scratch")(*shape_and_config)

    def _launch_split_k(self, op, m, n, k, config, split_k, s8, *args):
        """_launch(op, *args[:-2], workspace, tile counters, *args[-2:]) with a poisoned workspace and
        counters of random contents (a counter word that does not carry the launch's token counts as
        no arrivals: gemm_sp.cuh arrived_last); checks that the kernel leaves the counters zero."""
        if WGMMA <= config <= WGMMA_TMA_SPLIT and self.name == "cuda" and not _C.cuda_large_m_uses_wgmma():
            # as plan_device_gemm (gemm_heuristics.h needs_sm90a)
            pytest.skip(f"config {config} (the wgmma tile or a TMA pipeline) runs on compute capability 9.0 GPUs "
                        "with an sm_90a build")
        try:
            ws_bytes, counters = self.gemm_scratch(m, n, k, config, split_k, s8=s8)
        except ValueError as refusal:  # the mid-M tile on a GPU whose blocks have less shared memory
            if config == MID_M and self.name == "cuda" and "bytes of shared memory a block" in str(refusal):
                pytest.skip(str(refusal))
            raise
        ws = torch.full((max(ws_bytes // 4, 1),), -7, dtype=torch.int32, device=self.device)  # NaN-like poison
        gen = torch.Generator().manual_seed(m * n + k + split_k)
        tile_counters = torch.randint(-2**63, 2**63 - 1, (max(counters, 1),), generator=gen, dtype=torch.int64)
        tile_counters[::3] = torch.arange(0, max(counters, 1), 3) % 4  # words with no token and a few arrivals
        tile_counters = tile_counters.to(self.device)
        self._launch(op, *args[:-2], ws.data_ptr() if ws_bytes else 0, tile_counters.data_ptr() if counters else 0,
                     *args[-2:])
        assert (counters > 0) == (ws_bytes > 0)
        assert not tile_counters.any(), f"{op}: split-K tile counters left non-zero"

    def compress(self, w, prune=True):
        """w [N, K] (any row stride) -> (values [N, Kp/2], logical meta [N, ceil(G/2)], first bad
        group of strict mode: row * G + group, or -1)."""
        n, k = w.shape
        w_dev = self.to_device(w)
        values = torch.full((n, padded_k(k) // 2), 7, dtype=w.dtype, device=self.device)
        meta = torch.full((n, (padded_k(k) // 4 + 1) // 2), 0xFF, dtype=torch.uint8, device=self.device)
        args = (n, k, w_dev.data_ptr(), w_dev.stride(0), values.data_ptr(), meta.data_ptr(), DTYPE_CODES[w.dtype],
                prune)
        if self.name == "cuda":
            # The device reports into device memory, and only in strict mode (ops.py reads it only
            # then): prune mode starts from "none", strict mode from a poison it must overwrite.
            first_bad = torch.full((1,), -1 if prune else -7, dtype=torch.int64, device=self.device)
            self._launch("compress", *args, first_bad.data_ptr())
            first_bad = int(first_bad.item())
        else:
            first_bad = self._launch("compress", *args)
        return values.to(w.device), meta.to(w.device), first_bad

    def decompress(self, values, meta, k):
        """(values, logical meta) -> the dense [N, K] weight."""
        n = values.shape[0]
        w = torch.full((n, k), 5, dtype=values.dtype, device=self.device)
        values_dev, meta_dev = self.to_device(values), self.to_device(meta)
        self._launch("decompress", n, k, values_dev.data_ptr(), meta_dev.data_ptr(), w.data_ptr(),
                     DTYPE_CODES[values.dtype])
        return w.to(home(values))

    def kernel_meta(self, meta, n, k, s8=False):
        """Logical meta -> the kernel layout reorder.cuh writes (the int8 GEMM's with s8), as int32
        words."""
        suffix = "_s8" if s8 else ""
        words = getattr(_C, f"{self.name}_kernel_meta_bytes{suffix}")(n, k) // 4
        out = torch.zeros(words, dtype=torch.int32, device=self.device)
        if words:
            meta_dev = self.to_device(meta)
            self._launch("reorder_meta" + suffix, meta_dev.data_ptr(), out.data_ptr(), n, k)
        return out.to(home(meta))

    def gemm(self, x, values, meta, n, k, bias=None, act="none", config=-1, split_k=0, y=None):
        """act(x @ W^T + bias) for x [M, >= K] (row stride ldx), meta logical (reordered here). Writes
        into y ([M, N] view, row stride ldy) when given, else a fresh NaN-filled one; returns it."""
        m = x.shape[0]
        if y is None:
            y = torch.full((m, out_cols(n, act)), float("nan"), dtype=x.dtype, device=x.device)
        x_dev, values_dev, y_dev = self.to_device(x), self.to_device(values), self.to_device(y)
        kmeta = self.kernel_meta(self.to_device(meta), n, k)
        bias_dev = None if bias is None else self.to_device(bias)
        self._launch_split_k("gemm", m, n, k, config, split_k, False, m, n, k, x_dev.data_ptr(), x_dev.stride(0),
                             values_dev.data_ptr(), kmeta.data_ptr(), data_ptr(bias_dev), y_dev.data_ptr(),
                             y_dev.stride(0), DTYPE_CODES[x.dtype], ACT_CODES[act], config, split_k)
        self._write_back(y, y_dev)
        return y

    def quantize_rows(self, x):
        """x [M, K] float (row stride ldx) -> (x_q int8 [M, K], x_scale float32 [M]) as numpy."""
        m, k = x.shape
        x_dev = self.to_device(x)
        x_q = torch.full((m, k), 99, dtype=torch.int8, device=self.device)
        x_scale = torch.full((m,), -7.0, dtype=torch.float32, device=self.device)
        self._launch("quantize_rows", m, k, x_dev.data_ptr(), x_dev.stride(0), DTYPE_CODES[x.dtype], x_q.data_ptr(),
                     x_scale.data_ptr())
        return x_q.cpu().numpy(), x_scale.cpu().numpy()

    def quantize_rows_static(self, x, scale, row_offsets=None):
        """x [M, K] float (row stride ldx), scale float32 (0-d, or [G] with int64 row_offsets [G + 1])
        -> (x_q, x_scale) as numpy."""
        m, k = x.shape
        x_dev, scale_dev = self.to_device(x), self.to_device(scale)
        offsets_dev = None if row_offsets is None else self.to_device(row_offsets)
        x_q = torch.full((m, k), 99, dtype=torch.int8, device=self.device)
        x_scale = torch.full((m,), -7.0, dtype=torch.float32, device=self.device)
        self._launch("quantize_rows_static", m, k, x_dev.data_ptr(), x_dev.stride(0), DTYPE_CODES[x.dtype],
                     scale_dev.data_ptr(), data_ptr(offsets_dev), 0 if row_offsets is None else scale.numel(),
                     x_q.data_ptr(), x_scale.data_ptr())
        return x_q.cpu().numpy(), x_scale.cpu().numpy()

    def gemm_s8(self, x_q, values, meta, w_scale, x_scale, n, k, out_dtype, bias=None, act="none", config=-1,
                split_k=0, y=None):
        """The INT8 GEMM: x_q int8 [M, >= K] (row stride ldx), values int8 [N, Kp/2], meta logical
        (reordered here), w_scale fp32 [N], x_scale fp32 [M] (tensors or numpy); y as for gemm."""
        m = x_q.shape[0]
        if y is None:
            y = torch.full((m, out_cols(n, act)), float("nan"), dtype=out_dtype, device=x_q.device)
        x_dev, values_dev, y_dev = self.to_device(x_q), self.to_device(values), self.to_device(y)
        w_scale_dev, x_scale_dev = self.to_device(w_scale), self.to_device(x_scale)
        kmeta = self.kernel_meta(self.to_device(meta), n, k, s8=True)
        bias_dev = None if bias is None else self.to_device(bias)
        self._launch_split_k("gemm_s8", m, n, k, config, split_k, True, m, n, k, x_dev.data_ptr(), x_dev.stride(0),
                             values_dev.data_ptr(), kmeta.data_ptr(), w_scale_dev.data_ptr(), x_scale_dev.data_ptr(),
                             data_ptr(bias_dev), y_dev.data_ptr(), y_dev.stride(0), DTYPE_CODES[out_dtype],
                             ACT_CODES[act], config, split_k)
        self._write_back(y, y_dev)
        return y

    def conv2d(self, x_nhwc, values, meta, bias, out_hw, kernel, stride, padding, dilation, act="none", config=-1,
               split_k=0):
        """The implicit-GEMM convolution: x_nhwc contiguous [B, H, W, C], values / logical meta of the
        [Cout, kh * kw * C] weight, out_hw the output's (H, W) -> a fresh [B, out H, out W, Cout]."""
        batch, height, width, channels = x_nhwc.shape
        out_channels = values.shape[0]
        m, k = batch * out_hw[0] * out_hw[1], kernel[0] * kernel[1] * channels
        y = torch.full((batch, *out_hw, out_channels), float("nan"), dtype=x_nhwc.dtype, device=self.device)
        x_dev, values_dev = self.to_device(x_nhwc), self.to_device(values)
        kmeta = self.kernel_meta(self.to_device(meta), out_channels, k)
        bias_dev = None if bias is None else self.to_device(bias)
        self._launch_split_k("conv2d", m, out_channels, k, config, split_k, False, x_dev.data_ptr(),
                             values_dev.data_ptr(), kmeta.data_ptr(), data_ptr(bias_dev), y.data_ptr(), batch, height,
                             width, channels, out_channels, *out_hw, list(kernel), list(stride), list(padding),
                             list(dilation), DTYPE_CODES[x_nhwc.dtype], ACT_CODES[act], config, split_k)
        return y.to(x_nhwc.device)

    def module(self, layer):
        """A SparseLinear / SparseConv2d moved to the backend's device, its forward set to run there."""
        layer = layer.to(self.device)
        layer.backend = self.name
        return layer


def sparse_weight(n, k, dtype, gen, low=-3, high=4):
    """Random 2:4 weight with small-integer values, every group one of the six patterns."""
    kp = padded_k(k)
    w = torch.randint(low, high, (n, kp // 4, 4), generator=gen).to(torch.float64)
    pat = torch.randint(0, 6, (n, kp // 4), generator=gen)
    keep = torch.zeros((n, kp // 4, 4), dtype=torch.bool)
    for p, (a, b) in enumerate(SIX_PAIRS):
        keep[..., a] |= pat == p
        keep[..., b] |= pat == p
    w = torch.where(keep, w, torch.zeros_like(w)).reshape(n, kp)[:, :k]
    return w.to(dtype).contiguous()


def out_cols(n, act):
    """Columns of Y for a weight of n rows: half under a gated activation."""
    return n // 2 if act in GATE_OF else n


def gate_up_split(y):
    """(gate, up) columns of pre-activations y [M, N] whose W rows alternate in runs of 8 (format.h)."""
    runs = y.reshape(y.shape[0], -1, 2, 8)
    return runs[:, :, 0].reshape(y.shape[0], -1), runs[:, :, 1].reshape(y.shape[0], -1)


def activation(y, act):
    fn = {"none": lambda t: t, "relu": torch.relu, "gelu": torch.nn.functional.gelu, "silu": torch.nn.functional.silu}
    if act in GATE_OF:
        gate, up = gate_up_split(y)
        return fn[GATE_OF[act]](gate) * up
    return fn[act](y)


# ---- compress / decompress / reorder -------------------------------------------------------------
def assert_compress_prune_matches_reference(kernels, w):
    """Prune-mode compress bit for bit against the oracle, then decompress of its output."""
    k = w.shape[1]
    values, meta, bad = kernels.compress(w, prune=True)
    ref_values, ref_meta, _ = reference_compress(w)
    assert bad == -1  # prune mode never reports
    assert torch.equal(values.view(torch.uint8), ref_values.contiguous().view(torch.uint8))
    np.testing.assert_array_equal(meta.numpy(), ref_meta)
    back = kernels.decompress(values, meta, k)
    assert torch.equal(back.view(torch.uint8), reference_decompress(values, meta.numpy(), k).view(torch.uint8))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("n,k", [(3, 4), (5, 36), (2, 12), (4, 70), (17, 264)])
def test_compress_prune_matches_reference(kernels, dtype, n, k):
    gen = torch.Generator().manual_seed(n * 1000 + k)
    # Few distinct magnitudes force ties; sprinkle NaN, -0.0 and zero groups.
    w = (torch.randint(-2, 3, (n, k), generator=gen).to(torch.float32) * 0.5).to(dtype)
    w[0, 0] = float("nan")
    w[-1, -1] = -0.0
    w[n // 2, : min(k, 4)] = 0
    assert_compress_prune_matches_reference(kernels, w)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_compress_strided_input(kernels, dtype):
    gen = torch.Generator().manual_seed(3)
    base = torch.randn(6, 45, generator=gen).to(dtype)
    w = base[:, 1:41]  # ldw = 45, unaligned rows: element loads
    assert w.stride(0) == 45
    values, meta, _ = kernels.compress(w, prune=True)
    ref_values, ref_meta, _ = reference_compress(w.contiguous())
    assert torch.equal(values.view(torch.uint8), ref_values.contiguous().view(torch.uint8))
    np.testing.assert_array_equal(meta.numpy(), ref_meta)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_strict_mode_reports_smallest_bad_group(kernels, dtype):
    gen = torch.Generator().manual_seed(5)
    n, k = 6, 44  # G = 11, odd
    w = sparse_weight(n, k, dtype, gen)
    assert kernels.compress(w, prune=False)[2] == -1
    w[:, 1::4] = torch.where(w[:, 1::4] == 0, torch.full_like(w[:, 1::4], -0.0), w[:, 1::4])
    assert kernels.compress(w, prune=False)[2] == -1  # -0.0 is zero
    w[4, 8:11] = 1          # row 4, group 2: three non-zeros
    w[2, 40:44] = torch.tensor([1, 2, float("nan"), 3])  # row 2, group 10 (NaN is non-zero)
    assert kernels.compress(w, prune=False)[2] == 2 * 11 + 10


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_compress_grid_stride(kernels, dtype):
    # The emulator launches at most 8 blocks of 256 threads for the element-wise kernels: 2048
    # bytes of E per pass, so these 131 x 38 = 4978 bytes take the grid-stride loop twice over
    # (as weights past 4096 x 256 bytes of E do on a GPU).
    gen = torch.Generator().manual_seed(11)
    n, k = 131, 300  # G = 75, odd: every row ends on the pad nibble
    w = (torch.randint(-3, 4, (n, k), generator=gen).to(torch.float32) * 0.25).to(dtype)
    w[-1, -5] = float("nan")
    assert_compress_prune_matches_reference(kernels, w)
    strict = sparse_weight(n, k, dtype, gen)
    assert kernels.compress(strict, prune=False)[2] == -1
    strict[n - 1, 4 * 70:4 * 70 + 3] = 1  # the last row's group 70: three non-zeros
    strict[n - 3, 4 * 74:4 * 74 + 4] = 2  # an earlier row's last group: the smallest index wins
    assert kernels.compress(strict, prune=False)[2] == (n - 3) * 75 + 74


# Bit patterns whose groups exercise every branch of the selection: +-0.0, ties, +-inf, NaNs with
# the smallest and largest payloads (all NaNs tie), the smallest subnormal.
SELECTION_BITS = {
    torch.float16: [0x0000, 0x8000, 0x3C00, 0xBC00, 0x3800, 0x7C00, 0xFC00, 0x7E00, 0x7C01, 0xFFFF, 0x0001],
    torch.bfloat16: [0x0000, 0x8000, 0x3F80, 0xBF80, 0x3F00, 0x7F80, 0xFF80, 0x7FC0, 0x7F81, 0xFFFF, 0x0001],
}


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_compress_every_group_of_special_values(kernels, dtype):
    # Every ordered group of four from SELECTION_BITS: 11^4 groups as 121 rows of 121 (odd: every
    # row ends on the pad nibble), in both modes, then cut to K % 4 == 1 (zeros fill the last group).
    bits = torch.tensor(SELECTION_BITS[dtype], dtype=torch.int32)
    idx = torch.cartesian_prod(*[torch.arange(len(bits))] * 4)
    groups = bits[idx].to(torch.int16).view(dtype)  # [11^4, 4]
    w = groups.reshape(121, -1)
    assert_compress_prune_matches_reference(kernels, w)
    partial = w[:, :-3].contiguous()  # K % 4 == 1: the last group reads three zeros past K
    assert_compress_prune_matches_reference(kernels, partial)
    nonzeros = reference_compress(w)[2].reshape(-1)
    first_bad = int(np.flatnonzero(nonzeros > 2)[0])
    assert kernels.compress(w, prune=False)[2] == first_bad


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_six_patterns_round_trip(kernels, dtype):
    nib = [0x4, 0x8, 0x9, 0xC, 0xD, 0xE]
    rows = []
    for a, b in SIX_PAIRS:
        g = torch.zeros(4)
        g[a], g[b] = -1.5, 2.0
        rows.append(g)
    w = torch.stack(rows).reshape(1, 24).repeat(3, 1).to(dtype)  # 6 groups per row
    values, meta, bad = kernels.compress(w, prune=False)
    assert bad == -1
    nibbles = np.stack([meta.numpy() & 0xF, meta.numpy() >> 4], axis=2).reshape(3, -1)
    np.testing.assert_array_equal(nibbles, np.tile(nib, (3, 1)))
    back = kernels.decompress(values, meta, 24)
    assert torch.equal(back.view(torch.uint8), w.view(torch.uint8))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("n,k", [(4, 4), (3, 36), (5, 68), (9, 264)])
def test_decompress_matches_reference(kernels, dtype, n, k):
    gen = torch.Generator().manual_seed(n + k)
    w = sparse_weight(n, k, dtype, gen)
    w[0, 0] = -0.0
    values, meta, _ = kernels.compress(w, prune=False)
    out = kernels.decompress(values, meta, k)
    ref = reference_decompress(values, meta.numpy(), k)
    assert torch.equal(out.contiguous().view(torch.uint8), ref.contiguous().view(torch.uint8))
    assert torch.equal(out, w)  # a 2:4 weight round-trips (a dropped -0.0 comes back as +0.0)


@pytest.mark.parametrize("n,k", [(1, 4), (16, 32), (20, 100), (130, 72)])
def test_reorder_meta_layout(kernels, n, k):
    gen = torch.Generator().manual_seed(n * k)
    w = sparse_weight(n, k, torch.float16, gen)
    _, meta, _ = kernels.compress(w)
    got = kernels.kernel_meta(meta, n, k).numpy().view(np.uint32)
    np.testing.assert_array_equal(got, reference_kernel_meta(meta.numpy(), n, k))


# ---- GEMM ----------------------------------------------------------------------------------------
GEMM_SHAPES = [  # (M, N, K): tails in every dimension, K % 32 != 0, fewer k-tiles than stages
    (0, 24, 64), (1, 40, 36), (7, 24, 200), (16, 72, 64), (17, 136, 100), (64, 40, 128), (129, 260, 264),
]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("config", [LARGE_M, DECODE, WGMMA, MID_M])
@pytest.mark.parametrize("m,n,k", GEMM_SHAPES)
def test_gemm_exact_small_integers(kernels, dtype, config, m, n, k):
    gen = torch.Generator().manual_seed(m * 7 + n * 13 + k)
    w = sparse_weight(n, k, dtype, gen, -2, 3)
    x = torch.randint(-2, 3, (m, k), generator=gen).to(dtype)
    bias = torch.randint(-3, 4, (n,), generator=gen).to(dtype)
    values, meta, _ = kernels.compress(w, prune=False)
    y = kernels.gemm(x, values, meta, n, k, bias=bias, act="relu", config=config)
    ref = torch.relu(x.double() @ w.double().T + bias.double()).to(dtype)
    assert torch.equal(y, ref)


def assert_gemm_within_twice_dense_error(kernels, x, w_dense, bias, act, config, split_k):
    """The GEMM on the pruned w_dense within twice the error of torch's dense matmul at the same
    dtype (on x's device), both against float64."""
    n, k = w_dense.shape
    values, meta, _ = kernels.compress(w_dense, prune=True)
    w = kernels.decompress(values, meta, k)
    y = kernels.gemm(x, values, meta, n, k, bias=bias, act=act, config=config, split_k=split_k)
    exact = activation(x.double() @ w.double().T + bias.double(), act)
    dense = activation((torch.matmul(x, w.T) + bias).double(), act)
    base_err = (dense - exact).abs().max().item()
    err = (y.double() - exact).abs().max().item()
    assert err <= 2 * base_err + 1e-6, (err, base_err)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("config,split_k", [(LARGE_M, 0), (WGMMA, 0), (DECODE, 0), (DECODE, 3), (MID_M, 0),
                                            (MID_M, 3)])
@pytest.mark.parametrize("act", ["none", "gelu", "silu", "swiglu", "geglu"])
def test_gemm_random_within_twice_dense_error(kernels, dtype, config, split_k, act):
    # The mid-M tile: a whole 64-row block and one of 36 (16-byte X rows: the copies through
    # precomputed pointers, whose third pass stops at row 36 and fourth copies nothing).
    m, n, k = {DECODE: (9, 72, 520), MID_M: (100, 136, 520)}.get(config, (33, 136, 132))
    if act in GATE_OF:
        n = (n + 15) // 16 * 16  # gate and up rows in runs of 8: whole 16-row pairs
    gen = torch.Generator().manual_seed(11)
    w_dense = torch.randn(n, k, generator=gen).to(dtype)
    x = torch.randn(m, k, generator=gen).to(dtype)
    bias = torch.randn(n, generator=gen).to(dtype)
    assert_gemm_within_twice_dense_error(kernels, x, w_dense, bias, act, config, split_k)


# Gated (GLU) epilogue: N rows of W = gate and up rows alternating in runs of 8; shapes with a
# partial last N tile (144 = 128 + 16 on both tiles' 128 rows), partial M tiles and a K tail.
GATED_SHAPES = [(1, 16, 36), (7, 48, 200), (17, 144, 100), (130, 144, 72)]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("config,split_k", [(LARGE_M, 0), (WGMMA, 0), (DECODE, 0), (DECODE, 3), (MID_M, 3)])
@pytest.mark.parametrize("m,n,k", GATED_SHAPES)
def test_gemm_gated_exact_small_integers(kernels, dtype, config, split_k, m, n, k):
    """relu(gate) * up with small integers: every fp32 step is exact, so the one rounding of the
    product to the output dtype must equal the float64 reference's, bit for bit. A gate paired
    with the wrong up row (or written to the wrong column) cannot pass."""
    gen = torch.Generator().manual_seed(m * 5 + n + k)
    w = sparse_weight(n, k, dtype, gen, -2, 3)
    x = torch.randint(-2, 3, (m, k), generator=gen).to(dtype)
    bias = torch.randint(-3, 4, (n,), generator=gen).to(dtype)
    values, meta, _ = kernels.compress(w, prune=False)
    y = kernels.gemm(x, values, meta, n, k, bias=bias, act="reglu", config=config, split_k=split_k)
    ref = activation(x.double() @ w.double().T + bias.double(), "reglu").to(dtype)
    assert y.shape == (m, n // 2)
    assert torch.equal(y, ref)


@pytest.mark.parametrize("config", [LARGE_M, DECODE, WGMMA, MID_M])
def test_gemm_gated_output_stride(kernels, config):
    """A gated Y inside a wider buffer (row stride 29 > N / 2 = 24): the N / 2 columns of each row
    land where they belong and nothing is written past them."""
    m, n, k = 5, 48, 40
    gen = torch.Generator().manual_seed(3)
    w = sparse_weight(n, k, torch.float16, gen, -2, 3)
    x = torch.randint(-2, 3, (m, k), generator=gen).to(torch.float16)
    values, meta, _ = kernels.compress(w, prune=False)
    store = torch.full((m, 29), 42.0, dtype=torch.float16)
    kernels.gemm(x, values, meta, n, k, act="reglu", config=config, y=store[:, :24])
    ref = activation(x.double() @ w.double().T, "reglu").to(torch.float16)
    assert torch.equal(store[:, :24], ref)
    assert torch.all(store[:, 24:] == 42)


def test_gemm_gated_refuses_n_not_a_multiple_of_16(kernels):
    x = torch.zeros((2, 8), dtype=torch.float16)
    values, meta, _ = kernels.compress(torch.zeros((24, 8), dtype=torch.float16), prune=True)
    with pytest.raises(ValueError, match="multiple of 16, got N = 24"):
        kernels.gemm(x, values, meta, 24, 8, act="swiglu")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("config,split_k", [(DECODE, 3), (DECODE, 0), (DECODE, 16), (DECODE_TMA, 3),
                                            (WGMMA_TMA_SPLIT, 3), (MID_M, 3)])
def test_split_k_reduction_does_not_depend_on_block_order(shuffled_block_orders, dtype, config, split_k):
    # Whichever split of a tile arrives last sums all of them in split order: bit-identical
    # outputs under every order of the blocks (random values, so that a different summation
    # order would show), and the tile counters are left zero (KernelBackend checks).
    kernels = KernelBackend("simt")
    m, n, k = 5, 200, 1568
    gen = torch.Generator().manual_seed(3 + split_k)
    w = sparse_weight(n, k, dtype, gen)
    w = (w.double() * torch.rand(n, k, generator=gen, dtype=torch.float64)).to(dtype)
    x = torch.randn(m, k, generator=gen).to(dtype)
    bias = torch.randn(n, generator=gen).to(dtype)
    values, meta, _ = kernels.compress(w, prune=False)
    assert kernels.gemm_scratch(m, n, k, config, split_k)[1] > 0
    outputs = []
    for seed in shuffled_block_orders:
        _C.simt_set_block_order(seed)
        outputs.append(kernels.gemm(x, values, meta, n, k, bias=bias, act="silu", config=config, split_k=split_k))
    for y in outputs[1:]:
        assert torch.equal(bit_view(y), bit_view(outputs[0]))
    dense = (x.double() @ w.double().T + bias.double()).float()
    assert torch.allclose(outputs[0].float(), torch.nn.functional.silu(dense), rtol=2e-2, atol=2e-2)


@pytest.fixture
def stale_relaxed_loads():
    """Emulator launches whose relaxed 64-bit loads return the launch's first value at their
    address (emulator.h relaxed_load_u64); current values again afterwards."""
    _C.simt_set_stale_relaxed_loads(True)
    yield
    _C.simt_set_stale_relaxed_loads(False)


@pytest.mark.parametrize("config,split_k", [(DECODE, 3), (DECODE, 16), (WGMMA_TMA_SPLIT, 3), (MID_M, 3)])
def test_split_k_arrivals_survive_stale_reads_of_their_counter(stale_relaxed_loads, config, split_k):
    # Every block after the first reads its tile's counter as it was before the launch (random
    # contents: KernelBackend), so its compare-and-swap fails against the claimed word and it must
    # retry, find the launch's token and add: still exactly one last block per tile (the output
    # equals the fresh-read run's, bit for bit) and every counter left zero.
    kernels = KernelBackend("simt")
    m, n, k = 5, 200, 1568
    x, values, meta, bias = random_gemm_operands(kernels, m, n, k, torch.float16, 11 + split_k)
    stale = kernels.gemm(x, values, meta, n, k, bias=bias, config=config, split_k=split_k)
    _C.simt_set_stale_relaxed_loads(False)
    fresh = kernels.gemm(x, values, meta, n, k, bias=bias, config=config, split_k=split_k)
    assert not stale.isnan().any() and torch.equal(bit_view(stale), bit_view(fresh))


@pytest.mark.parametrize("config", [DECODE, MID_M])
def test_split_k_sums_its_splits_in_split_order(kernels, config):
    # Partial sums +2^24, +1 and -2^24 (one k-tile per split, each exact): in split order fp32 gives
    # (2^24 + 1) - 2^24 = 0, what one pass over K gives; any other order gives 1. Block-order tests
    # alone would pass a reduction in another fixed order.
    m, n, k = 1, 16, 192
    w, x = torch.zeros(n, k), torch.zeros(m, k)
    w[:, [0, 1, 4, 5]], x[0, [0, 1, 4, 5]] = 2048.0, 2048.0
    w[:, 64], x[0, 64] = 1.0, 1.0
    w[:, [128, 129, 132, 133]], x[0, [128, 129, 132, 133]] = -2048.0, 2048.0
    values, meta, _ = kernels.compress(w.half(), prune=False)
    one_pass = kernels.gemm(x.half(), values, meta, n, k, config=config, split_k=1)
    split = kernels.gemm(x.half(), values, meta, n, k, config=config, split_k=3)
    assert kernels.gemm_scratch(m, n, k, config, 3)[1] > 0 and torch.count_nonzero(one_pass) == 0
    assert torch.equal(bit_view(split), bit_view(one_pass))


def test_split_k_needs_the_decode_tile_and_its_scratch(kernels):
    with pytest.raises(ValueError, match=r"split_k = 2 needs the decode tile \(config 1 or 4\)"):
        kernels.gemm_scratch(130, 136, 520, LARGE_M, 2)
    # A split launch without its workspace and counters is refused before anything runs.
    m, n, k = 3, 40, 1024
    assert kernels.gemm_scratch(m, n, k)[1] > 0
    x = torch.zeros(m, k, dtype=torch.float16, device=kernels.device)
    values = torch.zeros(n, k // 2, dtype=torch.float16, device=kernels.device)
    meta = torch.zeros(getattr(_C, f"{kernels.name}_kernel_meta_bytes")(n, k), dtype=torch.uint8, device=kernels.device)
    y = torch.empty(m, n, dtype=torch.float16, device=kernels.device)
    with pytest.raises(ValueError, match="needs a workspace and tile counters"):
        kernels._launch("gemm", m, n, k, x.data_ptr(), k, values.data_ptr(), meta.data_ptr(), 0, y.data_ptr(), n,
                        DTYPE_CODES[torch.float16], 0, 0, 0, -1, 0)
    # Counters are 64-bit words updated by 64-bit atomics, which fault on a misaligned address.
    workspace_bytes, counters = kernels.gemm_scratch(m, n, k)
    workspace = torch.empty(workspace_bytes, dtype=torch.uint8, device=kernels.device)
    words = torch.zeros(counters + 1, dtype=torch.int64, device=kernels.device)
    with pytest.raises(ValueError, match="tile_counters must be 8-byte aligned uint64 words, got address"):
        kernels._launch("gemm", m, n, k, x.data_ptr(), k, values.data_ptr(), meta.data_ptr(), 0, y.data_ptr(), n,
                        DTYPE_CODES[torch.float16], 0, workspace.data_ptr(), words.data_ptr() + 4, -1, 0)


def test_split_k_is_at_most_16(kernels):
    # A tile counter counts arrivals in 8 bits beside its launch's token; the plans never pass 16.
    assert kernels.gemm_scratch(1, 64, 8192, DECODE, 16)[0] == 16 * 64 * 4
    with pytest.raises(ValueError, match="split_k must be at most 16, got 17"):
        kernels.gemm_scratch(1, 64, 8192, DECODE, 17)
    with pytest.raises(ValueError, match="split_k must be at most 16, got 300"):
        kernels.gemm_scratch(1, 64, 65536, WGMMA_TMA_SPLIT, 300)


def test_gemm_decode_auto_split_uses_workspace(kernels):
    m, n, k = 3, 40, 1024  # 16 k-tiles over one N block: the heuristic splits K
    assert kernels.gemm_scratch(m, n, k)[0] > 0
    gen = torch.Generator().manual_seed(2)
    w = sparse_weight(n, k, torch.float16, gen, -1, 2)
    x = torch.randint(-1, 2, (m, k), generator=gen).to(torch.float16)
    values, meta, _ = kernels.compress(w, prune=False)
    y = kernels.gemm(x, values, meta, n, k)
    assert torch.equal(y, (x.double() @ w.double().T).to(torch.float16))


# The split each decode shape gets on an H200 (132 SMs, two decode blocks an SM): the fastest of
# 1 / 2 / 3 / 4 / 6 / 8 splits measured there with dependent launches (bench/results/
# 2026-11-26-H200-run16 and -run17, sweep.txt, both runs), fp16 and INT8, or one within 2% of it;
# gemm_heuristics.h decode_split_cost was fitted to them. Exceptions, noted in decode_split_cost:
# INT8 1 x 8192 x 8192 measured fastest with 4 splits (16.1-16.3 us against 16.6 us), fp16 16 x
# 22016 x 4096 with 3 (34.6 us against 36.5 us, two waves of blocks), and fp16 1 x 22016 x 4096
# differed between the two runs.
H200_BEST_SPLITS = {  # (M, N, K): (fp16, int8)
    (1, 11008, 4096): (3, 3), (16, 11008, 4096): (3, 1), (1, 4096, 11008): (8, 4), (16, 4096, 11008): (8, 4),
    (1, 8192, 8192): (4, 2), (16, 8192, 8192): (4, 2), (1, 22016, 4096): (1, 1), (16, 22016, 4096): (1, 1),
}


@pytest.mark.parametrize("shape", list(H200_BEST_SPLITS))
def test_decode_split_rule_picks_the_measured_best_on_h200(shape):
    for s8, best in zip((False, True), H200_BEST_SPLITS[shape]):
        config, split_k, _ = _C.plan_gemm(*shape, sms=132, blocks_per_sm=2, s8=s8)
        assert (config, split_k) == (DECODE, best), (shape, s8)


def test_decode_split_rule_stays_within_one_wave():
    # A100-like: 108 SMs, one decode block each. Finer splits would balance the SMs better on
    # paper, but every block past the first wave waits for a whole block to finish.
    for m, n, k in H200_BEST_SPLITS:
        for s8 in (False, True):
            _, split_k, _ = _C.plan_gemm(m, n, k, sms=108, blocks_per_sm=1, s8=s8)
            assert split_k * ((n + 127) // 128) <= 108 or split_k == 1
    assert _C.plan_gemm(1, 4096, 11008, sms=108, blocks_per_sm=1)[1] == 3  # 32 blocks x 3 fill 96 SMs
    # Large M never splits; K = 0 plans no split.
    assert _C.plan_gemm(4096, 4096, 4096, sms=132, blocks_per_sm=2)[:2] == (LARGE_M, 1)
    assert _C.plan_gemm(1, 4096, 0, sms=132, blocks_per_sm=2)[1] == 1


def test_large_m_takes_the_wgmma_tile_where_the_gpu_runs_it():
    for s8 in (False, True):
        assert _C.plan_gemm(4096, 4096, 4096, sms=132, blocks_per_sm=2, s8=s8, wgmma=True)[:2] == (WGMMA, 1)
        assert _C.plan_gemm(16, 4096, 4096, sms=132, blocks_per_sm=2, s8=s8, wgmma=True)[0] == DECODE
    # Mid-size M keeps the decode tile only for the 16-bit GEMM on a wgmma GPU, N and K of 4096 or
    # more (what was timed): not int8, not other GPUs, not narrower layers or convolutions.
    assert _C.plan_gemm(32, 4096, 4096, sms=132, blocks_per_sm=2, wgmma=True)[0] == DECODE
    assert _C.plan_gemm(17, 4096, 4096, sms=132, blocks_per_sm=2, s8=True, wgmma=True)[0] == WGMMA
    assert _C.plan_gemm(32, 4096, 4096, sms=108, blocks_per_sm=1)[0] == LARGE_M
    for shape in [(32, 1024, 4096), (32, 4096, 2048), (392, 512, 4608), (58, 144, 96)]:
        assert _C.plan_gemm(*shape, sms=132, blocks_per_sm=2, wgmma=True)[0] == WGMMA, shape


# H200 graph replay from DRAM, fp16 (bench/results/2026-11-27-H200-run22/mid_m.txt): the decode
# tile's and the wgmma tile's time in us, (M, N, K): (decode, wgmma).
H200_MID_M_US = {
    (32, 4096, 4096): (14.5, 43.8), (64, 4096, 4096): (24.7, 43.8), (128, 4096, 4096): (36.1, 44.2),
    (256, 4096, 4096): (71.5, 45.1), (512, 4096, 4096): (141.4, 47.2), (1024, 4096, 4096): (280.0, 58.8),
    (32, 11008, 4096): (35.3, 54.6), (64, 11008, 4096): (70.8, 53.5), (128, 11008, 4096): (105.9, 54.0),
    (256, 11008, 4096): (198.6, 55.6), (512, 11008, 4096): (371.8, 103.4), (1024, 11008, 4096): (730.7, 161.4),
    (32, 4096, 11008): (29.1, 103.3), (64, 4096, 11008): (62.7, 103.2), (128, 4096, 11008): (92.9, 103.2),
    (256, 4096, 11008): (185.5, 104.2), (512, 4096, 11008): (371.3, 105.6), (1024, 4096, 11008): (737.7, 136.9),
}


@pytest.mark.parametrize("shape", list(H200_MID_M_US))
def test_mid_size_m_takes_the_tile_measured_faster_on_h200(shape):
    decode_us, wgmma_us = H200_MID_M_US[shape]
    config, split_k, _ = _C.plan_gemm(*shape, sms=132, blocks_per_sm=2, wgmma=True)
    assert config == (DECODE if decode_us < wgmma_us else WGMMA), shape
    if config == DECODE:  # the split the decode rule gives those rows (one wave, as at M <= 16)
        assert split_k * ((shape[0] + 15) // 16) * ((shape[1] + 127) // 128) <= 264 or split_k == 1
    # The emulator plans like an sm_80 GPU (its tests force config 2).
    assert not _C.simt_large_m_uses_wgmma()


@pytest.mark.parametrize("tiles_m,tiles_n", [(1, 1), (1, 40), (3, 17), (5, 16), (2, 33), (64, 64), (256, 32)])
def test_raster_order_visits_every_output_tile_once_in_bands(tiles_m, tiles_n):
    tiles = _C.raster_output_tiles(tiles_m, tiles_n)
    assert sorted(tiles) == [(m, n) for m in range(tiles_m) for n in range(tiles_n)]
    if tiles_m == 1:  # decode grids keep the plain order
        assert tiles == [(0, n) for n in range(tiles_n)]
    band = 16
    for block, (m, n) in enumerate(tiles):
        first_n = block // (band * tiles_m) * band
        assert first_n <= n < first_n + band, (block, m, n)
    # 264 blocks resident at once on an H200 (two an SM), inside a band of an 8192 x 8192 output:
    # 16 N tiles x at most 18 M tiles, where the plain order spans 5 N tiles and all 64 M tiles.
    if (tiles_m, tiles_n) == (64, 64):
        for start in range(0, band * tiles_m - 264, 37):
            wave = tiles[start:start + 264]
            assert len({n for _, n in wave}) == 16 and len({m for m, _ in wave}) <= 18


def test_raster_order_refuses_empty_and_oversized_grids():
    with pytest.raises(ValueError, match="raster_output_tiles: tiles_m and tiles_n must be at least 1"):
        _C.raster_output_tiles(0, 4)
    with pytest.raises(ValueError, match=r"at most 16777216 tiles in all, got 65536 x 65536"):
        _C.raster_output_tiles(65536, 65536)


@pytest.mark.parametrize("config", [LARGE_M, WGMMA])
def test_gemm_tiles_past_the_first_raster_band(kernels, config):
    # 3 M tiles x 18 N tiles: a whole band of 16 N tiles, then a partial one of 2 whose last tile
    # holds 16 of 128 rows; each block's output lands where its tile says (exact small integers).
    m, n, k = 260, 17 * 128 + 16, 36
    gen = torch.Generator().manual_seed(17)
    w = sparse_weight(n, k, torch.float16, gen, -2, 3)
    x = torch.randint(-2, 3, (m, k), generator=gen).to(torch.float16)
    values, meta, _ = kernels.compress(w, prune=False)
    y = kernels.gemm(x, values, meta, n, k, config=config)
    assert torch.equal(y, (x.double() @ w.double().T).to(torch.float16))


# ---- the TMA pipelines (configs 3 and 4) ---------------------------------------------------------
# The wgmma and decode tiles with their stages copied by TMA run the same MMAs in the same order on
# the same bytes as the cp.async-fed tiles (configs 2 and 1, checked against the oracles above), so
# on random values each pair must agree bit for bit. Shapes: M and N tails (TMA's zero fill past
# M, N and K; N a multiple of 16 for the gated epilogue), K = 160 ending inside a k-tile, 16
# k-tiles = four rounds of the 4 stages (both mbarrier phase parities, refills), and 3 x 18 output
# tiles crossing a raster band. Wc rows must be whole 16 bytes (K % 16 == 0 for 16-bit operands).
TMA_SHAPES = [(1, 32, 16), (33, 144, 160), (130, 304, 1024), (260, 17 * 128 + 16, 64)]
# The 256-row tile (config 5): N past one 256-row tile, and 2 x 18 output tiles crossing a raster band.
TMA_WIDE_SHAPES = [(1, 32, 16), (33, 272, 160), (130, 304, 1024), (130, 17 * 256 + 16, 64)]


def random_gemm_operands(kernels, m, n, k, dtype, seed, ldx=None):
    """Random-valued (not small-integer) X[m, k] (rows ldx apart), a pruned W[n, k] compressed by
    the backend, and a bias: products round, so a different summation order would show."""
    gen = torch.Generator().manual_seed(seed)
    w = sparse_weight(n, k, dtype, gen)
    w = (w.double() * torch.rand(n, k, generator=gen, dtype=torch.float64)).to(dtype)
    x = torch.randn(m, ldx or k, generator=gen).to(dtype)[:, :k]
    bias = torch.randn(n, generator=gen).to(dtype)
    values, meta, _ = kernels.compress(w, prune=False)
    return x, values, meta, bias


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("act", ["gelu", "swiglu"])
@pytest.mark.parametrize("config,m,n,k", [(WGMMA_TMA, *shape) for shape in TMA_SHAPES] +
                         [(WGMMA_TMA_WIDE, *shape) for shape in TMA_WIDE_SHAPES])
def test_tma_gemm_equals_the_cp_async_wgmma_tile(kernels, dtype, act, config, m, n, k):
    x, values, meta, bias = random_gemm_operands(kernels, m, n, k, dtype, m + n + k)
    y_tma = kernels.gemm(x, values, meta, n, k, bias=bias, act=act, config=config)
    y_cp_async = kernels.gemm(x, values, meta, n, k, bias=bias, act=act, config=WGMMA)
    assert not y_tma.isnan().any()
    assert torch.equal(y_tma, y_cp_async)


# Decode: M in the tile's 16 rows (1: half its 8-row B tiles skipped), K = 160 (2.5 k-tiles: a
# stage of two k-tiles half used), K = 2048 (32 k-tiles: four rounds of the 4 stages of 2 k-tiles),
# with the heuristic's split, one split, and 3 splits (at K = 2048 k-tiles 11, 11, 10: the first
# two end on a half-used stage).
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("m,n,k", [(1, 32, 160), (7, 144, 2048), (16, 304, 1024)])
@pytest.mark.parametrize("split_k", [0, 1, 3])
def test_tma_decode_equals_the_cp_async_decode_tile(kernels, dtype, m, n, k, split_k):
    x, values, meta, bias = random_gemm_operands(kernels, m, n, k, dtype, m + n + k + split_k)
    y_tma = kernels.gemm(x, values, meta, n, k, bias=bias, act="swiglu", config=DECODE_TMA, split_k=split_k)
    y_cp_async = kernels.gemm(x, values, meta, n, k, bias=bias, act="swiglu", config=DECODE, split_k=split_k)
    assert not y_tma.isnan().any()
    assert torch.equal(y_tma, y_cp_async)


# The wgmma tile with K split (config 6): one split is config 3's kernel with a split-K tail that
# does not run, bit for bit; with several, each split's partial sums are the decode tile's for the
# same k-tiles (both tiles accumulate one k-step after another in fp32, the emulator's one model
# for mma.sp and wgmma) and the last block adds them in split order as the decode tile does, so the
# decode tile forced to the same split is its bit-exact reference. Shapes: M and N tails, a split
# ending inside the k-tiles (17 k-tiles over 3 splits: 6, 6, 5), 16 k-tiles over 2 (two rounds of
# the 4 stages a split), and 3 x 18 output tiles crossing a raster band.
SPLIT_WGMMA_SHAPES = [(33, 144, 1088), (130, 304, 1024), (260, 17 * 128 + 16, 512)]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("act", ["gelu", "swiglu"])
@pytest.mark.parametrize("m,n,k", SPLIT_WGMMA_SHAPES)
def test_split_k_wgmma_equals_the_decode_tile_at_the_same_split(kernels, dtype, act, m, n, k):
    x, values, meta, bias = random_gemm_operands(kernels, m, n, k, dtype, m + n + k)
    unsplit = kernels.gemm(x, values, meta, n, k, bias=bias, act=act, config=WGMMA_TMA_SPLIT, split_k=1)
    assert kernels.gemm_scratch(m, n, k, WGMMA_TMA_SPLIT, 1) == (0, 0)
    assert torch.equal(unsplit, kernels.gemm(x, values, meta, n, k, bias=bias, act=act, config=WGMMA_TMA))
    for split_k in (2, 3):
        workspace, counters = kernels.gemm_scratch(m, n, k, WGMMA_TMA_SPLIT, split_k)
        assert workspace == split_k * m * n * 4 and counters == -(-m // 128) * -(-n // 128)
        y = kernels.gemm(x, values, meta, n, k, bias=bias, act=act, config=WGMMA_TMA_SPLIT, split_k=split_k)
        assert not y.isnan().any()
        assert torch.equal(y, kernels.gemm(x, values, meta, n, k, bias=bias, act=act, config=DECODE, split_k=split_k))


def test_split_k_wgmma_splits_to_fill_one_wave():
    # Unforced (split_k 0), config 6 takes as many splits as keep the tiles' blocks within one wave,
    # no more than k-tiles / 4, at most 16: the emulator plans for 4 SMs of 2 blocks.
    kernels = KernelBackend("simt")
    def splits(m, n, k):
        workspace, counters = kernels.gemm_scratch(m, n, k, WGMMA_TMA_SPLIT, 0)
        return workspace // (4 * m * n) if counters else 1
    assert splits(33, 144, 4096) == 4     # 2 tiles: 8 blocks
    assert splits(33, 144, 512) == 2      # 8 k-tiles: 2 splits of 4
    assert splits(300, 300, 4096) == 1    # 9 tiles already fill the wave
    assert splits(1, 128, 8192) == 8
    assert splits(1, 128, 65536) == 8     # the wave, not kMaxSplitK, binds


def test_split_k_wgmma_is_refused_where_it_does_not_apply(kernels):
    with pytest.raises(ValueError, match=r"config 6 \(the wgmma tile with K split\) serves the fp16 / bf16 GEMM, "
                                         r"not the int8 one"):
        kernels.gemm_scratch(64, 64, 256, WGMMA_TMA_SPLIT, 0, s8=True)
    with pytest.raises(ValueError, match=r"split_k = 2 needs the decode tile \(config 1 or 4\), config 6 or config 7"):
        kernels.gemm_scratch(64, 64, 256, WGMMA_TMA, 2)


@pytest.mark.parametrize("config,cp_async_config,m", [(WGMMA_TMA, WGMMA, 7), (WGMMA_TMA, WGMMA, 130),
                                                     (WGMMA_TMA_WIDE, WGMMA, 130), (DECODE_TMA, DECODE, 7)])
def test_tma_gemm_reads_x_rows_through_their_stride(kernels, config, cp_async_config, m):
    # X rows ldx = K + 24 apart (48 bytes more: a 16-byte multiple) inside a wider buffer.
    n, k = 136, 320
    x, values, meta, bias = random_gemm_operands(kernels, m, n, k, torch.float16, m, ldx=k + 24)
    y_tma = kernels.gemm(x, values, meta, n, k, bias=bias, config=config)
    assert torch.equal(y_tma, kernels.gemm(x, values, meta, n, k, bias=bias, config=cp_async_config))


@pytest.mark.parametrize("config,tile,fallback", [(WGMMA_TMA, "wgmma", WGMMA), (DECODE_TMA, "decode", DECODE),
                                                 (WGMMA_TMA_WIDE, "256-row wgmma", WGMMA),
                                                 (WGMMA_TMA_SPLIT, "K-split wgmma", WGMMA)])
def test_tma_gemm_refuses_what_a_tensor_map_cannot_describe(kernels, config, tile, fallback):
    gen = torch.Generator().manual_seed(2)
    w = sparse_weight(20, 1000, torch.float16, gen)  # Wc rows of 1000 bytes: not whole 16 bytes
    values, meta, _ = kernels.compress(w, prune=False)
    with pytest.raises(ValueError, match=rf"config {config} \(the {tile} tile fed by TMA\) needs Wc 16-byte aligned "
                                         rf".* got 1000-byte rows \(K = 1000\); config {fallback} takes any operand"):
        kernels.gemm(torch.zeros((3, 1000), dtype=torch.float16), values, meta, 20, 1000, config=config)
    w = sparse_weight(20, 64, torch.float16, gen)
    values, meta, _ = kernels.compress(w, prune=False)
    x = torch.zeros((3, 68), dtype=torch.float16)[:, :64]  # rows 136 bytes apart
    with pytest.raises(ValueError, match=r"needs X 16-byte aligned with rows a multiple of 16 bytes apart, "
                                         r"below 2\^40 bytes, got ldx = 68"):
        kernels.gemm(x, values, meta, 20, 64, config=config)
    # One row may have any stride; a tensor map's must be below 2^40 bytes (the encoder failed).
    far = torch.zeros(64, dtype=torch.float16).as_strided((1, 64), (1 << 40, 1))
    with pytest.raises(ValueError, match=r"below 2\^40 bytes, got ldx = 1099511627776 elements of 2 bytes"):
        kernels.gemm(far, values, meta, 20, 64, config=config)


@pytest.mark.parametrize("setting", ["off", "true", "2"])
def test_an_unknown_tma_setting_is_refused(tmp_path, setting):
    # SPARSEGEMM_TMA is read once per process (so in a child, run from a scratch folder: from the
    # checkout it would import the unbuilt source tree), by the first GEMM the heuristic plans; "off"
    # must not silently mean the default (on).
    script = textwrap.dedent("""
        import torch, sparsegemm
        sw = sparsegemm.compress(torch.randn(32, 64).half(), prune=True)
        sparsegemm.linear(torch.randn(20, 64).half(), sw, backend="simt")
    """)
    run = subprocess.run([sys.executable, "-c", script], env=dict(os.environ, SPARSEGEMM_TMA=setting),
                         cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert run.returncode != 0 and (f"SPARSEGEMM_TMA must be unset (TMA for large M), 0 (no TMA), 1 (large M and "
                                    f"decode) or wide (the 256-row tile), got '{setting}'") in run.stderr, run.stderr


def test_tma_gemm_encodes_each_tensor_map_once(kernels):
    # A TMA GEMM's three tensor maps (Wc, X, metadata) are encoded at its first call; the same call
    # again takes all three from the memo (kernels_dispatch.cuh tensor_map_2d); another X buffer
    # encodes X's map alone, and the 256-row tile (other Wc and metadata boxes) those two. Each
    # result equals the cp.async tile's on the same operands.
    if kernels.name == "cuda" and not _C.cuda_large_m_uses_wgmma():
        pytest.skip("the TMA pipelines run on compute capability 9.0 GPUs with an sm_90a build")
    m, n, k = 7, 152, 352  # shapes no other test uses: the memo outlives a test, addresses get reused
    x, values, meta, bias = random_gemm_operands(kernels, m, n, k, torch.float16, 11)
    x, values, bias = kernels.to_device(x), kernels.to_device(values), kernels.to_device(bias)
    kmeta = kernels.to_device(kernels.kernel_meta(meta, n, k))
    memo = getattr(_C, f"{kernels.name}_tensor_map_memo_stats")

    def gemm(x_dev, config=WGMMA_TMA):
        y = torch.full((m, n), float("nan"), dtype=torch.float16, device=kernels.device)
        kernels._launch("gemm", m, n, k, x_dev.data_ptr(), x_dev.stride(0), values.data_ptr(), kmeta.data_ptr(),
                        bias.data_ptr(), y.data_ptr(), y.stride(0), DTYPE_CODES[torch.float16], ACT_CODES["none"], 0, 0,
                        config, 0)
        return y.cpu()

    first = gemm(x)
    hits, encodes = memo()
    assert torch.equal(first, gemm(x, WGMMA))
    assert torch.equal(gemm(x), first) and memo() == (hits + 3, encodes)
    other = -x
    assert torch.equal(gemm(other), gemm(other, WGMMA)) and memo() == (hits + 5, encodes + 1)
    assert torch.equal(gemm(other, WGMMA_TMA_WIDE), gemm(other, WGMMA)) and memo() == (hits + 6, encodes + 3)


def test_gemm_config_out_of_range_is_refused(kernels):
    with pytest.raises(ValueError, match=r"config must be -1 \(choose\), 0 .* got 8"):
        kernels.gemm_scratch(64, 64, 64, 8, 0)


def test_forced_mid_m_tile_splits_k_by_the_decode_rule_over_its_own_blocks():
    # 70 x 40 x 8192: two 64-row tiles (the decode tile has five 16-row ones), 128 k-tiles. On the
    # emulator's 4 SMs x 2 the decode rule gives the two tiles 4 splits (8 blocks, one wave), where
    # the decode tile's five can take just one. Forced splits are kept as given.
    kernels = KernelBackend("simt")
    m, n, k = 70, 40, 8192
    assert kernels.gemm_scratch(m, n, k, MID_M, 0) == (4 * m * n * 4, 2)
    assert kernels.gemm_scratch(m, n, k, DECODE, 0) == (0, 0)
    assert kernels.gemm_scratch(m, n, k, MID_M, 3) == (3 * m * n * 4, 2)
    assert kernels.gemm_scratch(m, n, k, MID_M, 1) == (0, 0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("config", [LARGE_M, DECODE, WGMMA])
def test_gemm_fast_wc_copies_stop_before_the_end_of_k(kernels, dtype, config):
    # Both tiles copy whole 128-row blocks of Wc with precomputed pointers only while a
    # stage lies below Kc; the stage that crosses it (k = 208: Kc = 104, 16-byte copies allowed,
    # the last stage's compressed columns 104..127 are padding) takes the checked path. Copied
    # through, row r's padding would hold row r + 1's first values, and row 1 starts with +inf:
    # inf x (zero X column) = NaN in output row 0.
    m, n, k = 3, 256, 208
    gen = torch.Generator().manual_seed(5)
    w = sparse_weight(n, k, dtype, gen, -2, 3)
    w[1, :4] = torch.tensor([float("inf"), 1.0, 0.0, 0.0], dtype=dtype)
    x = torch.randint(-2, 3, (m, k), generator=gen).to(dtype)
    x[:, 0] = 1  # row 1 of the output: +inf, not NaN
    values, meta, _ = kernels.compress(w, prune=False)
    y = kernels.gemm(x, values, meta, n, k, config=config)
    ref = (x.double() @ w.double().T).to(dtype)
    assert torch.equal(y, ref)


@pytest.mark.parametrize("config", [LARGE_M, DECODE, WGMMA])
@pytest.mark.parametrize("m", [16, 130])
@pytest.mark.parametrize("offset", [0, 1])
def test_gemm_fast_x_copies_follow_the_row_stride(kernels, config, m, offset):
    # Whole blocks of X rows take the copies with precomputed pointers: rows ldx = K + 8 apart
    # (offset 0: 16-byte aligned, so the fast copies run) or at a 2-byte offset (offset 1: no
    # 16-byte copies allowed, the element path must run instead).
    n, k = 136, 264
    gen = torch.Generator().manual_seed(m + offset)
    w = sparse_weight(n, k, torch.float16, gen, -2, 3)
    x_store = torch.randint(-2, 3, (m, k + 8), generator=gen).to(torch.float16)
    x = x_store[:, offset:k + offset]
    values, meta, _ = kernels.compress(w, prune=False)
    y = kernels.gemm(x, values, meta, n, k, config=config)
    assert torch.equal(y, (x.double() @ w.double().T).to(torch.float16))


@pytest.mark.parametrize("config", [LARGE_M, DECODE, WGMMA])
def test_gemm_unaligned_operands_and_output_stride(kernels, config):
    m, n, k = 5, 20, 48
    gen = torch.Generator().manual_seed(4)
    w = sparse_weight(n, k, torch.float16, gen, -2, 3)
    x_store = torch.randint(-2, 3, (m, k + 5), generator=gen).to(torch.float16)
    x = x_store[:, 1:k + 1]  # ldx = 53 and a 2-byte offset: the element-copy path
    values, meta, _ = kernels.compress(w, prune=False)
    y_store = torch.full((m + 2, n + 3), 42.0, dtype=torch.float16)
    kernels.gemm(x, values, meta, n, k, config=config, y=y_store[:m, :n])
    assert torch.equal(y_store[:m, :n], (x.double() @ w.double().T).to(torch.float16))
    assert torch.all(y_store[:, n:] == 42)  # nothing written between rows
    assert torch.all(y_store[m:] == 42)  # nor past the last one (an M-tail predicate off by one)


def test_gemm_m_zero_writes_nothing(kernels):
    n, k = 16, 32
    gen = torch.Generator().manual_seed(1)
    w = sparse_weight(n, k, torch.float16, gen)
    values, meta, _ = kernels.compress(w)
    y = torch.full((1, n), 3.0, dtype=torch.float16)
    kernels.gemm(torch.zeros((0, k), dtype=torch.float16), values, meta, n, k, y=y[:0])
    assert torch.all(y == 3)


@pytest.mark.parametrize("config", [LARGE_M, DECODE, WGMMA, WGMMA_TMA, DECODE_TMA, WGMMA_TMA_WIDE, WGMMA_TMA_SPLIT])
def test_gemm_k_zero_gives_activation_of_bias(kernels, config):
    m, n = 3, 20
    x = torch.zeros((m, 0), dtype=torch.float16)
    bias = torch.arange(-10, 10, dtype=torch.float16)
    values = torch.zeros((n, 0), dtype=torch.float16)
    meta = torch.zeros((n, 0), dtype=torch.uint8)
    y = kernels.gemm(x, values, meta, n, 0, bias=bias, act="relu", config=config)
    assert torch.equal(y, torch.relu(bias).expand(m, n))
