"""SparseMultiheadAttention against nn.MultiheadAttention holding the same pruned weights (the
oracle: torch's own attention), and sparsify / save / load of torch's Transformer modules."""
import copy
import itertools

import pytest
import torch
from torch import nn

import sparsegemm
from sparsegemm import SparseMultiheadAttention


def pruned_twin(mha, sparse):
    """An nn.MultiheadAttention computing what ``sparse`` does: its dense (pruned) weights."""
    twin = copy.deepcopy(mha)
    q, k, v, out = (layer.dense_weight() for layer in (sparse.q_proj, sparse.k_proj, sparse.v_proj,
                                                         sparse.out_proj))
    with torch.no_grad():
        if twin._qkv_same_embed_dim:
            twin.in_proj_weight.copy_(torch.cat([q, k, v]))
        else:
            twin.q_proj_weight.copy_(q), twin.k_proj_weight.copy_(k), twin.v_proj_weight.copy_(v)
        twin.out_proj.weight.copy_(out)
    return twin


def prune_dense_in_place(model):
    """The magnitude 2:4 mask applied to every projection of ``model``, kept dense: what sparsify
    converts to (rows are pruned one by one, so the fused in_proj_weight prunes as its three parts)."""
    with torch.no_grad():
        for mod in model.modules():
            if isinstance(mod, nn.MultiheadAttention):
                mod.in_proj_weight.copy_(sparsegemm.prune_2to4(mod.in_proj_weight))
            if isinstance(mod, nn.Linear):
                mod.weight.copy_(sparsegemm.prune_2to4(mod.weight))
    return model


CASES = list(itertools.product([False, True], [None, 40], [True, False]))


@pytest.mark.parametrize("batch_first,kdim,bias", CASES)
def test_matches_torch_attention_with_the_pruned_weights(batch_first, kdim, bias):
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(64, 4, batch_first=batch_first, kdim=kdim, vdim=kdim, bias=bias).eval()
    sparse = SparseMultiheadAttention.from_dense(mha).eval()
    twin = pruned_twin(mha, sparse).eval()
    n, tgt, src, kv = 3, 5, 7, kdim or 64
    layout = (lambda seq, width: (n, seq, width)) if batch_first else (lambda seq, width: (seq, n, width))
    q, k, v = torch.randn(layout(tgt, 64)), torch.randn(layout(src, kv)), torch.randn(layout(src, kv))
    padding = torch.rand(n, src) < 0.3
    padding[:, 0] = False  # no row without a key
    masks = [{}, {"key_padding_mask": padding}, {"attn_mask": torch.randn(tgt, src)},
             {"attn_mask": torch.rand(tgt, src) < 0.3, "key_padding_mask": padding},
             {"attn_mask": torch.randn(n * 4, tgt, src), "key_padding_mask": padding.float() * -3.0}]
    for kwargs, need_weights, average in itertools.product(masks, [True, False], [True, False]):
        got, got_weights = sparse(q, k, v, need_weights=need_weights, average_attn_weights=average, **kwargs)
        want, want_weights = twin(q, k, v, need_weights=need_weights, average_attn_weights=average, **kwargs)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        # Laid out as torch's ([L, N, E] rows; batch_first: its transposed view): .view() on the output
        # failed with batch_first=False, and a dropout after it masked other elements.
        assert got.stride() == want.stride()
        if need_weights:
            torch.testing.assert_close(got_weights, want_weights, rtol=1e-5, atol=1e-6)
        else:
            assert got_weights is None and want_weights is None


def test_unbatched_causal_and_self_attention():
    torch.manual_seed(1)
    mha = nn.MultiheadAttention(32, 2).eval()
    sparse = SparseMultiheadAttention.from_dense(mha).eval()
    twin = pruned_twin(mha, sparse)
    causal = nn.Transformer.generate_square_subsequent_mask(6)
    for x in (torch.randn(6, 32), torch.randn(6, 3, 32)):
        for need_weights in (True, False):
            got = sparse(x, x, x, attn_mask=causal, is_causal=True, need_weights=need_weights)
            want = twin(x, x, x, attn_mask=causal, is_causal=True, need_weights=need_weights)
            torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-5)
            if need_weights:
                torch.testing.assert_close(got[1], want[1], rtol=1e-5, atol=1e-6)
    x = torch.randn(6, 32)
    torch.testing.assert_close(sparse(x, x, x, key_padding_mask=torch.tensor([False] * 5 + [True]))[0],
                               twin(x, x, x, key_padding_mask=torch.tensor([False] * 5 + [True]))[0],
                               rtol=1e-5, atol=1e-5)


