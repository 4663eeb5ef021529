"""custom_op registration: opcheck on the CPU, and torch.compile(fullgraph=True) of linear."""
import warnings

import pytest
import torch
from torch import nn

import sparsegemm
from sparsegemm import SparseConv2d, SparseLinear, ops, quant
from conftest import sparse_weight


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_opcheck_all_ops(dtype):
    w = sparse_weight(16, 24, dtype=dtype)
    sw = sparsegemm.compress(w)
    x = torch.randn(5, 24).to(dtype)
    bias = torch.randn(16).to(dtype)
    torch.library.opcheck(ops._mask_2to4, (w,))
    torch.library.opcheck(ops._compress, (w, False, "cpu"))
    torch.library.opcheck(ops._decompress, (sw.values, sw.meta, 24, "cpu"))
    torch.library.opcheck(ops._linear, (x, sw.values, sw.meta, None, 24, bias, 2, "cpu"))
    torch.library.opcheck(ops._linear, (x, sw.values, sw.meta, None, 24, None, 0, "cpu"))
    xg = x.clone().requires_grad_()
    vg = sw.values.clone().requires_grad_()
    torch.library.opcheck(ops._linear, (xg, vg, sw.meta, None, 24, bias.clone().requires_grad_(), 3, "cpu"))
    # Gated (SwiGLU code 19): the fake and real outputs have N / 2 columns.
    torch.library.opcheck(ops._linear, (xg, vg, sw.meta, None, 24, bias.clone().requires_grad_(), 19, "cpu"))


@pytest.mark.parametrize("weight", ["bf16", "int8"])
@pytest.mark.parametrize("activation", ["silu", "swiglu"])
def test_compile_fullgraph_matches_eager(weight, activation):
    torch._dynamo.reset()
    w = sparse_weight(32, 64, dtype=torch.bfloat16)
    sw = sparsegemm.compress(w) if weight == "bf16" else quant.quantize_weight(w)
    bias = torch.randn(32).to(torch.bfloat16)

    def layer(x):
        return sparsegemm.linear(x, sw, bias, activation=activation) * 2.0

    compiled = torch.compile(layer, fullgraph=True, backend="inductor")
    for m in (3, 9):
        x = torch.randn(m, 64).to(torch.bfloat16)
        assert torch.equal(compiled(x), layer(x))


def _gated(act):
    """act(gate) * up on pre-activations whose columns alternate gate / up in runs of 8."""
    def apply(z):
        gate, up = sparsegemm.format.split_gate_up(z.T)
        return (act(gate) * up).T
    return apply


@pytest.mark.parametrize("activation", [None, "relu", "gelu", "silu", "reglu", "geglu", "swiglu"])
def test_autograd_matches_dense_masked_oracle(activation):
    gen = torch.Generator().manual_seed(11)
    n = 48 if activation in sparsegemm.format.GATED_ACTIVATIONS else 12  # gated: three runs of 8 + 8 rows
    w = torch.randn(n, 22, generator=gen, dtype=torch.float64).float()
    sw = sparsegemm.compress(w, prune=True)
    values = sw.values.clone().requires_grad_()
    x = torch.randn(5, 22, generator=gen).requires_grad_()
    bias = torch.randn(n, generator=gen).requires_grad_()
    acts = {None: lambda t: t, "relu": torch.relu, "gelu": torch.nn.functional.gelu, "silu": torch.nn.functional.silu}
    acts.update({name: _gated(acts[base]) for name, base in sparsegemm.format.GATED_ACTIVATIONS.items()})
    y = sparsegemm.linear(x, sparsegemm.SparseTensor24(values, sw.meta, sw.shape), bias, activation=activation)
    gy = torch.randn_like(y)
    gx, gv, gb = torch.autograd.grad(y, (x, values, bias), gy)

    wd = sparsegemm.decompress(sw).double().requires_grad_()
    x64, b64 = x.detach().double().requires_grad_(), bias.detach().double().requires_grad_()
    y64 = acts[activation](x64 @ wd.T + b64)
    rx, rw, rb = torch.autograd.grad(y64, (x64, wd, b64), gy.double())
    assert torch.allclose(gx.double(), rx, atol=1e-4)
    assert torch.allclose(gb.double(), rb, atol=1e-4)
    padded = torch.nn.functional.pad(rw, (0, 2))
    assert torch.allclose(gv.double(), padded[ops.meta_to_mask(sw.meta, 24)].view(n, 12), atol=1e-4)


