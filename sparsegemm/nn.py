"""Drop-in modules: SparseLinear and SparseConv2d hold only the compressed weight.

Both keep ``values`` (the kept weights, trainable: the 2:4 mask stays fixed), ``metadata`` (the
logical metadata E, a uint8 buffer) and ``bias``. No dense copy of the weight is stored anywhere;
``dense_weight()`` rebuilds it on demand. On CUDA the hardware-ordered metadata is made once per
device, on the first forward after a move, and reused.
"""
from __future__ import annotations

import contextlib
import contextvars
import math
import numbers
import warnings
from typing import NamedTuple, Optional

import torch
from torch import Tensor, nn

from . import format as fmt
from . import ops
from .functional import compress, decompress, linear_parts
from .tensor import KernelMetaCache, SparseTensor24, check_int8_values, check_metadata, check_padding_values


# Attributes whose assignment invalidates what a layer derived from them (_forget_derived).
_DERIVED_FROM = frozenset({"metadata", "weight_shape", "backend", "quantize", "activation"})
# Tensors the reordered metadata does not depend on: assigning one drops only the plan made with
# the layer's tensors (SparseLinear's eager plan; SparseExperts' tables follow them by identity and
# storage). FSDP2 assigns values and bias at every unshard and reshard, and each assignment had the
# metadata reordered again (on CUDA under autograd: new memory and a host sync).
_TENSOR_ONLY = frozenset({"values", "bias", "scale", "input_scale"})


# A layer's caches of what it derives from its stored weight (_forget_derived), which pickles and
# deep copies leave behind.
_DERIVED_STATE = ("_kernel_meta", "_metadata_state", "_eager_plan")

# True within sparsegemm.load, which validates every layer of a checkpoint before it loads any:
# its load_state_dict calls skip the same check in each layer's _load_from_state_dict.
_state_dict_validated = contextvars.ContextVar("sparsegemm_state_dict_validated", default=False)


@contextlib.contextmanager
def state_dict_validated():
    """Within it, layers take the weights of a state dict validated already (sparsegemm.load)."""
    token = _state_dict_validated.set(True)
    try:
        yield
    finally:
        _state_dict_validated.reset(token)


# The metadata of a layer with no weight loaded yet: every group (0, 1), a valid pattern.
_UNLOADED_META_BYTE = fmt.PAD_NIBBLE | (fmt.PAD_NIBBLE << 4)


def _layer_label(prefix: str) -> str:
    """A layer named in load_state_dict's messages by its state-dict prefix."""
    return f"layer {prefix[:-1]!r}" if prefix else "the layer"


class _EagerPlan(NamedTuple):
    """What SparseLinear's eager kernel path launches with, prepared at its first such call."""

    device_index: int          # x.get_device() of the calls it serves (-1: the CPU, for "simt")
    dtype: torch.dtype         # x's dtype, and y's
    api: str                   # "cuda_" or "simt_"
    k: int
    out_features: int
    activation: int            # the kernels' activation code
    values: Tensor             # the layer's own tensors, checked by identity at every call
    bias: Optional[Tensor]
    meta: Tensor
    scale: Optional[Tensor]    # INT8: the per-row weight scale
    input_scale: Optional[Tensor]  # static INT8: the calibrated 0-d activation scale (None: per token)
    data_ptrs: tuple           # (values, bias, input_scale) data_ptr() when made: a swapped .data is noticed
    kernel_meta: Tensor


