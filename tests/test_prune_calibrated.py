"""Calibrated one-shot 2:4 pruning: prune_one_shot(method="wanda" | "sparsegpt", calibration=...).

SparseGPT's update is checked against the closed-form least-squares answer, Wanda's and
SparseGPT's masks against magnitude on layers whose input features differ in scale (what they are
for: LLM activations have outlier features), and the convolution's calibration patches against
F.conv2d itself.
"""
import copy
import math

import numpy as np
import pytest
import torch
from torch import nn

import sparsegemm
from sparsegemm import prune as P


def scaled_inputs(rows, k, seed):
    """Inputs like LLM activations: correlated (rank 32 plus noise) features whose scales differ by
    up to 25x."""
    gen = torch.Generator().manual_seed(seed)
    scales = torch.exp(torch.linspace(math.log(0.2), math.log(5.0), k))[torch.randperm(k, generator=gen)]
    basis = torch.randn(32, k, generator=gen) / math.sqrt(32)
    return (torch.randn(rows, 32, generator=gen) @ basis + 0.3 * torch.randn(rows, k, generator=gen)) * scales


def relative_error(model, dense, x):
    with torch.no_grad():
        want = dense(x)
        return float((model(x) - want).norm() / want.norm())


def pruned_copy(dense, **kwargs):
    model = copy.deepcopy(dense)
    P.prune_one_shot(model, **kwargs)
    return model


def test_sparsegpt_update_is_the_least_squares_optimum():
    # Row by row: where a group's two dropped weights come first, the kept ones get exactly the
    # correction that minimises the output error (w - w')^T H (w - w') with the damped H; weights
    # kept to the left of every dropped one stay as they were (the update only moves what follows).
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(60, 8, generator=gen, dtype=torch.float64)
    hessian = x.T @ x
    weight = torch.tensor([[0.01, -0.02, 3.0, -2.0, 0.03, 0.01, 1.5, 2.5],
                           [0.02, 0.01, -1.0, 4.0, 0.02, -0.03, 2.0, -1.0]], dtype=torch.float64)
    allowed = torch.ones_like(weight, dtype=torch.bool)
    for block_size in (4, 8):
        pruned, mask = P.sparsegpt_2to4(weight, hessian, allowed, damp=0.01, block_size=block_size)
        assert mask.tolist() == [[False, False, True, True] * 2] * 2
        assert torch.equal(pruned[~mask], torch.zeros(8, dtype=torch.float64))
    pruned, _ = P.sparsegpt_2to4(weight[:, :4], hessian[:4, :4], damp=0.01)
    damped = hessian[:4, :4] + 0.01 * torch.diagonal(hessian[:4, :4]).mean() * torch.eye(4, dtype=torch.float64)
    for row in range(2):
        best = weight[row, 2:4] + torch.linalg.solve(damped[2:, 2:], damped[2:, :2] @ weight[row, :2])
        assert torch.allclose(pruned[row, 2:4], best, rtol=1e-12, atol=1e-12)
    # Mirrored: every group keeps its first two. The first group's, left of every dropped weight,
    # stay as they were; the second group's are corrected for the two dropped before them.
    flipped = weight.flip(1)
    pruned, mask = P.sparsegpt_2to4(flipped, hessian.flip(0, 1), damp=0.01)
    assert mask.tolist() == [[True, True, False, False] * 2] * 2
    assert torch.equal(pruned[:, :2], flipped[:, :2])
    assert not torch.isclose(pruned[:, 4:6], flipped[:, 4:6]).any()


def test_sparsegpt_block_size_only_regroups_the_arithmetic():
    gen = torch.Generator().manual_seed(2)
    weight = torch.randn(16, 64, generator=gen, dtype=torch.float64)
    x = scaled_inputs(300, 64, seed=3).to(torch.float64)
    results = [P.sparsegpt_2to4(weight, x.T @ x, block_size=b) for b in (4, 32, 128)]
    for pruned, mask in results[1:]:
        assert torch.equal(mask, results[0][1])
        assert torch.allclose(pruned, results[0][0], rtol=0, atol=1e-10)
    pruned, mask = results[0]
    assert (mask.view(16, -1, 4).sum(-1) == 2).all()


