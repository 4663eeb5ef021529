"""SparseLinear / SparseConv2d / sparsify / save-load on the CPU."""
import collections
import copy
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import sparsegemm
from sparsegemm import _C, ops, oracle, quant
from sparsegemm.nn import SparseConv2d, SparseLinear
from sparsegemm.tensor import SparseTensor24
from conftest import run_cli


class Block(nn.Module):
    """A small pre-norm transformer block (attention + MLP)."""

    def __init__(self, d=128, heads=4):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.attn = nn.MultiheadAttention(d, heads, batch_first=True)
        self.up, self.down = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)
        self.qkv_like = nn.Linear(d, d, bias=False)

    def forward(self, x):
        h = self.norm1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0] + self.qkv_like(h)
        return x + self.down(torch.nn.functional.gelu(self.up(self.norm2(x))))


class SmallCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 16, 3, padding=1)
        self.c2 = nn.Conv2d(16, 64, 3, stride=2, padding=1)
        self.dw = nn.Conv2d(64, 64, 3, padding=1, groups=64)
        self.c3 = nn.Conv2d(64, 96, (1, 3), padding=(0, 2), dilation=(1, 2), bias=False)
        self.fc = nn.Linear(96, 10)

    def forward(self, x):
        x = torch.relu(self.c1(x))
        x = torch.relu(self.c2(x))
        x = torch.relu(self.dw(x))
        x = self.c3(x)
        return self.fc(x.mean((2, 3)))


def _pruned_copy(model):
    """The dense oracle model: every converted layer's weight pruned in place."""
    ref = type(model)()
    ref.load_state_dict(model.state_dict())
    return ref


def test_sparse_linear_holds_only_compressed_weight(dtype):
    lin = nn.Linear(256, 96).to(dtype)
    sl = SparseLinear.from_dense(lin)
    held = sum(t.nbytes for t in list(sl.parameters()) + list(sl.buffers()))
    assert held == 96 * 128 * dtype.itemsize + 96 * 32 + 96 * dtype.itemsize  # values + meta + bias
    assert held < lin.weight.nbytes * 0.6
    assert "in_features=256, out_features=96" in repr(sl) and "saved vs dense" in repr(sl)


class FreshTensors(TorchDispatchMode):
    """(device type, dtype, bytes) of every tensor an aten op returns alone in new memory (not a
    view or an alias, such as detach's, of an argument)."""

    def __init__(self):
        super().__init__()
        self.fresh = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if isinstance(out, torch.Tensor) and out.device.type != "meta":
            given = {a.untyped_storage().data_ptr() for a in torch.utils._pytree.tree_leaves((args, kwargs))
                     if isinstance(a, torch.Tensor) and a.device.type != "meta"}
            if out.untyped_storage().data_ptr() not in given:
                self.fresh.append((out.device.type, out.dtype, out.untyped_storage().nbytes()))
        return out


@pytest.mark.parametrize("quantize", [None, "int8"])
def test_from_dense_takes_over_the_compressed_weight_without_a_copy(quantize, monkeypatch):
    # Converting once held three compressed weights at its peak: the zero-filled one the layer was
    # built with, compress's, and a copy of it. Now the layer is built on the meta device and takes
    # compress's values and metadata as they are: the only tensors as large as the metadata made on
    # the CPU are those two (and for INT8 its int8 values and, a run of 8 rows at a time here,
    # quant._QUANTIZE_RUN_ELEMENTS, the fp32 kept values it quantizes).
    monkeypatch.setattr(quant, "_QUANTIZE_RUN_ELEMENTS", 8 * 512)
    lin = nn.Linear(1024, 64, dtype=torch.bfloat16)
    log = FreshTensors()
    with log:
        layer = SparseLinear.from_dense(lin, quantize=quantize)
    made = collections.Counter((dtype, size) for _, dtype, size in log.fresh if size >= layer.metadata.nbytes)
    compressed = {(torch.bfloat16, 64 * 512 * 2): 1, (torch.uint8, layer.metadata.nbytes): 1}
    if quantize is None:
        assert made == collections.Counter(compressed)
    else:
        others = made - collections.Counter(compressed)
        assert made & collections.Counter(compressed) == collections.Counter(compressed)
        assert (torch.int8, layer.values.nbytes) in others
        assert all(dtype in (torch.int8, torch.float32, torch.bool) for dtype, _ in others), others
        assert max(size for dtype, size in others if dtype != torch.int8) <= 8 * 512 * 4  # the layer's: 128 KiB
    x = torch.randn(3, 1024, dtype=torch.bfloat16)
    reference = SparseLinear(1024, 64, dtype=torch.bfloat16, quantize=quantize)
    reference.load_state_dict(layer.state_dict())
    assert torch.equal(layer(x), reference(x)) and layer.values.device.type == "cpu"


@pytest.mark.parametrize("shape", [(2, 3, 64), (5, 64)])
def test_sparse_linear_matches_pruned_dense(dtype, shape):
    torch.manual_seed(0)
    lin = nn.Linear(64, 40).to(dtype)
    sl = SparseLinear.from_dense(lin)
    x = torch.randn(*shape).to(dtype)
    w = sl.dense_weight()
    assert torch.equal(w, sparsegemm.prune_2to4(lin.weight.detach()))
    oracle.assert_close_to_oracle(sl(x).reshape(-1, 40), x.reshape(-1, 64), w, lin.bias.detach())


def test_state_dict_round_trip_and_dtype_moves():
    sl = SparseLinear.from_dense(nn.Linear(32, 16))
    other = SparseLinear(32, 16, dtype=torch.float32)
    other.load_state_dict(sl.state_dict())
    x = torch.randn(3, 32)
    assert torch.equal(other(x), sl(x))
    half = other.half()
    assert half.values.dtype == torch.float16 and half.metadata.dtype == torch.uint8
    assert half.bfloat16().values.dtype == torch.bfloat16


@pytest.mark.parametrize("quantize", [None, "int8"])
def test_a_dtype_no_kernel_takes_is_refused_by_the_conversion_and_the_layer_is_left_as_it_was(quantize):
    # .double() was taken, and left a layer that neither printed nor ran.
    sl = SparseLinear.from_dense(nn.Linear(32, 16), quantize=quantize)
    before = {name: t.clone() for name, t in sl.state_dict().items()}
    x = torch.randn(3, 32)
    y = sl(x)
    for convert, dtype in ((lambda m: m.double(), "float64"), (lambda m: m.to(torch.float64), "float64"),
                           (lambda m: m.to(torch.complex64), "complex64")):
        with pytest.raises(TypeError, match=rf"SparseLinear: cannot convert to torch.{dtype}: .*dense_weight\(\)"):
            convert(sl)
        state = sl.state_dict()
        assert all(torch.equal(state[name], t) and state[name].dtype == t.dtype for name, t in before.items())
        assert torch.equal(sl(x), y) and "SparseLinear" in repr(sl)


def test_transformer_block_sparsify_matches_dense_pruned():
    torch.manual_seed(1)
    block = Block()
    x = torch.randn(2, 9, 128)
    ref = Block()
    ref.load_state_dict(block.state_dict())
    report = sparsegemm.sparsify(block)
    names = {layer.name for layer in report.converted}
    assert names == {"up", "down", "qkv_like"} | {f"attn.{p}_proj" for p in ("q", "k", "v", "out")}
    assert "total: 7 converted" in str(report)
    for name in ("up", "down", "qkv_like"):
        getattr(ref, name).weight.data = getattr(block, name).dense_weight()
    attn = block.attn
    with torch.no_grad():
        ref.attn.in_proj_weight.copy_(torch.cat([layer.dense_weight() for layer in (attn.q_proj, attn.k_proj,
                                                                                   attn.v_proj)]))
        ref.attn.out_proj.weight.copy_(attn.out_proj.dense_weight())
    torch.testing.assert_close(block(x), ref(x), rtol=1e-5, atol=1e-5)


def test_cnn_sparsify_matches_dense_pruned_and_skips_depthwise():
    torch.manual_seed(2)
    cnn = SmallCNN()
    x = torch.randn(2, 3, 12, 12)
    report = sparsegemm.sparsify(cnn, min_features=8)
    skipped = {layer.name: layer.reason for layer in report.skipped}
    assert "depthwise convolution" in skipped["dw"]
    assert isinstance(cnn.c2, SparseConv2d) and isinstance(cnn.c3, SparseConv2d)
    for name in ("c2", "c3"):
        conv = getattr(cnn, name)
        w = conv.dense_weight()
        assert w.shape == (conv.out_channels, conv.in_channels, *conv.kernel_size)
        xin = torch.randn(2, conv.in_channels, 7, 9)
        ref = torch.nn.functional.conv2d(xin, w, conv.bias, conv.stride, conv.padding, conv.dilation)
        torch.testing.assert_close(conv(xin), ref, rtol=1e-5, atol=1e-5)
    assert cnn(x).shape == (2, 10)


def test_save_load_round_trip_and_size(tmp_path):
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(256, 512), nn.ReLU(), nn.Linear(512, 256)).half()
    dense_path = tmp_path / "dense.safetensors"
    from safetensors.torch import save_file
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(dense_path))
    sparsegemm.sparsify(model)
    path = tmp_path / "sparse.safetensors"
    sparsegemm.save(model, path)
    ratio = os.path.getsize(path) / os.path.getsize(dense_path)
    assert ratio <= 0.57
    fresh = nn.Sequential(nn.Linear(256, 512), nn.ReLU(), nn.Linear(512, 256)).half()
    sparsegemm.load(path, fresh)
    x = torch.randn(4, 256).half()
    assert torch.equal(fresh(x), model(x))
    out = run_cli("report", str(path), cwd=tmp_path).stdout
    assert "SparseLinear" in out and "512 x 256" in out and "56.2%" in out
    try:
        import zstandard  # noqa: F401  (a test extra; the report says how to get it when missing)
        assert "zstd -3:" in out
    except ImportError:
        assert "install zstandard" in out
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(path.read_bytes()[:100])
    no_table = tmp_path / "no_table.safetensors"
    _resave(path, no_table, header={"converted": '{"0": {"kind": "SparseLinear"}}'})  # no dtype, no features
    not_json = tmp_path / "not_json.safetensors"
    _resave(path, not_json, header={"converted": "{"})
    for bad, message in ((truncated, "is not a readable safetensors file"),
                         (no_table, "has a corrupt module table: module '0' needs in_features, out_features as "
                                    "counts, got {}"),
                         (not_json, "has a corrupt module table")):
        with pytest.raises(subprocess.CalledProcessError) as failed:
            run_cli("report", str(bad), cwd=tmp_path)
        assert failed.value.returncode == 2 and "Traceback" not in failed.value.stderr
        assert message in failed.value.stderr


def test_files_and_state_dicts_from_before_the_metadata_rename_load(tmp_path):
    # The layers' metadata buffer was called "meta" until torch.export's unlifting clashed with it:
    # state dicts and checkpoints with that name still load, bit for bit, and report their sizes.
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    torch.manual_seed(31)
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 32))
    sparsegemm.sparsify(model, quantize="int8")
    legacy_state = {k.replace(".metadata", ".meta"): v for k, v in model.state_dict().items()}
    assert "0.meta" in legacy_state and "0.metadata" not in legacy_state
    twin = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 32))
    sparsegemm.sparsify(twin, quantize="int8")
    twin.load_state_dict(legacy_state, strict=True)
    x = torch.randn(3, 64)
    assert torch.equal(twin(x), model(x))

    path = tmp_path / "new.safetensors"
    sparsegemm.save(model, path)
    with safe_open(str(path), framework="pt") as f:
        header = f.metadata()
    legacy = tmp_path / "legacy.safetensors"
    save_file({k.replace(".metadata", ".meta"): v for k, v in load_file(str(path)).items()}, str(legacy),
              metadata=header)
    fresh = sparsegemm.load(legacy, nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 32)))
    assert torch.equal(fresh(x), model(x))
    assert sparsegemm.io.describe(legacy).splitlines()[1:3] == sparsegemm.io.describe(path).splitlines()[1:3]


