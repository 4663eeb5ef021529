"""sparsegemm.prune: schedules, fixed masks through training, conversion, channel permutation."""
import copy

import pytest
import torch
from torch import nn

import sparsegemm
from sparsegemm import prune as P


def mlp(seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(24, 32), nn.ReLU(), nn.Linear(32, 16), nn.GELU(), nn.Linear(16, 8)).to(dtype)


def convnet(seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.Conv2d(16, 8, 3),
                          nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(8, 12, 1)).to(dtype)
    bn = model[1]
    with torch.no_grad():  # non-trivial statistics, so that permuting them matters
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.normal_()
        bn.bias.normal_()
    return model.eval()


def groups_kept(module):
    """[N, G] count of kept weights per 2:4 group of the module's effective weight (GEMM view)."""
    w = P.gemm_view(module.weight.detach())
    k = w.shape[1]
    w = nn.functional.pad(w, (0, (-k) % 4))
    return (w != 0).view(w.shape[0], -1, 4).sum(-1)


def share_of_groups_at_2to4(module):
    mask = P.gemm_view(P.masked_layers(nn.Sequential(module))["0"])
    k = mask.shape[1]
    mask = nn.functional.pad(mask, (0, (-k) % 4))
    return float((mask.view(mask.shape[0], -1, 4).sum(-1) <= 2).float().mean())


# --------------------------------------------------------------------------------------------
# Schedules


def test_cubic_share_is_monotone_and_ends_at_one():
    shares = [P.cubic_share(t, 3, 13, 0.1) for t in range(20)]
    assert shares[:3] == [0.1] * 3
    assert all(b >= a for a, b in zip(shares, shares[1:]))
    assert shares[13:] == [1.0] * 7
    assert 0.1 < shares[8] < 1.0
    # cubic: most of the way there at half time
    assert P.cubic_share(8, 3, 13) == pytest.approx(1 - 0.5 ** 3)


def test_gradual_masks_shrink_monotonically_and_end_at_exact_2to4():
    model = mlp()
    pruner = P.GradualPruner(model, end_step=10, start_step=2, frequency=3)
    previous = {name: m.clone() for name, m in P.masked_layers(model).items()}
    assert all(bool(m.all()) for m in previous.values())  # nothing pruned before start_step
    layer_shares = []
    for _ in range(12):
        pruner.step()
        masks = P.masked_layers(model)
        for name, mask in masks.items():
            assert not bool((mask & ~previous[name]).any()), "a pruned weight came back"
            previous[name] = mask.clone()
        layer_shares.append(share_of_groups_at_2to4(model[2]))
        # every layer reaches the share the schedule asks for when it updates
        if pruner.step_count in (2, 5, 8, 10):
            for _, mod in pruner.layers:
                assert share_of_groups_at_2to4(mod) >= pruner.share - 1e-9
    assert all(b >= a for a, b in zip(layer_shares, layer_shares[1:]))
    # it really was gradual: layer_shares[i] is after step i + 1; updates at steps 2, 5, 8 and 10
    assert layer_shares[2] == 0.0 < layer_shares[4] < layer_shares[7] < 1.0 == layer_shares[9]
    assert pruner.done
    for _, mod in pruner.layers:
        assert int(groups_kept(mod).max()) <= 2
        # no training in between: the groups end with the plain magnitude pattern
        original = mod.parametrizations.weight.original
        assert torch.equal(P.masked_layers(nn.Sequential(mod))["0"], sparsegemm.mask_2to4(original))


