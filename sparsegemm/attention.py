"""SparseMultiheadAttention: nn.MultiheadAttention with 2:4 compressed projections (and
SplitMultiheadAttention, its dense twin with Linear projections, for the pruning tools).

nn.MultiheadAttention keeps its input projection as one raw ``in_proj_weight`` parameter and its
output projection as a Linear subclass whose ``.weight`` its forward reads, so neither can be
swapped for a SparseLinear in place: torchvision's ViT, nn.TransformerEncoder / Decoder and every
model built on them kept a third of their weights dense after :func:`sparsegemm.sparsify`. This
module computes what nn.MultiheadAttention computes (same arguments, masks, dropout and returned
weights) with four SparseLinear layers: q_proj, k_proj, v_proj (separate, so that cross-attention
projects each input once) and out_proj.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor, nn

from .nn import SparseLinear, _SparseWeight

__all__ = [
    "SparseMultiheadAttention", "SplitMultiheadAttention", "attention_skip_reason", "turn_off_nested_fast_path",
]

# nn.MultiheadAttention's dense weights, which torch's fused attention paths read from the module.
_DENSE_WEIGHTS = frozenset({"in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight"})
# The attributes of an nn.MultiheadAttention that a split or sparse one lacks, as a pattern for
# convert._weight_reader (a model's forward that reads them cannot take either).
_ATTENTION_WEIGHTS = "|".join(sorted(_DENSE_WEIGHTS)) + r"|out_proj\.weight"


def attention_skip_reason(mha: nn.MultiheadAttention) -> Optional[str]:
    """Why an nn.MultiheadAttention cannot be split (and made sparse), or None when it can."""
    if mha.bias_k is not None or mha.bias_v is not None:
        return "add_bias_kv=True (learned key / value biases appended to the sequence) is not supported"
    if mha.add_zero_attn:
        return "add_zero_attn=True is not supported"
    return None


def _float_mask(op: str, mask: Optional[Tensor], name: str, dtype: torch.dtype) -> Optional[Tensor]:
    """A boolean mask (True: not attended) as an additive one of ``dtype``; a float mask as is, in
    its own dtype, as torch's attention passes it on: an fp32 -1e9 is -inf in fp16, which would
    turn a row whose keys all carry it from uniform attention into zeros."""
    if mask is None:
        return None
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(mask, float("-inf"))
    if not mask.is_floating_point():
        raise TypeError(f"{op}: {name} must be a bool or floating tensor, got {mask.dtype}")
    return mask


def _dense_projections(mha: nn.MultiheadAttention) -> list[tuple[Tensor, Optional[Tensor]]]:
    """(weight [E, K], bias [E] or None) of ``mha``'s q, k, v and out projections, detached."""
    e = mha.embed_dim
    if mha._qkv_same_embed_dim:
        weights = mha.in_proj_weight.detach().split(e)
    else:
        weights = (mha.q_proj_weight.detach(), mha.k_proj_weight.detach(), mha.v_proj_weight.detach())
    biases = (None,) * 3 if mha.in_proj_bias is None else mha.in_proj_bias.detach().split(e)
    out_bias = None if mha.out_proj.bias is None else mha.out_proj.bias.detach()
    return [*zip(weights, biases), (mha.out_proj.weight.detach(), out_bias)]