class _SparseWeight(nn.Module):
    """The compressed-weight storage shared by SparseLinear and SparseConv2d."""

    quantize: Optional[str] = None  # "int8": int8 values with a per-row scale (SparseLinear only)

    def forward(self, input: Tensor) -> Tensor:  # noqa: A002  nn.Linear's name: models call fc(input=x)
        # Under torch.autocast, nn.Linear and nn.Conv2d compute in autocast's dtype. A compressed
        # weight has one dtype, which is not converted at every call: the layer computes in it (an
        # INT8 layer: in its bias's dtype, or autocast's without a bias), with x cast to it and
        # autocast off inside, so that the result is the one the layer gives outside autocast.
        x = input
        if x.is_floating_point() and not x.is_meta and torch.is_autocast_enabled(x.device.type):  # meta: no autocast
            if self.quantize != "int8":
                dtype = self.values.dtype
            else:
                dtype = self.bias.dtype if self.bias is not None else torch.get_autocast_dtype(x.device.type)
            with torch.autocast(x.device.type, enabled=False):
                return self._forward(x.to(dtype))
        return self._forward(x)

    def _init_storage(self, n: int, k: int, dtype: torch.dtype, device, bias: bool) -> None:
        """``dtype``: of the values and bias; with quantize="int8", of the bias and the activations
        (the values are int8, frozen: the integer grid has no gradient)."""
        self.weight_shape = (n, k)
        # The floating dtype the layer computes in: its values' and bias's, or for INT8 its bias's and
        # activations', which a bias-less INT8 layer holds no tensor of (its dense size is counted in it).
        self.float_dtype = dtype
        if self.quantize == "int8":
            self.values = nn.Parameter(torch.zeros(n, fmt.values_cols(k), dtype=torch.int8, device=device),
                                       requires_grad=False)
            self.register_buffer("scale", torch.ones(n, dtype=torch.float32, device=device))
            # Static mode (Int8Calibrator): one calibrated activation scale; None = per token.
            self.register_buffer("input_scale", None)
        else:
            self.values = nn.Parameter(torch.zeros(n, fmt.values_cols(k), dtype=dtype, device=device))
        meta = ops.versioned(torch.empty(n, fmt.meta_cols(k), dtype=torch.uint8, device=device))
        meta.fill_(_UNLOADED_META_BYTE)
        # Not "meta": torch.export's ExportedProgram.module() registers the buffers of an exported
        # root on a GraphModule, whose own `meta` attribute that name would clash with.
        self.register_buffer("metadata", meta)
        # An INT8 layer trains nothing of its own by default (its input gets the straight-through
        # gradient: ops._int8_linear_grads): the bias is frozen too.
        self.bias = (nn.Parameter(torch.zeros(n, dtype=dtype, device=device), requires_grad=self.quantize != "int8")
                     if bias else None)
        self._forget_derived()
        self._remember_metadata()

    def reset_parameters(self) -> None:
        """The state the constructor gives, in place: zero values and bias, the valid all-(0, 1)
        metadata pattern, unit INT8 scales. For a layer built on the meta device and materialized
        with ``to_empty`` (FSDP calls this then), whose uninitialized metadata may hold illegal
        nibbles (a GPU's result is then undefined); load the weight after it."""
        with torch.no_grad():
            self.values.zero_()
            self.metadata.fill_(_UNLOADED_META_BYTE)
            if self.bias is not None:
                self.bias.zero_()
            if self.quantize == "int8":
                self.scale.fill_(1.0)
                if self.input_scale is not None:  # static: the calibrated scale, to be loaded or set
                    self.input_scale.fill_(1.0)
        self._forget_derived()
        self._remember_metadata()

    def _load_compressed(self, sw: SparseTensor24, bias: Optional[Tensor]) -> None:
        """Take over ``sw``, made for this layer by compress / quantize_weight, without a copy (a copy
        was a second compressed weight in memory while converting), and a copy of ``bias``. The
        layer's own tensors are replaced, not written into: SparseLinear.from_dense builds it on the
        meta device, so that converting holds no zero-filled storage beside the compressed weight."""
        with torch.no_grad():
            # Assignments: __setattr__ forgets what was derived.
            self.values = nn.Parameter(sw.values, requires_grad=self.values.requires_grad)
            self.metadata = ops.versioned(sw.meta)
            if sw.scale is not None:
                self.scale = sw.scale
            if self.bias is not None:
                self.bias = nn.Parameter(bias.detach().to(self.bias.dtype, copy=True),
                                         requires_grad=self.bias.requires_grad)
        self._remember_metadata()

    def sparse_weight(self) -> SparseTensor24:
        """The weight as a SparseTensor24 sharing this module's storage (and reordered-metadata cache)."""
        self._check_metadata_unchanged()
        sw = SparseTensor24(self.values.detach(), self.metadata, self.weight_shape,
                            self.scale if self.quantize == "int8" else None, validate=False)
        if self.quantize == "int8":
            sw._kernel_meta = self._kernel_meta  # keyed by backend; _apply frees it on a move
        return sw

    def _matrix_dense(self) -> Tensor:
        if self.quantize == "int8":
            from .quant import dequantize

            return dequantize(self.sparse_weight())
        return decompress(self.sparse_weight())

    def _forget_derived(self) -> None:
        """Drop what was derived from the stored weight (made again on the next forward): the
        reordered metadata per backend and device (set aside, to be made again in the same memory:
        KernelMetaCache), and any SparseExperts' grouped tables."""
        cache = self.__dict__.get("_kernel_meta")
        if not isinstance(cache, KernelMetaCache):  # none yet, or a dict of a module pickled long ago
            self.__dict__["_kernel_meta"] = KernelMetaCache()
        else:
            cache.forget()
        _layers_generation[0] += 1

    def _check_metadata_unchanged(self) -> None:
        """Forget what was derived from the metadata if the tensor was swapped past __setattr__
        (torch.func.functional_call, ``_buffers``, ``.data =``) or changed in place (a ``copy_``
        into the buffer: a broadcast, an edit): its identity, storage or version counter moved.
        Not while torch.compile traces: a compiled graph (like a captured CUDA graph) keeps the
        reordered copy it was made with. A buffer made under torch.inference_mode has no version
        counter; a parametrized one is a new tensor at every access."""
        if torch.compiler.is_compiling():
            return
        meta = self._buffers.get("metadata")
        if meta is None:  # parametrized
            meta = self.metadata
        # The tensor itself, not its id: one freed and one made at its address may share both.
        numbers = ops.storage_state(meta)
        seen = self.__dict__.get("_metadata_state")
        if seen is None or seen[0] is not meta or seen[1] != numbers:
            if seen is not None and seen[0] is meta and self._may_read_metadata(meta):
                # Changed in place: checked once, as a load is. An average over every buffer of a
                # model (an EMA: AveragedModel(use_buffers=True), timm's ModelEmaV2, a loop over the
                # state dict) computes p * d + q * (1 - d) in float and truncates it back to uint8,
                # 217 -> 216 even for equal p and q: nibbles no kernel can read, which gave outputs
                # up to 0.8 off, silently.
                check_metadata(f"{type(self).__name__}: its metadata buffer was changed in place and is no longer "
                               "2:4 (average only floating-point tensors: the metadata is an index, "
                               "not a number)", meta, self.weight_shape[1])
            self._forget_derived()
            self.__dict__["_metadata_state"] = (meta, numbers)

    @staticmethod
    def _may_read_metadata(meta: Tensor) -> bool:
        """Whether checking the metadata's contents now is allowed: a plain tensor (not a wrapped
        one of a torch.func transform) outside CUDA graph capture (no host copy there)."""
        return (type(meta) is Tensor and not torch._C._are_functorch_transforms_active()
                and not (meta.is_cuda and torch.cuda.is_current_stream_capturing()))

    def _remember_metadata(self) -> None:
        """Take the metadata buffer as it is now as checked (made by the layer, loaded, copied with
        it), so that an in-place change from here on is checked at the next call."""
        meta = self._buffers.get("metadata")
        if meta is not None:
            self.__dict__["_metadata_state"] = (meta, ops.storage_state(meta))

    def __prepare_scriptable__(self):
        # torch.jit.script calls this on every submodule first: without it, it failed on the class's
        # annotations ("Unknown type annotation: 'Optional[str]'"), naming neither the layer nor a way.
        raise TypeError(f"{type(self).__name__}: torch.jit.script cannot compile it (its forward runs sparsegemm's "
                        "custom ops through Python); torch.jit.trace, torch.export and torch.compile take it")

    def __setattr__(self, name: str, value) -> None:
        super().__setattr__(name, value)
        if name in _TENSOR_ONLY and "_eager_plan" in self.__dict__:
            self.__dict__["_eager_plan"] = None
        elif name in _DERIVED_FROM and "_kernel_meta" in self.__dict__:
            self._forget_derived()

    def __getstate__(self) -> dict:
        # What was derived from the stored weight stays behind (made again after loading): a pickle
        # or deepcopy carried every reordered metadata copy.
        state = super().__getstate__()
        for key in _DERIVED_STATE:
            state.pop(key, None)
        return state

    def __setstate__(self, state) -> None:
        super().__setstate__(state)
        self._forget_derived()  # the caches __getstate__ left behind, empty
        self._remember_metadata()
        if "float_dtype" not in self.__dict__:  # a module pickled whole before it was kept
            self.float_dtype = self.bias.dtype if self.bias is not None else (
                torch.float16 if self.quantize == "int8" else self.values.dtype)

    def _apply(self, fn, recurse=True):
        # The float dtype follows .half() / .to(dtype) as the bias does (a zero-size probe of fn); one
        # no kernel takes (.double()) is refused before anything changes, not at the next forward.
        converted = fn(torch.empty(0, dtype=self.float_dtype, device=self.values.device)).dtype
        if (converted.is_floating_point or converted.is_complex) and converted not in ops.FLOAT_DTYPES:
            raise TypeError(f"{type(self).__name__}: cannot convert to {converted}: its weight and bias (an INT8 "
                            f"layer's output) take one of {ops.FLOAT_DTYPES}; for a {converted} reference use "
                            f"dense_weight().to({converted})")
        self._forget_derived()  # moved or converted: reorder again on the next forward
        # INT8 scales stay float32 whatever .half() / .to(dtype) asks: only their device follows.
        scales = {name: getattr(self, name) for name in ("scale", "input_scale")
                  if getattr(self, name, None) is not None}
        # The metadata (uint8) and INT8 values keep the format's dtypes too: Module.type() casts every
        # tensor, and left a layer no op takes. Cast back, exactly (integers below 256 in every dtype).
        formats = {name: t.dtype for name, t in (*self._parameters.items(), *self._buffers.items())
                   if t is not None and not t.is_floating_point()}
        out = super()._apply(fn, recurse)
        for name, dtype in formats.items():
            if name in self._parameters and self._parameters[name].dtype != dtype:
                self._parameters[name].data = self._parameters[name].data.to(dtype)
            elif name in self._buffers and self._buffers[name].dtype != dtype:
                self._buffers[name] = self._buffers[name].to(dtype)
        for name, value in scales.items():
            # to_empty from meta: uninitialized memory on the device, as every other tensor gets.
            moved = (torch.empty_like(value, device=self.values.device) if value.is_meta and not self.values.is_meta
                     else value.to(self.values.device))
            setattr(self, name, moved)
        if converted.is_floating_point:
            self.float_dtype = converted
        self._kernel_meta.keep_only_on(self.metadata.device)  # copies on a device the weight left: freed
        self._remember_metadata()
        return out

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        self._forget_derived()  # new metadata: the reordered copies are stale
        # State dicts and checkpoints made before the buffer's rename call it "meta".
        if prefix + "meta" in state_dict and prefix + "metadata" not in state_dict:
            state_dict[prefix + "metadata"] = state_dict.pop(prefix + "meta")
        error = self._state_dict_weight_error(state_dict, prefix)
        if error is not None:  # an error of load_state_dict's, as a size mismatch is; the layer left as it was
            error_msgs.append(error)
            return
        self._explain_other_layouts(state_dict, prefix)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        meta = self._buffers.get("metadata")
        if meta is not None:  # assigned (load into a shell) under inference mode: keep a version counter
            self._buffers["metadata"] = ops.versioned(meta)
        self._remember_metadata()  # checked as it was loaded (_state_dict_weight_error)
        self._refresh_kernel_meta()

    def _refresh_kernel_meta(self) -> None:
        """Make the kernel-layout copies set aside again now, in their own memory: a CUDA graph
        captured over the layer then replays with the weight just loaded, as with nn.Linear's
        in-place load, not with new values beside the old metadata's copy."""
        meta = self.metadata
        if torch.compiler.is_compiling() or meta.is_meta or not ops.may_cache_reorder(meta):
            return
        with torch.no_grad():  # outside autograd: made in their own memory (KernelMetaCache.store)
            for key in self._kernel_meta.stale_keys(meta.device):
                backend = key if isinstance(key, str) else key[0]  # INT8 (SparseTensor24.kernel_meta) / 16-bit
                if (backend == "cuda") != meta.is_cuda:
                    continue  # a load assigned tensors of another device: made at the next call there
                if isinstance(key, str):
                    self.sparse_weight().kernel_meta(key)
                else:
                    self._kernel_meta_for(backend)

    def _explain_other_layouts(self, state_dict, prefix: str) -> None:
        """Beside torch's missing / unexpected keys, a warning of what a state dict of another kind of
        layer means: a dense layer's, or a static INT8 layer's loaded into a dynamic one. (A warning:
        whether the load is strict is only known above this call, and strict=False must not fail.)"""
        where = _layer_label(prefix)
        if prefix + "weight" in state_dict and prefix + "values" not in state_dict:
            warnings.warn(f"{where} holds a compressed weight, the state dict a dense one ({prefix}weight), which "
                          "it does not load: load it into the dense model and convert that (sparsify / from_dense), "
                          "or save and load with sparsegemm.save / sparsegemm.load", stacklevel=2)
        if prefix + "input_scale" in state_dict and self._buffers.get("input_scale", False) is None:
            warnings.warn(f"{where} quantizes its inputs per token, the state dict holds a static input_scale, which "
                          "it does not load: call set_input_scale (any value) on the layer before loading it",
                          stacklevel=2)

    def _state_dict_weight_error(self, state_dict, prefix: str) -> Optional[str]:
        """What is wrong with the compressed weight a state dict brings, or None: illegal metadata
        nibbles, int8 values of -128, zero or NaN scales (a static layer's input_scale too), int8
        values for a float layer or float ones for an INT8 layer (which torch would cast). Loaded
        silently, such a weight gave results made of whatever the nibbles select (on a GPU:
        undefined). Each tensor is checked by itself,
        where it is a real tensor of the layer's own tensor's size: other sizes are torch's to report,
        and meta, fake and distributed tensors have no data to read here."""
        if _state_dict_validated.get() or torch.compiler.is_compiling():
            return None
        int8 = self.quantize == "int8"

        def given(name: str) -> Optional[Tensor]:
            own = self._parameters.get(name, self._buffers.get(name))
            t = state_dict.get(prefix + name)
            usable = (type(t) in ops._PLAIN_TENSORS and not t.is_meta and own is not None
                      and t.shape == own.shape)
            return t if usable else None

        values, meta, scale = given("values"), given("metadata"), given("scale") if int8 else None
        # A static layer's activation scale: the kernels read it on the device as it is (no host
        # read per call), so a zero, NaN or inf one loaded here gave NaN / inf outputs there.
        input_scale = given("input_scale") if int8 else None
        op = f"the state dict's compressed weight for {_layer_label(prefix)}"
        try:
            if values is not None and (values.dtype == torch.int8) != int8:
                raise ValueError(f"{op}: values are {values.dtype}, the layer's {self.values.dtype}: "
                                 + ("build it with quantize='int8' to load an INT8 weight" if not int8 else
                                    "an INT8 layer loads int8 values"))
            if values is not None and int8:
                check_int8_values(op, values)
            from .quant import check_scale

            if scale is not None:
                check_scale(op, "scale", scale, self.weight_shape[0])
            if input_scale is not None:
                check_scale(op, "input_scale", input_scale.reshape(1), 1)
            if meta is not None:
                if meta.dtype != torch.uint8:  # torch would cast it, wrapping what lies past a byte
                    raise ValueError(f"{op}: metadata must be uint8 (2-bit indices, four a byte), got {meta.dtype}")
                check_metadata(op, meta, self.weight_shape[1])
                if values is not None:
                    check_padding_values(op, values, meta, self.weight_shape[1])
            self._check_state_dict_geometry(op, state_dict, prefix)
        except ValueError as exc:
            return str(exc)
        return None

    def _check_state_dict_geometry(self, op: str, state_dict, prefix: str) -> None:
        """Refuse (ValueError) a state dict whose tensors fit this layer's but describe another layer:
        nothing to check for a Linear, whose N and K are its weight's whole shape."""

    def _kernel_meta_for(self, backend: str) -> Tensor:
        self._check_metadata_unchanged()
        key = (backend, self.metadata.device)
        cached = self._kernel_meta.get(key)
        if cached is not None:
            return cached[1]
        kernel = ops.reorder_meta(self.metadata, self.weight_shape[1], backend)
        return self._kernel_meta.store(key, kernel) if ops.may_cache_reorder(self.metadata) else kernel

    def _sparse_linear(self, x: Tensor, activation: Optional[str] = None) -> Tensor:
        return linear_parts(x, self.values, self.metadata, self.weight_shape, self.bias, activation=activation,
                            backend=self.backend, kernel_meta=self._kernel_meta_for, op=type(self).__name__)

    def validate(self, tensors: Optional[dict] = None) -> None:
        """Check the stored weight (shapes, dtypes, metadata, scales) as a checkpoint load does; or,
        given ``tensors`` (entries of this layer's state dict by their names here, e.g. a
        checkpoint's before they are loaded), those."""
        stored = (lambda name: getattr(self, name)) if tensors is None else tensors.get
        int8 = self.quantize == "int8"
        SparseTensor24(stored("values").detach(), stored("metadata"), self.weight_shape,
                       stored("scale") if int8 else None)
        input_scale = stored("input_scale") if int8 else None
        if input_scale is not None:
            from .quant import check_scale

            check_scale(type(self).__name__, "input_scale", input_scale.reshape(1), 1)

    def dense_dtype(self) -> torch.dtype:
        """The dtype of the dense weight this layer stands for: its values', or for an INT8 layer its
        bias's, or without a bias the float dtype it was made in (and converted to since)."""
        if self.quantize != "int8":
            return self.values.dtype
        return self.bias.dtype if self.bias is not None else self.float_dtype

    def _bytes_repr(self) -> str:
        n, k = self.weight_shape
        held = self.sparse_weight().nbytes
        dense = n * k * self.dense_dtype().itemsize
        kind = "int8, per-row scale" if self.quantize == "int8" else str(self.values.dtype).replace("torch.", "")
        return f"dtype={kind}, {held} bytes ({dense - held} saved vs dense)"


def _compress_weight(w: Tensor, dtype: torch.dtype, prune: bool, quantize: Optional[str]) -> SparseTensor24:
    """A dense weight compressed as a SparseLinear of ``dtype`` (and ``quantize``) stores it."""
    if quantize == "int8":
        from .quant import quantize_weight

        # Selection and scales come from the weight in its own precision (the GPU compress
        # kernel takes 16-bit weights only).
        return quantize_weight(w if w.device.type == "cpu" else w.to(dtype), prune=prune)
    return compress(w.to(dtype), prune=prune)