def test_calibrated_masks_beat_magnitude_on_outlier_features():
    # One Linear 128 -> 64 fed correlated features of different scales: on held-out inputs the
    # layer's relative output error falls from magnitude (0.44) to Wanda (0.21) to SparseGPT (0.14;
    # figures in the README).
    torch.manual_seed(4)
    dense = nn.Sequential(nn.Linear(128, 64))
    x_all = scaled_inputs(1200, 128, seed=5)
    calibration, held_out = list(x_all[:800].split(100)), x_all[800:]
    errors = {}
    for method in P.METHODS:
        model = pruned_copy(dense, method=method, calibration=None if method == "magnitude" else calibration)
        errors[method] = relative_error(model, dense, held_out)
        P.remove_masks(model)
        assert (P.gemm_view(model[0].weight).view(64, -1, 4).ne(0).sum(-1) <= 2).all()
    assert errors["wanda"] < 0.6 * errors["magnitude"], errors
    assert errors["sparsegpt"] < 0.8 * errors["wanda"], errors


def test_conv_calibration_patches_are_in_gemm_order():
    # The rows the hooks collect for a Conv2d, times gemm_view(W)^T, are the convolution itself.
    torch.manual_seed(6)
    conv = nn.Conv2d(6, 10, (3, 2), stride=(2, 1), padding=(1, 2), dilation=(1, 2), bias=False).double()
    x = torch.randn(2, 6, 9, 7, dtype=torch.float64)
    rows = P._layer_inputs(conv, x)
    want = conv(x).permute(0, 2, 3, 1).reshape(-1, 10)
    assert torch.allclose(rows @ P.gemm_view(conv.weight).T, want, atol=1e-12)
    assert torch.equal(P._layer_inputs(conv, x[0]), P._layer_inputs(conv, x[:1]))
    assert P._layer_inputs(conv, x[:0]).shape == (0, 6 * 3 * 2)  # an empty batch: no rows, K columns


@pytest.mark.parametrize("sequential", [True, False])
def test_cnn_sparsegpt_sequential_or_not_then_sparsify(sequential):
    # Convs and a Linear, K not a multiple of 4 (Conv2d 3 -> 8, 3x3: K = 27): 2:4 masks everywhere,
    # less error than magnitude, and sparsify converts the baked weights exactly.
    torch.manual_seed(7)
    dense = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 3, stride=2), nn.ReLU(),
                          nn.Flatten(), nn.Linear(16 * 3 * 3, 10))
    gen = torch.Generator().manual_seed(8)
    images = torch.randn(96, 3, 8, 8, generator=gen) * torch.tensor([0.1, 1.0, 5.0]).view(1, 3, 1, 1)
    calibration = (batch for batch in images[:64].split(16))  # an iterator: read once, kept for every layer
    model = pruned_copy(dense, method="sparsegpt", calibration=calibration, sequential=sequential)
    magnitude = pruned_copy(dense)
    assert set(P.masked_layers(model)) == {"0", "2", "5"}
    held_out = images[64:]
    assert relative_error(model, dense, held_out) < relative_error(magnitude, dense, held_out)
    P.remove_masks(model)
    with torch.no_grad():
        want = model(held_out)
    sparsegemm.sparsify(model, min_features=1)
    assert isinstance(model[0], sparsegemm.SparseConv2d) and isinstance(model[5], sparsegemm.SparseLinear)
    with torch.no_grad():
        assert torch.allclose(model(held_out), want, rtol=1e-4, atol=1e-4)


def test_existing_masks_only_shrink_from_the_function_the_layer_computes():
    # Layers half pruned by GradualPruner, then trained: the optimizer moves the masked-out
    # originals too (noise here). The calibrated methods keep within the old masks, complete every
    # group to exactly two wherever the old mask left two, and start from the layer's current
    # function: SparseGPT's output stays closer to it than magnitude completion does.
    torch.manual_seed(9)
    model = nn.Sequential(nn.Linear(64, 32))
    pruner = P.GradualPruner(model, end_step=4)
    for _ in range(2):
        pruner.step()
    before = P.masked_layers(model)["0"].clone()
    assert 0.3 < float((before.view(32, -1, 4).sum(-1) == 2).float().mean()) < 0.9
    with torch.no_grad():
        model[0].parametrizations.weight.original.add_(5 * torch.randn(32, 64) * ~before)
    x = scaled_inputs(400, 64, seed=10)
    current = copy.deepcopy(model)
    errors = {}
    for method in P.METHODS:
        pruned = pruned_copy(model, method=method, calibration=None if method == "magnitude" else list(x.split(100)))
        mask = P.masked_layers(pruned)["0"]
        assert not (mask & ~before).any()
        assert torch.equal(mask.view(32, -1, 4).sum(-1), before.view(32, -1, 4).sum(-1).clamp(max=2))
        errors[method] = relative_error(pruned, current, x)
    assert errors["sparsegpt"] < 0.5 * errors["magnitude"], errors