class SplitMultiheadAttention(nn.Module):
    """nn.MultiheadAttention with its four projections as modules of their own: ``q_proj``,
    ``k_proj``, ``v_proj`` and ``out_proj``, each an nn.Linear or a SparseLinear.

    :func:`sparsegemm.prune.split_attention` makes one of every nn.MultiheadAttention (same
    weights, same results) so that the pruning tools mask, calibrate and fine-tune its projections
    as the Linear layers they are (nn.MultiheadAttention holds q, k and v as one raw parameter and
    reads out_proj's weight without calling it); :func:`sparsegemm.sparsify` then converts its
    Linear layers, and one whose four projections are sparse becomes a SparseMultiheadAttention.

    ``forward(query, key, value, key_padding_mask=None, need_weights=True, attn_mask=None,
    average_attn_weights=True, is_causal=False)`` takes what nn.MultiheadAttention takes and returns
    ``(attn_output, attn_weights or None)``: batched ``[L, N, E]`` (``[N, L, E]`` with
    ``batch_first``) or unbatched ``[L, E]`` inputs, boolean (True: not attended) or additive masks,
    ``attn_mask`` ``[L, S]`` or ``[N * num_heads, L, S]``, attention dropout in training. Without
    ``need_weights`` the attention is torch's scaled_dot_product_attention (its fused kernels).

    ``num_heads`` heads share the embedding (q_proj's outputs) evenly; ``dropout``: the attention
    weights' dropout probability in training; ``batch_first``: inputs and outputs ``[N, L, E]``.

    ``_qkv_same_embed_dim`` is False, as for an nn.MultiheadAttention with separate q / k / v
    projection weights: torch's TransformerEncoderLayer then takes its regular path (its fused
    fast path reads the dense weights).
    """

    _qkv_same_embed_dim = False
    # What nn.MultiheadAttention's users read: an attention with add_bias_kv or add_zero_attn is
    # not converted (_check_convertible), so this one has neither.
    bias_k = bias_v = None
    add_zero_attn = False
    _layer_kinds = "an nn.Linear or a SparseLinear without a fused activation"  # what _takes takes

    def __init__(self, q_proj: nn.Module, k_proj: nn.Module, v_proj: nn.Module, out_proj: nn.Module,
                 num_heads: int, *, dropout: float = 0.0, batch_first: bool = False):
        super().__init__()
        op = type(self).__name__
        layers = {"q_proj": q_proj, "k_proj": k_proj, "v_proj": v_proj, "out_proj": out_proj}
        for name, layer in layers.items():
            if not self._takes(layer):
                raise TypeError(f"{op}: {name} must be {self._layer_kinds}, got {layer!r}")
        embed_dim = q_proj.out_features
        for name, inputs in (("q_proj", embed_dim), ("k_proj", None), ("v_proj", None), ("out_proj", embed_dim)):
            layer = layers[name]
            if layer.out_features != embed_dim or (inputs is not None and layer.in_features != inputs):
                raise ValueError(f"{op}: {name} must give embed_dim = {embed_dim} features"
                                 + (f" from {inputs}" if inputs is not None else "")
                                 + f", got {layer.in_features} -> {layer.out_features}")
        if not isinstance(num_heads, int) or num_heads < 1 or embed_dim % num_heads:
            raise ValueError(f"{op}: num_heads must divide embed_dim = {embed_dim}, got {num_heads!r}")
        if not 0.0 <= dropout <= 1.0:
            raise ValueError(f"{op}: dropout must be in [0, 1], got {dropout}")
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = q_proj, k_proj, v_proj, out_proj
        self.embed_dim, self.kdim, self.vdim = embed_dim, k_proj.in_features, v_proj.in_features
        self.num_heads, self.head_dim = num_heads, embed_dim // num_heads
        self.dropout, self.batch_first = float(dropout), bool(batch_first)

    @staticmethod
    def _takes(layer: nn.Module) -> bool:  # a masked Linear (the pruning tools') is a subclass
        return isinstance(layer, nn.Linear) or isinstance(layer, SparseLinear) and layer.activation is None

    @classmethod
    def from_dense(cls, mha: nn.MultiheadAttention) -> "SplitMultiheadAttention":
        """The attention of ``mha`` with its projections as nn.Linear layers holding copies of its
        weights, on its device and in its dtype."""
        _check_convertible(f"{cls.__name__}.from_dense", mha)
        layers = []
        for weight, bias in _dense_projections(mha):
            layer = nn.Linear(weight.shape[1], weight.shape[0], bias is not None, device=weight.device,
                              dtype=weight.dtype)
            with torch.no_grad():
                layer.weight.copy_(weight)
                if bias is not None:
                    layer.bias.copy_(bias)
            layers.append(layer)
        return cls(*layers, mha.num_heads, dropout=mha.dropout, batch_first=mha.batch_first)

    @property
    def projections(self) -> tuple:
        """(q_proj, k_proj, v_proj, out_proj)."""
        return self.q_proj, self.k_proj, self.v_proj, self.out_proj

    def __getattr__(self, name: str):
        if name in _DENSE_WEIGHTS:  # read by torch's fused paths: say what to do instead
            raise AttributeError(
                f"{type(self).__name__} has no {name} (its projections are modules of their own): an "
                "nn.TransformerEncoder holding it must take its regular path; sparsify, load and "
                "prune.split_attention see to that for the model they are given, after converting by other "
                "means call sparsegemm.attention.turn_off_nested_fast_path(model)")
        return super().__getattr__(name)

    @property
    def in_proj_bias(self) -> Optional[Tensor]:
        """The q, k and v biases end to end, as nn.MultiheadAttention's ``in_proj_bias`` (a copy)."""
        biases = [layer.bias for layer in self.projections[:3]]
        return None if any(b is None for b in biases) else torch.cat([b.detach() for b in biases])

    def forward(self, query: Tensor, key: Tensor, value: Tensor, key_padding_mask: Optional[Tensor] = None,
                need_weights: bool = True, attn_mask: Optional[Tensor] = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> tuple[Tensor, Optional[Tensor]]:
        op = type(self).__name__
        batched = query.dim() == 3
        if query.dim() not in (2, 3) or key.dim() != query.dim() or value.dim() != query.dim():
            raise ValueError(f"{op}: query, key and value must all be 3-D (batched) or 2-D (unbatched), got "
                             f"{query.dim()}-D, {key.dim()}-D and {value.dim()}-D")
        if is_causal and attn_mask is None:
            raise RuntimeError(f"{op}: is_causal is a hint that attn_mask is the causal mask: pass attn_mask too")
        # To [N, L, E] whatever the layout.
        if not batched:
            query, key, value = query.unsqueeze(0), key.unsqueeze(0), value.unsqueeze(0)
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        elif not self.batch_first:
            query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
        n, tgt_len, _ = query.shape
        src_len = key.shape[1]
        if key.shape[:2] != value.shape[:2]:
            raise ValueError(f"{op}: key and value must have the same batch and sequence sizes, got "
                             f"{tuple(key.shape)} and {tuple(value.shape)}")
        if key.shape[0] != n:
            raise ValueError(f"{op}: query and key must have the same batch size, got {n} and {key.shape[0]} "
                             f"(batch_first={self.batch_first})")
        heads, head_dim = self.num_heads, self.head_dim
        q = self.q_proj(query).view(n, tgt_len, heads, head_dim).transpose(1, 2)
        k = self.k_proj(key).view(n, src_len, heads, head_dim).transpose(1, 2)
        v = self.v_proj(value).view(n, src_len, heads, head_dim).transpose(1, 2)
        mask = self._merged_mask(attn_mask, key_padding_mask, n, tgt_len, src_len, q.dtype)
        causal = is_causal and key_padding_mask is None and not need_weights
        dropout = self.dropout if self.training else 0.0
        weights = None
        if need_weights:
            scores = (q * (1.0 / math.sqrt(head_dim))) @ k.transpose(-2, -1)
            if mask is not None:  # (torch refuses a mask of another dtype here; this casts it)
                scores = scores + mask.to(scores.dtype)
            weights = torch.softmax(scores, dim=-1)
            if dropout > 0.0:
                weights = nn.functional.dropout(weights, p=dropout)
            out = weights @ v
            if average_attn_weights:
                weights = weights.mean(dim=1)
            if not batched:
                weights = weights.squeeze(0)
        else:
            out = nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=None if causal else mask,
                                                             dropout_p=dropout, is_causal=causal)
        # out_proj on rows in [L, N, E] order, which torch's attention computes in: its output is then
        # laid out as torch's, a contiguous [L, N, E] (batch_first: its transposed view), so .view()
        # works on it as there and a dropout after it (TransformerEncoderLayer's) masks the same
        # elements from the same random stream.
        out = self.out_proj(out.permute(2, 0, 1, 3).reshape(tgt_len, n, self.embed_dim))
        if not batched:
            out = out.squeeze(1)
        elif self.batch_first:
            out = out.transpose(0, 1)
        return out, weights

    def _merged_mask(self, attn_mask: Optional[Tensor], key_padding_mask: Optional[Tensor], n: int, tgt_len: int,
                     src_len: int, dtype: torch.dtype) -> Optional[Tensor]:
        """attn_mask and key_padding_mask as one additive mask broadcasting to [N, heads, L, S]."""
        op = type(self).__name__
        mask = _float_mask(op, attn_mask, "attn_mask", dtype)
        if mask is not None:
            if mask.shape == (tgt_len, src_len):
                mask = mask.view(1, 1, tgt_len, src_len)
            elif mask.dim() == 3 and mask.shape == (n * self.num_heads, tgt_len, src_len):
                mask = mask.view(n, self.num_heads, tgt_len, src_len)
            else:
                raise ValueError(f"{op}: attn_mask must be [L, S] = [{tgt_len}, {src_len}] or [N * num_heads, L, S] "
                                 f"= [{n * self.num_heads}, {tgt_len}, {src_len}], got {tuple(attn_mask.shape)}")
        padding = _float_mask(op, key_padding_mask, "key_padding_mask", dtype)
        if padding is not None:
            if padding.shape != (n, src_len):
                raise ValueError(f"{op}: key_padding_mask must be [N, S] = [{n}, {src_len}] (or [S] unbatched), "
                                 f"got {tuple(key_padding_mask.shape)}")
            padding = padding.view(n, 1, 1, src_len)
            mask = padding if mask is None else mask + padding
        return mask

    def extra_repr(self) -> str:
        kv = "" if self.kdim == self.vdim == self.embed_dim else f", kdim={self.kdim}, vdim={self.vdim}"
        return f"embed_dim={self.embed_dim}, num_heads={self.num_heads}{kv}, dropout={self.dropout}, " \
               f"batch_first={self.batch_first}"