class SparseLinear(_SparseWeight):
    """``nn.Linear`` with a 2:4-compressed weight: ``y = x @ W^T + bias`` for x ``[..., in_features]``.

    ``backend`` (None: by device) can be set to "simt" to run the CUDA kernels in the emulator.
    ``quantize="int8"`` holds int8 values with a per-row ``scale`` buffer and quantizes the input
    per token on every forward (or with the calibrated ``input_scale``, see
    :class:`sparsegemm.quant.Int8Calibrator`); ``dtype`` is then the bias and activation dtype.

    ``activation`` fuses an activation into the GEMM's epilogue (:data:`sparsegemm.format.ACTIVATIONS`).
    A gated one ("swiglu", "geglu", "reglu"; see :meth:`from_gate_up`) makes this layer a GLU's
    two input projections in one GEMM: ``act(x @ gate^T + b_gate) * (x @ up^T + b_up)``, with
    ``out_features`` outputs and a stored weight of ``2 * out_features`` interleaved rows.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *,
                 dtype: torch.dtype = torch.float16, device=None, backend: Optional[str] = None,
                 quantize: Optional[str] = None, activation: Optional[str] = None):
        super().__init__()
        if in_features <= 0 or out_features <= 0:
            raise ValueError(f"SparseLinear: in_features and out_features must be positive, got "
                             f"{in_features}, {out_features}")
        if quantize not in (None, "int8"):
            raise ValueError(f"SparseLinear: quantize must be None or 'int8', got {quantize!r}")
        ops.check_dtype_value("SparseLinear", "dtype", dtype, ops.FLOAT_DTYPES)
        # The name here; a gated layer's row count below, where the message can speak of out_features.
        gated = fmt.is_gated(ops.activation_code("SparseLinear", activation, 0))
        if gated and out_features % fmt.GATE_ROWS:
            raise ValueError(f"SparseLinear: a gated activation ({activation!r}) needs out_features a multiple of "
                             f"{fmt.GATE_ROWS}, got {out_features}")
        rows = 2 * out_features if gated else out_features  # a gated layer stores gate and up rows
        self.in_features, self.out_features = in_features, out_features
        self.backend = backend
        self.quantize = quantize
        self.activation = activation
        self._init_storage(rows, in_features, dtype, device, bias)

    @classmethod
    def from_dense(cls, linear: nn.Linear, *, dtype: Optional[torch.dtype] = None, prune: bool = True,
                   backend: Optional[str] = None, quantize: Optional[str] = None,
                   activation: Optional[str] = None) -> "SparseLinear":
        """Compress ``linear``'s weight (magnitude 2:4 when ``prune``, else it must already be 2:4).

        ``linear`` is an nn.Linear or transformers' ``Conv1D`` (GPT-2's layers, :func:`is_conv1d`),
        whose ``[in, out]`` weight becomes the layer's ``[out, in]`` one, 2:4 along ``in`` as always.

        ``quantize="int8"``: prune, then quantize per output channel
        (:func:`sparsegemm.quant.quantize_weight`); ``dtype`` is the activation dtype.
        ``activation`` ("relu", "gelu", "silu") is fused into the GEMM: the layer then computes
        ``act(linear(x))``; gated activations take two projections (:meth:`from_gate_up`).
        ``backend``: where the layer runs (None: by its tensors' device; "simt": the CUDA kernels in
        the CPU emulator).
        """
        if not (is_conv1d(linear) or isinstance(linear, nn.Linear)):
            raise TypeError(f"SparseLinear.from_dense: expected nn.Linear or transformers' Conv1D, got "
                            f"{type(linear).__name__}")
        reason = weight_skip_reason(linear)
        if reason:
            raise ValueError(f"SparseLinear.from_dense: {reason}")
        # A Conv1D stores [in, out]: the GEMM's W is its transpose.
        weight = linear.weight.detach().t() if is_conv1d(linear) else linear.weight.detach()
        if activation in fmt.GATED_ACTIVATIONS:
            raise ValueError(f"SparseLinear.from_dense: {activation!r} is gated and needs a gate and an up "
                             f"projection: use SparseLinear.from_gate_up")
        try:
            return cls._from_weight(weight, linear.bias, dtype=dtype, prune=prune, backend=backend,
                                    quantize=quantize, activation=activation)
        except ValueError as exc:
            if prune or not is_conv1d(linear):
                raise
            # A weight that is not 2:4 (prune=False), named in the transpose's rows and columns.
            raise ValueError(f"SparseLinear.from_dense: a Conv1D's weight is stored [in, out]; in the error "
                             f"below row r, columns c of the layer's [out, in] weight are its weight[c, r]: {exc}"
                             ) from exc

    @classmethod
    def _from_weight(cls, weight: Tensor, bias: Optional[Tensor], *, dtype: Optional[torch.dtype], prune: bool,
                     backend: Optional[str], quantize: Optional[str],
                     activation: Optional[str] = None) -> "SparseLinear":
        """The layer of ``weight`` [N, K] (with a gated activation: interleaved gate / up rows, N =
        2 * out_features) and ``bias`` [N] or None, compressed; arguments checked by the caller."""
        dtype = dtype or weight.dtype
        out_features = weight.shape[0] // 2 if activation in fmt.GATED_ACTIVATIONS else weight.shape[0]
        mod = cls(weight.shape[1], out_features, bias is not None, dtype=dtype, device="meta",
                  backend=backend, quantize=quantize, activation=activation)  # every tensor replaced below
        mod._load_compressed(_compress_weight(weight, dtype, prune, quantize), bias)
        return mod

    @classmethod
    def from_gate_up(cls, gate: nn.Linear, up: nn.Linear, activation: str = "swiglu", *,
                     dtype: Optional[torch.dtype] = None, prune: bool = True, backend: Optional[str] = None,
                     quantize: Optional[str] = None) -> "SparseLinear":
        """One layer for a GLU's two input projections (a Llama MLP's ``silu(gate(x)) * up(x)`` is
        "swiglu"; "geglu" and "reglu" take gelu and relu): their weights interleaved in runs of 8
        rows (:func:`sparsegemm.format.interleave_gate_up`), then compressed as :meth:`from_dense`
        does. One GEMM reads both and writes only the gated product: no launch, intermediate
        tensor or elementwise kernel of its own for the up projection and the activation.
        """
        if activation not in fmt.GATED_ACTIVATIONS:
            raise ValueError(f"SparseLinear.from_gate_up: activation must be one of "
                             f"{tuple(fmt.GATED_ACTIVATIONS)}, got {activation!r}")
        for name, linear in (("gate", gate), ("up", up)):
            if not isinstance(linear, nn.Linear):
                raise TypeError(f"SparseLinear.from_gate_up: {name} must be an nn.Linear, got {type(linear).__name__}")
        if (gate.in_features, gate.out_features) != (up.in_features, up.out_features) or (
                (gate.bias is None) != (up.bias is None)):
            raise ValueError(f"SparseLinear.from_gate_up: gate ({gate}) and up ({up}) must have the same shape "
                             f"and both or neither a bias")
        if gate.weight.dtype != up.weight.dtype or gate.weight.device != up.weight.device:
            raise ValueError(f"SparseLinear.from_gate_up: gate and up must have one dtype and device, got "
                             f"{gate.weight.dtype} on {gate.weight.device} and {up.weight.dtype} on {up.weight.device}")
        if gate.out_features % fmt.GATE_ROWS:
            raise ValueError(f"SparseLinear.from_gate_up: out_features must be a multiple of {fmt.GATE_ROWS}, got "
                             f"{gate.out_features}")
        detached = [(layer.weight.detach(), None if layer.bias is None else layer.bias.detach()) for layer in (gate, up)]
        return cls._from_gate_up_weights(*detached, activation, dtype=dtype, prune=prune, backend=backend,
                                         quantize=quantize)

    @classmethod
    def _from_gate_up_weights(cls, gate: tuple, up: tuple, activation: str, *, dtype: Optional[torch.dtype],
                              prune: bool, backend: Optional[str], quantize: Optional[str]) -> "SparseLinear":
        """from_gate_up on (weight [H, K], bias [H] or None) pairs, checked by the caller."""
        (w_gate, b_gate), (w_up, b_up) = gate, up
        bias = None if b_gate is None else fmt.interleave_gate_up(b_gate, b_up)
        return cls._from_weight(fmt.interleave_gate_up(w_gate, w_up), bias, dtype=dtype, prune=prune,
                                backend=backend, quantize=quantize, activation=activation)

    def set_input_scale(self, scale: Optional[float]) -> None:
        """Static INT8 mode with this activation scale (a positive number); None: per token again."""
        if self.quantize != "int8":
            raise ValueError("SparseLinear.set_input_scale: the layer is not int8 (quantize=None)")
        if scale is None:
            self.input_scale = None
            return
        from .quant import static_scale

        value = static_scale("SparseLinear.set_input_scale", scale)
        self.input_scale = torch.tensor(value, dtype=torch.float32, device=self.scale.device)

    def _forget_derived(self) -> None:
        super()._forget_derived()
        self._eager_plan: Optional[_EagerPlan] = None

    def _make_eager_plan(self, x: Tensor) -> Optional[_EagerPlan]:
        """The plan for calls like ``x`` on the CUDA kernels (or the SIMT emulator's), or None
        where the general path must run: another backend, arguments its cheap tests do not pass
        (ops.plain_linear_args, quant._dynamic_fast_path), operands the launch would have to make
        contiguous, or a CUDA graph being captured (whose reordered metadata is not kept)."""
        if nn.utils.parametrize.is_parametrized(self):
            return None  # its tensors are computed at each access: nothing to plan with
        n, k = self.weight_shape
        values, bias, meta = self.values, self.bias, self.metadata
        input_scale = None
        if self.quantize == "int8":
            from .quant import _dynamic_fast_path

            sw = self.sparse_weight()
            # The dynamic fast path's tests, and a static scale the kernels read as it is (set_input_scale's;
            # anything else takes linear_int8, which converts it).
            input_scale = self.input_scale
            if input_scale is not None and (type(input_scale) not in ops._PLAIN_TENSORS
                                            or not ops.kernel_readable_scale(input_scale, x.device)):
                return None
            fast = _dynamic_fast_path(x, sw, bias, self.activation, None, None, self.backend)
            if fast is None or not self.scale.is_contiguous():
                return None
            backend, code = fast
            scale = self.scale
        else:
            backend, code = ops.kernel_backend(self.backend, x), ops.usable_activation_code(self.activation, n)
            if backend is None or not ops.plain_linear_args(x, values, n, k, bias, code) or (
                    x.dtype not in ops.KERNEL_DTYPES):
                return None
            scale = None
        if (tuple(values.shape) != (n, fmt.values_cols(k)) or not values.is_contiguous() or meta.device != x.device
                or not ops.may_cache_reorder(meta) or (bias is not None and not bias.is_contiguous())):
            return None
        kernel_meta = sw.kernel_meta(backend) if scale is not None else self._kernel_meta_for(backend)
        return _EagerPlan(x.get_device(), x.dtype, backend + "_", k, ops.out_features(n, code), code, values, bias,
                          meta, scale, input_scale, (values.data_ptr(), ops._ptr(bias), ops._ptr(input_scale)),
                          kernel_meta)

    def _plan_current(self, plan: _EagerPlan) -> bool:
        """Whether ``plan`` still describes this layer: the same tensor objects (functional_call and
        parametrizations swap them through _parameters / _buffers, past __setattr__) over the same
        storage and values dtype (a ``.data`` assignment keeps the object, a view may keep the storage)."""
        params, buffers = self._parameters, self._buffers
        values = plan.values
        return (params.get("values") is values and params.get("bias") is plan.bias
                and buffers.get("metadata") is plan.meta and buffers.get("scale") is plan.scale
                and buffers.get("input_scale") is plan.input_scale
                and values.dtype is (plan.dtype if plan.scale is None else torch.int8)
                # A .data swap can land on the old address with another dtype (the kernels would read
                # its bytes as the planned one's).
                and (plan.bias is None or plan.bias.dtype is plan.dtype)
                and (plan.scale is None or plan.scale.dtype is torch.float32)
                and (plan.input_scale is None or plan.input_scale.dtype is torch.float32)
                and (values.data_ptr(), ops._ptr(plan.bias), ops._ptr(plan.input_scale)) == plan.data_ptrs)

    def _eager_forward(self, x: Tensor) -> Optional[Tensor]:
        """The eager kernel path, or None. A decode-size layer's forward costs as much host time
        as its GEMM takes on the GPU, most of it in the general path's argument handling (the
        functional API's checks, the custom op, the INT8 entry's tests); a plain tensor on the
        layer's device, with nothing to trace or record for autograd, skips all of that: the
        plan, checked once, holds the backend, sizes, activation and reordered metadata."""
        if (torch.compiler.is_compiling() or torch.jit.is_tracing() or type(x) is not Tensor  # traced: the custom ops
                or torch._C._are_functorch_transforms_active()):  # vmap's wrapped x: no pointer to launch with
            return None
        self._check_metadata_unchanged()
        plan = self._eager_plan
        if plan is None or not self._plan_current(plan):
            plan = self._eager_plan = self._make_eager_plan(x)
            if plan is None:
                return None
        k = plan.k
        if (x.dtype is not plan.dtype or x.get_device() != plan.device_index or x.dim() < 1 or x.shape[-1] != k
                or not x.is_contiguous()
                or (torch.is_grad_enabled() and (x.requires_grad or plan.values.requires_grad
                                                 or (plan.bias is not None and plan.bias.requires_grad)
                                                 or (plan.input_scale is not None and plan.input_scale.requires_grad)))
                or (plan.device_index >= 0 and plan.device_index != torch.cuda.current_device())
                # A bias-less INT8 layer computes in autocast's dtype there (forward), not in x's.
                or (plan.bias is None and self.quantize == "int8" and torch.is_autocast_enabled(x.device.type))):
            return None
        m = x.numel() // k
        if m == 0:
            return None
        n = plan.values.shape[0]
        ops.check_gemm_32bit(type(self).__name__, m, n, k)
        x2 = x.view(m, k)
        y = torch.empty((m, plan.out_features), dtype=plan.dtype, device=x.device)
        stream = ops._stream(x) if plan.device_index >= 0 else 0
        if plan.scale is None:
            ops.launch_gemm(plan.api, stream, x2, plan.values, plan.kernel_meta, plan.bias, plan.activation, y)
        else:
            if plan.input_scale is not None and plan.device_index < 0:
                # On the CPU (the emulator) its value is checked at each call, as linear_int8 does there.
                from .quant import static_scale

                static_scale("sparsegemm.quant.quantize_activations_static", plan.input_scale.detach())
            ops.launch_s8(plan.api, stream, x2, plan.values, plan.kernel_meta, plan.scale, plan.bias,
                          plan.activation, y, plan.input_scale)
        return y if x.dim() == 2 else y.view(*x.shape[:-1], plan.out_features)

    def forward(self, input: Tensor) -> Tensor:  # noqa: A002  nn.Linear's name
        y = self._eager_forward(input)
        return y if y is not None else super().forward(input)

    def _forward(self, x: Tensor) -> Tensor:
        if self.quantize == "int8":
            from .quant import linear_int8

            return linear_int8(x, self.sparse_weight(), self.bias, activation=self.activation,
                               input_scale=self.input_scale, backend=self.backend)
        return self._sparse_linear(x, self.activation)

    def dense_weight(self) -> Tensor:
        """The equivalent dense (pruned) weight ``[out_features, in_features]``, computed now (a
        gated layer: its ``[2 * out_features, in_features]`` interleaved gate / up rows)."""
        return self._matrix_dense()

    def extra_repr(self) -> str:
        act = "" if self.activation is None else f"activation={self.activation}, "
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"{act}{self._bytes_repr()}")


# The activations a gated MLP's act_fn may compute, and the gated epilogue each becomes.
_GATED_FOR_ACT = {name: ops._TORCH_ACTIVATIONS[fmt.ACTIVATION_CODES[base]]
                  for name, base in fmt.GATED_ACTIVATIONS.items()}


def _gated_activation_of(act, device) -> Optional[str]:
    """The gated epilogue whose activation ``act`` computes (SiLU, exact GELU, ReLU), told by its
    values on [-6, 6] and at magnitudes up to 10^4 rather than its class: transformers has its own
    SiLU / GELU modules, and clamped ones (ReLU6, a GELU clipped to +-10) agree with them near 0."""
    if not callable(act):
        return None
    if torch.device(device).type == "meta":  # an empty shell's MLP (load with device=): probed on the CPU
        device = "cpu"
    far = torch.tensor([10.0, 20.0, 50.0, 100.0, 1e3, 1e4], device=device)
    t = torch.cat([torch.linspace(-6.0, 6.0, 97, device=device), far, -far])
    try:
        with torch.no_grad():
            out = act(t)
    except Exception:  # an activation that needs more than a float32 vector is none of ours
        return None
    for name, reference in _GATED_FOR_ACT.items():
        if isinstance(out, Tensor) and out.shape == t.shape and torch.allclose(out.float(), reference(t), rtol=1e-5,
                                                                               atol=1e-6):
            return name
    return None


class GatedParts(NamedTuple):
    """The pieces of a gated MLP ``down(act(x gate^T + b_gate) * (x up^T + b_up))``."""

    label: str                  # how the report names the fused pair, e.g. "gate_proj+up_proj"
    names: tuple                # attribute names of the gate / up layers (for filter_fn)
    gate: tuple                 # (weight [H, K], bias [H] or None)
    up: tuple
    down: nn.Module
    act: object                 # the activation module / callable


# Gated MLP layouts in transformers: (gate, up, down, activation) attribute names. Llama, Mistral,
# Qwen2 and most others; Mixtral's experts (w1 / w3 / w2); Phi-3, whose gate_up_proj holds the
# gate rows and then the up rows (forward: gate, up = gate_up_proj(x).chunk(2, dim=-1)).
_GATED_LAYOUTS = (("gate_proj", "up_proj", "down_proj", "act_fn"), ("w1", "w3", "w2", "act_fn"),
                  ("gate_up_proj", None, "down_proj", "activation_fn"))


def gated_mlp_parts(mlp: nn.Module) -> Optional[GatedParts]:
    """The parts of ``mlp`` when it has the attributes of a gated layout (plain nn.Linear layers
    and an activation), else None; what they compute is for :func:`gated_mlp_activation` to check."""
    for gate_name, up_name, down_name, act_name in _GATED_LAYOUTS:
        gate, down = getattr(mlp, gate_name, None), getattr(mlp, down_name, None)
        up = getattr(mlp, up_name, None) if up_name else gate
        if not (type(gate) is nn.Linear and type(up) is nn.Linear and type(down) is nn.Linear
                and hasattr(mlp, act_name)):
            continue
        if up_name is None:  # one layer, gate rows first
            w, b = gate.weight.detach(), None if gate.bias is None else gate.bias.detach()
            h = w.shape[0] // 2
            return GatedParts(gate_name, (gate_name,), (w[:h], None if b is None else b[:h]),
                              (w[h:], None if b is None else b[h:]), down, getattr(mlp, act_name))
        return GatedParts(f"{gate_name}+{up_name}", (gate_name, up_name),
                          (gate.weight.detach(), None if gate.bias is None else gate.bias.detach()),
                          (up.weight.detach(), None if up.bias is None else up.bias.detach()), down,
                          getattr(mlp, act_name))
    return None


def gated_mlp_activation(mlp: nn.Module, parts: Optional[GatedParts]) -> tuple[Optional[str], str]:
    """(gated activation, "") when ``mlp``, with ``parts = gated_mlp_parts(mlp)``, is a gated MLP
    in one of transformers' layouts whose activation computes SiLU, exact GELU or ReLU and whose
    forward is ``down(act(gate(x)) * up(x))``; else (None, why not). The forward is checked on a
    probe input (one token, no gradient) against that formula on the module's own weights: a model
    whose MLP computes something else is left alone, not silently changed."""
    if parts is None:
        return None, "no gated MLP layout (gate_proj / up_proj / down_proj, w1 / w3 / w2, gate_up_proj)"
    for name in parts.names:
        reason = weight_skip_reason(getattr(mlp, name))
        if reason:
            return None, f"{name}: {reason}"
    (w_gate, b_gate), (w_up, b_up) = parts.gate, parts.up
    activation = _gated_activation_of(parts.act, w_gate.device)
    if activation is None:
        return None, (f"its activation {type(parts.act).__name__} computes none of SiLU, exact GELU, ReLU "
                      "(no fused gated epilogue)")
    if w_gate.shape != w_up.shape or parts.down.in_features != w_gate.shape[0] or (b_gate is None) != (b_up is None):
        return None, f"{parts.label} and the down projection shapes do not chain"
    if w_gate.shape[0] % fmt.GATE_ROWS:
        return None, f"intermediate size {w_gate.shape[0]} is not a multiple of {fmt.GATE_ROWS}"
    if w_gate.is_meta:
        # An empty shell (load with device=) has no weights to run: its layout and activation are
        # checked, its forward was when the checkpoint's model was sparsified.
        return activation, ""
    linear = torch.nn.functional.linear
    # A random token, and one whose gate and up pre-activations of one row are about 50: past the
    # limit of a clamped SwiGLU (DeepSeek-V4's MLP clamps at 10), which the random token stays
    # within. The row with the largest gate and up norms, so that no other row's pre-activation is
    # driven much further (fp16 would overflow).
    probes = [torch.randn(w_gate.shape[1], generator=torch.Generator().manual_seed(0))]
    with torch.no_grad():  # norms in fp32 where the weights are, without an fp32 copy of them
        norms = torch.minimum(torch.linalg.vector_norm(w_gate, dim=1, dtype=torch.float32),
                              torch.linalg.vector_norm(w_up, dim=1, dtype=torch.float32))
    if norms.numel() and norms.max() > 0:
        row = int(norms.argmax())
        gate, up = w_gate[row].detach().float().cpu(), w_up[row].detach().float().cpu()
        probes.append(50 * (gate / gate.square().sum() + up / up.square().sum()))
    for probe in probes:
        probe = probe[None].to(w_gate.device, w_gate.dtype)
        with torch.no_grad():
            try:
                got = mlp(probe)
                want = parts.down(parts.act(linear(probe, w_gate, b_gate)) * linear(probe, w_up, b_up))
            except Exception as exc:  # a forward that needs more than x (or fails on it) is not the plain MLP
                return None, f"its forward cannot be probed with one input ({type(exc).__name__})"
        why = _probe_mismatch(got, want, 1e-3)
        if why:
            return None, f"its forward is not down(act(gate(x)) * up(x)) ({why})"
    return activation, ""


def _probe_mismatch(got, want: Tensor, tolerance: float) -> str:
    """Why a probe's output ``got`` is not ``want`` (within ``tolerance`` of want's largest
    magnitude), or "" when it is."""
    if not isinstance(got, Tensor) or got.shape != want.shape:
        return f"an output of shape {tuple(getattr(got, 'shape', ()))}, {tuple(want.shape)} expected"
    got, want = got.float(), want.float()
    if not (torch.isfinite(got).all() and torch.isfinite(want).all()):
        return "non-finite outputs on the probe"
    scale = float(want.abs().max()) + 1e-30
    if not torch.allclose(got, want, rtol=tolerance, atol=tolerance * scale):
        return f"off by {float((got - want).abs().max()) / scale:.1%} of the largest output"
    return ""


class SparseGatedMLP(nn.Module):
    """A gated MLP (``down(act(gate(x)) * up(x))``) as two layers: ``gate_up``, one SparseLinear
    whose gated epilogue computes ``act(gate) * up`` (:meth:`SparseLinear.from_gate_up`), and
    ``down_proj`` (a SparseLinear, or the dense layer when it was not converted). Two GEMM
    launches per block instead of three GEMMs and two elementwise kernels; made by
    ``sparsify(model, fuse_gated_mlp=True)``.
    """

    def __init__(self, gate_up: SparseLinear, down_proj: nn.Module):
        super().__init__()
        if gate_up.activation not in fmt.GATED_ACTIVATIONS:
            raise ValueError(f"SparseGatedMLP: gate_up must have a gated activation, got {gate_up.activation!r}")
        self.gate_up, self.down_proj = gate_up, down_proj

    @classmethod
    def from_dense(cls, mlp: nn.Module, *, dtype: Optional[torch.dtype] = None, prune: bool = True,
                   backend: Optional[str] = None, quantize: Optional[str] = None) -> "SparseGatedMLP":
        """The gate and up projections of ``mlp`` (see :func:`gated_mlp_activation`) fused and
        compressed; its down projection is kept as it is (sparsify converts it as any Linear).
        ``dtype``, ``prune``, ``backend`` and ``quantize`` as for :meth:`SparseLinear.from_dense`."""
        parts = gated_mlp_parts(mlp)
        activation, why = gated_mlp_activation(mlp, parts)
        if activation is None:
            raise ValueError(f"SparseGatedMLP.from_dense: {type(mlp).__name__} is not a gated MLP: {why}")
        return cls._from_checked_parts(parts, activation, dtype=dtype, prune=prune, backend=backend,
                                       quantize=quantize)

    @classmethod
    def _from_checked_parts(cls, parts: GatedParts, activation: str, **compress_args) -> "SparseGatedMLP":
        """from_dense for parts that gated_mlp_activation has passed (sparsify checks first, to report)."""
        return cls(SparseLinear._from_gate_up_weights(parts.gate, parts.up, activation, **compress_args), parts.down)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(self.gate_up(x))


def experts_activation(experts: nn.Module) -> tuple[Optional[str], str]:
    """(gated activation, "") when ``experts`` holds a mixture of experts the way transformers 5
    does (Mixtral, Qwen-MoE, ...: ``gate_up_proj`` [E, 2I, H] with each expert's gate rows first,
    ``down_proj`` [E, H, I], ``act_fn``, and ``forward(hidden_states, top_k_index, top_k_weights)``
    summing ``weight * down(act(gate(x)) * up(x))`` over each token's experts) with an activation
    that computes SiLU, exact GELU or ReLU; else (None, why not). The forward is checked on a probe
    (four tokens, two experts each) against that formula on the module's own weights."""
    gate_up, down = getattr(experts, "gate_up_proj", None), getattr(experts, "down_proj", None)
    if not (isinstance(gate_up, nn.Parameter) and isinstance(down, nn.Parameter) and gate_up.dim() == 3
            and down.dim() == 3 and hasattr(experts, "act_fn")):
        return None, "no 3-D experts layout (gate_up_proj [E, 2I, H], down_proj [E, H, I], act_fn)"
    e, two_i, h = gate_up.shape
    if two_i % 2 or tuple(down.shape) != (e, h, two_i // 2):
        return None, f"gate_up_proj {tuple(gate_up.shape)} and down_proj {tuple(down.shape)} do not chain"
    if (two_i // 2) % fmt.GATE_ROWS:
        return None, f"intermediate size {two_i // 2} is not a multiple of {fmt.GATE_ROWS}"
    activation = _gated_activation_of(experts.act_fn, gate_up.device)
    if activation is None:
        return None, (f"its activation {type(experts.act_fn).__name__} computes none of SiLU, exact GELU, ReLU "
                      "(no fused gated epilogue)")
    apply_gate = getattr(experts, "_apply_gate", None)
    if callable(apply_gate):
        # Families that compute act(gate) * up in a method of their own, some with a clamp (DeepSeek-V4,
        # HunYuan-V4, ...) that a probe's small values would not reach: checked on values far past one.
        values = torch.linspace(-100.0, 100.0, 64).view(2, 32)
        try:
            got = apply_gate(values)
        except Exception as exc:
            return None, f"its _apply_gate cannot be probed on [tokens, 2I] values ({type(exc).__name__})"
        gate, up = values.chunk(2, dim=-1)
        if not isinstance(got, Tensor) or got.shape != gate.shape or not torch.allclose(
                got.float(), _GATED_FOR_ACT[activation](gate) * up, rtol=1e-4, atol=1e-4):
            return None, "its _apply_gate is not act(gate) * up (a clamped SwiGLU?)"
    if gate_up.is_meta:  # an empty shell (load with device=): checked when its model was sparsified
        return activation, ""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(4, h, generator=gen).to(gate_up.device, gate_up.dtype)
    index = torch.stack([torch.arange(4) % e, (torch.arange(4) + 1) % e], dim=1).to(gate_up.device)
    weights = torch.rand(4, 2, generator=gen).to(gate_up.device, gate_up.dtype)
    with torch.no_grad():
        try:
            got = experts(x, index, weights)
        except Exception as exc:  # another forward signature
            return None, f"its forward cannot be probed as forward(hidden_states, top_k_index, top_k_weights) " \
                         f"({type(exc).__name__})"
        # The formula, batched per expert as the module's GEMMs are, so that 16-bit roundings agree
        # but for the order two slots' terms are added in.
        want = torch.zeros_like(x)
        for expert in range(e):
            token, slot = torch.where(index == expert)
            g, u = torch.nn.functional.linear(x[token], gate_up[expert]).chunk(2, dim=-1)
            y = torch.nn.functional.linear(experts.act_fn(g) * u, down[expert]) * weights[token, slot, None]
            want.index_add_(0, token, y)
    why = _probe_mismatch(got, want, 1e-3 if gate_up.dtype in (torch.float32, torch.float64) else 1e-2)
    if why:
        return None, ("its forward is not the sum of weight * down(act(gate(x)) * up(x)) over each token's "
                      f"experts ({why})")
    return activation, ""


class _GroupedOperands(NamedTuple):
    """One projection of SparseExperts' experts for the grouped GEMM: one tensor per expert in each list."""

    values: list
    meta: list                # logical
    kernel_meta: list         # reordered for the backend
    bias: Optional[list]
    scale: Optional[list]     # INT8: the per-row weight scales
    k: int
    activation: int           # the kernels' code
    input_scale: Optional[list]  # static INT8: each expert's activation scale (None: per token)


class _GroupedTables(NamedTuple):
    """What SparseExperts' grouped path launches with: ops.GroupedWeights of its two projections."""

    api: str                  # "cuda_" or "simt_"
    gate_up: ops.GroupedWeights
    gate_up_activation: int   # the kernels' code of the gated epilogue
    down: ops.GroupedWeights


# Bumped whenever a compressed layer forgets what it derived from its tensors (an assignment, a move,
# a state-dict load, a metadata change it noticed): SparseExperts' grouped tables are then made again.
_layers_generation = [0]


class SparseExperts(nn.Module):
    """A mixture of experts as transformers 5 stores it (see :func:`experts_activation`) with each
    expert 2:4: ``gate_up[e]`` one SparseLinear with the gated epilogue, ``down[e]`` a SparseLinear.
    ``forward(hidden_states [T, H], top_k_index [T, k], top_k_weights [T, k])`` as the dense module's:
    each expert runs its GEMMs on the tokens routed to it (rows of hidden_states gathered), and
    ``weight * output`` is added into those tokens' rows.

    On the CUDA kernels (and the SIMT emulator's), in inference, the experts run as two grouped
    GEMMs (:func:`sparsegemm.grouped_linear`: gate/up of every expert in one launch, then down), with
    the routes grouped on the device: no host synchronisation, so a CUDA graph captures the layer
    with its routing, and torch.compile traces it whole, training included (there the CPU backend
    too runs as the grouped op, whose gradients are each expert's). Elsewhere (the CPU backend in
    eager, eager training) each routed expert runs its two layers."""

    def __init__(self, gate_up: list, down: list):
        super().__init__()
        if len(gate_up) != len(down) or not gate_up:
            raise ValueError(f"SparseExperts: gate_up and down need one layer per expert, got {len(gate_up)} "
                             f"and {len(down)}")
        self.gate_up, self.down = nn.ModuleList(gate_up), nn.ModuleList(down)

    @classmethod
    def from_dense(cls, experts: nn.Module, *, dtype: Optional[torch.dtype] = None, prune: bool = True,
                   backend: Optional[str] = None, quantize: Optional[str] = None) -> "SparseExperts":
        """Every expert of ``experts`` (3-D ``gate_up_proj`` and ``down_proj``, see
        :func:`experts_activation`) as two SparseLinear layers: its gate / up projections fused, its down
        projection. ``dtype``, ``prune``, ``backend`` and ``quantize`` as for
        :meth:`SparseLinear.from_dense`."""
        activation, why = experts_activation(experts)
        if activation is None:
            raise ValueError(f"SparseExperts.from_dense: {type(experts).__name__} is not a mixture of experts "
                             f"this can hold: {why}")
        gate_up, down = experts.gate_up_proj.detach(), experts.down_proj.detach()
        half = gate_up.shape[1] // 2
        args = {"dtype": dtype, "prune": prune, "backend": backend, "quantize": quantize}
        return cls([SparseLinear._from_gate_up_weights((w[:half], None), (w[half:], None), activation, **args)
                    for w in gate_up], [SparseLinear._from_weight(w, None, **args) for w in down])

    def _apply(self, fn, recurse=True):
        self.__dict__.pop("_grouped", None)  # its tables hold the tensors a move replaces
        return super()._apply(fn, recurse)

    def __getstate__(self) -> dict:
        state = super().__getstate__()
        state.pop("_grouped", None)  # its tables: the layers' tensors again, and pointers into them
        return state

    def _layers_state(self) -> tuple:
        """What the grouped tables depend on beyond the layers' generation (assignments, moves and
        loads, _forget_derived): each layer's tensors, by object (functional_call, register_buffer
        and parametrizations swap them past __setattr__) and storage (a ``.data`` swap), the
        metadata's version (an in-place copy: reordered again; an inference tensor has none), and
        whether hooks are set on it (they must see its calls: the per-expert path runs then). Objects
        by id: the cached entry holds them (_layers_tensors), so that no new tensor takes a freed
        one's id and address while it is kept. About a microsecond a layer."""
        state = []
        for layer in (*self.gate_up, *self.down):
            params, buffers = layer._parameters, layer._buffers
            values, bias, meta = params.get("values"), params.get("bias"), buffers.get("metadata")
            scale, input_scale = buffers.get("scale"), buffers.get("input_scale")
            # Ids, not the tensors (tuples compare unequal tensors elementwise); None where a tensor
            # is missing (parametrized) or absent; no Python helper calls: this runs every call.
            state.append((id(values), None if values is None else values.data_ptr(),
                          id(meta), None if meta is None else meta.data_ptr(),
                          None if meta is None or meta.is_inference() else meta._version,
                          id(bias), None if bias is None else bias.data_ptr(),
                          id(scale), None if scale is None else scale.data_ptr(),
                          id(input_scale), None if input_scale is None else input_scale.data_ptr(),
                          bool(layer._forward_pre_hooks or layer._forward_hooks)))
        return _layers_generation[0], state

    def _layers_tensors(self) -> list:
        """Every tensor _layers_state names by id, for the cached tables to hold."""
        return [(layer._parameters.get(name) if name in ("values", "bias") else layer._buffers.get(name))
                for layer in (*self.gate_up, *self.down)
                for name in ("values", "metadata", "bias", "scale", "input_scale")]

    def _grouped_operands(self, hidden_states: Tensor) -> Optional[tuple]:
        """(backend, gate/up operands, down operands) for calls like ``hidden_states``; or None where
        the experts' layers do not allow the grouped launches (another backend or device, mixed
        layers, static and per-token INT8 in one projection, a dtype they do not take, tensors that
        are not contiguous, parametrized layers, layers with forward hooks such as Int8Calibrator's):
        the per-expert path runs those."""
        backend = ops.kernel_backend(self.gate_up[0].backend, hidden_states)
        dtype, device = hidden_states.dtype, hidden_states.device
        traced = torch.compiler.is_compiling() or torch.jit.is_tracing()
        if backend is None and traced and device.type == "cpu" and self.gate_up[0].backend in (None, "cpu"):
            backend = "cpu"  # traced, the CPU backend too runs as the grouped op (no host read in the graph)
        if backend is None or dtype not in (ops.FLOAT_DTYPES if backend == "cpu" else ops.KERNEL_DTYPES):
            return None
        operands = []
        for layers in (self.gate_up, self.down):
            first = layers[0]
            n, k = first.weight_shape
            int8 = first.quantize == "int8"
            static = int8 and first.input_scale is not None
            code = ops.usable_activation_code(first.activation, n)
            for layer in layers:
                tensors = (layer.values, layer.bias, layer.scale if int8 else None)
                if (nn.utils.parametrize.is_parametrized(layer) or layer._forward_pre_hooks or layer._forward_hooks
                        or layer.weight_shape != first.weight_shape or layer.quantize != first.quantize
                        or layer.activation != first.activation or layer.backend != first.backend
                        or (layer.bias is None) != (first.bias is None) or layer.metadata.device != device
                        or any(t is not None and (t.device != device or not t.is_contiguous()) for t in tensors)
                        or (layer.bias is not None and layer.bias.dtype != dtype)
                        or (layer.values.dtype != (torch.int8 if int8 else dtype))
                        or (int8 and ((layer.input_scale is not None) != static
                                      or (static and not ops.kernel_readable_scale(layer.input_scale, device))
                                      or (backend != "cpu" and (k % 4 or not ops.has_int8_kernels(backend)))))):
                    return None
            if code is None:
                return None
            kernel_meta = [] if backend == "cpu" else [
                layer.sparse_weight().kernel_meta(backend) if int8 else layer._kernel_meta_for(backend)
                for layer in layers]
            biases = None if first.bias is None else [layer.bias for layer in layers]
            operands.append(_GroupedOperands([layer.values for layer in layers], [layer.metadata for layer in layers],
                                              kernel_meta, biases, [layer.scale for layer in layers] if int8 else None,
                                              k, code,
                                              [layer.input_scale.reshape(()) for layer in layers] if static else None))
        gate_up, down = operands
        # The gate/up launch writes out_features columns into a hidden buffer of down's K: a layer built
        # by hand whose gate/up is not gated (N = 2 I, K = I below) wrote past it.
        if down.activation != 0 or not fmt.is_gated(gate_up.activation) or (
                ops.out_features(self.gate_up[0].weight_shape[0], gate_up.activation) != down.k) or (
                self.down[0].weight_shape[0] != hidden_states.shape[-1]):
            return None
        return backend, gate_up, down

    def _make_grouped_tables(self, hidden_states: Tensor) -> Optional[_GroupedTables]:
        """The eager grouped launches' tables (pointers) for calls like ``hidden_states``, or None."""
        operands = self._grouped_operands(hidden_states)
        if operands is None:
            return None
        backend, gate_up, down = operands
        def table(o: _GroupedOperands) -> ops.GroupedWeights:
            return ops.grouped_weights(o.values, o.kernel_meta, o.bias, o.scale, o.k, o.input_scale)

        return _GroupedTables(backend + "_", table(gate_up), gate_up.activation, table(down))

    def _grouped_forward(self, hidden_states: Tensor, top_k_index: Tensor, top_k_weights: Tensor) -> Optional[Tensor]:
        """The grouped path (see the class docstring), or None where the per-expert one must run."""
        if (torch._C._are_functorch_transforms_active()  # wrapped tensors: no pointers
                or hidden_states.dim() != 2 or top_k_index.dim() != 2
                or top_k_index.shape[0] != hidden_states.shape[0] or top_k_weights.shape != top_k_index.shape
                or top_k_index.device != hidden_states.device):
            return None
        # Traced (torch.compile, or torch.jit.trace, which would record the per-expert path's host read
        # of the routing as constants: every later routing then ran the traced one's), the routing runs
        # on the device and the grouped op takes it.
        compiling = torch.compiler.is_compiling() or torch.jit.is_tracing()
        if not compiling and torch.is_grad_enabled() and (
                hidden_states.requires_grad or top_k_weights.requires_grad
                or any(t.requires_grad for layer in (*self.gate_up, *self.down) for t in layer.parameters())):
            return None  # eager training: autograd through the per-expert layers
        if compiling:  # the custom op on the layers' tensors, traced (its autograd serves training)
            operands = self._grouped_operands(hidden_states)
            if operands is None:
                return None
            backend, gate_up, down = operands
        elif type(hidden_states) is not Tensor:
            return None
        else:
            # Eager: the launches' pointer tables, made again when a layer changed or the call's dtype
            # or device did; a refusal is kept as well. Not kept while a CUDA graph is captured: the
            # metadata reordered then is only filled when the graph replays.
            call = (hidden_states.dtype, hidden_states.device)
            cached = self.__dict__.get("_grouped")
            if cached is not None and cached[0] == (self._layers_state(), *call):
                tables = cached[1]
            else:
                tables = self._make_grouped_tables(hidden_states)
                if not (hidden_states.is_cuda and torch.cuda.is_current_stream_capturing()):
                    # The state after making them: reordering may have refreshed a layer's derived data.
                    self.__dict__["_grouped"] = ((self._layers_state(), *call), tables, self._layers_tensors())
            if tables is None:
                return None
            rows, launches = top_k_index.numel(), (tables.gate_up, tables.down)
            if not all(ops.gemm_fits_32bit(rows, w.n, w.k) for w in launches):
                return None  # the per-expert layers: each indexes its own rows (or refuses them clearly)
        tokens, k = top_k_index.shape
        experts = len(self.gate_up)
        # A token routed twice to one expert keeps its first route, with the summed weight: no expert
        # then gets more rows than there are tokens, the bound the launches are sized by.
        same = top_k_index.unsqueeze(-1) == top_k_index.unsqueeze(-2)
        weights = torch.where(same, top_k_weights.unsqueeze(-2), 0).sum(-1)  # not w * same: inf * 0 is NaN
        repeat = (same & torch.ones(k, k, dtype=torch.bool, device=same.device).tril(-1)).any(-1)
        # Routes sorted by expert (padding, -1 or E, and repeats last, routed nowhere); group e is
        # rows offsets[e] .. offsets[e + 1] - 1, found on the device.
        flat = top_k_index.reshape(-1)
        flat = torch.where((flat >= 0) & (flat < experts) & ~repeat.reshape(-1), flat, experts)
        order = torch.argsort(flat, stable=True)
        expert_of_row = flat[order]
        offsets = torch.searchsorted(expert_of_row, torch.arange(experts + 1, device=flat.device))
        # A route to nowhere adds nothing, whatever its weight (0 * inf would be NaN).
        row_weight = torch.where(expert_of_row < experts, weights.reshape(-1)[order], 0)
        token = order // k
        x = hidden_states[token]
        if compiling:
            def grouped(x: Tensor, o: _GroupedOperands) -> Tensor:
                # jit.trace keeps a Python int as it was: "rows of x" (-1) holds for any batch.
                none = ops.no_tensors(x, experts)
                return ops._grouped_linear(x, offsets, o.values, o.meta, o.kernel_meta or none, o.k, o.bias or none,
                                           o.scale or none, o.input_scale or none, o.activation,
                                           -1 if torch.jit.is_tracing() else tokens, backend)

            y = grouped(grouped(x, gate_up), down)
        else:
            hidden = x.new_empty((x.shape[0], tables.down.k))  # rows no expert holds are never read
            y = x.new_zeros((x.shape[0], tables.down.n))       # and stay zero here
            stream = ops._stream(x) if tables.api == "cuda_" else 0
            with torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext():
                ops.launch_grouped(tables.api, stream, x, offsets, tokens, tables.gate_up, tables.gate_up_activation,
                                   hidden)
                ops.launch_grouped(tables.api, stream, hidden, offsets, tokens, tables.down, 0, y)
        out = torch.zeros_like(hidden_states)
        out.index_add_(0, token, (y * row_weight[:, None]).to(out.dtype))
        return out

    def forward(self, hidden_states: Tensor, top_k_index: Tensor, top_k_weights: Tensor) -> Tensor:
        """The mixture's output ``[T, H]`` for the routing given (see the class docstring)."""
        grouped = self._grouped_forward(hidden_states, top_k_index, top_k_weights)
        if grouped is not None:
            return grouped
        if torch.jit.is_tracing():
            # The per-expert path reads the routing on the host: a trace would keep the traced one
            # for every later call, silently.
            raise RuntimeError("SparseExperts: torch.jit.trace records only the grouped op, which these experts' "
                               "layers do not allow (forward hooks, parametrized or mixed layers, or a dtype or K "
                               "the kernels do not take); torch.export and torch.compile take them")
        out = torch.zeros_like(hidden_states)
        experts, k = len(self.gate_up), top_k_index.shape[-1]
        # The routes grouped by expert with one sort and one read of the counts on the host, not a
        # nonzero (a GPU sync) per expert. A padding index (-1, or E as transformers' one_hot has it)
        # routes nowhere; a route's flat index is token * k + slot, in token order within an expert.
        flat = top_k_index.reshape(-1)
        flat = torch.where((flat >= 0) & (flat < experts), flat, experts)
        order = torch.argsort(flat, stable=True)
        counts = torch.bincount(flat, minlength=experts + 1).tolist()
        idle = []  # the layers of experts no route reached
        for gate_up, down, routes in zip(self.gate_up, self.down, order.split(counts)):
            if routes.numel():
                token, slot = routes // k, routes % k
                y = down(gate_up(hidden_states[token])) * top_k_weights[token, slot, None]
                out.index_add_(0, token, y.to(out.dtype))
            else:
                idle += [gate_up, down]
        if idle and torch.is_grad_enabled():
            # Experts no route reached (and the inputs, when no expert ran) still take part, as in the
            # dense module (one tensor for every expert) and in the compiled grouped op: a backward
            # gives them zeros, not None, so that an optimizer treats every expert alike (weight
            # decay, momentum) eager and compiled. A sum over no element adds an exact 0 (no NaN from
            # an inf input), with its grad_fn.
            inputs = (hidden_states, top_k_weights) if len(idle) == 2 * experts else ()
            for t in (*inputs, *(p for layer in idle for p in layer.parameters())):
                if t.requires_grad:
                    out = out + t[:0].sum().to(out.dtype)
        return out


class _ConvTaps(NamedTuple):
    """A convolution's geometry as the kernels take it: (height, width) pairs."""
    kernel_size: tuple
    stride: tuple
    padding: tuple
    dilation: tuple


class SparseConv2d(_SparseWeight):
    """``nn.Conv2d`` (groups = 1) with a 2:4-compressed weight.

    K = Cin * kh * kw is ordered (ky, kx, cin), cin fastest, so that 2:4 groups run along the
    channels of one tap: the order a channels-last (NHWC) input presents. On the CUDA and SIMT
    backends the forward is the implicit-GEMM kernel (sparsegemm::conv2d), which reads the NHWC
    input directly (no im2col buffer) and returns an NCHW-shaped tensor in channels_last memory
    format (its NHWC output, no transpose copy); pass channels_last input to skip the one layout
    copy of x. The CPU backend gathers the patch matrix from a strided NHWC view of x (im2col) and
    runs the sparse GEMM on it, or in inference at large M torch's convolution on the weight
    decompressed for the call (:data:`CPU_TORCH_CONV_MIN_M`).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0, dilation=1,
                 bias: bool = True, *, dtype: torch.dtype = torch.float16, device=None,
                 backend: Optional[str] = None):
        super().__init__()
        if isinstance(padding, str):  # checked first: _pair would split the string into letters
            raise ValueError(f"SparseConv2d: padding must be numbers, got the string {padding!r}")
        if in_channels <= 0 or out_channels <= 0:
            raise ValueError(f"SparseConv2d: in_channels and out_channels must be positive, got "
                             f"{in_channels}, {out_channels}")
        ops.check_dtype_value(type(self).__name__, "dtype", dtype, ops.FLOAT_DTYPES)
        pair = torch.nn.modules.utils._pair
        self.in_channels, self.out_channels = in_channels, out_channels
        taps = _ConvTaps(pair(kernel_size), pair(stride), pair(padding), pair(dilation))
        ops.check_conv_geometry(type(self).__name__, *taps)
        self.kernel_size, self.stride, self.padding, self.dilation = taps
        self.backend = backend
        kh, kw = taps.kernel_size
        # The taps the weight's K is laid out for ((ky, kx, cin) order): kernel_size may not change.
        self._weight_kernel = taps.kernel_size
        self._init_storage(out_channels, in_channels * kh * kw, dtype, device, bias)
        # nn.Conv2d's weight shape, in the state dict: the compressed tensors give only N and K, which
        # convolutions of other channels and kernels share (16 channels 3 x 3 and 144 channels 1 x 1
        # are both K = 144), and a load checks it (_state_dict_weight_error, validate). int64: a
        # dtype conversion leaves it alone, and safetensors stores it as any tensor.
        self.register_buffer("dense_shape", self._dense_shape_tensor(device))

    def _dense_weight_shape(self) -> tuple:
        """The shape of the dense weight this layer stands for, nn.Conv2d's [Cout, Cin, kh, kw]."""
        return (self.out_channels, self.in_channels, *self._weight_kernel)

    def _dense_shape_tensor(self, device) -> Tensor:
        return torch.tensor(self._dense_weight_shape(), dtype=torch.int64, device=device)

    def reset_parameters(self) -> None:
        super().reset_parameters()
        with torch.no_grad():
            self.dense_shape.copy_(self._dense_shape_tensor("cpu"))

    def __setstate__(self, state) -> None:
        super().__setstate__(state)
        if "_weight_kernel" not in self.__dict__:  # a module pickled whole before it was kept
            size = tuple(self.kernel_size) if isinstance(self.kernel_size, (tuple, list)) else (self.kernel_size,) * 2
            self._weight_kernel = (1, size[0]) if len(size) == 1 else size  # SparseConv1d: its (k,) as (1, k)
        if "dense_shape" not in self._buffers:  # likewise
            self.register_buffer("dense_shape", self._dense_shape_tensor(self.values.device))

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        # A state dict from before the layer kept its dense weight shape has none, so nothing to check
        # its geometry by: it loads as it did, strict or not, and the layer keeps its own shape (a
        # real tensor, where the compressed weight is: an empty shell's own is on meta).
        if prefix + "dense_shape" not in state_dict:
            values = state_dict.get(prefix + "values")
            device = values.device if isinstance(values, Tensor) else self.dense_shape.device
            state_dict[prefix + "dense_shape"] = self._dense_shape_tensor(device)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def _check_state_dict_geometry(self, op: str, state_dict, prefix: str) -> None:
        """The dense weight shape the state dict's layer had: one of another geometry with the same N
        and K loaded silently, its K read in another (ky, kx, cin) order (nn.Conv2d refuses it by its
        weight's shape). Any size of it (a Conv1d's three entries against a Conv2d's four)."""
        shape = state_dict.get(prefix + "dense_shape")
        if type(shape) in ops._PLAIN_TENSORS and not shape.is_meta:
            self._check_dense_shape(op, shape)

    def _check_dense_shape(self, op: str, shape: Tensor) -> None:
        """Refuse a ``dense_shape`` other than this layer's weight shape."""
        want = list(self._dense_weight_shape())
        got = shape.tolist() if shape.dim() == 1 else f"a tensor of shape {list(shape.shape)}"
        if got != want:
            names = "[Cout, Cin, k]" if len(want) == 3 else "[Cout, Cin, kh, kw]"
            raise ValueError(f"{op}: dense_shape is {got}, the layer's {want} ({names}): the weight of a convolution "
                             f"of another geometry, which nn.{self._dense_type.__name__} refuses too")

    def validate(self, tensors: Optional[dict] = None) -> None:
        """As :meth:`SparseLinear.validate`, and the ``dense_shape`` buffer against the layer's geometry."""
        super().validate(tensors)
        shape = self.dense_shape if tensors is None else tensors.get("dense_shape")
        if shape is not None:  # a checkpoint from before the layer kept it has none
            self._check_dense_shape(type(self).__name__, shape)

    def _kernel_taps(self) -> _ConvTaps:
        """The geometry as the kernels take it, from the public attributes at every call (an edit
        of stride, padding or dilation takes effect, as on nn.Conv2d)."""
        pair = torch.nn.modules.utils._pair
        taps = _ConvTaps(*(pair(v) for v in (self.kernel_size, self.stride, self.padding, self.dilation)))
        ops.check_conv_geometry(type(self).__name__, *taps)
        return self._check_kernel(taps)

    def _check_kernel(self, taps: _ConvTaps) -> _ConvTaps:
        """``taps``, refused where the kernel differs from the one the weight holds: nn.Conv2d's
        weight shape fixes its kernel whatever ``kernel_size`` says, where here the attribute would
        reread K in another (ky, kx, cin) order, or past the stored columns."""
        if taps.kernel_size != self._weight_kernel:
            raise ValueError(f"{type(self).__name__}: kernel_size is fixed by the compressed weight, which holds a "
                             f"{self._weight_kernel[0]} x {self._weight_kernel[1]} kernel (K = "
                             f"{self.weight_shape[1]}); kernel_size now says {taps.kernel_size[0]} x "
                             f"{taps.kernel_size[1]}")
        return taps

    _dense_type = nn.Conv2d  # what from_dense converts

    @classmethod
    def from_dense(cls, conv: nn.Module, *, dtype: Optional[torch.dtype] = None, prune: bool = True,
                   backend: Optional[str] = None) -> "SparseConv2d":
        """Compress ``conv``'s weight (an nn.Conv2d, or an nn.Conv1d for SparseConv1d; groups = 1)
        along K in (ky, kx, cin) order: magnitude 2:4 when ``prune``, else it must be 2:4 already.
        ``dtype`` converts the weight (default: keep its dtype); ``backend`` as for
        :meth:`SparseLinear.from_dense`. Depthwise and grouped convolutions are refused with the
        reason (:func:`conv_skip_reason`)."""
        op = f"{cls.__name__}.from_dense"
        if not isinstance(conv, cls._dense_type):
            raise TypeError(f"{op}: expected nn.{cls._dense_type.__name__}, got {type(conv).__name__}")
        reason = weight_skip_reason(conv) or conv_skip_reason(conv)
        if reason:
            raise ValueError(f"{op}: {reason}")
        w = conv.weight.detach()
        dtype = dtype or w.dtype
        mod = cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, numeric_padding(conv),
                  conv.dilation, conv.bias is not None, dtype=dtype, device=w.device, backend=backend)
        matrix = w.movedim(1, -1).reshape(conv.out_channels, -1).to(dtype)  # (ky, kx, cin) order; 1-D: (kx, cin)
        mod._load_compressed(compress(matrix, prune=prune), conv.bias)
        return mod

    def _forward(self, x: Tensor) -> Tensor:
        if x.dim() == 3 and x.shape[0] == self.in_channels:  # unbatched [C, H, W], as nn.Conv2d takes it
            return self._forward(x.unsqueeze(0)).squeeze(0)
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"SparseConv2d: x must be [B, {self.in_channels}, H, W] or [{self.in_channels}, H, W], "
                             f"got {tuple(x.shape)}")
        op = type(self).__name__
        if x.shape[2] == 0 or x.shape[3] == 0:  # padding would make an output of the bias alone
            raise ValueError(f"{op}: x has an empty spatial size {tuple(x.shape[2:])}: as "
                             f"nn.{self._dense_type.__name__}, only an empty batch is supported")
        backend = ops.resolve_backend(op, self.backend, x.device)
        # Under torch.func (vmap) the patch GEMM below: the implicit GEMM's channels_last copy of x is
        # not supported there.
        if backend != "cpu" and not torch._C._are_functorch_transforms_active():
            return self._implicit_gemm(x, backend)
        b, c, h, w = x.shape
        taps = self._kernel_taps()
        (kh, kw), (sh, sw), (ph, pw), (dh, dw) = taps
        ho, wo = ops.conv_output_hw(op, h, w, *taps)
        k = kh * kw * c
        if torch.compiler.is_compiling() and torch.is_grad_enabled() and any(
                t is not None and t.requires_grad for t in (x, self.values, self.bias)):
            # A compiled training step: the patch matrix through F.unfold (im2col; its backward is
            # col2im). Inductor's compiled backward of the strided windows below writes out of bounds
            # (torch 2.13 on the CPU: its unfold_backward lowering, pytorch#171370 and #172064).
            cols = torch.nn.functional.unfold(x, taps.kernel_size, taps.dilation, taps.padding, taps.stride)
            patches = cols.unflatten(1, (c, kh * kw)).transpose(1, 3).reshape(-1, k)
            return self._sparse_linear(patches).view(b, ho, wo, self.out_channels).permute(0, 3, 1, 2)
        # The patch matrix [B * Ho * Wo, kh * kw * Cin] in our K order (ky, kx, cin) as a strided view of
        # the (zero-padded) NHWC input: its gather takes a tenth of the time of unfold (whose (cin, ky,
        # kx) order then needs a transpose copy) on a 3 x 3 layer, and is no copy at all for a 1 x 1,
        # stride 1 convolution of a channels_last input.
        def patch_view(nhwc: Tensor) -> Tensor:
            # Sliding windows over H, then W (every dh-th / dw-th tap of a dilated window), as views
            # whose shapes follow x's even in a torch.jit.trace: [B, Ho, Wo, C, kh, kw] -> [B, Ho, Wo,
            # kh, kw, C].
            windows = nhwc.unfold(1, dh * (kh - 1) + 1, sh)[..., ::dh].unfold(2, dw * (kw - 1) + 1, sw)[..., ::dw]
            return windows.permute(0, 1, 2, 4, 5, 3)

        # A padded input is copied with its zeros only once a path below needs its patches: torch's
        # convolution pads by itself (a copy of the whole input, and its memory, for nothing before).
        padded = bool(ph or pw)
        patches = None if padded else patch_view(x.permute(0, 2, 3, 1))
        # A recorded call (compile, jit.trace: the chunk loop would be traced for one batch size)
        # takes the whole patch matrix in one GEMM, as does a patch matrix that is the input itself.
        recorded = ops.records_graph((x, self.values, self.bias))
        # Not for one input channel: torch 2.13's CPU convolution read a [N, 1, kh, kw] weight's
        # strides as the other memory format (both fit a size-1 dim) and gave wrong sums (off by 1.1
        # to 1e29 in bf16 and fp32).
        if (not recorded and b != 0 and (padded or not patches.is_contiguous()) and b * ho * wo >= CPU_TORCH_CONV_MIN_M
                and self.out_channels * k * x.element_size() <= ops._CPU_TILE_BYTES and c > 1
                and _torch_conv_wins(x.dtype, k)):
            # Large M in a dtype torch convolves natively: 2:4 saves no multiply-adds on a CPU, and
            # torch's convolution reads the input in place where the GEMM needs the patch gather. Its
            # weight is decompressed for this call into the reused dense-tile scratch (no page faults,
            # nothing kept per layer): up to the scratch's size, past which the GEMM (on the sparse
            # weight, or dense tiles) costs less than decompressing the whole weight afresh.
            # The checks the GEMM would make: this path hands the weight's pointers to C++ itself.
            ops.check_x_matches_weight(op, x, self.values, ops.FLOAT_DTYPES, self.bias)
            ops.check_same_device(op, x=x, values=self.values)  # _check_operands takes no 4-D x
            ops._check_operands(op, "cpu", k, self.values, self.metadata, bias=self.bias)
            (_, matrix), = ops._decompressed_tiles(self.values.detach().contiguous(), self.metadata.contiguous(), k, 0)
            # In NCHW order, copied (a reused scratch as well): a channels_last weight (the tile's
            # (ky, kx, cin) rows, permuted) made torch 2.13's CPU convolution segfault with large
            # padding and stride over maps of a few pixels, and is no faster (oneDNN reorders either).
            weight = ops._reused_buffer(("conv_weight", x.dtype), matrix.numel(), x.dtype, x.device)
            weight = weight[:matrix.numel()].view(self.out_channels, c, kh, kw)
            weight.copy_(matrix.view(self.out_channels, kh, kw, c).permute(0, 3, 1, 2))
            # Dilation along a one-tap side changes nothing, and torch 2.13's CPU convolution of a
            # channels_last input one pixel wide crashed on it (a segfault: a (3, 1) kernel, dilation
            # (2, 3), padding (1, 3)).
            dilation = tuple(1 if taps_k == 1 else d for taps_k, d in zip(taps.kernel_size, taps.dilation))
            return torch.nn.functional.conv2d(x, weight, self.bias, taps.stride, taps.padding, dilation)
        if padded:
            patches = patch_view(torch.nn.functional.pad(x.permute(0, 2, 3, 1), (0, 0, pw, pw, ph, ph)))
        if recorded or patches.is_contiguous() or b == 0:
            y = self._sparse_linear(patches.reshape(-1, k))
            return y.view(patches.shape[:3] + (self.out_channels,)).permute(0, 3, 1, 2)
        # Inference: the patch matrix (kh * kw times the input, for a 3 x 3 layer) is gathered a chunk
        # at a time into a reused scratch of ops._CPU_TILE_BYTES (or one pixel's patch, if larger),
        # which the GEMM then reads from cache: memory stays bounded at any image size, and no call
        # pays the page faults of a fresh allocation that size (they cost more than the gather). A
        # chunk is whole images where one fits (few GEMM calls for a large batch of small maps),
        # else a run of output rows of one image, else (a row wider than the scratch) a run of one
        # row's pixels.
        y = x.new_empty((b, ho, wo, self.out_channels))
        pixels = max(1, ops._CPU_TILE_BYTES // (k * x.element_size()))
        scratch = ops._reused_buffer(("conv_patches", x.dtype), min(pixels, b * ho * wo) * k, x.dtype, x.device)

        def gather_and_multiply(source: Tensor, out: Tensor) -> None:
            chunk = scratch[:source.numel()].view(source.shape)
            chunk.copy_(source)
            out.copy_(self._sparse_linear(chunk.view(-1, k)).view(out.shape))

        if ho * wo <= pixels:
            images = pixels // (ho * wo)
            for first in range(0, b, images):
                gather_and_multiply(patches[first:first + images], y[first:first + images])
        elif wo <= pixels:
            rows = pixels // wo
            for image in range(b):
                for oy in range(0, ho, rows):
                    gather_and_multiply(patches[image, oy:oy + rows], y[image, oy:oy + rows])
        else:
            for image in range(b):
                for oy in range(ho):
                    for ox in range(0, wo, pixels):
                        gather_and_multiply(patches[image, oy, ox:ox + pixels], y[image, oy, ox:ox + pixels])
        return y.permute(0, 3, 1, 2)

    def _implicit_gemm(self, x: Tensor, backend: str) -> Tensor:
        op = type(self).__name__
        ops.check_x_matches_weight(op, x, self.values, ops.KERNEL_DTYPES, self.bias)
        ops.check_same_device(op, x=x, values=self.values)
        # A channels_last tensor permuted to [B, H, W, C] is contiguous NHWC: no copy then.
        x_nhwc = x.contiguous(memory_format=torch.channels_last).permute(0, 2, 3, 1)
        y = ops.call(ops._conv2d, x_nhwc, self.values, self.metadata, self._kernel_meta_for(backend),
                     *(list(pair) for pair in self._kernel_taps()), self.bias, 0, backend)
        return y.permute(0, 3, 1, 2)

    def dense_weight(self) -> Tensor:
        """The equivalent dense (pruned) weight in nn.Conv2d's shape ``[Cout, Cin, kh, kw]``."""
        kh, kw = self._kernel_taps().kernel_size
        return self._matrix_dense().view(self.out_channels, kh, kw, self.in_channels).permute(0, 3, 1, 2).contiguous()

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}, dilation={self.dilation}, bias={self.bias is not None}, "
                f"{self._bytes_repr()}")


