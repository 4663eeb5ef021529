"""Mixtures of experts stored as 3-D parameters (transformers 5's layout): SparseExperts,
sparsify's pass over them, and their checkpoints. The dense module here is a copy of that layout
(transformers is not a test dependency); the README's check against MixtralForCausalLM was by hand.
"""
import warnings

import pytest
import torch
from torch import nn

import sparsegemm
from sparsegemm import oracle
from sparsegemm.nn import SparseExperts, SparseLinear, experts_activation


class Experts(nn.Module):
    """transformers 5's MixtralExperts: gate_up_proj [E, 2I, H] (gate rows first), down_proj [E, H, I]."""

    def __init__(self, experts=4, hidden=64, inner=32, act=None):
        super().__init__()
        self.gate_up_proj = nn.Parameter(torch.randn(experts, 2 * inner, hidden) / hidden ** 0.5)
        self.down_proj = nn.Parameter(torch.randn(experts, hidden, inner) / inner ** 0.5)
        self.act_fn = act or nn.SiLU()

    def forward(self, hidden_states, top_k_index, top_k_weights):
        out = torch.zeros_like(hidden_states)
        for expert in range(self.gate_up_proj.shape[0]):
            token, slot = torch.where(top_k_index == expert)
            gate, up = nn.functional.linear(hidden_states[token], self.gate_up_proj[expert]).chunk(2, dim=-1)
            y = nn.functional.linear(self.act_fn(gate) * up, self.down_proj[expert])
            out.index_add_(0, token, y * top_k_weights[token, slot, None])
        return out


class Unweighted(Experts):
    """Ignores the routing weights: not the formula SparseExperts computes."""

    def forward(self, hidden_states, top_k_index, top_k_weights):
        return super().forward(hidden_states, top_k_index, torch.ones_like(top_k_weights))


class Scaled(Experts):
    """5% more than the formula: what a probe in bf16 must still tell apart."""

    def forward(self, hidden_states, top_k_index, top_k_weights):
        return 1.05 * super().forward(hidden_states, top_k_index, top_k_weights)


class ClampedExperts(Experts):
    """DeepSeek-V4's experts: act(gate) * up through an _apply_gate that clamps both at a limit."""

    def forward(self, hidden_states, top_k_index, top_k_weights):
        out = torch.zeros_like(hidden_states)
        for expert in range(self.gate_up_proj.shape[0]):
            token, slot = torch.where(top_k_index == expert)
            y = nn.functional.linear(self._apply_gate(nn.functional.linear(hidden_states[token],
                                                                           self.gate_up_proj[expert])),
                                     self.down_proj[expert])
            out.index_add_(0, token, y * top_k_weights[token, slot, None])
        return out

    def _apply_gate(self, gate_up):
        gate, up = gate_up.chunk(2, dim=-1)
        return self.act_fn(gate.clamp(max=10.0)) * up.clamp(-10.0, 10.0)


class MoEBlock(nn.Module):
    def __init__(self, experts=4, hidden=64):
        super().__init__()
        self.router = nn.Linear(hidden, experts, bias=False)
        self.experts = Experts(experts, hidden)

    def forward(self, x):
        weights, index = self.router(x).softmax(-1).topk(2, dim=-1)
        return self.experts(x, index, weights.to(x.dtype))


def routing(tokens=9, experts=4, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, 64, generator=gen)
    index = torch.randint(0, experts, (tokens, 2), generator=gen)
    index[0] = torch.tensor([1, 1])  # one token routed to the same expert twice
    index[1] = torch.tensor([experts, -1])  # padding (transformers' one_hot sentinel E, or -1): no expert
    return x, index, torch.rand(tokens, 2, generator=gen)


def pruned_dense(sparse: SparseExperts, like: Experts) -> Experts:
    """``like`` with the weights ``sparse`` holds (pruned; the gate / up rows split back apart)."""
    dense = Experts(len(sparse.gate_up), like.gate_up_proj.shape[2], like.down_proj.shape[2], like.act_fn)
    with torch.no_grad():
        for e, (gate_up, down) in enumerate(zip(sparse.gate_up, sparse.down)):
            dense.gate_up_proj[e] = torch.cat(sparsegemm.format.split_gate_up(gate_up.dense_weight().float()))
            dense.down_proj[e] = down.dense_weight().float()
    return dense