def test_wanda_mask_is_the_top_two_of_weight_times_input_norm():
    torch.manual_seed(11)
    model = nn.Sequential(nn.Linear(40, 12, bias=False))
    x = scaled_inputs(300, 40, seed=12)
    weight = model[0].weight.detach().double().numpy().copy()
    P.prune_one_shot(model, method="wanda", calibration=x)  # a tensor: one batch
    norms = np.sqrt((x.double().numpy() ** 2).sum(0))
    score = np.abs(weight) * norms
    want = np.zeros_like(score, dtype=bool)
    for row in range(12):
        for group in range(10):
            top = np.argsort(-score[row, 4 * group:4 * group + 4], kind="stable")[:2]
            want[row, 4 * group + top] = True
    assert np.array_equal(P.masked_layers(model)["0"].numpy(), want)
    assert np.array_equal(model[0].parametrizations.weight.original.detach().double().numpy(), weight)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_half_precision_layers_keep_their_dtype(dtype):
    torch.manual_seed(13)
    model = nn.Sequential(nn.Linear(32, 16)).to(dtype)
    x = scaled_inputs(128, 32, seed=14).to(dtype)
    dense = copy.deepcopy(model)
    P.prune_one_shot(model, method="sparsegpt", calibration=[x])
    assert model[0].parametrizations.weight.original.dtype == dtype
    assert relative_error(model.float(), dense.float(), x.float()) < 0.3


def test_calibration_sees_every_call_in_eval_mode():
    # Keyword calls and a layer called twice per forward: its statistics sum both calls. The model
    # calibrates in eval mode (batch norm's running statistics untouched) and gets its mode back.
    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            self.norm, self.layer = nn.BatchNorm1d(16), nn.Linear(16, 16)

        def forward(self, x):
            return self.layer(input=self.layer(self.norm(x)))

    torch.manual_seed(15)
    model = Shared().train()
    x = torch.randn(32, 16) * 3 + 1
    running = model.norm.running_mean.clone()
    stats = P._calibration_stats([("layer", model.layer)], lambda: model.eval()(x), "hessian")["layer"]
    with torch.no_grad():
        first = model.norm(x).double()
        second = model.layer(first.float()).double()
    assert stats.rows == 64
    assert torch.allclose(stats.sums.double(), first.T @ first + second.T @ second, rtol=1e-5, atol=1e-4)
    model.train()
    P.prune_one_shot(model, method="sparsegpt", calibration=x)
    assert model.training and torch.equal(model.norm.running_mean, running)
    assert not model.layer._forward_pre_hooks and "layer" in P.masked_layers(model)


def test_inputs_that_are_always_zero_lose_their_weights_first():
    torch.manual_seed(16)
    model = nn.Sequential(nn.Linear(16, 8, bias=False))
    x = torch.randn(100, 16)
    x[:, [1, 6]] = 0.0
    with torch.no_grad():
        model[0].weight[:, [1, 6]] = 100.0  # the largest weights, on inputs that never fire
    P.prune_one_shot(model, method="sparsegpt", calibration=[x])
    mask = P.masked_layers(model)["0"]
    assert not mask[:, [1, 6]].any() and (mask.view(8, -1, 4).sum(-1) == 2).all()


class ToyDecoderBlock(nn.Module):
    """A pre-norm transformer block as transformers writes them: hidden state first, the attention
    mask as a keyword, a tuple out."""

    def __init__(self, d):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.out = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.up, self.down = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, hidden, *, attention_mask):
        q, k, v = self.qkv(self.norm1(hidden)).chunk(3, dim=-1)
        scores = (q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1]) + attention_mask
        hidden = hidden + self.out(scores.softmax(-1) @ v)
        return (hidden + self.down(nn.functional.gelu(self.up(self.norm2(hidden)))),)


class ToyLM(nn.Module):
    def __init__(self, vocab=50, d=32, depth=3):
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.layers = nn.ModuleList(ToyDecoderBlock(d) for _ in range(depth))
        self.head = nn.Linear(d, vocab)

    def forward(self, ids, use_cache=False):
        t = ids.shape[1]
        mask = torch.full((t, t), -math.inf).triu(1)
        hidden = self.embed(ids)
        for block in self.layers:
            hidden = block(hidden, attention_mask=mask)[0]
        return self.head(hidden)