def _conv1d_taps(kernel_size, stride, padding, dilation) -> _ConvTaps:
    """nn.Conv1d's one-element geometry, checked, as the pairs of the 2-D kernel it runs on:
    (1, k), (1, s), (0, p), (1, d)."""
    for name, value, low in (("kernel_size", kernel_size, 1), ("stride", stride, 1), ("padding", padding, 0),
                             ("dilation", dilation, 1)):
        if (not isinstance(value, (tuple, list)) or len(value) != 1 or not isinstance(value[0], numbers.Integral)
                or isinstance(value[0], bool) or value[0] < low):
            raise ValueError(f"SparseConv1d: {name} must be one integer >= {low}, got {value!r}")
    (k,), (s,), (p,), (d,) = kernel_size, stride, padding, dilation
    return _ConvTaps((1, k), (1, s), (0, p), (1, d))


class SparseConv1d(SparseConv2d):
    """``nn.Conv1d`` (groups = 1) with a 2:4-compressed weight: the SparseConv2d of its kernel as
    one row of taps, run on ``x [B, C, L]`` (or ``[C, L]``) viewed as ``[B, C, 1, L]``: the CUDA
    implicit GEMM and the CPU patch GEMM alike. K = Cin * k is ordered (kx, cin), cin fastest, so
    that 2:4 groups run along the channels of one tap. ``kernel_size``, ``stride``, ``padding`` and
    ``dilation`` are nn.Conv1d's one-element tuples (models read them: Whisper's encoder checks its
    input length by ``conv1.stride[0]``).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0, dilation=1,
                 bias: bool = True, *, dtype: torch.dtype = torch.float16, device=None,
                 backend: Optional[str] = None):
        if isinstance(padding, str):
            raise ValueError(f"SparseConv1d: padding must be a number, got the string {padding!r}")
        single = torch.nn.modules.utils._single
        geometry = [single(v) for v in (kernel_size, stride, padding, dilation)]
        super().__init__(in_channels, out_channels, *_conv1d_taps(*geometry), bias, dtype=dtype, device=device,
                         backend=backend)
        self.kernel_size, self.stride, self.padding, self.dilation = geometry  # nn.Conv1d's

    _dense_type = nn.Conv1d

    def _dense_weight_shape(self) -> tuple:
        """nn.Conv1d's weight shape [Cout, Cin, k]."""
        return (self.out_channels, self.in_channels, self._weight_kernel[1])

    def _kernel_taps(self) -> _ConvTaps:
        single = torch.nn.modules.utils._single
        return self._check_kernel(
            _conv1d_taps(*(single(v) for v in (self.kernel_size, self.stride, self.padding, self.dilation))))

    def _forward(self, x: Tensor) -> Tensor:
        if x.dim() not in (2, 3) or x.shape[-2] != self.in_channels:
            raise ValueError(f"SparseConv1d: x must be [B, {self.in_channels}, L] or [{self.in_channels}, L], got "
                             f"{tuple(x.shape)}")
        if x.shape[-1] == 0:  # padding would make an output of the bias alone
            raise ValueError("SparseConv1d: x has an empty length: as nn.Conv1d, only an empty batch is supported")
        (_, k), (_, s), (_, p), (_, d) = self._kernel_taps()
        length = ops.conv_output_size(x.shape[-1], k, s, p, d)
        if length <= 0:  # said here in 1-D terms, before the 2-D kernel would
            raise ValueError(f"SparseConv1d: the input length {x.shape[-1]} is shorter than the dilated kernel "
                             f"({d * (k - 1) + 1}) with padding {p}: output length would be {length}")
        batched = x.dim() == 3
        y = super()._forward((x if batched else x.unsqueeze(0)).unsqueeze(2)).squeeze(2)
        return y if batched else y.squeeze(0)

    def dense_weight(self) -> Tensor:
        """The equivalent dense (pruned) weight in nn.Conv1d's shape ``[Cout, Cin, k]``."""
        return super().dense_weight().squeeze(2)


