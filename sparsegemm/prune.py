"""Pruning for accuracy: 2:4 masks that stay fixed while a dense model trains, reached at once or
gradually, and a channel permutation that lets the mask keep more of the weight.

The workflow, on a trained dense model (every step optional but the mask)::

    report = permute_channels(model)     # reorder channels: same function, more |w| kept
    prune_one_shot(model)                # or GradualPruner(model, end_step=...) in the loop, or
                                         # method="sparsegpt" / "wanda" with calibration batches
    train(model)                         # the masks hold, whatever the optimizer does
    remove_masks(model)                  # weights now exactly 2:4, plain nn.Linear / nn.Conv2d
    sparsegemm.sparsify(model)           # -> SparseLinear / SparseConv2d (no further pruning)

Masks are torch parametrizations (``weight = where(mask, original, 0)``), so the masked weights
get no gradient and whatever the optimizer does to the original (momentum, weight decay) never
reaches the forward; ``model.state_dict()`` carries the masks.

Every weight is judged as the GEMM sees it, ``W[N, K]`` with 2:4 groups along K: a Conv2d's K is
ordered (ky, kx, cin), cin fastest, as in :class:`sparsegemm.SparseConv2d` (a Conv1d's (kx, cin),
as in :class:`sparsegemm.SparseConv1d`).
"""
from __future__ import annotations

import collections
import math
import numbers
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from . import format as fmt
from ._progress import progress_bar
from .functional import mask_2to4
from .attention import SplitMultiheadAttention, turn_off_nested_fast_path
from .nn import _conv1d_taps, conv_skip_reason, is_conv1d, weight_skip_reason

__all__ = [
    "Mask2to4",
    "GradualPruner",
    "ChannelPair",
    "PairReport",
    "PermutationReport",
    "cubic_share",
    "find_channel_pairs",
    "gemm_view",
    "kept_share",
    "masked_layers",
    "permute_channels",
    "prunable_layers",
    "prune_one_shot",
    "remove_masks",
    "search_permutation",
    "sparsegpt_2to4",
    "split_attention",
]


# ---------------------------------------------------------------------------------------------
# Weights as the GEMM sees them


def gemm_view(weight: Tensor) -> Tensor:
    """``weight`` as the GEMM's ``[N, K]``: a Linear's as is, a Conv2d's ``[Cout, Cin, kh, kw]``
    reordered to K = (ky, kx, cin), the order in which SparseConv2d forms its 2:4 groups (a Conv1d's
    ``[Cout, Cin, k]`` to (kx, cin), SparseConv1d's)."""
    if weight.dim() in (3, 4):
        return weight.movedim(1, -1).reshape(weight.shape[0], -1)
    if weight.dim() != 2:
        raise ValueError(f"sparsegemm.prune: expected a Linear [N, K], Conv1d [Cout, Cin, k] or Conv2d "
                         f"[Cout, Cin, kh, kw] weight, got shape {tuple(weight.shape)}")
    return weight


def _from_gemm_view(matrix: Tensor, weight_shape: torch.Size) -> Tensor:
    """Inverse of :func:`gemm_view` for a weight of ``weight_shape``."""
    if len(weight_shape) in (3, 4):
        cout, cin, *taps = weight_shape
        return matrix.reshape(cout, *taps, cin).movedim(-1, 1).contiguous()
    return matrix


def _layer_gemm_view(module: nn.Module, t: Tensor) -> Tensor:
    """``t``, of the shape of ``module``'s weight, as the GEMM's ``[N, K]``: :func:`gemm_view`, or
    for a Conv1D, which stores ``[K, N]``, a contiguous copy of the transpose (the callers view its
    rows as groups of four)."""
    return t.t().contiguous() if is_conv1d(module) else gemm_view(t)


def _layer_from_gemm_view(module: nn.Module, matrix: Tensor, weight_shape: torch.Size) -> Tensor:
    """Inverse of :func:`_layer_gemm_view`."""
    return matrix.t() if is_conv1d(module) else _from_gemm_view(matrix, weight_shape)


def kept_share(weight: Tensor) -> float:
    """The share of ``sum |w|`` that the magnitude 2:4 mask keeps (1.0 for an all-zero weight)."""
    w = gemm_view(weight.detach()).float()
    total = float(w.abs().sum())
    return float((w.abs() * mask_2to4(w)).sum()) / total if total else 1.0


def _groups(matrix: Tensor) -> Tensor:
    """``[N, K]`` -> ``[N, G, 4]``, the last group padded with zeros (False for a mask)."""
    n, k = matrix.shape
    padded = torch.nn.functional.pad(matrix, (0, fmt.padded_k(k) - k))
    return padded.view(n, -1, 4)


# ---------------------------------------------------------------------------------------------
# Masks


class Mask2to4(nn.Module):
    """Parametrization ``weight = where(mask, original, 0)``; ``mask`` (weight's shape) is a buffer.

    ``where`` rather than a product, so that a NaN or inf outside the mask cannot leak in.
    """

    def __init__(self, mask: Tensor):
        super().__init__()
        self.register_buffer("mask", mask)

    def forward(self, weight: Tensor) -> Tensor:
        return torch.where(self.mask, weight, torch.zeros((), dtype=weight.dtype, device=weight.device))


def _mask_of(module: nn.Module) -> Optional[Mask2to4]:
    if not parametrize.is_parametrized(module, "weight"):
        return None
    found = [p for p in module.parametrizations.weight if isinstance(p, Mask2to4)]
    return found[0] if found else None