def test_load_rejects_corrupt_and_truncated_files(tmp_path):
    model = nn.Sequential(nn.Linear(64, 64))
    sparsegemm.sparsify(model, min_features=8)
    path = tmp_path / "m.safetensors"
    sparsegemm.save(model, path)
    blob = bytearray(path.read_bytes())

    truncated = tmp_path / "t.safetensors"
    truncated.write_bytes(blob[: len(blob) // 2])
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        sparsegemm.load(truncated, nn.Sequential(nn.Linear(64, 64)))

    from safetensors.torch import load_file, save_file
    from safetensors import safe_open
    tensors = load_file(str(path))
    with safe_open(str(path), framework="pt") as f:
        header = f.metadata()
    tensors["0.metadata"][3, 2] = 0x55  # equal indices in both groups
    bad = tmp_path / "bad.safetensors"
    save_file(tensors, str(bad), metadata=header)
    with pytest.raises(ValueError, match=r"module '0'.*corrupt metadata at row 3, group 4"):
        sparsegemm.load(bad, nn.Sequential(nn.Linear(64, 64)))

    with pytest.raises(ValueError, match=r"was a Linear 64 -> 64 \(bias=True\) when saved"):
        sparsegemm.load(path, nn.Sequential(nn.Linear(64, 32)))


def test_fine_tune_through_sparse_linear_keeps_mask():
    torch.manual_seed(4)
    sl = SparseLinear.from_dense(nn.Linear(32, 8), dtype=torch.float32)
    mask = sparsegemm.mask_2to4(sl.dense_weight()) | (sl.dense_weight() != 0)
    opt = torch.optim.SGD(sl.parameters(), lr=0.1)
    x, target = torch.randn(64, 32), torch.randn(64, 8)
    losses = []
    for _ in range(30):
        loss = torch.nn.functional.mse_loss(sl(x), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert not (sl.dense_weight() != 0)[~mask].any()


def test_sparse_model_compiles_without_graph_breaks():
    torch._dynamo.reset()
    model = nn.Sequential(nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 64)).bfloat16()
    sparsegemm.sparsify(model, min_features=8)
    compiled = torch.compile(model, fullgraph=True)  # fullgraph: any graph break is an error
    x = torch.randn(5, 64).bfloat16()
    assert torch.equal(compiled(x), model(x))


@pytest.mark.parametrize("layer_kind", ["bf16", "fp32", "int8", "int8 no bias", "conv"])
def test_autocast_computes_in_the_layers_own_dtype(layer_kind):
    # nn.Linear under torch.autocast takes a float32 x; the sparse layer casts x to the dtype it
    # computes in and gives exactly what it gives outside autocast (autocast off inside: the fp32
    # CPU path's large-M tiles would otherwise run torch's GEMM in bf16).
    torch.manual_seed(21)
    if layer_kind == "conv":
        layer = SparseConv2d.from_dense(nn.Conv2d(8, 16, 3, padding=1).bfloat16())
        x = torch.randn(2, 8, 5, 5)
    elif layer_kind == "fp32":
        layer = SparseLinear.from_dense(nn.Linear(512, 1024), activation="gelu")  # several dense tiles
        x = torch.randn(600, 512)
    else:
        dense = nn.Linear(64, 32, bias=layer_kind != "int8 no bias").bfloat16()
        layer = SparseLinear.from_dense(dense, quantize="int8" if "int8" in layer_kind else None)
        x = torch.randn(3, 5, 64)
    compute_dtype = torch.float32 if layer_kind == "fp32" else torch.bfloat16
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == compute_dtype
    assert torch.equal(y, layer(x.to(compute_dtype)))


def test_autocast_int8_layer_without_bias_on_the_eager_kernel_path():
    # The eager kernel path (SIMT here, CUDA on a GPU) computed in x's dtype where forward computes
    # a bias-less INT8 layer in autocast's: fp16 out of one, bf16 out of the other.
    torch.manual_seed(22)
    layer = SparseLinear.from_dense(nn.Linear(64, 32, bias=False), quantize="int8", backend="simt")
    x = torch.randn(3, 64).half()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        first, again = layer(x), layer(x)  # the second call on the eager plan the first one made
    assert first.dtype == again.dtype == torch.bfloat16 and torch.equal(first, again)
    with torch.no_grad():
        assert torch.equal(first, layer(x.bfloat16()))


def test_autocast_training_step_reaches_float32_inputs():
    torch.manual_seed(22)
    model = nn.Sequential(nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 16))
    sparsegemm.sparsify(model, dtype=torch.bfloat16, min_features=8)
    x = torch.randn(4, 64, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(x).float().square().mean()
    loss.backward()
    assert x.grad is not None and x.grad.dtype == torch.float32 and x.grad.abs().sum() > 0
    assert all(layer.values.grad is not None for layer in (model[0], model[2]))


class _TiedLM(nn.Module):
    """An LM head tied to the embedding, as in GPT-2 and small Llama / Qwen / Gemma models."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(512, 64)
        self.body = nn.Linear(64, 64)
        self.head = nn.Linear(64, 512, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, tokens):
        return self.head(torch.relu(self.body(self.embed(tokens))))


def test_sparsify_skips_shared_weights():
    # The tied LM head, and a module registered under two names: converting either would keep the
    # dense tensor for its other holder and add a compressed copy.
    class TiedLM(_TiedLM):
        def __init__(self):
            super().__init__()
            self.alias = self.body
            self.other = nn.Linear(64, 64)

    model = TiedLM()
    report = sparsegemm.sparsify(model, min_features=8)
    reasons = {layer.name: layer.reason for layer in report.skipped}
    assert set(reasons) == {"body", "head"}
    assert "shared with embed.weight" in reasons["head"] and "shared with alias.weight" in reasons["body"]
    assert [layer.name for layer in report.converted] == ["other"]
    assert type(model.head) is nn.Linear and model.head.weight is model.embed.weight


def test_checkpoint_stores_a_tied_tensor_once(tmp_path):
    import json

    torch.manual_seed(23)
    model = _TiedLM()
    sparsegemm.sparsify(model, min_features=8)
    path = tmp_path / "tied.safetensors"
    sparsegemm.save(model, path)
    assert json.loads(_header(path)["aliases"]) == {"head.weight": "embed.weight"}
    assert path.stat().st_size < 512 * 64 * 4 * 1.2  # the 128 KiB table once, not twice
    loaded = sparsegemm.load(path, _TiedLM())
    assert loaded.head.weight is loaded.embed.weight
    tokens = torch.randint(0, 512, (2, 7))
    assert torch.equal(loaded(tokens), model(tokens))
    # Not an object, an unknown target, a key stored itself, not JSON.
    for aliases in ("[1]", '{"head.weight": "nowhere"}', '{"body.bias": "embed.weight"}', "{"):
        bad = tmp_path / "bad.safetensors"
        _resave(path, bad, header={"aliases": aliases})
        with pytest.raises(ValueError, match="corrupt alias table"):
            sparsegemm.load(bad, _TiedLM())


class _GatedBlock(nn.Module):
    """A Llama-style gated MLP, 64 -> 128 -> 64."""

    def __init__(self):
        super().__init__()
        self.gate_proj, self.up_proj = nn.Linear(64, 128, bias=False), nn.Linear(64, 128, bias=False)
        self.down_proj, self.act_fn = nn.Linear(128, 64, bias=False), nn.SiLU()

    def forward(self, x):
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


def test_sparsify_frees_each_dense_weight_once_replaced():
    # Converting an LLM on its GPU must not hold the whole dense model until the end: when layer j
    # is considered (filter_fn), the dense weights of the layers before it are gone.
    import weakref

    for fuse in (False, True):
        model = nn.Sequential(*[_GatedBlock() for _ in range(4)])
        order = [f"{i}.{attr}" for i in range(4) for attr in ("gate_proj", "up_proj", "down_proj")]
        alive = {name: weakref.ref(model.get_submodule(name).weight) for name in order}
        seen = []

        def converted_before(name):
            block, attr = int(name.split(".")[0]), name.split(".")[1]
            if not fuse:
                return order[:order.index(name)]
            fused = [f"{b}.{a}" for b in range(4 if attr == "down_proj" else block) for a in ("gate_proj", "up_proj")]
            return fused + ([f"{b}.down_proj" for b in range(block)] if attr == "down_proj" else [])

        def check(name, module):
            seen.append(name)
            assert [other for other in converted_before(name) if alive[other]() is not None] == [], (fuse, name)
            return True

        sparsegemm.sparsify(model, min_features=8, fuse_gated_mlp=fuse, filter_fn=check)
        assert len(seen) == 12 and not any(ref() for ref in alive.values())


def test_parametrized_layers_are_reported_not_silently_skipped():
    from sparsegemm import prune

    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64))
    prune.prune_one_shot(model)
    report = sparsegemm.sparsify(model, min_features=8)
    assert not report.converted and all("remove_masks" in layer.reason for layer in report.skipped)
    prune.remove_masks(model)
    assert len(sparsegemm.sparsify(model, min_features=8).converted) == 2


def test_functional_linear_accepts_dlpack_arrays():
    import numpy as np

    sw = sparsegemm.compress(torch.randn(8, 16).half(), prune=True)
    x = np.random.default_rng(0).standard_normal((3, 16)).astype(np.float16)
    y = sparsegemm.linear(x, sw)
    assert isinstance(y, np.ndarray) and y.shape == (3, 8)
    assert np.array_equal(y, sparsegemm.linear(torch.from_numpy(x), sw).numpy())


def test_functional_linear_takes_numpy_arrays_with_negative_strides(tmp_path):
    # torch.from_dlpack aborts the process on them (a C++ exception through the C API): run it in
    # a child so that a regression fails this test instead of killing the run.
    code = ("import numpy as np, torch, sparsegemm\n"
            "sw = sparsegemm.compress(torch.randn(16, 64).half(), prune=True)\n"
            "a = np.random.default_rng(0).standard_normal((8, 64)).astype(np.float16)\n"
            "b = np.random.default_rng(1).standard_normal(32).astype(np.float16)\n"
            "y = sparsegemm.linear(a[::-1], sw, b[::2])\n"
            "want = sparsegemm.linear(torch.from_numpy(a.copy()).flip(0), sw, torch.from_numpy(b[::2].copy()))\n"
            "assert np.array_equal(y, want.numpy())\n")
    # From a scratch folder: in a checkout, the source tree (no _C) would shadow the installed package.
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_graph_capture_and_cupy():
    sl = SparseLinear.from_dense(nn.Linear(256, 128).cuda().half())
    x = torch.randn(4, 256, device="cuda", dtype=torch.float16)
    eager = sl(x)  # first call on the device makes the kernel metadata (outside the capture)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = sl(x)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(captured, eager)
    cupy = pytest.importorskip("cupy")
    y = sparsegemm.linear(cupy.from_dlpack(x), sl.sparse_weight(), cupy.from_dlpack(sl.bias.detach()))
    assert isinstance(y, cupy.ndarray) and torch.equal(torch.from_dlpack(y), eager)


def test_split_k_scratch_is_reused_whatever_it_holds():
    # The reused buffers are made without a fill: a counter word that does not carry the launch's
    # token counts as no arrivals, and the last arrival leaves it zero.
    torch.manual_seed(1)
    sl = SparseLinear.from_dense(nn.Linear(512, 40).half(), backend="simt")
    used = _C.simt_gemm_scratch(3, 40, 512, -1, 0)[1]
    assert used > 0  # this shape splits K
    x = torch.randn(3, 512).half()
    first = sl(x)
    cache = ops._thread_buffers.buffers
    workspace, counters = cache[(-1, "split_k_workspace")], cache[(-1, "split_k_counters")]
    assert counters.dtype == torch.int64 and not counters[:used].any()
    counters.fill_(0x0123456789ABCD03)  # a foreign token with 3 arrivals
    workspace.fill_(0xFF)
    assert torch.equal(sl(x), first)
    assert cache[(-1, "split_k_workspace")] is workspace and cache[(-1, "split_k_counters")] is counters
    assert not counters[:used].any()
    oracle.assert_close_to_oracle(first, x, sl.dense_weight(), sl.bias.detach())


def assert_same_results_from_threads(calls, repeats=20):
    """Runs each no-argument call in ``calls`` ``repeats`` times, all in threads of their own at once;
    every result must equal what the call gave when run alone."""
    import threading

    with torch.no_grad():
        want = [call() for call in calls]
    failures = []

    def run(i):
        with torch.no_grad():
            for _ in range(repeats):
                if not torch.equal(calls[i](), want[i]):
                    failures.append(i)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(calls))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not failures


def test_cpu_dense_tile_scratch_is_per_thread(monkeypatch):
    # M >= CPU_DENSE_TILE_MIN_M decompresses W tile by tile into a reused scratch
    # (ops._reused_buffer): threads running layers of the same dtype at once each need their own.
    # Forced, so that the test does not depend on the CPU (fp32 takes that path on some only).
    monkeypatch.setattr(ops, "_cpu_dense_tiles_win", lambda dtype, k: True)
    torch.manual_seed(3)
    layers = [SparseLinear.from_dense(nn.Linear(512, 512)) for _ in range(4)]
    x = torch.randn(ops.CPU_DENSE_TILE_MIN_M, 512)
    assert_same_results_from_threads([lambda layer=layer: layer(x) for layer in layers])


def test_int8_launch_scratch_is_per_thread():
    # The dynamic INT8 path quantizes into reused scratch, then runs its GEMM: two launches that
    # another thread's may fall between (the emulator releases the GIL), so the scratch is per
    # thread. Threads running the same layer on different inputs must each get their own result.
    torch.manual_seed(2)
    sl = SparseLinear.from_dense(nn.Linear(256, 48).half(), backend="simt", quantize="int8")
    xs = [torch.randn(2, 256).half() * (i + 1) for i in range(4)]
    assert_same_results_from_threads([lambda x=x: sl(x) for x in xs], repeats=25)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("quantize", [None, "int8"])
def test_launch_scratch_is_safe_across_graph_replays_and_streams(quantize):
    # Launch temporaries (split-K workspace and tile counters, the INT8 path's quantized x) are
    # reused on the default stream and made per call elsewhere, a capture included (ops._scratch):
    # a graph replayed on a side stream while eager calls run on the default stream and on a
    # third stream must not share them with those calls.
    torch.manual_seed(0)
    sl = SparseLinear.from_dense(nn.Linear(4096, 384).cuda().half(), quantize=quantize)
    assert _C.cuda_gemm_scratch(4, 384, 4096, -1, 0)[1] > 0  # this shape splits K
    xs = [torch.randn(4, 4096, device="cuda", dtype=torch.float16) for _ in range(3)]
    with torch.no_grad():
        want = [sl(x).clone() for x in xs]
        static_x = xs[0].clone()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            captured = sl(static_x)
        replay_stream, third = torch.cuda.Stream(), torch.cuda.Stream()
        for i in range(6):
            static_x.copy_(xs[i % 3])
            replay_stream.wait_stream(torch.cuda.current_stream())
            third.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(replay_stream):
                graph.replay()
            eager = sl(xs[(i + 1) % 3])
            with torch.cuda.stream(third):
                beside = sl(xs[(i + 2) % 3])
            torch.cuda.synchronize()
            assert torch.equal(captured, want[i % 3])
            assert torch.equal(eager, want[(i + 1) % 3])
            assert torch.equal(beside, want[(i + 2) % 3])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_split_k_layers_replay_from_one_graph_whatever_the_pool_left_in_their_counters():
    # Each captured split-K call draws its counters from the graph's pool unfilled; the memory of
    # one call's counters is free for the tensors captured after it, which write it before the next
    # replay reaches that call again (gemm_sp.cuh arrived_last: the word's token tells). Five
    # replays of a chain of split-K layers with scratch tensors between them equal eager calls.
    torch.manual_seed(4)
    layers = [SparseLinear.from_dense(nn.Linear(4096, 4096).cuda().half()) for _ in range(3)]
    assert _C.cuda_gemm_scratch(2, 4096, 4096, -1, 0)[1] > 0  # these shapes split K
    static_x = torch.randn(2, 4096, device="cuda", dtype=torch.float16)

    def chain(x):
        for layer in layers:
            noise = torch.full((4096,), -1, dtype=torch.int64, device="cuda")  # reuses freed scratch
            x = layer(x) / 64 + noise[:1].half() * 0
        return x

    with torch.no_grad():
        chain(static_x)  # warm-up: reordered metadata made outside the capture
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            captured = chain(static_x)
        for i in range(5):
            static_x.copy_(torch.randn(2, 4096, device="cuda", dtype=torch.float16) * (i + 1))
            graph.replay()
            assert torch.equal(captured, chain(static_x))


@pytest.mark.parametrize("quantize", [None, "int8"])
def test_a_swapped_or_overwritten_metadata_refreshes_the_reordered_metadata(quantize):
    # functional_call swaps tensors past __setattr__; a copy_ into the buffers (a broadcast from
    # another rank, an edit) keeps every tensor object and data pointer, and the metadata's version
    # counter is what tells the reordered copy is stale.
    torch.manual_seed(25)
    layer, other = (SparseLinear.from_dense(nn.Linear(32, 16), dtype=torch.float16, backend="simt",
                                            quantize=quantize) for _ in range(2))
    x = torch.randn(3, 32).half()
    with torch.no_grad():
        layer(x)  # reorders and plans
        # Swapped past __setattr__: torch.func.functional_call, then the layer's own tensors again.
        before = layer(x)
        assert torch.equal(torch.func.functional_call(layer, dict(other.state_dict()), (x,)), other(x))
        assert torch.equal(layer(x), before)
        for name, tensor in other.state_dict().items():
            getattr(layer, name).copy_(tensor)
        assert torch.equal(layer(x), other(x))


def test_a_convolution_with_fresh_metadata_overrides_reorders_each_one():
    # functional_call with a new metadata tensor per call: a freed override's id and address may be
    # taken by the next one (version 0 both), so the layer holds the tensor it reordered from.
    def conv(seed):
        torch.manual_seed(seed)
        return SparseConv2d.from_dense(nn.Conv2d(64, 256, 3, padding=1), dtype=torch.float16, backend="simt")

    layer, patterns = conv(0), [conv(1).metadata, conv(2).metadata]
    reference = SparseConv2d.from_dense(nn.Conv2d(64, 256, 3, padding=1), dtype=torch.float16)
    reference.load_state_dict(layer.state_dict())
    x = torch.randn(1, 64, 3, 3).half()
    with torch.no_grad():
        gots = [torch.func.functional_call(layer, {"metadata": patterns[t % 2].clone()}, (x,)) for t in range(6)]
        wants = [torch.func.functional_call(reference, {"metadata": meta}, (x,)) for meta in patterns]
    for t, got in enumerate(gots):
        assert torch.allclose(got.float(), wants[t % 2].float(), rtol=1e-2, atol=1e-2), t


@pytest.mark.parametrize("quantize", [None, "int8"])
def test_assigning_values_bias_or_scales_keeps_the_reordered_metadata(quantize, monkeypatch):
    # FSDP2 assigns values and bias at every unshard and reshard: each assignment reordered the
    # metadata again. Only the plan made with the old tensors goes; the results follow the new ones.
    torch.manual_seed(6)
    layer = SparseLinear.from_dense(nn.Linear(64, 32).half(), backend="simt", quantize=quantize)
    other = SparseLinear.from_dense(nn.Linear(64, 32).half(), backend="simt", quantize=quantize)
    x = torch.randn(2, 64).half()
    with torch.no_grad():
        layer(x)
    reorders = []
    reorder = ops.reorder_meta
    monkeypatch.setattr(ops, "reorder_meta", lambda *a, **kw: reorders.append(a) or reorder(*a, **kw))
    # other's values and scales under layer's metadata: what a layer of both computes
    reference = SparseLinear.from_dense(nn.Linear(64, 32).half(), backend="simt", quantize=quantize)
    reference.load_state_dict({**other.state_dict(), "metadata": layer.metadata})
    layer.values = nn.Parameter(other.values.detach().clone(), requires_grad=other.values.requires_grad)
    layer.bias = nn.Parameter(other.bias.detach().clone())
    if quantize:
        layer.scale = other.scale.clone()
    with torch.no_grad():
        got = layer(x)
    assert not reorders
    with torch.no_grad():
        assert torch.equal(got, reference(x))


def test_kernel_layout_copies_are_refreshed_in_their_own_memory():
    # A CUDA graph captured over a layer reads the reordered metadata at its address. load_state_dict
    # (even of the layer's own weights), .half() of a half layer, .to() its own device and assigning
    # the same bias freed that copy, and replays read memory the allocator had handed on. The copy is
    # now made again where it was, and at once by a load: a replay after it reads the new weight's.
    torch.manual_seed(5)
    for quantize, key in ((None, ("simt", torch.device("cpu"))), ("int8", "simt")):
        layer = SparseLinear.from_dense(nn.Linear(64, 32).half(), backend="simt", quantize=quantize)
        other = SparseLinear.from_dense(nn.Linear(64, 32).half(), backend="simt", quantize=quantize)
        x = torch.randn(2, 64).half()
        with torch.no_grad():
            layer(x)
        copy = layer._kernel_meta.get(key)[1]
        address = copy.data_ptr()
        layer.load_state_dict(other.state_dict())
        assert layer._kernel_meta.get(key)[1] is copy and copy.data_ptr() == address  # made again, before a call
        assert torch.equal(copy, ops.reorder_meta(other.metadata, 64, "simt", s8=quantize == "int8"))
        for change in (lambda: layer.half(), lambda: layer.to("cpu"), lambda: setattr(layer, "bias", layer.bias)):
            change()
            with torch.no_grad():
                assert torch.equal(layer(x), other(x))
            assert layer._kernel_meta.get(key)[1].data_ptr() == address
    # Made again under autograd (a grad-mode call), a copy gets memory of its own: the one set aside,
    # which a graph captured for inference reads, stays, and the next copy outside autograd goes there.
    layer.half()
    layer(x)
    assert layer._kernel_meta.get(key)[1].data_ptr() != address and layer._kernel_meta.spare[key].data_ptr() == address
    layer.half()
    with torch.no_grad():
        layer(x)
    assert layer._kernel_meta.get(key)[1].data_ptr() == address
    layer.to("meta")  # a move: the copies on the device left are freed
    assert not layer._kernel_meta and not layer._kernel_meta.spare


def test_kernel_layout_copies_stay_right_for_shared_caches_autograd_and_export():
    from torch.nn.utils import parametrize
    from sparsegemm.quant import linear_int8

    torch.manual_seed(6)
    x = torch.randn(2, 64).half()
    # A SparseTensor24 from sparse_weight() shares the layer's cache: used after the layer's weight
    # was replaced, it wrote its old layout into the memory the layer's plan reads (outputs 1.2 off).
    layer, other = (SparseLinear.from_dense(nn.Linear(64, 32).half(), backend="simt", quantize="int8")
                    for _ in range(2))
    with torch.no_grad():
        held = layer.sparse_weight()
        layer(x)
        layer.values = nn.Parameter(other.values.clone(), requires_grad=False)
        layer.metadata, layer.scale = other.metadata.clone(), other.scale.clone()
        layer.bias = nn.Parameter(other.bias.clone(), requires_grad=False)
        assert torch.equal(layer(x), other(x))
        linear_int8(x, held, layer.bias, backend="simt")
        assert torch.equal(layer(x), other(x))
    # Used twice in one graph with parametrized metadata (a new tensor at each access): the second
    # copy was written over the first, which the graph had saved for its backward.
    twice = SparseLinear.from_dense(nn.Linear(64, 64).half(), backend="simt")

    class Copy(nn.Module):
        def forward(self, meta):
            return meta.clone()

    parametrize.register_parametrization(twice, "metadata", Copy(), unsafe=True)
    twice(twice(x)).float().sum().backward()
    assert twice.values.grad is not None
    # torch.export (non-strict) kept its traced copy, a FakeTensor, which the next eager call read.
    fresh = SparseLinear.from_dense(nn.Linear(64, 32).half(), backend="simt")
    with torch.no_grad():
        torch.export.export(fresh, (x,))
        torch.testing.assert_close(fresh(x), torch.nn.functional.linear(x.float(), fresh.dense_weight().float(),
                                                                        fresh.bias.float()).half(),
                                   rtol=2e-3, atol=2e-3)


def test_modules_and_sparse_tensors_pickled_by_earlier_versions_load():
    sw = sparsegemm.compress(torch.randn(32, 64).half(), prune=True)
    old = SparseTensor24.__new__(SparseTensor24)
    old.__setstate__((None, {"values": sw.values, "meta": sw.meta, "shape": sw.shape, "scale": None,
                             "_kernel_meta": {}}))  # the default form of a __slots__ class
    assert torch.equal(sparsegemm.decompress(old), sparsegemm.decompress(sw)) and not old._kernel_meta
    layer = SparseLinear.from_dense(nn.Linear(64, 32).half(), backend="simt")
    state = layer.__getstate__()
    state["_kernel_meta"] = {("simt", torch.device("cpu")): torch.zeros(1, dtype=torch.uint8)}  # its old form
    loaded = SparseLinear.__new__(SparseLinear)
    loaded.__setstate__(state)
    x = torch.randn(2, 64).half()
    with torch.no_grad():
        assert torch.equal(loaded(x), layer(x))


def test_a_sparse_tensor_pickles_without_its_kernel_layout_copies():
    import copy
    import pickle

    sw = sparsegemm.compress(torch.randn(64, 64).half(), prune=True)
    size = len(pickle.dumps(sw))
    sw.kernel_meta("simt")
    assert len(pickle.dumps(sw)) == size and not pickle.loads(pickle.dumps(sw))._kernel_meta
    twin = copy.deepcopy(sw)
    assert not twin._kernel_meta and torch.equal(twin.kernel_meta("simt"), sw.kernel_meta("simt"))


def test_a_layer_made_under_inference_mode_runs_on_the_kernel_path():
    # Its buffers are inference tensors, which have no version counter to check.
    with torch.inference_mode():
        layer = SparseLinear.from_dense(nn.Linear(32, 16), dtype=torch.float16, backend="simt")
        x = torch.randn(3, 32).half()
        y = layer(x)
    assert layer._eager_plan is not None  # the kernel path ran (it checks the metadata first)
    oracle.assert_close_to_oracle(y, x, layer.dense_weight(), layer.bias.detach(), None)


def test_load_state_dict_refreshes_the_reordered_metadata():
    torch.manual_seed(5)
    a = SparseLinear.from_dense(nn.Linear(64, 32).half(), backend="simt")
    b = SparseLinear.from_dense(nn.Linear(64, 32).half(), backend="simt")
    x = torch.randn(3, 64).half()
    a(x)  # fills a's cache of the reordered metadata
    a.load_state_dict(b.state_dict())
    assert torch.equal(a(x), b(x))


@pytest.mark.parametrize("k", [64, 62])
def test_the_values_gradient_taken_a_row_tile_at_a_time_is_the_whole_ones(k, monkeypatch):
    # Eagerly the values' gradient runs over tiles of W's rows (its transient was 4 to 8 times W's
    # dense size): 3-row tiles over 16 rows, and K = 62 (padded), against one tile.
    torch.manual_seed(36)
    layer = SparseLinear.from_dense(nn.Linear(k, 16), dtype=torch.float32)
    x = torch.randn(5, k, requires_grad=True)
    grads = []
    for tile_bytes in (ops._GRAD_TILE_BYTES, 3 * 4 * (k + 3) // 4 * 4):
        monkeypatch.setattr(ops, "_GRAD_TILE_BYTES", tile_bytes)
        layer.zero_grad(set_to_none=True)
        x.grad = None
        torch.nn.functional.gelu(layer(x)).square().sum().backward()
        grads.append((layer.values.grad.clone(), layer.bias.grad.clone(), x.grad.clone()))
    for whole, tiled in zip(*grads):  # BLAS may block a tile's product otherwise: rounding apart
        torch.testing.assert_close(whole, tiled, rtol=1e-6, atol=1e-6)
    mask = ops.meta_to_mask(layer.metadata, k)
    dense = layer.dense_weight().detach().clone().requires_grad_(True)
    torch.nn.functional.gelu(torch.nn.functional.linear(x, dense, layer.bias)).square().sum().backward()
    torch.testing.assert_close(grads[1][0], dense.grad[mask].view(16, -1), rtol=1e-5, atol=1e-5)


def test_int8_layers_keep_float32_scales_through_dtype_moves_and_pass_gradients_straight_through():
    torch.manual_seed(6)
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 32))
    sparsegemm.sparsify(model, quantize="int8", min_features=8)
    model.half()
    layer = model[0]
    assert layer.scale.dtype == torch.float32 and layer.bias.dtype == torch.float16
    x = torch.randn(4, 64).half()
    assert model(x).dtype == torch.float16
    # Behind trainable layers (a LoRA adapter, an unfrozen embedding) the frozen INT8 layers pass x
    # its gradient through their dequantized weights, eager and compiled.
    grad_y = torch.randn(4, 32).half()
    with torch.no_grad():
        hidden = model[0](x).float()
    want = (((grad_y.float() @ quant.dequantize(model[2].sparse_weight())).half().float() * (hidden > 0))
            @ quant.dequantize(layer.sparse_weight()))
    torch._dynamo.reset()
    for run in (model, torch.compile(model)):
        x_grad = x.clone().requires_grad_()
        y = run(x_grad)
        assert torch.equal(y, model(x))
        y.backward(grad_y)
        torch.testing.assert_close(x_grad.grad.float(), want, rtol=2e-3, atol=2e-3)
        assert layer.values.grad is None and layer.bias.grad is None  # frozen
    torch._dynamo.reset()
    assert torch.equal(torch.compile(model, fullgraph=True)(x), model(x))  # grad mode, frozen layers
    layer.set_input_scale(0.05)  # static mode: the scale stays a tensor, no host read per call
    torch._dynamo.reset()
    assert torch.equal(torch.compile(model, fullgraph=True)(x), model(x))


def test_compile_with_a_cold_metadata_cache():
    torch._dynamo.reset()
    sl = SparseLinear.from_dense(nn.Linear(64, 48).half(), backend="simt")
    x = torch.randn(5, 64).half()
    compiled = torch.compile(sl, fullgraph=True)
    assert torch.equal(compiled(x), sl(x))


def _resave(src, dst, mutate_tensors=None, header=None):
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(src))
    with safe_open(str(src), framework="pt") as f:
        meta = dict(f.metadata())
    if mutate_tensors:
        mutate_tensors(tensors)
    if header:
        meta.update(header)
    save_file(tensors, str(dst), metadata=meta)


def test_load_hardening_leaves_the_model_untouched_on_failure(tmp_path):
    import json

    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 32))
    sparsegemm.sparsify(model, quantize="int8", min_features=8)
    model[0].set_input_scale(0.1)
    path = tmp_path / "m.safetensors"
    sparsegemm.save(model, path)
    table = json.loads(_header(path)["converted"])
    table["0"]["bias"] = "no"
    cases = {
        "list table": (None, {"converted": json.dumps([1, 2])}, r"corrupt module table"),
        "bias as text": (None, {"converted": json.dumps(table)}, r"field 'bias' of the module table must be bool"),
        "int8 -128": (lambda t: t["2.values"].__setitem__((0, 0), -128), None, r"module '2'.*\[-127, 127\].*-128"),
        "negative input scale": (lambda t: t["0.input_scale"].fill_(-0.1), None,
                                 r"module '0'.*input_scale must be finite and positive"),
    }
    for label, (mutate, header, match) in cases.items():
        bad = tmp_path / f"{label}.safetensors"
        _resave(path, bad, mutate, header)
        fresh = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 32))
        before = {k: v.clone() for k, v in fresh.state_dict().items()}
        with pytest.raises(ValueError, match=match):
            sparsegemm.load(bad, fresh)
        assert isinstance(fresh[0], nn.Linear) and isinstance(fresh[2], nn.Linear), label
        assert all(torch.equal(before[k], v) for k, v in fresh.state_dict().items()), label
    # JSON that the decoder itself refuses: nesting past its recursion limit, an integer past
    # Python's digit limit (RecursionError and a bare ValueError, neither naming the file).
    for label, key, text, table in (("deep table", "converted", "[" * 100000 + "]" * 100000, "module"),
                                    ("deep aliases", "aliases", "[" * 100000 + "]" * 100000, "alias"),
                                    ("long integer", "converted", '{"0": {"in_features": 1' + "0" * 5000 + "}}",
                                     "module")):
        bad = tmp_path / f"{label}.safetensors"
        _resave(path, bad, None, {key: text})
        fresh = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 32))
        with pytest.raises(ValueError, match=rf"sparsegemm.load: .*{label}.safetensors has a corrupt {table} table"):
            sparsegemm.load(bad, fresh)
        assert isinstance(fresh[0], nn.Linear), label
    truncated = tmp_path / "t.safetensors"
    truncated.write_bytes(path.read_bytes()[:100])
    from sparsegemm.io import describe
    with pytest.raises(ValueError, match=r"report: .* is not a readable safetensors file"):
        describe(truncated)


class _ShellNet(nn.Module):
    """What an LLM shell has that load must get right: a tied head, a non-persistent buffer (a
    rotary table), a gated MLP (fused), an INT8 layer and a plain one."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(256, 64)
        self.register_buffer("table", torch.linspace(-1, 1, 64), persistent=False)
        self.mlp = _GatedBlock()
        self.quantized = nn.Linear(64, 64)
        self.head = nn.Linear(64, 256, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, tokens):
        return self.head(self.quantized(self.mlp(self.embed(tokens) + self.table)))


def _saved_shell_net(path, dtype=torch.float32):
    torch.manual_seed(24)
    model = _ShellNet().to(dtype)
    sparsegemm.sparsify(model, fuse_gated_mlp=True, min_features=8, filter_fn=lambda name, _: name != "quantized")
    sparsegemm.sparsify(model, quantize="int8", min_features=8)
    sparsegemm.save(model, path)
    return model


def test_load_validates_layers_that_have_no_entry_of_their_own(tmp_path):
    # A fused MLP's gate_up (built by its shell) and a layer the model holds already get their
    # tensors from the file: with their table entries gone, corrupt metadata must still be refused
    # (it once loaded, and ran with a wrong pattern), the model untouched.
    import json

    path = tmp_path / "m.safetensors"
    _saved_shell_net(path)
    # gate_up in the shell built for a dense MLP, or in a loaded model; an INT8 layer already loaded.
    for name, models in (("mlp.gate_up", (_ShellNet, lambda: sparsegemm.load(path, _ShellNet()))),
                         ("quantized", (lambda: sparsegemm.load(path, _ShellNet()),))):
        table = json.loads(_header(path)["converted"])
        del table[name]
        bad = tmp_path / f"{name}.safetensors"
        _resave(path, bad, lambda t: t[f"{name}.metadata"].fill_(0xAA), {"converted": json.dumps(table)})
        for make in models:
            model = make()
            before = {k: v.clone() for k, v in model.state_dict().items()}
            with pytest.raises(ValueError, match=rf"module '{name}': SparseTensor24: corrupt metadata at row 0, "
                                                 r"group 0: nibble 0xA"):
                sparsegemm.load(bad, model)
            assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_a_checkpoint_loads_again_into_the_model_it_filled(tmp_path):
    # Swapping weights: a fused gated MLP (and INT8 layers) loaded again, from another checkpoint.
    path, other = tmp_path / "m.safetensors", tmp_path / "o.safetensors"
    _saved_shell_net(path)
    torch.manual_seed(5)
    second = _ShellNet()
    sparsegemm.sparsify(second, fuse_gated_mlp=True, min_features=8, filter_fn=lambda name, _: name != "quantized")
    sparsegemm.sparsify(second, quantize="int8", min_features=8)
    sparsegemm.save(second, other)
    model = sparsegemm.load(path, _ShellNet())
    tokens = torch.randint(0, 256, (2, 5))
    with torch.no_grad():
        assert torch.equal(sparsegemm.load(other, model)(tokens), second(tokens))
        assert torch.equal(sparsegemm.load(path, model)(tokens), sparsegemm.load(path, _ShellNet())(tokens))


@pytest.mark.parametrize("saved_bias", [True, False])
def test_load_refuses_a_layer_whose_bias_differs(tmp_path, saved_bias):
    path = tmp_path / "m.safetensors"
    model = nn.Sequential(nn.Linear(64, 64, bias=saved_bias), nn.Conv2d(8, 16, 3, bias=saved_bias))
    sparsegemm.sparsify(model, min_features=8)
    sparsegemm.save(model, path)
    with pytest.raises(ValueError, match=rf"module '0' was a Linear 64 -> 64 \(bias={saved_bias}\) when saved"):
        sparsegemm.load(path, nn.Sequential(nn.Linear(64, 64, bias=not saved_bias), nn.Conv2d(8, 16, 3, bias=saved_bias)))
    with pytest.raises(ValueError, match=rf"module '1' was a Conv2d 8 -> 16 .*, bias={saved_bias} when saved"):
        sparsegemm.load(path, nn.Sequential(nn.Linear(64, 64, bias=saved_bias), nn.Conv2d(8, 16, 3, bias=not saved_bias)))


def test_load_names_an_unknown_kind(tmp_path):
    import json

    path = tmp_path / "m.safetensors"
    sparsegemm.sparsify(model := nn.Sequential(nn.Linear(64, 64)), min_features=8)
    sparsegemm.save(model, path)
    table = json.loads(_header(path)["converted"])
    table["0"]["kind"] = "Bogus"
    bad = tmp_path / "bad.safetensors"
    _resave(path, bad, None, {"converted": json.dumps(table)})
    with pytest.raises(ValueError, match=r"module '0': unknown kind 'Bogus' in the checkpoint"):
        sparsegemm.load(bad, nn.Sequential(nn.Linear(64, 64)))


def test_report_survives_a_zero_size_layer_in_the_table(tmp_path):
    import json

    from sparsegemm.io import describe

    path = tmp_path / "m.safetensors"
    sparsegemm.sparsify(model := nn.Sequential(nn.Linear(64, 64)), min_features=8)
    sparsegemm.save(model, path)
    table = json.loads(_header(path)["converted"])
    table["0"]["out_features"] = 0
    odd = tmp_path / "odd.safetensors"
    _resave(path, odd, None, {"converted": json.dumps(table)})
    line = next(line for line in describe(odd).splitlines() if line.startswith("0 "))
    assert line.split()[-1] == "-"  # no share of a zero-byte dense weight (it raised ZeroDivisionError)


def test_load_fills_an_empty_shell_on_a_device(tmp_path):
    # An LLM is loaded without ever allocating (or initialising) its dense weights: the shell's
    # parameters are on the meta device, its buffers real; load puts the checkpoint's tensors on
    # the device given and keeps the tie.
    path = tmp_path / "m.safetensors"
    model = _saved_shell_net(path)
    with sparsegemm.init_empty_weights():
        shell = _ShellNet()
    assert all(p.is_meta for p in shell.parameters()) and not shell.table.is_meta
    assert shell.head.weight is shell.embed.weight
    loaded = sparsegemm.load(path, shell, device="cpu")
    assert isinstance(loaded.mlp, sparsegemm.SparseGatedMLP) and loaded.quantized.quantize == "int8"
    assert not any(t.is_meta for t in [*loaded.parameters(), *loaded.buffers()])
    assert loaded.head.weight is loaded.embed.weight and loaded.mlp.gate_up.values.requires_grad
    tokens = torch.randint(0, 256, (2, 7))
    with torch.no_grad():  # the INT8 layer is inference-only
        assert torch.equal(loaded(tokens), model(tokens))


def test_init_empty_weights_puts_only_parameters_on_meta_and_restores_registration():
    with pytest.raises(RuntimeError, match="inside"):
        with sparsegemm.init_empty_weights():
            layer = nn.BatchNorm1d(8)
            raise RuntimeError("inside")
    assert layer.weight.is_meta and not layer.running_mean.is_meta
    assert not nn.Linear(4, 4).weight.is_meta


def test_load_refuses_tensors_it_cannot_fill(tmp_path):
    path = tmp_path / "m.safetensors"
    _saved_shell_net(path)
    with sparsegemm.init_empty_weights():
        shell = _ShellNet()
    with pytest.raises(ValueError, match=r"sparsegemm.load: the model has tensors on the meta device \(embed.weight"
                                         r".*pass device="):
        sparsegemm.load(path, shell)
    with torch.device("meta"):  # the buffers too: the rotary-like table is in no checkpoint
        everything_on_meta = _ShellNet()
    with pytest.raises(ValueError, match=r"non-persistent buffers on the meta device \(table\)"):
        sparsegemm.load(path, everything_on_meta, device="cpu")
    assert isinstance(shell.quantized, nn.Linear) and isinstance(everything_on_meta.mlp.up_proj, nn.Linear)


def test_sparsify_and_the_layers_refuse_a_shell_saying_why():
    # sparsify failed in its report ("Tensor.item() cannot be called on meta tensors", no layer
    # named); from_dense and a forward named a backend the caller never chose.
    with torch.device("meta"):
        model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 64))
        layer = SparseLinear(64, 32)
    with pytest.raises(ValueError, match=r"sparsify: the model's weights are on the meta device \(0.weight\): "
                                         r"there is nothing to prune .*sparsegemm.load\(path, model, device=...\)"):
        sparsegemm.sparsify(model)
    assert isinstance(model[0], nn.Linear)
    meta = r"the tensors are on the meta device, which holds no data to compute with"
    with pytest.raises(ValueError, match="sparsegemm.compress: " + meta):
        SparseLinear.from_dense(model[0])
    with pytest.raises(ValueError, match="SparseLinear: " + meta):
        layer(torch.empty(3, 64, device="meta", dtype=layer.values.dtype))