@pytest.mark.parametrize("backend", ["cpu", "simt"])
def test_sparse_experts_match_the_dense_mixture_on_the_pruned_weights(backend):
    torch.manual_seed(1)
    dense = Experts()
    assert experts_activation(dense) == ("swiglu", "")
    sparse = SparseExperts.from_dense(dense, dtype=torch.float16 if backend == "simt" else None, backend=backend)
    x, index, weights = routing()
    reference = pruned_dense(sparse, dense)
    with torch.no_grad():
        want = reference(x, index, weights)
        got = sparse(x.to(sparse.gate_up[0].values.dtype), index, weights.to(sparse.gate_up[0].values.dtype))
    tolerance = 2e-2 if backend == "simt" else 1e-5
    assert torch.allclose(got.float(), want, rtol=tolerance, atol=tolerance)
    # Each expert's layers: its gate / up one gated 2:4 GEMM, its down another (oracle tolerance).
    gate_up = sparse.gate_up[2]
    rows = x[:5].to(gate_up.values.dtype)
    with torch.no_grad():
        oracle.assert_close_to_oracle(gate_up(rows), rows, gate_up.dense_weight(), None, "swiglu")


def test_hand_built_experts_without_a_gated_gate_up_never_take_the_grouped_launch():
    # Only gate/up N // 2 == down K was checked: a relu gate/up of N = 2 I wrote its 2 I columns
    # into the grouped path's [T, I] hidden buffer (past its end on the last row). Now the
    # per-expert path runs it, which refuses the shapes as any chain of layers would.
    torch.manual_seed(2)
    gate_up = [SparseLinear.from_dense(nn.Linear(64, 32, bias=False), dtype=torch.float16, activation="relu",
                                       backend="simt") for _ in range(2)]
    down = [SparseLinear.from_dense(nn.Linear(16, 64, bias=False), dtype=torch.float16, backend="simt")
            for _ in range(2)]
    experts = SparseExperts(gate_up, down)
    x, index, weights = routing(tokens=3, experts=2)
    assert experts._grouped_operands(x.half()) is None
    with pytest.raises(ValueError, match="K = 16 features"):
        experts(x.half(), index, weights.half())


def test_routes_past_32_bit_indexing_take_the_per_expert_layers(monkeypatch):
    # The grouped launch indexes all tokens * k routed rows with 32-bit integers, and its eager path
    # had no check of them: a prefill of 65536 tokens, top-2, hidden 16384 overflowed. Those calls now
    # take the per-expert layers, each of which indexes only its own rows. The limit is lowered here
    # to reach the case with small tensors.
    torch.manual_seed(3)
    sparse = SparseExperts.from_dense(Experts(), dtype=torch.float16, backend="simt")
    x, index, weights = routing(tokens=48)  # 96 routed rows, about 24 an expert
    x, weights = x.half(), weights.half()
    with torch.no_grad():
        grouped = sparse(x, index, weights)
        limit = index.numel() * 64 - 1  # the routed rows times the widest K or N (hidden = 64; N * K = 4096)
        monkeypatch.setattr(sparsegemm.ops, "_INT32_MAX", limit)
        launches = []
        monkeypatch.setattr(sparsegemm.ops, "launch_grouped", lambda *args, **kw: launches.append(args))
        per_expert = sparse(x, index, weights)
    assert launches == []
    torch.testing.assert_close(per_expert, grouped, rtol=2e-3, atol=2e-3)


def test_int8_experts_stay_close_to_the_fp32_2to4_mixture():
    torch.manual_seed(2)
    dense = Experts()
    fp32 = SparseExperts.from_dense(dense)
    int8 = SparseExperts.from_dense(dense, quantize="int8")
    x, index, weights = routing(seed=3)
    with torch.no_grad():
        want, got = fp32(x, index, weights), int8(x, index, weights)
    assert (got - want).norm() / want.norm() < 0.03


@pytest.mark.parametrize("backend,dtype", [("cpu", torch.float32), ("simt", torch.float16)])
def test_int8_experts_pass_their_input_the_straight_through_gradient(backend, dtype):
    # A frozen INT8 mixture behind trainable layers: x's gradient is the dense mixture's on the
    # dequantized weights, up to where the INT8 pre-activations put the activation's derivative.
    torch.manual_seed(4)
    dense = Experts()
    int8 = SparseExperts.from_dense(dense, dtype=dtype, backend=backend, quantize="int8")
    reference = Experts()
    with torch.no_grad():
        for e, (gate_up, down) in enumerate(zip(int8.gate_up, int8.down)):
            reference.gate_up_proj[e] = torch.cat(sparsegemm.format.split_gate_up(gate_up.dense_weight().float()))
            reference.down_proj[e] = down.dense_weight().float()
    x, index, weights = routing(seed=5)
    grads = []
    for module, x_in in ((int8, x.to(dtype)), (reference, x)):
        leaf = x_in.clone().requires_grad_(True)
        module(leaf, index, weights.to(x_in.dtype)).float().square().sum().backward()
        grads.append(leaf.grad.float())
    got, want = grads
    assert (got - want).norm() / want.norm() < 0.03