def prunable_layers(model: nn.Module, filter_fn: Optional[Callable[[str, nn.Module], bool]] = None
                    ) -> list[tuple[str, nn.Module]]:
    """The ``(name, module)`` of every nn.Linear, transformers' Conv1D (GPT-2's layers: 2:4 along
    their ``in`` dimension, dim 0 of the stored weight), nn.Conv1d and nn.Conv2d that a 2:4 mask
    suits: grouped, depthwise and non-zero-padded convs are left out (SparseConv1d / SparseConv2d
    cannot take them), and so are layers whose weight is no parameter (torch.nn.utils.weight_norm's
    old form computes it from weight_g and weight_v in a hook: no mask can be attached to it),
    uninitialized lazy layers (:func:`sparsegemm.nn.weight_skip_reason`), layers whose weight is
    shared (tied: each holder would mask it its own way, and the masks compound; sparsify leaves
    them dense too), layers whose weight another parametrization computes (a new-style weight_norm,
    orthogonal: the mask would be chosen on, and sparsegpt would correct, the tensor it starts from,
    not the weight the layer multiplies by) and whatever ``filter_fn(name, module)`` rejects."""
    layers = []
    holders = _tensor_holders(model)
    for name, mod in model.named_modules():
        if isinstance(mod, (nn.Conv1d, nn.Conv2d)) and conv_skip_reason(mod) is not None:
            continue
        # A mask is a parametrization of a parameter: a weight held as a buffer or a plain tensor takes none.
        if not (isinstance(getattr(mod, "weight", None), nn.Parameter) or parametrize.is_parametrized(mod, "weight")):
            continue
        if weight_skip_reason(mod) is not None or any(len(holders[id(t)]) > 1 for t in _weight_tensors(mod)):
            continue
        if parametrize.is_parametrized(mod, "weight") and any(
                not isinstance(p, Mask2to4) for p in mod.parametrizations.weight):
            continue
        if (isinstance(mod, (nn.Linear, nn.Conv1d, nn.Conv2d)) or is_conv1d(mod)) and (
                filter_fn is None or filter_fn(name, mod)):
            layers.append((name, mod))
    return layers


def _tensor_holders(model: nn.Module) -> dict:
    """id(parameter or buffer) -> ids of the distinct modules holding it (a module registered under
    two names counts once: it holds its own weight, however often the model runs it)."""
    holders = collections.defaultdict(set)
    for mod in model.modules():
        for t in (*mod._parameters.values(), *mod._buffers.values()):
            if t is not None:
                holders[id(t)].add(id(mod))
    return holders


def _weight_tensors(module: nn.Module) -> list:
    """The tensors ``module.weight`` is made of: the parameter, or a parametrization's originals
    (weight_norm's two among them)."""
    if parametrize.is_parametrized(module, "weight"):
        return [t for t in module.parametrizations.weight._parameters.values() if t is not None]
    weight = module._parameters.get("weight")
    return [] if weight is None else [weight]


def masked_layers(model: nn.Module) -> dict[str, Tensor]:
    """``{name: mask}`` for every layer of ``model`` that carries a 2:4 mask (weight's shape)."""
    return {name: found.mask for name, mod in model.named_modules() if (found := _mask_of(mod)) is not None}


def _attach(module: nn.Module) -> Mask2to4:
    """The module's mask, attached all-True (nothing pruned yet) when it has none."""
    found = _mask_of(module)
    if found is None:
        weight = module.weight
        found = Mask2to4(torch.ones(weight.shape, dtype=torch.bool, device=weight.device))
        parametrize.register_parametrization(module, "weight", found)
    return found


def _force_share(module: nn.Module, share: float) -> None:
    """Make at least ``share`` of the module's 2:4 groups exactly 2:4, never undoing earlier ones.

    A group counts as done when its mask keeps at most two weights (a trailing partial group of at
    most two counts from the start). The groups added are those whose magnitude 2:4 pattern (the two
    largest ``|w|`` the mask still keeps) drops the least ``|w|``; ties go to the lower (row, group)
    index, so the choice is deterministic.
    """
    holder = module.parametrizations.weight
    found = _mask_of(module)
    with torch.no_grad():
        weight = holder.original
        n, k = _layer_gemm_view(module, weight).shape
        w = _groups(_layer_gemm_view(module, weight).float().abs())
        k_real = _groups(torch.ones(1, k, dtype=torch.bool, device=weight.device))
        mask = _groups(_layer_gemm_view(module, found.mask)) & k_real
        done = mask.sum(-1) <= 2
        total = done.numel()
        # at least the share asked for; rounded first so that 0.3 * 10 asks for 3, not 4
        target = total if share >= 1.0 else min(total, math.ceil(round(share * total, 9)))
        need = target - int(done.sum())
        if need <= 0:
            return
        # The two largest |w| among what the mask still keeps (of all four, a mask keeping three
        # could lose one of them to a weight it dropped already, leaving one).
        kp = fmt.padded_k(k)
        pattern = _top2_per_group(w.view(n, kp), mask.view(n, kp)).view(mask.shape)
        # NaN and inf costs sort before the finished groups' inf marker: those groups are made 2:4 too.
        big = torch.finfo(w.dtype).max
        dropped = (w * (mask & ~pattern)).sum(-1).nan_to_num(nan=big, posinf=big).masked_fill(done, math.inf).flatten()
        chosen = torch.argsort(dropped, stable=True)[:need]
        flat = mask.view(-1, 4)
        flat[chosen] &= pattern.view(-1, 4)[chosen]
        new_mask = mask.view(n, -1)[:, :k]
        found.mask.copy_(_layer_from_gemm_view(module, new_mask, weight.shape))


METHODS = ("magnitude", "wanda", "sparsegpt")