def test_reset_parameters_gives_a_layer_materialized_from_meta_a_valid_state():
    # to_empty leaves uninitialized memory: metadata of illegal nibbles, which a forward took (NaN on
    # the CPU, undefined on a GPU). FSDP calls reset_parameters on the materialized modules.
    def static_int8():
        layer = SparseLinear(64, 32, quantize="int8")
        layer.set_input_scale(1.0)
        return layer

    builders = ((lambda: SparseLinear(64, 32), torch.randn(2, 64)),
                (lambda: SparseLinear(64, 32, quantize="int8"), torch.randn(2, 64)),
                (static_int8, torch.randn(2, 64)),  # its calibrated scale too
                (lambda: SparseConv2d(8, 16, 3, padding=1), torch.randn(1, 8, 5, 5)),
                (lambda: sparsegemm.SparseConv1d(8, 16, 3), torch.randn(1, 8, 7)))
    for build, x in builders:
        with torch.device("meta"):
            layer = build()
        layer.to_empty(device="cpu")
        for t in (*layer.parameters(), *layer.buffers()):
            with torch.no_grad():
                t.copy_(torch.full_like(t, 0xFF if t.dtype == torch.uint8 else 7))  # garbage, as memory may hold
        layer.reset_parameters()
        layer.validate()
        assert layer(x.to(layer.float_dtype)).abs().max() == 0  # zero weight, zero bias
        assert all(torch.equal(a, b) for a, b in zip(layer.state_dict().values(), build().state_dict().values()))


def test_init_empty_weights_keeps_ties_attributes_and_lazy_modules():
    shared = nn.Parameter(torch.ones(4, 4))
    shared.plan = "rowwise"
    with sparsegemm.init_empty_weights():
        encoder, decoder = nn.Linear(4, 4), nn.Linear(4, 4)
        encoder.weight = shared
        decoder.weight = shared
        lazy = nn.LazyLinear(8)  # no shape yet: left as it is
    assert encoder.weight is decoder.weight and encoder.weight.is_meta and encoder.weight.plan == "rowwise"
    assert isinstance(lazy.weight, nn.parameter.UninitializedParameter)
    import weakref

    with sparsegemm.init_empty_weights():
        real = nn.Parameter(torch.ones(8))
        gone = weakref.ref(real)
        holder = nn.Module()
        holder.weight = real
        del real
        assert gone() is None and holder.weight.is_meta  # the real parameters it replaces are not kept


def test_init_empty_weights_blocks_overlapping_across_threads_restore_registration():
    import threading

    register = nn.Module.register_parameter
    entered, release_first = threading.Event(), threading.Event()

    def first():
        with sparsegemm.init_empty_weights():
            entered.set()
            release_first.wait()

    thread = threading.Thread(target=first)
    thread.start()
    entered.wait()
    with sparsegemm.init_empty_weights():  # entered second, left last
        release_first.set()
        thread.join()
        assert nn.Linear(2, 2).weight.is_meta
    assert nn.Module.register_parameter is register and not nn.Linear(2, 2).weight.is_meta