def test_the_probe_accepts_a_16_bit_mixture_of_llm_scale():
    # Small LLM-like weights at H = 4096 in bf16: the probe's reference is batched per expert as the
    # module's GEMMs are (one token at a time, it rounded differently by over 0.1% of the largest
    # output); a 5% different formula is still refused.
    torch.manual_seed(0)
    experts = Experts(experts=2, hidden=4096, inner=1024)
    with torch.no_grad():
        experts.gate_up_proj.normal_(std=0.02)
        experts.down_proj.normal_(std=0.02)
    assert experts_activation(experts.bfloat16()) == ("swiglu", "")
    scaled = Scaled(experts=2, hidden=4096, inner=1024)
    scaled.load_state_dict(experts.state_dict())
    assert "off by" in experts_activation(scaled.bfloat16())[1]


def test_experts_activation_says_why_a_module_is_no_mixture():
    assert experts_activation(nn.Linear(4, 4))[1].startswith("no 3-D experts layout")
    assert "computes none of SiLU" in experts_activation(Experts(act=nn.Tanh()))[1]
    assert "not the sum of weight" in experts_activation(Unweighted())[1]
    assert "not a multiple of 8" in experts_activation(Experts(inner=20))[1]
    # Its random probe stays within the clamp; the gate method is checked far past it.
    assert "its _apply_gate is not act(gate) * up" in experts_activation(ClampedExperts())[1]
    with pytest.raises(ValueError, match="SparseExperts.from_dense: Unweighted is not a mixture"):
        SparseExperts.from_dense(Unweighted())


def test_sparsify_converts_mixtures_reports_them_and_round_trips(tmp_path):
    torch.manual_seed(4)
    model = nn.Sequential(MoEBlock(), nn.GELU(), MoEBlock())
    model[2].experts = Unweighted()  # left dense, with the reason
    x = torch.randn(6, 64)
    report = sparsegemm.sparsify(model, min_features=16)
    rows = {layer.name: layer for layer in report.layers}
    assert rows["0.experts.gate_up_proj"].converted and rows["0.experts.down_proj"].converted
    assert rows["0.experts.gate_up_proj"].shape == (4 * 64, 64) and rows["0.experts.down_proj"].shape == (4 * 64, 32)
    assert rows["0.experts.gate_up_proj"].compressed_bytes == sum(
        layer.sparse_weight().nbytes for layer in model[0].experts.gate_up)
    assert "not the sum of weight" in rows["2.experts.gate_up_proj"].reason
    assert isinstance(model[0].experts, SparseExperts) and isinstance(model[2].experts, Unweighted)
    assert "min_features" in rows["0.router"].reason  # 4 experts: too small to convert
    with torch.no_grad():
        want = model(x)
    path = tmp_path / "moe.safetensors"
    sparsegemm.save(model, path)

    def build():
        fresh = nn.Sequential(MoEBlock(), nn.GELU(), MoEBlock())
        fresh[2].experts = Unweighted()
        return fresh

    with sparsegemm.init_empty_weights():
        shell = build()
    for target, kwargs in ((build(), {}), (shell, {"device": "cpu"})):
        loaded = sparsegemm.load(path, target, **kwargs)
        assert isinstance(loaded[0].experts, SparseExperts)
        with torch.no_grad():
            assert torch.equal(loaded(x), want)
    # Loaded again into the model it filled (swapping weights), its SparseExperts lend their layers.
    with torch.no_grad():
        loaded[0].experts.gate_up[1].values.zero_()
        assert torch.equal(sparsegemm.load(path, loaded)(x), want)
    other = nn.Sequential(MoEBlock(experts=8), nn.GELU(), MoEBlock())
    with pytest.raises(ValueError, match=r"module '0.experts' was a mixture of 4 experts .* the model's is 8 experts"):
        sparsegemm.load(path, other)