def test_gradual_prunes_the_cheapest_groups_first():
    lin = nn.Linear(8, 1, bias=False)
    with torch.no_grad():  # group 0 loses 2 + 2 to 2:4, group 1 loses 0.1 + 0.1
        lin.weight.copy_(torch.tensor([[5.0, 2.0, 2.0, 5.0, 3.0, 0.1, 3.0, 0.1]]))
    model = nn.Sequential(lin)
    P.GradualPruner(model, end_step=4, initial_share=0.5)
    mask = P.masked_layers(model)["0"]
    assert mask.tolist() == [[True, True, True, True, True, False, True, False]]
    # The cost is the magnitude a group loses, not what it keeps: group 0 keeps 20 and loses 2,
    # group 1 keeps 6 and loses 6.
    lin = nn.Linear(8, 1, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[10.0, 10.0, 1.0, 1.0, 3.0, 3.0, 3.0, 3.0]]))
    P.GradualPruner(model := nn.Sequential(lin), end_step=4, initial_share=0.5)
    assert P.masked_layers(model)["0"].tolist() == [[True, True, False, False, True, True, True, True]]


def test_a_masked_layer_keeps_non_finite_originals_out():
    # Mask2to4 selects (torch.where), it does not multiply: an inf left where the mask prunes would
    # make the weight NaN there (inf * 0), and every output with it.
    lin = nn.Linear(8, 4)
    P.prune_one_shot(nn.Sequential(lin))
    mask = P.masked_layers(nn.Sequential(lin))["0"]
    with torch.no_grad():
        original = lin.parametrizations.weight.original
        original[~mask] = float("inf")
        original[0, ~mask[0]] = float("nan")
    assert torch.equal(lin.weight == 0, ~mask) and torch.isfinite(lin(torch.randn(2, 8))).all()


def test_one_shot_equals_the_last_step_at_once():
    a, b = mlp(), mlp()
    kept = P.prune_one_shot(a)
    P.GradualPruner(b, end_step=0)
    ma, mb = P.masked_layers(a), P.masked_layers(b)
    assert set(ma) == set(mb) == set(kept) == {"0", "2", "4"}
    for name in ma:
        assert torch.equal(ma[name], mb[name])
        w = a.get_submodule(name).parametrizations.weight.original
        assert torch.equal(ma[name], sparsegemm.mask_2to4(w))
        assert kept[name] == pytest.approx(P.kept_share(w))
        assert 0.5 < kept[name] < 1.0


def test_k_not_a_multiple_of_4_counts_the_short_last_group():
    """K = 10: groups of 4, 4 and a last one of 2 that is 2:4 from the start."""
    lin = nn.Linear(10, 3)
    model = nn.Sequential(lin)
    pruner = P.GradualPruner(model, end_step=2, initial_share=0.0)
    assert share_of_groups_at_2to4(lin) == pytest.approx(1 / 3)
    pruner.step()
    pruner.step()
    kept = groups_kept(lin)
    assert kept[:, :2].eq(2).all() and kept[:, 2].eq(2).all()
    P.remove_masks(model)
    sparse = sparsegemm.SparseLinear.from_dense(lin, prune=False)
    torch.testing.assert_close(sparse.dense_weight(), lin.weight.detach(), rtol=0, atol=0)


def test_one_shot_completes_a_partial_mask_and_respects_filter():
    model = mlp()
    pruner = P.GradualPruner(model, end_step=8, filter_fn=lambda name, mod: name != "4")
    for _ in range(3):
        pruner.step()
    partial = P.masked_layers(model)["2"].clone()
    assert not bool(partial.all())
    live = model[2].weight.detach().abs()  # what the model computes with: the partial mask applied
    kept = P.prune_one_shot(model, filter_fn=lambda name, mod: name != "4")
    assert set(P.masked_layers(model)) == {"0", "2"}
    final = P.masked_layers(model)["2"]
    assert not bool((final & ~partial).any())
    assert int(groups_kept(model[2]).max()) == 2
    # The share kept is of that weight (the calibrated methods' measure), not of the entries the
    # partial mask had already zeroed, which once counted as lost again.
    assert kept["2"] == pytest.approx(float((live * final).sum() / live.sum()), rel=1e-6)


