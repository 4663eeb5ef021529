"""Compact checkpoints: safetensors only (loading never executes code), validated on load.

A checkpoint holds the model's state_dict as it is after :func:`sparsify` (compressed values,
logical metadata and biases of converted layers; dense tensors of the rest; not a convolution's
``dense_shape``, which its module table entry records) plus, in the
safetensors header, which modules were converted and how (and which state_dict keys are aliases
of a stored tensor: a tied weight is stored once). :func:`load` takes the dense
architecture (freshly built; its weights are irrelevant), converts the same modules, loads every
tensor and validates each compressed weight (shapes, dtypes, metadata nibbles distinct, ordered
and in range): a corrupt or truncated file fails with a clear error.
"""
from __future__ import annotations

import collections
import contextlib
import json
import math
import os
import struct
import sys
import threading
import weakref
from typing import Union

import torch
from torch import nn
from torch.nn.modules.utils import _pair, _single
from torch.nn.utils import parametrize

from .attention import (SparseMultiheadAttention, SplitMultiheadAttention, attention_skip_reason,
                        turn_off_nested_fast_path)
from .format import ACTIVATIONS, GATED_ACTIVATIONS
from .ops import check_conv_geometry
from .nn import (SparseConv1d, SparseConv2d, SparseExperts, SparseGatedMLP, SparseLinear, _SparseWeight,
                 _conv1d_taps, conv_skip_reason, experts_activation, gated_mlp_activation, gated_mlp_parts, is_conv1d,
                 numeric_padding, state_dict_validated)

__all__ = ["save", "load", "describe", "init_empty_weights"]

_FORMAT = "sparsegemm.checkpoint.v1"
# v2: v1 plus the header's alias table (a tied tensor stored once); a file without aliases stays v1,
# which readers from before the alias table load, and a v2 file tells them its format.
_FORMAT_ALIASES = "sparsegemm.checkpoint.v2"


def _describe(mod: nn.Module) -> dict:
    if isinstance(mod, SparseGatedMLP):  # a container: its two layers are entries of their own
        return {"kind": "SparseGatedMLP", "activation": mod.gate_up.activation}
    if isinstance(mod, SparseExperts):  # a container too: each expert's two layers are entries
        return {"kind": "SparseExperts", "num_experts": len(mod.gate_up), "activation": mod.gate_up[0].activation}
    if isinstance(mod, SplitMultiheadAttention):  # a container: its sparse projections are entries
        return {"kind": type(mod).__name__, "num_heads": mod.num_heads,
                "dims": [mod.embed_dim, mod.kdim, mod.vdim]}
    if isinstance(mod, SparseLinear):
        # A fused activation is recorded only where there is one: older files load unchanged.
        fused = {} if mod.activation is None else {"activation": mod.activation}
        if mod.quantize == "int8":
            # dtype: of the bias and activations; the values are int8 with a float32 "scale".
            return {"kind": "SparseLinear", "in_features": mod.in_features, "out_features": mod.out_features,
                    "bias": mod.bias is not None, "dtype": str(mod.dense_dtype()).replace("torch.", ""),
                    "quantize": "int8", "static_input": mod.input_scale is not None, **fused}
        return {"kind": "SparseLinear", "in_features": mod.in_features, "out_features": mod.out_features,
                "bias": mod.bias is not None, "dtype": str(mod.values.dtype).replace("torch.", ""), **fused}
    mod._kernel_taps()  # a kernel_size edited away from the weight's kernel: refused, not recorded
    return {"kind": type(mod).__name__, "in_channels": mod.in_channels, "out_channels": mod.out_channels,
            **dict(zip(_CONV_GEOMETRY, _geometry(mod))), "bias": mod.bias is not None,
            "dtype": str(mod.values.dtype).replace("torch.", "")}


_CONV_GEOMETRY = ("kernel_size", "stride", "padding", "dilation")


def _geometry(conv: nn.Module) -> list:
    """A convolution's kernel_size, stride, padding and dilation as lists, an int (an edit torch's
    convolutions take) as the one-element (1-D) or pair (2-D) tuple it stands for, a string
    padding as the numbers it stands for (numeric_padding; a convolution whose padding has none is
    refused before, by conv_skip_reason)."""
    expand = _single if isinstance(conv, (nn.Conv1d, SparseConv1d)) else _pair
    return [list(expand(numeric_padding(conv) if key == "padding" else getattr(conv, key))) for key in _CONV_GEOMETRY]


# Modules a checkpoint records with no tensors of their own (their layers are entries of their own),
# by class and by kind; then every module it records.
_CONTAINERS = (SparseGatedMLP, SparseExperts, SplitMultiheadAttention)
_CONTAINER_KINDS = ("SparseGatedMLP", "SparseExperts", "SparseMultiheadAttention", "SplitMultiheadAttention")
_KINDS = ("SparseLinear", "SparseConv1d", "SparseConv2d", *_CONTAINER_KINDS)  # every kind a module table holds
# The dtypes a module table records: a layer's float dtype (an int8 layer's too, the one it was made in).
_DENSE_DTYPES = ("float16", "bfloat16", "float32")
_CONVERTED = (SparseLinear, SparseConv2d, *_CONTAINERS)