def test_dropout_in_training_draws_as_torch_does_and_gradients_match():
    torch.manual_seed(2)
    mha = nn.MultiheadAttention(32, 4, dropout=0.25, batch_first=True)
    sparse = SparseMultiheadAttention.from_dense(mha).train()
    twin = pruned_twin(mha, sparse).train()
    x = torch.randn(2, 9, 32)
    xs, xt = x.clone().requires_grad_(), x.clone().requires_grad_()
    torch.manual_seed(3)
    got, got_weights = sparse(xs, xs, xs)
    torch.manual_seed(3)
    want, want_weights = twin(xt, xt, xt)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_weights, want_weights, rtol=1e-5, atol=1e-6)
    assert bool((got_weights == 0).any())  # dropout did drop
    got.square().sum().backward()
    want.square().sum().backward()
    torch.testing.assert_close(xs.grad, xt.grad, rtol=1e-4, atol=1e-5)
    # Gradients reach every projection's kept values (fine-tuning a converted model).
    for layer in (sparse.q_proj, sparse.k_proj, sparse.v_proj, sparse.out_proj):
        assert layer.values.grad is not None and bool(layer.values.grad.abs().sum() > 0)


def test_an_encoder_layers_dropout_after_the_attention_draws_as_torch_does():
    # TransformerEncoderLayer's dropout1 draws its mask in the attention output's memory order: with
    # the output laid out otherwise than torch's, the same random stream masked other elements
    # (outputs 0.44 apart in training).
    torch.manual_seed(5)
    for batch_first in (True, False):
        layer = nn.TransformerEncoderLayer(32, 4, 64, dropout=0.2, batch_first=batch_first)
        dense = prune_dense_in_place(copy.deepcopy(layer)).train()
        sparsegemm.sparsify(layer, min_features=8, progress=False)
        assert isinstance(layer.self_attn, SparseMultiheadAttention)
        x = torch.randn(3, 5, 32)
        torch.manual_seed(6)
        got = layer.train()(x)
        torch.manual_seed(6)
        torch.testing.assert_close(got, dense(x), rtol=1e-5, atol=1e-5)


def test_errors_name_the_argument():
    mha = SparseMultiheadAttention.from_dense(nn.MultiheadAttention(32, 2))
    x = torch.randn(4, 2, 32)
    with pytest.raises(RuntimeError, match="is_causal is a hint"):
        mha(x, x, x, is_causal=True)
    with pytest.raises(ValueError, match=r"attn_mask must be \[L, S\] = \[4, 4\]"):
        mha(x, x, x, attn_mask=torch.zeros(3, 4))
    with pytest.raises(ValueError, match=r"key_padding_mask must be \[N, S\] = \[2, 4\]"):
        mha(x, x, x, key_padding_mask=torch.zeros(4, 2, dtype=torch.bool))
    with pytest.raises(TypeError, match="attn_mask must be a bool or floating tensor, got torch.int64"):
        mha(x, x, x, attn_mask=torch.zeros(4, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="all be 3-D .* or 2-D"):
        mha(x[0, 0], x[0, 0], x[0, 0])
    other_batch = torch.randn(7, 3, 32)  # [S, N, E]: three sequences where the query has two
    with pytest.raises(ValueError, match=r"query and key must have the same batch size, got 2 and 3 "
                                         r"\(batch_first=False\)"):
        mha(x, other_batch, other_batch)
    assert mha.bias_k is None and mha.bias_v is None and mha.add_zero_attn is False  # as torch's reads them
    with pytest.raises(ValueError, match="add_bias_kv=True"):
        SparseMultiheadAttention.from_dense(nn.MultiheadAttention(32, 2, add_bias_kv=True))
    with pytest.raises(ValueError, match="add_zero_attn=True"):
        SparseMultiheadAttention.from_dense(nn.MultiheadAttention(32, 2, add_zero_attn=True))
    with pytest.raises(TypeError, match="expected nn.MultiheadAttention"):
        SparseMultiheadAttention.from_dense(nn.Linear(32, 32))
    dense = nn.MultiheadAttention(32, 2)
    with torch.no_grad():
        dense.in_proj_weight.copy_(sparsegemm.prune_2to4(dense.in_proj_weight))
        dense.in_proj_weight[40, :4] = 1.0  # row 8 of the k projection
    with pytest.raises(ValueError, match=r"the k projection \(in_proj_weight from row 32: .*\): .* row 8, group 0"):
        SparseMultiheadAttention.from_dense(dense, prune=False)
    layer = mha.q_proj
    with pytest.raises(ValueError, match="num_heads must divide embed_dim = 32, got 3"):
        SparseMultiheadAttention(layer, mha.k_proj, mha.v_proj, mha.out_proj, 3)
    with pytest.raises(TypeError, match="q_proj must be a SparseLinear without a fused activation, got Identity"):
        SparseMultiheadAttention(nn.Identity(), mha.k_proj, mha.v_proj, mha.out_proj, 2)


def encoder(seed=0, **kwargs):
    torch.manual_seed(seed)
    layer = nn.TransformerEncoderLayer(64, 4, 128, dropout=0.0, batch_first=True, **kwargs)
    return nn.TransformerEncoder(layer, 2, enable_nested_tensor=True).eval()


def test_sparsify_converts_a_transformer_encoder_and_turns_off_its_nested_fast_path():
    model = encoder()
    reference = prune_dense_in_place(copy.deepcopy(model))
    assert model.use_nested_tensor  # torch's fast path reads the dense weights
    report = sparsegemm.sparsify(model, min_features=16)
    assert len(report.converted) == 12 and not report.skipped  # 4 projections + 2 Linear per layer
    rows = {layer.name: layer for layer in report.layers}
    assert rows["layers.0.self_attn.k_proj"].kind == "MultiheadAttention"
    assert rows["layers.1.linear1"].converted  # its forward reads linear1.weight on the fast path only
    assert not model.use_nested_tensor
    x = torch.randn(3, 10, 64)
    padding = torch.zeros(3, 10, dtype=torch.bool)
    padding[1, 6:] = True
    with torch.no_grad():
        got, want = model(x, src_key_padding_mask=padding), reference(x, src_key_padding_mask=padding)
    # The reference took the nested fast path, which leaves padded positions 0.
    torch.testing.assert_close(got[~padding], want[~padding], rtol=1e-4, atol=1e-4)
    reference.use_nested_tensor = False
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference(x), rtol=1e-4, atol=1e-4)