def test_gradual_state_dict_resumes_the_same_masks():
    def run(steps, model, pruner, opt):
        gen = torch.Generator().manual_seed(7)
        for _ in range(steps):
            x = torch.randn(16, 24, generator=gen)
            loss = model(x).square().mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            pruner.step()

    straight = mlp()
    pruner = P.GradualPruner(straight, end_step=6, frequency=2)
    opt = torch.optim.SGD(straight.parameters(), lr=0.05)
    run(3, straight, pruner, opt)
    model_state, pruner_state, opt_state = (copy.deepcopy(straight.state_dict()), pruner.state_dict(),
                                            copy.deepcopy(opt.state_dict()))
    run(4, straight, pruner, opt)

    resumed = mlp(seed=1)
    pruner2 = P.GradualPruner(resumed, end_step=6, frequency=2)
    resumed.load_state_dict(model_state)
    pruner2.load_state_dict(pruner_state)
    opt2 = torch.optim.SGD(resumed.parameters(), lr=0.05)
    opt2.load_state_dict(opt_state)
    assert pruner2.step_count == 3
    run(4, resumed, pruner2, opt2)
    for name, mask in P.masked_layers(straight).items():
        assert torch.equal(mask, P.masked_layers(resumed)[name])


@pytest.mark.parametrize("kwargs, match", [
    (dict(end_step=2, start_step=3), "start_step <= end_step"),
    (dict(end_step=-1), "start_step <= end_step"),
    (dict(end_step=4, frequency=0), "frequency"),
    (dict(end_step=4, initial_share=1.5), "initial_share"),
])
def test_gradual_pruner_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        P.GradualPruner(mlp(), **kwargs)


def test_gradual_pruner_needs_a_layer():
    with pytest.raises(ValueError, match="no layer to prune"):
        P.GradualPruner(nn.Sequential(nn.ReLU()), end_step=3)


def test_gemm_view_rejects_other_shapes():
    for shape in [(2, 3, 4, 5, 6), (8,)]:
        with pytest.raises(ValueError, match="expected a Linear"):
            P.gemm_view(torch.zeros(shape))


# --------------------------------------------------------------------------------------------
# Fixed masks through training, then conversion


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_mask_stays_fixed_through_optimizer_steps(optimizer):
    model = mlp()
    P.prune_one_shot(model)
    masks = {name: m.clone() for name, m in P.masked_layers(model).items()}
    params = model.parameters()
    opt = (torch.optim.SGD(params, lr=0.1, momentum=0.9, weight_decay=0.1) if optimizer == "sgd"
           else torch.optim.AdamW(params, lr=0.05, weight_decay=0.1))
    before = {name: model.get_submodule(name).weight.detach().clone() for name in masks}
    gen = torch.Generator().manual_seed(3)
    for _ in range(5):
        loss = model(torch.randn(32, 24, generator=gen)).square().mean()
        opt.zero_grad()
        loss.backward()
        for name, mask in masks.items():  # no gradient reaches a pruned weight
            grad = model.get_submodule(name).parametrizations.weight.original.grad
            assert bool((grad[~mask] == 0).all())
        opt.step()
    for name, mask in masks.items():
        mod = model.get_submodule(name)
        assert torch.equal(P.masked_layers(model)[name], mask)
        w = mod.weight.detach()
        assert bool((w[~mask] == 0).all())
        assert not torch.equal(w, before[name])  # it did train
        assert int(groups_kept(mod).max()) <= 2
    x = torch.randn(5, 24)
    expected = model(x)
    assert P.remove_masks(model) == ["0", "2", "4"]
    assert all(type(model[i]) is nn.Linear for i in (0, 2, 4))
    assert P.masked_layers(model) == {}
    torch.testing.assert_close(model(x), expected, rtol=0, atol=0)
    report = sparsegemm.sparsify(model, min_features=1)
    assert len(report.converted) == 3
    assert all(layer.magnitude_kept == 1.0 for layer in report.layers)
    assert isinstance(model[0], sparsegemm.SparseLinear)
    torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-5)


