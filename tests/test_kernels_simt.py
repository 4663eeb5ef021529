"""The CUDA kernels of csrc/cuda/, run on the CPU by the SIMT emulator (sparsegemm._C.simt_*).

Oracles live in this file (numpy, float64): the format.h selection rule, the kernel metadata
layout of csrc/cuda/reorder.cuh and the dense product on the decompressed weight. Shapes are
small because the emulator runs every CUDA thread as a fiber; they are chosen to hit the tails
(M, N, K not tile multiples, fewer k-tiles than pipeline stages, K % 8 != 0, unaligned rows).
"""
import numpy as np
import pytest
import torch

from sparsegemm import _C

DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
ACT_CODES = {"none": 0, "relu": 1, "gelu": 2, "silu": 3}
LARGE_M, DECODE = 0, 1
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


def reference_kernel_meta(meta, n, k):
    """The reorder.cuh layout: uint32 words [Npad/16, Kpad/32, 16], word 2g+p as lane 4g+p needs."""
    g_count = padded_k(k) // 4
    npad = (n + 127) // 128 * 128
    kpad = (padded_k(k) + 63) // 64 * 64
    nib = np.full((npad, kpad // 4), 0x4, np.uint32)
    nib[:n, :g_count] = np.stack([meta & 0xF, meta >> 4], axis=2).reshape(n, -1)[:, :g_count]
    quads = nib.reshape(npad, kpad // 16, 4)
    half = (quads << (4 * np.arange(4, dtype=np.uint32))).sum(axis=2).astype(np.uint32)  # [row, 16-K chunk]
    half = half.reshape(npad // 16, 2, 8, kpad // 32, 2)  # [tn, row8, g, tk, p]
    words = half[:, 0] | (half[:, 1] << 16)  # [tn, g, tk, p]
    return words.transpose(0, 2, 1, 3).reshape(-1).astype(np.uint32)


# ---- kernel wrappers (the Python API layer is written separately) ------------------------------
def simt_compress(w, prune=True, ldw=None):
    n, k = w.shape[0], w.shape[1]
    values = torch.full((n, padded_k(k) // 2), 7, dtype=w.dtype)
    meta = torch.full((n, (padded_k(k) // 4 + 1) // 2), 0xFF, dtype=torch.uint8)
    bad = _C.simt_compress(n, k, w.data_ptr(), ldw or w.stride(0), values.data_ptr(), meta.data_ptr(),
                           DTYPE_CODES[w.dtype], prune)
    return values, meta, bad


def simt_kernel_meta(meta, n, k):
    out = torch.zeros(_C.simt_kernel_meta_bytes(n, k) // 4, dtype=torch.int32)
    if out.numel():
        _C.simt_reorder_meta(meta.data_ptr(), out.data_ptr(), n, k)
    return out


def simt_gemm(x, values, meta, n, k, bias=None, act="none", config=-1, split_k=0, y=None):
    m = x.shape[0]
    kmeta = simt_kernel_meta(meta, n, k)
    if y is None:
        y = torch.full((m, n), float("nan"), dtype=x.dtype)
    ws_bytes = _C.simt_gemm_workspace_bytes(m, n, k, config, split_k)
    ws = torch.full((max(ws_bytes // 4, 1),), float("nan"), dtype=torch.float32)
    _C.simt_gemm(m, n, k, x.data_ptr(), x.stride(0), values.data_ptr(), kmeta.data_ptr(),
                 0 if bias is None else bias.data_ptr(), y.data_ptr(), y.stride(0), DTYPE_CODES[x.dtype],
                 ACT_CODES[act], ws.data_ptr() if ws_bytes else 0, config, split_k)
    return y


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


def activation(y, act):
    fn = {"none": lambda t: t, "relu": torch.relu, "gelu": torch.nn.functional.gelu, "silu": torch.nn.functional.silu}
    return fn[act](y)


# ---- compress / decompress / reorder -------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("n,k", [(3, 4), (5, 36), (2, 12), (4, 70), (17, 264)])
def test_compress_prune_matches_reference(dtype, n, k):
    gen = torch.Generator().manual_seed(n * 1000 + k)
    # Few distinct magnitudes force ties; sprinkle NaN, -0.0 and zero groups.
    w = (torch.randint(-2, 3, (n, k), generator=gen).to(torch.float32) * 0.5).to(dtype)
    w[0, 0] = float("nan")
    w[-1, -1] = -0.0
    w[n // 2, : min(k, 4)] = 0
    values, meta, bad = simt_compress(w, prune=True)
    ref_values, ref_meta, _ = reference_compress(w)
    assert bad == -1  # prune mode never reports
    assert torch.equal(values.view(torch.uint8), ref_values.contiguous().view(torch.uint8))
    np.testing.assert_array_equal(meta.numpy(), ref_meta)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_compress_strided_input(dtype):
    gen = torch.Generator().manual_seed(3)
    base = torch.randn(6, 45, generator=gen).to(dtype)
    w = base[:, 1:41]  # ldw = 45, unaligned rows: element loads
    values, meta, _ = simt_compress(w, prune=True, ldw=45)
    ref_values, ref_meta, _ = reference_compress(w.contiguous())
    assert torch.equal(values.view(torch.uint8), ref_values.contiguous().view(torch.uint8))
    np.testing.assert_array_equal(meta.numpy(), ref_meta)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_strict_mode_reports_smallest_bad_group(dtype):
    gen = torch.Generator().manual_seed(5)
    n, k = 6, 44  # G = 11, odd
    w = sparse_weight(n, k, dtype, gen)
    assert simt_compress(w, prune=False)[2] == -1
    w[:, 1::4] = torch.where(w[:, 1::4] == 0, torch.full_like(w[:, 1::4], -0.0), w[:, 1::4])
    assert simt_compress(w, prune=False)[2] == -1  # -0.0 is zero
    w[4, 8:11] = 1          # row 4, group 2: three non-zeros
    w[2, 40:44] = torch.tensor([1, 2, float("nan"), 3])  # row 2, group 10 (NaN is non-zero)
    assert simt_compress(w, prune=False)[2] == 2 * 11 + 10


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_six_patterns_round_trip(dtype):
    nib = [0x4, 0x8, 0x9, 0xC, 0xD, 0xE]
    rows = []
    for a, b in SIX_PAIRS:
        g = torch.zeros(4)
        g[a], g[b] = -1.5, 2.0
        rows.append(g)
    w = torch.stack(rows).reshape(1, 24).repeat(3, 1).to(dtype)  # 6 groups per row
    values, meta, bad = simt_compress(w, prune=False)
    assert bad == -1
    nibbles = np.stack([meta.numpy() & 0xF, meta.numpy() >> 4], axis=2).reshape(3, -1)
    np.testing.assert_array_equal(nibbles, np.tile(nib, (3, 1)))
    back = torch.full_like(w, 9)
    _C.simt_decompress(3, 24, values.data_ptr(), meta.data_ptr(), back.data_ptr(), DTYPE_CODES[dtype])
    assert torch.equal(back.view(torch.uint8), w.view(torch.uint8))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("n,k", [(4, 4), (3, 36), (5, 68), (9, 264)])
def test_decompress_matches_reference(dtype, n, k):
    gen = torch.Generator().manual_seed(n + k)
    w = sparse_weight(n, k, dtype, gen)
    w[0, 0] = -0.0
    values, meta, _ = simt_compress(w, prune=False)
    out = torch.full((n, k), 5, dtype=dtype)
    _C.simt_decompress(n, k, values.data_ptr(), meta.data_ptr(), out.data_ptr(), DTYPE_CODES[dtype])
    ref = reference_decompress(values, meta.numpy(), k)
    assert torch.equal(out.contiguous().view(torch.uint8), ref.contiguous().view(torch.uint8))
    assert torch.equal(out, w)  # a 2:4 weight round-trips (a dropped -0.0 comes back as +0.0)


@pytest.mark.parametrize("n,k", [(1, 4), (16, 32), (20, 100), (130, 72)])
def test_reorder_meta_layout(n, k):
    gen = torch.Generator().manual_seed(n * k)
    w = sparse_weight(n, k, torch.float16, gen)
    _, meta, _ = simt_compress(w)
    got = simt_kernel_meta(meta, n, k).numpy().view(np.uint32)
    np.testing.assert_array_equal(got, reference_kernel_meta(meta.numpy(), n, k))


# ---- GEMM ----------------------------------------------------------------------------------------
GEMM_SHAPES = [  # (M, N, K): tails in every dimension, K % 32 != 0, fewer k-tiles than stages
    (0, 24, 64), (1, 40, 36), (7, 24, 200), (16, 72, 64), (17, 136, 100), (64, 40, 128), (129, 260, 264),
]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("config", [LARGE_M, DECODE])
@pytest.mark.parametrize("m,n,k", GEMM_SHAPES)
def test_gemm_exact_small_integers(dtype, config, m, n, k):
    gen = torch.Generator().manual_seed(m * 7 + n * 13 + k)
    w = sparse_weight(n, k, dtype, gen, -2, 3)
    x = torch.randint(-2, 3, (m, k), generator=gen).to(dtype)
    bias = torch.randint(-3, 4, (n,), generator=gen).to(dtype)
    values, meta, _ = simt_compress(w, prune=False)
    y = simt_gemm(x, values, meta, n, k, bias=bias, act="relu", config=config)
    ref = torch.relu(x.double() @ w.double().T + bias.double()).to(dtype)
    assert torch.equal(y, ref)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("config,split_k", [(LARGE_M, 0), (DECODE, 0), (DECODE, 3)])
@pytest.mark.parametrize("act", ["none", "gelu", "silu"])
def test_gemm_random_within_twice_dense_error(dtype, config, split_k, act):
    m, n, k = (9, 72, 520) if config == DECODE else (33, 136, 132)
    gen = torch.Generator().manual_seed(11)
    w_dense = torch.randn(n, k, generator=gen).to(dtype)
    values, meta, _ = simt_compress(w_dense, prune=True)
    w = reference_decompress(values, meta.numpy(), k)
    x = torch.randn(m, k, generator=gen).to(dtype)
    bias = torch.randn(n, generator=gen).to(dtype)
    y = simt_gemm(x, values, meta, n, k, bias=bias, act=act, config=config, split_k=split_k)
    exact = activation(x.double() @ w.double().T + bias.double(), act)
    dense = activation((torch.matmul(x, w.T) + bias).double(), act)
    base_err = (dense - exact).abs().max().item()
    err = (y.double() - exact).abs().max().item()
    assert err <= 2 * base_err + 1e-6, (err, base_err)


def test_gemm_decode_auto_split_uses_workspace():
    m, n, k = 3, 40, 1024  # 16 k-tiles over one N block: the heuristic splits K
    assert _C.simt_gemm_workspace_bytes(m, n, k) > 0
    gen = torch.Generator().manual_seed(2)
    w = sparse_weight(n, k, torch.float16, gen, -1, 2)
    x = torch.randint(-1, 2, (m, k), generator=gen).to(torch.float16)
    values, meta, _ = simt_compress(w, prune=False)
    y = simt_gemm(x, values, meta, n, k)
    assert torch.equal(y, (x.double() @ w.double().T).to(torch.float16))


@pytest.mark.parametrize("config", [LARGE_M, DECODE])
def test_gemm_unaligned_operands_and_output_stride(config):
    m, n, k = 5, 20, 48
    gen = torch.Generator().manual_seed(4)
    w = sparse_weight(n, k, torch.float16, gen, -2, 3)
    x_store = torch.randint(-2, 3, (m, k + 5), generator=gen).to(torch.float16)
    x = x_store[:, 1:k + 1]  # ldx = 53 and a 2-byte offset: the element-copy path
    values, meta, _ = simt_compress(w, prune=False)
    y_store = torch.full((m, n + 3), 42.0, dtype=torch.float16)
    simt_gemm(x, values, meta, n, k, config=config, y=y_store[:, :n])
    assert torch.equal(y_store[:, :n], (x.double() @ w.double().T).to(torch.float16))
    assert torch.all(y_store[:, n:] == 42)  # nothing written between rows


def test_gemm_m_zero_writes_nothing():
    n, k = 16, 32
    gen = torch.Generator().manual_seed(1)
    w = sparse_weight(n, k, torch.float16, gen)
    values, meta, _ = simt_compress(w)
    y = torch.full((1, n), 3.0, dtype=torch.float16)
    _C.simt_gemm(0, n, k, y.data_ptr(), k, values.data_ptr(), simt_kernel_meta(meta, n, k).data_ptr(), 0,
                 y.data_ptr(), n, 1)
    assert torch.all(y == 3)


@pytest.mark.parametrize("config", [LARGE_M, DECODE])
def test_gemm_k_zero_gives_activation_of_bias(config):
    m, n = 3, 20
    x = torch.zeros((m, 0), dtype=torch.float16)
    bias = torch.arange(-10, 10, dtype=torch.float16)
    values = torch.zeros((n, 0), dtype=torch.float16)
    meta = torch.zeros((n, 0), dtype=torch.uint8)
    y = simt_gemm(x, values, meta, n, 0, bias=bias, act="relu", config=config)
    assert torch.equal(y, torch.relu(bias).expand(m, n))