# How a sharded model's whole state is had, for save's refusals of shards.
_FULL_STATE = ("torch.distributed.checkpoint.state_dict.get_model_state_dict with "
               "StateDictOptions(full_state_dict=True, cpu_offload=True)")


def _is_instance(value, module: str, name: str) -> bool:
    """isinstance(value, module.name) without importing ``module``: unimported, nothing is one."""
    kind = getattr(sys.modules.get(module), name, None)
    return kind is not None and isinstance(value, kind)


def _unwrapped(model: nn.Module) -> nn.Module:
    """The model inside DDP / DataParallel (``.module``) and torch.compile (``._orig_mod``)
    wrappers, whose state-dict keys carry a prefix that the bare model a checkpoint is loaded into
    lacks."""
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif _is_instance(model, "torch._dynamo.eval_frame", "OptimizedModule"):
            model = model._orig_mod
        else:
            return model


def save(model: nn.Module, path: Union[str, "os.PathLike"]) -> None:
    """Write ``model`` (after :func:`sparsify`; the model inside a DDP or torch.compile wrapper) to
    a safetensors file."""
    from safetensors.torch import save_file

    model = _unwrapped(model)
    state = model.state_dict()
    by_module = {}  # module name -> {its own state-dict entries by their names there}
    for key, value in state.items():
        if _is_instance(value, "torch.distributed.tensor", "DTensor"):
            # FSDP2's: this rank's shard (at address 0 for every one, which read as ties).
            raise ValueError(f"sparsegemm.save: {key!r} is a DTensor, a shard of a sharded model (FSDP2): gather "
                             f"the full state dict ({_FULL_STATE}), load it into an unsharded copy of the model and "
                             "save that")
        owner, _, entry = key.rpartition(".")
        by_module.setdefault(owner, {})[entry] = value
    converted = {}
    for name, mod in model.named_modules():
        if not isinstance(mod, _CONVERTED):
            continue
        if parametrize.is_parametrized(mod):
            # Its state dict holds parametrizations.<tensor>.original, which no freshly converted
            # layer has: the file could never be loaded.
            raise ValueError(f"sparsegemm.save: module {name!r} has parametrized tensors "
                             f"({', '.join(mod.parametrizations)}), which a fresh model cannot load: remove them "
                             "first (torch.nn.utils.parametrize.remove_parametrizations)")
        if isinstance(mod, _SparseWeight):
            # FSDP1 leaves flat shards in the state dict: a file no model could load.
            entries = by_module.get(name, {})
            try:
                missing = [key for key in ("values", "metadata") if key not in entries]
                if missing:
                    raise ValueError(f"the state dict has no {name + '.' if name else ''}{' or '.join(missing)}")
                mod.validate(entries)
            except (ValueError, TypeError) as exc:
                raise ValueError(f"sparsegemm.save: module {name!r} does not hold a whole compressed weight ({exc}); "
                                 "a wrapper may hold or name its tensors otherwise: FullyShardedDataParallel's flat "
                                 f"shards (gather the full state dict, {_FULL_STATE}, load it into an unwrapped copy "
                                 "of the model and save that), activation checkpointing's checkpoint_wrapper (save the "
                                 "model without it)") from exc
        converted[name] = _describe(mod)
    # A convolution's dense_shape buffer is its module table entry's geometry again, which load checks
    # against the model and makes the buffer from: left out, the file is the one versions from before
    # the buffer write and read.
    from_table = {(f"{name}." if name else "") + "dense_shape" for name, spec in converted.items()
                  if spec["kind"] in ("SparseConv1d", "SparseConv2d")}
    # A tied tensor (an LM head sharing the embedding) is one tensor under several state_dict keys:
    # stored once, its other keys listed in the header as aliases of the stored one.
    tensors, aliases, first_key = {}, {}, {}
    for key, value in state.items():
        if key in from_table:
            continue
        identity = (value.device, value.data_ptr(), value.dtype, tuple(value.shape), value.stride())
        if value.numel() and identity in first_key:
            aliases[key] = first_key[identity]
            continue
        first_key[identity] = key
        tensors[key] = value.detach().to("cpu").contiguous()
    # safetensors refuses tensors that share a storage: those (views of one buffer, empty tensors)
    # are copied, the rest written from where they are (a copy of every tensor was a second model's
    # worth of memory while saving).
    storages = collections.Counter(t.untyped_storage().data_ptr() for t in tensors.values())
    tensors = {key: t.clone() if storages[t.untyped_storage().data_ptr()] > 1 else t for key, t in tensors.items()}
    header = {"format": _FORMAT, "converted": json.dumps(converted)}
    if aliases:
        header.update(format=_FORMAT_ALIASES, aliases=json.dumps(aliases))
    save_file(tensors, str(path), metadata=header)


def _field(name: str, spec: dict, key: str, kind: type):
    """spec[key], checked to be a ``kind`` (a bool is not an int here)."""
    value = spec.get(key)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ValueError(f"sparsegemm.load: module {name!r}: field {key!r} of the module table must be "
                         f"{kind.__name__}, got {value!r}")
    return value