def test_masked_conv_uses_the_sparse_conv_k_order_and_converts_exactly():
    torch.manual_seed(0)
    conv = nn.Conv2d(6, 8, 3, padding=1)
    model = nn.Sequential(conv)
    P.prune_one_shot(model)
    mask = P.masked_layers(model)["0"]
    original = conv.parametrizations.weight.original.detach()
    # groups of 4 run along cin within one (ky, kx) tap, as SparseConv2d lays K out
    assert torch.equal(P.gemm_view(mask), sparsegemm.mask_2to4(P.gemm_view(original)))
    assert not torch.equal(P.gemm_view(mask), sparsegemm.mask_2to4(original.reshape(8, -1)).view(8, 6, 3, 3)
                           .permute(0, 2, 3, 1).reshape(8, -1))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    x = torch.randn(2, 6, 7, 7)
    for _ in range(3):
        loss = model(x).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert torch.equal(P.masked_layers(model)["0"], mask)
    expected = model(x)
    P.remove_masks(model)
    sparse = sparsegemm.SparseConv2d.from_dense(model[0], prune=False)
    torch.testing.assert_close(sparse.dense_weight(), model[0].weight.detach(), rtol=0, atol=0)
    torch.testing.assert_close(sparse(x), expected, rtol=1e-5, atol=1e-5)


def test_unmasked_weights_are_rejected_by_strict_conversion():
    """The converse of the tests above: without the mask, prune=False has something to refuse."""
    with pytest.raises(ValueError):
        sparsegemm.SparseLinear.from_dense(mlp()[0], prune=False)


def test_prunable_layers_skip_grouped_convs():
    model = nn.Sequential(nn.Conv2d(8, 8, 3, groups=8), nn.Conv2d(8, 16, 1), nn.Flatten(), nn.Linear(16, 4))
    assert [name for name, _ in P.prunable_layers(model)] == ["1", "3"]


# --------------------------------------------------------------------------------------------
# Channel permutation


def test_find_channel_pairs():
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Dropout(), nn.Linear(8, 8), nn.LayerNorm(8),
                          nn.Linear(8, 4), nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.Conv2d(4, 4, 1)))
    assert P.find_channel_pairs(model) == [
        P.ChannelPair("0", "3", ("1", "2")),
        P.ChannelPair("6.0", "6.2", ("6.1",)),
    ]


