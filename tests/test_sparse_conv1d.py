"""SparseConv1d (nn.Conv1d, groups = 1: speech front ends such as Whisper's and wav2vec2's) against
F.conv1d on the pruned weight, and the tools (sparsify, pruning, checkpoints) on it. Its oracle
for the pruning order is the Conv2d of the same kernel as one row of taps."""
import copy

import pytest
import torch
from torch import nn

import sparsegemm
from sparsegemm import SparseConv1d
from sparsegemm import prune as P

GEOMETRIES = [  # kernel_size, stride, padding, dilation, bias
    (3, 1, 1, 1, True), (3, 2, 1, 1, False), (5, 1, 4, 2, True), (1, 1, 0, 1, True), (2, 2, 0, 1, True),
    (10, 5, 0, 1, False),  # wav2vec2's first layer shape (with more channels)
]


@pytest.mark.parametrize("kernel_size,stride,padding,dilation,bias", GEOMETRIES)
def test_matches_conv1d_on_the_pruned_weight(kernel_size, stride, padding, dilation, bias):
    torch.manual_seed(0)
    conv = nn.Conv1d(24, 16, kernel_size, stride=stride, padding=padding, dilation=dilation, bias=bias)
    sparse = SparseConv1d.from_dense(conv)
    weight = sparse.dense_weight()
    assert weight.shape == conv.weight.shape
    # 2:4 along (kx, cin), cin fastest: the magnitude mask of that matrix.
    matrix = conv.weight.detach().permute(0, 2, 1).reshape(16, -1)
    assert torch.equal(weight.permute(0, 2, 1).reshape(16, -1), sparsegemm.prune_2to4(matrix))
    for x in (torch.randn(3, 24, 41), torch.randn(24, 41)):  # batched and unbatched
        want = nn.functional.conv1d(x, weight, conv.bias, stride, padding, dilation)
        torch.testing.assert_close(sparse(x), want, rtol=1e-5, atol=1e-5)


def test_emulated_kernel_and_gradients():
    torch.manual_seed(1)
    conv = nn.Conv1d(32, 16, 3, stride=2, padding=1).half()
    x = torch.randn(2, 32, 13, dtype=torch.float16)
    simt = SparseConv1d.from_dense(conv, backend="simt")
    cpu = SparseConv1d.from_dense(conv)
    want = nn.functional.conv1d(x.float(), cpu.dense_weight().float(), conv.bias.float(), 2, 1).half()
    torch.testing.assert_close(simt(x).float(), want.float(), rtol=2e-3, atol=2e-3)  # the CUDA kernel's twin
    torch.testing.assert_close(cpu(x).float(), want.float(), rtol=2e-3, atol=2e-3)
    conv32 = nn.Conv1d(32, 16, 3, stride=2, padding=1)
    sparse = SparseConv1d.from_dense(conv32)
    xs, xd = torch.randn(2, 32, 13, requires_grad=True), None
    xd = xs.detach().clone().requires_grad_()
    sparse(xs).square().sum().backward()
    nn.functional.conv1d(xd, sparse.dense_weight(), conv32.bias, 2, 1).square().sum().backward()
    torch.testing.assert_close(xs.grad, xd.grad, rtol=1e-5, atol=1e-5)
    assert sparse.values.grad is not None


def test_errors_name_the_layer_and_the_argument():
    with pytest.raises(ValueError, match=r"SparseConv1d: x must be \[B, 8, L\] or \[8, L\], got \(2, 4, 9\)"):
        SparseConv1d(8, 8, 3, dtype=torch.float32)(torch.randn(2, 4, 9))
    with pytest.raises(ValueError, match="SparseConv1d: padding must be a number, got the string 'same'"):
        SparseConv1d(8, 8, 3, padding="same")
    with pytest.raises(ValueError, match="SparseConv1d: kernel_size must be one integer"):
        SparseConv1d(8, 8, (3, 3))
    with pytest.raises(ValueError, match="depthwise convolution"):
        SparseConv1d.from_dense(nn.Conv1d(8, 8, 3, groups=8))
    with pytest.raises(TypeError, match="expected nn.Conv1d, got Conv2d"):
        SparseConv1d.from_dense(nn.Conv2d(8, 8, 3))
    with pytest.raises(ValueError, match=r"SparseConv1d: the input length 3 is shorter than the dilated kernel "
                                         r"\(5\) with padding 0: output length would be -1"):
        SparseConv1d(8, 8, 5, dtype=torch.float32)(torch.randn(1, 8, 3))