def test_load_and_sparsify_refuse_to_run_inside_init_empty_weights(tmp_path):
    path = tmp_path / "m.safetensors"
    _saved_shell_net(path)
    with sparsegemm.init_empty_weights():
        shell = _ShellNet()
        with pytest.raises(RuntimeError, match=r"sparsegemm.load: called inside init_empty_weights\(\)"):
            sparsegemm.load(path, shell, device="cpu")
        with pytest.raises(RuntimeError, match=r"sparsify: called inside init_empty_weights\(\)"):
            sparsegemm.sparsify(nn.Sequential(nn.Linear(64, 64)), min_features=8)


def test_load_ties_as_the_model_does(tmp_path):
    # A tied checkpoint into a model that does not tie: two parameters, two tensors.
    path = tmp_path / "tied.safetensors"
    sparsegemm.save(_TiedLM(), path)
    assert _header(path)["format"] == "sparsegemm.checkpoint.v2"  # v1 readers would miss the alias table
    untied = _TiedLM()
    untied.head.weight = nn.Parameter(untied.head.weight.detach().clone())
    loaded = sparsegemm.load(path, untied, device="cpu")  # assigned tensors: the one place they could share
    assert loaded.head.weight.data_ptr() != loaded.embed.weight.data_ptr()
    assert torch.equal(loaded.head.weight, loaded.embed.weight)
    # A model that ties two tensors a checkpoint holds apart: equal (a file from before the alias
    # table) loads; different is an error, not one of them silently.
    untied_path = tmp_path / "untied.safetensors"
    sparsegemm.save(untied, untied_path)
    assert _header(untied_path)["format"] == "sparsegemm.checkpoint.v1"
    assert "aliases" not in _header(untied_path)
    sparsegemm.load(untied_path, _TiedLM())
    _resave(untied_path, tmp_path / "different.safetensors", lambda t: t["head.weight"].add_(1.0))
    for device in (None, "cpu"):
        with pytest.raises(ValueError, match="the model ties embed.weight, head.weight; .* holds different tensors"):
            sparsegemm.load(tmp_path / "different.safetensors", _TiedLM(), device=device)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_load_fills_an_empty_shell_on_the_gpu(tmp_path):
    path = tmp_path / "m.safetensors"
    model = _saved_shell_net(path, torch.float16)  # the CUDA kernels take fp16 / bf16
    with sparsegemm.init_empty_weights():
        shell = _ShellNet().half()
    loaded = sparsegemm.load(path, shell, device="cuda")
    assert {t.device.type for t in [*loaded.parameters(), *loaded.buffers()]} == {"cuda"}
    tokens = torch.randint(0, 256, (2, 7))
    with torch.no_grad():
        got, want = loaded(tokens.cuda()).cpu().float(), model(tokens).float()
    assert (got - want).abs().max() <= 0.02 * want.abs().max()  # CPU vs GPU summation order, INT8 rounding


def test_load_checks_a_convolutions_geometry(tmp_path):
    import json

    model = nn.Sequential(nn.Conv2d(16, 32, 3, padding=1, stride=2))
    sparsegemm.sparsify(model, min_features=8)
    path = tmp_path / "conv.safetensors"
    sparsegemm.save(model, path)
    again = sparsegemm.load(path, model)  # a converted model loads again, its SparseConv2d the twin
    assert isinstance(again[0], SparseConv2d) and again[0].stride == (2, 2)
    with pytest.raises(ValueError, match=r"module '0' was a Conv2d 16 -> 32 with kernel_size=\[3, 3\], stride=\[2, 2\]"):
        sparsegemm.load(path, nn.Sequential(nn.Conv2d(16, 32, 3, padding=1)))
    for kwargs, why in (({"groups": 2}, "grouped convolution"), ({"padding_mode": "reflect"}, "padding_mode")):
        with pytest.raises(ValueError, match=f"module '0' is a SparseConv2d in the checkpoint, .*{why}"):
            sparsegemm.load(path, nn.Sequential(nn.Conv2d(16, 32, 3, padding=1, stride=2, **kwargs)))
    table = json.loads(_header(path)["converted"])
    for key, value in (("stride", [0, 0]), ("padding", [-5, -5]), ("dilation", [0, 1]), ("kernel_size", "3")):
        bad_table = json.loads(json.dumps(table))
        bad_table["0"][key] = value
        bad = tmp_path / "bad.safetensors"
        _resave(path, bad, header={"converted": json.dumps(bad_table)})
        with pytest.raises(ValueError, match=f"sparsegemm.load: module '0'.*{key}"):
            sparsegemm.load(bad, nn.Sequential(nn.Conv2d(16, 32, 3, padding=1, stride=2)))


def test_load_state_dict_refuses_a_convolution_of_another_geometry():
    # 16 channels of a 3 x 3 kernel and 144 of a 1 x 1 are both K = 144: the compressed tensors have
    # one shape, and one layer loaded the other's weight silently, its K read in another (ky, kx,
    # cin) order. nn.Conv2d refuses it by its weight's shape, strict or not, as load_state_dict does
    # any size mismatch: so does the layer, by the dense shape its state dict holds.
    torch.manual_seed(5)
    saved = nn.Sequential(SparseConv2d.from_dense(nn.Conv2d(16, 8, 3), dtype=torch.float32))
    state = saved.state_dict()
    assert state["0.dense_shape"].tolist() == [8, 16, 3, 3] and state["0.dense_shape"].dtype == torch.int64
    for other, want in ((SparseConv2d(144, 8, 1, dtype=torch.float32), r"\[8, 144, 1, 1\]"),
                        (SparseConv2d(48, 8, (1, 3), dtype=torch.float32), r"\[8, 48, 1, 3\]")):
        model = nn.Sequential(other)
        assert all(state[key].shape == value.shape for key, value in model.state_dict().items())
        kept = {key: value.clone() for key, value in model.state_dict().items()}
        for strict in (True, False):
            with pytest.raises(RuntimeError, match=r"the state dict's compressed weight for layer '0': dense_shape is "
                                                   rf"\[8, 16, 3, 3\], the layer's {want} \(\[Cout, Cin, kh, kw\]\): "
                                                   r"the weight of a convolution of another geometry, which nn.Conv2d "
                                                   r"refuses too"):
                model.load_state_dict(state, strict=strict)
            assert all(torch.equal(value, kept[key]) for key, value in model.state_dict().items())
    # The same K in the same (kx, cin) order, but nn.Conv1d's weight is no nn.Conv2d's.
    one_d = sparsegemm.SparseConv1d.from_dense(nn.Conv1d(16, 8, 3), dtype=torch.float32)
    with pytest.raises(RuntimeError, match=r"for the layer: dense_shape is \[8, 16, 3\], the layer's \[8, 16, 1, 3\] "
                                           r"\(\[Cout, Cin, kh, kw\]\).* which nn.Conv2d refuses too"):
        SparseConv2d(16, 8, (1, 3), dtype=torch.float32).load_state_dict(one_d.state_dict())
    with pytest.raises(RuntimeError, match=r"dense_shape is \[8, 16, 1, 3\], the layer's \[8, 16, 3\] "
                                           r"\(\[Cout, Cin, k\]\).* which nn.Conv1d refuses too"):
        one_d.load_state_dict(SparseConv2d(16, 8, (1, 3), dtype=torch.float32).state_dict())
    # The same geometry round-trips (stride, padding and dilation are no part of the weight, as on
    # nn.Conv2d); a state dict from before the dense shape was kept loads, strict too, unchecked.
    x = torch.randn(2, 16, 9, 9)
    for loaded in (state, {key: value for key, value in state.items() if key != "0.dense_shape"}):
        twin = nn.Sequential(SparseConv2d(16, 8, 3, dtype=torch.float32))
        twin.load_state_dict(loaded, strict=True)
        assert torch.equal(twin(x), saved(x)) and twin[0].dense_shape.tolist() == [8, 16, 3, 3]
        with torch.device("meta"):
            shell = nn.Sequential(SparseConv2d(16, 8, 3, dtype=torch.float32))
        shell.load_state_dict(loaded, strict=True, assign=True)  # the buffer a real tensor, not the shell's
        assert torch.equal(shell(x), saved(x)) and not shell[0].dense_shape.is_meta
    strided = nn.Sequential(SparseConv2d(16, 8, 3, stride=2, padding=1, dtype=torch.float32))
    strided.load_state_dict(state)
    assert torch.equal(strided[0].dense_weight(), saved[0].dense_weight())


def test_load_checks_a_convolutions_dense_shape(tmp_path):
    # The module table records the geometry, which load checks against the model: a convolution of
    # the same N and K but another geometry is refused there. The dense_shape buffer, the same
    # geometry again, is left out of the file (which stays as versions before it wrote and read it)
    # and made from the table on load; one a file does hold is checked against the table.
    from safetensors.torch import load_file

    torch.manual_seed(6)
    build = lambda: nn.Sequential(nn.Conv2d(16, 8, 3), nn.ReLU(), nn.Conv1d(8, 16, 3))  # noqa: E731
    model = build()
    sparsegemm.sparsify(model, min_features=8)
    path = tmp_path / "conv.safetensors"
    sparsegemm.save(model, path)
    assert set(load_file(str(path))) == set(model.state_dict()) - {"0.dense_shape", "2.dense_shape"}
    for other in (nn.Conv2d(144, 8, 1), SparseConv2d(144, 8, 1)):
        with pytest.raises(ValueError, match=r"module '0' was a Conv2d 16 -> 8 with kernel_size=\[3, 3\].* the model "
                                             rf"has {type(other).__name__}\(144, 8"):
            sparsegemm.load(path, nn.Sequential(other, nn.ReLU(), nn.Conv1d(8, 16, 3)))
    x2, x1 = torch.randn(2, 16, 9, 9), torch.randn(2, 8, 7)
    with sparsegemm.init_empty_weights():
        shell = build()
    for loaded in (sparsegemm.load(path, build()), sparsegemm.load(path, shell, device="cpu"),
                   sparsegemm.load(path, model)):
        assert torch.equal(loaded[0](x2), model[0](x2)) and torch.equal(loaded[2](x1), model[2](x1))
        assert loaded[0].dense_shape.tolist() == [8, 16, 3, 3] and loaded[2].dense_shape.tolist() == [16, 8, 3]
    held = tmp_path / "held.safetensors"
    for shape, refused in (([8, 16, 3, 3], False), ([8, 144, 1, 1], True)):
        _resave(path, held, lambda tensors: tensors.update({"0.dense_shape": torch.tensor(shape)}))
        if refused:
            with pytest.raises(ValueError, match=r"sparsegemm.load: module '0': SparseConv2d: dense_shape is "
                                                 r"\[8, 144, 1, 1\], the layer's \[8, 16, 3, 3\]"):
                sparsegemm.load(held, build())
        else:
            assert torch.equal(sparsegemm.load(held, build())[0](x2), model[0](x2))


def test_string_padding_converts_where_it_is_symmetric(tmp_path):
    # padding="same" / "valid" convolutions were all left dense. "valid" is zeros and "same" (stride
    # 1) dilation * (kernel - 1) / 2 a side, but for an even dilated kernel, which torch pads one
    # more on the far side: that one stays dense, with the reason.
    def build():
        torch.manual_seed(8)
        return nn.Sequential(nn.Conv2d(8, 16, 3, padding="same"), nn.ReLU(),
                             nn.Conv2d(16, 16, (3, 5), padding="same", dilation=(2, 1)),
                             nn.Conv2d(16, 8, 2, padding="same"), nn.Conv2d(8, 8, 3, padding="valid"),
                             nn.Flatten(2), nn.Conv1d(8, 8, 5, padding="same", dilation=2))

    model, dense = build(), build()
    report = sparsegemm.sparsify(model, min_features=8, progress=False)
    assert {row.name: row.converted for row in report.layers} == {
        "0": True, "2": True, "3": False, "4": True, "6": True}
    assert "padding='same' with an even dilated kernel (kernel_size=(2, 2), dilation=(1, 1))" in report.layers[2].reason
    with torch.no_grad():
        for name in ("0", "2", "4", "6"):
            dense.get_submodule(name).weight.copy_(model.get_submodule(name).dense_weight())
        x = torch.randn(2, 8, 9, 10)
        torch.testing.assert_close(model(x), dense(x), rtol=1e-5, atol=1e-5)
        path = tmp_path / "same.safetensors"
        sparsegemm.save(model, path)
        assert torch.equal(sparsegemm.load(path, build())(x), model(x))


def test_a_conversion_to_an_unsupported_dtype_says_so_and_leaves_the_layer_working():
    for layer, x in ((SparseLinear.from_dense(nn.Linear(16, 8)), torch.randn(2, 16)),
                     (SparseConv2d.from_dense(nn.Conv2d(8, 8, 3)), torch.randn(2, 8, 12, 12))):
        y = layer(x)
        with pytest.raises(TypeError, match=r"Sparse(Linear|Conv2d): cannot convert to torch.float64"):
            layer.double()
        assert layer.values.dtype == torch.float32 and torch.equal(layer(x), y)


def test_sparse_conv2d_rejects_a_geometry_it_cannot_run():
    for kwargs, match in (({"stride": 0}, "stride must be two integers >= 1"),
                          ({"padding": -1}, "padding must be two integers >= 0"),
                          ({"dilation": (1, 0)}, "dilation must be two integers >= 1"),
                          ({"kernel_size": 0}, "kernel_size must be two integers >= 1"),
                          ({"in_channels": 0}, "in_channels and out_channels must be positive")):
        args = {"in_channels": 8, "out_channels": 8, "kernel_size": 3, **kwargs}
        with pytest.raises(ValueError, match=f"SparseConv2d: {match}"):
            SparseConv2d(**args)


def _header(path):
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return f.metadata()


# ---- gated (GLU) layers: SparseLinear.from_gate_up -----------------------------------------------

class _GatedMLP(nn.Module):
    """A Llama-style MLP, silu(gate(x)) * up(x) -> down, with the gate / up pair as one layer."""

    def __init__(self, dim=64, hidden=40, gate_up=None):
        super().__init__()
        self.gate_up = gate_up if gate_up is not None else SparseLinear(dim, hidden, activation="swiglu")
        self.down = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.down(self.gate_up(x))


@pytest.mark.parametrize("backend", ["cpu", "simt"])
@pytest.mark.parametrize("activation", ["swiglu", "geglu", "reglu"])
def test_gate_up_layer_matches_the_two_pruned_projections(dtype, backend, activation):
    if backend == "simt" and dtype == torch.float32:
        pytest.skip("the kernels take 16-bit floats")
    torch.manual_seed(4)
    gate, up = nn.Linear(64, 40).to(dtype), nn.Linear(64, 40).to(dtype)
    layer = SparseLinear.from_gate_up(gate, up, activation, backend=backend)
    assert layer.weight_shape == (80, 64) and layer.out_features == 40
    assert "activation=" + activation in repr(layer)
    x = torch.randn(2, 3, 64).to(dtype)
    y = layer(x)
    assert y.shape == (2, 3, 40)
    # The stored rows are the two pruned projections, interleaved; the public oracle pairs them.
    w_gate, w_up = sparsegemm.format.split_gate_up(layer.dense_weight())
    assert torch.equal(w_gate, sparsegemm.prune_2to4(gate.weight.detach()))
    assert torch.equal(w_up, sparsegemm.prune_2to4(up.weight.detach()))
    oracle.assert_close_to_oracle(y.reshape(-1, 40), x.reshape(-1, 64), layer.dense_weight(), layer.bias.detach(),
                                  activation)


@pytest.mark.parametrize("backend", ["cpu", "simt"])
def test_int8_gate_up_layer_matches_the_int8_oracle(backend):
    torch.manual_seed(5)
    gate, up = nn.Linear(72, 24).half(), nn.Linear(72, 24).half()
    layer = SparseLinear.from_gate_up(gate, up, quantize="int8", backend=backend)
    x = torch.randn(5, 72).half()
    sw = layer.sparse_weight()
    x_q, x_scale = oracle.quantize_rows_int8(x)
    ref = oracle.linear_int8(x_q, x_scale, sw.values, sw.meta, 72, sw.scale, layer.bias, "swiglu", torch.float16)
    y = layer(x)
    assert y.shape == ref.shape == (5, 24)
    # One fp32 silu / product against the oracle's float64 silu: within an ulp or two of fp16.
    assert torch.allclose(y.float(), ref.float(), rtol=2e-3, atol=1e-3)


def test_gate_up_layer_checkpoint_round_trip(tmp_path):
    torch.manual_seed(6)
    gate, up = nn.Linear(64, 40).half(), nn.Linear(64, 40).half()
    model = _GatedMLP(gate_up=SparseLinear.from_gate_up(gate, up)).half()
    path = tmp_path / "gated.safetensors"
    sparsegemm.save(model, path)
    fresh = _GatedMLP().half()
    sparsegemm.load(path, fresh)
    x = torch.randn(3, 64).half()
    assert torch.equal(fresh(x), model(x))
    assert "80 x 64" in sparsegemm.io.describe(path)  # the stored rows: gate and up
    # A gated layer has no nn.Linear twin: a model without it is refused by name.
    plain = nn.Module()
    plain.gate_up, plain.down = nn.Linear(64, 40), nn.Linear(40, 64)
    with pytest.raises(ValueError, match="'gate_up' was a Linear 64 -> 40 with activation 'swiglu'"):
        sparsegemm.load(path, plain)


def test_gate_up_layer_errors():
    gate = nn.Linear(64, 40)
    with pytest.raises(ValueError, match="activation must be one of"):
        SparseLinear.from_gate_up(gate, nn.Linear(64, 40), "silu")
    with pytest.raises(ValueError, match="same shape"):
        SparseLinear.from_gate_up(gate, nn.Linear(64, 48))
    with pytest.raises(ValueError, match="same shape"):
        SparseLinear.from_gate_up(gate, nn.Linear(64, 40, bias=False))
    with pytest.raises(TypeError, match="up must be an nn.Linear"):
        SparseLinear.from_gate_up(gate, nn.Conv2d(3, 3, 1))
    with pytest.raises(ValueError, match="multiple of 8, got 36"):
        SparseLinear.from_gate_up(nn.Linear(64, 36), nn.Linear(64, 36))
    with pytest.raises(ValueError, match="needs out_features a multiple of 8, got 12"):
        SparseLinear(64, 12, activation="geglu")
    with pytest.raises(ValueError, match="activation must be one of"):
        SparseLinear(64, 16, activation="tanh")
    with pytest.raises(ValueError, match="'swiglu' is gated .* use SparseLinear.from_gate_up"):
        SparseLinear.from_dense(gate, activation="swiglu")
    # The functional API names the rule for a weight that is not an interleaved pair.
    sw = sparsegemm.compress(torch.randn(24, 32), prune=True)
    with pytest.raises(ValueError, match="gated: the weight's rows must be gate and up rows .* got 24 rows"):
        sparsegemm.linear(torch.randn(2, 32), sw, activation="swiglu")
    with pytest.raises(ValueError, match="interleave_gate_up: H .* multiple of 8, got 4"):
        sparsegemm.format.interleave_gate_up(torch.zeros(4, 3), torch.zeros(4, 3))