@pytest.mark.parametrize("make, shape", [(mlp, (10, 24)), (convnet, (2, 3, 9, 9))], ids=["mlp", "conv"])
def test_permutation_preserves_function_and_never_lowers_kept_magnitude(make, shape):
    model = make(dtype=torch.float64)
    x = torch.randn(*shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    expected = model(x)
    consumers_before = {p.consumer: P.kept_share(model.get_submodule(p.consumer).weight)
                        for p in P.find_channel_pairs(model)}
    report = P.permute_channels(model)
    assert len(report.pairs) == 2 and not any(r.skipped for r in report.pairs)
    torch.testing.assert_close(model(x), expected, rtol=1e-12, atol=1e-12)
    for r in report.pairs:
        assert r.kept_before == pytest.approx(consumers_before[r.pair.consumer])
        assert r.kept_after >= r.kept_before
        assert r.kept_after == pytest.approx(P.kept_share(model.get_submodule(r.pair.consumer).weight))
    assert any(r.kept_after > r.kept_before + 1e-3 for r in report.pairs)
    assert "->" in str(report)


def test_permutation_raises_kept_magnitude_on_a_crafted_case():
    """Four heavy input channels share one group: 2:4 keeps half of the weight. Spread over the
    groups, at most two heavy per group, the mask keeps 44 of every 52."""
    producer, consumer = nn.Linear(5, 16), nn.Linear(16, 6)
    with torch.no_grad():
        consumer.weight.fill_(1.0)
        consumer.weight[:, :4] = 10.0
        consumer.weight[::2] *= -1
    model = nn.Sequential(producer, nn.Tanh(), consumer)
    x = torch.randn(3, 5)
    expected = model(x)
    report = P.permute_channels(model)
    (r,) = report.pairs
    assert r.kept_before == pytest.approx(26 / 52)
    assert r.kept_after == pytest.approx(44 / 52)
    assert r.swaps == 2  # two heavy channels moved out, two stay: the greedy optimum
    heavy = (consumer.weight[0].abs() == 10).view(4, 4).sum(1)
    assert int(heavy.max()) == 2
    torch.testing.assert_close(model(x), expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("seed", range(4))
def test_search_permutation_is_a_permutation_that_keeps_more(seed):
    gen = torch.Generator().manual_seed(seed)
    matrix = torch.randn(24, 32, generator=gen) * torch.rand(1, 32, generator=gen) * 3
    perm, swaps = P.search_permutation(matrix)
    assert sorted(perm.tolist()) == list(range(32))
    assert P.kept_share(matrix[:, perm]) >= P.kept_share(matrix)
    assert swaps > 0
    again, _ = P.search_permutation(matrix)
    assert torch.equal(perm, again)  # deterministic
    limited, used = P.search_permutation(matrix, max_swaps=1)
    assert used == 1 and P.kept_share(matrix[:, limited]) > P.kept_share(matrix)


def test_search_permutation_needs_whole_groups():
    with pytest.raises(ValueError, match="multiple of 4"):
        P.search_permutation(torch.randn(3, 6))


def test_permutation_skips_what_it_cannot_permute():
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 4), nn.ReLU(), nn.Linear(4, 8), nn.ReLU(),
                          nn.Linear(8, 8))
    P.prune_one_shot(model, filter_fn=lambda name, mod: name == "6")
    pairs = [P.ChannelPair("0", "2", ("1",)), P.ChannelPair("4", "6", ("5",)), P.ChannelPair("2", "4", ("3",)),
             P.ChannelPair("0", "4", ())]
    weights = [model.get_submodule(n).weight.detach().clone() for n in ("0", "2", "4")]
    report = P.permute_channels(model, pairs)
    reasons = [r.skipped for r in report.pairs]
    assert "not a multiple of 4" in reasons[0]
    assert "already masked" in reasons[1]
    assert reasons[2] == ""
    assert "gives 6 channels, consumer takes 4" in reasons[3]
    assert "skipped" in str(report)
    assert torch.equal(model[0].weight, weights[0])
    layer_norm_between = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4), nn.Linear(4, 4))
    report = P.permute_channels(layer_norm_between, [P.ChannelPair("0", "2", ("1",))])
    assert "LayerNorm between them is not channel-wise for a Linear's outputs" in report.pairs[0].skipped
    # 2-D pooling and BatchNorm2d act along dim 1, a Conv2d's channels: after a Linear they mix or
    # normalize across its features (max |diff| 0.99 once permuted, at [2, 4, 4, 16]).
    for between in (nn.MaxPool2d(3, 1, 1), nn.BatchNorm2d(4)):
        pooled = nn.Sequential(nn.Linear(16, 16), between, nn.Linear(16, 16))
        assert P.find_channel_pairs(pooled) == []
        (pair,) = P.permute_channels(pooled, [P.ChannelPair("0", "2", ("1",))]).pairs
        assert f"{type(between).__name__} between them is not channel-wise for a Linear's outputs" in pair.skipped


class _SkipMLP(nn.Sequential):
    """A Sequential subclass whose forward adds a skip connection around its second half."""

    def forward(self, x):
        h = self[0](x)
        return self[2](self[1](h)) + h


def test_find_channel_pairs_trusts_only_sequentials_that_run_in_order():
    # Permuted as a plain Sequential, the skip connection added h in the old channel order: the
    # model's output changed (max |diff| 1.6) while the report showed a normal pair.
    model = nn.Sequential(_SkipMLP(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 16)), nn.Linear(16, 16), nn.ReLU(),
                          nn.Linear(16, 8))
    assert P.find_channel_pairs(model) == [P.ChannelPair("1", "3", ("2",))]
    x = torch.randn(4, 16)
    expected = model(x)
    P.permute_channels(model)
    torch.testing.assert_close(model(x), expected)