# SparseConv2d's CPU inference takes torch's convolution (on the decompressed weight) over the patch
# GEMM from this many output pixels, where its per-call weight costs (decompression, oneDNN's
# reorder) are small next to the gather it saves. Measured on the 2-core AVX-512 VM (bf16 / fp32,
# 3 x 3 and strided 1 x 1 layers of 128-1024 channels): the GEMM 1.1-1.25x faster at M = 98,
# torch's convolution 1.02-1.2x faster at M = 196-784.
CPU_TORCH_CONV_MIN_M = 160


def _torch_conv_wins(dtype: torch.dtype, k: int) -> bool:
    """Whether SparseConv2d's CPU inference (from CPU_TORCH_CONV_MIN_M output pixels, a weight
    within the dense-tile scratch, patches that need a gather) takes torch's convolution on the
    decompressed weight over the patch GEMM: where the GEMM would take dense tiles itself, and
    for fp32 always, where even the AVX-512 kernel's edge on a long K is less than the gather
    (ResNet-50 256 -> 256 3 x 3 at 14 x 14, batch 8: 0.94x oneDNN against 0.75x). Not for fp16
    without native dot products, which torch's convolution widens (the GEMM: 3-4x)."""
    return dtype == torch.float32 or ops._cpu_dense_tiles_win(dtype, k)