def _build_gated_mlp(name: str, spec: dict, dense: nn.Module) -> SparseGatedMLP:
    """The SparseGatedMLP shell of a checkpoint entry: its gate_up an empty gated SparseLinear of
    the dense MLP's shape, its down_proj the dense one; the entries of both layers fill them. A
    SparseGatedMLP (a checkpoint loaded again) lends its own two layers to the shell."""
    if isinstance(dense, SparseGatedMLP):
        if dense.gate_up.activation != spec.get("activation"):
            raise ValueError(f"sparsegemm.load: module {name!r} was a gated MLP with activation "
                             f"{spec.get('activation')!r} when saved, the model's has {dense.gate_up.activation!r}")
        return SparseGatedMLP(dense.gate_up, dense.down_proj)
    parts = gated_mlp_parts(dense)
    activation, why = gated_mlp_activation(dense, parts)
    if activation is None or activation != spec.get("activation"):
        found = f"a gated MLP with {activation!r}" if activation is not None else f"not a gated MLP ({why})"
        raise ValueError(f"sparsegemm.load: module {name!r} was a gated MLP with activation "
                         f"{spec.get('activation')!r} when saved, the model's is {found}")
    (w_gate, b_gate), _ = parts.gate, parts.up
    gate_up = SparseLinear(w_gate.shape[1], w_gate.shape[0], b_gate is not None, dtype=w_gate.dtype,
                           device=w_gate.device, activation=activation)
    return SparseGatedMLP(gate_up, parts.down)


def _build_experts(name: str, spec: dict, dense: nn.Module) -> SparseExperts:
    """The SparseExperts shell of a checkpoint entry: empty SparseLinear layers of the dense
    mixture's shapes, which the entries of every expert's two layers fill. A SparseExperts (a
    checkpoint loaded again) lends its own layers to the shell."""
    experts = _field(name, spec, "num_experts", int)
    if isinstance(dense, SparseExperts):
        if len(dense.gate_up) != experts or dense.gate_up[0].activation != spec.get("activation"):
            raise ValueError(f"sparsegemm.load: module {name!r} was a mixture of {experts} experts with activation "
                             f"{spec.get('activation')!r} when saved, the model's has {len(dense.gate_up)} with "
                             f"{dense.gate_up[0].activation!r}")
        return SparseExperts(list(dense.gate_up), list(dense.down))
    activation, why = experts_activation(dense)
    if activation is None or activation != spec.get("activation") or dense.gate_up_proj.shape[0] != experts:
        found = (f"{dense.gate_up_proj.shape[0]} experts with {activation!r}" if activation is not None
                 else f"not a mixture of experts ({why})")
        raise ValueError(f"sparsegemm.load: module {name!r} was a mixture of {experts} experts with activation "
                         f"{spec.get('activation')!r} when saved, the model's is {found}")
    w = dense.gate_up_proj
    hidden, inner = w.shape[2], w.shape[1] // 2
    return SparseExperts([SparseLinear(hidden, inner, False, dtype=w.dtype, device=w.device, activation=activation)
                          for _ in range(experts)],
                         [SparseLinear(inner, hidden, False, dtype=w.dtype, device=w.device) for _ in range(experts)])


def _build_attention(name: str, spec: dict, dense: nn.Module) -> SplitMultiheadAttention:
    """The shell of a checkpoint's attention entry, of its kind (SparseMultiheadAttention, or a
    SplitMultiheadAttention whose projections may be sparse or not): layers of the model's
    attention's shapes, which the file fills (a sparse projection through its own entry). A split
    or sparse attention of the model (loaded again, or split before the load) lends its layers;
    sparse ones are made where the kind needs them."""
    heads = _field(name, spec, "num_heads", int)
    sparse = spec["kind"] == "SparseMultiheadAttention"
    if isinstance(dense, SplitMultiheadAttention):
        parts = [SparseLinear(p.in_features, p.out_features, p.bias is not None, dtype=p.weight.dtype,
                              device=p.weight.device) if sparse and isinstance(p, nn.Linear) else p
                 for p in dense.projections]
    elif type(dense) is nn.MultiheadAttention and attention_skip_reason(dense) is None:
        w, e = dense.out_proj.weight, dense.embed_dim
        layer = SparseLinear if sparse else nn.Linear
        bias = dense.in_proj_bias is not None
        inputs = ((e, bias), (dense.kdim, bias), (dense.vdim, bias), (e, dense.out_proj.bias is not None))
        parts = [layer(k, e, has_bias, dtype=w.dtype, device=w.device) for k, has_bias in inputs]
    else:
        why = "" if not isinstance(dense, nn.MultiheadAttention) else f" ({attention_skip_reason(dense)})"
        raise ValueError(f"sparsegemm.load: module {name!r} was a multi-head attention when saved, the model has "
                         f"{type(dense).__name__}{why}")
    if dense.num_heads != heads:
        raise ValueError(f"sparsegemm.load: module {name!r} had {heads} heads when saved, the model's has "
                         f"{dense.num_heads}")
    dims = _field(name, spec, "dims", list)
    if dims != [dense.embed_dim, dense.kdim, dense.vdim]:
        raise ValueError(f"sparsegemm.load: module {name!r} was an attention of (embed_dim, kdim, vdim) = "
                         f"{tuple(dims)} when saved, the model's is {(dense.embed_dim, dense.kdim, dense.vdim)}")
    kind = SparseMultiheadAttention if sparse else SplitMultiheadAttention
    return kind(*parts, heads, dropout=dense.dropout, batch_first=dense.batch_first)