def test_encoder_layer_keeps_its_linears_dense_when_its_attention_stays_dense():
    model = encoder()
    report = sparsegemm.sparsify(model, min_features=16, filter_fn=lambda name, mod: "self_attn" not in name)
    reasons = {layer.name: layer.reason for layer in report.layers}
    assert reasons["layers.0.self_attn.q_proj"] == "rejected by filter_fn"
    assert "TransformerEncoderLayer.forward reads its .weight" in reasons["layers.0.linear1"]
    assert model.use_nested_tensor
    assert not report.converted


def test_sparsify_converts_a_decoder_with_cross_attention_and_skips_what_it_cannot():
    torch.manual_seed(4)
    layer = nn.TransformerDecoderLayer(64, 4, 128, dropout=0.0)
    model = nn.TransformerDecoder(layer, 2).eval()
    model.layers[1].multihead_attn = nn.MultiheadAttention(64, 4, add_bias_kv=True)
    reference = prune_dense_in_place(copy.deepcopy(model))
    with torch.no_grad():  # the layer left dense stays as it was
        reference.layers[1].multihead_attn.load_state_dict(model.layers[1].multihead_attn.state_dict())
    report = sparsegemm.sparsify(model, min_features=16)
    reasons = {layer.name: layer.reason for layer in report.skipped}
    assert set(reasons) == {f"layers.1.multihead_attn.{p}" for p in ("q_proj", "k_proj", "v_proj", "out_proj")}
    assert all("add_bias_kv=True" in reason for reason in reasons.values())
    assert isinstance(model.layers[0].multihead_attn, SparseMultiheadAttention)
    tgt, memory = torch.randn(5, 2, 64), torch.randn(8, 2, 64)
    causal = nn.Transformer.generate_square_subsequent_mask(5)
    with torch.no_grad():
        torch.testing.assert_close(model(tgt, memory, tgt_mask=causal, tgt_is_causal=True),
                                   reference(tgt, memory, tgt_mask=causal, tgt_is_causal=True),
                                   rtol=1e-4, atol=1e-4)