def test_blocks_calibrate_in_one_pass_with_the_layer_by_layer_result():
    # Block by block from the first block's recorded inputs: the same statistics, hence the same
    # masks and weights, as a full calibration pass per layer, for one pass over the model (plus one
    # per layer outside the blocks: the head).
    torch.manual_seed(17)
    dense = ToyLM()
    gen = torch.Generator().manual_seed(18)
    batches = [{"ids": torch.randint(0, 50, (4, 12), generator=gen), "use_cache": False} for _ in range(3)]
    results = {}
    for mode in ("layers", "blocks"):
        model = copy.deepcopy(dense)
        passes = []
        model.register_forward_pre_hook(lambda module, args: passes.append(1))
        kept = P.prune_one_shot(model, method="sparsegpt", calibration=batches,
                                blocks=model.layers if mode == "blocks" else None)
        results[mode] = (model, kept, len(passes))
    (by_layer, kept_layers, passes_layers), (by_block, kept_blocks, passes_blocks) = results.values()
    assert list(kept_blocks) == [f"layers.{i}.{n}" for i in range(3) for n in ("qkv", "out", "up", "down")] + ["head"]
    assert set(kept_layers) == set(kept_blocks)
    assert passes_layers == 13 * 3 and passes_blocks == 2 * 3
    for (name, mask), (_, other) in zip(P.masked_layers(by_layer).items(), P.masked_layers(by_block).items()):
        assert torch.equal(mask, other), name
    for (name, a), (_, b) in zip(by_layer.named_parameters(), by_block.named_parameters()):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6), name
    ids = torch.randint(0, 50, (2, 12), generator=gen)
    assert relative_error(by_block, dense, ids) < relative_error(pruned_copy(dense), dense, ids)


def test_progress_bars_over_many_layers(capsys):
    # Calibrated pruning and sparsify show a tqdm bar (on stderr) past 20 layers, none when asked not to.
    model = nn.Sequential(*[nn.Linear(16, 16) for _ in range(24)])
    x = torch.randn(8, 16)
    P.prune_one_shot(model, method="wanda", calibration=x, progress=False)
    assert capsys.readouterr().err == ""
    P.prune_one_shot(copy.deepcopy(model), method="wanda", calibration=x)
    assert "prune: 100%" in capsys.readouterr().err
    lm = ToyLM(depth=6)  # 24 layers in blocks and the head
    P.prune_one_shot(lm, method="wanda", calibration=torch.randint(0, 50, (2, 6)), blocks=lm.layers)
    assert "prune: 100%" in capsys.readouterr().err
    P.remove_masks(model)
    sparsegemm.sparsify(model, min_features=1)
    assert "sparsify: 100%" in capsys.readouterr().err


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_calibrated_pruning_on_the_gpu_matches_the_cpu(method):
    # The same algorithm on CUDA tensors: its statistics sum in another order, so a near tie may
    # fall the other way, but the masks agree almost everywhere and the error is the same.
    torch.manual_seed(19)
    dense = nn.Sequential(nn.Linear(128, 64))
    x = scaled_inputs(600, 128, seed=20)
    cpu = pruned_copy(dense, method=method, calibration=list(x[:400].split(100)))
    gpu = pruned_copy(copy.deepcopy(dense).cuda(), method=method,
                      calibration=[b.cuda() for b in x[:400].split(100)]).cpu()
    agree = (P.masked_layers(cpu)["0"] == P.masked_layers(gpu)["0"]).float().mean()
    assert agree > 0.99, agree
    cpu_error, gpu_error = relative_error(cpu, dense, x[400:]), relative_error(gpu, dense, x[400:])
    assert abs(cpu_error - gpu_error) < 0.05 * cpu_error, (cpu_error, gpu_error)