def test_relu_gradient_at_an_exact_zero_is_zero_as_torchs():
    # Integers, and biases making the first output's pre-activations exactly 0: there torch's relu
    # passes no gradient (z > 0, not z >= 0); random data never lands on 0.
    gen = torch.Generator().manual_seed(12)
    sw = sparsegemm.compress(torch.randint(-3, 4, (8, 16), generator=gen).float(), prune=True)
    w = sparsegemm.decompress(sw)
    x = torch.randint(-3, 4, (4, 16), generator=gen).float()
    x[:, :4] = 0
    x[1:, 4:] = x[0, 4:]  # one row repeated: its first output is z = 0 for each
    bias = -(x[0] @ w.T)
    bias[1:] += 0.5
    values, x, bias = sw.values.clone().requires_grad_(), x.requires_grad_(), bias.requires_grad_()
    y = sparsegemm.linear(x, sparsegemm.SparseTensor24(values, sw.meta, sw.shape), bias, activation="relu")
    gx, gv, gb = torch.autograd.grad(y.sum(), (x, values, bias))
    wd = w.clone().requires_grad_()
    x2, b2 = x.detach().clone().requires_grad_(), bias.detach().clone().requires_grad_()
    assert bool((x2 @ wd.T + b2)[:, 0].eq(0).all())
    rx, rw, rb = torch.autograd.grad(torch.relu(x2 @ wd.T + b2).sum(), (x2, wd, b2))
    assert torch.equal(gx, rx) and torch.equal(gb, rb) and gb[0] == 0
    assert torch.equal(gv, rw[ops.meta_to_mask(sw.meta, 16)].view(8, 8))


# torch.jit.trace is deprecated, and warns of the argument checks it cannot record.
@pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::torch.jit.TracerWarning")
@pytest.mark.parametrize("quantize", [None, "int8"])
def test_jit_trace_records_the_custom_ops(quantize):
    # torch.jit.trace sees only what goes through the dispatcher: the eager shortcuts (ops.call's
    # direct implementation, SparseLinear's eager plan) step aside while it traces, so a traced
    # layer runs its GEMM on any input, not an empty tensor of the example's shape.
    torch.manual_seed(11)
    layer = sparsegemm.SparseLinear.from_dense(torch.nn.Linear(64, 24), quantize=quantize).requires_grad_(False)
    with torch.no_grad():
        traced = torch.jit.trace(layer, torch.randn(2, 64))
        x = torch.randn(5, 64)
        assert torch.equal(traced(x), layer(x))
    assert "sparsegemm::" in str(traced.graph)


def test_an_aot_inductor_package_of_a_mixture_runs(tmp_path):
    # The grouped op took "no bias / no reordered metadata / no scales" as empty tensor lists, which
    # AOTInductor's proxy executor hands to the op as None: the package compiled, then every call
    # failed. Graphs now pass lists of empty tensors for those.
    from test_experts import Experts, routing

    torch.manual_seed(35)
    sparse = sparsegemm.SparseExperts.from_dense(Experts(), dtype=torch.float32, backend="cpu").eval()
    x, index, weights = routing(tokens=6)
    program = torch.export.export(sparse, (x, index, weights))
    package = torch._inductor.aoti_load_package(
        torch._inductor.aoti_compile_and_package(program, package_path=str(tmp_path / "moe.pt2")))
    x, index, weights = routing(tokens=6, seed=1)
    with torch.no_grad():
        torch.testing.assert_close(package(x, index, weights), sparse(x, index, weights), rtol=1e-6, atol=1e-6)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_jit_script_names_the_layer_and_what_takes_it():
    # It failed on the class's annotations ("Unknown type annotation: 'Optional[str]'").
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU())
    sparsegemm.sparsify(model)
    with pytest.raises(TypeError, match="SparseLinear: torch.jit.script cannot compile it .* torch.jit.trace, "
                                        "torch.export and torch.compile take it"):
        torch.jit.script(model)


