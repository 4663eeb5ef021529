"""sparsify(model): replace eligible Linear / Conv2d modules in place and report what happened."""
from __future__ import annotations

import functools
import inspect
import re
import warnings
from dataclasses import asdict, dataclass, field
from typing import Callable, Optional

import torch
from torch import nn

from ._progress import progress_bar
from .attention import (_ATTENTION_WEIGHTS, SparseMultiheadAttention, SplitMultiheadAttention, _dense_projections,
                        attention_skip_reason, turn_off_nested_fast_path)
from .functional import mask_2to4
from .io import check_outside_empty_weights, parameter_names
from .ops import FLOAT_DTYPES
from .prune import _layer_gemm_view
from .nn import (SparseConv1d, SparseConv2d, SparseExperts, SparseGatedMLP, SparseLinear, _probe_mismatch,
                 conv_skip_reason, experts_activation, gated_mlp_activation, gated_mlp_parts, is_conv1d,
                 weight_skip_reason)

__all__ = ["sparsify", "SparsifyReport", "LayerReport"]


@dataclass
class LayerReport:
    """One row of a :class:`SparsifyReport`: a layer (or a fused / grouped set of layers) that
    sparsify considered, converted or not."""
    name: str
    kind: str                    # "Linear", "Conv1D" (transformers' transposed Linear), "Conv1d", "Conv2d",
    #                              "Linear (gated)" (a gated MLP's gate_proj + up_proj),
    #                              "MultiheadAttention" (one of its q / k / v / out projections),
    #                              "Experts (gated)" / "Experts" (a mixture's gate_up_proj / down_proj, all experts)
    shape: tuple                 # (N, K) of the GEMM weight
    dense_bytes: int
    compressed_bytes: int
    magnitude_kept: float        # share of sum |w| the 2:4 mask keeps
    converted: bool
    reason: str = ""             # why it was skipped
    note: str = ""               # a converted layer's: what else changed (its hooks moved to the new module)


@dataclass
class SparsifyReport:
    """What :func:`sparsify` did: a :class:`LayerReport` per layer considered, in the order
    considered (``str()`` prints them as a table with the totals)."""
    layers: list = field(default_factory=list)

    @property
    def converted(self) -> list:
        """The rows of the layers converted."""
        return [layer for layer in self.layers if layer.converted]

    @property
    def skipped(self) -> list:
        """The rows of the layers left dense (each with its ``reason``)."""
        return [layer for layer in self.layers if not layer.converted]

    def totals(self) -> dict:
        """Counts of converted and skipped layers, and the converted layers' dense and compressed
        bytes with their ratio (0.0 when nothing was converted)."""
        conv = self.converted
        dense = sum(layer.dense_bytes for layer in conv)
        comp = sum(layer.compressed_bytes for layer in conv)
        return {"converted": len(conv), "skipped": len(self.skipped), "dense_bytes": dense,
                "compressed_bytes": comp, "ratio": comp / dense if dense else 0.0}

    def to_dict(self) -> dict:
        """The rows and totals as plain types (JSON-ready)."""
        return {"layers": [asdict(layer) for layer in self.layers], "totals": self.totals()}

    def __str__(self) -> str:
        width = max([40] + [len(layer.name) for layer in self.layers])  # whole names: layers differ by their ends
        rows = [f"{'layer':{width}s} {'kind':15s} {'N x K':>13s} {'dense':>10s} {'2:4':>10s} {'kept |w|':>8s}  note"]
        for layer in self.layers:
            nk = f"{layer.shape[0]} x {layer.shape[1]}"
            note = layer.note if layer.converted else f"skipped: {layer.reason}"
            comp = f"{layer.compressed_bytes:,}" if layer.converted else "-"
            rows.append(f"{layer.name:{width}s} {layer.kind:15s} {nk:>13s} {layer.dense_bytes:>10,} {comp:>10s} "
                        f"{layer.magnitude_kept:>8.1%}  {note}")
        t = self.totals()
        rows.append(f"total: {t['converted']} converted, {t['skipped']} skipped; {t['dense_bytes']:,} -> "
                    f"{t['compressed_bytes']:,} bytes ({t['ratio']:.1%})")
        return "\n".join(rows)