def _build(name: str, spec: dict, dense: nn.Module) -> nn.Module:
    _field(name, spec, "kind", str)
    if spec["kind"] not in _KINDS:
        raise ValueError(f"sparsegemm.load: module {name!r}: unknown kind {spec['kind']!r} in the checkpoint")
    if spec["kind"] in ("SparseMultiheadAttention", "SplitMultiheadAttention"):
        return _build_attention(name, spec, dense)
    if spec["kind"] == "SparseGatedMLP":
        return _build_gated_mlp(name, spec, dense)
    if spec["kind"] == "SparseExperts":
        return _build_experts(name, spec, dense)
    _field(name, spec, "bias", bool)
    for key in ("in_features", "out_features") if spec["kind"] == "SparseLinear" else ("in_channels", "out_channels"):
        _field(name, spec, key, int)
    dtype = getattr(torch, _field(name, spec, "dtype", str), None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"sparsegemm.load: module {name!r}: unknown dtype {spec['dtype']!r} in the checkpoint")
    if spec["kind"] == "SparseLinear":
        activation = spec.get("activation")
        if activation is not None and activation not in ACTIVATIONS:
            raise ValueError(f"sparsegemm.load: module {name!r}: unknown activation {activation!r} in the checkpoint")
        # A layer with a fused activation has no nn.Linear twin (a gated one replaced two): the
        # model must hold it already, as built, e.g. by SparseLinear.from_gate_up. A Conv1D
        # (GPT-2) is a Linear of (nx, nf) features.
        if is_conv1d(dense) and activation is None:
            features = (dense.nx, dense.nf)
        elif isinstance(dense, SparseLinear if activation is not None else (nn.Linear, SparseLinear)):
            features = (dense.in_features, dense.out_features)
        else:
            features = None
        if features != (spec["in_features"], spec["out_features"]) or (
                getattr(dense, "activation", None) != activation or (dense.bias is not None) != spec["bias"]):
            fused = "" if activation is None else f" with activation {activation!r}"
            raise ValueError(f"sparsegemm.load: module {name!r} was a Linear {spec['in_features']} -> "
                             f"{spec['out_features']}{fused} (bias={spec['bias']}) when saved, the model has {dense}")
        quantize = spec.get("quantize")
        if quantize not in (None, "int8"):
            raise ValueError(f"sparsegemm.load: module {name!r}: unknown quantize {quantize!r} in the checkpoint")
        # Loading into a SparseLinear keeps where it runs (its backend, e.g. "simt").
        device, backend = ((dense.values.device, dense.backend) if isinstance(dense, SparseLinear)
                           else (dense.weight.device, None))
        mod = SparseLinear(spec["in_features"], spec["out_features"], spec["bias"], dtype=dtype,
                           device=device, backend=backend, quantize=quantize, activation=activation)
        if quantize and spec.get("static_input"):
            mod.set_input_scale(1.0)  # the slot the checkpoint's input_scale loads into
        return mod
    # The kinds left: SparseConv2d and SparseConv1d, whose geometry holds nn.Conv1d's single values.
    one_d = spec["kind"] == "SparseConv1d"
    dense_type, sparse_type = (nn.Conv1d, SparseConv1d) if one_d else (nn.Conv2d, SparseConv2d)
    for key in _CONV_GEOMETRY:
        _field(name, spec, key, list)
    geometry = [spec[key] for key in _CONV_GEOMETRY]
    try:
        if one_d:
            _conv1d_taps(*geometry)  # nn.Conv1d's single values
        else:
            check_conv_geometry("module table", *geometry)
    except ValueError as exc:
        raise ValueError(f"sparsegemm.load: module {name!r}: {exc}") from exc
    # The model's layer (a Conv1d / Conv2d, or the sparse one being loaded again) must have the same
    # shape, and compute what the sparse one does (groups = 1, zero padding).
    label = dense_type.__name__
    why_not = conv_skip_reason(dense) if isinstance(dense, dense_type) else None
    if why_not:
        raise ValueError(f"sparsegemm.load: module {name!r} is a {sparse_type.__name__} in the checkpoint, but the "
                         f"model's {label} cannot be one: {why_not}")
    sparse = isinstance(dense, SparseConv2d)
    if not (isinstance(dense, dense_type) or sparse and isinstance(dense, SparseConv1d) == one_d) or (
            dense.in_channels, dense.out_channels) != (spec["in_channels"], spec["out_channels"]) or any(
            got != spec[key] for key, got in zip(_CONV_GEOMETRY, _geometry(dense))) or (
            (dense.bias is not None) != spec["bias"]):
        raise ValueError(f"sparsegemm.load: module {name!r} was a {label} {spec['in_channels']} -> "
                         f"{spec['out_channels']} with " + ", ".join(f"{key}={spec[key]}" for key in _CONV_GEOMETRY)
                         + f", bias={spec['bias']} when saved, the model has {dense}")
    device, backend = (dense.values.device, dense.backend) if sparse else (dense.weight.device, None)
    return sparse_type(spec["in_channels"], spec["out_channels"], *geometry,
                       spec["bias"], dtype=dtype, device=device, backend=backend)


