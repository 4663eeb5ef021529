"""transformers' Conv1D (GPT-2, OpenAI GPT, ImageGPT): a Linear whose weight is stored transposed.

transformers is not a test dependency, so the layer is written here as transformers writes it
(``transformers.pytorch_utils.Conv1D``); the README's check against GPT2LMHeadModel is the last
test, skipped without transformers. Every tool must treat a Conv1D exactly as the nn.Linear
holding the transposed weight: 2:4 along its *input* features, dim 0 of the stored weight.
"""
import copy

import pytest
import torch
from torch import nn

import sparsegemm
from sparsegemm import prune as P
from sparsegemm.nn import is_conv1d


class Conv1D(nn.Module):
    """transformers.pytorch_utils.Conv1D: weight [nx, nf], bias [nf], y = x @ weight + bias."""

    def __init__(self, nf, nx):
        super().__init__()
        self.nf, self.nx = nf, nx
        self.weight = nn.Parameter(torch.empty(nx, nf))
        self.bias = nn.Parameter(torch.zeros(nf))
        nn.init.normal_(self.weight, std=0.02)

    def forward(self, x):
        return torch.addmm(self.bias, x.view(-1, x.size(-1)), self.weight).view(*x.shape[:-1], self.nf)


class GPT2Block(nn.Module):
    """The layers of a GPT-2 block, named as transformers names them (attention left out: the
    Conv1D layers are what matters here)."""

    def __init__(self, width=64, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.ln = nn.LayerNorm(width)
        self.c_attn = Conv1D(3 * width, width)
        self.c_proj = Conv1D(width, 3 * width)
        self.c_fc = Conv1D(4 * width, width)
        self.mlp_proj = Conv1D(width, 4 * width)
        for layer in (self.c_attn, self.c_proj, self.c_fc, self.mlp_proj):
            nn.init.normal_(layer.bias)

    def forward(self, x):
        h = x + self.c_proj(self.c_attn(self.ln(x)))
        return h + self.mlp_proj(nn.functional.gelu(self.c_fc(h)))


class LinearTwin(nn.Module):
    """GPT2Block with each Conv1D an nn.Linear holding the transposed weight: the same function."""

    def __init__(self, block):
        super().__init__()
        self.ln = copy.deepcopy(block.ln)
        for name in ("c_attn", "c_proj", "c_fc", "mlp_proj"):
            conv = getattr(block, name)
            linear = nn.Linear(conv.nx, conv.nf)
            with torch.no_grad():
                linear.weight.copy_(conv.weight.t())
                linear.bias.copy_(conv.bias)
            setattr(self, name, linear)

    forward = GPT2Block.forward


LAYERS = ("c_attn", "c_proj", "c_fc", "mlp_proj")


def test_is_conv1d_tells_the_layer_by_its_name_and_shapes():
    conv = Conv1D(12, 8)
    assert is_conv1d(conv)
    assert not is_conv1d(nn.Linear(8, 12))
    P.prune_one_shot(nn.Sequential(conv))
    assert type(conv).__name__ == "ParametrizedConv1D" and is_conv1d(conv)  # masked for pruning: still one
    stranger = Conv1D(12, 8)
    stranger.nx = 12  # attributes that do not describe the weight: not transformers' layer
    assert not is_conv1d(stranger)

    class Conv1d2(nn.Module):  # another name: left alone
        def __init__(self):
            super().__init__()
            self.nf, self.nx, self.weight = 12, 8, nn.Parameter(torch.zeros(8, 12))

    assert not is_conv1d(Conv1d2())


@pytest.mark.parametrize("nx", [64, 30])  # 30: K not a multiple of 4 (a padded last group)
def test_from_dense_conv1d_is_the_linear_of_the_transposed_weight(nx):
    torch.manual_seed(1)
    conv = Conv1D(24, nx)
    with torch.no_grad():
        conv.weight.normal_()
    twin = nn.Linear(nx, 24)
    with torch.no_grad():
        twin.weight.copy_(conv.weight.t())
        twin.bias.copy_(conv.bias)
    sparse, reference = sparsegemm.SparseLinear.from_dense(conv), sparsegemm.SparseLinear.from_dense(twin)
    assert (sparse.in_features, sparse.out_features) == (nx, 24)
    assert torch.equal(sparse.values, reference.values) and torch.equal(sparse.metadata, reference.metadata)
    # 2:4 along the input features: the pruned weight is the magnitude mask of the transpose.
    assert torch.equal(sparse.dense_weight(), sparsegemm.prune_2to4(conv.weight.detach().t()))
    x = torch.randn(3, 5, nx)
    torch.testing.assert_close(sparse(x), nn.functional.linear(x, sparse.dense_weight(), conv.bias),
                               rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="more than 2 non-zeros"):
        sparsegemm.SparseLinear.from_dense(conv, prune=False)  # strict: W = weight^T must already be 2:4


def test_a_conv1d_that_is_not_2to4_is_named_in_its_stored_coordinates():
    layer = Conv1D(nf=8, nx=16)
    with torch.no_grad():
        layer.weight.zero_()
        layer.weight[4:7, 3] = 1.0  # three inputs of one group feeding output 3
    with pytest.raises(ValueError, match=r"stored \[in, out\]; .* weight\[c, r\]: .* row 3, group 1 \(columns 4..7\)"):
        sparsegemm.SparseLinear.from_dense(layer, prune=False)


def test_sparsify_converts_gpt2_layers_and_matches_the_pruned_linear_twin():
    block = GPT2Block()
    twin = LinearTwin(block)
    x = torch.randn(2, 7, 64)
    report = sparsegemm.sparsify(block, filter_fn=lambda name, mod: name != "c_proj")
    twin_report = sparsegemm.sparsify(twin, filter_fn=lambda name, mod: name != "c_proj")
    rows = {layer.name: layer for layer in report.layers}
    assert {name for name, row in rows.items() if row.converted} == {"c_attn", "c_fc", "mlp_proj"}
    assert rows["c_proj"].reason == "rejected by filter_fn"
    assert rows["c_attn"].kind == "Conv1D" and rows["c_attn"].shape == (192, 64)  # (N, K) = (nf, nx)
    for got, want in zip(report.layers, twin_report.layers):
        assert (got.name, got.shape, got.dense_bytes, got.compressed_bytes, got.converted) == (
            want.name, want.shape, want.dense_bytes, want.compressed_bytes, want.converted)
        assert got.magnitude_kept == pytest.approx(want.magnitude_kept, rel=1e-6)
    assert isinstance(block.c_attn, sparsegemm.SparseLinear) and type(block.c_proj) is Conv1D
    torch.testing.assert_close(block(x), twin(x), rtol=1e-5, atol=1e-5)


def test_sparsify_leaves_a_masked_conv1d_for_remove_masks():
    block = GPT2Block()
    P.prune_one_shot(block, lambda name, mod: name == "c_fc")
    report = sparsegemm.sparsify(block, min_features=1)
    assert "remove_masks" in {layer.name: layer.reason for layer in report.layers}["c_fc"]
    P.remove_masks(block)
    report = sparsegemm.sparsify(block, min_features=1)
    row = {layer.name: layer for layer in report.layers}["c_fc"]
    assert row.converted and row.magnitude_kept == 1.0  # already 2:4 along its inputs


def test_checkpoint_of_conv1d_layers_loads_into_a_fresh_model(tmp_path):
    block = GPT2Block(seed=2).half()
    sparsegemm.sparsify(block)
    x = torch.randn(3, 64, dtype=torch.float16)
    path = tmp_path / "gpt2_block.safetensors"
    sparsegemm.save(block, path)
    fresh = GPT2Block(seed=5).half()  # its weights are irrelevant
    sparsegemm.load(path, fresh)
    assert all(isinstance(getattr(fresh, name), sparsegemm.SparseLinear) for name in LAYERS)
    assert torch.equal(fresh(x), block(x))
    wrong = GPT2Block(width=32).half()  # Conv1D layers of other shapes
    with pytest.raises(ValueError, match=r"module 'c_attn' was a Linear 64 -> 192 .* the model has Conv1D"):
        sparsegemm.load(path, wrong)


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
def test_one_shot_pruning_of_conv1d_is_that_of_the_linear_twin(method):
    block = GPT2Block(seed=3)
    twin = LinearTwin(block)
    gen = torch.Generator().manual_seed(4)
    batches = [torch.randn(4, 6, 64, generator=gen) * torch.linspace(0.2, 5.0, 64) for _ in range(2)]
    kwargs = {} if method == "magnitude" else {"method": method, "calibration": batches}
    kept, twin_kept = P.prune_one_shot(block, **kwargs), P.prune_one_shot(twin, **kwargs)
    assert set(kept) == set(LAYERS)
    masks, twin_masks = P.masked_layers(block), P.masked_layers(twin)
    for name in LAYERS:
        assert kept[name] == pytest.approx(twin_kept[name], rel=1e-6)
        assert torch.equal(masks[name], twin_masks[name].t())  # the same groups, along the inputs
        conv, linear = getattr(block, name), getattr(twin, name)
        # sparsegpt corrects the weights kept: the same corrections, transposed.
        torch.testing.assert_close(conv.weight.detach(), linear.weight.detach().t(), rtol=1e-5, atol=1e-6)
    P.remove_masks(block)
    for name in LAYERS:  # strict conversion: exactly 2:4 along the inputs
        sparsegemm.SparseLinear.from_dense(getattr(block, name), prune=False)


def test_gradual_pruning_and_masked_fine_tuning_of_conv1d_follow_the_linear_twin():
    block = GPT2Block(seed=6)
    twin = LinearTwin(block)
    pruners = [P.GradualPruner(model, end_step=4, frequency=2) for model in (block, twin)]
    optimizers = [torch.optim.SGD(model.parameters(), lr=0.05) for model in (block, twin)]
    gen = torch.Generator().manual_seed(7)
    for _ in range(6):
        x = torch.randn(8, 64, generator=gen)
        for model, pruner, opt in zip((block, twin), pruners, optimizers):
            opt.zero_grad()
            model(x).square().mean().backward()
            opt.step()
            pruner.step()
        for name in LAYERS:
            assert torch.equal(P.masked_layers(block)[name], P.masked_layers(twin)[name].t())
    assert all(pruner.done for pruner in pruners)
    for name in LAYERS:
        conv = getattr(block, name)
        mask = P.masked_layers(block)[name]
        assert bool((conv.weight.detach()[~mask] == 0).all())
        assert int(mask.t().reshape(conv.nf, -1, 4).sum(-1).max()) == 2  # 2:4 along the inputs
        torch.testing.assert_close(conv.weight.detach(), getattr(twin, name).weight.detach().t(),
                                   rtol=1e-5, atol=1e-6)


def test_gpt2_from_transformers_prunes_converts_saves_and_generates(tmp_path):
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(n_layer=2, n_embd=128, n_head=4, vocab_size=1000, n_positions=64,
                                     bos_token_id=0, eos_token_id=0)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(config).eval()
    ids = torch.randint(0, 1000, (2, 16))
    not_head = lambda name, mod: "lm_head" not in name  # noqa: E731 (tied to the embedding)
    P.prune_one_shot(model, not_head, method="sparsegpt", calibration=[{"input_ids": ids}],
                     blocks=model.transformer.h)
    P.remove_masks(model)
    with torch.no_grad():
        want = model(ids).logits
    report = sparsegemm.sparsify(model, filter_fn=not_head)
    assert len(report.converted) == 8 and all(layer.kind == "Conv1D" for layer in report.converted)
    assert all(layer.magnitude_kept == 1.0 for layer in report.converted)
    with torch.no_grad():
        got = model(ids).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    sparsegemm.save(model, tmp_path / "gpt2.safetensors")
    fresh = transformers.GPT2LMHeadModel(config).eval()
    sparsegemm.load(tmp_path / "gpt2.safetensors", fresh)
    with torch.no_grad():
        assert torch.equal(fresh(ids).logits, got)
    assert fresh.generate(ids[:, :4], max_new_tokens=5, do_sample=False).shape == (2, 9)


def test_permute_channels_reports_a_conv1d_pair_by_its_channels():
    block = GPT2Block()
    report = P.permute_channels(block, [P.ChannelPair("c_fc", "mlp_proj", ())])
    row, = report.pairs
    assert row.channels == 256 and "Conv1D -> Conv1D" in row.skipped  # mlp_proj takes c_fc's 4 * 64 outputs