@pytest.mark.parametrize("quantize", [None, "int8"])
def test_torch_export_of_a_bare_layer(quantize):
    # A layer as the exported root: ExportedProgram.module() registers its buffers on a GraphModule,
    # whose own `meta` attribute a buffer of that name would clash with (hence "metadata").
    torch.manual_seed(13)
    layers = [sparsegemm.SparseLinear.from_dense(torch.nn.Linear(64, 24), quantize=quantize)]
    if quantize is None:
        layers.append(sparsegemm.SparseConv2d.from_dense(torch.nn.Conv2d(8, 16, 3, padding=1)))
    for layer, shape in zip(layers, [(3, 64), (2, 8, 5, 5)]):
        layer.requires_grad_(False)
        exported = torch.export.export(layer, (torch.randn(shape),))
        x = torch.randn(shape)
        assert torch.equal(exported.module()(x), layer(x))


def test_torch_export_of_a_model_with_sparse_layers():
    # torch.export records the custom ops (fake impls give the shapes); the exported program runs
    # the kernels on new inputs.
    torch.manual_seed(12)
    model = torch.nn.Sequential(
        sparsegemm.SparseConv2d.from_dense(torch.nn.Conv2d(8, 16, 3, padding=1)), torch.nn.Flatten(),
        sparsegemm.SparseLinear.from_dense(torch.nn.Linear(16 * 25, 24), activation="relu")).requires_grad_(False)
    exported = torch.export.export(model, (torch.randn(2, 8, 5, 5),))
    assert "sparsegemm." in str(exported.graph)
    x = torch.randn(2, 8, 5, 5)
    assert torch.equal(exported.module()(x), model(x))


@pytest.mark.parametrize("layer_kind", ["linear", "conv"])
def test_compiled_training_step_with_dynamic_shapes(layer_kind):
    # Fine-tuning a converted model under torch.compile(dynamic=True): the backward's gradient of
    # the kept values must have a shape known before the data (a boolean-mask gather lowers to
    # nonzero, which Inductor cannot compile: the graph broke and ran eagerly).
    torch._dynamo.reset()
    torch.manual_seed(14)
    if layer_kind == "linear":
        layer = sparsegemm.SparseLinear.from_dense(torch.nn.Linear(64, 24), activation="gelu")
        shapes = [(5, 64), (9, 64)]
    else:
        layer = sparsegemm.SparseConv2d.from_dense(torch.nn.Conv2d(8, 16, 3, padding=1))
        shapes = [(2, 8, 5, 5), (3, 8, 6, 6)]
    torch._dynamo.utils.counters.clear()
    compiled = torch.compile(layer, dynamic=True)  # as users call it (fullgraph=True compiled it before too)
    for shape in shapes:
        x = torch.randn(shape, requires_grad=True)
        grads = []
        for run in (compiled, layer):
            layer.zero_grad()
            x.grad = None
            run(x).square().sum().backward()
            grads.append((x.grad.clone(), layer.values.grad.clone()))
        for got, want in zip(*grads):
            assert torch.allclose(got, want, rtol=1e-5, atol=1e-5)
    counters = torch._dynamo.utils.counters
    assert not counters["unimplemented"] and not counters["graph_break"], (counters["unimplemented"],
                                                                           counters["graph_break"])


def test_compiled_training_step_through_a_strided_convolution_on_the_kernels():
    # The kernels' convolution backward (simt here, CUDA alike) with a bias, stride 2 and a ReLU
    # after it: Inductor (torch 2.13) failed on the dynamic-shape graph ("ValueRangeError: Invalid
    # ranges") while the gradients came from torch.nn.grad's conv2d_input / conv2d_weight and a sum.
    torch._dynamo.reset()
    torch.manual_seed(15)
    layer = sparsegemm.SparseConv2d.from_dense(torch.nn.Conv2d(8, 16, 3, stride=2, padding=1), dtype=torch.float16,
                                               backend="simt")
    compiled = torch.compile(lambda x: layer(x).relu(), fullgraph=True, dynamic=True)
    for hw in (6, 9):
        x = torch.randn(2, 8, hw, hw, dtype=torch.float16)
        grads = []
        for run in (compiled, lambda x: layer(x).relu()):
            layer.zero_grad()
            xg = x.clone().requires_grad_()
            run(xg).float().sum().backward()
            grads.append((xg.grad, layer.values.grad.clone(), layer.bias.grad.clone()))
        for got, want in zip(*grads):
            assert torch.allclose(got.float(), want.float(), rtol=1e-2, atol=1e-2)