def prune_one_shot(model: nn.Module, filter_fn: Optional[Callable[[str, nn.Module], bool]] = None, *,
                   method: str = "magnitude", calibration=None, sequential: bool = True, damp: float = 0.01,
                   block_size: int = 128, blocks=None, progress: bool = True) -> dict[str, float]:
    """Attach a 2:4 mask to every prunable layer at once; returns ``{name: share of |w| kept}``
    (of the weight the layer had before).

    ``method`` chooses what each group of four keeps:

    - ``"magnitude"``: the two largest ``|w|`` (the last step of a gradual schedule taken at once).
    - ``"wanda"`` (Sun et al., 2023): the two largest ``|w_k| * ||x_k||``, ``x_k`` the layer's
      input feature k over the calibration data, so that a small weight on a large input outlives
      a large weight on an input that is always near zero. The weights are not changed.
    - ``"sparsegpt"`` (Frantar & Alistarh, 2023): see :func:`sparsegpt_2to4`; the inputs' ``X^T X``
      gives each weight's cost of removal, and the weights that stay are corrected for those
      removed. The corrected weights go to ``parametrizations.weight.original``.

    ``calibration``: for ``"wanda"`` and ``"sparsegpt"``, a tensor (one batch, ``model(batch)``) or
    an iterable of batches, each a tensor, a tuple or list (``model(*batch)``: for a data loader's
    ``(x, y)`` pairs pass ``[x for x, _ in loader]``) or a dict (``model(**batch)``), on the model's
    device; typically a few hundred tokens or images. The model runs in eval mode (no batch-norm
    statistics updated, no dropout) and is put back in its mode afterwards. With ``sequential``
    (the default) the layers are pruned one at a time, in the model's module registration order,
    each from the inputs it gets with the layers before it already pruned: a calibration pass per
    layer, one layer's statistics in memory at a time (if a layer fails, those before it stay
    pruned). Without, all layers from one pass over the model as it is (for sparsegpt every
    layer's K x K statistics in memory at once).

    ``blocks`` (sequential only): the modules the model runs one after the other on a hidden state,
    e.g. a transformer's decoder layers (``model.model.layers`` in transformers), so that the
    calibration costs one pass over the model instead of one per layer, as in SparseGPT's own
    recipe for LLMs: the first block's inputs are recorded (the pass stops there), then block by
    block its layers are calibrated and pruned one at a time on the block's recorded inputs, and
    the pruned block's outputs become the next block's inputs. Each block must take the hidden
    state as its first positional argument and return it (or a tuple / list starting with it);
    its other arguments (attention mask, position embeddings) are the first block's, so run the
    model without a key-value cache (``use_cache=False`` in the batch). Prunable layers outside
    the blocks (a language model's head: leave it out with ``filter_fn``) are then pruned as
    without ``blocks``.

    Layers that already carry a mask keep what it prunes and are completed to 2:4; the calibrated
    methods start from the weight the layer computes with (the masked-out originals count as zero).
    ``filter_fn(name, module)``: prune only the layers for which it returns True (all prunable
    layers by default: :func:`prunable_layers`). ``damp`` and ``block_size``: sparsegpt's settings
    (:func:`sparsegpt_2to4`). ``progress``: a tqdm bar (when installed) over the layers or blocks
    of a calibrated pruning of more than 20 layers.
    """
    op = "sparsegemm.prune.prune_one_shot"
    if method not in METHODS:
        raise ValueError(f"{op}: method must be one of {METHODS}, got {method!r}")
    layers = prunable_layers(model, filter_fn)
    if method == "magnitude":
        if calibration is not None or blocks is not None:
            raise ValueError(f"{op}: magnitude pruning takes no calibration data (nor blocks)")
        kept = {}
        for name, mod in layers:
            # The weight as the model computes with it now: a mask already attached (a gradual
            # schedule cut short) has zeroed its entries, as the calibrated methods see them too.
            before = mod.weight.detach().float().abs()
            _attach(mod)
            _force_share(mod, 1.0)
            total = float(before.sum())
            kept[name] = float((before * _mask_of(mod).mask).sum()) / total if total else 1.0
        return kept
    if calibration is None:
        raise ValueError(f"{op}: method {method!r} needs calibration batches")
    _check_sparsegpt_settings(op, damp, block_size)
    batches = [calibration] if isinstance(calibration, Tensor) else list(calibration)  # several passes
    if not batches:
        raise ValueError(f"{op}: calibration holds no batch")
    kind = "column_norms" if method == "wanda" else "hessian"
    show_progress = progress and len(layers) > 20
    kept = {}

    def prune_group(group: list, run: Callable[[], None]) -> None:
        stats = _calibration_stats(group, run, kind)
        for name, mod in group:
            kept[name] = _prune_calibrated(name, mod, stats[name], method, damp, block_size)

    was_training = model.training
    model.eval()  # no batch-norm statistics updated, no dropout
    try:
        with torch.no_grad():
            if blocks is not None:
                if not sequential:
                    raise ValueError(f"{op}: blocks calibrate layer by layer: pass sequential=True")
                layers = _prune_block_by_block(op, model, layers, batches, list(blocks), prune_group,
                                               show_progress)
            groups = [[layer] for layer in layers] if sequential else [layers]
            for group in progress_bar(groups, "prune", "layer", show_progress and len(groups) > 1):
                prune_group(group, lambda: _run_batches(model, batches))
    finally:
        model.train(was_training)
    return kept


def _run_batches(model: nn.Module, batches: list) -> None:
    for batch in batches:
        if isinstance(batch, dict):
            model(**batch)
        elif isinstance(batch, (tuple, list)):
            model(*batch)
        else:
            model(batch)


class _FirstBlockReached(Exception):
    """Raised by the hook that records the first block's inputs: the rest of the pass is not needed."""


def _prune_block_by_block(op: str, model: nn.Module, layers: list, batches: list, blocks: list,
                          prune_group: Callable, show_progress: bool) -> list:
    """prune_one_shot's ``blocks`` mode: prunes the layers inside ``blocks`` (see there) and those
    that run before the first one, and returns the rest of ``layers`` (outside the blocks, after
    them: a language model's head)."""
    if not blocks:
        raise ValueError(f"{op}: blocks is empty")
    owner = {id(mod): name for name, mod in model.named_modules()}
    for index, block in enumerate(blocks):
        if id(block) not in owner:
            raise ValueError(f"{op}: blocks[{index}] ({type(block).__name__}) is not a module of the model")
    prefixes = tuple(owner[id(block)] + "." for block in blocks)
    outside = [(name, mod) for name, mod in layers
               if not name.startswith(prefixes) and not any(mod is block for block in blocks)]
    recorded = []

    def record(args, kwargs):
        if not args or not isinstance(args[0], Tensor):
            raise ValueError(f"{op}: the first block was called without the hidden state as its first positional "
                             f"argument")
        recorded.append((list(args), kwargs))

    # Layers that run before the first block (a stem: a patch embedding, a convolutional front end),
    # seen in the recording pass, are pruned first, each on passes that stop at the first block; then
    # the first block's inputs are recorded again, so that the blocks calibrate on what the pruned
    # stem gives them, as layer by layer they would.
    called = set()
    hooks = [mod.register_forward_pre_hook(lambda module, args, name=name: called.add(name)) for name, mod in outside]
    try:
        _run_to_block(model, batches, blocks[0], record)
    finally:
        for hook in hooks:
            hook.remove()
    if len(recorded) != len(batches):
        raise ValueError(f"{op}: the model reached the first block ({owner[id(blocks[0])]!r}) in "
                         f"{len(recorded)} of {len(batches)} calibration batches")
    stem = [(name, mod) for name, mod in outside if name in called]
    if stem:
        for layer in stem:
            prune_group([layer], lambda: _run_to_block(model, batches, blocks[0]))
        recorded.clear()
        _run_to_block(model, batches, blocks[0], record)
    for block in progress_bar(blocks, "prune", "block", show_progress):
        prefix = owner[id(block)] + "."
        block_layers = [(name, mod) for name, mod in layers if name.startswith(prefix) or mod is block]

        def run_block(block=block):
            for args, kwargs in recorded:
                block(*args, **kwargs)

        for layer in block_layers:
            prune_group([layer], run_block)
        for args, kwargs in recorded:
            out = block(*args, **kwargs)
            args[0] = out[0] if isinstance(out, (tuple, list)) else out
    return [(name, mod) for name, mod in outside if name not in called]