def test_checkpoint_round_trip_into_a_fresh_encoder(tmp_path):
    model = encoder(seed=5).half()
    sparsegemm.sparsify(model, min_features=16)
    path = tmp_path / "encoder.safetensors"
    sparsegemm.save(model, path)
    fresh = encoder(seed=6).half()  # its weights are irrelevant
    assert fresh.use_nested_tensor
    sparsegemm.load(path, fresh)
    assert isinstance(fresh.layers[1].self_attn, SparseMultiheadAttention) and not fresh.use_nested_tensor
    x = torch.randn(2, 7, 64, dtype=torch.float16)
    with torch.no_grad():
        assert torch.equal(fresh(x), model(x))
    sparsegemm.load(path, fresh)  # again, into the model it filled
    with torch.no_grad():
        assert torch.equal(fresh(x), model(x))
    other_heads = encoder(seed=6).half()
    for layer in other_heads.layers:
        layer.self_attn = nn.MultiheadAttention(64, 8, batch_first=True).half()
    with pytest.raises(ValueError, match="module 'layers.0.self_attn' had 4 heads when saved, the model's has 8"):
        sparsegemm.load(path, other_heads)
    other_kdim = encoder(seed=6).half()
    other_kdim.layers[0].self_attn = nn.MultiheadAttention(64, 4, kdim=32, vdim=32, batch_first=True).half()
    with pytest.raises(ValueError, match=r"'layers.0.self_attn' was an attention of \(embed_dim, kdim, vdim\) = "
                                         r"\(64, 64, 64\) when saved, the model's is \(64, 32, 32\)"):
        sparsegemm.load(path, other_kdim)
    listing = sparsegemm.io.describe(path)
    assert "layers.0.self_attn.v_proj" in listing and "layers.0.self_attn " not in listing


def test_a_bias_mismatch_on_load_names_the_models_attention(tmp_path):
    model = nn.Sequential(nn.MultiheadAttention(32, 2))
    sparsegemm.sparsify(model, min_features=16)
    sparsegemm.save(model, tmp_path / "a.safetensors")
    with pytest.raises(ValueError, match=r"'0.q_proj' was a Linear 32 -> 32 \(bias=True\) when saved, .*; that "
                                         r"layer is one load made for the model's MultiheadAttention '0'"):
        sparsegemm.load(tmp_path / "a.safetensors", nn.Sequential(nn.MultiheadAttention(32, 2, bias=False)))


def test_int8_attention_stays_close_to_the_float_one():
    model = encoder(seed=7)
    reference = prune_dense_in_place(copy.deepcopy(model))
    reference.use_nested_tensor = False
    sparsegemm.sparsify(model, min_features=16, quantize="int8")
    assert model.layers[0].self_attn.q_proj.quantize == "int8"
    x = torch.randn(2, 9, 64)
    with torch.no_grad():
        got, want = model(x), reference(x)
    assert float((got - want).norm() / want.norm()) < 0.05


def test_compiles_without_graph_breaks():
    torch.manual_seed(8)
    sparse = SparseMultiheadAttention.from_dense(nn.MultiheadAttention(64, 4, batch_first=True)).eval()
    x = torch.randn(2, 9, 64)
    compiled = torch.compile(sparse, fullgraph=True)
    with torch.no_grad():
        for need_weights in (False, True):
            got, want = compiled(x, x, x, need_weights=need_weights), sparse(x, x, x, need_weights=need_weights)
            torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-5)


def test_an_encoder_with_any_sparse_layer_leaves_its_nested_fast_path():
    # Layer 0 left dense: the encoder's fast path would still nest the input for layer 1.
    model = encoder(seed=9)
    reference = copy.deepcopy(model)
    report = sparsegemm.sparsify(model, min_features=16, filter_fn=lambda name, mod: name.startswith("layers.1"))
    assert report.converted and not model.use_nested_tensor
    x = torch.randn(3, 6, 64)
    padding = torch.zeros(3, 6, dtype=torch.bool)
    padding[0, 4:] = True
    prune_dense_in_place(reference.layers[1])
    reference.use_nested_tensor = False
    with torch.no_grad():
        torch.testing.assert_close(model(x, src_key_padding_mask=padding), reference(x, src_key_padding_mask=padding),
                                   rtol=1e-4, atol=1e-4)
    # Converted behind the encoder's back: a clear error, and the call that fixes it.
    other = encoder(seed=10)
    sparsegemm.sparsify(other.layers, min_features=16)
    with torch.no_grad(), pytest.raises(AttributeError, match="turn_off_nested_fast_path"):
        other(x, src_key_padding_mask=padding)
    sparsegemm.attention.turn_off_nested_fast_path(other)
    with torch.no_grad():
        assert other(x, src_key_padding_mask=padding).shape == x.shape