@pytest.mark.parametrize("quantize", [None, "int8"])
def test_from_dense_fuses_a_plain_activation(quantize):
    torch.manual_seed(7)
    lin = nn.Linear(64, 40).half()
    fused = SparseLinear.from_dense(lin, activation="gelu", backend="simt", quantize=quantize)
    plain = SparseLinear.from_dense(lin, backend="simt", quantize=quantize)
    x = torch.randn(3, 64).half()
    ref = torch.nn.functional.gelu(plain(x).float())
    assert torch.allclose(fused(x).float(), ref, atol=2e-3, rtol=2e-3)
    assert "activation=gelu" in repr(fused)


@pytest.mark.parametrize("k", [96, ops.CPU_FP32_KERNEL_MIN_K + 8])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_cpu_large_m_takes_dense_tiles_only_where_they_win(monkeypatch, isa, dtype, k):
    # The dense tiles win where torch's dense GEMM runs at full rate against the ISA's gathering
    # kernel (ops.py): native 16-bit dot products (bf16 on AVX512-BF16, fp16 on AVX512-FP16), fp32
    # against the AVX2 kernel and, for a short K, the AVX-512 one, everything against the portable
    # one. Elsewhere (a 16-bit dtype torch widens, and fp32 with a long K, against the AVX-512
    # kernel) the layer gives the C++ GEMM's own bits.
    tiled = []
    real_tiles = ops._cpu_dense_tiles
    monkeypatch.setattr(ops, "_cpu_dense_tiles", lambda *args: (tiled.append(True), real_tiles(*args)))
    torch.manual_seed(4)
    layer = SparseLinear.from_dense(nn.Linear(k, 40).to(dtype))
    x = torch.randn(ops.CPU_DENSE_TILE_MIN_M + 3, k).to(dtype)
    y = layer(x)
    native = _C.cpu_has_native_dot(sparsegemm.format.DTYPE_CODES[dtype])
    expected = native or isa == "generic" or (
        dtype == torch.float32 and (isa == "avx2" or k < ops.CPU_FP32_KERNEL_MIN_K))
    assert bool(tiled) == expected and not (native and dtype == torch.float32)
    oracle.assert_close_to_oracle(y, x, layer.dense_weight(), layer.bias.detach(), None)
    # A gated layer of more rows than one 64-row slab of the kernel's gated epilogue.
    gated = SparseLinear.from_gate_up(nn.Linear(k, 16).to(dtype), nn.Linear(k, 16).to(dtype), "swiglu")
    oracle.assert_close_to_oracle(gated(x), x, gated.dense_weight(), gated.bias.detach(), "swiglu")
    if not expected:
        sw = layer.sparse_weight()
        direct = torch.empty_like(y)
        _C.cpu_gemm(x.shape[0], 40, k, x.data_ptr(), k, sw.values.data_ptr(), sw.meta.data_ptr(),
                    layer.bias.data_ptr(), direct.data_ptr(), 40, sparsegemm.format.DTYPE_CODES[dtype], 0, 0, 0)
        assert torch.equal(y, direct)


@pytest.mark.parametrize("activation", ["gelu", "geglu"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_dense_tiles_keep_gelus_negative_tail(monkeypatch, dtype, activation):
    # torch's gelu computes 1 + erf(z / sqrt 2), which cancels below z = -4: the dense-tile path gave
    # -0.0 at z = -6 where GELU is -5.9e-9 (the kernels and the oracle use erfc). Forced onto the
    # tiles, whatever this CPU's routing (ops._cpu_dense_tiles_win).
    monkeypatch.setattr(ops, "_cpu_dense_tiles_win", lambda *args: True)
    w = torch.zeros(16, 4)
    w[:, 0] = 1  # every row reads z from x's first column
    if activation == "geglu":
        w[8:] = torch.tensor([0.0, 1.0, 0.0, 0.0])  # the up rows (format.interleave_gate_up) read 1
    sw = sparsegemm.compress(w.to(dtype), prune=True)
    x = torch.zeros(ops.CPU_DENSE_TILE_MIN_M, 4)
    x[:, 0] = torch.linspace(-12, -4, ops.CPU_DENSE_TILE_MIN_M)
    x[:, 1] = 1
    x = x.to(dtype)
    y = sparsegemm.linear(x, sw, activation=activation)
    assert bool((y < 0).all())
    oracle.assert_close_to_oracle(y, x, sparsegemm.decompress(sw), None, activation)


@pytest.mark.parametrize("dtype, backend", [(torch.float32, "cpu"), (torch.bfloat16, "cpu"), (torch.bfloat16, "simt")])
def test_silu_keeps_its_negative_tail(dtype, backend):
    # v / (1 + exp(-v)) overflowed exp below v = -88.7: -0.0 where silu is -1.98e-37 at -89, a normal
    # fp32 and bf16 number (the kernels' epilogues, CPU and CUDA, through the emulator here).
    w = torch.zeros(4, 4)
    w[:, 0] = 1
    sw = sparsegemm.compress(w.to(dtype), prune=True)
    x = torch.zeros(3, 4)
    x[:, 0] = torch.tensor([-89.0, -95.0, -60.0])
    x = x.to(dtype)
    y = sparsegemm.linear(x, sw, activation="silu", backend=backend)
    assert bool((y[:, 0] < 0).all())
    oracle.assert_close_to_oracle(y, x, sparsegemm.decompress(sw), None, "silu")


@pytest.mark.parametrize("tile_bytes", [None, 3000])
def test_gate_up_layer_on_the_cpu_dense_tile_path(monkeypatch, tile_bytes):
    # M >= ops.CPU_DENSE_TILE_MIN_M takes the decompress-tiles + torch GEMM path: the pairing of gate
    # and up columns there (ops.activate_torch) against the oracle, for fp16 and for INT8 (whose
    # CPU kernel pairs the rows in 64-row slabs: 150 rows cross two slab borders). 3000-byte tiles
    # are 23 rows of this weight: 16 for the gated layer (whole gate / up runs), uneven for the rest.
    monkeypatch.setattr(ops, "_cpu_dense_tiles_win", lambda dtype, k: True)  # on any CPU
    if tile_bytes is not None:
        monkeypatch.setattr(ops, "_CPU_TILE_BYTES", tile_bytes)
        lin = nn.Linear(64, 88).half()
        x = torch.randn(100, 64).half()
        for activation in (None, "gelu"):
            layer = SparseLinear.from_dense(lin, activation=activation)
            oracle.assert_close_to_oracle(layer(x), x, layer.dense_weight(), layer.bias.detach(), activation)
    torch.manual_seed(8)
    gate, up = nn.Linear(64, 48).half(), nn.Linear(64, 48).half()
    x = torch.randn(150, 64).half()
    assert x.shape[0] >= ops.CPU_DENSE_TILE_MIN_M
    layer = SparseLinear.from_gate_up(gate, up, "geglu")
    oracle.assert_close_to_oracle(layer(x), x, layer.dense_weight(), layer.bias.detach(), "geglu")
    layer8 = SparseLinear.from_gate_up(gate, up, "reglu", quantize="int8")
    sw = layer8.sparse_weight()
    x_q, x_scale = oracle.quantize_rows_int8(x)
    ref = oracle.linear_int8(x_q, x_scale, sw.values, sw.meta, 64, sw.scale, layer8.bias, "reglu", torch.float16)
    assert torch.equal(layer8(x), ref)  # relu and one fp32 product: bit for bit


@pytest.mark.parametrize("activation", [None, "swiglu"])
def test_int8_decode_fast_path_matches_the_checked_path(activation):
    # quant.linear_int8 takes its fast path for a plain dynamic call; out_dtype (the same dtype)
    # sends the same call through every check: both must give the same bits.
    torch.manual_seed(9)
    gate, up = nn.Linear(96, 32).half(), nn.Linear(96, 32).half()
    layer = (SparseLinear.from_gate_up(gate, up, activation, quantize="int8", backend="simt") if activation
             else SparseLinear.from_dense(gate, quantize="int8", backend="simt"))
    from sparsegemm import quant
    x = torch.randn(2, 3, 96).half()
    sw = layer.sparse_weight()
    code = sparsegemm.format.ACTIVATION_CODES[activation]
    assert quant._dynamic_fast_path(x, sw, layer.bias, activation, None, None, "simt") == ("simt", code)
    assert quant._dynamic_fast_path(x, sw, layer.bias, activation, torch.float16, None, "simt") is None
    fast = quant.linear_int8(x, sw, layer.bias, activation=activation, backend="simt")
    checked = quant.linear_int8(x, sw, layer.bias, activation=activation, out_dtype=torch.float16, backend="simt")
    assert fast.shape == (2, 3, 32) and torch.equal(fast, checked)


def test_gated_layer_load_keeps_the_backend_and_module_errors(tmp_path):
    gate, up = nn.Linear(64, 16).half(), nn.Linear(64, 16).half()
    model = _GatedMLP(hidden=16, gate_up=SparseLinear.from_gate_up(gate, up, backend="simt")).half()
    path = tmp_path / "m.safetensors"
    sparsegemm.save(model, path)
    fresh = _GatedMLP(hidden=16, gate_up=SparseLinear(64, 16, activation="swiglu", backend="simt")).half()
    sparsegemm.load(path, fresh)
    assert fresh.gate_up.backend == "simt"
    with pytest.raises(ValueError, match="one dtype and device"):
        SparseLinear.from_gate_up(gate, nn.Linear(64, 16))  # fp16 gate, fp32 up
    with pytest.raises(ValueError, match=r"activation must be one of .* got \['swiglu'\]"):
        SparseLinear(64, 16, activation=["swiglu"])
    with pytest.raises(ValueError, match="sms and blocks_per_sm must be at least 1, got 0 and 2"):
        _C.plan_gemm(1, 4096, 4096, sms=0, blocks_per_sm=2)


# ---- sparsify(fuse_gated_mlp=True): Hugging Face-layout gated MLPs ---------------------------------

class _HFMLP(nn.Module):
    """A Llama / Mistral / Qwen2 MLP as transformers writes it."""

    def __init__(self, dim=64, hidden=96, act=None, combine=None):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=False)
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)
        self.act_fn = act if act is not None else nn.SiLU()
        self.combine = combine or (lambda a, b: a * b)

    def forward(self, x):
        return self.down_proj(self.combine(self.act_fn(self.gate_proj(x)), self.up_proj(x)))


class _HFBlock(nn.Module):
    def __init__(self, **mlp_kwargs):
        super().__init__()
        self.attn_out = nn.Linear(64, 64)
        self.mlp = _HFMLP(**mlp_kwargs)

    def forward(self, x):
        h = x + self.attn_out(x)
        return h + self.mlp(h)


class _OwnSiLU(nn.Module):
    """An activation class of a model's own (transformers has SiLUActivation): told by its values."""

    def forward(self, x):
        return x * torch.sigmoid(x)


@pytest.mark.parametrize("act,activation", [(nn.SiLU(), "swiglu"), (_OwnSiLU(), "swiglu"), (nn.GELU(), "geglu"),
                                            (nn.ReLU(), "reglu")])
def test_sparsify_fuses_hugging_face_gated_mlps(act, activation, tmp_path):
    torch.manual_seed(10)
    model = nn.Sequential(_HFBlock(act=act), _HFBlock(act=act)).half()
    dense = _pruned_copy_of(model)
    report = sparsegemm.sparsify(model, fuse_gated_mlp=True, min_features=32)
    for block in model:
        assert isinstance(block.mlp, sparsegemm.SparseGatedMLP)
        assert block.mlp.gate_up.activation == activation and isinstance(block.mlp.down_proj, SparseLinear)
    fused_rows = [r for r in report.layers if r.kind == "Linear (gated)"]
    assert [r.name for r in fused_rows] == ["0.mlp.gate_proj+up_proj", "1.mlp.gate_proj+up_proj"]
    assert all(r.converted and r.shape == (192, 64) for r in fused_rows)
    assert not any(r.name.endswith((".gate_proj", ".up_proj")) for r in report.layers)  # not converted twice
    x = torch.randn(3, 64).half()
    with torch.no_grad():
        y, ref = model(x), dense(x)
    assert torch.allclose(y.float(), ref.float(), atol=2e-2, rtol=2e-2)
    # Checkpoint: the fused MLPs are rebuilt from the dense architecture.
    path = tmp_path / "hf.safetensors"
    sparsegemm.save(model, path)
    fresh = nn.Sequential(_HFBlock(act=act), _HFBlock(act=act)).half()
    sparsegemm.load(path, fresh)
    assert isinstance(fresh[1].mlp, sparsegemm.SparseGatedMLP)
    with torch.no_grad():
        assert torch.equal(fresh(x), y)
    assert "gate_up" in sparsegemm.io.describe(path)


def _pruned_copy_of(model):
    """A deep copy whose Linear weights are 2:4-pruned in place: the dense oracle of sparsify."""
    import copy

    ref = copy.deepcopy(model)
    with torch.no_grad():
        for mod in ref.modules():
            if isinstance(mod, nn.Linear):
                mod.weight.copy_(sparsegemm.prune_2to4(mod.weight))
    return ref


class _ReadsWeight(nn.Module):
    """T5's dense block: its forward reads ``self.wo.weight.dtype`` to cast the hidden states."""

    def __init__(self):
        super().__init__()
        self.wi, self.wo = nn.Linear(64, 64), nn.Linear(64, 64)

    def forward(self, x):
        return self.wo(self.wi(x).to(self.wo.weight.dtype))


class _ReadsDeepWeight(nn.Module):
    """ViT's model: ``self.embeddings.patch.weight.dtype`` read two levels up."""

    def __init__(self):
        super().__init__()
        self.embeddings = nn.Module()
        self.embeddings.patch = nn.Conv2d(8, 64, 2, stride=2)
        self.block = _ReadsWeight()

    def forward(self, x):
        h = self.embeddings.patch(x.to(self.embeddings.patch.weight.dtype)).flatten(2).transpose(1, 2)
        return self.block(h)


def test_sparsify_leaves_layers_whose_weight_a_forward_reads():
    # Converted, these broke the model's own forward (AttributeError: no attribute 'weight').
    torch.manual_seed(13)
    model = _ReadsDeepWeight()
    x = torch.randn(2, 8, 8, 8)
    report = sparsegemm.sparsify(model, min_features=8)
    reasons = {row.name: row.reason for row in report.layers if not row.converted}
    assert set(reasons) == {"embeddings.patch", "block.wo"}
    assert "_ReadsDeepWeight.forward reads its .weight" in reasons["embeddings.patch"]
    assert "_ReadsWeight.forward reads its .weight" in reasons["block.wo"]
    assert isinstance(model.block.wi, SparseLinear)
    with torch.no_grad():
        model(x)


class _ReadsIndexedWeight(nn.Module):
    """A forward that reaches the layer through a ModuleList index: ``self.layers[0].weight``."""

    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList([nn.Linear(64, 64), nn.Linear(64, 64)])

    def forward(self, x):
        return self.layers[1](self.layers[0](x.to(self.layers[0].weight.dtype)))


def test_sparsify_sees_a_weight_read_through_an_index():
    # The path held an index, and the search gave up: layers.0 was converted and the forward broke.
    model = _ReadsIndexedWeight()
    reasons = {row.name: row.reason for row in sparsegemm.sparsify(model, min_features=8, progress=False).layers}
    assert "_ReadsIndexedWeight.forward reads its .weight" in reasons["layers.0"] and reasons["layers.1"] == ""
    assert isinstance(model.layers[0], nn.Linear) and isinstance(model.layers[1], SparseLinear)
    with torch.no_grad():
        model(torch.randn(2, 64))


def test_sparsify_converts_linear_subclasses_that_compute_what_nn_linear_does():
    # transformers' FalconLinear (x @ W.T + b) was left dense as a subclass while the pruning tools
    # pruned it: a Falcon model came out pruned but not one layer converted. A probe now tells
    # nn.Linear's product from anything else; more state than weight and bias keeps a layer dense.
    class FalconLinear(nn.Linear):
        def forward(self, input):
            out = input @ self.weight.T
            return out if self.bias is None else out + self.bias

    class Scaled(nn.Linear):
        def forward(self, input):
            return 2 * super().forward(input)

    class Failing(nn.Linear):
        def forward(self, input, mask):
            return super().forward(input) * mask

    class InplaceClip(nn.Linear):  # edits its input: a probe computing nn.Linear's product after it agreed
        def forward(self, input):
            return super().forward(input.clamp_(-0.5, 0.5))

    class EvalScaled(nn.Linear):  # differs in one mode only
        def forward(self, input):
            return super().forward(input) * (1 if self.training else 2)

    class LoRA(nn.Linear):  # an adapter whose B starts at zero: a probe alone would see nn.Linear
        def __init__(self, *args):
            super().__init__(*args)
            self.lora_a = nn.Parameter(torch.randn(4, self.in_features))
            self.lora_b = nn.Parameter(torch.zeros(self.out_features, 4))

        def forward(self, input):
            return super().forward(input) + input @ self.lora_a.T @ self.lora_b.T

    torch.manual_seed(8)
    model = nn.Sequential(FalconLinear(64, 64), FalconLinear(64, 64, bias=False), Scaled(64, 64), Failing(64, 64),
                          LoRA(64, 64), InplaceClip(64, 64), EvalScaled(64, 64).train())
    x = torch.randn(3, 64)
    sparsegemm.prune.prune_one_shot(model)
    sparsegemm.prune.remove_masks(model)
    with torch.no_grad():
        want = [model[0](x), model[1](x)]
    state = torch.get_rng_state()
    report = sparsegemm.sparsify(model, min_features=8)
    assert torch.equal(torch.get_rng_state(), state) and model[6].training  # the probe's draws and modes undone
    assert [row.converted for row in report.layers] == [True, True, False, False, False, False, False]
    assert all("its forward is not nn.Linear's" in row.reason for row in report.layers[5:])
    assert "subclass Scaled left alone: its forward is not nn.Linear's x @ W.T + b (off by 100.0%" in report.layers[2].reason
    assert "subclass Failing left alone: its forward failed on a probe (TypeError" in report.layers[3].reason
    assert report.layers[4].reason == ("subclass LoRA left alone (it holds more than nn.Linear's weight and bias: "
                                       "lora_a, lora_b)")
    with torch.no_grad():
        torch.testing.assert_close(model[0](x), want[0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(model[1](x), want[1], rtol=1e-5, atol=1e-5)


def test_sparsify_keeps_frozen_parameters_frozen():
    # Freeze-the-backbone fine-tuning: the converted layers came back trainable.
    model = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 64), nn.Linear(64, 64))
    model[0].requires_grad_(False)
    model[1].weight.requires_grad_(False)  # the bias alone trains
    sparsegemm.sparsify(model, min_features=8, progress=False)
    assert {name: p.requires_grad for name, p in model.named_parameters()} == {
        "0.values": False, "0.bias": False, "1.values": False, "1.bias": True, "2.values": True, "2.bias": True}
    frozen = nn.Sequential(nn.Linear(64, 64)).requires_grad_(False)
    sparsegemm.sparsify(frozen, min_features=8, quantize="int8", progress=False)
    assert not any(p.requires_grad for p in frozen.parameters())