def test_compile_caches_are_keyed_by_this_build(tmp_path):
    # torch.compile's caches do not see the Python behind a custom op (a backward, a fake
    # implementation) nor the extension: a graph compiled with one build of sparsegemm was reused by
    # the next. The cache key tag carries a fingerprint of both: the same for an identical copy of
    # the package, another once a source changes.
    import pathlib
    import shutil
    import subprocess
    import sys

    package = pathlib.Path(sparsegemm.__file__).parent
    tags = []
    for name, edit in (("same", None), ("edited", "ops.py")):
        copy = tmp_path / name / "sparsegemm"
        shutil.copytree(package, copy, copy_function=shutil.copy2, ignore=shutil.ignore_patterns("__pycache__"))
        if edit:
            with open(copy / edit, "a") as f:
                f.write("\n# a change\n")
        code = "import sparsegemm, torch; print(torch.compiler.config.cache_key_tag)"
        result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                                cwd=tmp_path, env={**__import__("os").environ, "PYTHONPATH": str(copy.parent)})
        tags.append(result.stdout.strip())
    assert torch.compiler.config.cache_key_tag.count("sparsegemm-") == 1
    assert tags[0] == torch.compiler.config.cache_key_tag.split("+")[-1] != tags[1]
    assert tags[1].startswith("sparsegemm-")


def test_torch_func_vmap_runs_frozen_and_int8_layers_and_jvp_refuses():
    # vmap's wrapped tensors passed for plain ones, so a layer with nothing to differentiate took the
    # direct path and read their (absent) storage: "Cannot access data pointer". Under jvp / jacfwd
    # torch ran the ops with a zero tangent: derivatives of 0, silently.
    torch.manual_seed(0)
    x = torch.randn(3, 16)
    layers = (SparseLinear.from_dense(nn.Linear(16, 8)).requires_grad_(False),
              SparseLinear.from_dense(nn.Linear(16, 8), quantize="int8"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch's note that the ops have no batching rule of their own
        for layer in layers:
            torch.testing.assert_close(torch.func.vmap(layer)(x.unsqueeze(1)).squeeze(1), layer(x))
        conv = SparseConv2d.from_dense(nn.Conv2d(8, 16, 3, padding=1)).requires_grad_(False)
        images = torch.randn(2, 1, 8, 5, 5)
        torch.testing.assert_close(torch.func.vmap(conv)(images), torch.stack([conv(i) for i in images]))
        # The kernel path (the emulator here, CUDA tensors on a GPU) has an eager plan of its own.
        for quantize in (None, "int8"):
            layer = SparseLinear.from_dense(nn.Linear(16, 8).half(), backend="simt", quantize=quantize)
            layer.requires_grad_(False)
            torch.testing.assert_close(torch.func.vmap(layer)(x.half().unsqueeze(1)).squeeze(1), layer(x.half()))
    for layer in (layers[0], SparseLinear.from_dense(nn.Linear(16, 8))):
        with pytest.raises(NotImplementedError, match=r"sparsegemm::linear: forward-mode AD \(torch.func.jvp, "
                                                      r"jacfwd\) is not implemented"):
            torch.func.jvp(layer, (x,), (x,))
    conv = SparseConv2d.from_dense(nn.Conv2d(8, 16, 3, padding=1).half(), backend="simt")
    with pytest.raises(NotImplementedError, match=r"sparsegemm::linear: forward-mode AD"):  # gave 0, silently
        torch.func.jvp(conv, (images[0].half(),), (images[0].half(),))
    with warnings.catch_warnings():  # and vmap runs it (the implicit GEMM's channels_last copy could not)
        warnings.simplefilter("ignore")
        conv.requires_grad_(False)
        torch.testing.assert_close(torch.func.vmap(conv)(images.half()), torch.stack([conv(i) for i in images.half()]))