def _run_to_block(model: nn.Module, batches: list, block: nn.Module,
                  record: Optional[Callable[[tuple, dict], None]] = None) -> None:
    """Runs ``model`` on each batch up to ``block``, which is not run: the pass stops there (the rest
    is not needed); ``record(args, kwargs)`` gets the block's inputs each time."""
    def stop(module, args, kwargs):
        if record is not None:
            record(args, kwargs)
        raise _FirstBlockReached

    handle = block.register_forward_pre_hook(stop, with_kwargs=True)
    try:
        for batch in batches:
            try:
                _run_batches(model, [batch])
            except _FirstBlockReached:
                pass
    finally:
        handle.remove()


def _check_sparsegpt_settings(op: str, damp: float, block_size: int) -> None:
    if not damp > 0:
        raise ValueError(f"{op}: damp must be > 0, got {damp}")
    if not isinstance(block_size, int) or block_size <= 0 or block_size % 4:
        raise ValueError(f"{op}: block_size must be a positive multiple of 4, got {block_size}")


class _InputStats:
    """What a layer's calibration inputs X[T, K] (K in gemm_view's order) add up to: the sum of
    x_k^2 per feature (wanda) or X^T X (sparsegpt), on the weight's device. In float32, as
    SparseGPT's own code sums them: X^T X costs T K^2 multiply-adds a layer, which float64 makes
    2x slower on CPUs and up to 64x on GPUs without full-rate float64; sparsegpt_2to4 then works in
    float64."""

    def __init__(self, k: int, kind: str, device):
        self.kind, self.rows = kind, 0
        shape = (k,) if kind == "column_norms" else (k, k)
        self.sums = torch.zeros(shape, dtype=torch.float32, device=device)

    def add(self, x: Tensor) -> None:
        x = x.to(torch.float32)
        self.sums += (x * x).sum(0) if self.kind == "column_norms" else x.T @ x
        self.rows += x.shape[0]


def _layer_inputs(module: nn.Module, x: Tensor) -> Tensor:
    """The rows X[T, K] that ``module``'s GEMM multiplies: a Linear's (or Conv1D's) inputs, a
    Conv2d's patches in (ky, kx, cin) order, cin fastest (gemm_view's K), a Conv1d's as those of
    the Conv2d of its kernel as one row of taps."""
    if isinstance(module, nn.Linear):
        return x.reshape(-1, module.in_features)
    if is_conv1d(module):
        return x.reshape(-1, module.nx)
    if isinstance(module, nn.Conv1d):
        x = (x if x.dim() == 3 else x.unsqueeze(0)).unsqueeze(2)
        kernel, stride, padding, dilation = _conv1d_taps(module.kernel_size, module.stride, module.padding,
                                                         module.dilation)
    else:
        x = x if x.dim() == 4 else x.unsqueeze(0)
        kernel, stride, padding, dilation = module.kernel_size, module.stride, module.padding, module.dilation
    patches = nn.functional.unfold(x, kernel, dilation, padding, stride)
    b, _, positions = patches.shape  # unfold orders K (cin, ky, kx)
    kh, kw = kernel
    patches = patches.view(b, module.in_channels, kh * kw, positions).permute(0, 3, 2, 1)
    return patches.reshape(b * positions, module.in_channels * kh * kw)  # K named: an empty batch has no -1


def _calibration_stats(layers: list, run: Callable[[], None], kind: str) -> dict[str, _InputStats]:
    """Calls ``run()`` (the calibration passes) with hooks that gather each of ``layers``' input
    statistics, summed over every call of a layer."""
    stats, handles = {}, []
    try:
        for name, mod in layers:
            weight = _layer_gemm_view(mod, _original_weight(mod))
            stats[name] = _InputStats(weight.shape[1], kind, weight.device)

            def hook(module, args, kwargs, name=name):
                x = args[0] if args else kwargs.get("input")
                if not isinstance(x, Tensor):
                    raise ValueError(f"sparsegemm.prune.prune_one_shot: layer {name!r} was called without an "
                                     f"input tensor (positional, or the keyword `input`)")
                x = _layer_inputs(module, x.detach())
                if not torch.isfinite(x).all():
                    raise ValueError(f"sparsegemm.prune.prune_one_shot: layer {name!r} got a non-finite "
                                     f"calibration input")
                stats[name].add(x)

            handles.append(mod.register_forward_pre_hook(hook, with_kwargs=True))
        run()
    finally:
        for handle in handles:
            handle.remove()
    for name, stat in stats.items():
        if stat.rows == 0:
            if isinstance(dict(layers)[name], nn.modules.linear.NonDynamicallyQuantizableLinear):
                fix = ("nn.MultiheadAttention reads its out_proj's weight without calling it); call "
                       "sparsegemm.prune.split_attention(model) first, or leave it out with filter_fn")
            else:
                fix = "the model never called it); leave it out with filter_fn"
            raise ValueError(f"sparsegemm.prune.prune_one_shot: layer {name!r} saw no calibration input ({fix}")
    return stats


def _original_weight(module: nn.Module) -> Tensor:
    """The layer's weight before any mask (the parametrization's original, if it has one)."""
    if parametrize.is_parametrized(module, "weight"):
        return module.parametrizations.weight.original
    return module.weight