def test_calibrated_pruning_errors():
    model = nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 8))
    x = torch.randn(4, 16)

    def no_hooks_left():
        return all(not mod._forward_pre_hooks for mod in model.modules())

    with pytest.raises(ValueError, match=r"prune_one_shot: method must be one of .*got 'obs'"):
        P.prune_one_shot(model, method="obs", calibration=[x])
    with pytest.raises(ValueError, match="method 'wanda' needs calibration batches"):
        P.prune_one_shot(model, method="wanda")
    with pytest.raises(ValueError, match="magnitude pruning takes no calibration data"):
        P.prune_one_shot(model, calibration=[x])
    with pytest.raises(ValueError, match="prune_one_shot: damp must be > 0, got 0"):
        P.prune_one_shot(model, method="sparsegpt", calibration=[x], damp=0)
    with pytest.raises(ValueError, match="block_size must be a positive multiple of 4, got 6"):
        P.prune_one_shot(model, method="sparsegpt", calibration=[x], block_size=6)
    with pytest.raises(ValueError, match="calibration holds no batch"):
        P.prune_one_shot(model, method="sparsegpt", calibration=[])
    with pytest.raises(ValueError, match="layer '0' got a non-finite calibration input"):
        P.prune_one_shot(model, method="wanda", calibration=[torch.full((2, 16), math.nan)])
    assert no_hooks_left() and model.training
    model.eval()
    with pytest.raises(RuntimeError):  # the model's own error, hooks removed, mode kept
        P.prune_one_shot(model, method="wanda", calibration=[torch.randn(2, 15)])
    assert no_hooks_left() and not model.training
    skipping = nn.ModuleDict({"used": nn.Linear(16, 8), "unused": nn.Linear(16, 8)})
    skipping.forward = lambda inp: skipping["used"](inp)
    with pytest.raises(ValueError, match="layer 'unused' saw no calibration input"):
        P.prune_one_shot(skipping, method="sparsegpt", calibration=[x])
    silent = nn.Sequential(nn.Linear(16, 8))
    silent.forward = lambda inp: silent[0](bias=inp)
    with pytest.raises(ValueError, match="layer '0' was called without an input tensor"):
        P.prune_one_shot(silent, method="wanda", calibration=[x])
    for kwargs, message in [({}, r"sparsegpt_2to4: expected weight \[N, K\] with K % 4 == 0"),
                            ({"block_size": 2}, "sparsegpt_2to4: block_size must be a positive multiple of 4"),
                            ({"damp": -1.0}, "sparsegpt_2to4: damp must be > 0, got -1.0")]:
        with pytest.raises(ValueError, match=message):
            P.sparsegpt_2to4(torch.zeros(2, 6 if not kwargs else 8), torch.eye(6 if not kwargs else 8), **kwargs)
    with pytest.raises(ValueError, match=r"sparsegpt_2to4: expected allowed of the weight's shape \(2, 8\), got \(2, 4\)"):
        P.sparsegpt_2to4(torch.zeros(2, 8), torch.eye(8), torch.ones(2, 4, dtype=torch.bool))
    lm = ToyLM()
    ids = torch.randint(0, 50, (2, 6))
    with pytest.raises(ValueError, match="magnitude pruning takes no calibration data"):
        P.prune_one_shot(lm, blocks=lm.layers)
    with pytest.raises(ValueError, match="blocks calibrate layer by layer: pass sequential=True"):
        P.prune_one_shot(lm, method="wanda", calibration=ids, blocks=lm.layers, sequential=False)
    with pytest.raises(ValueError, match="blocks is empty"):
        P.prune_one_shot(lm, method="wanda", calibration=ids, blocks=[])
    with pytest.raises(ValueError, match=r"blocks\[0\] \(ToyDecoderBlock\) is not a module of the model"):
        P.prune_one_shot(lm, method="wanda", calibration=ids, blocks=ToyLM().layers)
    unused = nn.ModuleDict({"lm": lm, "spare": ToyDecoderBlock(32)})
    unused.forward = lambda inp: unused["lm"](inp)
    with pytest.raises(ValueError, match=r"reached the first block \('spare'\) in 0 of 1 calibration batches"):
        P.prune_one_shot(unused, method="wanda", calibration=ids, blocks=[unused["spare"]])
    assert all(not mod._forward_pre_hooks for mod in unused.modules()) and not P.masked_layers(lm)


def test_tied_weights_are_not_masked_twice():
    # Each holder masked the shared weight its own way: remove_masks baked one mask and the other
    # applied on top (fewer than two kept a group, another function).
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.c = nn.Linear(64, 64), nn.Linear(64, 64), nn.Linear(64, 64)
            self.b.weight = self.a.weight

        def forward(self, x):
            return self.c(self.b(torch.relu(self.a(x))))

    model = Tied()
    assert [name for name, _ in P.prunable_layers(model)] == ["c"]
    assert list(P.prune_one_shot(model, method="wanda", calibration=[torch.randn(32, 64)])) == ["c"]