def load(path: Union[str, "os.PathLike"], model: nn.Module, *, device=None) -> nn.Module:
    """Convert ``model``'s modules as recorded in the checkpoint and load every tensor into it.

    Without ``device`` each tensor is copied where the model's own is, so the model must be built
    on a real device. With ``device`` the model may be an empty shell, its parameters on the meta
    device (built under :func:`init_empty_weights`, or accelerate's): the checkpoint's tensors
    become the model's on ``device`` and its non-persistent buffers (made at construction, in no
    checkpoint) move there, so no dense weight of a converted layer is ever allocated.
    """
    # The layers it makes and the tensors it reads are the model's parameters from then on: made in
    # inference mode they would be inference tensors, which no later training can use. The copies
    # into the model's own tensors keep the caller's mode: a model built in inference mode holds
    # inference tensors (its dense layers), which nothing else may write. _load validates each
    # layer's tensors itself, naming the module: the layers' own check of them is not repeated.
    if isinstance(model, nn.parallel.DistributedDataParallel):
        # Its reducer holds the parameters it was built with: those load replaces would no longer
        # be all-reduced, silently.
        raise ValueError("sparsegemm.load: the model is wrapped in DistributedDataParallel, whose gradient "
                         "all-reduce keeps the parameters loading replaces: load into the bare model, then wrap it")
    caller_in_inference_mode = torch.is_inference_mode_enabled()
    with torch.inference_mode(False), state_dict_validated():
        _load(path, _unwrapped(model), device, copy_in_inference_mode=caller_in_inference_mode)
    return model