def is_conv1d(module: nn.Module) -> bool:
    """Whether ``module`` is transformers' ``Conv1D`` (GPT-2, OpenAI GPT, ImageGPT, ...), masked
    for pruning or not: a linear layer holding ``weight [nx, nf]`` (in, out: transposed against
    nn.Linear's) and ``bias [nf]``, computing ``x @ weight + bias``. Told by the class name and
    those attributes, so that transformers need not be imported."""
    weight, bias = getattr(module, "weight", None), getattr(module, "bias", None)
    return (any(cls.__name__ == "Conv1D" for cls in type(module).__mro__) and isinstance(weight, Tensor)
            and weight.dim() == 2 and tuple(weight.shape) == (getattr(module, "nx", None), getattr(module, "nf", None))
            and (bias is None or (isinstance(bias, Tensor) and tuple(bias.shape) == (weight.shape[1],))))


def weight_skip_reason(layer: nn.Module) -> Optional[str]:
    """Why ``layer.weight`` cannot be compressed as it stands, or None: an uninitialized lazy layer
    (no shape yet), no weight tensor at all, or a weight that is no parameter on a layer with forward
    pre-hooks, which recompute it before every forward (torch.nn.utils.spectral_norm and
    weight_norm's old forms, torch.nn.utils.prune): a compressed copy would freeze its current
    value, stale from the next step on (after a state-dict load, before any forward, it is not even
    the weight the layer computes with). A weight held as a buffer, with no hook, converts as it is.
    A parametrized weight (torch.nn.utils.parametrize) is the callers' to judge."""
    weight = getattr(layer, "weight", None)
    if isinstance(weight, nn.parameter.UninitializedParameter):
        return "an uninitialized lazy layer: run one forward to give it its shapes, then convert it"
    if not isinstance(weight, Tensor):
        return f"it has no weight tensor (got {type(weight).__name__})"
    if isinstance(weight, nn.Parameter) or nn.utils.parametrize.is_parametrized(layer, "weight"):
        return None
    hooks = sorted({type(hook).__name__ for hook in layer._forward_pre_hooks.values()})
    if not hooks:
        return None  # a weight held as a buffer or a plain tensor: what it is, it stays
    return (f"its weight is no parameter and forward pre-hooks ({', '.join(hooks)}) may recompute it before every "
            "forward, as torch.nn.utils.spectral_norm's, weight_norm's and prune's do, so a compressed copy would "
            "freeze a stale value; remove them first (remove_spectral_norm, remove_weight_norm, prune.remove)")