def test_sparsify_warns_when_it_prunes_layers_beside_ones_pruned_before():
    # prune_one_shot, remove_masks, sparsify: the pruning tools leave 3-D experts out, so sparsify
    # pruned them by magnitude, silently, past the model the user had validated (8.9% off on a
    # small Mixtral).
    torch.manual_seed(9)

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = nn.Linear(64, 64)
            self.moe = MoEBlock()

        def forward(self, x):
            return self.moe(self.attn(x))

    model = Block()
    sparsegemm.prune.prune_one_shot(model, filter_fn=lambda name, mod: name == "attn")
    sparsegemm.prune.remove_masks(model)
    with pytest.warns(UserWarning, match=r"sparsify: 1 converted layers were 2:4 already, 2 were not and were pruned "
                                         r"here by magnitude \(moe.experts.gate_up_proj, moe.experts.down_proj\)"):
        sparsegemm.sparsify(model, min_features=16)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sparsegemm.sparsify(Block(), min_features=16)  # nothing pruned before: nothing to warn of
        zero_gate = Block()  # a zero-initialized layer (DiT's adaLN-zero) is 2:4 by its zeros alone
        nn.init.zeros_(zero_gate.attn.weight)
        sparsegemm.sparsify(zero_gate, min_features=16)


def test_sparsify_reports_expert_weights_of_layouts_it_does_not_convert():
    # DBRX's experts (2-D [E * I, H] w1 / v1 / w2 in a DbrxExpertGLU) and JetMoE's (3-D "weight"s)
    # were most of those models' bytes, left dense with no row in the report.
    class DbrxExpertGLU(nn.Module):
        def __init__(self):
            super().__init__()
            self.w1 = nn.Parameter(torch.randn(4 * 32, 64))
            self.v1 = nn.Parameter(torch.randn(4 * 32, 64))

    class ParallelExperts(nn.Module):
        def __init__(self, weight=None):
            super().__init__()
            self.weight = weight if weight is not None else nn.Parameter(torch.randn(4, 32, 64))
            self.gate_up_proj_bias = nn.Parameter(torch.zeros(4, 32))  # GPT-OSS's experts' biases: no weight

    experts = ParallelExperts()
    conv = nn.Conv1d(64, 64, 3)
    nn.utils.parametrizations.weight_norm(conv)  # reported as parametrized, once
    model = nn.Sequential(nn.Linear(64, 64), DbrxExpertGLU(), experts, nn.Conv1d(64, 64, 3), nn.Embedding(10, 64),
                          ParallelExperts(experts.weight), conv, nn.ConvTranspose1d(64, 64, 3))
    report = sparsegemm.sparsify(model, min_features=16)
    rows = {row.name: row for row in report.layers}
    # The embedding and the transposed convolution are no GEMM weights; the tied one is reported once.
    assert set(rows) == {"0", "1.w1", "1.v1", "2.weight", "3", "6"} and len(report.layers) == 6
    assert rows["1.w1"].reason == "a 2-D weight (128, 64) of a layout sparsify does not convert"
    assert rows["2.weight"].reason == "a 3-D weight (4, 32, 64) of a layout sparsify does not convert"
    assert rows["2.weight"].shape == (128, 64) and rows["2.weight"].dense_bytes == 4 * 32 * 64 * 4
    assert rows["0"].converted and rows["3"].converted and not rows["1.w1"].converted


def test_a_mixture_shared_between_blocks_is_left_dense():
    first, second = MoEBlock(), MoEBlock()
    second.experts = first.experts
    model = nn.Sequential(first, nn.GELU(), second)
    report = sparsegemm.sparsify(model, min_features=16)
    rows = {layer.name: layer for layer in report.layers}
    assert "weights shared with 2.experts.gate_up_proj" in rows["0.experts.gate_up_proj"].reason
    assert model[0].experts is model[2].experts and isinstance(model[0].experts, Experts)


def test_pickles_and_deep_copies_leave_derived_caches_behind():
    # A pickled simt mixture carried its grouped tables (pointers into its layers' tensors) and each
    # layer's reordered metadata (1.6x the bytes here). They are made again after loading.
    import copy
    import io

    torch.manual_seed(6)
    sparse = SparseExperts.from_dense(Experts(), dtype=torch.float16, backend="simt")
    x, index, weights = routing()
    x, weights = x.half(), weights.half()

    def pickled_bytes(module):
        buffer = io.BytesIO()
        torch.save(module, buffer)
        return buffer.getbuffer().nbytes

    fresh_bytes = pickled_bytes(sparse)
    with torch.no_grad():
        want = sparse(x, index, weights)
    assert "_grouped" in sparse.__dict__ and sparse.gate_up[0]._kernel_meta  # the caches exist now
    assert pickled_bytes(sparse) == fresh_bytes
    twin = copy.deepcopy(sparse)
    assert "_grouped" not in twin.__dict__ and not twin.gate_up[0]._kernel_meta
    with torch.no_grad():
        assert torch.equal(twin(x, index, weights), want)