def test_sparsify_refuses_a_dtype_it_cannot_convert_to_up_front():
    # Checked at the first converted layer only, so a model whose layers were all skipped took it.
    for dtype in ("float16", torch.float64, torch.int8):
        for model in (nn.Sequential(nn.Linear(64, 64)), nn.Sequential(nn.Linear(4, 4))):
            with pytest.raises(ValueError, match=r"sparsify: dtype must be None or one of torch.float32, "
                                                 r"torch.float16, torch.bfloat16, got"):
                sparsegemm.sparsify(model, dtype=dtype, progress=False)
            assert isinstance(model[0], nn.Linear)


def test_sparsify_leaves_mlps_that_are_not_gated_products():
    torch.manual_seed(11)
    sums = nn.Sequential(_HFBlock(combine=lambda a, b: a + b)).half()  # act(gate) + up: not a GLU
    tanh = nn.Sequential(_HFBlock(act=nn.GELU(approximate="tanh"))).half()
    # DeepSeek-V4's clamped SwiGLU: equal to the product until a pre-activation passes 10, which the
    # random probe token does not reach; a second probe token drives the first gate and up to ~50.
    clamped = nn.Sequential(_HFBlock(combine=lambda a, b: a.clamp(max=10.0) * b.clamp(-10.0, 10.0))).half()
    # A zero first row (a pruned or dead unit) must not break the large probe token.
    dead_row = nn.Sequential(_HFBlock()).half()
    with torch.no_grad():
        dead_row[0].mlp.gate_proj.weight[0].zero_()
    assert sparsegemm.nn.gated_mlp_activation(dead_row[0].mlp, sparsegemm.nn.gated_mlp_parts(dead_row[0].mlp))[0]
    # Clamped activations equal ReLU / exact GELU on [-6, 6]: they were fused (relative error 4 on
    # wide inputs) until the probe reached far values.
    relu6 = nn.Sequential(_HFBlock(act=nn.ReLU6())).half()
    clipped_gelu = nn.Sequential(_HFBlock(act=lambda v: nn.functional.gelu(v).clamp(-10.0, 10.0))).half()
    for model, why in ((sums, "its forward is not down(act(gate(x)) * up(x))"),
                       (clamped, "its forward is not down(act(gate(x)) * up(x))"),
                       (tanh, "its activation GELU computes none of SiLU, exact GELU, ReLU"),
                       (relu6, "its activation ReLU6 computes none of SiLU, exact GELU, ReLU"),
                       (clipped_gelu, "computes none of SiLU, exact GELU, ReLU")):
        report = sparsegemm.sparsify(model, fuse_gated_mlp=True, min_features=32)
        assert not isinstance(model[0].mlp, sparsegemm.SparseGatedMLP)
        row = next(r for r in report.layers if r.kind == "Linear (gated)")
        assert not row.converted and why in row.reason
        # Its layers are converted one by one instead.
        assert isinstance(model[0].mlp.gate_proj, SparseLinear) and isinstance(model[0].mlp.up_proj, SparseLinear)


def test_sparsify_fused_int8_mlp_and_load_errors(tmp_path):
    torch.manual_seed(12)
    model = nn.Sequential(_HFBlock()).half()
    sparsegemm.sparsify(model, fuse_gated_mlp=True, min_features=32, quantize="int8")
    assert model[0].mlp.gate_up.quantize == "int8"
    x = torch.randn(2, 64).half()
    with torch.no_grad():
        y = model(x)
    assert y.shape == (2, 64) and torch.isfinite(y).all()
    path = tmp_path / "int8.safetensors"
    sparsegemm.save(model, path)
    wrong = nn.Sequential(_HFBlock(act=nn.ReLU())).half()
    with pytest.raises(ValueError, match="'0.mlp' was a gated MLP with activation 'swiglu' when saved, the model's "
                                         "is a gated MLP with 'reglu'"):
        sparsegemm.load(path, wrong)
    assert type(wrong[0].mlp) is _HFMLP  # a failing load leaves the model as it was
    fresh = nn.Sequential(_HFBlock()).half()
    sparsegemm.load(path, fresh)
    with torch.no_grad():
        assert torch.equal(fresh(x), y)
    # Static INT8: the calibrator finds the fused layer like any int8 SparseLinear.
    from sparsegemm import quant
    cal = quant.Int8Calibrator(model)
    assert "0.mlp.gate_up" in cal.layers
    with torch.no_grad(), cal:
        model(x)
    cal.apply()
    assert model[0].mlp.gate_up.input_scale is not None
    with torch.no_grad():
        assert torch.allclose(model(x).float(), y.float(), atol=0.05 * float(y.abs().max()))


@pytest.mark.parametrize("quantize", [None, "int8"])
def test_fused_gated_model_compiles_without_graph_breaks(quantize):
    torch._dynamo.reset()
    torch.manual_seed(13)
    model = nn.Sequential(_HFBlock()).bfloat16()
    sparsegemm.sparsify(model, fuse_gated_mlp=True, min_features=32, quantize=quantize)
    assert isinstance(model[0].mlp, sparsegemm.SparseGatedMLP)
    compiled = torch.compile(model, fullgraph=True)
    x = torch.randn(3, 64).bfloat16()
    with torch.no_grad():
        assert torch.equal(compiled(x), model(x))


class _MixtralExpert(nn.Module):
    """transformers' MixtralBlockSparseTop2MLP layout: w1 (gate), w3 (up), w2 (down)."""

    def __init__(self, dim=64, hidden=96):
        super().__init__()
        self.w1, self.w2, self.w3 = nn.Linear(dim, hidden, bias=False), nn.Linear(hidden, dim, bias=False), \
            nn.Linear(dim, hidden, bias=False)
        self.act_fn = nn.SiLU()

    def forward(self, x):
        return self.w2(self.act_fn(self.w1(x)) * self.w3(x))


class _Phi3MLP(nn.Module):
    """transformers' Phi3MLP layout: gate_up_proj holds the gate rows, then the up rows."""

    def __init__(self, dim=64, hidden=96):
        super().__init__()
        self.gate_up_proj = nn.Linear(dim, 2 * hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)
        self.activation_fn = nn.SiLU()

    def forward(self, x):
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(up * self.activation_fn(gate))


@pytest.mark.parametrize("layout,label", [(_MixtralExpert, "w1+w3"), (_Phi3MLP, "gate_up_proj")])
def test_sparsify_fuses_the_other_gated_layouts(layout, label, tmp_path):
    torch.manual_seed(14)
    model = nn.Sequential(layout(), layout()).half()
    dense = _pruned_copy_of(model)
    report = sparsegemm.sparsify(model, fuse_gated_mlp=True, min_features=32)
    assert all(isinstance(mlp, sparsegemm.SparseGatedMLP) for mlp in model)
    rows = [r for r in report.layers if r.kind == "Linear (gated)"]
    assert [r.name for r in rows] == [f"0.{label}", f"1.{label}"] and all(r.converted for r in rows)
    assert all(isinstance(mlp.down_proj, SparseLinear) for mlp in model)
    x = torch.randn(3, 64).half()
    with torch.no_grad():
        y = model(x)
        assert torch.allclose(y.float(), dense(x).float(), atol=2e-2, rtol=2e-2)
    path = tmp_path / "layout.safetensors"
    sparsegemm.save(model, path)
    fresh = nn.Sequential(layout(), layout()).half()
    sparsegemm.load(path, fresh)
    with torch.no_grad():
        assert torch.equal(fresh(x), y)


def _simt_layer(quantize, activation):
    gate, up = nn.Linear(64, 32).half(), nn.Linear(64, 32).half()
    if activation in sparsegemm.format.GATED_ACTIVATIONS:
        return SparseLinear.from_gate_up(gate, up, activation, backend="simt", quantize=quantize)
    return SparseLinear.from_dense(gate, activation=activation, backend="simt", quantize=quantize)


@pytest.mark.parametrize("quantize", [None, "int8"])
@pytest.mark.parametrize("activation", [None, "gelu", "swiglu"])
def test_eager_kernel_path_matches_the_general_path(quantize, activation):
    # SparseLinear._eager_forward launches the kernels from a plan made at the layer's first eager
    # call, skipping the functional API and the custom op: the bits must be theirs.
    torch.manual_seed(11)
    layer = _simt_layer(quantize, activation)
    x = torch.randn(2, 3, 64).half()
    with torch.no_grad():
        fast = layer(x)
        assert layer._eager_plan is not None
        general = sparsegemm.linear(x, layer.sparse_weight(), layer.bias, activation=activation, backend="simt")
        assert fast.shape == general.shape and torch.equal(fast, general)
        # Inputs the plan does not cover take the general path: a strided x, a 1-D x, no rows.
        strided = torch.randn(64, 4).half().T
        assert torch.equal(layer(strided), sparsegemm.linear(strided, layer.sparse_weight(), layer.bias,
                                                             activation=activation, backend="simt"))
        assert torch.equal(layer(x[0, 0]), general[0, 0])
        assert layer(x[:0]).shape == (0, 3, general.shape[-1])


def test_eager_plan_follows_the_layer():
    torch.manual_seed(12)
    layer = _simt_layer(None, None)
    x = torch.randn(4, 64).half()

    def general(inp):
        return sparsegemm.linear(inp, layer.sparse_weight(), layer.bias, backend="simt")

    with torch.no_grad():
        layer(x)
        assert layer._eager_plan is not None
        layer.bfloat16()  # a conversion drops the plan; the next call is planned for bf16
        assert layer._eager_plan is None
        assert torch.equal(layer(x.bfloat16()), general(x.bfloat16()))
        layer.half()
        other = _simt_layer(None, None)
        layer(x)
        layer.load_state_dict(other.state_dict())  # new weights in place: the same tensors, new metadata
        assert torch.equal(layer(x), other(x))
        layer.bias = None  # an attribute the plan holds
        assert layer._eager_plan is None and torch.equal(layer(x), general(x))
        layer.values.data = layer.values.data * 2  # new storage behind the same Parameter
        assert torch.equal(layer(x), general(x))
    # With autograd recording, the general path runs and gradients reach the kept values.
    xg = x.clone().requires_grad_()
    layer(xg).float().sum().backward()
    assert layer.values.grad is not None and xg.grad is not None


def test_eager_plan_sees_swapped_tensors_and_trainable_bias():
    # Found in review: torch.func.functional_call swaps tensors through _parameters / _buffers
    # (past __setattr__), a BitFit-style setup trains the bias of a frozen weight, and a wrongly
    # shaped bias or scale must get the general path's error rather than a kernel launch.
    torch.manual_seed(13)
    layer = _simt_layer(None, None)
    x = torch.randn(4, 64).half()
    swapped = {"values": 2 * layer.values.detach(), "bias": torch.zeros_like(layer.bias)}

    def general(inp, values, bias):
        return ops.call(ops._linear, inp, values, layer.metadata, layer._kernel_meta_for("simt"), 64, bias, 0, "simt")

    with torch.no_grad():
        before = layer(x)
        inside = torch.func.functional_call(layer, swapped, (x,))
        assert torch.equal(inside, general(x, swapped["values"], swapped["bias"]))
        assert torch.equal(layer(x), before)  # and nothing of the swap stays behind
    layer.values.requires_grad_(False)
    out = layer(x)
    assert out.requires_grad
    out.float().sum().backward()
    assert layer.bias.grad is not None
    with torch.no_grad():
        layer.bias = nn.Parameter(torch.zeros(16, dtype=torch.float16))
        with pytest.raises(ValueError, match=r"bias must have shape \(32,\)"):
            layer(x)
        layer8 = _simt_layer("int8", None)
        layer8(x)
        layer8.scale = torch.ones(8)
        with pytest.raises(ValueError, match=r"scale"):
            layer8(x)


@pytest.mark.parametrize("activation", [None, "swiglu"])
def test_eager_plan_serves_a_calibrated_int8_layer_and_follows_its_scale(activation):
    # A static INT8 layer's eager calls launch from the plan too (the general path cost it 63 us of
    # Python a call against 12.5 for per-token INT8, bench/host_overhead.py's no-op kernels), with
    # the general path's bits, reading the scale where it lives: an in-place fill is seen at the
    # next call, a new tensor or storage re-plans, a zero is refused as the general path refuses it.
    torch.manual_seed(14)
    layer = _simt_layer("int8", activation)
    layer.set_input_scale(0.03)
    x = torch.randn(5, 64).half()
    x[3, 2] = float("inf")

    def general(inp):
        return quant.linear_int8(inp, layer.sparse_weight(), layer.bias, activation=activation,
                                 input_scale=float(layer.input_scale), backend="simt")

    with torch.no_grad():
        fast = layer(x)
        assert layer._eager_plan is not None and layer._eager_plan.input_scale is layer.input_scale
        torch.testing.assert_close(fast, general(x), rtol=0, atol=0, equal_nan=True)
        assert torch.isnan(fast[3]).all()
        layer.input_scale.fill_(0.5)
        torch.testing.assert_close(layer(x), general(x), rtol=0, atol=0, equal_nan=True)
        layer.input_scale.data = torch.tensor(0.07)
        torch.testing.assert_close(layer(x), general(x), rtol=0, atol=0, equal_nan=True)
        layer.set_input_scale(None)  # per token again
        assert torch.equal(layer(x[:3]), sparsegemm.linear(x[:3], layer.sparse_weight(), layer.bias,
                                                           activation=activation, backend="simt"))
        layer.set_input_scale(0.2)
        layer(x)
        layer.input_scale.zero_()
        with pytest.raises(ValueError, match=r"quantize_activations_static: scale must be finite and positive, "
                                             r"got 0.0"):
            layer(x)
        layer.input_scale = torch.tensor([0.25])  # one element, as the kernels read it: planned
        torch.testing.assert_close(layer(x), general(x), rtol=0, atol=0, equal_nan=True)
        assert layer._eager_plan is not None
        layer.input_scale = torch.tensor(0.25, dtype=torch.float64)  # not as they read it: the general path
        torch.testing.assert_close(layer(x), general(x), rtol=0, atol=0, equal_nan=True)
        assert layer._eager_plan is None
        # Found in review: a .data swap that lands on the planned address with another dtype re-plans
        # rather than launching. Here a float64 of about 1.0 whose first four bytes are the float32
        # 0.5 the plan was made with.
        buf = torch.zeros(1, dtype=torch.float64)
        buf.view(torch.float32)[:] = torch.tensor([0.5, 1.875])  # 1.875: the float64 1.0's high word
        layer.input_scale = buf.view(torch.float32)[0].clone()
        layer.input_scale.data = buf.view(torch.float32)[0]
        layer(x)
        assert layer._eager_plan is not None and float(layer.input_scale) == 0.5
        layer.input_scale.data = buf[0]
        assert abs(float(layer.input_scale) - 1.0) < 1e-6
        torch.testing.assert_close(layer(x), general(x), rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("k", [5, 67])
def test_eager_kernel_path_with_k_not_a_multiple_of_four(k):
    # The 16-bit kernels pad K themselves: the plan serves such layers, with the general path's bits.
    torch.manual_seed(k)
    layer = SparseLinear.from_dense(nn.Linear(k, 24).half(), backend="simt")
    x = torch.randn(3, k).half()
    with torch.no_grad():
        fast = layer(x)
        assert layer._eager_plan is not None
        assert torch.equal(fast, sparsegemm.linear(x, layer.sparse_weight(), layer.bias, backend="simt"))


def test_a_phi3_mlp_left_unfused_has_its_layers_converted():
    # The refused fusion's row is named like the layer (gate_up_proj): the layer pass still takes it.
    torch.manual_seed(15)
    model = nn.Sequential(_Phi3MLP())
    model[0].activation_fn = nn.Tanh()
    report = sparsegemm.sparsify(model, fuse_gated_mlp=True, min_features=32)
    rows = [(row.name, row.kind, row.converted) for row in report.layers]
    assert ("0.gate_up_proj", "Linear (gated)", False) in rows and ("0.gate_up_proj", "Linear", True) in rows
    assert isinstance(model[0].gate_up_proj, SparseLinear)


def test_editing_a_sparse_convolution_geometry_takes_effect_as_on_torch():
    torch.manual_seed(16)
    conv = SparseConv2d.from_dense(nn.Conv2d(8, 8, 3, padding=1))
    x = torch.randn(1, 8, 8, 8)
    conv.stride = (2, 2)  # as nn.Conv2d's forward reads self.stride at every call
    want = nn.functional.conv2d(x, conv.dense_weight(), conv.bias, (2, 2), (1, 1))
    torch.testing.assert_close(conv(x), want, rtol=1e-5, atol=1e-5)
    conv1 = sparsegemm.SparseConv1d.from_dense(nn.Conv1d(8, 8, 3))
    conv1.padding = (1,)
    x1 = torch.randn(1, 8, 2)
    torch.testing.assert_close(conv1(x1), nn.functional.conv1d(x1, conv1.dense_weight(), conv1.bias, 1, 1),
                               rtol=1e-5, atol=1e-5)
    conv1.stride = (0,)
    with pytest.raises(ValueError, match=r"SparseConv1d: stride must be one integer >= 1, got \(0,\)"):
        conv1(x1)


def test_sparsify_moves_a_layers_hooks_to_the_converted_layer():
    # Replaced without them, the hooks were silently never called again (as torch.ao.quantization's
    # swap_module does, they move; the user's handles still remove them).
    torch.manual_seed(17)
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64))
    seen = []
    after = model[0].register_forward_hook(lambda mod, args, out: seen.append(("after", type(mod).__name__)))
    model[2].register_forward_pre_hook(lambda mod, args: seen.append(("before", type(mod).__name__)))
    grads = []
    model[2].register_full_backward_hook(lambda mod, grad_in, grad_out: grads.append(grad_out[0].shape))
    report = sparsegemm.sparsify(model)
    assert [row.note for row in report.layers] == ["hooks moved to the converted module"] * 2
    assert "hooks moved to the converted module" in str(report)
    model(torch.randn(3, 64, requires_grad=True)).sum().backward()
    assert seen == [("after", "SparseLinear"), ("before", "SparseLinear")] and grads == [(3, 64)]
    after.remove()
    seen.clear()
    model(torch.randn(3, 64))
    assert seen == [("before", "SparseLinear")]


def test_sparsify_does_not_fuse_a_gated_mlp_whose_projections_have_hooks():
    torch.manual_seed(19)

    model = nn.Sequential(_GatedBlock())
    seen = []
    model[0].up_proj.register_forward_hook(lambda mod, args, out: seen.append(type(mod).__name__))
    report = sparsegemm.sparsify(model, fuse_gated_mlp=True)
    fused = report.layers[0]
    assert not fused.converted and "up_proj has hooks" in fused.reason
    assert all(isinstance(getattr(model[0], n), SparseLinear) for n in ("gate_proj", "up_proj", "down_proj"))
    seen.clear()
    model(torch.randn(2, 64))
    assert seen == ["SparseLinear"]