class SpeechFrontEnd(nn.Module):
    """Whisper's convolution stem and a depthwise layer (left dense)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(2)
        self.conv1 = nn.Conv1d(80, 64, 3, padding=1)
        self.conv2 = nn.Conv1d(64, 64, 3, stride=2, padding=1)
        self.depthwise = nn.Conv1d(64, 64, 5, padding=2, groups=64)
        self.head = nn.Linear(64, 64)

    def forward(self, x):
        x = nn.functional.gelu(self.conv2(nn.functional.gelu(self.conv1(x))))
        return self.head(self.depthwise(x).transpose(1, 2))


def test_sparsify_converts_conv1d_and_says_why_not_depthwise(tmp_path):
    model = SpeechFrontEnd().eval()
    reference = copy.deepcopy(model)
    report = sparsegemm.sparsify(model, min_features=4)
    rows = {layer.name: layer for layer in report.layers}
    assert rows["conv1"].kind == "Conv1d" and rows["conv1"].shape == (64, 240) and rows["conv1"].converted
    assert "depthwise convolution" in rows["depthwise"].reason
    assert isinstance(model.conv2, SparseConv1d) and type(model.depthwise) is nn.Conv1d
    with torch.no_grad():
        for name in ("conv1", "conv2"):
            getattr(reference, name).weight.copy_(getattr(model, name).dense_weight())
        reference.head.weight.copy_(model.head.dense_weight())
    x = torch.randn(2, 80, 30)
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference(x), rtol=1e-4, atol=1e-4)
    path = tmp_path / "front_end.safetensors"
    sparsegemm.save(model, path)
    fresh = SpeechFrontEnd().eval()
    sparsegemm.load(path, fresh)
    assert isinstance(fresh.conv1, SparseConv1d) and fresh.conv2.stride == (2,)  # nn.Conv1d's, as models read it
    with torch.no_grad():
        assert torch.equal(fresh(x), model(x))
    sparsegemm.load(path, fresh)  # again, into the model it filled
    with torch.no_grad():
        assert torch.equal(fresh(x), model(x))
    wrong = SpeechFrontEnd()
    wrong.conv2 = nn.Conv1d(64, 64, 3, stride=1, padding=1)
    with pytest.raises(ValueError, match=r"module 'conv2' was a Conv1d 64 -> 64 with kernel_size=\[3\], "
                                         r"stride=\[2\]"):
        sparsegemm.load(path, wrong)
    assert "conv1 " in sparsegemm.io.describe(path)


@pytest.mark.parametrize("method", ["magnitude", "sparsegpt"])
def test_pruning_a_conv1d_is_pruning_its_conv2d_of_one_row(method):
    torch.manual_seed(3)
    conv = nn.Conv1d(16, 12, 3, stride=2, padding=1)
    twin = nn.Conv2d(16, 12, (1, 3), stride=(1, 2), padding=(0, 1))
    with torch.no_grad():
        twin.weight.copy_(conv.weight.unsqueeze(2))
        twin.bias.copy_(conv.bias)
    x = torch.randn(4, 16, 21)
    kwargs = {} if method == "magnitude" else {"method": method, "calibration": x}
    one, two = nn.Sequential(conv), nn.Sequential(twin)
    kept = P.prune_one_shot(one, **kwargs)
    twin_kept = P.prune_one_shot(two, **({} if method == "magnitude" else {**kwargs, "calibration": x.unsqueeze(2)}))
    assert kept["0"] == pytest.approx(twin_kept["0"], rel=1e-6)
    assert torch.equal(P.masked_layers(one)["0"], P.masked_layers(two)["0"].squeeze(2))
    torch.testing.assert_close(conv.weight.detach(), twin.weight.detach().squeeze(2), rtol=1e-5, atol=1e-6)
    P.remove_masks(one)
    SparseConv1d.from_dense(conv, prune=False)  # exactly 2:4 along (kx, cin)


def test_a_weight_normed_conv_is_reported_as_such():
    model = nn.Sequential(nn.utils.parametrizations.weight_norm(nn.Conv1d(64, 64, 3)))
    reason = sparsegemm.sparsify(model, min_features=4).layers[0].reason
    assert "parametrized (_WeightNorm, e.g. weight_norm)" in reason and "remove_masks" not in reason


def test_an_old_style_weight_normed_conv_is_not_prunable():
    # torch.nn.utils.weight_norm's old form computes .weight from weight_g and weight_v in a hook: no
    # mask can be attached, so the pruning tools leave it (prune_one_shot failed inside torch).
    with pytest.warns(FutureWarning):
        model = nn.Sequential(nn.utils.weight_norm(nn.Conv1d(64, 64, 3)), nn.Conv1d(64, 64, 3))
    assert [name for name, _ in P.prunable_layers(model)] == ["1"]
    P.prune_one_shot(model)
    assert P.masked_layers(model).keys() == {"1"}


def test_a_checkpoint_records_a_geometry_edited_to_an_int(tmp_path):
    # conv.padding = 2, as torch's convolutions take it: save records the one-element form.
    torch.manual_seed(7)
    model = nn.Sequential(SparseConv1d.from_dense(nn.Conv1d(16, 16, 3)))
    model[0].padding = 2
    x = torch.randn(2, 16, 10)
    sparsegemm.save(model, tmp_path / "c.safetensors")
    loaded = sparsegemm.load(tmp_path / "c.safetensors", nn.Sequential(nn.Conv1d(16, 16, 3, padding=2)))
    assert loaded[0].padding == (2,) and torch.equal(loaded(x), model(x))


def test_whisper_from_transformers_converts_and_generates():
    transformers = pytest.importorskip("transformers")
    config = transformers.WhisperConfig(
        d_model=64, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2, decoder_attention_heads=2,
        encoder_ffn_dim=128, decoder_ffn_dim=128, num_mel_bins=80, vocab_size=500, max_source_positions=50,
        max_target_positions=32, decoder_start_token_id=1, pad_token_id=0, eos_token_id=2, bos_token_id=1)
    torch.manual_seed(0)
    model = transformers.WhisperForConditionalGeneration(config).eval()
    reference = copy.deepcopy(model)
    report = sparsegemm.sparsify(model, min_features=16)
    converted = {layer.name for layer in report.converted}
    assert {"model.encoder.conv1", "model.encoder.conv2"} <= converted
    with torch.no_grad():
        for name in converted:
            reference.get_submodule(name).weight.copy_(model.get_submodule(name).dense_weight())
    features, tokens = torch.randn(1, 80, 100), torch.tensor([[1, 5, 7]])
    with torch.no_grad():  # the encoder checks the input length by conv1.stride[0] * conv2.stride[0]
        torch.testing.assert_close(model(input_features=features, decoder_input_ids=tokens).logits,
                                   reference(input_features=features, decoder_input_ids=tokens).logits,
                                   rtol=1e-4, atol=1e-4)
    assert model.generate(features, max_new_tokens=4).shape[0] == 1


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("kernel_size,stride,padding,dilation,bias", GEOMETRIES)
def test_on_the_gpu(kernel_size, stride, padding, dilation, bias):
    if not sparsegemm.info()["cuda_built"]:
        pytest.skip("needs a CUDA build of sparsegemm._C")
    torch.manual_seed(4)
    conv = nn.Conv1d(64, 32, kernel_size, stride=stride, padding=padding, dilation=dilation, bias=bias)
    conv = conv.cuda().half()
    sparse = SparseConv1d.from_dense(conv)
    x = torch.randn(3, 64, 57, device="cuda", dtype=torch.float16)
    bias32 = None if conv.bias is None else conv.bias.float()
    want = nn.functional.conv1d(x.float(), sparse.dense_weight().float(), bias32, stride, padding, dilation)
    torch.testing.assert_close(sparse(x).float(), want, rtol=2e-3, atol=2e-3)