def _load(path, model: nn.Module, device, copy_in_inference_mode: bool) -> nn.Module:
    from safetensors import safe_open

    check_outside_empty_weights("sparsegemm.load")
    target = None if device is None else torch.device(device)
    try:
        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
            tensors = {key: f.get_tensor(key) for key in f.keys()}
    except Exception as exc:  # safetensors raises its own error types for truncated or corrupt files
        raise ValueError(f"sparsegemm.load: {path} is not a readable safetensors file ({exc})") from exc
    if header.get("format") not in (_FORMAT, _FORMAT_ALIASES):
        hint = ""
        if any(key.endswith((".values", ".metadata")) for key in tensors):
            # save_pretrained (every transformers Trainer checkpoint) of a sparsified model: its state
            # dict, without the module table saying how each layer was converted.
            hint = ("; it holds compressed layers' state (values, metadata) as a state dict, as save_pretrained "
                    "and transformers' Trainer write it: build the model, sparsify it as before, then "
                    "model.load_state_dict(safetensors.torch.load_file(path)); sparsegemm.save writes a file "
                    "this loads")
        raise ValueError(f"sparsegemm.load: {path} is not a sparsegemm checkpoint (format {header.get('format')!r})"
                         + hint)
    try:
        converted = json.loads(header["converted"])
    # ValueError: JSON errors, and integers past Python's digit limit; RecursionError: deep nesting.
    except (KeyError, ValueError, RecursionError) as exc:
        raise ValueError(f"sparsegemm.load: {path} has a corrupt module table ({exc})") from exc
    if not isinstance(converted, dict) or not all(isinstance(v, dict) for v in converted.values()):
        raise ValueError(f"sparsegemm.load: {path} has a corrupt module table (expected an object of objects)")
    _check_meta_tensors(model, target)
    shell_ties = _tie_groups(model)
    tie_of = {key: i for i, group in enumerate(shell_ties) for key in group}
    if target is not None:
        tensors = {key: value.to(target) for key, value in tensors.items()}
    try:
        aliases = json.loads(header.get("aliases", "{}"))
    except (ValueError, RecursionError) as exc:
        raise ValueError(f"sparsegemm.load: {path} has a corrupt alias table ({exc})") from exc
    if not isinstance(aliases, dict):
        raise ValueError(f"sparsegemm.load: {path} has a corrupt alias table (expected an object)")
    for key, stored in aliases.items():
        if not isinstance(stored, str) or stored not in tensors or key in tensors:
            raise ValueError(f"sparsegemm.load: {path} has a corrupt alias table: {key!r} -> {stored!r} must name "
                             "a stored tensor, under a key that is not stored itself")
        # Shared where the model ties the two as well; a copy otherwise: one tensor under two untied
        # parameters (assigned with device=) would couple their updates.
        shared = key in tie_of and tie_of.get(stored) == tie_of[key]
        tensors[key] = tensors[stored] if shared else tensors[stored].clone()
    # Files written before the layers' metadata buffer was renamed (nn.py) call it "meta".
    for name in converted:
        prefix = f"{name}." if name else ""
        if prefix + "meta" in tensors and prefix + "metadata" not in tensors:
            tensors[prefix + "metadata"] = tensors.pop(prefix + "meta")
    from .convert import _set_submodule

    # Everything is built, loaded and validated aside first: a failing checkpoint leaves the model as it
    # was. Outer modules first: a SparseGatedMLP's layers are looked up in the shell built for it.
    replacements = {}
    made_of = {}  # id of a layer load made for a container it built -> the model's module it replaces
    for name, spec in sorted(converted.items(), key=lambda item: item[0].count(".") if item[0] else -1):
        try:
            dense = _staged_submodule(model, replacements, name)
        except AttributeError as exc:
            raise ValueError(f"sparsegemm.load: the checkpoint converts {name!r}, which the model lacks") from exc
        try:
            new = _build(name, spec, dense)
        except (KeyError, TypeError, ValueError) as exc:
            if isinstance(exc, ValueError) and str(exc).startswith("sparsegemm.load"):
                if id(dense) in made_of:  # the mismatch is the model's, not the layer load made for it
                    raise ValueError(f"{exc}; that layer is one load made for the model's {made_of[id(dense)]}"
                                     ) from exc
                raise
            raise ValueError(f"sparsegemm.load: module {name!r}: corrupt entry in the module table ({exc!r})") from exc
        if isinstance(new, _CONTAINERS):  # no tensors of its own
            replacements[name] = new
            made_of.update((id(child), f"{type(dense).__name__} {name!r}") for child in new.children()
                           if all(child is not own for own in dense.children()))
            continue
        prefix = f"{name}." if name else ""
        if isinstance(new, SparseConv2d) and prefix + "dense_shape" not in tensors:
            # save leaves it out (and files from before the buffer have none): made from the module
            # table's geometry, checked against the model above. One a file holds is validated below.
            tensors[prefix + "dense_shape"] = new._dense_shape_tensor("cpu" if target is None else target)
        own = {key[len(prefix):]: value for key, value in tensors.items() if key.startswith(prefix)}
        _check_tensors(path, new.state_dict(), own, prefix)
        new.load_state_dict(own, strict=False, assign=target is not None)  # a shell's layer may be on meta
        try:
            new.validate()
        except ValueError as exc:
            raise ValueError(f"sparsegemm.load: module {name!r}: {exc}") from exc
        replacements[name] = new
    expected = model.state_dict()
    for name, new in replacements.items():
        prefix = f"{name}." if name else ""
        expected = {k: v for k, v in expected.items() if not k.startswith(prefix)}
        expected.update({prefix + k: v for k, v in new.state_dict().items()})
    _check_tensors(path, expected, tensors, "")
    # The layers that get their tensors from the file without an entry of their own (those a shell
    # or the model holds already) are checked on the file's tensors, as the built ones were above.
    for name, layer in _sparse_layers_after(model, replacements):
        if name not in replacements:
            prefix = f"{name}." if name else ""
            try:
                layer.validate({key[len(prefix):]: value for key, value in tensors.items() if key.startswith(prefix)})
            except ValueError as exc:
                raise ValueError(f"sparsegemm.load: module {name!r}: {exc}") from exc
    for group in shell_ties:
        present = [key for key in group if key in tensors]
        if any(not torch.equal(tensors[key], tensors[present[0]]) for key in present[1:]):
            raise ValueError(f"sparsegemm.load: the model ties {', '.join(group)}; {path} holds different tensors "
                             f"for {', '.join(present)}")
    for name, new in replacements.items():
        _set_submodule(model, name, new)
    turn_off_nested_fast_path(model)
    if target is None:
        with torch.inference_mode(copy_in_inference_mode):
            model.load_state_dict(tensors, strict=True)
        return model
    tied = _tie_groups(model)  # assign=True gives each name a Parameter of its own: tied again below
    model.load_state_dict(tensors, strict=True, assign=True)
    for names in tied:
        first = model.get_parameter(names[0])
        for other in names[1:]:
            owner, _, attr = other.rpartition(".")
            setattr(model.get_submodule(owner), attr, first)
    return model.to(target)  # the non-persistent buffers


def _sparse_layers_after(model: nn.Module, replacements: dict):
    """(name, layer) of every SparseLinear / SparseConv2d that ``model`` holds once the staged
    ``replacements`` (name -> module) are set."""
    def walk(module: nn.Module, prefix: str):
        if isinstance(module, _SparseWeight):
            yield prefix.rstrip("."), module
        for child_name, child in module.named_children():
            yield from walk(replacements.get(prefix + child_name, child), prefix + child_name + ".")

    yield from walk(replacements.get("", model), "")


def parameter_names(model: nn.Module) -> dict[int, list[str]]:
    """id(parameter) -> every name ``model`` holds it under (more than one: tied, or a module
    registered twice)."""
    names: dict[int, list[str]] = {}
    for key, param in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(param), []).append(key)
    return names


def _tie_groups(model: nn.Module) -> list:
    """The names of each parameter that ``model`` holds under more than one name (tied)."""
    return [group for group in parameter_names(model).values() if len(group) > 1]


# init_empty_weights patches nn.Module.register_parameter process-wide: the outermost block (of any
# thread) installs the patch and the last one out restores what it replaced, so blocks that overlap
# across threads cannot leave it installed.
_empty_weights_lock = threading.Lock()
_empty_weights_depth = 0
_empty_weights_saved = None
# id(real parameter) -> (weak reference to it, its meta twin): a parameter registered in two places
# (tied) gets one twin. Weak, so that the real parameters the block builds are freed as they go.
_empty_weights_memo: dict = {}