def test_a_weight_a_hook_recomputes_is_not_converted():
    # torch.nn.utils.spectral_norm's hook form: after a state-dict load .weight is weight_orig, not
    # weight_orig / sigma (29% off), and converting froze it; torch.nn.utils.prune's hook likewise.
    import torch.nn.utils.prune as torch_prune

    torch.manual_seed(23)
    model = nn.Sequential(nn.utils.spectral_norm(nn.Conv2d(64, 64, 3, padding=1)), nn.Linear(64, 64))
    torch_prune.l1_unstructured(model[1], "weight", 0.3)
    report = sparsegemm.sparsify(model)
    reasons = [row.reason for row in report.layers]
    assert not report.converted
    assert "weight is no parameter and forward pre-hooks (SpectralNorm)" in reasons[0]
    assert "forward pre-hooks (L1Unstructured)" in reasons[1] and "prune.remove" in reasons[1]
    with pytest.raises(ValueError, match="SparseConv2d.from_dense: its weight is no parameter"):
        SparseConv2d.from_dense(model[0])
    with pytest.raises(ValueError, match="SparseLinear.from_dense: its weight is no parameter"):
        SparseLinear.from_dense(model[1])
    assert sparsegemm.prune.prunable_layers(model) == []


def test_sparsify_reports_uninitialized_lazy_layers():
    model = nn.Sequential(nn.LazyConv2d(16, 3), nn.Flatten(), nn.LazyLinear(8))
    report = sparsegemm.sparsify(model)  # raised torch's "uninitialized parameter" error
    assert [(row.shape, row.converted) for row in report.layers] == [((0, 0), False)] * 2
    assert all("uninitialized lazy layer" in row.reason for row in report.layers)
    assert sparsegemm.prune.prunable_layers(model) == []
    model(torch.randn(1, 64, 6, 6))  # materialized: nn.Conv2d and nn.Linear now
    assert len(sparsegemm.sparsify(model, min_features=8).converted) == 2


def test_a_conv_kernel_size_edit_is_refused():
    # nn.Conv2d's weight shape fixes its kernel; here (1, 3) read the (3, 1) weight's K = 24 in
    # another tap order and ran a different convolution, silently.
    layer = SparseConv2d.from_dense(nn.Conv2d(8, 16, (3, 1)), dtype=torch.float32)
    x = torch.randn(1, 8, 6, 6)
    want = layer(x)
    layer.kernel_size = (1, 3)
    for call in (lambda: layer(x), layer.dense_weight):
        with pytest.raises(ValueError, match=r"kernel_size is fixed by the compressed weight, which holds a 3 x 1 "
                                             r"kernel \(K = 24\); kernel_size now says 1 x 3"):
            call()
    layer.kernel_size = [3, 1]  # the same kernel in another form: fine
    assert torch.equal(layer(x), want)


def test_sparse_conv2d_refuses_a_dtype_it_cannot_hold():
    for dtype in (torch.float64, torch.int8):
        with pytest.raises(TypeError, match=r"SparseConv2d: dtype must be one of \(float32, float16, bfloat16\), got"):
            SparseConv2d(8, 8, 3, dtype=dtype)


def test_the_cpu_torch_convolution_path_checks_what_it_hands_cpp():
    # Large M in fp32 takes torch's convolution on the weight decompressed by C++: it checked dtypes
    # only, so a layer on the meta device segfaulted and a metadata of the wrong shape read past it.
    layer = SparseConv2d.from_dense(nn.Conv2d(8, 16, 3, padding=1), dtype=torch.float32)
    x = torch.randn(2, 8, 20, 20)  # 800 output pixels: past CPU_TORCH_CONV_MIN_M
    assert 2 * 20 * 20 >= sparsegemm.nn.CPU_TORCH_CONV_MIN_M
    with torch.inference_mode():
        with pytest.raises(ValueError, match="all tensors must be on one device"):
            layer.to("meta")(x)
        layer = SparseConv2d.from_dense(nn.Conv2d(8, 16, 3, padding=1), dtype=torch.float32)
        layer.metadata = torch.zeros(16, 2, dtype=torch.uint8)
        with pytest.raises(ValueError, match=r"SparseConv2d: meta must be uint8 \[16, 9\] for K = 72"):
            layer(x)


@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_double_backward_reaches_the_kept_values(kind):
    # A gradient penalty with the weights trained (WGAN-GP, R1): d/d values of |d out / d x|^2 went
    # through the backward's decompress, which had no autograd formula.
    torch.manual_seed(29)
    if kind == "linear":
        layer = SparseLinear.from_dense(nn.Linear(32, 16), dtype=torch.float32)
        x = torch.randn(4, 32)
        dense = lambda x, w: nn.functional.linear(x, w, layer.bias.double())  # noqa: E731
    else:
        layer = SparseConv2d.from_dense(nn.Conv2d(8, 16, 3, padding=1), dtype=torch.float32)
        x = torch.randn(2, 8, 5, 5)
        dense = lambda x, w: nn.functional.conv2d(x, w, layer.bias.double(), padding=1)  # noqa: E731

    def penalty_grad(forward, x, weight):
        x = x.clone().requires_grad_(True)
        (grad_x,) = torch.autograd.grad(torch.tanh(forward(x)).sum(), x, create_graph=True)
        return torch.autograd.grad(grad_x.square().sum(), weight)[0]

    got = penalty_grad(layer, x, layer.values)
    w = layer.dense_weight().double().detach().requires_grad_(True)
    want_dense = penalty_grad(lambda x: dense(x, w), x.double(), w)
    if kind == "conv":  # the GEMM's [Cout, (ky, kx, cin)] order, as the values are kept
        want_dense = want_dense.permute(0, 2, 3, 1).reshape(16, -1)
    want = want_dense.gather(1, ops.kept_columns(layer.metadata, layer.weight_shape[1]))
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-4 * float(want.abs().max()))


def test_report_reads_exact_tensor_bytes_and_whole_names(tmp_path):
    # Dtypes outside a table of sizes counted 4 bytes an element; names past 40 characters were cut,
    # so two layers printed the same name.
    from sparsegemm.io import describe

    class Deep(nn.Module):
        def __init__(self):
            super().__init__()
            self.encoder_layers_31_self_attention_out_projection_a = nn.Linear(64, 64)
            self.encoder_layers_31_self_attention_out_projection_b = nn.Linear(64, 64)
            self.register_buffer("codes", torch.zeros(1000, dtype=torch.float8_e4m3fn))
            self.register_buffer("ids", torch.zeros(1000, dtype=torch.uint16))

    model = Deep()
    sparsegemm.sparsify(model)
    sparsegemm.save(model, tmp_path / "deep.safetensors")
    listing = describe(tmp_path / "deep.safetensors")
    assert "encoder_layers_31_self_attention_out_projection_a SparseLinear" in listing
    assert "encoder_layers_31_self_attention_out_projection_b SparseLinear" in listing
    biases = 2 * 64 * 4
    assert f"other tensors {1000 + 2000 + biases:,} bytes" in listing
    with pytest.raises(ValueError, match="is a directory, not a checkpoint file"):
        describe(tmp_path)


@pytest.mark.parametrize("edit, message", [
    ({"kind": "SparseLinearX"}, "has an unknown kind 'SparseLinearX'"),
    ({"in_features": -64}, "needs in_features, out_features as counts, got {'in_features': -64, 'out_features': 64}"),
    ({"dtype": "int8"}, "has dtype 'int8', expected one of float16, bfloat16, float32"),  # sized at 1 byte
])
def test_report_refuses_a_module_table_it_cannot_size(edit, message, tmp_path):
    # Both printed figures and exited 0; a negative size changed the totals.
    import json

    from sparsegemm.io import describe

    path = tmp_path / "m.safetensors"
    sparsegemm.sparsify(model := nn.Sequential(nn.Linear(64, 64)), min_features=8)
    sparsegemm.save(model, path)
    table = json.loads(_header(path)["converted"])
    table["0"].update(edit)
    odd = tmp_path / "odd.safetensors"
    _resave(path, odd, None, {"converted": json.dumps(table)})
    with pytest.raises(ValueError, match=re.escape(message)):
        describe(odd)


def test_save_writes_tensors_in_place_and_copies_only_those_sharing_a_storage(tmp_path, monkeypatch):
    # save copied every tensor (a second compressed model's worth of memory while saving); now only
    # tensors safetensors would refuse (views of one storage) are, and the file is the same.
    model = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 32))
    sparsegemm.sparsify(model, min_features=8)
    table = torch.arange(12.0)
    model.register_buffer("first", table[:6])  # two views of one storage
    model.register_buffer("second", table[6:])
    clones = []
    real_clone = torch.Tensor.clone
    monkeypatch.setattr(torch.Tensor, "clone", lambda t, *a, **kw: clones.append(tuple(t.shape)) or
                        real_clone(t, *a, **kw))
    sparsegemm.save(model, tmp_path / "m.safetensors")
    monkeypatch.undo()
    assert sorted(clones) == [(6,), (6,)]
    fresh = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 32))
    fresh.register_buffer("first", torch.zeros(6))
    fresh.register_buffer("second", torch.zeros(6))
    loaded = sparsegemm.load(tmp_path / "m.safetensors", fresh)
    assert torch.equal(loaded.first, table[:6]) and torch.equal(loaded.second, table[6:])
    x = torch.randn(3, 64)
    assert torch.equal(loaded(x), model(x))


def test_an_int8_layers_dense_size_is_one_figure_everywhere(tmp_path):
    # A bias-less INT8 layer was sized as dense int8 in its repr and as fp16 in the checkpoint, where
    # sparsify's report (and the same layer with a bias) used the float dtype it was made in.
    from sparsegemm.io import describe

    model = nn.Sequential(nn.Linear(128, 64, bias=False), nn.Linear(128, 64))
    report = sparsegemm.sparsify(model, quantize="int8", min_features=8)
    assert [row.dense_bytes for row in report.layers] == [64 * 128 * 4] * 2
    assert all(layer.dense_dtype() == torch.float32 for layer in model)
    assert str(model[0]).split(", ")[-1] == str(model[1]).split(", ")[-1] == "5376 bytes (27392 saved vs dense))"
    sparsegemm.save(model, tmp_path / "q.safetensors")
    rows = [line.split() for line in describe(tmp_path / "q.safetensors").splitlines()[1:3]]
    assert [row[-3] for row in rows] == ["32,768", "32,768"]
    model.half()  # the float dtype follows a conversion, as the bias does
    assert [layer.dense_dtype() for layer in model] == [torch.float16] * 2
    loaded = sparsegemm.load(tmp_path / "q.safetensors", nn.Sequential(nn.Linear(128, 64, bias=False),
                                                                        nn.Linear(128, 64)))
    assert loaded[0].dense_dtype() == torch.float32


def test_a_converted_layer_takes_its_input_by_nn_linears_keyword():
    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(64, 64)

        def forward(self, x):
            return self.fc(input=x)  # SparseLinear.forward's argument was x: TypeError

    model = Model()
    x = torch.randn(2, 64)
    sparsegemm.sparsify(model)
    assert torch.equal(model(x), model.fc(x))


def test_a_one_tap_side_dilated_does_not_crash_the_cpu_convolution(tmp_path):
    # torch 2.13's CPU convolution segfaults on this channels_last input one pixel wide with a
    # dilated one-tap kernel side, which the large-M path handed it as is: run in a child process.
    code = """
import torch, torch.nn as nn, sparsegemm
torch.manual_seed(0)
conv = nn.Conv2d(5, 40, (3, 1), stride=2, padding=(1, 3), dilation=(2, 3)).bfloat16()
layer = sparsegemm.SparseConv2d.from_dense(conv)
x = torch.randn(64, 5, 11, 1).bfloat16()
with torch.inference_mode():
    got = layer(x.contiguous(memory_format=torch.channels_last))
    want = nn.functional.conv2d(x.float(), layer.dense_weight().float(), layer.bias.float(), 2, (1, 3), (2, 3))
print(tuple(got.shape), float((got.float() - want).abs().max() / want.abs().max()))
"""
    import sys

    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path,
                            env={**os.environ, "PYTHONPATH": os.path.dirname(os.path.dirname(sparsegemm.__file__))})
    assert result.returncode == 0, result.stderr[-2000:]
    shape, error = result.stdout.split(") ")
    assert shape == "(64, 40, 5, 4" and float(error) < 2e-2


def test_modules_pickled_before_float_dtype_the_kernel_and_the_dense_shape_were_kept_still_work():
    import io

    layers = [SparseLinear.from_dense(nn.Linear(16, 16, bias=False), quantize="int8"),
              SparseConv2d.from_dense(nn.Conv2d(8, 8, (3, 1))), sparsegemm.SparseConv1d.from_dense(nn.Conv1d(8, 8, 3))]
    inputs = [torch.randn(2, 16), torch.randn(2, 8, 6, 6), torch.randn(2, 8, 6)]
    for layer, x in zip(layers, inputs):
        want = layer(x.to(layer.bias.dtype if layer.bias is not None else x.dtype))
        layer.__dict__.pop("float_dtype")
        layer.__dict__.pop("_weight_kernel", None)
        shape = layer._buffers.pop("dense_shape", None)
        buffer = io.BytesIO()
        torch.save(layer, buffer)
        buffer.seek(0)
        loaded = torch.load(buffer, weights_only=False)  # .to() and forward raised AttributeError
        assert torch.equal(loaded.to("cpu")(x.to(want.dtype)), want)
        if shape is not None:
            assert torch.equal(loaded.dense_shape, shape)


def test_a_weight_held_as_a_buffer_converts():
    layer = nn.Linear(64, 64)
    weight = layer.weight.detach().clone()
    del layer.weight
    layer.register_buffer("weight", weight)
    sparse = SparseLinear.from_dense(layer)  # no hook recomputes it: nothing stale to refuse
    assert torch.equal(sparse.dense_weight(), sparsegemm.prune_2to4(weight))


def test_int8_layers_survive_to_empty():
    layer = SparseLinear.from_dense(nn.Linear(16, 16), quantize="int8").to("meta").to_empty(device="cpu")
    assert layer.scale.device.type == "cpu" and layer.scale.dtype == torch.float32


def test_hooks_on_an_attentions_out_proj_stay_uncalled():
    # nn.MultiheadAttention reads out_proj's weight and never calls it: its hooks never ran, and
    # moved to the converted attention's out_proj they changed the output.
    torch.manual_seed(37)
    layer = nn.TransformerEncoderLayer(64, 4, 128, dropout=0.0, batch_first=True).eval()
    layer.self_attn.out_proj.register_forward_hook(lambda mod, args, out: out * 0.5)
    x = torch.randn(2, 5, 64)
    with torch.no_grad():  # exactly 2:4 already: sparsify changes nothing but the modules
        for name, param in layer.named_parameters():
            if param.dim() == 2:
                param.copy_(sparsegemm.prune_2to4(param))
    with torch.no_grad():
        want = layer(x)
        sparsegemm.sparsify(layer)
        assert torch.allclose(layer(x), want, atol=1e-4)


def test_sparse_tensor_shape_takes_integers_of_any_kind():
    sw = sparsegemm.compress(torch.randn(16, 32), prune=True)
    for shape in (torch.tensor([16, 32]), (torch.tensor(16), torch.tensor(32)), np.array([16, 32]), (np.int64(16), 32)):
        assert sparsegemm.SparseTensor24(sw.values, sw.meta, shape).shape == (16, 32)


def test_an_in_place_metadata_edit_under_inference_mode_is_seen(tmp_path):
    # Metadata made under torch.inference_mode was an inference tensor, with no version counter: the
    # cached kernel layout survived an in-place edit, and the emulator (and CUDA) computed with the old
    # metadata and the new values.
    torch.manual_seed(41)
    x = torch.randn(3, 64).half()
    with torch.inference_mode():
        sw, other = (sparsegemm.compress(torch.randn(32, 64).half(), prune=True) for _ in range(2))
        sparsegemm.linear(x, sw, backend="simt")
        sw.values.copy_(other.values)
        sw.meta.copy_(other.meta)
        assert torch.equal(sparsegemm.linear(x, sw, backend="simt"), sparsegemm.linear(x, other, backend="simt"))
        layer, twin = (SparseLinear.from_dense(nn.Linear(64, 32).half(), backend="simt") for _ in range(2))
        layer(x)
        for name in ("values", "metadata", "bias"):
            getattr(layer, name).copy_(getattr(twin, name))
        assert torch.equal(layer(x), twin(x))
        model = nn.Sequential(nn.Linear(64, 64))
        sparsegemm.sparsify(model)
        sparsegemm.save(model, tmp_path / "m.safetensors")
        with sparsegemm.init_empty_weights():
            shell = nn.Sequential(nn.Linear(64, 64))
        loaded = sparsegemm.load(tmp_path / "m.safetensors", shell, device="cpu")  # assigned tensors
        assert not loaded[0].metadata.is_inference()


def test_save_refuses_a_conv_whose_kernel_size_was_edited(tmp_path):
    # It recorded the edited kernel: neither the original architecture nor the edited one loaded it.
    model = nn.Sequential(nn.Conv2d(16, 64, 3, padding=1))
    sparsegemm.sparsify(model, min_features=16)
    model[0].kernel_size = (5, 5)
    with pytest.raises(ValueError, match="kernel_size is fixed by the compressed weight, which holds a 3 x 3"):
        sparsegemm.save(model, tmp_path / "k.safetensors")


def test_a_model_loaded_under_inference_mode_can_train_afterwards(tmp_path):
    # The layers load made inside the block held inference tensors: "Inference tensors cannot be
    # saved for backward" at the first training step.
    build = lambda: nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 64))  # noqa: E731
    model = build()
    sparsegemm.sparsify(model)
    sparsegemm.save(model, tmp_path / "m.safetensors")
    for shell in (False, True):
        if shell:
            with sparsegemm.init_empty_weights():
                fresh = build()
        else:
            fresh = build()
        with torch.inference_mode():
            loaded = sparsegemm.load(tmp_path / "m.safetensors", fresh, device="cpu" if shell else None)
        assert not any(t.is_inference() for t in (*loaded.parameters(), *loaded.buffers()))
        loaded(torch.randn(2, 64)).sum().backward()
        assert loaded[0].values.grad is not None


def test_a_layer_validated_under_inference_mode_on_the_kernel_path_trains_afterwards():
    # The kernel-layout metadata reordered in an inference-mode call (a validation pass) was cached as
    # an inference tensor, and every training step after it failed ("Inference tensors cannot be
    # saved for backward"); the emulator runs the CUDA path.
    torch.manual_seed(0)
    for layer, x in ((SparseLinear.from_dense(nn.Linear(32, 16), dtype=torch.float16, backend="simt"),
                      torch.randn(2, 32, dtype=torch.float16)),
                     (SparseConv2d.from_dense(nn.Conv2d(8, 16, 3, padding=1), dtype=torch.float16, backend="simt"),
                      torch.randn(1, 8, 4, 4, dtype=torch.float16))):
        with torch.inference_mode():
            validated = layer(x)
        trained = layer(x)
        trained.float().sum().backward()
        assert torch.equal(trained.detach(), validated) and layer.values.grad is not None