def conv_skip_reason(conv: nn.Module) -> Optional[str]:
    """Why a Conv2d (Conv1d) cannot become a SparseConv2d (SparseConv1d), or None when it can."""
    if conv.groups != 1:
        kind = "depthwise" if conv.groups == conv.in_channels == conv.out_channels else "grouped"
        return (f"{kind} convolution (groups={conv.groups}) left dense: each output sees only "
                f"{conv.in_channels // conv.groups * math.prod(conv.kernel_size)} weights, "
                "too few for 2:4 along K to pay off and unsupported by the kernels")
    if conv.padding_mode != "zeros":
        return f"padding_mode={conv.padding_mode!r} is not supported (zeros only)"
    if numeric_padding(conv) is None:
        return (f"padding={conv.padding!r} with an even dilated kernel (kernel_size={tuple(conv.kernel_size)}, "
                f"dilation={tuple(conv.dilation)}) is not supported: torch pads its extra row / column on one side "
                "alone, SparseConv2d pads both sides alike")
    return None


def numeric_padding(conv: nn.Module) -> Optional[tuple]:
    """A convolution's padding as numbers, one per spatial dim: a string padding resolved as torch
    does, "valid" as zeros and "same" (stride 1) as dilation * (kernel - 1) / 2 on each side; None
    where that is not whole (an even dilated kernel, which torch pads one more on the far side)."""
    padding = conv.padding
    if not isinstance(padding, str):
        return padding
    if padding == "valid":
        return (0,) * len(conv.kernel_size)
    total = [d * (k - 1) for k, d in zip(conv.kernel_size, conv.dilation)]
    return None if any(t % 2 for t in total) else tuple(t // 2 for t in total)


def broadcast_compressed(model: nn.Module, src: int = 0, group=None) -> None:
    """Make every rank's compressed layers rank ``src``'s: each sparse layer's values, bias,
    metadata and scales are broadcast (torch.distributed, initialized; every rank of ``group``
    calls this with the same architecture).

    Why: a layer's weight is its values (a parameter) under its metadata (a buffer, with an INT8
    layer's scales). DDP's start-up broadcast copies parameters, and buffers only with
    ``broadcast_buffers=True``, its default; FSDP2 copies neither. Ranks whose layers were pruned
    from different weights (no common seed or checkpoint) then run one rank's values under another
    rank's 2:4 pattern, silently. Call it before wrapping the model: FSDP2 shards the values it
    finds. Buffers get new tensors, so that every copy derived from the metadata is made again."""
    import torch.distributed as dist

    for module in model.modules():
        if not isinstance(module, _SparseWeight):
            continue
        for name, tensor in [*module._parameters.items(), *module._buffers.items()]:
            if tensor is None:
                continue
            received = tensor.detach().clone(memory_format=torch.contiguous_format)
            dist.broadcast(received, src, group=group)
            if name in module._parameters:
                with torch.no_grad():
                    tensor.copy_(received)
            else:
                setattr(module, name, received)