def test_gradual_pruner_arguments_and_state_are_checked():
    model = nn.Sequential(nn.Linear(16, 16))
    for kwargs in ({"end_step": 5.5}, {"end_step": 5, "frequency": 2.5}, {"end_step": True}):
        with pytest.raises(TypeError, match="GradualPruner: .* must be an integer"):
            P.GradualPruner(copy.deepcopy(model), **kwargs)
    pruner = P.GradualPruner(model, end_step=10, start_step=4, initial_share=0.5)
    assert pruner.share == 0.0 and not P.masked_layers(model)["0"].logical_not().any()  # nothing before start_step
    for state in ({}, {"step_count": -3}, {"step_count": "2"}):
        with pytest.raises(ValueError, match=r"expected \{'step_count': a count >= 0\}"):
            pruner.load_state_dict(state)
    pruner.load_state_dict({"step_count": 4.0})  # a whole float, as __init__ takes for its counts
    assert pruner.share == 0.5 and pruner.step_count == 4 and isinstance(pruner.step_count, int)


def test_permutation_search_refuses_non_finite_weights():
    # NaN gains never compare: the search swapped until max_swaps.
    matrix = torch.randn(8, 16)
    matrix[2, 5] = float("nan")
    with pytest.raises(ValueError, match="search_permutation: the matrix holds NaN or inf"):
        P.search_permutation(matrix)
    model = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 16))
    with torch.no_grad():
        model[2].weight[0, 0] = float("inf")
    (pair,) = P.permute_channels(model).pairs
    assert pair.skipped == "the consumer's weight holds no finite values (NaN, inf, or on the meta device)"


def test_prunable_layers_beside_weight_norm_and_a_layer_registered_twice():
    # A parametrizations.weight_norm layer (originals original0 / original1) made every pruning call
    # fail, and listed, failed itself (no parametrizations.weight.original); any parametrization
    # that computes the weight (orthogonal) had its mask chosen on the tensor it starts from. Left
    # alone now. A layer registered under two names holds its weight alone and is pruned.
    normed = nn.utils.parametrizations.weight_norm(nn.Linear(16, 16))
    rotated = nn.utils.parametrizations.orthogonal(nn.Linear(16, 16))
    shared = nn.Linear(16, 16)
    model = nn.Sequential(normed, nn.ReLU(), shared, nn.ReLU(), shared, nn.Linear(16, 8), rotated)
    assert [name for name, _ in P.prunable_layers(model)] == ["2", "5"]
    P.prune_one_shot(model)
    assert set(P.masked_layers(model)) == {"2", "5"}
    P.GradualPruner(model, end_step=2)
    assert set(P.masked_layers(model)) == {"2", "5"}


def test_permute_channels_through_a_reused_activation():
    act = nn.ReLU()  # stateless: one module at two places changes nothing when channels move
    model = nn.Sequential(nn.Linear(16, 32), act, nn.Linear(32, 32), act, nn.Linear(32, 8))
    x = torch.randn(4, 16)
    want = model(x)
    report = P.permute_channels(model)
    assert len(report.pairs) == 2 and not any(pair.skipped for pair in report.pairs)
    assert torch.allclose(model(x), want, atol=1e-5)


def test_non_finite_weights_still_end_exactly_two_to_four():
    # A group dropping a NaN (or inf) costs NaN, which sorted after the inf marking finished groups:
    # with any group finished earlier (a gradual schedule), it was never chosen.
    model = nn.Sequential(nn.Linear(16, 8))
    with torch.no_grad():
        model[0].weight[0, :3] = float("nan")
        model[0].weight[1, 4:7] = float("inf")
    pruner = P.GradualPruner(model, end_step=4, initial_share=0.25)
    while not pruner.done:
        pruner.step()
    assert (P.masked_layers(model)["0"].view(8, 4, 4).sum(-1) == 2).all()


def test_gradual_pruner_takes_a_whole_float_step_count():
    pruner = P.GradualPruner(nn.Sequential(nn.Linear(16, 16)), end_step=0.8 * 10)
    assert pruner.end_step == 8 and isinstance(pruner.end_step, int)