class SparseMultiheadAttention(SplitMultiheadAttention):
    """A SplitMultiheadAttention whose four projections are SparseLinear layers: what
    :func:`sparsegemm.sparsify` makes of an nn.MultiheadAttention (q, k and v separate, so that
    cross-attention projects each input once)."""

    _layer_kinds = "a SparseLinear without a fused activation"

    @staticmethod
    def _takes(layer: nn.Module) -> bool:
        return isinstance(layer, SparseLinear) and layer.activation is None

    @classmethod
    def from_dense(cls, mha: nn.Module, *, dtype: Optional[torch.dtype] = None, prune: bool = True,
                   backend: Optional[str] = None, quantize: Optional[str] = None) -> "SparseMultiheadAttention":
        """The attention of ``mha`` (an nn.MultiheadAttention, or a SplitMultiheadAttention of
        nn.Linear layers) with each projection compressed as :meth:`SparseLinear.from_dense` compresses
        a Linear (magnitude 2:4 along its inputs when ``prune``; ``quantize="int8"``)."""
        options = dict(dtype=dtype, prune=prune, backend=backend, quantize=quantize)
        if isinstance(mha, SplitMultiheadAttention) and not isinstance(mha, SparseMultiheadAttention):
            layers = [layer if isinstance(layer, SparseLinear) else SparseLinear.from_dense(layer, **options)
                      for layer in mha.projections]
            return cls(*layers, mha.num_heads, dropout=mha.dropout, batch_first=mha.batch_first)
        _check_convertible(f"{cls.__name__}.from_dense", mha)
        layers = []
        for (w, b), name in zip(_dense_projections(mha), ("q", "k", "v", "out")):
            try:
                layers.append(SparseLinear._from_weight(w, b, **options))
            except ValueError as exc:  # a weight that is not 2:4 (prune=False): say which slice holds it
                where = "out_proj.weight" if name == "out" else (
                    f"in_proj_weight from row {'qkv'.index(name) * mha.embed_dim}: add that to the row below"
                    if mha._qkv_same_embed_dim
                    else f"{name}_proj_weight")
                raise ValueError(f"{cls.__name__}.from_dense: the {name} projection ({where}): {exc}") from exc
        return cls(*layers, mha.num_heads, dropout=mha.dropout, batch_first=mha.batch_first)


def _check_convertible(op: str, mha: nn.Module) -> None:
    if not isinstance(mha, nn.MultiheadAttention):
        raise TypeError(f"{op}: expected nn.MultiheadAttention, got {type(mha).__name__}")
    reason = attention_skip_reason(mha)
    if reason:
        raise ValueError(f"{op}: {reason}")


def turn_off_nested_fast_path(model: nn.Module) -> None:
    """Make every nn.TransformerEncoder of ``model`` that holds a sparse layer take its regular
    path. Its nested-tensor fast path reads the first layer's dense weights and hands every layer a
    nested tensor, which sparse layers do not take; it decides at construction, from the layers it
    had then (an attention with separate projections turns it off there). sparsify and load call
    this on the model they are given: after converting layers of an encoder by other means (a
    sub-module's sparsify, an assignment), call it on a model that holds the encoder."""
    for mod in model.modules():
        if isinstance(mod, nn.TransformerEncoder) and any(
                isinstance(layer, (SplitMultiheadAttention, _SparseWeight)) for layer in mod.layers.modules()):
            mod.use_nested_tensor = False