def test_a_float_mask_keeps_its_dtype_as_in_torch():
    # fp16 module, fp32 -1e9 mask: finite in fp32 (a row masked everywhere attends uniformly), -inf in fp16.
    torch.manual_seed(11)
    mha = nn.MultiheadAttention(64, 4).half().eval()
    sparse = SparseMultiheadAttention.from_dense(mha).eval()
    twin = pruned_twin(mha, sparse)
    q, k = torch.randn(3, 2, 64, dtype=torch.float16), torch.randn(4, 2, 64, dtype=torch.float16)
    mask = torch.zeros(3, 4)
    mask[0] = -1e9
    got, want = sparse(q, k, k, need_weights=False, attn_mask=mask)[0], twin(q, k, k, need_weights=False,
                                                                               attn_mask=mask)[0]
    assert bool(got[0].abs().sum() > 0)
    torch.testing.assert_close(got, want, rtol=2e-3, atol=2e-3)


def test_calibrated_pruning_says_why_attention_out_proj_sees_no_input():
    model = encoder(seed=12)
    with pytest.raises(ValueError, match=r"reads its out_proj's weight without calling it\); call "
                                         r"sparsegemm.prune.split_attention\(model\) first"):
        sparsegemm.prune.prune_one_shot(model, method="wanda", calibration=torch.randn(2, 5, 64))


def test_split_attention_computes_the_same_and_lets_every_pruning_tool_in():
    model = encoder(seed=13)
    x = torch.randn(2, 7, 64)
    with torch.no_grad():
        want = model(x)
    assert sparsegemm.prune.split_attention(model) == ["layers.0.self_attn", "layers.1.self_attn"]
    attn = model.layers[0].self_attn
    assert type(attn) is sparsegemm.attention.SplitMultiheadAttention and type(attn.q_proj) is nn.Linear
    assert not model.use_nested_tensor
    with torch.no_grad():
        torch.testing.assert_close(model(x), want, rtol=1e-5, atol=1e-5)
    names = {name for name, _ in sparsegemm.prune.prunable_layers(model)}
    assert {f"layers.0.self_attn.{p}_proj" for p in ("q", "k", "v", "out")} <= names
    # The calibrated methods see every projection's input now (out_proj is called as a module).
    kept = sparsegemm.prune.prune_one_shot(model, method="sparsegpt", calibration=torch.randn(4, 7, 64))
    assert "layers.1.self_attn.out_proj" in kept
    with torch.no_grad():
        masked = model(x)
    sparsegemm.prune.remove_masks(model)
    report = sparsegemm.sparsify(model, min_features=16)
    assert len(report.converted) == 12 and all(row.magnitude_kept == 1.0 for row in report.converted)
    assert type(model.layers[1].self_attn) is SparseMultiheadAttention  # four sparse projections
    with torch.no_grad():
        torch.testing.assert_close(model(x), masked, rtol=1e-4, atol=1e-4)


def test_gradual_pruning_of_a_split_attention_and_its_checkpoints(tmp_path):
    model = encoder(seed=14).train()
    sparsegemm.prune.split_attention(model)
    pruner = sparsegemm.prune.GradualPruner(model, end_step=2)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    for _ in range(2):
        opt.zero_grad()
        model(torch.randn(2, 5, 64)).square().mean().backward()
        opt.step()
        pruner.step()
    assert "layers.0.self_attn.k_proj" in sparsegemm.prune.masked_layers(model)
    sparsegemm.prune.remove_masks(model)
    model.eval()
    # One projection left dense: the attention stays split, its sparse layers are entries of its own.
    sparsegemm.sparsify(model, min_features=16, filter_fn=lambda name, mod: name != "layers.0.self_attn.v_proj")
    assert type(model.layers[0].self_attn) is sparsegemm.attention.SplitMultiheadAttention
    assert type(model.layers[1].self_attn) is SparseMultiheadAttention
    path = tmp_path / "split.safetensors"
    sparsegemm.save(model, path)
    x = torch.randn(2, 5, 64)
    dense_fresh, split_fresh = encoder(seed=15), encoder(seed=16)  # a dense model, one split before the load
    sparsegemm.prune.split_attention(split_fresh)
    for fresh in (dense_fresh, split_fresh):
        sparsegemm.load(path, fresh)
        assert type(fresh.layers[0].self_attn.v_proj) is nn.Linear
        assert isinstance(fresh.layers[0].self_attn.q_proj, sparsegemm.SparseLinear)
        with torch.no_grad():
            assert torch.equal(fresh.eval()(x), model(x))