def _gemm_weight(module: nn.Module) -> torch.Tensor:
    """The layer's weight as the GEMM's W [N, K] (a Conv1D's transposed, a convolution's taps as K,
    channels fastest)."""
    return _layer_gemm_view(module, module.weight.detach())


# Elements of a weight the report's |w| share reads at a time: its fp32 copy and mask are transient
# (a 128256 x 4096 LM head's whole fp32 |w| was 2 GiB, 6.5 GiB with the mask's temporaries).
_REPORT_CHUNK = 1 << 22


def _magnitude_kept(*weights: torch.Tensor) -> float:
    """Share of the weights' summed |w| ([N, K] each, or [K]) that their 2:4 masks keep."""
    kept = total = 0.0
    for w in weights:
        rows = w.reshape(-1, w.shape[-1])
        for part in rows.split(max(1, _REPORT_CHUNK // max(1, rows.shape[1]))):
            magnitude = part.float().abs()
            total += float(magnitude.sum(dtype=torch.float64))
            kept += float((magnitude * mask_2to4(magnitude)).sum(dtype=torch.float64))
    return kept / total if total else 1.0


def sparsify(model: nn.Module, *, dtype: Optional[torch.dtype] = None,
             filter_fn: Optional[Callable[[str, nn.Module], bool]] = None, min_features: int = 64,
             backend: Optional[str] = None, progress: bool = True,
             quantize: Optional[str] = None, fuse_gated_mlp: bool = False) -> SparsifyReport:
    """Replace every eligible nn.Linear / nn.Conv1d / nn.Conv2d of ``model`` in place by its 2:4 version.

    transformers' ``Conv1D`` (GPT-2's attention and MLP layers: a Linear with its weight stored
    transposed) becomes a SparseLinear too, its W the transpose of the stored ``[in, out]`` weight.

    ``filter_fn(name, module)`` is called with each candidate: nn.Linear, Conv1D, nn.Conv1d, nn.Conv2d, a gated MLP's
    projections (``fuse_gated_mlp``) and each mixture-of-experts module (3-D weights, see below).
    Skipped (and said why in the report): modules ``filter_fn`` rejects, layers with
    fewer than ``min_features`` inputs or outputs (too small to gain), grouped / depthwise convs,
    layers whose weight is shared (a tied LM head: its other holder keeps the dense tensor).
    ``dtype`` converts the weights (default: keep theirs). ``quantize="int8"`` also quantizes the
    Linear layers (int8 values, per-row scale, per-token activations; ``dtype`` is then their
    activation dtype); convolutions keep a floating 2:4 weight.

    Mixtures of experts stored as transformers 5 does (:func:`sparsegemm.nn.experts_activation`)
    become :class:`SparseExperts` in any call, and every nn.MultiheadAttention (torchvision's ViT,
    nn.Transformer*) a :class:`~sparsegemm.attention.SparseMultiheadAttention`, reported as four
    rows (q_proj, k_proj, v_proj, out_proj; ``filter_fn`` sees the attention itself, under its own
    name, and decides for the four); an nn.TransformerEncoder over converted layers then takes its
    regular path (its nested-tensor fast path reads the dense weights).

    ``backend``: where the converted layers run (None: by device; "simt": the CUDA kernels in the
    CPU emulator). ``progress``: a tqdm bar over the layers, shown from 21 candidates on.

    ``fuse_gated_mlp``: every gated MLP in a transformers layout (Llama, Mistral, Qwen2, ...:
    ``down_proj(act_fn(gate_proj(x)) * up_proj(x))``; Mixtral experts' w1 / w3 / w2; Phi-3's
    gate_up_proj), checked by :func:`gated_mlp_activation` on a probe input, becomes a
    :class:`SparseGatedMLP`: gate and up one SparseLinear with the gated epilogue (SwiGLU, GEGLU,
    ReGLU), the down projection converted as any Linear. An MLP that does not qualify is reported
    and its layers are converted one by one.
    """
    if quantize not in (None, "int8"):
        raise ValueError(f"sparsify: quantize must be None or 'int8', got {quantize!r}")
    # Here, not at the first layer converted: a model whose layers are all skipped took any dtype.
    if dtype is not None and dtype not in FLOAT_DTYPES:
        raise ValueError(f"sparsify: dtype must be None or one of {', '.join(map(str, FLOAT_DTYPES))}, got "
                         f"{dtype!r}")
    check_outside_empty_weights("sparsify")
    shell = next((name for name, p in model.named_parameters()
                  if p.is_meta and not isinstance(p, nn.parameter.UninitializedParameter)), None)
    if shell is not None:
        raise ValueError(f"sparsify: the model's weights are on the meta device ({shell}): there is nothing to prune "
                         "or compress. Build it with its weights, or load a sparse checkpoint into this shell with "
                         "sparsegemm.load(path, model, device=...)")
    if torch.is_inference_mode_enabled():
        # The layers it makes are the model's from then on: made in inference mode they would hold
        # inference tensors, which no later training step can use (as load). No grad: a model built
        # in inference mode holds inference tensors, which no graph may record.
        with torch.inference_mode(False), torch.no_grad():
            return sparsify(model, dtype=dtype, filter_fn=filter_fn, min_features=min_features, backend=backend,
                            progress=progress, quantize=quantize, fuse_gated_mlp=fuse_gated_mlp)
    report = SparsifyReport()
    _convert_experts(model, report, dtype, filter_fn, min_features, backend, quantize)
    if fuse_gated_mlp:
        _fuse_gated_mlps(model, report, dtype, filter_fn, min_features, backend, quantize)
    reported = _convert_attention(model, report, dtype, filter_fn, min_features, backend, quantize)
    # Names, not modules: a converted layer's dense weight is freed as soon as it is replaced, so
    # converting a model on its GPU needs one dense layer of room beyond the compressed model,
    # not the whole dense model twice over.
    candidates = [name for name, mod in model.named_modules()
                  if (isinstance(mod, (nn.Linear, nn.Conv1d, nn.Conv2d)) or is_conv1d(mod))
                  and not isinstance(mod, (SparseLinear, SparseConv2d)) and name not in reported]
    holders = parameter_names(model)
    for name in progress_bar(candidates, "sparsify", "layer", progress and len(candidates) > 20):
        mod = model.get_submodule(name)
        parent = model.get_submodule(name.rpartition(".")[0]) if name else None
        kind = "MultiheadAttention" if isinstance(parent, SplitMultiheadAttention) else type(mod).__name__
        if isinstance(mod.weight, nn.parameter.UninitializedParameter):  # no shape, nothing to read
            entry = LayerReport(name, kind, (0, 0), 0, 0, 1.0, False, weight_skip_reason(mod))
            report.layers.append(entry)
            continue
        w = _gemm_weight(mod)
        n, k = w.shape
        item = dtype.itemsize if dtype is not None else w.element_size()
        entry = LayerReport(name, kind, (n, k), n * k * item, 0, _magnitude_kept(w), False)
        report.layers.append(entry)
        if not name:
            entry.reason = "the model itself is the layer: it cannot be replaced in place"
            continue
        entry.reason = weight_skip_reason(mod) or ""
        if entry.reason:
            continue
        if type(mod) not in (nn.Linear, nn.Conv1d, nn.Conv2d) and type(mod).__name__ != "Conv1D":
            entry.reason = _linear_subclass_reason(mod) if isinstance(mod, nn.Linear) else _subclass_reason(mod)
            if entry.reason:
                continue
        if filter_fn is not None and not filter_fn(name, mod):
            entry.reason = "rejected by filter_fn"
            continue
        reader = _weight_reader(model, name)
        if reader:
            entry.reason = (f"{reader}.forward reads its .weight (e.g. for its dtype), which a compressed layer "
                            "does not have: converting it would break that forward")
            continue
        others = [h for h in holders.get(id(mod.weight), []) if h != f"{name}.weight"]
        if others:
            # A tied weight (an LM head sharing the embedding) or a module registered twice: the other
            # holders keep the dense tensor, so a compressed copy would add bytes, not save them.
            entry.reason = (f"weight shared with {', '.join(others)}, which would keep the dense tensor: a "
                            "compressed copy would add bytes (untie it to convert this layer)")
            continue
        if min(n, k) < min_features:
            entry.reason = f"min(N, K) = {min(n, k)} < min_features = {min_features}"
            continue
        if isinstance(mod, (nn.Conv1d, nn.Conv2d)):
            entry.reason = conv_skip_reason(mod) or ""
            if entry.reason:
                continue
            sparse_conv = SparseConv1d if isinstance(mod, nn.Conv1d) else SparseConv2d
            new = sparse_conv.from_dense(mod, dtype=dtype, backend=backend)
        else:
            new = SparseLinear.from_dense(mod, dtype=dtype, backend=backend, quantize=quantize)
        entry.compressed_bytes = new.sparse_weight().nbytes
        entry.converted = True
        entry.note = _set_submodule(model, name, new)
    _complete_split_attention(model)
    turn_off_nested_fast_path(model)
    _report_unknown_weights(model, report)
    _warn_of_layers_pruned_here(model, report)
    return report


def _all_zero(model: nn.Module, name: str) -> bool:
    """Whether converted layer ``name`` holds only zeros (a zero-initialized gate or adapter: "2:4
    already", but no sign of pruning); False where the name is no module's (a fused or grouped row)."""
    try:
        values = getattr(model.get_submodule(name), "values", None)
    except AttributeError:
        return False
    return isinstance(values, torch.Tensor) and int(values.count_nonzero()) == 0


def _report_unknown_weights(model: nn.Module, report: SparsifyReport) -> None:
    """A row, left dense, for each 2-D or 3-D weight of a module whose class names experts that no
    pass above considered (DBRX's fused [E * I, H] w1 / v1 / w2, JetMoE's 3-D experts: the larger
    part of those models, which had no row). Biases and parametrizations' tensors are no such weight;
    a tied one is reported once; |w| kept is summed in row chunks (the experts are large)."""
    seen, tensors = {layer.name for layer in report.layers}, set()
    for name, mod in model.named_modules():
        if (name in seen or "expert" not in type(mod).__name__.lower() or "parametrizations" in name.split(".")
                or isinstance(mod, (SparseLinear, SparseConv2d, SparseExperts))):
            continue
        for pname, p in mod.named_parameters(recurse=False):
            full = f"{name}.{pname}" if name else pname
            if (full in seen or id(p) in tensors or "bias" in pname or p.dim() not in (2, 3) or min(p.shape) < 2
                    or isinstance(p, nn.parameter.UninitializedParameter)):
                continue
            tensors.add(id(p))
            rows = p.detach().reshape(-1, p.shape[-1])
            kept = 1.0 if p.is_meta else _magnitude_kept(rows)
            report.layers.append(LayerReport(full, type(mod).__name__, tuple(rows.shape), p.numel() * p.element_size(),
                                             0, kept, False,
                                             f"a {p.dim()}-D weight {tuple(p.shape)} of a layout sparsify does not "
                                             "convert"))


def _warn_of_layers_pruned_here(model: nn.Module, report: SparsifyReport) -> None:
    """A warning where some converted layers came already 2:4 (pruned before: the prune, fine-tune,
    remove_masks recipe) and others did not, which sparsify then pruned by magnitude, past whatever
    the model was validated with: e.g. a mixture's 3-D experts, which the pruning tools leave out."""
    converted = report.converted
    pruned_here = [layer.name for layer in converted if layer.magnitude_kept < 1.0]
    pruned_before = [layer for layer in converted if layer.magnitude_kept == 1.0 and not _all_zero(model, layer.name)]
    if pruned_here and pruned_before:
        shown = ", ".join(pruned_here[:5]) + (f" and {len(pruned_here) - 5} more" if len(pruned_here) > 5 else "")
        warnings.warn(f"sparsify: {len(pruned_before)} converted layers were 2:4 already, "
                      f"{len(pruned_here)} were not and were pruned here by magnitude ({shown}): if the model was "
                      "pruned and validated before, those layers were not part of it (the pruning tools leave a "
                      "mixture's 3-D experts out); filter_fn can leave them dense",
                      stacklevel=3)


def _subclass_reason(mod: nn.Module) -> str:
    """Why sparsify leaves a layer of a subclass (a parametrized layer's class is one) alone."""
    held = getattr(mod, "parametrizations", None)
    if held is None:
        return f"subclass {type(mod).__name__} left alone"
    kinds = sorted({type(p).__name__ for plist in held.values() for p in plist})
    if "Mask2to4" in kinds:
        return "carries a 2:4 mask (parametrized): call sparsegemm.prune.remove_masks(model) first"
    return (f"parametrized ({', '.join(kinds)}, e.g. weight_norm): its weight is computed at every call, which a "
            "compressed layer cannot do; remove the parametrization first to convert it")


def _linear_subclass_reason(mod: nn.Linear) -> str:
    """Why sparsify leaves an nn.Linear subclass alone, or "" where it converts it: one holding
    nothing but nn.Linear's weight and bias whose forward computes nn.Linear's product
    (transformers' FalconLinear, ``x @ W.T + b``; torch's NonDynamicallyQuantizableLinear), told on
    a random probe (hooks left out), since no class says what its forward computes. More state
    (LoRA's adapters, whose zero-initialized half a probe would not see) keeps it dense."""
    reason = _subclass_reason(mod)
    w = mod.weight
    extra = ([name for name in mod._parameters if name not in ("weight", "bias")]
             + [name for name, b in mod._buffers.items() if b is not None] + list(mod._modules))
    if hasattr(mod, "parametrizations") or extra or w.is_meta or not w.is_floating_point():
        return reason + (f" (it holds more than nn.Linear's weight and bias: {', '.join(extra)})" if extra else "")
    x = torch.randn(2, w.shape[1], generator=torch.Generator().manual_seed(0)).to(w.device, w.dtype)
    training = mod.training
    # In both modes (a forward may differ in one), on a copy of the probe (one may edit its input),
    # and with the caller's random state kept (one may draw numbers).
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=[w.device] if w.is_cuda else []):
            want = nn.functional.linear(x, w, mod.bias)
            for mode in (training, not training):
                mod.train(mode)
                why = _probe_mismatch(type(mod).forward(mod, x.clone()), want,
                                      1e-5 if w.dtype in (torch.float32, torch.float64) else 1e-2)
                if why:
                    return f"{reason}: its forward is not nn.Linear's x @ W.T + b ({why} on a probe)"
    except Exception as exc:  # any failure of a foreign forward: not what nn.Linear computes
        return f"{reason}: its forward failed on a probe ({type(exc).__name__}: {exc})"
    finally:
        mod.train(training)
    return ""


def _weight_reader(model: nn.Module, name: str, attributes: str = "weight") -> Optional[str]:
    """The class of a module holding layer ``name`` (its parent, or further up) whose forward reads
    the layer's ``.weight`` (T5's ``self.wo.weight.dtype``; ViT's
    ``self.embeddings.patch_embeddings.projection.weight.dtype``), else None. Told from the
    forward's source by the layer's path below that module (attribute names and indices); ``attributes``,
    a regular expression, names what a converted layer lacks."""
    parts = name.split(".")
    for depth in range(len(parts) - 1, -1, -1):
        below = parts[depth:]
        if not all(part.isidentifier() or part.isdigit() for part in below):
            return None  # reached through a ModuleDict key no attribute access spells, from here up
        holder = model.get_submodule(".".join(parts[:depth]))
        if type(holder).forward is nn.TransformerEncoderLayer.forward and (
                below[0] == "self_attn" or isinstance(holder.self_attn, SplitMultiheadAttention)):
            continue  # it reads weights on its fast path only, which a split (or sparse) self_attn turns off
        source = _forward_source(type(holder))
        if source and re.search(_access_pattern(below) + rf"\.(?:{attributes})\b", source):
            return type(holder).__name__
    return None


def _access_pattern(path: list) -> str:
    """A regular expression of the attribute accesses that reach a submodule by ``path`` from the
    module whose forward is read: ``layers.0.fc`` as ``layers[0].fc``, ``0.fc`` as ``self[0].fc``."""
    pattern = ""
    for i, part in enumerate(path):
        if part.isdigit():
            pattern += (r"\bself" if i == 0 else "") + rf"\[\s*{part}\s*\]"
        else:
            pattern += (r"\." if i else r"\b") + re.escape(part)
    return pattern


@functools.lru_cache(maxsize=None)
def _forward_source(cls: type) -> str:
    """The source of ``cls.forward``, or "" (a builtin, a class made at run time)."""
    try:
        return inspect.getsource(cls.forward)
    except (OSError, TypeError):
        return ""


def _fuse_gated_mlps(model: nn.Module, report: SparsifyReport, dtype, filter_fn, min_features: int, backend,
                     quantize) -> None:
    """sparsify's first pass: gated MLPs become SparseGatedMLP (their down projection still dense,
    for the layer pass); the report gets a "Linear (gated)" row per module with a gated layout,
    converted or with the reason it was left (its layers are then converted one by one)."""
    found = [name for name, mod in model.named_modules()
             if not isinstance(mod, SparseGatedMLP) and gated_mlp_parts(mod) is not None]
    for name in found:  # names, as in sparsify's layer pass: each MLP's dense weights go once it is replaced
        mlp = model.get_submodule(name)
        parts = gated_mlp_parts(mlp)
        (w_gate, _), (w_up, _) = parts.gate, parts.up
        # The rows the fused layer stores (their order changes neither shape nor kept magnitude).
        stored = (w_gate, w_up) if w_gate.shape[1:] == w_up.shape[1:] else (w_gate,)
        n, k = sum(w.shape[0] for w in stored), w_gate.shape[1]
        item = dtype.itemsize if dtype is not None else w_gate.element_size()
        prefix = f"{name}." if name else ""
        entry = LayerReport(prefix + parts.label, "Linear (gated)", (n, k), n * k * item, 0, _magnitude_kept(*stored),
                            False)
        report.layers.append(entry)
        activation, entry.reason = gated_mlp_activation(mlp, parts)
        if activation is None:
            continue
        if not name:
            entry.reason = "the model itself is the MLP: it cannot be replaced in place"
        elif filter_fn is not None and not all(filter_fn(prefix + attr, getattr(mlp, attr)) for attr in parts.names):
            entry.reason = "rejected by filter_fn"
        elif min(n // 2, k) < min_features:
            entry.reason = f"min(N, K) = {min(n // 2, k)} < min_features = {min_features}"
        else:
            hooked = [attr for attr in parts.names if _has_hooks(getattr(mlp, attr))]
            if hooked:
                entry.reason = (f"{' and '.join(hooked)} {'has' if len(hooked) == 1 else 'have'} hooks, which a layer "
                                "fusing gate and up cannot call: its layers are converted one by one instead "
                                "(the hooks moved to them)")
        if entry.reason:
            continue
        new = SparseGatedMLP._from_checked_parts(parts, activation, dtype=dtype, prune=True, backend=backend,
                                                 quantize=quantize)
        entry.compressed_bytes = new.gate_up.sparse_weight().nbytes
        entry.converted = True
        entry.note = _set_submodule(model, name, new)


def _convert_experts(model: nn.Module, report: SparsifyReport, dtype, filter_fn, min_features: int, backend,
                     quantize) -> None:
    """sparsify's pass over mixtures of experts stored as 3-D parameters (transformers 5): each
    becomes a SparseExperts, reported as two rows (every expert's gate/up, every expert's down)."""
    found = [name for name, mod in model.named_modules()
             if not isinstance(mod, SparseExperts) and isinstance(getattr(mod, "gate_up_proj", None), nn.Parameter)
             and getattr(mod, "gate_up_proj").dim() == 3]
    holders = parameter_names(model)
    for name in found:  # names: each mixture's dense weights go once it is replaced
        experts = model.get_submodule(name)
        gate_up, down = experts.gate_up_proj.detach(), getattr(experts, "down_proj", None)
        item = dtype.itemsize if dtype is not None else gate_up.element_size()
        prefix = f"{name}." if name else ""
        e, two_i, h = gate_up.shape
        rows = [LayerReport(prefix + "gate_up_proj", "Experts (gated)", (e * two_i, h), gate_up.numel() * item, 0,
                            _magnitude_kept(*gate_up), False)]
        if isinstance(down, nn.Parameter) and down.dim() == 3:
            rows.append(LayerReport(prefix + "down_proj", "Experts", (down.shape[0] * down.shape[1], down.shape[2]),
                                    down.numel() * item, 0, _magnitude_kept(*down.detach()), False))
        report.layers.extend(rows)
        activation, reason = experts_activation(experts)
        shared = _held_elsewhere(experts, prefix, holders)
        if activation is not None:
            if shared:  # as in the layer pass: the other holders would keep the dense tensors
                reason = (f"weights shared with {', '.join(shared)}, which would keep the dense tensors: a "
                          "compressed copy would add bytes (untie them to convert this mixture)")
            elif not name:
                reason = "the model itself is the mixture: it cannot be replaced in place"
            elif filter_fn is not None and not filter_fn(name, experts):
                reason = "rejected by filter_fn"
            elif min(two_i // 2, h) < min_features:
                reason = f"min(N, K) = {min(two_i // 2, h)} < min_features = {min_features}"
        if activation is None or reason:
            for row in rows:
                row.reason = reason
            continue
        new = SparseExperts.from_dense(experts, dtype=dtype, backend=backend, quantize=quantize)
        rows[0].compressed_bytes = sum(layer.sparse_weight().nbytes for layer in new.gate_up)
        rows[1].compressed_bytes = sum(layer.sparse_weight().nbytes for layer in new.down)
        note = _set_submodule(model, name, new)
        for row in rows:
            row.converted, row.note = True, note


def _convert_attention(model: nn.Module, report: SparsifyReport, dtype, filter_fn, min_features: int, backend,
                       quantize) -> set:
    """sparsify's pass over nn.MultiheadAttention modules: each becomes a SparseMultiheadAttention,
    reported as four rows (its q, k, v and out projections); returns the rows' names (out_proj's,
    a Linear module, is not the layer pass's to report again)."""
    found = [name for name, mod in model.named_modules() if type(mod) is nn.MultiheadAttention]
    first_row = len(report.layers)
    holders = parameter_names(model)
    for name in found:  # names: each attention's dense weights go once it is replaced
        mha = model.get_submodule(name)
        prefix = f"{name}." if name else ""
        rows = []
        for label, (w, _) in zip(("q_proj", "k_proj", "v_proj", "out_proj"), _dense_projections(mha)):
            item = dtype.itemsize if dtype is not None else w.element_size()
            rows.append(LayerReport(prefix + label, "MultiheadAttention", tuple(w.shape), w.numel() * item, 0,
                                    _magnitude_kept(w), False))
        report.layers.extend(rows)
        reason = _attention_skip_reason(model, name, mha, filter_fn, holders, min_features)
        if reason:
            for row in rows:
                row.reason = reason
            continue
        new = SparseMultiheadAttention.from_dense(mha, dtype=dtype, backend=backend, quantize=quantize)
        # Hooks on the attention move; those on its out_proj stay behind, as uncalled as they were
        # (nn.MultiheadAttention reads out_proj's weight, it never calls the module).
        note = _set_submodule(model, name, new)
        for row, layer in zip(rows, new.projections):
            row.compressed_bytes = layer.sparse_weight().nbytes
            row.converted, row.note = True, note
    return {row.name for row in report.layers[first_row:]}


def _complete_split_attention(model: nn.Module) -> None:
    """Each SplitMultiheadAttention (prune.split_attention) whose four projections are now sparse
    becomes the SparseMultiheadAttention it equals."""
    for name, mod in list(model.named_modules()):
        if name and type(mod) is SplitMultiheadAttention and all(isinstance(p, SparseLinear) for p in mod.projections):
            new = SparseMultiheadAttention(*mod.projections, mod.num_heads, dropout=mod.dropout,
                                           batch_first=mod.batch_first)
            _set_submodule(model, name, new)


def _attention_skip_reason(model: nn.Module, name: str, mha: nn.MultiheadAttention, filter_fn, holders: dict,
                           min_features: int) -> str:
    """Why sparsify leaves attention ``name`` dense, or ""."""
    prefix = f"{name}." if name else ""
    if not name:
        return "the model itself is the attention: it cannot be replaced in place"
    reason = attention_skip_reason(mha)
    if reason:
        return reason
    if filter_fn is not None and not filter_fn(name, mha):
        return "rejected by filter_fn"
    reader = _weight_reader(model, name, _ATTENTION_WEIGHTS)
    if reader:
        return (f"{reader}.forward reads its weights, which a compressed attention does not have: converting it "
                "would break that forward")
    shared = _held_elsewhere(mha, prefix, holders)
    if shared:
        return (f"weights shared with {', '.join(shared)}, which would keep the dense tensors: a compressed copy "
                "would add bytes (untie them to convert this attention)")
    if min(mha.embed_dim, mha.kdim, mha.vdim) < min_features:
        return f"min(N, K) = {min(mha.embed_dim, mha.kdim, mha.vdim)} < min_features = {min_features}"
    return ""


def _held_elsewhere(module: nn.Module, prefix: str, holders: dict) -> list:
    """The names outside ``prefix`` (the module's own, with its dot) under which the model also
    holds ``module``'s parameters: tied weights, or the module registered twice."""
    return [holder for param in module.parameters() for holder in holders.get(id(param), [])
            if not holder.startswith(prefix)]


def _set_submodule(model: nn.Module, name: str, new: nn.Module) -> str:
    """Puts ``new`` in the place of module ``name``, with its hooks (:func:`_move_hooks`), its
    train / eval mode (a layer made in an eval model would otherwise be the one in training mode)
    and what it left frozen (:func:`_keep_frozen`); returns the report's note on the hooks (""
    when it had none)."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    old = model.get_submodule(name)
    note = _move_hooks(old, new)
    _keep_frozen(old, new)
    setattr(parent, child, new.train(old.training))
    return note


def _keep_frozen(old: nn.Module, new: nn.Module) -> None:
    """Freeze what ``new`` makes of the parameters ``old`` held frozen (requires_grad False): all of
    a module whose parameters all were (a frozen backbone stays frozen for fine-tuning), else a
    layer's compressed values where its weight was and its bias where its bias was. Never the
    reverse: an INT8 layer's values and bias stay frozen."""
    params = list(old.parameters())
    if params and not any(p.requires_grad for p in params):
        new.requires_grad_(False)
        return
    for old_name, new_name in (("weight", "values"), ("bias", "bias")):
        before, after = getattr(old, old_name, None), new._parameters.get(new_name)
        if isinstance(before, torch.Tensor) and after is not None and not before.requires_grad:
            after.requires_grad_(False)


# The hooks a module calls around its forward and backward. A converted layer takes them over, as
# torch.ao.quantization's swap_module does: they see the same inputs, outputs and gradients. The
# dicts themselves move, so the handles the user holds still remove them. (State-dict hooks stay
# behind: they were written for the dense layer's keys.)
_CALL_HOOKS = ("_forward_pre_hooks", "_forward_pre_hooks_with_kwargs", "_forward_hooks", "_forward_hooks_with_kwargs",
               "_forward_hooks_always_called", "_backward_pre_hooks", "_backward_hooks", "_is_full_backward_hook")


def _has_hooks(module: nn.Module) -> bool:
    return bool(module._forward_pre_hooks or module._forward_hooks or module._backward_pre_hooks
                or module._backward_hooks)


def _move_hooks(old: nn.Module, new: nn.Module) -> str:
    """Moves ``old``'s forward and backward hooks to ``new`` (freshly made: it has none); the
    report's note on them, or "" when there were none."""
    if not _has_hooks(old):
        return ""
    for attr in _CALL_HOOKS:
        setattr(new, attr, getattr(old, attr))
    for attr in _CALL_HOOKS[:-1]:
        setattr(old, attr, type(getattr(old, attr))())
    return "hooks moved to the converted module"
