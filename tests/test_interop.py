"""to_cutlass / from_cutlass against PyTorch's own CUTLASS conversion, bit for bit."""
import pytest
import torch
from torch.sparse._semi_structured_conversions import (
    sparse_semi_structured_from_dense_cutlass,
    sparse_semi_structured_to_dense_cutlass,
)

import sparsegemm
from conftest import sparse_weight


def _int8_weight(n, k, seed):
    w = sparse_weight(n, k, dtype=torch.float32, seed=seed, integer=True)
    return (w * 40).to(torch.int8)


def _bits(t):
    """Bit patterns, so that -0.0 vs 0.0 and NaN payloads count."""
    return t.view(torch.int16) if t.element_size() == 2 else t


def _sparse_tensor(w):
    if w.dtype == torch.int8:
        # Build the int8 SparseTensor24 from the float compress of the same integer pattern.
        f = sparsegemm.compress(w.float())
        return sparsegemm.SparseTensor24(f.values.to(torch.int8), f.meta, f.shape, torch.ones(w.shape[0]))
    return sparsegemm.compress(w)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.int8], ids=str)
@pytest.mark.parametrize("n,k", [(32, 64), (64, 128), (96, 32), (32, 256)])
def test_to_cutlass_is_bit_identical_to_torch(dtype, n, k):
    if dtype == torch.int8 and k % 32:
        pytest.skip("int8 CUTLASS layout needs K % 32 == 0")
    w = _int8_weight(n, k, n + k) if dtype == torch.int8 else sparse_weight(n, k, dtype=dtype, seed=n + k)
    sw = _sparse_tensor(w)
    values, meta = sparsegemm.to_cutlass(sw)
    ref_values, ref_meta = sparse_semi_structured_from_dense_cutlass(w)
    assert values.dtype == ref_values.dtype and meta.dtype == ref_meta.dtype
    assert torch.equal(_bits(values), _bits(ref_values))
    assert torch.equal(meta, ref_meta)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.int8], ids=str)
def test_from_cutlass_round_trips_torch_output(dtype):
    w = _int8_weight(64, 128, 7) if dtype == torch.int8 else sparse_weight(64, 128, dtype=dtype, seed=7)
    values, meta = sparse_semi_structured_from_dense_cutlass(w)
    scale = torch.ones(64) if dtype == torch.int8 else None
    sw = sparsegemm.from_cutlass(values, meta, scale)
    dense = sparse_semi_structured_to_dense_cutlass(values, meta)
    if dtype == torch.int8:
        f = sparsegemm.SparseTensor24(sw.values.float(), sw.meta, sw.shape)
        assert torch.equal(sparsegemm.decompress(f).to(torch.int8), dense)
    else:
        assert torch.equal(sparsegemm.decompress(sw), dense)
        assert torch.equal(sparsegemm.decompress(sw), w)


def test_cutlass_shape_and_dtype_errors():
    sw = sparsegemm.compress(torch.randn(16, 64, dtype=torch.float16), prune=True)
    with pytest.raises(ValueError, match=r"to_cutlass: the CUTLASS layout needs N \(rows\) divisible by 32"):
        sparsegemm.to_cutlass(sw)
    sw32 = sparsegemm.compress(torch.randn(32, 64), prune=True)
    with pytest.raises(TypeError, match=r"to_cutlass: values must be float16, bfloat16 or int8"):
        sparsegemm.to_cutlass(sw32)
    values, meta = sparse_semi_structured_from_dense_cutlass(sparse_weight(32, 64, dtype=torch.float16))
    with pytest.raises(ValueError, match=r"from_cutlass: meta must be torch.int16 of shape \(32, 4\)"):
        sparsegemm.from_cutlass(values, meta[:, :2])
    corrupt = meta.clone()
    corrupt[0, 0] = 0  # nibbles 0x0: equal positions
    with pytest.raises(ValueError, match=r"corrupt metadata"):
        sparsegemm.from_cutlass(values, corrupt)