def _top2_per_group(score: Tensor, allowed: Tensor) -> Tensor:
    """The mask [N, Kp] keeping, in every group of four, the two largest ``score`` among ``allowed``
    (ties to the lower index, NaN largest, as mask_2to4); never anything outside ``allowed``."""
    n, kp = score.shape
    key = score.masked_fill(~allowed, -math.inf).view(n, kp // 4, 4)
    order = torch.argsort(key, dim=-1, descending=True, stable=True)[..., :2]
    mask = torch.zeros_like(key, dtype=torch.bool).scatter_(-1, order, True)
    return mask.view(n, kp) & allowed


def _pad_k(t: Tensor, kp: int, dims: int = 1) -> Tensor:
    """``t`` with its last ``dims`` dimensions zero-padded to ``kp`` (itself when already that long)."""
    pad = kp - t.shape[-1]
    return t if pad == 0 else nn.functional.pad(t, (0, pad) * dims)


def _prune_calibrated(name: str, module: nn.Module, stats: _InputStats, method: str, damp: float,
                      block_size: int) -> float:
    if not bool(stats.sums.any()):
        # Every score would be zero: wanda would keep positions 0 and 1 whatever |w|, sparsegpt
        # count every input dead and zero the whole weight.
        raise ValueError(f"sparsegemm.prune.prune_one_shot: layer {name!r} got only zero inputs from the "
                         f"calibration batches, which rank none of its weights: calibrate on data that reaches it, "
                         f"or leave it to magnitude pruning (filter_fn here, then method='magnitude')")
    existing = _mask_of(module)
    original = _original_weight(module)
    with torch.no_grad():
        keep = existing.mask if existing is not None else torch.ones_like(original, dtype=torch.bool)
        # The weight the layer computes with: values an earlier mask removed are zeros, however the
        # optimizer moved their originals since.
        live = torch.where(keep, original, torch.zeros((), dtype=original.dtype, device=original.device))
        weight = _layer_gemm_view(module, live).to(torch.float64)
        n, k = weight.shape
        kp = fmt.padded_k(k)
        allowed = _pad_k(_layer_gemm_view(module, keep), kp)  # the pad columns: never kept
        weight = _pad_k(weight, kp)
        if method == "wanda":
            mask = _top2_per_group(weight.abs() * _pad_k(stats.sums.sqrt(), kp), allowed)
            new_weight = weight
        else:
            new_weight, mask = sparsegpt_2to4(weight, _pad_k(stats.sums, kp, dims=2), allowed, damp, block_size,
                                              name=name)
        before = weight.abs().sum()
        kept = float((weight.abs() * mask).sum() / before) if before > 0 else 1.0
        # Attached once the mask is known: a layer whose computation fails is left as it was.
        _attach(module).mask.copy_(_layer_from_gemm_view(module, mask[:, :k], original.shape))
        module.parametrizations.weight.original.copy_(
            _layer_from_gemm_view(module, new_weight[:, :k].to(original.dtype), original.shape))
    return kept


def sparsegpt_2to4(weight: Tensor, hessian: Tensor, allowed: Optional[Tensor] = None, damp: float = 0.01,
                   block_size: int = 128, *, name: Optional[str] = None) -> tuple[Tensor, Tensor]:
    """SparseGPT's 2:4 pruning of ``weight[N, K]`` (K a multiple of 4) for inputs whose ``X^T X``
    is ``hessian[K, K]``: returns ``(pruned weight, mask)`` in float64, the weight zero outside the
    mask. ``allowed[N, K]``: the entries that may be kept (default all). ``name``: the layer, for
    prune_one_shot's errors.

    H is damped by ``damp`` times its mean diagonal; inputs that are always zero (``H_cc = 0``) get
    ``H_cc = 1`` and zero weights, so they go first. With U the upper Cholesky factor of
    ``H^-1 = U^T U``, the columns are taken left to right: at the first column of each group every
    row keeps the two weights with the largest ``w_c^2 / U_cc^2`` (``U_cc^2`` is the inverse
    Hessian's diagonal once the columns left of c are fixed: the output error removing ``w_c``
    would cost), and each column's removed part ``e = (w_c - q_c) / U_cc`` is subtracted, times
    ``U[c, c:]``, from the columns after it (the optimal brain surgeon update: the least-squares
    correction of the columns right of c for removing ``w_c``, with the columns left of c fixed; a
    kept column is not revisited for removals after it, so the result is not the least-squares
    best of the whole mask). Updates to columns past the current block of ``block_size`` are
    deferred and applied as one matrix product per block (the same arithmetic, fewer passes).
    """
    op = "sparsegemm.prune.prune_one_shot" if name is not None else "sparsegemm.prune.sparsegpt_2to4"
    _check_sparsegpt_settings(op, damp, block_size)
    if weight.dim() != 2 or weight.shape[1] % 4 or hessian.shape != (weight.shape[1],) * 2:
        raise ValueError(f"{op}: expected weight [N, K] with K % 4 == 0 and hessian [K, K], got "
                         f"{tuple(weight.shape)} and {tuple(hessian.shape)}")
    if allowed is not None and allowed.shape != weight.shape:
        raise ValueError(f"{op}: expected allowed of the weight's shape {tuple(weight.shape)}, got "
                         f"{tuple(allowed.shape)}")
    k = weight.shape[1]
    w = weight.to(torch.float64, copy=True)
    h = hessian.to(torch.float64, copy=True)
    allowed = torch.ones_like(w, dtype=torch.bool) if allowed is None else allowed.to(torch.bool)
    dead = torch.diagonal(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    torch.diagonal(h).add_(damp * torch.diagonal(h).mean())
    try:
        factor = torch.linalg.cholesky(h)
        del h
        inverse = torch.cholesky_inverse(factor)
        del factor
        u = torch.linalg.cholesky(inverse, upper=True)
        del inverse
    except torch.linalg.LinAlgError as exc:
        layer = f" of {name!r}" if name is not None else ""
        raise ValueError(f"{op}: the calibration Hessian{layer} is not positive definite even damped by {damp}; "
                         f"give more calibration data or a larger damp") from exc
    mask = torch.zeros_like(allowed)
    for b0 in range(0, k, block_size):
        b1 = min(b0 + block_size, k)
        block = w[:, b0:b1].clone()
        errors = torch.zeros_like(block)
        u_block = u[b0:b1, b0:b1]
        diag = torch.diagonal(u_block)
        for c in range(b1 - b0):
            if c % 4 == 0:
                group = slice(c, c + 4)
                score = block[:, group] ** 2 / diag[group] ** 2
                mask[:, b0 + c:b0 + c + 4] = _top2_per_group(score, allowed[:, b0 + c:b0 + c + 4])
            column = block[:, c]
            kept_column = torch.where(mask[:, b0 + c], column, torch.zeros((), dtype=column.dtype, device=column.device))
            error = (column - kept_column) / diag[c]
            block[:, c:] -= error[:, None] * u_block[c, c:][None, :]
            block[:, c] = kept_column
            errors[:, c] = error
        w[:, b0:b1] = block
        w[:, b1:] -= errors @ u[b0:b1, b1:]
    return w, mask


def split_attention(model: nn.Module) -> list[str]:
    """Replace every nn.MultiheadAttention of ``model`` by a
    :class:`~sparsegemm.attention.SplitMultiheadAttention` computing the same (its q, k, v and out
    projections as nn.Linear layers holding copies of the weights), so that the pruning tools mask,
    calibrate and fine-tune them like any Linear: nn.MultiheadAttention holds q, k and v as one raw
    parameter, which no tool masks, and reads out_proj's weight without calling it, so the
    calibrated methods see no input for it. Call it on the dense model before building the
    optimizer (the new layers hold new parameters); :func:`sparsegemm.sparsify` later makes each a
    SparseMultiheadAttention. Attentions it cannot split stay: ``add_bias_kv``, ``add_zero_attn``,
    one whose weights a forward of the model reads, and one shared (registered under several names,
    or holding parameters another module holds too: a copy would untie them). Returns the names of
    those split.

    An nn.TransformerEncoder holding a split attention takes its regular path (see
    :func:`sparsegemm.attention.turn_off_nested_fast_path`; call it yourself when splitting a
    sub-module of the encoder): equal outputs, but for the padded positions of a
    ``src_key_padding_mask``, which torch's nested path returns as zeros and the regular path
    computes like the others."""
    from .convert import _attention_skip_reason, _set_submodule  # convert imports this module
    from .io import parameter_names

    holders = parameter_names(model)
    split = []
    for name in [name for name, mod in model.named_modules() if type(mod) is nn.MultiheadAttention]:
        mha = model.get_submodule(name)
        # What sparsify would leave dense, but for size: no filter, and any size is worth masking.
        if _attention_skip_reason(model, name, mha, None, holders, min_features=0):
            continue
        _set_submodule(model, name, SplitMultiheadAttention.from_dense(mha))
        split.append(name)
    turn_off_nested_fast_path(model)
    return split


def remove_masks(model: nn.Module) -> list[str]:
    """Bake every 2:4 mask into its weight (pruned entries become exact zeros) and drop the
    parametrization, leaving plain layers (nn.Linear, Conv1D, nn.Conv1d, nn.Conv2d) that ``sparsify``
    converts as they are.
    Returns the names of the layers baked."""
    baked = []
    for name, mod in list(model.named_modules()):
        if _mask_of(mod) is not None:
            parametrize.remove_parametrizations(mod, "weight", leave_parametrized=True)
            baked.append(name)
    return baked


def cubic_share(step: int, start_step: int, end_step: int, initial_share: float = 0.0) -> float:
    """The share of groups forced to 2:4 at ``step``: ``initial_share`` until ``start_step``, then
    rising as ``initial_share + (1 - initial_share) (1 - (1 - progress)^3)`` (Zhu & Gupta, 2017:
    prune fast while the weights are redundant, slowly near the end), exactly 1.0 from
    ``end_step`` on."""
    if step >= end_step:
        return 1.0
    if step < start_step:
        return initial_share
    progress = (step - start_step) / (end_step - start_step)
    return initial_share + (1.0 - initial_share) * (1.0 - (1.0 - progress) ** 3)


class GradualPruner:
    """Prunes a growing share of the 2:4 groups of every prunable layer, ending at exact 2:4.

    Usable in any training loop: call :meth:`step` once after each ``optimizer.step()``. At
    ``start_step``, then every ``frequency`` steps and at ``end_step``, each layer's share of
    groups forced to 2:4 is raised to :func:`cubic_share`; the groups chosen are those whose 2:4
    pattern costs the least ``|w|`` at that moment, so the weights left dense meanwhile can adapt.
    ``end_step = 0`` prunes everything on construction (one shot). ``initial_share``: the share
    of groups forced to 2:4 at ``start_step`` (the cubic schedule rises from it to 1 at
    ``end_step``); ``filter_fn(name, module)``: prune only the layers it accepts.

    State: the masks live in ``model.state_dict()`` and the step count in this object's
    ``state_dict()``. To resume, build the model, a GradualPruner with the same arguments (this
    attaches the masks) and the optimizer in the order the first run built them (attaching the
    masks reorders ``model.parameters()``, which an optimizer's state follows by position), then
    load all three.
    """

    def __init__(self, model: nn.Module, end_step: int, *, start_step: int = 0, frequency: int = 1,
                 initial_share: float = 0.0, filter_fn: Optional[Callable[[str, nn.Module], bool]] = None):
        for name, value in (("end_step", end_step), ("start_step", start_step), ("frequency", frequency)):
            # A whole float (0.8 * 1000) is a count; 5.5 steps is not.
            if isinstance(value, bool) or not (isinstance(value, numbers.Integral)
                                               or (isinstance(value, float) and value.is_integer())):
                raise TypeError(f"GradualPruner: {name} must be an integer, got {value!r}")
        end_step, start_step, frequency = int(end_step), int(start_step), int(frequency)
        if not 0 <= start_step <= end_step:
            raise ValueError(f"GradualPruner: need 0 <= start_step <= end_step, got start_step={start_step}, "
                             f"end_step={end_step}")
        if frequency < 1:
            raise ValueError(f"GradualPruner: frequency must be >= 1, got {frequency}")
        if not 0.0 <= initial_share <= 1.0:
            raise ValueError(f"GradualPruner: initial_share must be in [0, 1], got {initial_share}")
        self.start_step, self.end_step, self.frequency = start_step, end_step, frequency
        self.initial_share = initial_share
        self.layers = prunable_layers(model, filter_fn)
        if not self.layers:
            raise ValueError("GradualPruner: the model has no layer to prune (nn.Linear, Conv1D, nn.Conv1d, "
                             "nn.Conv2d)")
        for _, mod in self.layers:
            _attach(mod)
        self.step_count = 0
        self._apply_schedule()

    @property
    def share(self) -> float:
        """The share of groups the schedule asks for now (none before ``start_step``)."""
        if self.step_count < self.start_step:
            return 0.0
        return cubic_share(self.step_count, self.start_step, self.end_step, self.initial_share)

    @property
    def done(self) -> bool:
        """True once the schedule has reached ``end_step``, whose update made every layer exactly
        2:4 (the step count only: masks loaded or pruned some other way do not count)."""
        return self.step_count >= self.end_step

    def step(self) -> None:
        """One training step done: count it, and raise the share of groups at 2:4 where the
        schedule says so."""
        self.step_count += 1
        self._apply_schedule()

    def _apply_schedule(self) -> None:
        t = self.step_count
        update = t == self.end_step or (self.start_step <= t < self.end_step
                                        and (t - self.start_step) % self.frequency == 0)
        if update:
            for _, mod in self.layers:
                _force_share(mod, self.share)

    def state_dict(self) -> dict:
        """The step count (the masks are in the model's state dict)."""
        return {"step_count": self.step_count}

    def load_state_dict(self, state: dict) -> None:
        """Resume at the step count of :meth:`state_dict` (see the class's note on resuming)."""
        count = state.get("step_count") if isinstance(state, dict) else None
        if isinstance(count, float) and count.is_integer():  # a whole float is a count, as in __init__
            count = int(count)
        if isinstance(count, bool) or not isinstance(count, numbers.Integral) or count < 0:
            raise ValueError(f"GradualPruner.load_state_dict: expected {{'step_count': a count >= 0}} (what "
                             f"state_dict() gives), got {state!r}")
        self.step_count = int(count)


# ---------------------------------------------------------------------------------------------
# Channel permutation


# Modules that act on each channel alone, so reordering the channels before them and undoing it
# after changes nothing, by producer type. Elementwise ones after either. Per channel along dim 1
# (pooling and batch norm over the spatial dims): a Conv2d's channels; of a Linear's outputs (its
# features along the last dim) only BatchNorm1d, whose [batch, features] input has them on dim 1
# (2-D pooling or BatchNorm2d after a Linear mix or normalize across its features: max |diff| up
# to 2.7 once permuted).
_ELEMENTWISE = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.GELU, nn.SiLU, nn.Tanh, nn.Sigmoid, nn.ELU, nn.Hardswish,
                nn.Mish, nn.Dropout, nn.Identity)
_CHANNELWISE = {nn.Linear: _ELEMENTWISE + (nn.BatchNorm1d,),
                nn.Conv2d: _ELEMENTWISE + (nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.BatchNorm2d)}


@dataclass(frozen=True)
class ChannelPair:
    """Two layers in a row: ``producer``'s outputs feed ``consumer``'s inputs through the
    channel-wise modules ``between`` (names as in ``model.named_modules()``)."""
    producer: str
    consumer: str
    between: tuple = ()


@dataclass
class PairReport:
    """One pair of :func:`permute_channels`: how much of the consumer's |w| its 2:4 mask keeps
    before and after the reorder, and the swaps the search made (or why it was left alone)."""
    pair: ChannelPair
    channels: int
    kept_before: float           # share of the consumer's sum |w| its 2:4 mask keeps
    kept_after: float
    swaps: int
    skipped: str = ""            # why the pair was left alone


@dataclass
class PermutationReport:
    """What :func:`permute_channels` did: a :class:`PairReport` per pair (``str()``: a table)."""
    pairs: list = field(default_factory=list)

    def __str__(self) -> str:
        rows = [f"{'producer -> consumer':50s} {'C':>6s} {'kept before':>11s} {'after':>7s} {'swaps':>6s}"]
        for r in self.pairs:
            name = f"{r.pair.producer} -> {r.pair.consumer}"
            if r.skipped:
                rows.append(f"{name:50.50s} {r.channels:>6d}  skipped: {r.skipped}")
            else:
                rows.append(f"{name:50.50s} {r.channels:>6d} {r.kept_before:>11.2%} {r.kept_after:>7.2%} "
                            f"{r.swaps:>6d}")
        return "\n".join(rows)


def find_channel_pairs(model: nn.Module) -> list[ChannelPair]:
    """Producer/consumer pairs found inside every nn.Sequential of ``model``: a Linear followed by
    a Linear, or a Conv2d by a Conv2d, with only channel-wise modules (activations, dropout,
    batch norm, pooling after a Conv2d) between. Other wirings (residuals, concatenations, a
    Sequential subclass with a forward of its own) are not guessed: give them to
    :func:`permute_channels` only if the producer feeds nothing else."""
    pairs = []
    for seq_name, seq in model.named_modules():
        # A subclass's own forward may wire its children otherwise (a skip connection around them).
        if not isinstance(seq, nn.Sequential) or type(seq).forward is not nn.Sequential.forward:
            continue
        prefix = f"{seq_name}." if seq_name else ""
        # Every entry, a module registered twice included (named_children drops the repeat: a shared
        # LayerNorm between two pairs vanished from the second); permute_channels refuses those.
        children = [(name, child) for name, child in seq._modules.items() if child is not None]
        for i, (pname, producer) in enumerate(children):
            if type(producer) not in (nn.Linear, nn.Conv2d):
                continue
            between = []
            for cname, child in children[i + 1:]:
                if type(child) is type(producer):
                    pairs.append(ChannelPair(prefix + pname, prefix + cname, tuple(between)))
                    break
                if not isinstance(child, _CHANNELWISE[type(producer)]):
                    break
                between.append(prefix + cname)
    return pairs


def search_permutation(matrix: Tensor, max_swaps: Optional[int] = None) -> tuple[Tensor, int]:
    """A column order of ``matrix [R, C]`` (C a multiple of 4) under which 2:4 groups along the
    columns keep more ``sum |m|``; returns ``(perm, swaps)`` with the reordered matrix
    ``matrix[:, perm]``.

    Greedy best swap (the idea of Apex's permutation search): at each step take the exchange of two
    columns in different groups that raises the kept magnitude most, until none raises it. Kept
    magnitude never decreases. Only the two groups of a swap change, so their rows of the gain
    table are all that is recomputed. Float64 throughout, deterministic. ``max_swaps`` bounds the
    steps (default 4 * C).
    """
    r, c = matrix.shape
    if c % 4:
        raise ValueError(f"search_permutation: the number of columns must be a multiple of 4, got {c}")
    a = matrix.detach().to("cpu", torch.float64).abs()
    if not bool(torch.isfinite(a).all()):  # NaN gains never compare: it swapped until max_swaps
        raise ValueError("search_permutation: the matrix holds NaN or inf, which no channel order keeps more or "
                         "less of")
    a_by_column = a.T.contiguous()  # [C, R]: the sums over rows run along contiguous memory
    g = c // 4
    perm = torch.arange(c)
    group_of = torch.arange(c) // 4
    max_swaps = 4 * c if max_swaps is None else max_swaps
    tolerance = 1e-12 * float(a.sum())

    # Sums over rows are matrix-vector products with ones: torch's threaded reductions cost
    # milliseconds per call at these sizes, a GEMV microseconds, and the search makes thousands.
    ones = torch.ones(r, dtype=torch.float64)

    def table(groups: Tensor) -> tuple[Tensor, Tensor]:
        """For the given groups: kept[g] and gain[g, p, ch] = kept magnitude of group g with the
        column at position p replaced by column ch. With the other three sorted o1 >= o2 >= o3,
        the top two of {o1, o2, o3, x} sum to o1 + o2 + max(0, x - o2)."""
        cols = a_by_column[perm.view(g, 4)[groups]]                            # [n, 4, R]
        kept = cols.topk(2, dim=1).values.sum(1) @ ones                         # [n]
        gains = []
        for p in range(4):
            others = torch.cat([cols[:, :p], cols[:, p + 1:]], dim=1).topk(2, dim=1).values  # [n, 2, R]
            base = others.sum(1) @ ones                                         # [n]
            extra = (a_by_column[None] - others[:, 1:2]).clamp_min(0) @ ones    # [n, C]
            gains.append(base[:, None] + extra)
        return kept, torch.stack(gains, dim=1)                                  # [n], [n, 4, C]

    chunk = max(1, 4_000_000 // max(1, r * c * 4))  # bounds the [R, n, C] temporaries
    parts = [table(torch.arange(s, min(g, s + chunk))) for s in range(0, g, chunk)]
    kept = torch.cat([p[0] for p in parts])
    gain = torch.cat([p[1] for p in parts])
    same_group = group_of[:, None] == group_of[None, :]
    swaps = 0
    while swaps < max_swaps:
        # by_position[u, v]: group of position u, with u's column replaced by the column at v.
        by_position = gain.view(c, c)[:, perm]
        delta = by_position + by_position.T - kept[group_of][:, None] - kept[group_of][None, :]
        delta.masked_fill_(same_group, -math.inf)
        best = int(torch.argmax(delta))
        if float(delta.view(-1)[best]) <= tolerance:
            break
        u, v = divmod(best, c)
        perm[[u, v]] = perm[[v, u]]
        touched = torch.tensor([int(group_of[u]), int(group_of[v])])
        kept[touched], gain[touched] = table(touched)
        swaps += 1
    return perm, swaps


def _channel_matrix(consumer: nn.Module) -> Tensor:
    """The consumer's weight as ``[rows, channels]``, each row holding whole 2:4 groups of input
    channels: a Linear's weight, a Conv2d's with each (cout, ky, kx) tap as a row."""
    w = consumer.weight.detach()
    return w.permute(0, 2, 3, 1).reshape(-1, w.shape[1]) if w.dim() == 4 else w


def _shared_names(model: nn.Module) -> tuple:
    """(ids of the modules ``model`` holds in more than one place, ids of the tensors more than one
    of its modules holds): permuting one of those in place would change its other uses too."""
    modules = collections.Counter(id(m) for _, m in model.named_modules(remove_duplicate=False))
    return {i for i, n in modules.items() if n > 1}, {i for i, held in _tensor_holders(model).items() if len(held) > 1}


def _pair_skip_reason(producer: nn.Module, consumer: nn.Module, between: list, shared: tuple) -> str:
    if _mask_of(producer) is not None or _mask_of(consumer) is not None:
        return "already masked: permute channels before pruning"
    for role, mod in (("producer", producer), ("consumer", consumer)):
        reason = weight_skip_reason(mod)
        if reason:  # a hook recomputes the weight: the permuted copy would be lost, the other side kept
            return f"{role}: {reason}"
    shared_modules, shared_tensors = shared
    for mod in (producer, consumer, *between):
        tensors = [t for t in (*mod.parameters(recurse=False), *mod.buffers(recurse=False))]
        if id(mod) in shared_modules and tensors:  # a stateless activation may run anywhere
            return f"{type(mod).__name__} is used in more than one place: permuting it would change its other uses"
        if any(id(t) in shared_tensors for t in tensors):
            return (f"{type(mod).__name__} shares a tensor with another module (tied weights): permuting it would "
                    "change the other module too")
    if type(producer) not in (nn.Linear, nn.Conv2d) or type(consumer) is not type(producer):
        return (f"needs Linear -> Linear or Conv2d -> Conv2d, got {type(producer).__name__} -> "
                f"{type(consumer).__name__}")
    for mod in (producer, consumer):
        if isinstance(mod, nn.Conv2d) and mod.groups != 1:
            return f"grouped convolution (groups={mod.groups})"
    produced, consumed = producer.weight.shape[0], consumer.weight.shape[1]
    if produced != consumed:
        return f"producer gives {produced} channels, consumer takes {consumed}"
    if consumed % 4:
        return f"{consumed} channels is not a multiple of 4 (2:4 groups would straddle taps or the tail)"
    if consumer.weight.device.type == "meta" or not bool(torch.isfinite(consumer.weight).all()):
        return "the consumer's weight holds no finite values (NaN, inf, or on the meta device)"
    for mod in between:
        if not isinstance(mod, _CHANNELWISE[type(producer)]):
            return f"{type(mod).__name__} between them is not channel-wise for a {type(producer).__name__}'s outputs"
    return ""


def _permute_rows(module: nn.Module, perm: Tensor) -> None:
    """Reorder a producer's outputs (or a batch norm's channels) in place: parameters and buffers
    that have one entry per channel along dim 0."""
    with torch.no_grad():
        for name in ("weight", "bias", "running_mean", "running_var"):
            t = getattr(module, name, None)
            if isinstance(t, Tensor):
                t.copy_(t[perm.to(t.device)])


def permute_channels(model: nn.Module, pairs: Optional[list[ChannelPair]] = None,
                     max_swaps: Optional[int] = None) -> PermutationReport:
    """Reorder channels between consecutive layers so that the consumer's 2:4 mask keeps more
    ``|w|``, without changing what the model computes (run it on the dense model, before pruning).

    For each pair the consumer's input channels are permuted by :func:`search_permutation` and
    the producer's outputs (and the channel-wise modules between, e.g. batch norm) by the same
    order. ``pairs`` defaults to :func:`find_channel_pairs`. Pairs that cannot be permuted are
    reported with the reason and left alone. ``max_swaps``: each pair's search bound
    (:func:`search_permutation`).
    """
    report = PermutationReport()
    shared = _shared_names(model)
    for pair in find_channel_pairs(model) if pairs is None else pairs:
        producer, consumer = model.get_submodule(pair.producer), model.get_submodule(pair.consumer)
        between = [model.get_submodule(name) for name in pair.between]
        channels = consumer.nx if is_conv1d(consumer) else consumer.weight.shape[1]
        reason = _pair_skip_reason(producer, consumer, between, shared)
        if reason:
            report.pairs.append(PairReport(pair, channels, 0.0, 0.0, 0, reason))
            continue
        before = kept_share(consumer.weight)
        perm, swaps = search_permutation(_channel_matrix(consumer), max_swaps)
        with torch.no_grad():
            consumer.weight.copy_(consumer.weight[:, perm.to(consumer.weight.device)])
        for mod in [producer, *between]:
            _permute_rows(mod, perm)
        report.pairs.append(PairReport(pair, channels, before, kept_share(consumer.weight), swaps))
    return report