def test_blocks_prune_a_stem_before_the_blocks_as_layer_by_layer():
    # A layer before the first block (a ViT patch embedding, Whisper's conv stem) was pruned after the
    # blocks had calibrated on its unpruned output: the masks differed from layer by layer's.
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.fc2 = nn.Linear(64, 128), nn.Linear(128, 64)

        def forward(self, h):
            return h + self.fc2(torch.relu(self.fc1(h)))

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem, self.layers, self.head = nn.Linear(32, 64), nn.ModuleList([Block(), Block()]), nn.Linear(64, 16)

        def forward(self, x):
            h = self.stem(x)
            for block in self.layers:
                h = block(h)
            return self.head(h)

    torch.manual_seed(31)
    by_layer = Net().eval()
    by_block = copy.deepcopy(by_layer)
    batches = [torch.randn(16, 32) for _ in range(3)]
    P.prune_one_shot(by_layer, method="sparsegpt", calibration=batches)
    P.prune_one_shot(by_block, method="sparsegpt", calibration=batches, blocks=by_block.layers)
    for (name, mask), (_, other) in zip(P.masked_layers(by_layer).items(), P.masked_layers(by_block).items()):
        assert torch.equal(mask, other), name
    for (name, a), (_, b) in zip(by_layer.named_parameters(), by_block.named_parameters()):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6), name


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_calibration_that_reaches_a_layer_as_zeros_is_refused(method):
    # sparsegpt zeroed the whole weight (every input dead) and reported half of it kept; wanda kept
    # positions 0 and 1 of every group whatever |w|.
    model = nn.Sequential(nn.Linear(64, 64))
    with pytest.raises(ValueError, match=r"layer '0' got only zero inputs from the calibration batches"):
        P.prune_one_shot(model, method=method, calibration=torch.zeros(8, 64))
    assert not P.masked_layers(model)  # left as it was, no mask attached


def test_magnitude_completes_a_partial_mask_from_what_it_keeps():
    # A loaded mask keeping three of a group: the top two of all four (5.0 among them, already
    # dropped) left one weight.
    model = nn.Sequential(nn.Linear(4, 1, bias=False))
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[0.1, 0.2, 0.3, 5.0]]))
    P.GradualPruner(model, end_step=10)
    P.masked_layers(model)["0"].copy_(torch.tensor([[True, True, True, False]]))
    P.prune_one_shot(model)
    assert P.masked_layers(model)["0"].tolist() == [[False, True, True, False]]


def test_permute_channels_leaves_shared_and_hook_computed_layers():
    x = torch.randn(8, 64)
    relu = nn.ReLU()
    a, b = nn.Linear(64, 64), nn.Linear(64, 64)
    reused = nn.Sequential(a, relu, b, relu, a)  # a runs twice: its rows feed b and the output
    tied = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64))
    tied[4].weight = tied[0].weight
    hooked = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 32)).eval()
    nn.utils.spectral_norm(hooked[2])
    hooked(x)
    for model, reason in ((reused, "Linear is used in more than one place"),
                          (tied, "shares a tensor with another module (tied weights)"),
                          (hooked, "consumer: its weight is no parameter and forward pre-hooks (SpectralNorm)")):
        want = model(x)
        report = P.permute_channels(model)
        assert report.pairs and all(reason in pair.skipped for pair in report.pairs), str(report)
        assert torch.allclose(model(x), want, atol=1e-6)  # changed the function by up to 15.6


def test_sparsegpt_ranks_by_weight_squared_over_the_inverse_hessians_diagonal():
    # Diagonal H: U_cc^2 = 1 / H_cc, so a weight scores w^2 * H_cc. Column 0 (w = 1, H = 100) then
    # outranks column 1 (w = 5, H = 1); by w^2 / U_cc (w^2 * sqrt(H_cc)) or by |w| it would not.
    weight = torch.tensor([[1.0, 5.0, 6.0, 0.0]], dtype=torch.float64)
    hessian = torch.diag(torch.tensor([100.0, 1.0, 1.0, 100.0], dtype=torch.float64))
    pruned, mask = P.sparsegpt_2to4(weight, hessian)
    assert mask.tolist() == [[True, False, True, False]]
    assert pruned.tolist() == [[1.0, 0.0, 6.0, 0.0]]  # diagonal H: no correction of the others