def test_a_model_sparsified_under_inference_mode_can_train_afterwards():
    # The layers sparsify made inside the block held inference tensors ("Inference tensors cannot be
    # saved for backward" at the first training step), as load's once did.
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64))
    with torch.inference_mode():
        report = sparsegemm.sparsify(model, quantize=None)
    assert len(report.converted) == 2
    assert not any(t.is_inference() for t in (*model.parameters(), *model.buffers()))
    model(torch.randn(2, 64)).sum().backward()
    assert model[0].values.grad is not None
    with torch.inference_mode():  # built there, masked: reading the masked weight recorded no graph
        masked = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 64))
        sparsegemm.prune.prune_one_shot(masked, filter_fn=lambda name, _: name == "0")
        report = sparsegemm.sparsify(masked)
    assert [row.converted for row in report.layers] == [False, True] and "remove_masks" in report.layers[0].reason


def test_a_model_built_under_inference_mode_loads_there(tmp_path):
    # Its dense layers hold inference tensors, which load's copies made outside inference mode could
    # not write ("Inplace update to inference tensor outside InferenceMode"); torch's own
    # load_state_dict works there.
    build = lambda: nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 8))  # noqa: E731
    model = build()
    report = sparsegemm.sparsify(model)
    assert [row.converted for row in report.layers] == [True, False]  # the last stays dense (8 < 64)
    sparsegemm.save(model, tmp_path / "m.safetensors")
    x = torch.randn(2, 64)
    with torch.inference_mode():
        loaded = sparsegemm.load(tmp_path / "m.safetensors", build())
        assert torch.equal(loaded(x), model(x))
    assert loaded[2].weight.is_inference() and not loaded[0].values.is_inference()


def test_layers_converted_in_an_eval_model_are_in_eval_mode_too(tmp_path):
    # A freshly made module is in training mode: converted layers of an eval model were the ones
    # left training (and an attention's dropout would have run).
    def build():
        return nn.Sequential(nn.Conv1d(64, 64, 1), nn.Flatten(0), nn.Unflatten(0, (1, 64)), _GatedBlock(),
                             nn.MultiheadAttention(64, 4, dropout=0.5, batch_first=True), nn.Linear(64, 64))

    torch.manual_seed(29)
    for mode in (False, True):
        model = build().train(mode)
        report = sparsegemm.sparsify(model, fuse_gated_mlp=True)
        assert {row.kind for row in report.layers if row.converted} >= {"Conv1d", "Linear", "MultiheadAttention"}
        assert all(module.training is mode for module in model.modules())
    path = tmp_path / "eval.safetensors"
    sparsegemm.save(model.eval(), path)
    loaded = sparsegemm.load(path, build().eval())
    assert not any(module.training for module in loaded.modules())


def test_a_tensor_left_on_the_meta_device_is_refused_not_read():
    # With one operand on meta, torch dispatches the whole call to the op's fake implementation
    # (whose checks the real one's are): it returned an uninitialised CPU tensor as the result.
    dense = SparseLinear.from_dense(nn.Linear(64, 32), dtype=torch.float32)
    state = {key: value for key, value in dense.state_dict().items() if key != "metadata"}
    with torch.device("meta"):
        shell = SparseLinear(64, 32, dtype=torch.float32)
    shell.load_state_dict(state, strict=False, assign=True)  # metadata missing: still on meta
    with pytest.raises(ValueError, match=r"sparsegemm.linear: all tensors must be on one device, got x on cpu, "
                                         r"values on cpu, meta on meta, bias on cpu"):
        shell(torch.randn(2, 64))
    conv = SparseConv2d.from_dense(nn.Conv2d(16, 32, 3), dtype=torch.float32)
    conv.metadata = torch.empty_like(conv.metadata, device="meta")
    with pytest.raises(ValueError, match=r"sparsegemm\.(conv2d|linear): all tensors must be on one device, "
                                         r".*meta on meta"):
        conv(torch.randn(1, 16, 8, 8))
    # x on meta: autocast's check raised torch's "unknown device type for autocast" first.
    for layer, x in ((SparseLinear.from_dense(nn.Linear(64, 32)), torch.randn(3, 64)),
                     (SparseConv2d.from_dense(nn.Conv2d(16, 32, 3)), torch.randn(1, 16, 8, 8))):
        with pytest.raises(ValueError, match=r"the tensors are on the meta device, which holds no data to compute with"):
            layer.to("meta")(x.to("meta"))


def test_load_state_dict_refuses_a_weight_validate_refuses():
    # Illegal nibbles loaded silently (the CPU backend then computed with whatever they selected,
    # a GPU would be undefined); sparsegemm.load and validate() refused the same tensors.
    layer = SparseLinear.from_dense(nn.Linear(32, 16), dtype=torch.float32)
    state = layer.state_dict()
    kept = {key: value.clone() for key, value in state.items()}
    state["metadata"] = torch.full_like(state["metadata"], 0xFF)
    state["values"] = state["values"] + 1
    with pytest.raises(RuntimeError, match=r"the state dict's compressed weight for the layer: corrupt metadata at "
                                           r"row 0, group 0: nibble 0xF"):
        layer.load_state_dict(state)
    # Refused, not loaded: a caller that catches the error keeps the layer it had.
    assert all(torch.equal(value, kept[key]) for key, value in layer.state_dict().items())
    model = nn.Sequential(SparseLinear.from_dense(nn.Linear(32, 16), quantize="int8"),
                          SparseConv2d.from_dense(nn.Conv2d(16, 16, 3)))
    good = {key: value.clone() for key, value in model.state_dict().items()}
    int8 = good["0.values"].clone()
    int8[0, 0] = -128
    for key, bad, message in (
            ("0.scale", torch.zeros(16), r"compressed weight for layer '0': scale must be finite and positive, got "
                                         r"0.0 at index 0"),
            ("0.values", int8, r"compressed weight for layer '0': int8 values must lie in \[-127, 127\]"),
            ("0.values", good["0.values"].half(), r"layer '0': values are torch.float16, the layer's torch.int8: an "
                                                  r"INT8 layer loads int8 values"),
            ("1.values", torch.zeros(16, 72, dtype=torch.int8), r"layer '1': values are torch.int8, the layer's "
                                                                 r"torch.float32: build it with quantize='int8'"),
            ("1.metadata", torch.zeros_like(good["1.metadata"]), r"compressed weight for layer '1': corrupt metadata"),
            # Not uint8: torch cast it (zeros, and values past a byte wrapped) without the nibble check.
            ("1.metadata", torch.zeros_like(good["1.metadata"], dtype=torch.int32),
             r"layer '1': metadata must be uint8 \(2-bit indices, four a byte\), got torch.int32")):
        with pytest.raises(RuntimeError, match=message):
            model.load_state_dict({**good, key: bad})
    model.load_state_dict(good)  # and a valid one, loaded whole or in part, in another float dtype
    assert model.load_state_dict({"1.bias": good["1.bias"]}, strict=False).missing_keys
    model.load_state_dict({**good, "1.values": good["1.values"].double()})


def test_load_state_dict_refuses_a_layer_with_more_input_features_of_the_same_storage():
    # K = 64 and K = 62 store the same [N, 32] values and [N, 8] metadata: a 64-feature layer's state
    # dict loaded into a 62-feature one silently, dropping columns 62 and 63 (outputs 0.2 off). A
    # 62-feature weight keeps only zeros in its padding, which such a state dict almost never does.
    torch.manual_seed(0)
    wide = SparseLinear.from_dense(nn.Linear(64, 32), dtype=torch.float32)
    narrow = SparseLinear.from_dense(nn.Linear(62, 32), dtype=torch.float32)
    with pytest.raises(RuntimeError, match=r"compressed weight for the layer: row \d+ keeps a nonzero value in the "
                                           r"zero padding of K = 62 \(columns 62 .. 63\): a weight made for 64 input"):
        narrow.load_state_dict(wide.state_dict())
    for k in (62, 63, 61):  # and a state dict of its own size loads, INT8 too
        for quantize in (None, "int8"):
            layer = SparseLinear.from_dense(nn.Linear(k, 32), quantize=quantize)
            SparseLinear(k, 32, dtype=torch.float32, quantize=quantize).load_state_dict(layer.state_dict())


def test_load_state_dict_checks_only_what_it_can_read():
    # The check read the layer's own tensors for those a state dict leaves out: a partial state dict
    # on another device, or a layer whose metadata is parametrized, failed to load.
    layer = SparseLinear.from_dense(nn.Linear(32, 16), dtype=torch.float32)
    state = layer.state_dict()

    class Same(nn.Module):
        def forward(self, meta):
            return meta

    nn.utils.parametrize.register_parametrization(layer, "metadata", Same())
    layer.load_state_dict(layer.state_dict())
    layer.load_state_dict({"values": state["values"], "bias": state["bias"]}, strict=False)
    with torch.device("meta"):
        shell = SparseLinear(32, 16, dtype=torch.float32)
    shell.load_state_dict({key: value.to("meta") for key, value in state.items()})  # nothing to read


def test_save_refuses_a_converted_layer_with_parametrized_tensors(tmp_path):
    # Saved, its state dict's parametrizations.bias.original could never be loaded into a fresh
    # model ("missing ['0.bias']"): the file was useless.
    class Double(nn.Module):
        def forward(self, t):
            return 2 * t

    model = nn.Sequential(SparseLinear.from_dense(nn.Linear(32, 16)))
    nn.utils.parametrize.register_parametrization(model[0], "bias", Double())
    with pytest.raises(ValueError, match=r"sparsegemm.save: module '0' has parametrized tensors \(bias\), which a "
                                         r"fresh model cannot load: remove them first"):
        sparsegemm.save(model, tmp_path / "p.safetensors")
    assert not (tmp_path / "p.safetensors").exists()
    nn.utils.parametrize.remove_parametrizations(model[0], "bias")
    sparsegemm.save(model, tmp_path / "p.safetensors")
    x = torch.randn(2, 32)
    assert torch.equal(sparsegemm.load(tmp_path / "p.safetensors", nn.Sequential(nn.Linear(32, 16)))(x), model(x))


def test_save_takes_the_model_inside_ddp_or_compile_wrappers_and_refuses_flat_shards(tmp_path):
    # save(DDP(model)) or save(torch.compile(model)) wrote keys under module. / _orig_mod., which no
    # bare model loads; FSDP1's flat shards made a file that failed only when loaded.
    torch.manual_seed(32)
    model = nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 16))
    sparsegemm.sparsify(model, dtype=torch.float32, min_features=8)
    x = torch.randn(2, 32)
    for wrapped in (nn.DataParallel(model), torch.compile(model)):
        sparsegemm.save(wrapped, tmp_path / "w.safetensors")
        assert set(json.loads(_header(tmp_path / "w.safetensors")["converted"])) == {"0", "2"}
        fresh = nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 16))
        assert torch.equal(sparsegemm.load(tmp_path / "w.safetensors", fresh)(x), model(x))
        compiled = torch.compile(nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 16)))
        assert sparsegemm.load(tmp_path / "w.safetensors", compiled) is compiled
        assert torch.equal(compiled._orig_mod(x), model(x))
    model[2].values = nn.Parameter(model[2].values.detach().reshape(-1))  # a flat shard, as FSDP1 leaves it
    with pytest.raises(ValueError, match=r"sparsegemm.save: module '2' does not hold a whole compressed weight "
                                         r"\(SparseTensor24: values must have shape \(16, 16\).*FullyShardedDataParallel"):
        sparsegemm.save(model, tmp_path / "flat.safetensors")
    assert not (tmp_path / "flat.safetensors").exists()


def test_load_of_a_plain_state_dict_file_names_the_way_to_load_it(tmp_path):
    # save_pretrained (every transformers Trainer checkpoint) writes the state dict without the
    # module table; load refused it without saying what the file is or how to load it.
    from safetensors.torch import load_file, save_file

    torch.manual_seed(33)
    model = nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 16))
    sparsegemm.sparsify(model, dtype=torch.float32, min_features=8)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, tmp_path / "sd.safetensors")
    with pytest.raises(ValueError, match=r"not a sparsegemm checkpoint .* as save_pretrained and transformers' "
                                         r"Trainer write it: build the model, sparsify it as before, then "
                                         r"model.load_state_dict\(safetensors.torch.load_file\(path\)\)"):
        sparsegemm.load(tmp_path / "sd.safetensors", nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 16)))
    fresh = nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 16))
    sparsegemm.sparsify(fresh, dtype=torch.float32, min_features=8)
    fresh.load_state_dict(load_file(tmp_path / "sd.safetensors"))  # the way it names
    x = torch.randn(2, 32)
    assert torch.equal(fresh(x), model(x))


def test_module_type_casts_only_what_a_dtype_change_may():
    # nn.Module.type casts every tensor: the metadata became float16 (and INT8 values too), a layer
    # no op took ("meta must be uint8 ...").
    torch.manual_seed(31)
    model = nn.Sequential(SparseLinear.from_dense(nn.Linear(32, 16), dtype=torch.float32),
                          SparseLinear.from_dense(nn.Linear(16, 16), quantize="int8"),
                          SparseConv2d.from_dense(nn.Conv2d(16, 16, 1), dtype=torch.float32))
    x = torch.randn(2, 32)
    import copy

    want = copy.deepcopy(model[:2]).half()(x.half())
    model.type(torch.float16)
    dtypes = {key: value.dtype for key, value in model.state_dict().items()}
    assert {key: dtype for key, dtype in dtypes.items() if not dtype.is_floating_point} == {
        "0.metadata": torch.uint8, "1.values": torch.int8, "1.metadata": torch.uint8, "2.metadata": torch.uint8,
        "2.dense_shape": torch.int64}
    assert dtypes["1.scale"] == torch.float32 and dtypes["0.values"] == dtypes["2.values"] == torch.float16
    assert torch.equal(model[:2](x.half()), want)


def test_load_refuses_a_dense_layer_of_another_dtype_and_sparsify_sizes_by_the_smaller_side(tmp_path):
    # load compares every tensor's dtype with the model's, the dense layers' too (load_state_dict
    # would cast an fp32 checkpoint into an fp16 layer silently).
    model = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 8))
    sparsegemm.sparsify(model)  # the second stays dense: min(N, K) = 8
    sparsegemm.save(model, tmp_path / "m.safetensors")
    with pytest.raises(ValueError, match=r"tensor '1.weight' is torch.float32 \(8, 64\) in the checkpoint, the "
                                         r"model expects torch.float16 \(8, 64\)"):
        sparsegemm.load(tmp_path / "m.safetensors", nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 8).half()))
    for shape in ((8, 256), (256, 8)):
        report = sparsegemm.sparsify(nn.Sequential(nn.Linear(*shape)), min_features=64)
        assert report.layers[0].reason == "min(N, K) = 8 < min_features = 64"


def test_load_state_dict_says_what_a_state_dict_of_another_kind_of_layer_means():
    # torch's missing / unexpected keys alone left the user to guess. A warning: a load with
    # strict=False, which ignores those keys, must not fail.
    dense = nn.Sequential(nn.Linear(64, 64))
    state = dense.state_dict()
    sparsegemm.sparsify(dense)
    with pytest.warns(UserWarning, match=r"layer '0' holds a compressed weight, the state dict a dense one "
                                         r"\(0.weight\), which it does not load: load it into the dense model"):
        with pytest.raises(RuntimeError, match=r"Unexpected key\(s\) in state_dict: \"0.weight\""):
            dense.load_state_dict(state)
    with pytest.warns(UserWarning, match="holds a compressed weight"):
        assert "0.weight" in dense.load_state_dict(state, strict=False).unexpected_keys
    static = nn.Sequential(nn.Linear(64, 64))
    sparsegemm.sparsify(static, quantize="int8")
    static[0].set_input_scale(0.1)
    dynamic = nn.Sequential(nn.Linear(64, 64))
    sparsegemm.sparsify(dynamic, quantize="int8")
    with pytest.warns(UserWarning, match=r"layer '0' quantizes its inputs per token, the state dict holds a static "
                                         r"input_scale, which it does not load: call set_input_scale"):
        with pytest.raises(RuntimeError, match=r"Unexpected key\(s\) in state_dict: \"0.input_scale\""):
            dynamic.load_state_dict(static.state_dict())
    dynamic[0].set_input_scale(1.0)
    dynamic.load_state_dict(static.state_dict())
    assert float(dynamic[0].input_scale) == pytest.approx(0.1)


@pytest.mark.parametrize("how", ["averaged_model", "state_dict_loop"])
def test_an_ema_over_every_buffer_that_breaks_the_metadata_is_refused_at_the_next_call(how):
    # An EMA of a model onto itself (decay 0.9) computes p * 0.9 + p * 0.1 in float for the uint8
    # metadata and truncates it (217 -> 216): the forward then read nibbles no kernel defines and
    # gave outputs up to 0.8 off, silently. The copy is checked once after an in-place change.
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 64))
    sparsegemm.sparsify(model, min_features=8)
    x = torch.randn(4, 256)
    if how == "averaged_model":
        ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.9), use_buffers=True)
        ema(x)  # a call before the updates: the check is of what changes after it, too
        ema.update_parameters(model)
        ema.update_parameters(model)
        layer = ema.module[0]
    else:
        ema = copy.deepcopy(model)  # its first call comes after the edit
        with torch.no_grad():
            for key, value in ema.state_dict().items():
                value.copy_(value * 0.9 + model.state_dict()[key] * 0.1)
        layer = ema[0]
    assert not torch.equal(layer.metadata, model[0].metadata)
    with pytest.raises(ValueError, match=r"SparseLinear: its metadata buffer was changed in place and is no longer "
                                         r"2:4 \(average only floating-point tensors"):
        ema(x)


def test_a_valid_in_place_metadata_change_runs_and_a_load_is_not_checked_twice(monkeypatch):
    torch.manual_seed(1)
    a, b = (SparseLinear.from_dense(nn.Linear(64, 32)) for _ in range(2))
    x = torch.randn(3, 64)
    a(x)
    with torch.no_grad():
        a.metadata.copy_(b.metadata)
        a.values.copy_(b.values)
        a.bias.copy_(b.bias)
    assert torch.equal(a(x), b(x))
    checks = []
    check = sparsegemm.nn.check_metadata
    monkeypatch.setattr(sparsegemm.nn, "check_metadata",
                        lambda op, *args: (checks.append(op), check(op, *args)))
    a.load_state_dict(b.state_dict())  # checked once, by the load, not again at the call
    a(x)
    assert len(checks) == 1 and checks[0].startswith("the state dict's")
    with torch.no_grad():
        a.metadata.add_(0)
    a(x)
    assert len(checks) == 2 and checks[1].startswith("SparseLinear: its metadata buffer was changed in place")