def _register_on_meta(module: nn.Module, name: str, param) -> None:
    _empty_weights_saved(module, name, param)
    # A meta parameter may already be tied where it is; a lazy one has no shape to give meta yet.
    if param is None or param.is_meta or isinstance(param, nn.parameter.UninitializedParameter):
        return
    entry = _empty_weights_memo.get(id(param))
    if entry is None or entry[0]() is not param:  # new, or a freed parameter's id reused
        meta = type(param)(param.to("meta"), requires_grad=param.requires_grad)
        meta.__dict__.update(param.__dict__)  # attributes set on it before registration (sharding plans, ...)
        entry = _empty_weights_memo[id(param)] = (weakref.ref(param), meta)
    module._parameters[name] = entry[1]


def check_outside_empty_weights(op: str) -> None:
    """Refuse to make real parameters while init_empty_weights would put them on meta."""
    if _empty_weights_depth:
        raise RuntimeError(f"{op}: called inside init_empty_weights(), which puts every parameter made (its own "
                           "too) on the meta device: build the shell in the block, call it after")


@contextlib.contextmanager
def init_empty_weights():
    """Within it, modules are built with their parameters on the meta device (no memory, no
    initialisation) and their buffers where they would be: the empty shell that
    ``load(path, model, device=...)`` fills. What accelerate's ``init_empty_weights`` does: it
    patches ``nn.Module.register_parameter`` while any such block runs, for every thread."""
    global _empty_weights_depth, _empty_weights_saved
    with _empty_weights_lock:
        if not _empty_weights_depth:
            _empty_weights_saved = nn.Module.register_parameter
            nn.Module.register_parameter = _register_on_meta
        _empty_weights_depth += 1
    try:
        yield
    finally:
        with _empty_weights_lock:
            _empty_weights_depth -= 1
            if not _empty_weights_depth:
                nn.Module.register_parameter = _empty_weights_saved
                _empty_weights_memo.clear()


def _check_meta_tensors(model: nn.Module, target) -> None:
    """Refuse what load cannot fill: any tensor on the meta device without ``device`` (load copies
    into the model's tensors), and with it a meta buffer outside the state_dict (non-persistent:
    in no checkpoint)."""
    persistent = set(model.state_dict(keep_vars=True))
    on_meta = [key for key, value in [*model.named_parameters(), *model.named_buffers()]
               if value.is_meta and (target is None or key not in persistent)]
    if not on_meta:
        return
    listed = f"{', '.join(on_meta[:3])}{', ...' if len(on_meta) > 3 else ''}"
    if target is None:
        raise ValueError(f"sparsegemm.load: the model has tensors on the meta device ({listed}): pass device= to "
                         "fill an empty shell, or build the model on a real device")
    raise ValueError(f"sparsegemm.load: non-persistent buffers on the meta device ({listed}) are in no checkpoint: "
                     "build the shell with only its parameters on meta (sparsegemm.init_empty_weights)")


def _staged_submodule(model: nn.Module, replacements: dict, name: str) -> nn.Module:
    """``model``'s submodule ``name`` as it will be once ``replacements`` (outer names first) apply."""
    for outer in sorted(replacements, key=len, reverse=True):
        if outer and name.startswith(outer + "."):
            return replacements[outer].get_submodule(name[len(outer) + 1:])
    return model.get_submodule(name)


def _check_tensors(path, expected: dict, tensors: dict, prefix: str) -> None:
    """Names, shapes and dtypes of ``tensors`` are exactly ``expected``'s (keys shown with ``prefix``)."""
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected)) if not prefix else []
    if missing or unexpected:
        raise ValueError(f"sparsegemm.load: checkpoint {path} and model disagree: missing "
                         f"{[prefix + k for k in missing[:5]]}, unexpected {unexpected[:5]}")
    for key, want in expected.items():
        value = tensors[key]
        if value.shape != want.shape or value.dtype != want.dtype:
            raise ValueError(f"sparsegemm.load: tensor {prefix + key!r} is {value.dtype} {tuple(value.shape)} in "
                             f"the checkpoint, the model expects {want.dtype} {tuple(want.shape)}")


def describe(path: Union[str, "os.PathLike"]) -> str:
    """A per-layer size report of a saved checkpoint (what ``python -m sparsegemm report`` prints)."""
    from safetensors import safe_open

    if os.path.isdir(path):  # safetensors' own error says "No such device"
        raise ValueError(f"sparsegemm report: {path} is a directory, not a checkpoint file")
    try:
        return _describe_file(safe_open, path)
    except json.JSONDecodeError as exc:  # a ValueError whose text would not name the file
        raise ValueError(f"sparsegemm report: {path} has a corrupt module table ({exc})") from exc
    except ValueError:
        raise
    except (KeyError, TypeError, AttributeError) as exc:  # a header or module table not as save writes it
        raise ValueError(f"sparsegemm report: {path} has a corrupt header or module table ({exc!r})") from exc
    except Exception as exc:  # safetensors' own error types for truncated or corrupt files
        raise ValueError(f"sparsegemm report: {path} is not a readable safetensors file ({exc})") from exc