def test_split_attention_leaves_a_shared_attention_and_takes_masked_projections(tmp_path):
    torch.manual_seed(17)
    shared = nn.MultiheadAttention(64, 4)
    model = nn.ModuleDict({"a": shared, "b": shared, "c": nn.MultiheadAttention(64, 4)})
    tied = nn.ModuleDict({"a": nn.MultiheadAttention(64, 4), "b": nn.MultiheadAttention(64, 4)})
    tied["b"].in_proj_weight = tied["a"].in_proj_weight
    # A copy would untie what the model ties: the forward would use the dense one, the tools the copy.
    assert sparsegemm.prune.split_attention(model) == ["c"] and model["a"] is model["b"]
    assert sparsegemm.prune.split_attention(tied) == []
    # A split model whose layers still carry their masks loads a checkpoint like its dense twin.
    source = encoder(seed=18)
    sparsegemm.sparsify(source, min_features=16)
    path = tmp_path / "sparse.safetensors"
    sparsegemm.save(source, path)
    masked = encoder(seed=19)
    sparsegemm.prune.split_attention(masked)
    sparsegemm.prune.prune_one_shot(masked)
    sparsegemm.load(path, masked)
    x = torch.randn(2, 5, 64)
    with torch.no_grad():
        assert torch.equal(masked(x), source(x))


def test_sparsify_reports_a_split_attention_projection_as_attention():
    model = encoder(seed=20)
    sparsegemm.prune.split_attention(model)
    rows = {row.name: row for row in sparsegemm.sparsify(model, min_features=16).layers}
    assert rows["layers.0.self_attn.v_proj"].kind == "MultiheadAttention" and rows["layers.0.linear1"].kind == "Linear"


@pytest.mark.parametrize("device", ["simt", "cuda"])
def test_on_the_kernels(device):
    if device == "cuda" and not (torch.cuda.is_available() and sparsegemm.info()["cuda_built"]):
        pytest.skip("needs a CUDA build of sparsegemm._C and a CUDA GPU")
    torch.manual_seed(21)
    on = "cuda" if device == "cuda" else "cpu"
    mha = nn.MultiheadAttention(32, 2, batch_first=True).half().to(on).eval()
    sparse = SparseMultiheadAttention.from_dense(mha, backend=None if device == "cuda" else "simt").eval()
    twin = pruned_twin(mha, sparse).eval()
    x = torch.randn(2, 6, 32, dtype=torch.float16, device=on)
    padding = torch.zeros(2, 6, dtype=torch.bool, device=on)
    padding[1, 4:] = True
    with torch.no_grad():
        got = sparse(x, x, x, key_padding_mask=padding, need_weights=False)[0]
        want = twin(x, x, x, key_padding_mask=padding, need_weights=False)[0]
    torch.testing.assert_close(got.float(), want.float(), rtol=2e-2, atol=2e-3)
    if device == "cuda":  # a captured CUDA graph replays the attention with its projections
        graph = torch.cuda.CUDAGraph()
        with torch.no_grad(), torch.cuda.graph(graph):
            captured = sparse(x, x, x, need_weights=False)[0]
        x.copy_(torch.randn_like(x))
        graph.replay()
        with torch.no_grad():
            torch.testing.assert_close(captured, sparse(x, x, x, need_weights=False)[0], rtol=0, atol=0)


def test_a_converted_attention_keeps_the_mode_of_the_one_it_replaces(tmp_path):
    # torch's layers default to dropout 0.1: an attention left in training mode drops out in eval.
    torch.manual_seed(22)
    x = torch.randn(2, 5, 64)
    for convert in ("sparsify", "split_attention", "load"):
        model = nn.TransformerEncoder(nn.TransformerEncoderLayer(64, 4, 128, batch_first=True), 1,
                                      enable_nested_tensor=False).eval()
        if convert == "sparsify":
            sparsegemm.sparsify(model, min_features=16)
        elif convert == "split_attention":
            sparsegemm.prune.split_attention(model)
        else:
            saved = copy.deepcopy(model)
            sparsegemm.sparsify(saved, min_features=16)
            sparsegemm.save(saved, tmp_path / "eval.safetensors")
            sparsegemm.load(tmp_path / "eval.safetensors", model)
        attention = model.layers[0].self_attn
        assert not attention.training and attention.dropout == 0.1, convert
        with torch.no_grad():
            assert torch.equal(model(x), model(x)), convert