def _describe_file(safe_open, path) -> str:
    with safe_open(str(path), framework="pt") as f:
        header = f.metadata() or {}
        if header.get("format") not in (_FORMAT, _FORMAT_ALIASES):
            raise ValueError(f"sparsegemm report: {path} is not a sparsegemm checkpoint")
        converted = json.loads(header["converted"])
    nbytes = _tensor_bytes(path)
    rows = []
    total_dense = total_stored = 0
    for name, spec in converted.items():
        if _report_kind(path, name, spec) in _CONTAINER_KINDS:
            continue  # containers: their layers have rows
        prefix = f"{name}." if name else ""
        n = spec.get("out_features", spec.get("out_channels"))
        if spec.get("activation") in GATED_ACTIVATIONS:
            n *= 2  # the weight holds a gate and an up row per output
        k = spec["in_features"] if "in_features" in spec else spec["in_channels"] * math.prod(spec["kernel_size"])
        item = getattr(torch, spec["dtype"]).itemsize  # int8 layers: vs the dense weight in the float dtype
        meta_bytes = nbytes.get(prefix + "metadata", nbytes.get(prefix + "meta"))  # "meta" in older files
        stored = nbytes[prefix + "values"] + meta_bytes + nbytes.get(prefix + "scale", 0)
        dense = n * k * item
        total_dense += dense
        total_stored += stored
        share = f"{stored / dense:>7.1%}" if dense else f"{'-':>7s}"  # a zero-size layer
        # The values' type: the float dtype, or int8 with per-token (dynamic) or calibrated activations.
        values = (f"int8 {'static' if spec.get('static_input') else 'dynamic'}" if spec.get("quantize") == "int8"
                  else spec["dtype"])
        rows.append((name, spec["kind"], values, f"{n} x {k}", dense, stored, share))
    width = max([40] + [len(row[0]) for row in rows])  # whole names: layers differ by their ends
    lines = [f"{'module':{width}s} {'kind':13s} {'values':12s} {'N x K':>13s} {'dense':>12s} {'stored':>12s} "
             f"{'ratio':>7s}"]
    lines += [f"{name:{width}s} {kind:13s} {values:12s} {shape:>13s} {dense:>12,} {stored:>12,} {share}"
              for name, kind, values, shape, dense, stored, share in rows]
    other = sum(nbytes.values()) - total_stored
    lines.append(f"converted weights: {total_dense:,} -> {total_stored:,} bytes "
                 f"({total_stored / max(total_dense, 1):.1%}); other tensors {other:,} bytes")
    lines.append(_zstd_line(path))
    return "\n".join(lines)


def _report_kind(path, name: str, spec: dict) -> str:
    """The kind of a module table entry, checked with the sizes the report reads from it (a corrupt
    table must not print figures as if they were sizes)."""
    kind = spec.get("kind")
    if kind not in _KINDS:
        raise ValueError(f"sparsegemm report: {path} has a corrupt module table: module {name!r} has an unknown "
                         f"kind {kind!r}")
    if kind in _CONTAINER_KINDS:
        return kind
    keys = ("in_features", "out_features") if kind == "SparseLinear" else ("in_channels", "out_channels")
    sizes = [spec.get(key) for key in keys]
    if kind != "SparseLinear":
        sizes += spec.get("kernel_size") if isinstance(spec.get("kernel_size"), list) else [None]
    if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in sizes):
        found = {key: spec.get(key) for key in (*keys, "kernel_size") if key in spec}
        needs = ", ".join(keys) + ("" if kind == "SparseLinear" else ", kernel_size")
        raise ValueError(f"sparsegemm report: {path} has a corrupt module table: module {name!r} needs {needs} as "
                         f"counts, got {found}")
    if spec.get("dtype") not in _DENSE_DTYPES:  # "int8" sized the dense weight at a byte an element
        raise ValueError(f"sparsegemm report: {path} has a corrupt module table: module {name!r} has dtype "
                         f"{spec.get('dtype')!r}, expected one of {', '.join(_DENSE_DTYPES)}")
    return kind


def _tensor_bytes(path) -> dict:
    """{tensor name: bytes} from the safetensors header's data offsets (exact for every dtype)."""
    with open(path, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(length))
    return {key: entry["data_offsets"][1] - entry["data_offsets"][0] for key, entry in header.items()
            if key != "__metadata__"}


def _zstd_line(path) -> str:
    """What general-purpose compression adds on top: the file through zstd level 3 (if installed),
    streamed, so that a checkpoint of many GB needs no more memory than a small one."""
    size = os.path.getsize(path)
    try:
        import zstandard
    except ImportError:
        return f"file: {size:,} bytes (install zstandard to see what zstd adds)"
    packer = zstandard.ZstdCompressor(level=3).compressobj(size=size)
    packed = 0
    with open(path, "rb") as f:
        while chunk := f.read(16 << 20):
            packed += len(packer.compress(chunk))
    packed += len(packer.flush())
    return f"file: {size:,} bytes; zstd -3: {packed:,} bytes ({packed / size:.1%} of the file)"

